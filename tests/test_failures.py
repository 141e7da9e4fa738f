"""Failures a real cluster has every day, caused from outside the product code: a training worker
SIGKILLed, a generation actor SIGKILLed, a driver killed mid-prior, two writers of one prior cache."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from dreambooth import pipeline, priors, storage
from dreambooth.config import build_config
from dreambooth.training import checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.e2e]


def _processes(title: str) -> list[psutil.Process]:
    """Ray worker processes whose title (``ray::<class>``) starts with ``title``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and cmdline[0].startswith(title):
            found.append(proc)
    return found


def _step_complete(output: Path, step: int) -> bool:
    return step in checkpoint.complete_steps(str(output))


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class Background(threading.Thread):
    """Runs a function in a thread and keeps its result or exception."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None
        self.start()

    def run(self):
        try:
            self.result = self.fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test
            self.error = exc


def _seeds_per_file(cache_uri: str) -> dict[str, list[int]]:
    folder = Path(cache_uri) / priors.SHARDS
    return {f.name: pq.read_table(f, columns=["seed"]).column("seed").to_pylist() for f in folder.glob("*.parquet")}


def test_sigkilled_training_worker_restores_from_the_last_checkpoint(ray_cluster, dog_dir, tmp_path):
    out = tmp_path / "run"
    cfg = build_config(({
        "model": "tiny", "instance_dir": str(dog_dir), "class_noun": "dog", "output": str(out), "identifier": "sks",
        "resolution": 32, "num_class_images": 2, "prior_batch_size": 2, "num_inference_steps": 2,
        "max_train_steps": 14, "checkpointing_steps": 4, "workers": 2, "num_sample_images": 1,
    }, "test"))
    run = Background(lambda: pipeline.execute(pipeline.preflight(cfg)))
    _wait_for(lambda: _step_complete(out, 4), 240, "the first complete checkpoint")
    victims = _processes("ray::RayTrainWorker")
    assert len(victims) == 2
    killed_at = time.monotonic()
    victims[-1].send_signal(signal.SIGKILL)
    attempts = out / "checkpoints" / "attempts"
    _wait_for(lambda: len(list(attempts.glob("*.json"))) >= 2, 240, "a restarted worker group")
    recovered_s = time.monotonic() - killed_at
    run.join(timeout=300)
    assert run.error is None, run.error
    record = storage.read_json(str(out / "run.json"))
    print(f"\nworker SIGKILL → restored worker group training again in {recovered_s:.1f} s; "
          f"steps run {record['steps_run']}, redone {record['steps_redone']}")
    assert record["metrics"]["step"] == 14 and record["steps"] == 14
    assert record["training_attempts"] == 2
    assert record["metrics"]["resumed_from"] in (4, 8, 12)
    assert record["steps_run"] == 14 + record["steps_redone"]
    assert (out / "model_index.json").is_file()


def test_sigkilled_generation_actor_leaves_every_seed_exactly_once(ray_cluster, tiny_model_path, tmp_path):
    spec = priors.PriorSpec(model="tiny", revision=None, prompt="a backpack", resolution=32, scheduler="DDPMScheduler",
                            num_inference_steps=25, guidance_scale=3.0, first_seed=0)
    root = str(tmp_path / "priors")
    run = Background(lambda: priors.generate(spec, tiny_model_path, root, 16, use_gpu=False, actors=2, batch_size=2))
    shards = Path(spec.cache_uri(root)) / priors.SHARDS
    _wait_for(lambda: shards.is_dir() and any(shards.glob("*.parquet")), 240, "the first committed shard")
    actors = _wait_for(lambda: _processes("ray::MapWorker(MapBatches(PriorGenerator))"), 30, "a generation actor")
    actors[0].send_signal(signal.SIGKILL)
    run.join(timeout=300)
    assert run.error is None, run.error
    assert run.result.seeds == list(range(16))
    per_file = _seeds_per_file(run.result.uri)
    every = [s for seeds in per_file.values() for s in seeds]
    assert sorted(every) == list(range(16)), per_file  # no gap, no duplicate, in any committed file


def _prior_cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dreambooth.cli", "prior", "--model", "tiny", "--class-noun", "duck toy",
            "--resolution", "32", "--num-images", "12", "--num-inference-steps", "25", "--prior-batch-size", "2",
            "--output", str(out), *extra]


def test_driver_killed_mid_prior_resumes_with_only_the_missing_seeds(ray_cluster, tiny_model_path, tmp_path):
    out = tmp_path / "priors"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    driver = subprocess.Popen(_prior_cli(out, "--prior-actors", "1"), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache = _wait_for(lambda: next(iter(out.glob("a-duck-toy-*")), None), 120, "the cache folder")
    _wait_for(lambda: len(list((cache / priors.SHARDS).glob("*.parquet"))) >= 2, 240, "two committed shards")
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    assert not (cache / priors.MANIFEST).exists()  # nothing incomplete looks complete
    committed = sum(len(s) for s in _seeds_per_file(str(cache)).values())
    assert 0 < committed < 12

    spec = priors.PriorSpec(model="tiny", revision=None, prompt="a duck toy", resolution=32,
                            scheduler="DDPMScheduler", num_inference_steps=25, guidance_scale=7.5, first_seed=0)
    assert spec.cache_uri(str(out)) == str(cache)
    resumed = priors.generate(spec, tiny_model_path, str(out), 12, use_gpu=False, batch_size=2)
    assert resumed.generated == 12 - committed
    assert sorted(s for seeds in _seeds_per_file(resumed.uri).values() for s in seeds) == list(range(12))


def test_two_writers_of_one_prior_cache_end_with_one_complete_set(ray_cluster, tmp_path):
    out = tmp_path / "priors"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    writers = [subprocess.Popen(_prior_cli(out, "--prior-actors", "1"), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=400)[0] for w in writers]
    assert [w.returncode for w in writers] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    (cache,) = out.glob("a-duck-toy-*")
    manifest = storage.read_json(str(cache / priors.MANIFEST))
    assert manifest["seeds"] == list(range(12))
    per_file = _seeds_per_file(str(cache))
    assert sorted(s for seeds in per_file.values() for s in seeds) == list(range(12)), per_file
    assert not list((cache / priors.SHARDS).glob(".tmp-*"))  # no half-written file left


def test_sigkilled_worker_of_a_warm_group_resumes_its_subject_and_the_bulk_goes_on(ray_cluster, dog_dir, tmp_path):
    """Bulk of 3 subjects on one warm worker group; its worker is SIGKILLed during the second
    subject, after that subject's step-4 checkpoint. Ray Train restarts the group, the restarted
    group resumes *that* subject from its checkpoint, then trains the third; the summary shows it."""
    import yaml

    from dreambooth import bulk

    manifest = tmp_path / "subjects.yaml"
    manifest.write_text(yaml.safe_dump({
        "defaults": {"model": "tiny", "resolution": 32, "num_class_images": 2, "prior_batch_size": 2,
                     "num_inference_steps": 2, "max_train_steps": 12, "checkpointing_steps": 4, "workers": 1,
                     "num_sample_images": 0, "before_after": False},
        "subjects": [{"name": n, "instance_dir": str(dog_dir), "class_noun": "dog"} for n in ("first", "second", "third")],
    }))
    out = tmp_path / "runs"
    options = bulk.BulkOptions(str(manifest), str(out), max_concurrent=1, max_retries=0)
    run = Background(lambda: bulk.run_bulk(options, bulk.plan(options, {})))
    _wait_for(lambda: _step_complete(out / "second", 4), 300,
              "the second subject's first checkpoint")
    assert (out / "first" / "run.json").exists() and not (out / "second" / "run.json").exists()
    (victim,) = _processes("ray::RayTrainWorker")
    victim.send_signal(signal.SIGKILL)
    run.join(timeout=400)
    assert run.error is None, run.error
    status = {r.name: r for r in run.result.results}
    assert all(r.status == "succeeded" for r in status.values()), status
    assert (status["second"].attempts, status["second"].restarts) == (1, 1)
    assert status["second"].resumed_from in (4, 8)
    assert status["first"].restarts == status["third"].restarts == 0
    summary = storage.read_json(str(out / bulk.SUMMARY))
    second = next(s for s in summary["subjects"] if s["name"] == "second")
    assert second["restarts"] == 1 and second["resumed_from"] == status["second"].resumed_from
    record = storage.read_json(str(out / "second" / "run.json"))
    assert record["metrics"]["resumed_from"] == second["resumed_from"]
    assert record["loss_curve"]["step"][0] == second["resumed_from"] + 1  # nothing before the checkpoint redone
    assert record["training_attempts"] == 2 and record["metrics"]["step"] == 12
    third = storage.read_json(str(out / "third" / "run.json"))
    assert third["metrics"]["warm_start"] is True  # the restarted group went on with the queue
