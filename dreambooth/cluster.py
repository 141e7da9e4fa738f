"""Connecting to Ray: an existing cluster (``RAY_ADDRESS``, e.g. inside ``ray job submit``) or a
local one started on demand, and deciding whether work gets GPUs."""

from __future__ import annotations

import logging
import os

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
