"""Connecting to Ray and the resources work asks for.

Owns: joining an existing cluster (``RAY_ADDRESS``, e.g. inside ``ray job submit``) or starting a
local one; whether work requests GPUs; the resource shape of each kind of work (training worker,
prior actor), which the Helm chart's worker group must satisfy; and finding out
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

    global _started_here
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        # No dashboard: nothing submits jobs to a cluster that lives as long as this command, and on
        # a small machine its start-up competes with the run's own for the cores.
        ray.init(num_cpus=max(LOCAL_MIN_LOGICAL_CPUS, os.cpu_count() or 1), include_dashboard=False)
        _started_here = True
    ray.data.DataContext.get_current().enable_progress_bars = True


def ray_is_up() -> bool:
    """Whether this process is connected to Ray (without importing it, which takes seconds)."""
    import sys

    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def shutdown() -> None:
    """Leave Ray; a local cluster ``connect`` started stops with it."""
    import ray

    global _started_here
    ray.shutdown()
    _started_here = False


def resolve_launcher(train: TrainConfig) -> str:
    """``--launcher auto``: train in this process when one worker is asked for and no cluster is
    joined (no ``RAY_ADDRESS``, no Ray already initialized here); else on a Ray Train worker group."""
    if train.launcher != "auto":
        return train.launcher
    joins_cluster = bool(os.environ.get("RAY_ADDRESS")) or ray_is_up()
    return "in-process" if train.workers == 1 and not joins_cluster else "ray-train"


def local_use_gpu(setting: str) -> bool:
    """``--use-gpu`` for training in this process: auto means "if this machine has CUDA"."""
    import torch

    from dreambooth.config import ConfigError

    if setting == "true" and not torch.cuda.is_available() and os.environ.get(ALLOW_FAKE_GPUS_ENV) != "1":
        raise ConfigError("--use-gpu true, but this machine has no CUDA device (torch.cuda.is_available() is "
                          "False): check the NVIDIA driver and that torch is a CUDA build "
                          "(`dreambooth doctor --expect-gpu`), or pass --use-gpu false to train on CPUs")
    if setting == "auto":
        return torch.cuda.is_available()
    return setting == "true" and torch.cuda.is_available()


def resolve_use_gpu(setting: str) -> bool:
    """``auto`` means: use GPUs when the cluster has (or can autoscale to) any."""
    import ray

    if setting in ("true", "false"):
        return setting == "true"
    return ray.cluster_resources().get("GPU", 0) > 0


@dataclass(frozen=True)
class ResourceShapes:
    """Ray resources requested by one unit of each kind of work (export runs on training rank 0)."""

    train_worker: dict[str, float]
    prior_actor: dict[str, float]


def resource_shapes(train: TrainConfig, use_gpu: bool) -> ResourceShapes:
    gpu = {"GPU": 1.0} if use_gpu else {}
    return ResourceShapes(
        train_worker={"CPU": float(train.cpus_per_worker), **gpu},
        prior_actor={"CPU": 1.0, **gpu},
    )


_started_here = False
"""Whether ``connect`` started the cluster itself (a local, fixed-size one)."""


def _autoscaling(wait_s: float = 15.0) -> tuple[bool, Optional[dict[str, float]]]:
    """(whether the cluster autoscales, the most of each resource it may grow to when known).

    Autoscaler v2 publishes its node groups (hence a maximum); v1's monitor reports its status to
    the internal KV every few seconds, with an ``autoscaler_report`` only when an autoscaler runs.
    Until the monitor has its first load metrics it reports without one even when an autoscaler
    runs (a cluster that just started), so only a report with load metrics and no autoscaler report
    means "does not autoscale".
    """
    import json
    import time

    if _started_here:
        return False, None
    try:  # private APIs: any change in them reads as "no autoscaler information"
        from ray._private import ray_constants
        from ray._private.state import state
        from ray.experimental.internal_kv import _internal_kv_get

        limits = state.get_max_resources_from_cluster_config()
        if limits:
            return True, limits
        deadline = time.monotonic() + wait_s
        while True:
            raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
            status = json.loads(raw) if raw else {}
            if "autoscaler_report" in status:
                return True, None
            if status.get("load_metrics_report", {}).get("usage"):
                return False, None
            if time.monotonic() > deadline:
                return False, None
            time.sleep(0.5)
    except Exception:
        return False, None


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
    autoscales, limits = _autoscaling()
    if autoscales:
        short = [k for k, v in need.items() if limits is not None and v > limits.get(k, 0)]
        if short:
            raise ConfigError(
                f"{asked} needs {_describe(need)}, but this autoscaling cluster can grow to at most "
                f"{_describe(limits)}; lower --workers/--cpus-per-worker{', or pass --use-gpu false' if use_gpu else ''}, "
                "or raise the worker group's maxReplicas"
            )
        now = ray.cluster_resources()
        if any(now.get(k, 0) < v for k, v in need.items()):
            log.warning("the cluster has %s now; waiting for the autoscaler to add nodes for %s (Ray Train retries "
                        "the start until its failure budget, --max-failures, is spent)", _describe(now), asked)
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


ALLOW_FAKE_GPUS_ENV = "DREAMBOOTH_ALLOW_FAKE_GPUS"
"""Set to 1 only where GPU *resources* are fake (Ray's autoscaling test clusters): GPU work then runs
on those nodes' CPUs instead of failing."""


def require_cuda(use_gpu: bool) -> None:
    """With GPUs asked for, CUDA must really work where GPU work lands: never train on CPU by surprise."""
    from dreambooth.config import ConfigError

    if not use_gpu or gpu_nodes_have_cuda():
        return
    if os.environ.get(ALLOW_FAKE_GPUS_ENV) == "1":
        log.warning("%s=1: GPU resources without CUDA; GPU work runs on the nodes' CPUs", ALLOW_FAKE_GPUS_ENV)
        return
    raise ConfigError(
        "GPUs were asked for (--use-gpu true, or auto on a cluster with GPU resources) but CUDA is not available "
        "where GPU work runs (torch.cuda.is_available() is False there): check the NVIDIA driver and device plugin "
        "and that the image has a CUDA build of torch (run `dreambooth doctor --expect-gpu` on a GPU node), "
        "or pass --use-gpu false to train on CPUs"
    )


@cache
def gpu_nodes_have_cuda() -> bool:
    """Run a one-GPU probe task: does CUDA work where GPU-requesting work lands?"""
    import ray

    @ray.remote(num_gpus=1, num_cpus=0)
    def probe() -> bool:
        import torch

        return torch.cuda.is_available()

    return ray.get(probe.remote())


def local_device() -> str:
    """The device for work in this process: CUDA when it is really there, else CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
