"""DreamBooth in one process, without Ray or DeepSpeed: the same batches and loss as the cluster loop.

Owns a single-process fine-tune for experiments that run many small ones (the paper-claims
benchmark) and for baselines that measure what the distribution layer costs. It shares everything
but the engine with ``loop``: ``BatchMaker`` (subject photos + prior latents), ``DreamBoothModule``
and ``mixed_batch_loss``. Production runs go through ``dreambooth run`` (Ray Train + DeepSpeed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from diffusers.optimization import get_scheduler

from dreambooth.subjects import SubjectImage
from dreambooth.training.batches import BatchMaker, PriorPool
from dreambooth.config import LrScheduler, OptimizerName
from dreambooth.training.engine import make_optimizer, parameter_groups
from dreambooth.training.module import DreamBoothModule, mixed_batch_loss


@dataclass
class FinetuneSettings:
    """One in-process fine-tune (the subset of ``TrainConfig`` that matters without a cluster)."""

    instance_prompt: str | list[str]
    """"a [V] [class]", or one prompt per photo (``subjects.instance_prompts``: captions filled in)."""
    class_prompt: str
    """"a [class]"; unused when ``prior_loss_weight`` is 0."""
    max_train_steps: int = 300
    """Optimizer steps."""
    train_batch_size: int = 2
    """Subject examples per step."""
    prior_examples_per_subject_example: int = 1
    """Prior examples that join each subject example in a step (the paper's 1)."""
    learning_rate: float = 1e-4
    """AdamW learning rate of the UNet (and of the text encoder unless set apart), at its peak."""
    lr_scheduler: LrScheduler = "constant"
    """``TrainConfig.lr_scheduler``: how the learning rates move over the steps (diffusers' schedules)."""
    lr_warmup_steps: int = 0
    """``TrainConfig.lr_warmup_steps``."""
    text_encoder_learning_rate: float | None = None
    """The text encoder's own learning rate (``TrainConfig.text_encoder_learning_rate``); None: ``learning_rate``."""
    text_encoder_steps: int | None = None
    """Train the text encoder for the first this many steps only, then the UNet alone; None: every step."""
    adam_weight_decay: float = 0.0
    """Weight decay (``TrainConfig.adam_weight_decay`` is the cluster loop's)."""
    optimizer: OptimizerName = "adamw"
    """``TrainConfig.optimizer``: adamw, adafactor or adamw8bit (CUDA only)."""
    prior_loss_weight: float = 1.0
    """λ of the prior-preservation term; 0 trains on the subject alone."""
    snr_gamma: float | None = None
    """``TrainConfig.snr_gamma``: Min-SNR-γ loss weighting; None: plain MSE."""
    resolution: int = 32
    """Training image side."""
    random_flip: bool = False
    """Horizontal flips (off for asymmetric subjects)."""
    background_swap: float = 0.0
    """``TrainConfig.background_swap``: share of subject examples shown on a repainted backdrop."""
    bare_prompt: str | None = None
    """The prompt backdrop-swapped copies train on; None: ``instance_prompt`` when it is one prompt."""
    seed: int = 0
    """Seeds batch order, noise and timesteps."""


def finetune(parts, images: list[SubjectImage], settings: FinetuneSettings,
             prior_latents: torch.Tensor | None = None, prior_prompts: list[str] | None = None) -> list[dict]:
    """Fine-tune ``parts``' UNet and text encoder(s) (a ``models.Components``) in place.

    ``prior_latents`` [P, C, h, w] are the class-prior examples (scaled, as the prior cache stores
    them); needed when ``prior_loss_weight`` > 0. ``prior_prompts`` (one per prior) are the prompts
    they were generated from; None: all from ``settings.class_prompt``. Returns per-step losses, the UNet's
    learning rate for the next step, and seconds.
    """
    with_priors = settings.prior_loss_weight > 0
    if with_priors and prior_latents is None:
        raise ValueError("prior_loss_weight > 0 needs prior_latents")
    parts.vae.requires_grad_(False).eval()
    module = DreamBoothModule.from_components(parts).train()
    encoder_rate = settings.text_encoder_learning_rate
    if encoder_rate is None and settings.text_encoder_steps is not None:
        encoder_rate = settings.learning_rate  # a group of its own, to stop at text_encoder_steps
    optimizer = make_optimizer(settings.optimizer, parameter_groups(module, settings.learning_rate, encoder_rate),
                               settings.learning_rate, settings.adam_weight_decay)
    batches = BatchMaker(
        images, parts, settings.instance_prompt, settings.class_prompt,
        resolution=settings.resolution, batch_size=settings.train_batch_size, center_crop=False,
        random_flip=settings.random_flip, seed=settings.seed,
        priors=PriorPool(prior_latents, settings.train_batch_size * settings.prior_examples_per_subject_example,
                         settings.seed, prior_prompts) if with_priors else None,
        device=torch.device("cpu"), background_swap=settings.background_swap,
        bare_prompt=settings.bare_prompt or (settings.instance_prompt
                                             if isinstance(settings.instance_prompt, str) else None),
    )
    schedule = get_scheduler(settings.lr_scheduler, optimizer=optimizer, num_warmup_steps=settings.lr_warmup_steps,
                             num_training_steps=settings.max_train_steps)
    generator = torch.Generator().manual_seed(settings.seed)
    history = []
    for step in range(settings.max_train_steps):
        started = time.perf_counter()
        if step == settings.text_encoder_steps:  # the schedule scales each group's initial lr: zero it
            optimizer.param_groups[1]["lr"] = schedule.base_lrs[1] = 0.0
        batch = batches.next()
        loss = mixed_batch_loss(module, parts.noise_scheduler, batch.latents, batch.conditions,
                                batch.num_instance, settings.prior_loss_weight, generator,
                                settings.snr_gamma)
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        history.append({"step": step + 1, "loss": loss.total.item(), "instance": loss.instance,
                        "prior": loss.prior, "lr": schedule.get_last_lr()[0], "seconds": time.perf_counter() - started})
    module.eval()
    return history
