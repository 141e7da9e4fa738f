"""Model architectures for planning: which components a pipeline has, their configs, and modules
built from those configs without weights.

Owns: finding a model's ``model_index.json`` and component configs (the shipped copies of SD 1.5,
SD 2.1 and SDXL base in ``dreambooth/data/architectures``, keyed by hub id; a local diffusers
folder; a built-in model; or another hub id through the hub cache), building each component on the
``meta`` device (parameter counts) or under a ``FakeTensorMode`` (activation measurement), and the
parameter counts DeepSpeed's estimators take (total, largest layer, ZeRO-3 persistent parameters).
Reads no weights and knows nothing of DeepSpeed's runtime.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from dreambooth.config import ConfigError

ARCHITECTURES_DIR = Path(str(resources.files("dreambooth") / "data" / "architectures"))
HUB_IDS_FILE = ARCHITECTURES_DIR / "hub_ids.json"

UNET_CLASSES = ("UNet2DConditionModel",)
TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
VAE_CLASSES = ("AutoencoderKL",)
SAVED_DTYPE_KEYS = ("torch_dtype", "dtype")


@dataclass(frozen=True)
class Component:
    """One model component of a pipeline, as ``model_index.json`` and its ``config.json`` describe it."""

    name: str
    """Folder name in the pipeline (``unet``, ``text_encoder``, ``text_encoder_2``, ``vae``)."""

    class_name: str
    """The diffusers / transformers class that ``from_pretrained`` would build."""

    config: dict[str, Any]
    """The component's ``config.json`` contents."""


@dataclass(frozen=True)
class Architecture:
    """A pipeline's trainable and frozen components, enough to build them without weights."""

    model: str
    """What the user passed to ``--model``."""

    source: str
    """Where the configs were read from (a folder)."""

    unet: Component
    """The denoiser (trained)."""

    text_encoders: tuple[Component, ...]
    """Text encoders in pipeline order (``text_encoder``, ``text_encoder_2``); trained unless frozen by a flag."""

    vae: Optional[Component]
    """The autoencoder (always frozen; None if the pipeline has none)."""

    pipeline_class: str
    """``model_index.json``'s ``_class_name`` (which model family trains it)."""

    @property
    def vae_scale_factor(self) -> int:
        """Image side / latent side: 2 ** (VAE levels - 1), as diffusers pipelines compute it."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config["block_out_channels"]) - 1)

    @property
    def native_resolution(self) -> int:
        """The image side the model was trained at: ``unet.sample_size * vae_scale_factor``."""
        return int(self.unet.config["sample_size"]) * self.vae_scale_factor


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of an architecture's components and what DeepSpeed's estimators need."""

    per_component: dict[str, int]
    """Parameters of each component by name (``unet``, ``text_encoder``, ...)."""

    trainable: int
    """Parameters the optimizer updates (UNet + trained text encoders): Ψ of the ZeRO paper."""

    frozen: int
    """Parameters held but not trained (the VAE, frozen text encoders)."""

    largest_layer: int
    """Parameters of the largest single module (its direct parameters), as DeepSpeed's
    ``model_to_params`` counts it for ``estimate_zero3_model_states_mem_needs``."""

    persistent: int
    """Trainable parameters at or below ZeRO-3's ``param_persistence_threshold`` (elements per
    tensor): ZeRO-3 keeps these whole on every rank instead of partitioning them."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path} is missing: a diffusers pipeline folder has model_index.json and <component>/config.json") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc})") from exc


def shipped_hub_ids() -> dict[str, str]:
    """Hub ids whose architecture ships with the package → their folder under ``data/architectures``."""
    return json.loads(HUB_IDS_FILE.read_text())


def _config_folder(model: str) -> Path:
    """A folder holding ``model_index.json`` and component configs for ``model``."""
    shipped = shipped_hub_ids()
    if model in shipped:
        return ARCHITECTURES_DIR / shipped[model]
    from dreambooth.models import BUILTIN_NAMES, resolve_model

    local = Path(model).expanduser()
    if model in BUILTIN_NAMES or local.exists():
        return Path(resolve_model(model))
    if model.count("/") != 1:
        raise ConfigError(
            f"--model {model!r} is not a known hub id ({', '.join(sorted(shipped))}), a built-in name "
            f"({', '.join(BUILTIN_NAMES)}) or an existing diffusers folder"
        )
    return _hub_configs(model)


def _hub_configs(model: str) -> Path:
    """Configs of another hub model from the hub (or its local cache): JSON files only, no weights."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, allow_patterns=["model_index.json", "*/config.json"]))
    except Exception as exc:  # offline, unknown, gated: all mean "cannot plan it from the hub"
        raise ConfigError(
            f"--model {model!r}: cannot read its configs from the hub ({type(exc).__name__}). Known without "
            f"the hub: {', '.join(sorted(shipped_hub_ids()))}; or pass a local diffusers folder"
        ) from exc


def load_architecture(model: str) -> Architecture:
    """The architecture of ``model`` (hub id, local folder or built-in name), from configs only."""
    folder = _config_folder(model)
    index = _read_json(folder / "model_index.json")
    found: dict[str, Component] = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            continue
        class_name = entry[1]
        if class_name in UNET_CLASSES + TEXT_ENCODER_CLASSES + VAE_CLASSES:
            found[name] = Component(name, class_name, _read_json(folder / name / "config.json"))
    unets = [c for c in found.values() if c.class_name in UNET_CLASSES]
    if len(unets) != 1:
        raise ConfigError(f"--model {model!r}: planning needs exactly one UNet2DConditionModel in model_index.json, found {len(unets)}")
    encoders = tuple(c for c in found.values() if c.class_name in TEXT_ENCODER_CLASSES)
    vae = next((c for c in found.values() if c.class_name in VAE_CLASSES), None)
    if not encoders:
        raise ConfigError(f"--model {model!r}: model_index.json names no CLIP text encoder; planning needs one")
    return Architecture(model, str(folder), unets[0], encoders, vae, str(index.get("_class_name", "")))


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules with ``dtype`` parameters (``.to(dtype)`` cannot swap meta/fake parameters)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_component(component: Component) -> torch.nn.Module:
    """The module of ``component``, built from its config in the current device / fake-tensor context."""
    if component.class_name in TEXT_ENCODER_CLASSES:
        import transformers

        # the dtype a checkpoint was saved in is not the one planned for: the caller's default dtype decides
        settings = {k: v for k, v in component.config.items() if not k.startswith("_") and k not in SAVED_DTYPE_KEYS}
        config = transformers.CLIPTextConfig(**settings)
        return getattr(transformers, component.class_name)(config)
    import diffusers

    return getattr(diffusers, component.class_name).from_config(component.config)


def _largest_layer(module: torch.nn.Module) -> int:
    """DeepSpeed's ``model_to_params`` rule: the most parameters any one module holds directly."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules()), default=0)


def count_parameters(arch: Architecture, *, train_text_encoder: bool = True, persistence_threshold: int) -> ParameterCounts:
    """Parameter counts of ``arch``'s components, built on the meta device (no memory, ~1 s for SDXL)."""
    per_component: dict[str, int] = {}
    trainable = frozen = largest = persistent = 0
    components = [(arch.unet, True)] + [(c, train_text_encoder) for c in arch.text_encoders]
    if arch.vae is not None:
        components.append((arch.vae, False))
    for component, trained in components:
        with torch.device("meta"):
            module = build_component(component)
        sizes = [p.numel() for p in module.parameters()]
        per_component[component.name] = sum(sizes)
        if trained:
            trainable += sum(sizes)
            largest = max(largest, _largest_layer(module))
            persistent += sum(n for n in sizes if n <= persistence_threshold)
        else:
            frozen += sum(sizes)
    return ParameterCounts(per_component, trainable, frozen, largest, persistent)


def narrowed(arch: Architecture, divisor: int, head_dim: int) -> Architecture:
    """``arch`` with every UNet channel count and text-encoder width divided by ``divisor`` (rounded to
    whole heads of ``head_dim``), depths unchanged: a model of the same shape that fits a small machine.
    The UNet's cross-attention width and pooled-embedding input follow the narrower encoders."""
    from dataclasses import replace

    def narrower(width: int) -> int:
        return max(head_dim, round(width / divisor / head_dim) * head_dim)

    encoders = []
    for encoder in arch.text_encoders:
        hidden = narrower(encoder.config["hidden_size"])
        ratio = encoder.config["intermediate_size"] // encoder.config["hidden_size"]
        encoders.append(replace(encoder, config=dict(encoder.config, hidden_size=hidden, intermediate_size=ratio * hidden,
                                                     num_attention_heads=hidden // head_dim, projection_dim=hidden)))
    channels = [narrower(c) for c in arch.unet.config["block_out_channels"]]
    unet = dict(arch.unet.config, block_out_channels=channels, attention_head_dim=[c // head_dim for c in channels],
                cross_attention_dim=sum(e.config["hidden_size"] for e in encoders))
    if unet.get("projection_class_embeddings_input_dim"):  # pooled projection + time ids (SDXL)
        pooled_before = arch.text_encoders[-1].config["projection_dim"]
        unet["projection_class_embeddings_input_dim"] += encoders[-1].config["projection_dim"] - pooled_before
    return replace(arch, model=f"{arch.model} at 1/{divisor} width", unet=replace(arch.unet, config=unet),
                   text_encoders=tuple(encoders))
