"""The trainable model and the DreamBooth loss. Plain PyTorch: no Ray, no DeepSpeed.

``DreamBoothModule`` holds the UNet *and* the text encoder in one ``nn.Module`` so that a single
DeepSpeed engine (one optimizer, one ZeRO partitioning) fine-tunes all layers together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class DreamBoothModule(nn.Module):
    """UNet + CLIP text encoder; ``forward`` predicts the scheduler's target for noisy latents.

    Args of ``forward``:
        noisy_latents: float [N, C, h, w], latents after ``scheduler.add_noise``
        timesteps:     int64 [N]
        input_ids:     int64 [N, L], token ids of each example's prompt (L = tokenizer max length)
    Returns: float [N, C, h, w], the prediction (ε or v, per the scheduler's ``prediction_type``).
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, train_text_encoder: bool = True):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.text_encoder.requires_grad_(train_text_encoder)
        self.unet.requires_grad_(True)

    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        encoder_hidden_states = self.text_encoder(input_ids, return_dict=False)[0]
        return self.unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]


@dataclass
class LossParts:
    """The scalar loss and its two halves (detached, for logging)."""

    total: torch.Tensor
    instance: float
    prior: float


def dreambooth_loss(prediction: torch.Tensor, target: torch.Tensor, num_instance: int, prior_loss_weight: float) -> LossParts:
    """Subject MSE + λ × prior MSE (paper eq. 2, in the ε/v form Stable Diffusion trains with).

    The first ``num_instance`` rows are subject examples, the rest class-prior examples. With no
    prior rows (λ = 0 runs) the loss is the subject MSE alone.
    """
    pred_instance, pred_prior = prediction[:num_instance], prediction[num_instance:]
    target_instance, target_prior = target[:num_instance], target[num_instance:]
    instance = F.mse_loss(pred_instance.float(), target_instance.float(), reduction="mean")
    if pred_prior.shape[0] == 0:
        return LossParts(instance, instance.item(), 0.0)
    prior = F.mse_loss(pred_prior.float(), target_prior.float(), reduction="mean")
    return LossParts(instance + prior_loss_weight * prior, instance.item(), prior.item())


def diffusion_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict: the noise (ε-prediction) or the velocity (v-prediction)."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}; expected 'epsilon' or 'v_prediction'")


def mixed_batch_loss(model, noise_scheduler, latents: torch.Tensor, input_ids: torch.Tensor, num_instance: int,
                     prior_loss_weight: float, generator: torch.Generator) -> LossParts:
    """One DreamBooth loss evaluation: noise the latents at random timesteps, predict, compare.

    ``model`` is a ``DreamBoothModule`` or a DeepSpeed engine wrapping one; ``latents`` [N, C, h, w]
    and ``input_ids`` [N, L] hold ``num_instance`` subject rows, then prior rows. Noise and
    timesteps come from ``generator`` (CPU), so a step's randomness is reproducible.
    """
    device = latents.device
    dtype = next(model.parameters()).dtype
    noise = torch.randn(latents.shape, generator=generator).to(device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = model(noisy.to(dtype), timesteps, input_ids)
    target = diffusion_target(noise_scheduler, latents, noise, timesteps)
    return dreambooth_loss(prediction, target, num_instance, prior_loss_weight)

