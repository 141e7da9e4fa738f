"""Activation memory of one training micro-batch, measured by running the step's graph.

Owns: running the training module (``DreamBoothModule`` of the model's family: its text encoders on
77-token prompts, their states into the UNet, the UNet on noisy latents), an MSE loss in float32
and backward, built from configs alone, and the measurement of the live activation bytes while it runs. The same
code runs on fake tensors (``torch._subclasses.FakeTensorMode``: shapes and dtypes only, no memory,
any model size) for ``dreambooth plan``, and on real CPU tensors for the check against a measured
peak (tests, benchmarks/memory.py).

Measurement: torch's ``MemTracker`` (``torch.distributed._tools.mem_tracker``) follows every tensor
storage an op creates until it is freed and sorts it into parameters, gradients, activations
(forward) and temporaries (backward); the activation peak is the largest sum of activations +
temporaries at any op of forward and backward. Parameters, gradients and optimizer states are not
part of it: the planner counts those per ZeRO stage. Attention runs through SDPA, which on CPU (and
so under fake CPU tensors) is the fused flash kernel: like GPU flash / memory-efficient attention,
it never holds the full attention matrix.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

from dreambooth.config import ConfigError
from dreambooth.planning.architectures import Architecture, build_component, default_dtype

TEXT_LENGTH = 77
"""Token positions of every CLIP prompt (the tokenizers pad to ``model_max_length``)."""

DEFAULT_LATENT_CHANNELS = 4
"""UNet input channels when its config does not say (diffusers' default)."""

NUM_TRAIN_TIMESTEPS = 1000
"""Timesteps are drawn below this (Stable Diffusion's schedules; the value does not change memory)."""


@dataclass(frozen=True)
class ActivationPeak:
    """Activation bytes of one micro-batch's forward + backward on one rank."""

    peak_bytes: int
    """Largest live activations + backward temporaries at any point of forward and backward."""

    after_forward_bytes: int
    """Activations alive when forward has finished (what backward needs, plus the loss)."""

    rows: int
    """Examples in the micro-batch (subject + prior rows)."""

    resolution: int
    """Image side in pixels (latent side = resolution / VAE scale factor)."""

    checkpointing: bool
    """Whether gradient checkpointing was on for the UNet and the text encoders."""


class _ActivationTracker(MemTracker):
    """MemTracker that also keeps the peak of activations + temporaries (its own peak is of the total)."""

    def __init__(self) -> None:
        super().__init__()
        self.activation_peak = 0

    def _update_peak_stats(self, peak_state) -> None:  # noqa: ANN001 (torch's private _State)
        # Replaces MemTracker's per-module peak bookkeeping, which walks every tracked module at
        # every op (minutes for SDXL's ~2,000 modules); only the whole-step peak is needed here.
        self.activation_peak = max(self.activation_peak, self.activations_now())

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True) -> tuple[int, int]:
        # MemTracker hooks every parameter's gradient, which raises for frozen ones (a frozen text
        # encoder): modules holding any skip the hooks; their trainable leaves install their own.
        trainable = all(p.requires_grad for p in module.parameters())
        return super()._track_module_params_and_buffers(module, install_grad_hooks and trainable)

    def activations_now(self) -> int:
        """Live activation + temporary bytes at this moment, over all devices."""
        return sum(s[_MemRefType.ACT] + s[_MemRefType.TEMP] for s in self._curr_mem_snap.values())


def training_module(arch: Architecture, checkpointing: bool, train_text_encoder: bool = True) -> nn.Module:
    """The ``DreamBoothModule`` training runs (its model family wires encoders into the UNet), built
    from ``arch``'s configs in the current device / dtype / fake-tensor context, in train mode."""
    from dreambooth.families import FAMILIES
    from dreambooth.training.module import DreamBoothModule

    family = FAMILIES.get(arch.pipeline_class)
    if family is None:
        raise ConfigError(f"--model {arch.model}: its pipeline {arch.pipeline_class!r} is not one this project trains "
                          f"({', '.join(FAMILIES)})")
    encoders = {c.name: build_component(c) for c in arch.text_encoders}
    module = DreamBoothModule(build_component(arch.unet), encoders["text_encoder"], train_text_encoder, family=family,
                              text_encoder_2=encoders.get("text_encoder_2"), train_text_encoder_2=train_text_encoder)
    module.train()
    if checkpointing:
        module.unet.enable_gradient_checkpointing()
        for encoder in encoders.values():
            encoder.gradient_checkpointing_enable()
    return module


def example_conditions(module: nn.Module, rows: int, resolution: int, vocab_size: int) -> dict[str, torch.Tensor]:
    """Random token ids for each of the family's tokenizers (77 positions) and its size conditions."""
    from dreambooth.families.base import input_ids_key

    family = module.family
    conditions = {input_ids_key(name): torch.randint(0, vocab_size, (rows, TEXT_LENGTH)) for name in family.tokenizer_names}
    sizes = family.size_conditions((resolution, resolution), (0, 0), (resolution, resolution))
    return conditions | {key: value.expand(rows, -1).clone() for key, value in sizes.items()}


@contextlib.contextmanager
def _maybe_fake(fake: bool) -> Iterator[None]:
    if not fake:
        yield
        return
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        yield


def measure_activations(arch: Architecture, *, resolution: int, rows: int, dtype: torch.dtype, checkpointing: bool,
                        train_text_encoder: bool = True, fake: bool = True, seed: int = 0) -> ActivationPeak:
    """Run one forward + backward of ``arch``'s training graph and return its activation peak.

    ``fake``: on fake tensors (any size, no memory) or on real CPU tensors (small models: the
    measured counterpart). ``dtype``: the weights' dtype in training (bf16 / fp16 under mixed
    precision, as DeepSpeed casts the module; fp32 otherwise).
    """
    side = resolution // arch.vae_scale_factor
    if side * arch.vae_scale_factor != resolution:
        raise ConfigError(f"--resolution {resolution} is not a multiple of the VAE's factor {arch.vae_scale_factor}")
    torch.manual_seed(seed)
    with _maybe_fake(fake):
        with default_dtype(dtype):
            module = training_module(arch, checkpointing, train_text_encoder)
        channels = arch.unet.config.get("in_channels", DEFAULT_LATENT_CHANNELS)
        latents = torch.randn(rows, channels, side, side, dtype=dtype)
        target = torch.randn(rows, arch.unet.config.get("out_channels", channels), side, side)
        timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (rows,))
        conditions = example_conditions(module, rows, resolution, arch.text_encoders[0].config["vocab_size"])
        tracker = _ActivationTracker()
        with tracker:
            prediction = module(latents, timesteps, conditions)
            loss = F.mse_loss(prediction.float(), target)
            after_forward = tracker.activations_now()
            loss.backward()
    return ActivationPeak(tracker.activation_peak, after_forward, rows, resolution, checkpointing)
