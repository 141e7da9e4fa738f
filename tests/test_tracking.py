"""``--report-to``: each backend's files read back with the backend's own reader; no Ray, no models."""

from __future__ import annotations

import io
import json
import sys
import types
import uuid
from pathlib import Path

import fsspec
import pytest
from PIL import Image

from dreambooth import tracking
from dreambooth.config import ConfigError
from dreambooth.tracking import REPORT_TO, check_report_to, log_eval, open_tracker

PARAMS = {"train": {"learning_rate": 1e-6, "max_train_steps": 3}, "subject": {"class_noun": "dog"}, "seed": 7}
FLAT_PARAMS = {"train.learning_rate": "1e-06", "train.max_train_steps": "3", "subject.class_noun": "dog", "seed": "7"}
SCALAR_NAMES = ("loss", "instance_loss", "prior_loss", "lr", "step_seconds")
IMAGE_SIZE = (16, 12)


def scalars_at(step: int) -> dict[str, float]:
    """Distinct, exactly representable values per name and step, so a mix-up shows."""
    return {name: step + index / 4 for index, name in enumerate(SCALAR_NAMES)}


def log_a_run(tracker: tracking.Tracker) -> None:
    tracker.log_params(PARAMS)
    for step in (1, 2, 3):
        tracker.log_scalars(step, scalars_at(step))
    tracker.log_image(3, "samples", Image.new("RGB", IMAGE_SIZE, (255, 0, 0)))
    tracker.close()


def read_tensorboard(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


@pytest.fixture
def no_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)


def test_tensorboard_event_files_read_back(tmp_path):
    log_a_run(open_tracker("tensorboard", str(tmp_path), "dog-run"))
    events = read_tensorboard(tmp_path / "logs" / "tensorboard")
    assert set(SCALAR_NAMES) <= set(events.Tags()["scalars"])
    for name in SCALAR_NAMES:
        assert [(e.step, e.value) for e in events.Scalars(name)] == [(s, scalars_at(s)[name]) for s in (1, 2, 3)]
    [image] = events.Images("samples")
    assert (image.step, image.width, image.height) == (3, *IMAGE_SIZE)
    assert Image.open(io.BytesIO(image.encoded_image_string)).getpixel((0, 0)) == (255, 0, 0)
    [text] = events.Tensors("params/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    assert "| train.learning_rate | 1e-06 |" in table and "| subject.class_noun | dog |" in table

    log_eval(str(tmp_path), "tensorboard", {"clip_i": 0.75, "dino": 0.5})
    events = read_tensorboard(tmp_path / "logs" / "tensorboard")
    assert [(e.step, e.value) for e in events.Scalars("eval/clip_i")] == [(3, 0.75)]
    assert [(e.step, e.value) for e in events.Scalars("eval/dino")] == [(3, 0.5)]
    assert len(events.Scalars("loss")) == 3  # the eval file did not purge the training scalars


def read_mlflow(store: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("dreambooth").experiment_id])
    return client, run


def test_mlflow_file_store_read_back(tmp_path, no_tracking_uri):
    log_a_run(open_tracker("mlflow", str(tmp_path), "dog-run"))
    client, run = read_mlflow(tmp_path / "logs" / "mlruns")
    assert run.info.run_name == "dog-run" and run.info.status == "FINISHED"
    state = json.loads((tmp_path / "logs" / "tracking.json").read_text())
    assert state["mlflow_run_id"] == run.info.run_id and state["last_step"] == 3
    assert run.data.params == FLAT_PARAMS
    for name in SCALAR_NAMES:
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted((m.step, m.value) for m in history) == [(s, scalars_at(s)[name]) for s in (1, 2, 3)]
    [artifact] = client.list_artifacts(run.info.run_id, "samples")
    assert artifact.path == "samples/step_000003.png" and artifact.file_size > 0

    log_eval(str(tmp_path), "mlflow", {"clip_i": 0.75})
    client, run_after = read_mlflow(tmp_path / "logs" / "mlruns")
    assert run_after.info.run_id == run.info.run_id  # the same run, not a new one
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/clip_i")] == [(3, 0.75)]


def test_mlflow_on_a_remote_output_is_uploaded_and_reopened(tmp_path, no_tracking_uri):
    output = f"memory://tracking-{uuid.uuid4().hex}/run"
    fs = fsspec.filesystem("memory")
    try:
        log_a_run(open_tracker("mlflow", output, "dog-run"))
        log_eval(output, "mlflow", {"dino": 0.5})
        fs.get(output.split("://", 1)[1] + "/logs/", str(tmp_path / "logs"), recursive=True)
        client, run = read_mlflow(tmp_path / "logs" / "mlruns")
        assert len(client.get_metric_history(run.info.run_id, "loss")) == 3
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/dino")] == [(3, 0.5)]
        assert run.info.artifact_uri.startswith(f"{output}/logs/mlruns/")  # not the deleted staging folder
    finally:
        fs.rm(output.split("://", 1)[1].split("/")[0], recursive=True)


def test_remote_output_uploads_tensorboard_logs_on_close(tmp_path):
    output = f"memory://tracking-{uuid.uuid4().hex}/run"
    fs, root = fsspec.filesystem("memory"), output.split("://", 1)[1]
    try:
        tracker = open_tracker("tensorboard", output, "dog-run")
        tracker.log_scalars(1, scalars_at(1))
        assert not fs.glob(f"{root}/logs/tensorboard/*")  # staged locally until close
        staging = tracker.folder.path
        tracker.close()
        files = fs.glob(f"{root}/logs/tensorboard/events.out.tfevents.*")
        assert files and all(fs.size(f) > 0 for f in files)
        assert not staging.exists()
        fs.get(f"{root}/logs/tensorboard/", str(tmp_path / "tb"), recursive=True)
        assert [e.value for e in read_tensorboard(tmp_path / "tb").Scalars("loss")] == [1.0]
    finally:
        fs.rm(root.split("/")[0], recursive=True)


def test_an_abandoned_tracker_leaves_a_remote_outputs_logs_to_the_run_that_took_it_over():
    """A run another run took over ends its tracker without uploading its logs or its state."""
    output = f"memory://tracking-{uuid.uuid4().hex}/run"
    fs, root = fsspec.filesystem("memory"), output.split("://", 1)[1]
    try:
        tracker = open_tracker("tensorboard", output, "dog-run")
        state_at_open = fs.cat(f"{root}/logs/{tracking.STATE_FILE}")
        tracker.log_scalars(7, scalars_at(7))
        staging = tracker.folder.path
        tracker.abandon()
        assert not fs.glob(f"{root}/logs/tensorboard/*") and not staging.exists()
        assert fs.cat(f"{root}/logs/{tracking.STATE_FILE}") == state_at_open  # last_step not moved to 7
    finally:
        fs.rm(root.split("/")[0], recursive=True)


def test_none_tracker_writes_nothing(tmp_path):
    tracker = open_tracker("none", str(tmp_path), "dog-run")
    assert type(tracker) is tracking.Tracker
    log_a_run(tracker)
    log_eval(str(tmp_path), "none", {"clip_i": 0.75})
    assert list(tmp_path.iterdir()) == []


def test_eval_on_a_run_tracked_otherwise_logs_nothing(tmp_path, no_tracking_uri, caplog):
    log_a_run(open_tracker("tensorboard", str(tmp_path), "dog-run"))
    log_eval(str(tmp_path), "mlflow", {"clip_i": 0.75})
    assert not (tmp_path / "logs" / "mlruns").exists()
    assert "was not tracked with --report-to mlflow" in caplog.text


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ConfigError) as error:
        check_report_to("comet")
    assert all(name in str(error.value) for name in REPORT_TO)
    with pytest.raises(ConfigError):
        open_tracker("comet", "/tmp/never-created", "x")
    assert not Path("/tmp/never-created").exists()


def test_installed_backends_pass_the_check():
    for name in ("none", "tensorboard", "mlflow"):
        check_report_to(name)


def test_missing_packages_name_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match="pip install wandb"):
        check_report_to("wandb")
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ConfigError, match=r"dreambooth\[track\]"):
        check_report_to("mlflow")
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(ConfigError, match=r"dreambooth\[track\]"):
        check_report_to("tensorboard")


@pytest.fixture
def fake_wandb(monkeypatch, tmp_path):
    """A stand-in ``wandb`` module recording its calls; no credentials anywhere (HOME is empty)."""
    calls: list[tuple] = []

    class Run:
        id = "run123"
        config = types.SimpleNamespace(update=lambda values, **kw: calls.append(("config", values)))
        summary = types.SimpleNamespace(update=lambda values: calls.append(("summary", values)))

        def log(self, values, step=None):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    module = types.ModuleType("wandb")
    module.init = lambda **kwargs: calls.append(("init", kwargs)) or Run()
    module.Image = lambda image: ("Image", image.size)
    module.calls = calls
    monkeypatch.setitem(sys.modules, "wandb", module)
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_PROJECT", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return module


def test_wandb_without_credentials_names_the_ways_to_log_in(fake_wandb):
    with pytest.raises(ConfigError) as error:
        check_report_to("wandb")
    assert all(fix in str(error.value) for fix in ("WANDB_API_KEY", "wandb login", "WANDB_MODE=offline"))


@pytest.mark.parametrize("how", ["api_key", "offline", "netrc"])
def test_wandb_credentials_pass_the_check(fake_wandb, monkeypatch, how):
    if how == "api_key":
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    elif how == "offline":
        monkeypatch.setenv("WANDB_MODE", "offline")
    else:
        netrc_file = Path.home() / ".netrc"
        netrc_file.write_text("machine api.wandb.ai\n  login user\n  password secret\n")
        netrc_file.chmod(0o600)
    check_report_to("wandb")


def test_wandb_tracker_calls(fake_wandb, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    output = tmp_path / "out"
    log_a_run(open_tracker("wandb", str(output), "dog-run"))
    calls = fake_wandb.calls
    assert calls[0] == ("init", {"project": "dreambooth", "name": "dog-run", "dir": str(output / "logs")})
    assert ("config", {**FLAT_PARAMS, "train.learning_rate": 1e-6, "train.max_train_steps": 3, "seed": 7}) in calls
    assert [c[1] for c in calls if c[0] == "log"] == [1, 2, 3, 3]
    assert ("log", 3, {"samples": ("Image", IMAGE_SIZE)}) in calls and calls[-1] == ("finish",)

    log_eval(str(output), "wandb", {"clip_i": 0.75})
    resume = calls[calls.index(("finish",)) + 1]
    assert resume[0] == "init" and resume[1]["id"] == "run123" and resume[1]["resume"] == "must"
    assert ("summary", {"eval/clip_i": 0.75}) in calls
