"""Model families (see ``families.base``): Stable Diffusion 1.x/2.x and SDXL, detected from a
pipeline's ``model_index.json``."""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

from dreambooth.families.base import Components, Conditions, ModelFamily
from dreambooth.families.sd import SD
from dreambooth.families.sdxl import SDXL

FAMILIES: dict[str, ModelFamily] = {family.pipeline_class: family for family in (SD, SDXL)}
"""Every supported family by the pipeline class its ``model_index.json`` names."""


@lru_cache(maxsize=32)
def family_of(model_path: str, revision: Optional[str] = None) -> ModelFamily:
    """The family of a resolved model (local folder or hub id), from ``model_index.json``'s ``_class_name``."""
    from diffusers import DiffusionPipeline

    from dreambooth.config import ConfigError

    kw = {"revision": revision} if revision else {}
    class_name = DiffusionPipeline.load_config(model_path, **kw).get("_class_name")
    if class_name not in FAMILIES:
        raise ConfigError(f"--model {model_path}: its model_index.json names {class_name!r}; supported pipelines "
                          f"are {', '.join(FAMILIES)}")
    return FAMILIES[class_name]


__all__ = ["Components", "Conditions", "ModelFamily", "FAMILIES", "SD", "SDXL", "family_of"]
