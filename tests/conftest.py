"""Shared fixtures: offline hub, a per-session model cache, and ONE local Ray cluster per session.

Every Ray test uses ``ray_cluster``; starting a cluster costs seconds and DeepSpeed's JIT build of
its shared-memory op happens once per machine (cached in ~/.cache/torch_extensions), not per test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOG_DIR = REPO / "examples" / "subjects" / "dog"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """Built-in models are materialized here once per test session (workers inherit the env)."""
    cache = tmp_path_factory.mktemp("dreambooth-cache")
    os.environ["DREAMBOOTH_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_model_path(model_cache) -> str:
    from dreambooth.models import resolve_model

    return resolve_model("tiny")


@pytest.fixture(scope="session")
def clip_tokenizer():
    from dreambooth.models import load_clip_tokenizer

    return load_clip_tokenizer()


@pytest.fixture
def dog_dir(tmp_path) -> Path:
    """A private copy of the sample subject (tests may add bad files to it)."""
    target = tmp_path / "dog"
    shutil.copytree(DOG_DIR, target)
    return target


@pytest.fixture(scope="session")
def ray_cluster(model_cache):
    """One local Ray cluster for the whole session (4 logical CPUs on a 2-core machine: see cluster.py)."""
    import ray

    from dreambooth import cluster
    from dreambooth.cluster import LOCAL_MIN_LOGICAL_CPUS
    from dreambooth.training.engine import prebuild_deepspeed_ops

    prebuild_deepspeed_ops()  # the one JIT build of the session, before any worker needs it
    ray.init(num_cpus=LOCAL_MIN_LOGICAL_CPUS, include_dashboard=False, log_to_driver=True)
    cluster._started_here = True  # a local, fixed-size cluster, as `connect` would have started
    yield ray
    cluster._started_here = False
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """Tests that own the machine's Ray (``ray start``/``ray stop --force``) run after all others."""
    items.sort(key=lambda item: item.get_closest_marker("exclusive_ray") is not None)


@pytest.fixture
def exclusive_ray():
    """Shut down the shared cluster first: these tests start their own and stop every Ray process."""
    import ray

    from dreambooth import cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster._started_here = False  # the next cluster is the test's own (possibly autoscaling) one
    yield
    subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True, check=False)


@pytest.fixture(scope="session", autouse=True)
def _quiet_libraries():
    from dreambooth.models import quiet_libraries

    quiet_libraries()


# --- Helm chart (tests/test_helm_*.py; helpers in tests/chart_helpers.py) ------------------


@pytest.fixture(scope="session")
def helm() -> str:
    """The helm binary from scripts/ensure-helm.sh (PATH, else .venv/bin/helm, else fetched once)."""
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "ensure-helm.sh")],
        capture_output=True, text=True, timeout=600,
    )
    if proc.returncode != 0:
        pytest.fail(f"scripts/ensure-helm.sh failed:\n{proc.stderr}")
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def rendered(helm) -> dict[str, list[dict]]:
    """Every helm/dreambooth/ci/*-values.yaml rendered once: {file name: objects}."""
    import chart_helpers as ch

    return {p.name: ch.render(helm, "-f", str(p)) for p in ch.CI_FILES}
