"""What ``gpu_step.py`` trains and what it compares against: workloads, batches, FLOPs, the engine, the plan.

A ``Workload`` is one of the project's model architectures (``dreambooth.planning.architectures``:
the shipped SD 1.5 and SDXL base configs, or the built-in ``tiny`` / ``tiny-sdxl``) at one
resolution. Its module is the ``DreamBoothModule`` training builds for that model's family
(``planning.activations.training_module``: UNet + every text encoder, random weights, nothing
downloaded), so SDXL runs its family's conditioning (both encoders' penultimate states, the pooled
``text_embeds`` and ``time_ids``). ``make_batch`` draws the family's inputs: token ids for every
tokenizer and its size conditions.

``build_engine_at_stage`` is ``training.engine.build_engine`` with the DeepSpeed config built as for
two ranks: one rank without offload would otherwise train at stage 0 (``effective_zero_stage``),
and this benchmark measures the stage it is asked for, as each rank of a multi-GPU run executes it
(less the communication). ``planned_peak`` is ``dreambooth plan``'s per-rank GPU bytes of the same
configuration on one GPU (``planning.memory.rank_memory`` at world size 1, for every stage: ``plan``
itself only lists stage 0 for one GPU, for the reason above).

``Shapes`` / ``build_module`` / ``tiny_shapes`` build a ``DreamBoothModule`` from explicit configs
(``benchmarks/memory.py`` uses them for its narrowed SD 1.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

CLIP_VOCAB_SIZE = 49408
TEXT_LENGTH = 77
BOS, EOS = 49406, 49407

MODELS = {
    # --model: (full-size planner model, display name), (tiny built-in)
    "sd15": (("stable-diffusion-v1-5/stable-diffusion-v1-5", "SD 1.5"), "tiny"),
    "sdxl": (("stabilityai/stable-diffusion-xl-base-1.0", "SDXL base"), "tiny-sdxl"),
}


@dataclass(frozen=True)
class Workload:
    """One model architecture at one resolution: what one benchmark row trains."""

    name: str
    """Shown in the table (``SD 1.5``, ``SDXL base``, ``tiny``, ``tiny-sdxl``)."""

    plan_model: str
    """The ``dreambooth plan --model`` value with the same architecture (a shipped hub id or built-in name)."""

    arch: object
    """``planning.architectures.Architecture`` of ``plan_model``."""

    resolution: int
    """Image side in pixels (latent side = resolution / VAE factor)."""

    @property
    def latent(self) -> int:
        return self.resolution // self.arch.vae_scale_factor

    @property
    def channels(self) -> int:
        return int(self.arch.unet.config.get("in_channels", 4))

    @property
    def family(self):
        from dreambooth.families import FAMILIES

        return FAMILIES[self.arch.pipeline_class]

    def build(self):
        """The ``DreamBoothModule`` (UNet + text encoders, all trainable, random weights, train mode), in
        the current device / dtype context."""
        from dreambooth.planning.activations import training_module

        return training_module(self.arch, checkpointing=False, train_text_encoder=True)


def workload(model: str, tiny: bool, resolution: Optional[int] = None) -> Workload:
    """``--model sd15|sdxl`` at full size (shipped configs) or as its tiny built-in, at ``resolution``
    (default: the model's native one: 512 / 1024 px; 32 px tiny)."""
    from dreambooth.planning.architectures import load_architecture

    (hub_id, name), tiny_name = MODELS[model]
    plan_model, name = (tiny_name, tiny_name) if tiny else (hub_id, name)
    arch = load_architecture(plan_model)
    side = resolution or arch.native_resolution
    if side % arch.vae_scale_factor:
        raise SystemExit(f"--resolution must be a multiple of {arch.vae_scale_factor} for {name}, got {side}")
    return Workload(name, plan_model, arch, side)


def part_label(name: str) -> str:
    """``unet`` → ``UNet``, ``text_encoder_2`` → ``text encoder 2``."""
    return "UNet" if name == "unet" else name.replace("_", " ")


def count_params(module) -> dict[str, int]:
    """Parameters of each trained part (``unet``, ``text_encoder``[, ``text_encoder_2``])."""
    return {name: sum(p.numel() for p in part.parameters()) for name, part in module.parts().items()}


def make_batch(rows: int, latent: int, device: torch.device, generator: Optional[torch.Generator] = None, *,
               family=None, resolution: Optional[int] = None, channels: int = 4):
    """Random latents, noise, timesteps and the family's conditions for ``rows`` rows: ``input_ids``
    (BOS, 75 random tokens, EOS) per tokenizer, and the family's size conditions (SDXL's ``time_ids``
    for an uncropped square image of ``resolution``, default ``8 * latent``)."""
    from dreambooth.families import SD
    from dreambooth.families.base import input_ids_key

    family = family or SD
    kwargs = {"device": device, "generator": generator}
    latents = torch.randn(rows, channels, latent, latent, **kwargs)
    noise = torch.randn(rows, channels, latent, latent, **kwargs)
    timesteps = torch.randint(0, 1000, (rows,), **kwargs)
    conditions = {}
    for name in family.tokenizer_names:
        ids = torch.randint(0, CLIP_VOCAB_SIZE - 2, (rows, TEXT_LENGTH), **kwargs)
        ids[:, 0], ids[:, -1] = BOS, EOS
        conditions[input_ids_key(name)] = ids
    side = resolution or 8 * latent
    for key, value in family.size_conditions((side, side), (0, 0), (side, side)).items():
        conditions[key] = value.to(device).expand(rows, -1).clone()
    return latents, noise, timesteps, conditions


def noise_scheduler():
    """Stable Diffusion's (and SDXL base's) training schedule: scaled-linear betas, ε-prediction."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, steps_offset=1, prediction_type="epsilon",
    )


def count_step_flops(work: Workload, rows: int) -> tuple[int, dict[str, int]]:
    """FLOPs of one forward + backward of text encoders + UNet + loss, counted on the meta device
    (model FLOPs: no checkpointing recompute)."""
    from torch.utils.flop_counter import FlopCounterMode

    from dreambooth.training.module import diffusion_target

    meta = torch.device("meta")
    with meta:
        module = work.build()
        latents, noise, timesteps, conditions = make_batch(rows, work.latent, meta, family=work.family,
                                                           resolution=work.resolution, channels=work.channels)
    counter = FlopCounterMode(display=False)
    with counter:
        prediction = module(latents + noise, timesteps, conditions)  # add_noise's arithmetic is not counted
        target = diffusion_target(noise_scheduler(), latents, noise, timesteps)
        # dreambooth_loss's two MSE halves (it calls .item(), which meta tensors lack): no matmuls either way
        loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
        loss.backward()
    by_op = {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return counter.get_total_flops(), by_op


def build_engine_at_stage(module: torch.nn.Module, train, *, cuda: bool):
    """``training.engine.build_engine`` (the project's parameter groups, optimizer and DeepSpeed config)
    with the config built as for two ranks, so one rank trains at ``train.zero_stage`` and not at the
    stage 0 ``effective_zero_stage`` picks for a single rank. No LR scheduler (constant rate)."""
    import deepspeed

    from dreambooth.training.engine import deepspeed_config, make_optimizer, parameter_groups

    params = parameter_groups(module, train.learning_rate, train.text_encoder_learning_rate)
    optimizer = make_optimizer(train.optimizer, params, train.learning_rate, train.adam_weight_decay)
    engine, *_ = deepspeed.initialize(model=module, model_parameters=params, optimizer=optimizer,
                                      config=deepspeed_config(train, cuda=cuda, world_size=2), dist_init_required=False)
    return engine


def planned_peak(work: Workload, *, batch: int, precision: str, zero_stage: int, checkpointing: bool) -> int:
    """``dreambooth plan``'s per-rank GPU bytes for this configuration on 1 GPU (``batch`` subject + as
    many prior rows, text encoders trained, no offload): model states + activations (measured on fake
    tensors, cached) + DeepSpeed's gradient bucket(s). Without the VAE's frozen weights (this benchmark
    builds no VAE) and without ``plan``'s reserve for the CUDA context (``max_memory_allocated`` does not
    see it)."""
    from dreambooth.planning.architectures import count_parameters
    from dreambooth.planning.memory import PRECISIONS, Option, deepspeed_defaults, rank_memory
    from dreambooth.planning.report import TRAINING_DTYPES, cached_activations

    buckets = deepspeed_defaults()
    counts = count_parameters(work.arch, train_text_encoder=True, persistence_threshold=buckets.persistence_threshold)
    activations = cached_activations(work.arch, resolution=work.resolution, rows=2 * batch, dtype=TRAINING_DTYPES[precision],
                                     checkpointing=checkpointing, train_text_encoder=True)
    memory = rank_memory(Option(zero_stage, False, False, checkpointing), counts, PRECISIONS[precision], 1,
                         activations=activations.peak_bytes, buckets=buckets, reserve=0)
    return memory.gpu_total - memory.frozen - memory.reserve


# --------------------------------------------------------------------------- explicit configs (memory.py)


@dataclass(frozen=True)
class Shapes:
    """What to build: the UNet and text-encoder configs, the image side and the VAE's downsampling."""

    name: str
    unet: dict
    text: dict
    resolution: int
    vae_factor: int  # image side / latent side


def model_shapes(name: str, model_path: str, resolution: int) -> Shapes:
    """The layout of a diffusers folder, read from its own ``unet/``, ``text_encoder/`` and ``vae/`` configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    unet = dict(UNet2DConditionModel.load_config(model_path, subfolder="unet"))
    text = CLIPTextConfig.from_pretrained(model_path, subfolder="text_encoder").to_dict()
    vae_blocks = AutoencoderKL.load_config(model_path, subfolder="vae")["block_out_channels"]
    return Shapes(name, unet, text, resolution=resolution, vae_factor=2 ** (len(vae_blocks) - 1))


def tiny_shapes() -> Shapes:
    """The repo's built-in ``tiny`` model (its VAE downsamples 2x, so 32 px -> 16x16 latents)."""
    from dreambooth.models import resolve_model

    return model_shapes("tiny", resolve_model("tiny"), resolution=32)


def build_module(shapes: Shapes):
    """``DreamBoothModule`` (UNet + CLIP text encoder, both trainable) with random weights."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreambooth.training.module import DreamBoothModule

    unet = UNet2DConditionModel.from_config(shapes.unet)
    text_encoder = CLIPTextModel(
        CLIPTextConfig.from_dict({"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": EOS, **shapes.text})
    )
    return DreamBoothModule(unet, text_encoder, train_text_encoder=True)
