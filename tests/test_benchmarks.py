"""The benchmark scripts run (in --quick mode) so they cannot rot; their full figures live in
benchmarks/RESULTS.md. Each starts its own local Ray cluster, so they run alone, last."""

import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = [pytest.mark.exclusive_ray, pytest.mark.e2e]


@pytest.mark.parametrize(
    "script,expected",
    [
        ("train_step.py", ["plain diffusers-style loop (baseline)", "in-process project loop",
                           "Ray Train + DeepSpeed ZeRO-2", "| ZeRO-2 x1 |", "`dreambooth run --workers 1",
                           "`--launcher ray-train`"]),
        ("bulk_overhead.py", ["a worker group per subject", "warm worker group"]),
        ("prior_gen.py", ["plain loop", "Ray Data actor pool", "Scaling efficiency"]),
        ("latent_cache.py", ["cached latents", "VAE encode every step"]),
        ("bulk_vs_sequential.py", ["sequential", "one `bulk` run"]),
    ],
)
def test_benchmark_quick_mode(exclusive_ray, script, expected):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--quick", "--no-write"],
                          cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for text in expected:
        assert text in proc.stdout, proc.stdout[-2000:]
