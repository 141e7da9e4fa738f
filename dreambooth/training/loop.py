"""The per-worker training loop that Ray Train runs on every rank.

One readable loop: load the base components, wrap UNet + text encoder in one DeepSpeed engine,
restore the latest checkpoint, then for each optimizer step accumulate micro-batches of mixed
subject/prior examples, log, and checkpoint; finally gather the full weights for export.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass

import ray.train
import torch

from dreambooth.config import RunConfig
from dreambooth.models import load_components, quiet_libraries
from dreambooth.subjects import SubjectImage
from dreambooth.training import checkpoint
from dreambooth.training.batches import BatchMaker, PriorPool
from dreambooth.training.engine import build_engine
from dreambooth.training.module import DreamBoothModule, mixed_batch_loss

log = logging.getLogger("dreambooth.train")


@dataclass
class LoopInputs:
    """What the driver hands every worker (pickled once into ``train_loop_config``)."""

    config: RunConfig
    model_path: str
    images: list[SubjectImage]
    with_priors: bool


def _step_generator(seed: int, rank: int, step: int, micro: int, device) -> torch.Generator:
    # Randomness keyed by (seed, rank, step): a resumed run draws what the original would have.
    return torch.Generator(device="cpu").manual_seed(hash((seed, rank, step, micro)) & 0x7FFF_FFFF)


class SetupLaps:
    """Seconds a worker spends in each setup phase, reported with the final metrics as
    ``setup_<phase>_s`` (plus ``worker_started_unix``, which the driver turns into the worker
    group's start-up time), so start-up is measured apart from the steady-state step time."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {"worker_started_unix": time.time()}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.metrics[f"setup_{phase}_s"] = now - self._last
        self._last = now


def train_loop_per_worker(loop_config: dict) -> None:
    setup = SetupLaps()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    quiet_libraries()
    inputs: LoopInputs = loop_config["inputs"]
    cfg, train = inputs.config, inputs.config.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # A GPU resource is not CUDA (fake GPU nodes, a CPU-only image): train where CUDA really is.
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(train.cpus_per_worker)))

    parts = load_components(inputs.model_path, cfg.revision)
    parts.vae.requires_grad_(False).eval().to(device)
    module = DreamBoothModule(parts.unet, parts.text_encoder, train.train_text_encoder)
    setup.lap("load_model")
    engine, scheduler = build_engine(module, train, cuda=device.type == "cuda")
    setup.lap("deepspeed_initialize")  # includes JIT-building DeepSpeed's ops when not cached
    start_step = checkpoint.restore(engine)
    setup.lap("restore_checkpoint")
    if start_step:
        log.info("rank %d resumed from step %d", rank, start_step)

    batch_seed = train.seed + 1000 * rank + start_step
    priors = None
    if inputs.with_priors:
        shard = ray.train.get_dataset_shard("priors")
        priors = PriorPool.from_batches(shard.iter_batches(batch_size=256, batch_format="numpy"),
                                        train.train_batch_size, batch_seed)
    setup.lap("read_priors")
    batches = BatchMaker(
        inputs.images,
        parts.tokenizer,
        parts.vae,
        cfg.subject.instance_prompt,
        cfg.subject.class_prompt,
        resolution=train.resolution,
        batch_size=train.train_batch_size,
        center_crop=train.center_crop,
        random_flip=train.random_flip,
        seed=batch_seed,
        priors=priors,
        device=device,
    )

    attempt = checkpoint.AttemptLog(cfg.output, start_step) if rank == 0 else None
    progress = None
    if rank == 0:
        from ray.experimental.tqdm_ray import tqdm

        progress = tqdm(total=train.max_train_steps, desc="train")
        progress.update(start_step)
    metrics: dict = {}
    step_seconds: list[float] = []  # each step since the last log line, checkpoint saves included
    last_lap = time.perf_counter()
    for step in range(start_step + 1, train.max_train_steps + 1):
        engine.train()
        for micro in range(train.gradient_accumulation_steps):
            batch = batches.next()
            gen = _step_generator(train.seed, rank, step, micro, device)
            loss = mixed_batch_loss(engine, parts.noise_scheduler, batch.latents, batch.input_ids,
                                    batch.num_instance, train.prior_loss_weight, gen)
            engine.backward(loss.total)
            engine.step()
        metrics = {
            "step": step,
            "loss": loss.total.item(),
            "instance_loss": loss.instance,
            "prior_loss": loss.prior,
            "lr": scheduler.get_last_lr()[0],
            "resumed_from": start_step,
        }
        if attempt is not None:
            attempt.reached(step)
            progress.update(1)
        now = time.perf_counter()
        step_seconds.append(now - last_lap)
        last_lap = now
        if step % train.log_every == 0 or step == train.max_train_steps:
            # The mean is throughput; the median is robust to a noisy neighbour's bursts (benchmarks).
            metrics["step_seconds"] = statistics.fmean(step_seconds)
            metrics["step_seconds_median"] = statistics.median(step_seconds)
            step_seconds.clear()
            if rank == 0:
                log.info(
                    "step %d/%d loss %.4f (instance %.4f, prior %.4f) lr %.2e %.3f s/step x%d workers",
                    step, train.max_train_steps, metrics["loss"], loss.instance, loss.prior, metrics["lr"],
                    metrics["step_seconds"], world,
                )
        if train.checkpointing_steps and step % train.checkpointing_steps == 0 and step < train.max_train_steps:
            checkpoint.save_resumable(engine, step, metrics)
    if attempt is not None:
        attempt.close()
        progress.close()

    metrics.update(setup.metrics)
    state = checkpoint.gathered_state_dict(engine.module, train.zero_stage)
    checkpoint.save_final(state, parts.unet.config, parts.text_encoder.config, train.max_train_steps, metrics)
