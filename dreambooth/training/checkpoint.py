"""Resumable checkpoints and the final full weights, through Ray Train's checkpoint storage.

Owns the on-disk layout of ``<output>/checkpoints/`` (Ray Train's run folder):

    step-000100/         every rank's ZeRO shard + ``progress.json`` ({"step": 100})
    final-weights/       ``unet/`` and ``text_encoder/`` in diffusers layout + ``progress.json``
    attempts/<id>.json   one per worker-group start: {"start_step", "step"} (how far it got), so the
                         run record can say how many steps a failure made us redo

Resumable checkpoints are saved by every rank (``engine.save_checkpoint``) and merged by Ray Train
into one folder; ``ray.train.get_checkpoint()`` hands the latest to restarted workers, and to a new
driver run with the same output (Ray Train restores its run state from storage).
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Optional

import ray.train
import torch
from ray.train import Checkpoint

from dreambooth import storage

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
PROGRESS = "progress.json"
FINAL = "final-weights"
ATTEMPTS = "attempts"
DEEPSPEED_TAG = "zero"


def run_storage_path(output: str) -> str:
    """Ray Train's ``storage_path`` for a run: an absolute path or a URI."""
    return str(Path(output).resolve()) if storage.is_local(output) else output


def checkpoints_uri(output: str) -> str:
    return storage.join(run_storage_path(output), CHECKPOINTS)


def final_weights_uri(output: str) -> str:
    return storage.join(checkpoints_uri(output), FINAL)


class AttemptLog:
    """Rank 0's record of one worker-group attempt: where it started and how far it got.

    ``reached(step)`` only hands the step to a writer thread, which writes the newest one it has
    (older ones are skipped): a write to an object store takes tens of milliseconds, which would
    otherwise be added to every training step. A killed worker loses at most the write in flight.
    """

    def __init__(self, output: str, start_step: int):
        self.uri = storage.join(checkpoints_uri(output), ATTEMPTS, f"{uuid.uuid4().hex}.json")
        self.start_step = start_step
        self._latest: Optional[int] = None
        self._closed = False
        self._changed = threading.Condition()
        self._writer = threading.Thread(target=self._write_latest, name="attempt-log", daemon=True)
        self._writer.start()

    def reached(self, step: int) -> None:
        with self._changed:
            self._latest = step
            self._changed.notify()

    def close(self) -> None:
        """Write the last step reached and stop the writer."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._writer.join()

    def _write_latest(self) -> None:
        written = None
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._closed or self._latest != written)
                step, closed = self._latest, self._closed
            if step != written:
                try:
                    storage.write_json_atomic(self.uri, {"start_step": self.start_step, "step": step})
                except Exception as exc:  # bookkeeping: the run record's step counts, not the model
                    log.warning("could not record training progress in %s: %s", self.uri, exc)
                written = step
            if closed:
                return


def steps_run(output: str) -> tuple[int, int]:
    """(optimizer steps executed over all attempts, number of attempts) of a run's training."""
    fs, path = storage.filesystem(storage.join(checkpoints_uri(output), ATTEMPTS))
    if not fs.exists(path):
        return 0, 0
    attempts = [storage.read_json(storage.join(checkpoints_uri(output), ATTEMPTS, f.rsplit("/", 1)[-1]))
                for f in fs.ls(path, detail=False) if f.endswith(".json")]
    return sum(a["step"] - a["start_step"] for a in attempts), len(attempts)


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
