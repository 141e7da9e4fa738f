"""The trainable model and the DreamBooth loss. Plain PyTorch: no Ray, no DeepSpeed.

``DreamBoothModule`` holds the UNet *and* the text encoder(s) in one ``nn.Module`` so that a single
DeepSpeed engine (one optimizer, one ZeRO partitioning) fine-tunes all layers together; its model
family (``dreambooth.families``) turns a batch's conditioning inputs into what the UNet attends to.
``mixed_batch_loss`` is the one per-step loss of the cluster loop, the in-process loop and pretraining.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dreambooth.families import SD, Components, Conditions, ModelFamily


class DreamBoothModule(nn.Module):
    """UNet + text encoder(s); ``forward`` predicts the scheduler's target for noisy latents.

    Submodules are named as the pipeline's components (``unet``, ``text_encoder``, and
    ``text_encoder_2`` for SDXL), so state-dict keys are ``<component>.<parameter>``.

    Args of ``forward``:
        noisy_latents: float [N, C, h, w], latents after ``scheduler.add_noise``
        timesteps:     int64 [N]
        conditions:    the family's inputs (``families.base.Conditions``), e.g. ``input_ids`` int64
                       [N, L] (L = tokenizer max length); SDXL adds ``input_ids_2`` and ``time_ids`` [N, 6]
    Returns: float [N, C, h, w], the prediction (ε or v, per the scheduler's ``prediction_type``).
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, train_text_encoder: bool = True, *,
                 family: ModelFamily = SD, text_encoder_2: Optional[nn.Module] = None,
                 train_text_encoder_2: bool = True):
        super().__init__()
        self.family = family
        self.unet = unet.requires_grad_(True)
        self.text_encoder = text_encoder.requires_grad_(train_text_encoder)
        if "text_encoder_2" in family.text_encoder_names:
            self.text_encoder_2 = text_encoder_2.requires_grad_(train_text_encoder_2)

    @classmethod
    def from_components(cls, parts: Components, trained_encoders: Optional[dict[str, bool]] = None,
                        modules: Optional[dict[str, nn.Module]] = None) -> "DreamBoothModule":
        """Around ``parts``' trainable modules (or the given replacements by name, e.g. fresh copies);
        ``trained_encoders`` says which text encoders train (default: all)."""
        chosen = parts.trainable() | (modules or {})
        trains = {name: True for name in parts.family.text_encoder_names} | (trained_encoders or {})
        return cls(chosen["unet"], chosen["text_encoder"], trains["text_encoder"], family=parts.family,
                   text_encoder_2=chosen.get("text_encoder_2"), train_text_encoder_2=trains.get("text_encoder_2", True))

    def parts(self) -> dict[str, nn.Module]:
        """The trained modules by component name (``unet``, ``text_encoder``[, ``text_encoder_2``])."""
        return {name: getattr(self, name) for name in self.family.trainable_names}

    def trained_parts(self) -> dict[str, nn.Module]:
        """The parts with parameters that train (a frozen text encoder is left out)."""
        return {name: part for name, part in self.parts().items() if any(p.requires_grad for p in part.parameters())}

    def enable_gradient_checkpointing(self) -> "DreamBoothModule":
        """Activation checkpointing in every trained part (``ModelFamily.enable_gradient_checkpointing``):
        less activation memory for a second forward pass in backward; the same loss and gradients.
        A frozen text encoder keeps no activations for backward, so it has nothing to checkpoint."""
        self.family.enable_gradient_checkpointing(self.trained_parts())
        return self

    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditions: Conditions) -> torch.Tensor:
        encoder_hidden_states, added = self.family.condition(self, conditions)
        return self.unet(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


def sdpa_backends(device: torch.device) -> list[str]:
    """The kernels torch's ``scaled_dot_product_attention`` may dispatch to on ``device``: on CUDA the
    enabled ones of flash (when this torch build has it), memory-efficient, cuDNN and math, in torch's
    order of preference (it takes the first one the inputs' dtype, shape and GPU allow); on the CPU,
    torch's one CPU path (a fused flash-style kernel, or math where it does not apply)."""
    if device.type != "cuda":
        return ["cpu"]
    cuda = torch.backends.cuda
    enabled = {
        "flash": cuda.flash_sdp_enabled() and cuda.is_flash_attention_available(),
        "memory_efficient": cuda.mem_efficient_sdp_enabled(),
        "cudnn": cuda.cudnn_sdp_enabled(),
        "math": cuda.math_sdp_enabled(),
    }
    return [name for name, on in enabled.items() if on]


def attention_backend(unet: nn.Module, device: torch.device) -> dict[str, list[str]]:
    """What computes the UNet's attention, for the run record: ``processors``, the attention processor
    classes its layers use (diffusers' ``attn_processors``; ``AttnProcessor2_0`` calls torch's
    ``scaled_dot_product_attention``, plain ``AttnProcessor`` materializes the attention matrix), and
    ``sdpa_backends``, the kernels SDPA may choose from on ``device`` (see ``sdpa_backends``)."""
    processors = getattr(unet, "attn_processors", {})
    return {"processors": sorted({type(p).__name__ for p in processors.values()}),
            "sdpa_backends": sdpa_backends(device)}


def derived_seed(*keys: int) -> int:
    """A 31-bit seed from integer keys (e.g. seed, rank, step, micro-batch): the same in every process
    and Python version (numpy's ``SeedSequence`` mixing, not ``hash``), distinct keys → unrelated seeds."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0]) & 0x7FFF_FFFF


@dataclass
class LossParts:
    """The scalar loss and its two halves (detached, for logging)."""

    total: torch.Tensor
    instance: float
    prior: float


def dreambooth_loss(prediction: torch.Tensor, target: torch.Tensor, num_instance: int, prior_loss_weight: float,
                    weights: Optional[torch.Tensor] = None) -> LossParts:
    """Subject MSE + λ × prior MSE (paper eq. 2, in the ε/v form Stable Diffusion trains with).

    The first ``num_instance`` rows are subject examples, the rest class-prior examples. With no
    prior rows (λ = 0 runs) the loss is the subject MSE alone. ``weights`` (float [N], e.g.
    ``min_snr_weights``) scale each row's MSE before the mean of its half; None weighs rows equally.
    """
    if weights is None:  # the plain MSE's own arithmetic, so unweighted runs reproduce earlier ones bit for bit
        def half_mse(rows: slice) -> torch.Tensor:
            return F.mse_loss(prediction[rows].float(), target[rows].float(), reduction="mean")
    else:
        per_row = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(dim=1)
        per_row = per_row * weights.to(per_row)

        def half_mse(rows: slice) -> torch.Tensor:
            return per_row[rows].mean()
    instance = half_mse(slice(0, num_instance))
    if prediction.shape[0] == num_instance:
        return LossParts(instance, instance.item(), 0.0)
    prior = half_mse(slice(num_instance, None))
    return LossParts(instance + prior_loss_weight * prior, instance.item(), prior.item())


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """float [N]: Min-SNR-γ loss weights of ``timesteps`` (Hang et al., 2023, as diffusers' training
    scripts compute them): min(SNR, γ) / SNR for ε-prediction, min(SNR, γ) / (SNR + 1) for
    v-prediction, where SNR(t) = ᾱ_t / (1 − ᾱ_t) (``diffusers.training_utils.compute_snr``)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def diffusion_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict: the noise (ε-prediction) or the velocity (v-prediction)."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}; expected 'epsilon' or 'v_prediction'")


def mixed_batch_loss(model, noise_scheduler, latents: torch.Tensor, conditions: Conditions, num_instance: int,
                     prior_loss_weight: float, generator: torch.Generator,
                     snr_gamma: Optional[float] = None) -> LossParts:
    """One DreamBooth loss evaluation: noise the latents at random timesteps, predict, compare.

    ``model`` is a ``DreamBoothModule`` or a DeepSpeed engine wrapping one; ``latents`` [N, C, h, w]
    and every tensor of ``conditions`` (``input_ids`` [N, L], ...) hold ``num_instance`` subject rows,
    then prior rows. Noise and
    timesteps come from ``generator`` (CPU), so a step's randomness is reproducible. ``snr_gamma``
    weighs each row by ``min_snr_weights`` (``TrainConfig.snr_gamma``); None: plain MSE.
    """
    device = latents.device
    dtype = next(model.parameters()).dtype
    noise = torch.randn(latents.shape, generator=generator).to(device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = model(noisy.to(dtype), timesteps, conditions)
    target = diffusion_target(noise_scheduler, latents, noise, timesteps)
    weights = None if snr_gamma is None else min_snr_weights(noise_scheduler, timesteps, snr_gamma)
    return dreambooth_loss(prediction, target, num_instance, prior_loss_weight, weights)

