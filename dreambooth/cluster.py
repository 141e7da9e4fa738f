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
from typing import Optional

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


def _autoscaling_limits() -> Optional[dict[str, float]]:
    """The most of each resource the autoscaler may grow the cluster to, or None on a fixed-size cluster."""
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config()
    except Exception:  # private API: treat any change in it as "no autoscaler information"
        return None


def _describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{resources.get(k, 0):g} {k}" for k in ("CPU", "GPU"))


def check_feasible(train: TrainConfig, use_gpu: bool) -> None:
    """Refuse training whose worker group this cluster can never hold, instead of waiting forever.

    A fixed-size cluster must fit ``workers`` bundles of ``train_worker`` resources on its nodes (a
    bundle on one node). An autoscaling cluster is checked against the most it can grow to; when it
    must grow first, a message says what it waits for.
    """
    import ray

    from dreambooth.config import ConfigError

    bundle = resource_shapes(train, use_gpu).train_worker
    need = {k: v * train.workers for k, v in bundle.items()}
    asked = f"--workers {train.workers} x ({_describe(bundle)}{'' if use_gpu else ', --use-gpu false'})"
    limits = _autoscaling_limits()
    if limits is not None:
        short = [k for k, v in need.items() if v > limits.get(k, 0)]
        if short:
            raise ConfigError(
                f"{asked} needs {_describe(need)}, but this autoscaling cluster can grow to at most "
                f"{_describe(limits)}; lower --workers/--cpus-per-worker{', or pass --use-gpu false' if use_gpu else ''}, "
                "or raise the worker group's maxReplicas"
            )
        now = ray.cluster_resources()
        if any(now.get(k, 0) < v for k, v in need.items()):
            log.warning("the cluster has %s now; waiting for the autoscaler to add nodes for %s", _describe(now), asked)
        return
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    fits = sum(min(int(res.get(k, 0) // v) for k, v in bundle.items() if v > 0) for res in nodes)
    if fits < train.workers:
        total = ray.cluster_resources()
        fix = "pass --use-gpu false or run on a cluster with GPU nodes" if use_gpu and not total.get("GPU") else (
            "lower --workers or --cpus-per-worker, or use a bigger cluster")
        raise ConfigError(
            f"{asked} can never start: this Ray cluster has {_describe(total)} on {len(nodes)} node(s), does not "
            f"autoscale, and fits {fits} such worker(s); {fix}"
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
