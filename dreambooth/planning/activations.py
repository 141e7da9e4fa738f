"""Activation memory of one training micro-batch, measured by running the step's graph.

Owns: the training graph as planning sees it (every text encoder on the prompts at 77 tokens, their
states concatenated into the UNet's cross-attention input, the UNet on noisy latents, an MSE loss
in float32, backward), and the measurement of the live activation bytes while it runs. The same
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

SDXL_TIME_IDS = 6
"""``add_time_ids`` per example under ``addition_embed_type="text_time"``: original size (2), crop
top-left (2), target size (2)."""


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

    def activations_now(self) -> int:
        return sum(s[_MemRefType.ACT] + s[_MemRefType.TEMP] for s in self._curr_mem_snap.values())


class TrainGraph(nn.Module):
    """UNet + text encoders wired as a DreamBooth step feeds them (shapes, not semantics).

    One text encoder (SD 1.x/2.x): its last hidden state is the cross-attention input. Several
    (SDXL): their penultimate hidden states concatenated, and the last encoder's pooled projection
    with the ``add_time_ids`` as the UNet's added conditioning.
    """

    def __init__(self, arch: Architecture, checkpointing: bool, train_text_encoder: bool = True):
        super().__init__()
        self.unet = build_component(arch.unet)
        self.text_encoders = nn.ModuleList(build_component(c) for c in arch.text_encoders)
        self.text_encoders.requires_grad_(train_text_encoder)
        self.train()
        if checkpointing:
            self.unet.enable_gradient_checkpointing()
            for encoder in self.text_encoders:
                encoder.gradient_checkpointing_enable()
        self.added_conditioning = arch.unet.config.get("addition_embed_type") == "text_time"

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        several = len(self.text_encoders) > 1
        states, pooled = [], None
        for encoder in self.text_encoders:
            out = encoder(input_ids, output_hidden_states=several)
            states.append(out.hidden_states[-2] if several else out.last_hidden_state)
            pooled = getattr(out, "text_embeds", None)
        added = None
        if self.added_conditioning:
            if pooled is None:
                raise ConfigError("a text_time UNet needs a text encoder with a projection (CLIPTextModelWithProjection) last")
            time_ids = torch.zeros(latents.shape[0], SDXL_TIME_IDS, dtype=latents.dtype, device=latents.device)
            added = {"text_embeds": pooled, "time_ids": time_ids}
        return self.unet(latents, timesteps, torch.cat(states, dim=-1), added_cond_kwargs=added, return_dict=False)[0]


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
            graph = TrainGraph(arch, checkpointing, train_text_encoder)
        channels = arch.unet.config.get("in_channels", 4)
        latents = torch.randn(rows, channels, side, side, dtype=dtype)
        target = torch.randn(rows, arch.unet.config.get("out_channels", channels), side, side)
        timesteps = torch.randint(0, 1000, (rows,))
        vocab = arch.text_encoders[0].config.get("vocab_size", 49408) if arch.text_encoders else 1
        input_ids = torch.randint(0, vocab, (rows, TEXT_LENGTH))
        tracker = _ActivationTracker()
        with tracker:
            prediction = graph(latents, timesteps, input_ids)
            loss = F.mse_loss(prediction.float(), target)
            after_forward = tracker.activations_now()
            loss.backward()
    return ActivationPeak(tracker.activation_peak, after_forward, rows, resolution, checkpointing)
