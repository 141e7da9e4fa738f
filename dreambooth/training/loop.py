"""The per-worker training loop that Ray Train runs on every rank of a warm worker group.

A worker group starts once per concurrency slot: it loads the base components once and keeps
them, untouched, on the CPU. Then, for each subject the ``SubjectQueue`` hands it:

1. reset: fresh copies of the base UNet and text encoder(s), one DeepSpeed engine around them (a new
   optimizer and LR schedule), the subject's photos and this rank's share of its class priors;
2. restore the subject's newest checkpoint, if any (a restarted group, or a re-run of the output);
3. train: each optimizer step accumulates micro-batches of mixed subject/prior examples, logs the
   mean loss of the step, and checkpoints every ``checkpointing_steps``;
4. export, on rank 0: gather the full weights (ZeRO-3 shards) and save the diffusers pipeline,
   the grids and the run record (last) — from the modules in memory, nothing loaded again.

Failures: a subject that cannot be prepared (photos or priors unreadable, on any rank: the ranks
agree on it) or exported is reported to the queue, which may hand it out again, and the group goes
on with the next. An error inside the training steps — a lost worker's peers see one in their next
collective — fails the whole group instead: Ray Train restarts it, and the restarted group asks the
queue for the subject it held and resumes it from its checkpoint.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Optional

import ray.train
import torch

from dreambooth import export, storage, tracking
from dreambooth.models import Components, load_components, load_sampling_scheduler, quiet_libraries
from dreambooth.priors import read_priors
from dreambooth.subjects import (check_backdrops_swappable, instance_prompts, load_subject_images,
                                 training_examples)
from dreambooth.training import checkpoint
from dreambooth.training.batches import BatchMaker, PriorPool
from dreambooth.training.engine import build_engine, skip_shared_memory_comm_for_one_rank
from dreambooth.training.module import DreamBoothModule, attention_backend, derived_seed, mixed_batch_loss
from dreambooth.training.subject_queue import SubjectQueue, SubjectWork

log = logging.getLogger("dreambooth.train")


class SubjectFailed(Exception):
    """This subject cannot be trained or exported; raised on every rank alike (or on rank 0 alone
    after the last collective), so the group can go on with the next subject."""


def _agreed(failure: Optional[str]) -> None:
    """All ranks: raise ``SubjectFailed`` on every rank if any rank had a failure."""
    failures = [failure]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        failures = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(failures, failure)
    for rank, message in enumerate(failures):
        if message is not None:
            raise SubjectFailed(message if len(failures) == 1 else f"{message} (rank {rank})")


@dataclass
class SlotInputs:
    """What the driver hands every worker of one slot (pickled once into ``train_loop_config``)."""

    queue: object
    """The ``SubjectQueue`` actor handle."""
    slot: int
    """This worker group's slot number (the queue's key for the subject it holds)."""
    model_path: str
    revision: Optional[str]
    fit_started_unix: float
    """When the driver called ``fit()``: the worker group's start-up is measured from it."""


def step_generator(seed: int, rank: int, step: int, micro: int) -> torch.Generator:
    """Noise and timesteps of one micro-batch, keyed by (seed, rank, step, micro): a resumed run
    draws what the original would have."""
    return torch.Generator(device="cpu").manual_seed(derived_seed(seed, rank, step, micro))


class Laps:
    """Seconds spent in each phase, as ``setup_<phase>_s`` metrics (start-up apart from step time)."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.metrics[f"setup_{phase}_s"] = now - self._last
        self._last = now


class PhaseClock:
    """Host seconds per phase of a step (batch, forward, backward, optimizer); ``medians`` per phase
    are robust to the first steps' allocations and to a noisy neighbour's bursts.

    On CPU this is where a step's time goes; on CUDA, kernels run asynchronously and the split is
    of launch time, with the wait landing wherever the host next synchronizes (the loss ``.item()``).
    """

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}
        self._step: dict[str, float] = {}
        self._last = time.perf_counter()

    def start(self) -> None:
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self._step[phase] = self._step.get(phase, 0.0) + now - self._last
        self._last = now

    def end_step(self) -> None:
        for phase, seconds in self._step.items():
            self.seconds.setdefault(phase, []).append(seconds)
        self._step = {}

    def medians(self) -> dict[str, float]:
        return {phase: statistics.median(values) for phase, values in self.seconds.items()}


@dataclass
class Place:
    """Where one rank runs: its rank, the world size, its device and the CPUs it was given."""

    rank: int
    world: int
    device: torch.device
    cpus: float
    in_ray_worker: bool
    """A Ray Train worker (progress through ``tqdm_ray``) rather than the driver's own process."""


def ray_train_place() -> Place:
    """This Ray Train worker's place in its group."""
    context = ray.train.get_context()
    # A GPU resource is not CUDA (fake GPU nodes, a CPU-only image): train where CUDA really is.
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    return Place(context.get_world_rank(), context.get_world_size(), device, cpus, in_ray_worker=True)


def call_queue(queue, method: str, *args, wait: bool = True):
    """Call a ``SubjectQueue`` method on the actor (Ray Train workers) or on the object itself (in-process)."""
    if isinstance(queue, SubjectQueue):
        return getattr(queue, method)(*args)
    ref = getattr(queue, method).remote(*args)
    return ray.get(ref) if wait else None


@dataclass
class Worker:
    """One rank's long-lived state: where it runs and the base model it resets to."""

    place: Place
    base: Components
    sampling_scheduler: object  # rank 0 only (export and grids)
    group_metrics: dict
    subjects_done: int = 0

    @property
    def rank(self) -> int:
        return self.place.rank

    @property
    def world(self) -> int:
        return self.place.world

    @property
    def device(self) -> torch.device:
        return self.place.device


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's entry on every rank of a slot's worker group."""
    run_slot(loop_config["inputs"], ray_train_place())


def run_slot(inputs: SlotInputs, place: Place) -> None:
    """Load the base model, then train the subjects the queue hands this slot until it has none."""
    worker = _start_worker(inputs, place)
    queue = inputs.queue
    while True:
        work: Optional[SubjectWork] = checkpoint.broadcast(
            call_queue(queue, "take", inputs.slot) if worker.rank == 0 else None)
        if work is None:
            return
        try:
            record = train_subject(worker, work, queue)
        except (SubjectFailed, checkpoint.OutputTakenOver) as exc:  # every rank agrees (or only rank 0
            # exports): the group goes on. A retry of a taken-over output would take it back.
            log.error("rank %d: subject %s failed: %s", worker.rank, work.name, exc)
            if worker.rank == 0:
                call_queue(queue, "failed", inputs.slot, work.name, str(exc),
                           not isinstance(exc, checkpoint.OutputTakenOver))
            continue
        except Exception as exc:  # inside the training steps: the whole group fails and is restarted
            _note_group_error(queue, inputs.slot, work.name, worker.rank, exc)
            raise
        finally:
            worker.subjects_done += 1
        if worker.rank == 0:
            call_queue(queue, "finished", inputs.slot, work.name, record)


def _note_group_error(queue, slot: int, name: str, rank: int, exc: Exception) -> None:
    """Tell the queue why this group is failing (best effort: the group fails either way)."""
    try:
        call_queue(queue, "group_raised", slot, name, f"rank {rank}: {type(exc).__name__}: {exc}")
    except Exception as report_error:
        log.warning("could not report the error to the subject queue: %s", report_error)


def _start_worker(inputs: SlotInputs, place: Place) -> Worker:
    started_unix = time.time()
    laps = Laps()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    quiet_libraries()
    if place.device.type == "cpu":
        torch.set_num_threads(max(1, int(place.cpus)))
    skip_shared_memory_comm_for_one_rank(place.world)
    base = load_components(inputs.model_path, inputs.revision)
    for module in (base.vae, *base.trainable().values()):
        module.requires_grad_(False).eval()
    scheduler = load_sampling_scheduler(inputs.model_path, inputs.revision) if place.rank == 0 else None
    laps.lap("load_model")
    metrics = {"setup_worker_group_s": started_unix - inputs.fit_started_unix, **laps.metrics}
    return Worker(place, base, scheduler, metrics)


def train_subject(worker: Worker, work: SubjectWork, queue) -> Optional[dict]:
    """Reset to the base weights, train ``work``'s subject, export it (rank 0); return rank 0's run record."""
    cfg, train = work.config, work.config.train
    rank, device = worker.rank, worker.device
    laps = Laps()
    started = time.monotonic()
    failure, images, prior_latents, prior_prompts = None, [], None, None
    try:  # what can fail for this subject alone, before any collective
        images = work.images or load_subject_images(cfg.subject.instance_dir, train.resolution)
        if train.background_swap > 0:  # again: a bulk run reads the photos anew, and they may have changed
            check_backdrops_swappable(images)
        if work.prior_set is not None:
            prior_latents, prior_prompts = read_priors(work.prior_set, rank, worker.world)
    except Exception as exc:
        failure = f"{type(exc).__name__}: {exc}"
    _agreed(failure)
    laps.lap("read_subject_and_priors")
    worker.base.vae.to(device)
    fresh = {name: copy.deepcopy(base_module).to(device) for name, base_module in worker.base.trainable().items()}
    module = DreamBoothModule.from_components(worker.base, worker.base.family.trained_encoders(train), fresh)
    if train.gradient_checkpointing:
        module.enable_gradient_checkpointing()
    engine, scheduler = build_engine(module, train, cuda=device.type == "cuda")
    laps.lap("reset_and_initialize")  # deepcopy of the base weights + deepspeed.initialize
    try:
        metrics, curve, state, claim_id = _fit(worker, work, engine, scheduler, images, prior_latents,
                                               prior_prompts, laps, queue)
    except (SubjectFailed, checkpoint.OutputTakenOver):
        _release(engine, device)  # the group goes on with the next subject: it must not inherit this engine
        raise
    _release(engine, device)
    del engine, module
    if rank != 0:
        return None
    train_s = time.monotonic() - started
    _check_still_writer(cfg.output, claim_id, "before exporting into it")
    try:
        exported = export.export_trained(cfg, worker.base, worker.sampling_scheduler, state, device)
        return _finish_record(work, metrics, curve, exported, train_s, images, claim_id)
    except (checkpoint.OutputTakenOver, SubjectFailed):
        raise
    except Exception as exc:
        log.exception("export of %s failed", work.name)
        raise SubjectFailed(f"export failed: {type(exc).__name__}: {exc}") from exc


def _fit(worker: Worker, work: SubjectWork, engine, scheduler, images: list, prior_latents, prior_prompts,
         laps: Laps, queue) -> tuple[dict, dict[str, list], Optional[dict], str]:
    """All ranks: claim the output, resume from its newest checkpoint, train the remaining steps and
    gather the weights; returns (metrics, loss curve, rank 0's full state dict, the claim's id)."""
    cfg, train = work.config, work.config.train
    rank, device = worker.rank, worker.device
    claim_id = checkpoint.claim(cfg.output)  # before the restore: an older attempt still running stops saving
    start_step = checkpoint.restore(engine, cfg.output)
    laps.lap("restore_checkpoint")
    if start_step:
        log.info("rank %d: %s resumed from step %d", rank, work.name, start_step)
        if rank == 0:
            call_queue(queue, "resumed", work.name, start_step, wait=False)

    batch_seed = derived_seed(train.seed, rank, start_step)  # photo draws and prior order of this attempt
    priors = (PriorPool(prior_latents, train.train_batch_size, batch_seed, prior_prompts)
              if prior_latents is not None else None)
    examples, prompts = training_examples(images, cfg.subject.instance_prompt, cfg.subject.identifier,
                                          cfg.subject.class_noun, bare_prompt_with_captions=train.bare_prompt_with_captions)
    batches = BatchMaker(
        examples, worker.base, prompts, cfg.subject.class_prompt,
        resolution=train.resolution, batch_size=train.train_batch_size, center_crop=train.center_crop,
        random_flip=train.random_flip, seed=batch_seed, priors=priors, device=device,
        background_swap=train.background_swap, bare_prompt=cfg.subject.instance_prompt,
    )
    metrics, curve = _train_steps(worker, work, engine, scheduler, batches, start_step, claim_id)
    warm = worker.subjects_done > 0
    # The group's own start-up (worker group, model load) is paid by its first subject only.
    metrics.update({} if warm else worker.group_metrics, **laps.metrics, warm_start=warm,
                   subjects_before_on_this_group=worker.subjects_done)

    gather_started = time.perf_counter()
    metrics["zero_stage"] = engine.zero_optimization_stage()  # what trained (see effective_zero_stage)
    metrics["attention_backend"] = attention_backend(engine.module.unet, device)
    state = checkpoint.gathered_state_dict(engine)
    metrics["setup_gather_weights_s"] = time.perf_counter() - gather_started  # ZeRO-3: all-gather of the shards
    return metrics, curve, state, claim_id


def _release(engine, device: torch.device) -> None:
    """Free a subject's engine so the next subject starts from a clean device (best effort: a
    failure here must not replace the error that ended the subject)."""
    try:
        engine.destroy()
    except Exception as exc:
        log.warning("could not release the DeepSpeed engine: %s", exc)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the next subject's copies start from a clean cache


def _check_still_writer(output: str, claim_id: str, when: str) -> None:
    """Rank 0 alone, after the last collective: raise ``OutputTakenOver`` if a newer run claimed
    ``output``, or ``SubjectFailed`` if the claim cannot be read (a retry may read it)."""
    try:
        held = checkpoint.holds_claim(output, claim_id)
    except Exception as exc:
        raise SubjectFailed(f"could not read the claim on {output} {when}: {type(exc).__name__}: {exc}") from exc
    if not held:
        raise checkpoint.taken_over(output, when)


class StepReports:
    """Where one subject's steps are reported: rank 0's attempt log (steps run, for the run record),
    progress bar and experiment tracker; on the other ranks every outlet is a no-op."""

    def __init__(self, worker: Worker, work: SubjectWork, start_step: int, claim_id: str):
        cfg = work.config
        self.attempt = checkpoint.AttemptLog(cfg.output, start_step, claim_id) if worker.rank == 0 else None
        self.progress = None
        self.tracker = tracking.Tracker()  # the base class logs nothing
        if worker.rank == 0:
            self.tracker = tracking.open_tracker(cfg.export.report_to, cfg.output, f"{work.name}-{cfg.subject.identifier}")
            self.tracker.log_params(cfg.to_dict())
            if worker.place.in_ray_worker:
                from ray.experimental.tqdm_ray import tqdm
            else:
                from tqdm.auto import tqdm
            self.progress = tqdm(total=cfg.train.max_train_steps, desc=f"train {work.name}")
            self.progress.update(start_step)

    def step_done(self, step: int, metrics: dict, seconds: float) -> None:
        if self.attempt is not None:
            self.attempt.reached(step)
            self.progress.update(1)
        self.tracker.log_scalars(step, {key: metrics[key] for key in LOSS_KEYS} | {"step_seconds": seconds})

    def close(self, owns_output: bool = True) -> None:
        """Record the last step reached and close the outlets; ``owns_output`` False (a newer run
        took the output over): end the tracker's run without writing its state or logs there."""
        if self.attempt is not None:
            self.attempt.close()
            self.progress.close()
        if owns_output:
            self.tracker.close()
        else:
            self.tracker.abandon()


LOSS_KEYS = ("loss", "instance_loss", "prior_loss", "lr")
"""What each step records in the loss curve and the tracker."""


def train_step(engine, noise_scheduler, batches: BatchMaker, train, rank: int, step: int,
               phases: PhaseClock) -> dict[str, float]:
    """One optimizer step of ``gradient_accumulation_steps`` micro-batches (DeepSpeed accumulates and
    steps the optimizer at the boundary); returns the mean ``loss``, ``instance_loss`` and
    ``prior_loss`` of all its micro-batches."""
    sums = {"loss": 0.0, "instance_loss": 0.0, "prior_loss": 0.0}
    for micro in range(train.gradient_accumulation_steps):
        phases.start()
        batch = batches.next()
        phases.lap("batch")
        loss = mixed_batch_loss(engine, noise_scheduler, batch.latents, batch.conditions, batch.num_instance,
                                train.prior_loss_weight, step_generator(train.seed, rank, step, micro),
                                train.snr_gamma)
        phases.lap("forward")
        engine.backward(loss.total)
        phases.lap("backward")
        engine.step()
        phases.lap("optimizer")
        for key, value in (("loss", loss.total.item()), ("instance_loss", loss.instance), ("prior_loss", loss.prior)):
            sums[key] += value
    phases.end_step()
    return {key: total / train.gradient_accumulation_steps for key, total in sums.items()}


def _train_steps(worker: Worker, work: SubjectWork, engine, scheduler, batches: BatchMaker,
                 start_step: int, claim_id: str) -> tuple[dict, dict[str, list]]:
    """Steps ``start_step + 1 .. max_train_steps``; returns the last step's metrics and the loss
    curve of these steps (``step``, ``loss``, ``instance_loss``, ``prior_loss``, ``lr`` lists).
    ``claim_id`` is this attempt's claim on the output (``checkpoint.claim``), checked at each save."""
    cfg, train = work.config, work.config.train
    reports = StepReports(worker, work, start_step, claim_id)
    settings = checkpoint.trained_settings(cfg)  # recorded with every checkpoint of this attempt
    metrics: dict = {"step": start_step, "resumed_from": start_step}
    curve: dict[str, list] = {key: [] for key in ("step", *LOSS_KEYS)}
    step_seconds: list[float] = []  # each step since the last log line, checkpoint saves included
    phases = PhaseClock()
    last_lap = time.perf_counter()
    try:
        engine.train()
        for step in range(start_step + 1, train.max_train_steps + 1):
            losses = train_step(engine, worker.base.noise_scheduler, batches, train, worker.rank, step, phases)
            metrics = {"step": step, **losses, "lr": scheduler.get_last_lr()[0], "resumed_from": start_step}
            for key, values in curve.items():
                values.append(metrics[key])
            now = time.perf_counter()
            step_seconds.append(now - last_lap)
            reports.step_done(step, metrics, now - last_lap)
            last_lap = now
            if step % train.log_every == 0 or step == train.max_train_steps:
                # The mean is throughput; the median is robust to a noisy neighbour's bursts (benchmarks).
                metrics["step_seconds"] = statistics.fmean(step_seconds)
                metrics["step_seconds_median"] = statistics.median(step_seconds)
                step_seconds.clear()
                if worker.rank == 0:
                    log.info("%s step %d/%d loss %.4f (instance %.4f, prior %.4f) lr %.2e %.3f s/step x%d workers",
                             work.name, step, train.max_train_steps, metrics["loss"], metrics["instance_loss"],
                             metrics["prior_loss"], metrics["lr"], metrics["step_seconds"], worker.world)
            if cfg.export.validation_steps and step % cfg.export.validation_steps == 0:
                grid = _render_validation(worker, work, engine, step)
                if grid is not None:
                    reports.tracker.log_image(step, "validation", grid)
            if train.checkpointing_steps and step % train.checkpointing_steps == 0 and step < train.max_train_steps:
                checkpoint.save_resumable(engine, cfg.output, step, claim_id, settings)
    except checkpoint.OutputTakenOver:
        reports.close(owns_output=False)
        raise
    except SubjectFailed:
        reports.close()
        raise
    reports.close()
    metrics["step_phases_s"] = phases.medians()
    return metrics, curve


def _render_validation(worker: Worker, work: SubjectWork, engine, step: int):
    """Rank 0 renders the sample prompts from the weights as they are at ``step``; the other ranks
    go on and wait for it in the next step's first collective.

    ZeRO-3 modules hold shards and gather them in hooks that are collectives, so a render on rank 0
    alone would hang: every rank gathers the full weights (as for export) and rank 0 renders from a
    copy of the base modules loaded with them.
    """
    started = time.perf_counter()
    trained = engine.module.parts()
    if engine.zero_optimization_stage() == 3:
        state = checkpoint.gathered_state_dict(engine)
        if worker.rank != 0:
            return None
        trained = export.trained_modules(worker.base, state, worker.device)
    if worker.rank != 0:
        return None
    with torch.no_grad():
        grid = export.write_validation_grid(work.config, worker.base, worker.sampling_scheduler, trained, step,
                                            worker.device)
    log.info("%s step %d: validation grid in %.1f s", work.name, step, time.perf_counter() - started)
    return grid


def _finish_record(work: SubjectWork, metrics: dict, curve: dict, exported: dict, train_s: float,
                   images: list, claim_id: str) -> dict:
    """Write the run record (the completion marker) and drop the checkpoints unless kept, unless a
    newer run claimed the output meanwhile (its resume needs those checkpoints)."""
    cfg = work.config
    executed, attempts = checkpoint.steps_run(cfg.output)
    prompts = instance_prompts(images, cfg.subject.instance_prompt, cfg.subject.identifier, cfg.subject.class_noun)
    record = {
        **work.record,
        "instance_images": [img.name for img in images],
        # The prompt each photo trained on, where captions gave some their own (else instance_prompt;
        # with train.bare_prompt_with_captions a captioned photo trained on instance_prompt as well).
        "instance_captions": {img.name: p for img, p in zip(images, prompts) if img.caption is not None},
        "metrics": metrics,
        "loss_curve": curve,  # the steps this attempt ran (after the checkpoint it resumed from)
        "steps": cfg.train.max_train_steps,
        "steps_run": executed,  # over every attempt, this driver's and earlier ones'
        "steps_redone": max(0, executed - cfg.train.max_train_steps),
        "training_attempts": attempts,
        "grid": exported["grid"],
        "output_bytes": exported["output_bytes"],  # total and per component, as saved (--save-dtype)
        "config": cfg.to_dict(),
    }
    timings = {**record.get("timings", {}), "train_s": train_s, "export_s": exported["seconds"]}
    # The driver's own phases (connect, priors) and this subject's, from the driver's first step.
    timings["total_s"] = time.time() - timings.pop("driver_started_unix", time.time() - sum(timings.values()))
    record["timings"] = timings
    _check_still_writer(cfg.output, claim_id, "after its export, before writing its run record")
    record["loss_plot"] = export.write_loss_plot(cfg.output, curve)
    if not cfg.export.keep_checkpoints:
        storage.remove(checkpoint.checkpoints_uri(cfg.output))
    export.write_run_record(cfg.output, record)
    return record
