"""Ray Train on the driver: warm worker groups, one per concurrency slot, fed by one ``SubjectQueue``.

``train_subjects`` starts ``slots`` ``TorchTrainer``s (each ``fit`` in a driver thread: it only
waits on its Ray Train controller); every one runs ``train_loop_per_worker`` on ``workers`` DeepSpeed ranks, which take
subjects from the queue until it is empty. A single ``dreambooth run`` is one subject on one slot.

Fault tolerance: ``FailureConfig`` restarts a worker group that lost a worker; the restarted group
resumes the subject it held from that subject's checkpoint. A slot whose group runs out of
restarts fails its subject's attempt, and a fresh slot takes over while subjects remain.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from typing import Callable, Optional

from dreambooth import storage
from dreambooth.training.loop import SlotInputs, train_loop_per_worker
from dreambooth.training.subject_queue import SubjectState, SubjectWork, remote_queue

log = logging.getLogger(__name__)

POLL_S = 0.5
"""How often the driver reads the queue's states while slots run."""


def worker_env(cuda: bool) -> dict[str, str]:
    passed = ("TORCH_EXTENSIONS_DIR", "DREAMBOOTH_CACHE", "HF_HUB_OFFLINE", "HF_HOME",
              # rank 0 reports to the tracker the driver checked (--report-to)
              "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT",
              "WANDB_BASE_URL")
    env = {key: os.environ[key] for key in passed if key in os.environ}
    if not cuda:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would otherwise probe for CUDA and warn
    return env


def group_key(work: SubjectWork) -> tuple:
    """Subjects with equal keys can share a warm worker group (same base model and process layout).

    Everything else — steps, learning rate, batch size, resolution, priors — is per subject, since
    each subject gets its own engine. The ZeRO stage and precision stay per group: ZeRO-3 hooks
    into the module it partitions, and one process does not mix them.
    """
    t = work.config.train
    return (work.model_path, work.config.revision, t.workers, t.cpus_per_worker, t.use_gpu, t.zero_stage,
            t.mixed_precision, t.max_failures)


def _fit_slot(inputs: SlotInputs, first: SubjectWork, use_gpu: bool, cuda: bool, storage_path: str,
              max_failures: int) -> None:
    """Run one warm worker group until the queue has nothing for it (blocks: call it in a thread)."""
    import ray.train
    from ray.train import FailureConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dreambooth.cluster import resource_shapes

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"inputs": inputs},
        scaling_config=ScalingConfig(
            num_workers=first.config.train.workers,
            use_gpu=use_gpu,
            resources_per_worker=resource_shapes(first.config.train, use_gpu).train_worker,
        ),
        torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
        run_config=ray.train.RunConfig(
            name=f"slot-{inputs.slot}",
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            worker_runtime_env={"env_vars": worker_env(cuda)},
        ),
    )
    trainer.fit()


def train_subjects(
    works: list[SubjectWork],
    *,
    slots: int,
    use_gpu: bool,
    max_retries: int,
    trainer_storage: str,
    on_change: Optional[Callable[[dict[str, SubjectState]], None]] = None,
) -> dict[str, SubjectState]:
    """Train every subject on at most ``slots`` warm worker groups; return each subject's final state.

    All ``works`` must share one ``group_key``. ``trainer_storage`` holds Ray Train's own run
    folders (removed at the end; the subjects' checkpoints live in their outputs). ``on_change`` is
    called with every subject's state after each change, in order.
    """
    import ray

    from dreambooth.cluster import gpu_nodes_have_cuda

    if len({group_key(w) for w in works}) > 1:
        raise ValueError("train_subjects needs subjects of one group_key; split them first")
    cuda = use_gpu and gpu_nodes_have_cuda()
    first = works[0]
    max_restarts = first.config.train.max_failures
    queue = remote_queue(works, max_retries, max_restarts)
    # Ray Train's limit is per group; the queue enforces ``max_failures`` restarts per subject attempt.
    max_failures = max_restarts * len(works) * (max_retries + 1) + 1
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=slots, thread_name_prefix="slot")
    running: dict[concurrent.futures.Future, int] = {}
    next_slot = 0

    def start_slot() -> None:
        nonlocal next_slot
        inputs = SlotInputs(queue, next_slot, first.model_path, first.config.revision, time.time())
        running[pool.submit(_fit_slot, inputs, first, use_gpu, cuda, trainer_storage, max_failures)] = next_slot
        next_slot += 1

    for _ in range(min(slots, len(works))):
        start_slot()
    cursor, seen = 0, {w.name: SubjectState(w.name) for w in works}

    def report_changes() -> None:
        nonlocal cursor
        cursor, changes = ray.get(queue.changes_since.remote(cursor))
        for state in changes:  # one call per transition, with every subject as it was then
            seen[state.name] = state
            if on_change is not None:
                on_change(dict(seen))

    try:
        while running:
            done, _ = concurrent.futures.wait(running, timeout=POLL_S, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                slot = running.pop(future)
                exc = future.exception()
                if exc is None:
                    continue
                # The group is out of restarts: its subject's attempt failed.
                message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                log.warning("worker group of slot %d stopped: %s", slot, message)
                error = f"{type(exc).__name__}: {message}"
                if not ray.get(queue.slot_lost.remote(slot, error)):
                    ray.get(queue.fail_pending.remote(f"no worker group could start ({error})"))
                elif ray.get(queue.has_pending.remote()) and len(running) < slots:
                    start_slot()
            report_changes()
        report_changes()
        return ray.get(queue.snapshot.remote())
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        ray.kill(queue)
        storage.remove(trainer_storage)
