"""Connecting to Ray and the resources work asks for.

Owns: joining an existing cluster (``RAY_ADDRESS``, e.g. inside ``ray job submit``) or starting a
local one; whether work requests GPUs; the resource shape of each kind of work (training worker,
prior actor, export task), which the Helm chart's worker group must satisfy; and finding out
whether GPU nodes really run CUDA (a GPU *resource* does not prove it: fake GPU nodes in tests,
misconfigured images in production).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import cache

from dreambooth.config import TrainConfig

log = logging.getLogger(__name__)

LOCAL_MIN_LOGICAL_CPUS = 4
"""Logical CPUs of an on-demand local cluster. Training workers take one each; with only as many
logical CPUs as cores (2 here), Ray Data's tasks would have none left and wait forever."""


def connect() -> None:
    """Join ``RAY_ADDRESS`` when set, reuse an initialized Ray, else start a local cluster."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        ray.init(num_cpus=max(LOCAL_MIN_LOGICAL_CPUS, os.cpu_count() or 1))
    ray.data.DataContext.get_current().enable_progress_bars = True


def resolve_use_gpu(setting: str) -> bool:
    """``auto`` means: use GPUs when the cluster has (or can autoscale to) any."""
    import ray

    if setting in ("true", "false"):
        return setting == "true"
    return ray.cluster_resources().get("GPU", 0) > 0


@dataclass(frozen=True)
class ResourceShapes:
    """Ray resources requested by one unit of each kind of work."""

    train_worker: dict[str, float]
    prior_actor: dict[str, float]
    export_task: dict[str, float]


def resource_shapes(train: TrainConfig, use_gpu: bool) -> ResourceShapes:
    gpu = {"GPU": 1.0} if use_gpu else {}
    return ResourceShapes(
        train_worker={"CPU": float(train.cpus_per_worker), **gpu},
        prior_actor={"CPU": 1.0, **gpu},
        export_task={"CPU": 1.0, **gpu},
    )


@cache
def gpu_nodes_have_cuda() -> bool:
    """Run a one-GPU probe task: does CUDA work where GPU-requesting work lands?"""
    import ray

    @ray.remote(num_gpus=1, num_cpus=0)
    def probe() -> bool:
        import torch

        return torch.cuda.is_available()

    has_cuda = ray.get(probe.remote())
    if not has_cuda:
        log.warning("GPU resources are requested but CUDA is not available on GPU nodes: work runs on their CPUs")
    return has_cuda


def local_device() -> str:
    """The device for work in this process: CUDA when it is really there, else CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
