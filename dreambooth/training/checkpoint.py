"""Resumable checkpoints and the final full weights, through Ray Train's checkpoint storage.

Owns the on-disk layout of ``<output>/checkpoints/`` (Ray Train's run folder):

    step-000100/         every rank's ZeRO shard + ``progress.json`` ({"step": 100})
    final-weights/       ``unet/`` and ``text_encoder/`` in diffusers layout + ``progress.json``

Resumable checkpoints are saved by every rank (``engine.save_checkpoint``) and merged by Ray Train
into one folder; ``ray.train.get_checkpoint()`` hands the latest to restarted workers, and to a new
driver run with the same output (Ray Train restores its run state from storage).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Optional

import ray.train
import torch
from ray.train import Checkpoint

PROGRESS = "progress.json"
FINAL = "final-weights"
DEEPSPEED_TAG = "zero"


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def save_resumable(engine, step: int, metrics: dict) -> None:
    """All ranks: save the ZeRO state and report it (a barrier) as one Ray Train checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=DEEPSPEED_TAG, client_state={"step": step})
        if ray.train.get_context().get_world_rank() == 0:
            Path(tmp, PROGRESS).write_text(json.dumps({"step": step}))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=step_dir_name(step))


def restore(engine) -> int:
    """Load the latest reported checkpoint into ``engine``; return the step to continue from."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        _, client_state = engine.load_checkpoint(folder, tag=DEEPSPEED_TAG)
    return int(client_state["step"])


def gathered_state_dict(module: torch.nn.Module, zero_stage: int) -> Optional[dict[str, torch.Tensor]]:
    """All ranks call this; rank 0 gets the full fp32 state dict (ZeRO-3 shards gathered), others None."""
    import deepspeed

    rank = ray.train.get_context().get_world_rank()
    params = list(module.parameters())
    context = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero_stage == 3 else _nullcontext()
    with context:
        if rank != 0:
            return None
        return {k: v.detach().to(torch.float32).cpu().clone() for k, v in module.state_dict().items()}


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def save_final(state: Optional[dict[str, torch.Tensor]], unet_config, text_encoder_config, step: int, metrics: dict) -> None:
    """All ranks: report the final weights (written by rank 0) in diffusers layout."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if state is not None:
            from diffusers import UNet2DConditionModel
            from transformers import CLIPTextModel

            unet = UNet2DConditionModel.from_config(unet_config)
            unet.load_state_dict({k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")})
            unet.save_pretrained(f"{tmp}/unet", safe_serialization=True)
            text_encoder = CLIPTextModel(text_encoder_config)
            text_encoder.load_state_dict(
                {k.removeprefix("text_encoder."): v for k, v in state.items() if k.startswith("text_encoder.")}
            )
            text_encoder.save_pretrained(f"{tmp}/text_encoder", safe_serialization=True)
            Path(tmp, PROGRESS).write_text(json.dumps({"step": step, "final": True}))
            checkpoint = Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=FINAL)
