"""Experiment tracking of a training run: ``--report-to none|tensorboard|mlflow|wandb`` (diffusers' flag).

Owns: checking, before Ray starts anything, that the chosen backend can work here (``check_report_to``);
the one ``Tracker`` that rank 0 logs params, scalars and sample images to; where its files land; and
adding ``dreambooth eval`` measures to the same run later (``log_eval``).

Everything lands under ``<output>/logs``: ``tensorboard/`` (event files), ``mlruns/`` (an MLflow file
store, when MLFLOW_TRACKING_URI is unset), ``wandb/`` (wandb's run folders) and ``tracking.json`` (which
backend, run ids and the last step, so that ``log_eval`` finds the run). None of the backends writes
through fsspec, so a remote output (s3://, gs://, memory://, ...) is staged in a local temporary
folder and uploaded on ``close()``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import netrc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from dreambooth.config import REPORT_TO, ConfigError
from dreambooth.storage import download_dir, exists, is_local, join, local_path, read_json, upload_dir, write_json_atomic

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)


LOGS_DIR = "logs"
TENSORBOARD_DIR = "tensorboard"
MLRUNS_DIR = "mlruns"
STATE_FILE = "tracking.json"
DEFAULT_PROJECT = "dreambooth"
"""MLflow experiment and wandb project when MLFLOW_EXPERIMENT_NAME / WANDB_PROJECT are unset."""
EVAL_PREFIX = "eval/"
"""``log_eval`` names each measure ``eval/<measure>``, apart from the training scalars."""
WANDB_HOST = "api.wandb.ai"
WANDB_NO_LOGIN_MODES = ("offline", "disabled", "dryrun")
INSTALL_TRACK = "`pip install 'dreambooth[track]'`"


def _installed(module: str) -> bool:
    if module in sys.modules:  # None there marks a module whose import failed (or was blocked)
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def _wandb_logged_in() -> bool:
    """wandb can authenticate without a prompt: an API key, a no-login mode, or a netrc entry."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE", "").lower() in WANDB_NO_LOGIN_MODES:
        return True
    host = os.environ.get("WANDB_BASE_URL", f"https://{WANDB_HOST}").split("://", 1)[-1].split("/", 1)[0]
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")  # where `wandb login` writes the key
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check_report_to(report_to: str) -> None:
    """Raise a ConfigError naming the fix when ``report_to`` cannot work on this machine."""
    if report_to not in REPORT_TO:
        raise ConfigError(f"--report-to {report_to!r}: unknown tracker; choose one of {', '.join(REPORT_TO)}")
    if report_to == "tensorboard" and not (_installed("tensorboard") or _installed("tensorboardX")):
        raise ConfigError(f"--report-to tensorboard needs the `tensorboard` package: {INSTALL_TRACK} "
                          "(or `pip install tensorboard`)")
    if report_to == "mlflow" and not _installed("mlflow"):
        raise ConfigError(f"--report-to mlflow needs MLflow: {INSTALL_TRACK} (mlflow-skinny) or `pip install mlflow`")
    if report_to == "wandb":
        if not _installed("wandb"):
            raise ConfigError("--report-to wandb needs the `wandb` package: `pip install wandb`")
        if not _wandb_logged_in():
            raise ConfigError("--report-to wandb: no W&B credentials here; set WANDB_API_KEY (where the training "
                              "workers run too), run `wandb login`, or set WANDB_MODE=offline to keep the run under "
                              "<output>/logs/wandb (upload it later with `wandb sync`)")


def flatten(params: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"learning_rate": 1e-6}}`` (or a config dataclass) → ``{"train.learning_rate": 1e-6}``."""
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        params = dataclasses.asdict(params)
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, Mapping) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class _LogFolder:
    """``<output>/logs`` as a local folder: itself for a local output, else a temporary folder that
    ``publish`` uploads there."""

    def __init__(self, output: str) -> None:
        self.uri = join(output, LOGS_DIR)
        self.staged = not is_local(output)
        self.path = Path(tempfile.mkdtemp(prefix="dreambooth-logs-") if self.staged else local_path(self.uri))
        self.path.mkdir(parents=True, exist_ok=True)

    def fetch(self, sub: str) -> None:
        """Bring an existing remote ``<output>/logs/<sub>`` into the staging folder, to append to it."""
        if self.staged and exists(join(self.uri, sub)):
            download_dir(join(self.uri, sub), self.path / sub)

    def publish(self) -> None:
        if self.staged:
            upload_dir(self.path, self.uri)
            shutil.rmtree(self.path, ignore_errors=True)


class Tracker:
    """The ``none`` tracker, and the interface of the others: every method is a no-op."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log the run's configuration once; nested keys become ``section.field``."""

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Log scalars (loss, lr, ...) at an optimizer step."""

    def log_image(self, step: int, name: str, image: Image.Image) -> None:
        """Log one image (a sample grid) under ``name`` at a step."""

    def close(self) -> None:
        """Flush, record the last step, and upload the staged logs of a remote output."""

    def abandon(self) -> None:
        """End the run without writing to the output again (another run owns it now)."""


class _Backend(Tracker):
    """What the real trackers share: the log folder, the run's state file and the last step seen."""

    def __init__(self, output: str) -> None:
        self.output, self.folder, self.state = output, _LogFolder(output), {"last_step": 0}

    def _save_state(self, **fields: Any) -> None:
        self.state.update(fields)  # saved at open too, so that a crashed run's ids are findable
        write_json_atomic(join(self.output, LOGS_DIR, STATE_FILE), self.state)

    def _saw(self, step: int) -> None:
        self.state["last_step"] = max(self.state["last_step"], int(step))

    def _end_run(self) -> None:
        """Flush and end the backend's run."""

    def close(self) -> None:
        self._end_run()
        self._save_state()
        self.folder.publish()

    def abandon(self) -> None:
        self._end_run()
        if self.folder.staged:  # never uploaded: the output's logs are the newer run's
            shutil.rmtree(self.folder.path, ignore_errors=True)


def _summary_writer(log_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package
    except ImportError:
        from tensorboardX import SummaryWriter
    return SummaryWriter(log_dir=str(log_dir))


class _TensorboardTracker(_Backend):
    def __init__(self, output: str, run_name: str) -> None:
        super().__init__(output)
        self.writer = _summary_writer(self.folder.path / TENSORBOARD_DIR)
        self._save_state(report_to="tensorboard", run_name=run_name)

    def log_params(self, params: Mapping[str, Any]) -> None:
        # One markdown table in the Text tab: add_hparams would open a sub-run folder per call.
        rows = [f"| {key} | {str(value).replace('|', '/')} |" for key, value in sorted(flatten(params).items())]
        self.writer.add_text("params", "\n".join(["| param | value |", "|---|---|", *rows]), 0)

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, float(value), step)
        self._saw(step)

    def log_image(self, step: int, name: str, image: Image.Image) -> None:
        self.writer.add_image(name, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        self._saw(step)

    def _end_run(self) -> None:
        self.writer.close()  # flushes


def _mlflow_client(tracking_uri: str | None, folder: _LogFolder) -> tuple[Any, Path | None]:
    """A client of MLFLOW_TRACKING_URI, else of a file store in the log folder (returned with it)."""
    from mlflow.tracking import MlflowClient

    if tracking_uri:
        return MlflowClient(tracking_uri=tracking_uri), None
    # MLflow 3 keeps the file store in maintenance mode behind this opt-in; it needs no database driver.
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    store = (folder.path / MLRUNS_DIR).resolve()
    return MlflowClient(tracking_uri=store.as_uri()), store


def _relocate_artifacts(store: Path, final_uri: str) -> None:
    """A file store records absolute artifact URIs: point the staged ones at where they are uploaded."""
    for meta in store.rglob("meta.yaml"):
        text = meta.read_text()
        if store.as_uri() in text:
            meta.write_text(text.replace(store.as_uri(), final_uri))


class _MlflowTracker(_Backend):
    def __init__(self, output: str, run_name: str) -> None:
        super().__init__(output)
        tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or None
        self.client, self.store = _mlflow_client(tracking_uri, self.folder)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        self._save_state(report_to="mlflow", run_name=run_name, mlflow_run_id=self.run_id,
                         mlflow_tracking_uri=tracking_uri)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in flatten(params).items()])

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        _log_mlflow_metrics(self.client, self.run_id, step, scalars)
        self._saw(step)

    def log_image(self, step: int, name: str, image: Image.Image) -> None:
        self.client.log_image(self.run_id, image, artifact_file=f"{name}/step_{step:06d}.png")
        self._saw(step)

    def _end_run(self) -> None:
        self.client.set_terminated(self.run_id)
        if self.store is not None and self.folder.staged:
            _relocate_artifacts(self.store, join(self.folder.uri, MLRUNS_DIR))


def _log_mlflow_metrics(client: Any, run_id: str, step: int, scalars: Mapping[str, float]) -> None:
    from mlflow.entities import Metric

    now_ms = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now_ms, int(step)) for k, v in scalars.items()])


def _plain(value: Any) -> Any:
    return value if isinstance(value, (bool, int, float, str, type(None))) else str(value)


class _WandbTracker(_Backend):
    def __init__(self, output: str, run_name: str) -> None:
        import wandb

        super().__init__(output)
        self.wandb, project = wandb, os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
        self.run = wandb.init(project=project, name=run_name, dir=str(self.folder.path))
        self._save_state(report_to="wandb", run_name=run_name, wandb_run_id=self.run.id, wandb_project=project)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.run.config.update({k: _plain(v) for k, v in flatten(params).items()}, allow_val_change=True)

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self.run.log({k: float(v) for k, v in scalars.items()}, step=step)
        self._saw(step)

    def log_image(self, step: int, name: str, image: Image.Image) -> None:
        self.run.log({name: self.wandb.Image(image)}, step=step)
        self._saw(step)

    def _end_run(self) -> None:
        self.run.finish()


_TRACKERS = {"tensorboard": _TensorboardTracker, "mlflow": _MlflowTracker, "wandb": _WandbTracker}


def open_tracker(report_to: str, output: str, run_name: str) -> Tracker:
    """The tracker of one training run writing under ``<output>/logs`` (call from rank 0 only)."""
    check_report_to(report_to)
    return _TRACKERS[report_to](str(output), run_name) if report_to != "none" else Tracker()


def log_eval(output: str, report_to: str, measures: Mapping[str, float]) -> None:
    """Add ``dreambooth eval`` measures, as ``eval/<name>`` at the run's last step, to the run it tracked."""
    check_report_to(report_to)
    if report_to == "none":
        return
    output, state_uri = str(output), join(str(output), LOGS_DIR, STATE_FILE)
    state = read_json(state_uri) if exists(state_uri) else {}
    if state.get("report_to") != report_to:
        log.warning("%s was not tracked with --report-to %s (its %s says %r): eval measures not logged there",
                    output, report_to, join(LOGS_DIR, STATE_FILE), state.get("report_to"))
        return
    step, scalars = int(state.get("last_step", 0)), {f"{EVAL_PREFIX}{k}": float(v) for k, v in measures.items()}
    folder = _LogFolder(output)
    try:
        if report_to == "tensorboard":
            writer = _summary_writer(folder.path / TENSORBOARD_DIR)  # a new event file beside the run's
            for name, value in scalars.items():
                writer.add_scalar(name, value, step)
            writer.close()
        elif report_to == "mlflow":
            if not state.get("mlflow_tracking_uri"):
                folder.fetch(MLRUNS_DIR)
            client, _ = _mlflow_client(state.get("mlflow_tracking_uri"), folder)
            _log_mlflow_metrics(client, state["mlflow_run_id"], step, scalars)
        else:
            _wandb_eval(state, folder, scalars)
        folder.publish()
    finally:
        if folder.staged:
            shutil.rmtree(folder.path, ignore_errors=True)


def _wandb_eval(state: Mapping[str, Any], folder: _LogFolder, scalars: Mapping[str, float]) -> None:
    import wandb

    try:  # an offline run, or one deleted on the server, cannot be resumed
        run = wandb.init(project=state["wandb_project"], id=state["wandb_run_id"], resume="must", dir=str(folder.path))
    except Exception as exc:
        log.warning("cannot resume wandb run %s (%s: %s): eval measures not logged to wandb",
                    state["wandb_run_id"], type(exc).__name__, exc)
        return
    run.summary.update(dict(scalars))  # the runs table shows summaries; log() would need a later step
    run.finish()
