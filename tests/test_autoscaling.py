"""A bulk run on Ray's local autoscaling test cluster: GPU workers scale up from 0, subjects train
in parallel, and the cluster scales back to 0 when idle.

The fake worker nodes advertise a logical GPU; there is no CUDA, so the same code path (work that
requests one GPU each, ``--use-gpu true``) runs on their CPUs, exactly as the probe in
``dreambooth.cluster.gpu_nodes_have_cuda`` decides.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from dreambooth import bulk, storage

pytestmark = [pytest.mark.exclusive_ray, pytest.mark.e2e]

MAX_NODES = 3


def _cluster_config(head_resources: dict, worker_node_types: dict, **overrides) -> dict:
    """A fake-multinode autoscaler config (the wheel lacks the example file AutoscalingCluster reads)."""
    config = {
        "cluster_name": "dreambooth-autoscaling-test",
        "max_workers": MAX_NODES,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": {
            **worker_node_types,
            "ray.head.default": {"resources": head_resources, "node_config": {}, "max_workers": 0},
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }
    config.update(overrides)
    return config


class Timeline:
    """Samples the number of alive worker nodes every half second in a background thread."""

    def __init__(self, ray):
        self.ray, self.samples, self.start = ray, [], time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                workers = sum(1 for n in self.ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0)
                self.samples.append((time.monotonic() - self.start, workers))
            except Exception:  # the cluster may be shutting down
                pass
            self._stop.wait(0.5)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> int:
        return max((n for _, n in self.samples), default=0)

    def render(self) -> str:
        lines, last = ["  t(s)  GPU workers"], None
        for t, n in self.samples:
            if n != last:
                lines.append(f"{t:6.1f}  {n} {'#' * n}")
                last = n
        return "\n".join(lines)


def test_bulk_scales_gpu_workers_up_from_zero_and_back(exclusive_ray, tmp_path, dog_dir, monkeypatch, capsys):
    import ray
    from ray.cluster_utils import AutoscalingCluster

    from dreambooth.cli import main

    class LocalAutoscalingCluster(AutoscalingCluster):
        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **overrides):
            return _cluster_config(head_resources, worker_node_types, **overrides)

    # AutoscalingCluster shells out to `ray`: make it the one of this interpreter.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("DREAMBOOTH_ALLOW_FAKE_GPUS", "1")  # its GPU nodes are fake: no CUDA behind them
    cluster = LocalAutoscalingCluster(
        head_resources={"CPU": 0},
        worker_node_types={
            "gpu_worker": {
                "resources": {"CPU": 1, "GPU": 1, "object_store_memory": 200 * 1024**2},
                "node_config": {},
                "min_workers": 0,
                "max_workers": MAX_NODES,
            }
        },
    )
    subjects = [{"name": f"dog-{i}", "instance_dir": str(dog_dir), "class_noun": "dog"} for i in range(3)]
    manifest = tmp_path / "subjects.yaml"
    manifest.write_text(yaml.safe_dump({"subjects": subjects, "defaults": {
        "model": "tiny", "resolution": 32, "num_class_images": 2, "prior_batch_size": 2, "num_inference_steps": 2,
        "max_train_steps": 2, "checkpointing_steps": 0, "workers": 1, "num_sample_images": 1, "use_gpu": "true"}}))
    out = tmp_path / "runs"
    cluster.start()
    try:
        ray.init("auto")
        assert ray.cluster_resources().get("GPU", 0) == 0  # starts with no GPU workers
        with Timeline(ray) as timeline:
            code = main(["bulk", "--manifest", str(manifest), "--output", str(out), "--max-concurrent", "2"])
            done_at = time.monotonic() - timeline.start
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and (not timeline.samples or timeline.samples[-1][1] > 0):
                time.sleep(1)
        with capsys.disabled():  # the timeline belongs in the test log, pass or fail
            print(f"\nGPU worker nodes over time (bulk finished at {done_at:.1f} s):\n{timeline.render()}")
        assert code == 0, capsys.readouterr().out[-3000:]
        summary = storage.read_json(str(out / bulk.SUMMARY))
        assert [s["status"] for s in summary["subjects"]] == ["succeeded"] * 3
        assert timeline.samples[0][1] == 0 and timeline.peak >= 2  # scaled up from zero
        assert timeline.samples[-1][1] == 0  # and back to zero when idle
        windows = sorted((s["started_unix"], s["finished_unix"]) for s in summary["subjects"])
        assert any(b[0] < a[1] for a, b in zip(windows, windows[1:])), f"no two subjects overlapped: {windows}"
        record = storage.read_json(str(out / "dog-0" / "run.json"))
        assert record["use_gpu"] is True  # the work asked for GPUs; the nodes ran it on CPU
    finally:
        ray.shutdown()
        cluster.shutdown()
