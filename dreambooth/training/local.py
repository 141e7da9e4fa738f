"""One local training worker in this command's own process: the warm-trainer loop without a cluster.

``dreambooth run --workers 1`` on a machine that joins no cluster trains here (``--launcher auto``).
Nothing else changes: the loop, the DeepSpeed engine (over a one-rank process group), the
checkpoints, the export and the run record are a Ray Train rank's own (``loop.run_slot`` at rank 0
of a world of 1). What goes is the start-up around them — a local Ray cluster, a Ray Train worker
group, a second process that imports torch and loads the base model again — which on a small
machine takes longer than a short run's training (``benchmarks/train_step.py --wall``).

Failures: an error inside training starts the slot again, as Ray Train restarts a worker group: the
subject resumes from its last checkpoint, at most ``--max-failures`` times. A process that is
killed resumes when the same command runs again (the checkpoints live in the output).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Iterator

import torch

from dreambooth.training.loop import Place, SlotInputs, run_slot
from dreambooth.training.subject_queue import SubjectQueue, SubjectState, SubjectWork

log = logging.getLogger(__name__)


@contextlib.contextmanager
def one_rank_process_group(cuda: bool) -> Iterator[None]:
    """A process group of this process alone (DeepSpeed's engine and the loop's collectives need one).

    It stays for the life of the process: DeepSpeed caches the groups it derives from the first one,
    and a second run in the same process (a benchmark, a test) would find them destroyed.
    """
    import torch.distributed as dist

    # DeepSpeed's engine reads these, as set by a launcher (and, without CUDA, would probe for it).
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", **({} if cuda else {"DS_ACCELERATOR": "cpu"})}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update({key: value for key, value in env.items() if saved[key] is None})
    if not dist.is_initialized():
        # An in-memory store: no port to pick, nothing another process could join.
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    if dist.get_world_size() != 1:
        raise RuntimeError(f"this process is rank {dist.get_rank()} of {dist.get_world_size()}; "
                           "the in-process launcher trains alone (use --launcher ray-train)")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)


def train_here(works: list[SubjectWork], *, cuda: bool, max_retries: int) -> dict[str, SubjectState]:
    """Train ``works`` one after another in this process; return each subject's final state."""
    first = works[0]
    queue = SubjectQueue(works, max_retries, max_restarts=first.config.train.max_failures)
    place = Place(rank=0, world=1, device=torch.device("cuda", 0) if cuda else torch.device("cpu"),
                  cpus=first.config.train.cpus_per_worker, in_ray_worker=False)
    with one_rank_process_group(cuda):
        while True:
            inputs = SlotInputs(queue, 0, first.model_path, first.config.revision, time.time())
            try:
                run_slot(inputs, place)
                break
            except Exception as exc:  # what a lost worker is to a Ray Train group
                error = f"{type(exc).__name__}: {exc}"
                if queue.holding.get(0) is None:  # failed before taking a subject: it would again
                    log.exception("training could not start")
                    queue.fail_pending(f"training could not start ({error})")
                    break
                log.exception("training %s raised; resuming it from its last checkpoint", queue.holding[0])
    return queue.snapshot()
