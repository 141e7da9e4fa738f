"""End to end on local Ray with the tiny model: priors → Parquet → DeepSpeed ZeRO-2/3 training with
2 workers → export → reload with plain diffusers. Plus resume after a stopped driver."""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dreambooth import pipeline, storage
from dreambooth.config import build_config
from dreambooth.export import RUN_RECORD
from dreambooth.training import checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.e2e]

FAST = {
    "model": "tiny",
    "class_noun": "dog",
    "resolution": 32,
    "num_class_images": 4,
    "prior_batch_size": 2,
    "num_inference_steps": 2,
    "max_train_steps": 3,
    "train_batch_size": 1,
    "learning_rate": 1e-3,
    "workers": 2,
    "checkpointing_steps": 2,
    "num_sample_images": 1,
    "log_every": 1,
}


def _config(**overrides):
    return build_config(({**FAST, **overrides}, "test"))


def _step_complete(output: Path, step: int) -> bool:
    return step in checkpoint.complete_steps(str(output))


def _weights(folder, component):
    from safetensors.torch import load_file

    (file,) = Path(folder, component).glob("*.safetensors")
    return load_file(str(file))


def _assert_changed(base, tuned):
    assert base.keys() == tuned.keys()
    changed = [k for k in base if not torch.equal(base[k].to(tuned[k].dtype), tuned[k])]  # exports are fp16 by default
    assert len(changed) > len(base) // 2, f"only {len(changed)} of {len(base)} tensors changed"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def test_zero2_end_to_end_then_second_subject_zero3_reuses_priors(ray_cluster, tiny_model_path, dog_dir, runs, monkeypatch):
    from diffusers import StableDiffusionPipeline

    out = runs / "dog"
    (dog_dir / "03.txt").write_text("a {identifier} {class_noun} on a sofa")  # that photo's own prompt
    cfg = _config(instance_dir=str(dog_dir), output=str(out), zero_stage=2, report_to="mlflow")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    before = copy.deepcopy(cfg)
    prepared = pipeline.preflight(cfg)
    outcome = pipeline.execute(prepared)
    assert cfg == before and cfg.subject.identifier == "auto"  # validation resolves a copy; the caller's is not written
    record = storage.read_json(str(out / RUN_RECORD))
    assert not outcome.skipped and record["identifier"] == prepared.config.subject.identifier != "auto"
    assert record["identifier_auto"] is True
    assert record["instance_captions"] == {"03.jpg": f"a {record['identifier']} dog on a sofa"}
    assert record["priors"]["generated"] == 4 and record["priors"]["images"] == 4
    assert record["metrics"]["step"] == 3 and record["metrics"]["loss"] > 0
    assert record["metrics"]["attention_backend"] == {"processors": ["AttnProcessor2_0"], "sdpa_backends": ["cpu"]}
    assert not (out / "validation").exists()  # --validation-steps 0: none

    # --report-to mlflow: a file store in the output, read back with MLflow's own client.
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks file-store readers to opt in
    client = MlflowClient(tracking_uri=(out / "logs" / "mlruns").as_uri())
    [tracked] = client.search_runs([client.get_experiment_by_name("dreambooth").experiment_id])
    losses = client.get_metric_history(tracked.info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3] and losses[-1].value == pytest.approx(record["metrics"]["loss"])
    assert {"instance_loss", "prior_loss", "lr", "step_seconds"} <= set(tracked.data.metrics)
    assert tracked.data.params["train.zero_stage"] == "2" and tracked.data.params["subject.class_noun"] == "dog"
    assert (out / "samples.png").is_file() and (out / "config.yaml").is_file()
    assert not (out / "checkpoints").exists()  # removed after a successful export

    # The prior shards hold the asked rows and columns.
    cache = Path(record["priors"]["cache"])
    table = pq.read_table(sorted((cache / "shards").glob("*.parquet")))
    assert table.num_rows == 4 and sorted(table.column("seed").to_pylist()) == [0, 1, 2, 3]
    assert {"image", "prompt", "seed", "height", "width", "latents", "latent_shape"} <= set(table.column_names)

    # All layers trained: UNet and text encoder both changed.
    _assert_changed(_weights(tiny_model_path, "unet"), _weights(out, "unet"))
    _assert_changed(_weights(tiny_model_path, "text_encoder"), _weights(out, "text_encoder"))

    # The export loads with plain diffusers and generates.
    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    image = pipe(f"a {record['identifier']} dog", num_inference_steps=2, height=32, width=32).images[0]
    assert image.size == (32, 32)

    # A second subject of the same class: ZeRO-3, priors reused (nothing generated), weights gathered.
    # Given as relative paths, as `make demo`'s config does: Ray Train refuses a relative storage path,
    # and the workers do not share the driver's working directory.
    other_dir = runs / "dog2"
    shutil.copytree(dog_dir, other_dir)
    (other_dir / "04.jpg").unlink()
    out2 = runs / "dog2-out"
    monkeypatch.chdir(runs)
    cfg2 = _config(instance_dir="dog2", output="dog2-out", prior_output="priors",
                   zero_stage=3, identifier_seed=1, max_train_steps=4, validation_steps=2)
    pipeline.execute(pipeline.preflight(cfg2))
    record2 = storage.read_json(str(out2 / RUN_RECORD))
    # Validation grids at the asked steps, from the sharded weights (ZeRO-3 gathers them for the render).
    assert sorted(p.name for p in (out2 / "validation").iterdir()) == ["step-2.png", "step-4.png"]
    assert Image.open(out2 / "validation" / "step-2.png").size == Image.open(out2 / "samples.png").size
    assert Image.open(out2 / "loss.png").size[0] > 300 and record2["loss_plot"] == str(out2 / "loss.png")
    assert record2["priors"]["generated"] == 0 and record2["priors"]["cache"] == record["priors"]["cache"]
    assert record2["config"]["train"]["zero_stage"] == 3 and record2["metrics"]["zero_stage"] == 3  # 2 ranks: sharded
    _assert_changed(_weights(tiny_model_path, "unet"), _weights(out2, "unet"))
    _assert_changed(_weights(tiny_model_path, "text_encoder"), _weights(out2, "text_encoder"))

    # Re-running onto a complete output does nothing and says so.
    again = pipeline.execute(pipeline.preflight(_config(instance_dir=str(dog_dir), output=str(out))))
    assert again.skipped


def test_stopped_run_resumes_from_its_last_checkpoint(ray_cluster, dog_dir, runs):
    """Kill the driver after the step-2 checkpoint; the same command continues from step 2 (or a later
    one the killed driver's workers completed before the new run claimed the output). 60 steps, so
    that those workers, if they outlive the kill by seconds, are stopped by the claim before they can
    finish the run themselves."""
    out = runs / "resumed"
    argv = [sys.executable, "-m", "dreambooth.cli", "run", "--model", "tiny", "--instance-dir", str(dog_dir),
            "--class-noun", "dog", "--output", str(out), "--resolution", "32", "--num-class-images", "4",
            "--num-inference-steps", "2", "--max-train-steps", "60", "--checkpointing-steps", "2",
            "--workers", "2", "--train-batch-size", "1", "--num-sample-images", "1", "--identifier", "sks"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    driver = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and driver.poll() is None:
        if _step_complete(out, 2):
            break
        time.sleep(0.5)
    assert driver.poll() is None, "the first run ended before it could be stopped"
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    assert not (out / RUN_RECORD).exists()  # stopped: nothing claims to be complete

    from dreambooth.cli import main

    assert main(argv[3:]) == 0  # the same command, run again (in this process, on the same cluster)
    record = storage.read_json(str(out / RUN_RECORD))
    assert record["metrics"]["step"] == 60
    assert record["metrics"]["resumed_from"] >= 2 and record["metrics"]["resumed_from"] % 2 == 0


def test_overwrite_removes_only_what_the_run_wrote(ray_cluster, dog_dir, runs, capsys):
    """A user keeps notes and spare photos in the output folder: two runs, the second with --overwrite,
    leave every one of them byte for byte, while the run's own files are written anew."""
    from dreambooth.cli import main

    out = runs / "kept"
    user_files = {
        out / "notes.txt": b"which photos I used\n",
        out / "spare-photos" / "01.jpg": (dog_dir / "01.jpg").read_bytes(),
        out / "unet-notes" / "readme.md": b"not a pipeline folder\n",
    }
    for path, data in user_files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    argv = ["run", "--model", "tiny", "--instance-dir", str(dog_dir), "--class-noun", "dog", "--output", str(out),
            "--resolution", "32", "--num-class-images", "4", "--prior-batch-size", "2", "--num-inference-steps", "2",
            "--max-train-steps", "2", "--workers", "1", "--checkpointing-steps", "0", "--num-sample-images", "1",
            "--before-after", "false", "--identifier", "sks"]
    assert main(argv) == 0
    first = (out / RUN_RECORD).read_text()
    assert main(argv) == 0 and "already complete" in capsys.readouterr().out  # no --overwrite: nothing happens
    (out / "eval.json").write_text("{}")  # as `dreambooth eval` would have left it
    assert main([*argv, "--overwrite"]) == 0

    for path, data in user_files.items():
        assert path.read_bytes() == data, f"{path} was changed or deleted"
    assert (out / RUN_RECORD).read_text() != first  # a new record (new timings)
    assert not (out / "eval.json").exists()  # the old run's scores described the old weights
    assert (out / "unet").is_dir() and (out / "samples.png").is_file()
    record = storage.read_json(str(out / RUN_RECORD))
    assert record["config"]["export"]["save_dtype"] == "fp16"
    assert {t.dtype for t in _weights(out, "unet").values()} == {torch.float16}  # the default export precision
    assert record["output_bytes"]["unet"] == sum(p.stat().st_size for p in (out / "unet").iterdir())


def test_one_local_worker_trains_in_process_and_resumes_after_a_kill(ray_cluster, tiny_model_path, dog_dir, runs):
    """`dreambooth run --workers 1` on a machine that joins no cluster: no Ray (priors cached), the
    same engine, checkpoints and export; killed after a checkpoint, the same command resumes it."""
    from diffusers import StableDiffusionPipeline

    flags = {"model": "tiny", "instance_dir": str(dog_dir), "class_noun": "dog", "resolution": 32,
             "prior_output": str(runs / "local-priors"), "num_class_images": 4, "prior_batch_size": 2,
             "num_inference_steps": 2, "identifier": "sks", "workers": 1, "train_batch_size": 1,
             "learning_rate": 1e-3, "num_sample_images": 1, "before_after": False,
             "report_to": "tensorboard", "validation_steps": 20}
    out = runs / "local"
    prepared = pipeline.preflight(build_config(({**flags, "output": str(out)}, "test")))
    pipeline.make_priors(prepared, use_gpu=False)  # cached first, on the shared cluster: the runs below need no Ray

    argv = [sys.executable, "-m", "dreambooth.cli", "run", "--max-train-steps", "40", "--checkpointing-steps", "2",
            "--log-every", "1"]
    for key, value in {**flags, "output": str(out)}.items():
        argv += [f"--{key.replace('_', '-')}", str(value).lower() if isinstance(value, bool) else str(value)]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    driver = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and driver.poll() is None and not _step_complete(out, 2):
        time.sleep(0.2)
    assert driver.poll() is None, "the first run ended before it could be stopped"
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    assert not (out / RUN_RECORD).exists()

    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = storage.read_json(str(out / RUN_RECORD))
    assert record["launcher"] == "in-process"
    assert record["config_sources"]["max_train_steps"] == "command-line flags" and "seed" not in record["config_sources"]
    assert "connect_s" not in record["timings"]  # no Ray cluster was started or joined
    assert record["metrics"]["setup_worker_group_s"] < 1.0  # no worker group to wait for
    assert record["metrics"]["step"] == 40 and record["metrics"]["resumed_from"] >= 2
    assert record["steps_run"] >= 40 and record["training_attempts"] == 2
    _assert_changed(_weights(tiny_model_path, "unet"), _weights(out, "unet"))
    _assert_changed(_weights(tiny_model_path, "text_encoder"), _weights(out, "text_encoder"))
    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    assert pipe("a sks dog", num_inference_steps=2, height=32, width=32).images[0].size == (32, 32)

    # --report-to tensorboard, read back with tensorboard's own reader: the resumed attempt's steps and grids.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs" / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    steps = [event.step for event in events.Scalars("loss")]
    assert steps[-1] == 40 and record["metrics"]["resumed_from"] + 1 in steps
    assert events.Scalars("loss")[-1].value == pytest.approx(record["metrics"]["loss"])
    assert [image.step for image in events.Images("validation")][-1] == 40
    assert (out / "validation" / "step-40.png").is_file()
