"""The model-family seam: what differs between Stable Diffusion 1.x/2.x and SDXL, in one interface.

Owns ``ModelFamily`` (one instance per family, stateless and picklable, in the spirit of
torchtitan's per-model ``ModelSpec``) and ``Components`` (one loaded model). A family says:

- which components a pipeline folder has and which of them train (the UNet and every text encoder);
- how a prompt becomes token ids (``tokenize``: one ``input_ids`` tensor per tokenizer) and which
  per-example size conditions go with an image (``size_conditions``: SDXL's ``time_ids``);
- how those inputs become the UNet's conditioning (``condition``);
- the diffusers pipeline class used for priors, samples and export, and how trained weights are saved.

The training loop, batches, priors, export and the CLI ask the family; only ``families/*.py`` name
model classes. Detection reads ``model_index.json``'s ``_class_name`` (``families.family_of``).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

import torch
from torch import nn

if TYPE_CHECKING:
    from dreambooth.config import TrainConfig

Conditions = dict[str, torch.Tensor]
"""A batch's conditioning inputs by name, each with the batch as its first dimension: ``input_ids``
int64 [N, L] (first tokenizer), ``input_ids_2`` [N, L] (second tokenizer, SDXL), ``time_ids``
float32 [N, 6] (SDXL size conditions)."""


def input_ids_key(tokenizer_name: str) -> str:
    """``tokenizer`` → ``input_ids``, ``tokenizer_2`` → ``input_ids_2``."""
    return "input_ids" + tokenizer_name.removeprefix("tokenizer")


@dataclass
class Components:
    """One loaded model: the parts that training and generation touch (fp32, on the CPU as loaded)."""

    family: "ModelFamily"
    tokenizer: object
    text_encoder: nn.Module
    unet: nn.Module
    vae: nn.Module
    noise_scheduler: object
    """DDPMScheduler with the model's training schedule (``add_noise``, ``prediction_type``)."""
    tokenizer_2: object = None
    """SDXL's second tokenizer (OpenCLIP's); None for one-encoder families."""
    text_encoder_2: Optional[nn.Module] = None
    """SDXL's second text encoder (``CLIPTextModelWithProjection``); None for one-encoder families."""

    @property
    def prediction_type(self) -> str:
        """``epsilon`` or ``v_prediction``: what the UNet predicts, hence the loss target."""
        return self.noise_scheduler.config.prediction_type

    @property
    def tokenizers(self) -> tuple:
        return tuple(getattr(self, name) for name in self.family.tokenizer_names)

    def trainable(self) -> dict[str, nn.Module]:
        """The modules DreamBooth fine-tunes, by component name: ``unet`` and every text encoder."""
        return {name: getattr(self, name) for name in self.family.trainable_names}

    def prompt_inputs(self, prompt: str) -> Conditions:
        """One prompt's token ids per tokenizer, each int64 [1, L]."""
        return self.family.tokenize(self.tokenizers, prompt)

    def pipeline(self, scheduler, **modules: nn.Module):
        """A sampling pipeline over these modules (no copies) and ``scheduler``; ``modules`` replace
        components by name (e.g. the fine-tuned ``unet`` and ``text_encoder``)."""
        parts = {name: getattr(self, name) for name in self.family.pipeline_parts} | modules
        return self.family.assemble(parts, scheduler)


class ModelFamily(ABC):
    """A diffusers model family: its layout, conditioning, pipeline class and export."""

    name: str
    """Short name (run records, messages): ``sd`` or ``sdxl``."""
    pipeline_class: str
    """The diffusers pipeline class (``model_index.json``'s ``_class_name``) of priors, samples and export."""
    text_encoder_names: tuple[str, ...]
    """Component folders of the text encoders, in the order conditioning uses them."""
    text_encoder_classes: tuple[str, ...]
    """The transformers class of each text encoder."""
    tokenizer_names: tuple[str, ...]
    """Component folders of the tokenizers, one per text encoder."""

    @property
    def trainable_names(self) -> tuple[str, ...]:
        return ("unet", *self.text_encoder_names)

    @property
    def pipeline_parts(self) -> tuple[str, ...]:
        return ("vae", "unet", *self.text_encoder_names, *self.tokenizer_names)

    def __repr__(self) -> str:
        return f"<model family {self.name}>"

    def __reduce__(self):  # one instance per family, also after pickling to workers
        return (family_named, (self.name,))

    # ------------------------------------------------------------------ loading

    def load_components(self, model_path: str, revision: Optional[str] = None) -> Components:
        """Tokenizers, text encoders, UNet, VAE (all fp32) and the DDPM training scheduler."""
        import transformers
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        kw = {"revision": revision} if revision else {}
        # fp32 explicitly: shipped weights may be stored in fp16 (the built-in ``shapes`` model is), and
        # transformers 5 would otherwise keep the stored dtype ("auto").
        fp32 = torch.float32
        encoders = {name: getattr(transformers, cls).from_pretrained(model_path, subfolder=name, dtype=fp32, **kw)
                    for name, cls in zip(self.text_encoder_names, self.text_encoder_classes)}
        return Components(
            family=self,
            unet=UNet2DConditionModel.from_pretrained(model_path, subfolder="unet", torch_dtype=fp32, **kw),
            vae=AutoencoderKL.from_pretrained(model_path, subfolder="vae", torch_dtype=fp32, **kw),
            noise_scheduler=DDPMScheduler.from_pretrained(model_path, subfolder="scheduler", **kw),
            **dict(zip(self.tokenizer_names, self.load_tokenizers(model_path, revision))),
            **encoders,
        )

    def load_tokenizers(self, model_path: str, revision: Optional[str] = None) -> tuple:
        """The model's tokenizers, one per text encoder (all CLIP BPE for SD and SDXL)."""
        from transformers import CLIPTokenizer

        kw = {"revision": revision} if revision else {}
        return tuple(CLIPTokenizer.from_pretrained(model_path, subfolder=name, **kw) for name in self.tokenizer_names)

    def load_pipeline(self, model_path: str, revision: Optional[str] = None, device: str = "cpu",
                      dtype: torch.dtype = torch.float32):
        """A ready-to-sample pipeline of this family from a folder or hub id (progress bar off)."""
        import diffusers

        kw = {"revision": revision} if revision else {}
        pipe = getattr(diffusers, self.pipeline_class).from_pretrained(
            model_path, torch_dtype=dtype, **self.pipeline_options(), **kw)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    def pipeline_options(self) -> dict:
        """Constructor options of the pipeline class that turn off what research use does not need."""
        return {}

    def assemble(self, parts: Mapping[str, object], scheduler):
        """This family's pipeline from in-memory modules (no copy), progress bar off; ``parts`` holds at
        least ``pipeline_parts`` (others are ignored)."""
        import diffusers

        modules = {name: parts[name] for name in self.pipeline_parts}
        pipe = getattr(diffusers, self.pipeline_class)(**modules, scheduler=scheduler, **self.pipeline_options())
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # ------------------------------------------------------------------ training

    def trained_encoders(self, train: "TrainConfig") -> dict[str, bool]:
        """Whether each text encoder trains under ``train``'s flags (the UNet always does)."""
        flags = (train.train_text_encoder, train.train_text_encoder_2)
        return dict(zip(self.text_encoder_names, flags))

    def enable_gradient_checkpointing(self, modules: Mapping[str, nn.Module]) -> None:
        """Recompute activations in the backward pass instead of keeping them, in each of ``modules``
        (trainable components by name): the UNet through diffusers' ``enable_gradient_checkpointing``
        (per down/mid/up block), each text encoder through transformers' ``activation_checkpointing_enable``
        (per transformer layer). Both use torch's non-reentrant checkpoint, which DeepSpeed ZeRO's
        parameter hooks (stage 3 gathers) run under again during the recompute."""
        for name, module in modules.items():
            if name == "unet":
                module.enable_gradient_checkpointing()
            elif name in self.text_encoder_names:
                module.activation_checkpointing_enable()
            else:
                raise ValueError(f"{name!r} is not a trainable component of {self!r} ({', '.join(self.trainable_names)})")

    def tokenize(self, tokenizers: Sequence, prompt: str) -> Conditions:
        """``prompt`` padded/truncated to each tokenizer's max length, as at inference: int64 [1, L] each."""
        return {
            input_ids_key(name): tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                                           truncation=True, return_tensors="pt").input_ids
            for name, tokenizer in zip(self.tokenizer_names, tokenizers)
        }

    def size_conditions(self, original_size: tuple[int, int], crop_top_left: tuple[int, int],
                        target_size: tuple[int, int]) -> Conditions:
        """Per-example conditions from an image's geometry (each [1, k]); none for most families."""
        return {}

    @abstractmethod
    def condition(self, module: nn.Module, conditions: Conditions) -> tuple[torch.Tensor, Optional[dict]]:
        """``(encoder_hidden_states [N, L, D], added_cond_kwargs or None)`` for the UNet, computed by
        ``module``'s text encoders (attributes named as the components) from a batch's ``conditions``."""

    # ------------------------------------------------------------------ export

    def save_pretrained(self, pipe, folder: Path, save_dtype: torch.dtype) -> None:
        """Save ``pipe`` (safetensors) with its trainable modules in ``save_dtype``; the modules are
        back in float32 afterwards, holding the saved (rounded) values. The folder loads with the plain pipeline class's ``from_pretrained``."""
        trained = [getattr(pipe, name) for name in self.trainable_names]
        for module in trained:
            module.to(save_dtype)
        try:
            pipe.save_pretrained(str(folder), safe_serialization=True)
        finally:
            for module in trained:
                module.to(torch.float32)
        for name in self.text_encoder_names:
            _load_as_float32(Path(folder) / name / "config.json")


def _load_as_float32(config_json: Path) -> None:
    """A plain ``from_pretrained(output)`` gets diffusers models in float32 but a transformers model in
    its saved dtype, and a pipeline of mixed dtypes fails (``Half and Float``). The config's ``dtype``
    says which dtype a load without ``dtype=`` uses: float32, as for the UNet; ``dtype=torch.float16``
    still loads every component in half precision."""
    config = json.loads(config_json.read_text())
    config["dtype"] = "float32"
    config_json.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def family_named(name: str) -> ModelFamily:
    from dreambooth.families import FAMILIES

    return next(f for f in FAMILIES.values() if f.name == name)
