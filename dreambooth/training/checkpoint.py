"""Resumable checkpoints of one subject's training, in the subject's own output folder.

Owns the on-disk layout of ``<output>/checkpoints/``:

    step-000100-<claim>/ every rank's ZeRO shard (DeepSpeed's files, tag ``zero``) + ``progress.json``;
                         ``<claim>`` starts the id of the attempt that wrote it (older versions: none)
    attempts/<id>.json   one per training attempt: {"start_step", "step"} (how far it got), so the
                         run record can say how many steps a failure made us redo
    writer.json          the claim of the attempt that may write here now: {"claim_id", ...}

A checkpoint is complete when ``progress.json`` exists and every file it lists does: every rank
uploads its shard, all ranks meet at a barrier, and only then rank 0 writes it. Restarted workers
(a worker group that lost a worker) and a new driver run with the same output resume from the
newest complete one. ``progress.json`` also holds the settings the state was trained with
(``trained_settings``): a re-run with other settings is refused before it takes cluster time
(``check_resumable``), rather than resuming weights and optimizer state that mean something else.

One writer per output: each attempt claims the output before it restores (the newest claim wins),
and checks its claim before every save, before the export and before the run record. A driver
killed with SIGKILL leaves its workers training for a moment; without the claim they would go on
saving, pruning and even exporting into the folder the next attempt is resuming from. An older
attempt whose check passed just before the newer claim still finishes that one upload, but into
a folder of its own (the step folders carry their writer's claim, so two attempts never write the
same files), which its check after the upload keeps it from marking complete. (Left open: a claim
taken between that check and the mark, milliseconds, lets the older attempt complete that one
folder and prune once; the newest complete folder of a step is the one resumed.)

The checkpoints are the project's own, not Ray Train's: a warm worker group trains many subjects
one after another, and each subject's checkpoints belong in that subject's output.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import asdict
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch
import torch.distributed as dist

from dreambooth import storage

if TYPE_CHECKING:
    from dreambooth.config import RunConfig

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
PROGRESS = "progress.json"
ATTEMPTS = "attempts"
WRITER = "writer.json"
DEEPSPEED_TAG = "zero"
KEEP = 2
"""Complete checkpoints kept per subject (the newest ones)."""

CLAIM_TAG = 8
"""Characters of the claim id in a step folder's name (random hex: two attempts never share them)."""

_STEP_DIR = re.compile(r"step-(\d{6,})(?:-[0-9a-f]+)?$")


RESUMABLE_CHANGES = frozenset({"max_train_steps", "checkpointing_steps", "max_failures", "log_every", "launcher",
                               "use_gpu", "cpus_per_worker", "gradient_checkpointing"})
"""Train settings a re-run may change and still resume: how long and where it trains, not what the
state it resumes means (``max_train_steps`` only with a constant learning rate: the other schedules
are shaped by it)."""

CONSTANT_SCHEDULES = ("constant", "constant_with_warmup")

_UNTRAINED_SUBJECT = frozenset({"instance_dir", "identifier_seed"})  # a path; the draw behind ``identifier``
_UNTRAINED_PRIOR = frozenset({"prior_output", "prior_actors", "prior_batch_size"})  # where and how fast


def trained_settings(cfg: RunConfig) -> dict:
    """What a checkpoint's weights and optimizer state depend on, by field name (JSON values): the
    model, the subject's words, the priors and every train setting but ``RESUMABLE_CHANGES``."""
    resumable = RESUMABLE_CHANGES if cfg.train.lr_scheduler in CONSTANT_SCHEDULES else RESUMABLE_CHANGES - {"max_train_steps"}
    settings = {"model": cfg.model, "revision": cfg.revision}
    sections = ((cfg.subject, _UNTRAINED_SUBJECT), (cfg.prior, _UNTRAINED_PRIOR), (cfg.train, resumable))
    for section, untrained in sections:
        settings.update({name: value for name, value in asdict(section).items() if name not in untrained})
    return json.loads(json.dumps(settings))  # as progress.json gives them back (tuples as lists)


class Complete(NamedTuple):
    """A complete checkpoint folder."""

    step: int
    name: str
    saved_unix: float
    settings: Optional[dict]
    """``trained_settings`` of the run that saved it (None: a version that did not record them)."""


def unfinished(output: str) -> Optional[Complete]:
    """The newest complete checkpoint of an unfinished run in ``output`` (the one a run resumes), or None."""
    complete = _complete_folders(output)
    return complete[-1] if complete else None


def check_resumable(cfg: RunConfig, newest: Optional[Complete]) -> None:
    """Raise ``ConfigError`` if the run of ``cfg`` cannot resume ``newest`` (``unfinished(cfg.output)``):
    it was trained with other settings, or already went past ``max_train_steps``. Settings a version
    did not record, or that a newer version added, are not compared."""
    from dreambooth.config import ConfigError

    if newest is None:
        return
    fix = ("Run it again with that run's settings to resume it, or start it over: --overwrite for `dreambooth run`, "
           "overwrite: true on this subject in a bulk manifest")
    where = f"{cfg.output} holds the checkpoints of an unfinished run (step {newest.step})"
    if newest.step >= cfg.train.max_train_steps:
        raise ConfigError(f"{where}, already at or past --max-train-steps {cfg.train.max_train_steps}. {fix}")
    if not newest.settings:
        return
    settings = trained_settings(cfg)
    before = dict(newest.settings)
    if isinstance(before.get("model"), str) and storage.absolute(before["model"]) == settings["model"]:
        before["model"] = settings["model"]  # a local folder recorded as typed, before runs recorded it absolute
    changed = [key for key in sorted(before.keys() & settings.keys()) if before[key] != settings[key]]
    if changed:
        differences = "; ".join(f"{key} {before[key]!r} there, {settings[key]!r} now" for key in changed[:5])
        raise ConfigError(f"{where} trained with other settings: {differences}{' ...' if len(changed) > 5 else ''}. "
                          f"{fix}")


class OutputTakenOver(Exception):
    """A newer training attempt claimed this output: this one must not write to it again (and
    retrying would only take it back from the newer one)."""


def checkpoints_uri(output: str) -> str:
    return storage.join(output, CHECKPOINTS)


def step_dir_name(step: int, claim_id: str) -> str:
    return f"step-{step:06d}-{claim_id[:CLAIM_TAG]}"


class AttemptLog:
    """Rank 0's record of one training attempt: where it started and how far it got.

    ``reached(step)`` only hands the step to a writer thread, which writes the newest one it has
    (older ones are skipped): a write to an object store takes tens of milliseconds, which would
    otherwise be added to every training step. A killed worker loses at most the write in flight,
    so the run record's count of redone steps stays exact to a step or so.
    """

    def __init__(self, output: str, start_step: int, claim_id: str):
        self.uri = storage.join(checkpoints_uri(output), ATTEMPTS, f"{claim_id}.json")
        self.start_step = start_step
        self._latest: Optional[int] = None
        self._closed = False
        self._changed = threading.Condition()
        self._writer = threading.Thread(target=self._write_latest, name="attempt-log", daemon=True)
        self._writer.start()

    def reached(self, step: int) -> None:
        with self._changed:
            self._latest = step
            self._changed.notify()

    def close(self) -> None:
        """Write the last step reached and stop the writer."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._writer.join()

    def _write_latest(self) -> None:
        written = None
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._closed or self._latest != written)
                step, closed = self._latest, self._closed
            if step != written:
                try:
                    storage.write_json_atomic(self.uri, {"start_step": self.start_step, "step": step})
                except Exception as exc:  # bookkeeping: the run record's step counts, not the model
                    log.warning("could not record training progress in %s: %s", self.uri, exc)
                written = step
            if closed:
                return


def steps_run(output: str) -> tuple[int, int]:
    """(optimizer steps executed over all attempts, number of attempts) of a run's training."""
    fs, path = storage.filesystem(storage.join(checkpoints_uri(output), ATTEMPTS))
    if not fs.exists(path):
        return 0, 0
    attempts = [storage.read_json(storage.join(checkpoints_uri(output), ATTEMPTS, f.rsplit("/", 1)[-1]))
                for f in fs.ls(path, detail=False) if f.endswith(".json")]
    return sum(a["step"] - a["start_step"] for a in attempts), len(attempts)


def complete_steps(output: str) -> list[int]:
    """Steps of the complete checkpoints in ``output``, oldest first."""
    return [found.step for found in _complete_folders(output)]


def _complete_folders(output: str) -> list[Complete]:
    """The complete checkpoints in ``output``, oldest first (by step, then by when they were saved).

    Complete: ``progress.json`` is there and so is every file it lists. A step whose files went
    missing (pruned by another writer, a partial copy) is skipped with a warning, and the resume
    falls back to an older one rather than failing on a missing shard.
    """
    complete = []
    for step, name in _step_folders(output):
        folder = storage.join(checkpoints_uri(output), name)
        present = set(_files_under(folder))  # one listing, not a request per file (object stores)
        if PROGRESS not in present:
            continue
        try:
            progress = storage.read_json(storage.join(folder, PROGRESS))
        except (FileNotFoundError, ValueError):  # removed or half-written while we looked
            continue
        missing = sorted(set(progress.get("files", [])) - present)
        if missing:
            log.warning("checkpoint %s is incomplete (missing %s); not resuming from it", name,
                        ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else ""))
            continue
        complete.append(Complete(step, name, progress.get("saved_unix", 0.0), progress.get("settings")))
    return sorted(complete, key=lambda found: (found.step, found.saved_unix, found.name))


def _step_folders(output: str) -> list[tuple[int, str]]:
    """(step, folder name) of every ``step-*`` folder, complete or not, oldest first."""
    fs, path = storage.filesystem(checkpoints_uri(output))
    if not fs.exists(path):
        return []
    names = (entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False))
    return sorted((int(match.group(1)), name) for name in names if (match := _STEP_DIR.fullmatch(name)))


def _files_under(uri: str) -> list[str]:
    """Relative paths of the files under ``uri``, sorted."""
    fs, path = storage.filesystem(uri)
    root = path.rstrip("/")
    return sorted(found[len(root) + 1:] for found in fs.find(root))


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast(value):
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def claim(output: str) -> str:
    """All ranks: make this attempt the only one that may write ``output``'s checkpoints, export
    and run record; returns the claim's id (the same on every rank). The newest claim wins."""
    def write() -> str:
        claim_id = uuid.uuid4().hex
        storage.write_json_atomic(storage.join(checkpoints_uri(output), WRITER), {
            "claim_id": claim_id, "claimed_unix": time.time(), "host": socket.gethostname(), "pid": os.getpid()})
        return claim_id

    return _on_rank_0(write, f"could not claim {output} for this run")


def holds_claim(output: str, claim_id: str) -> bool:
    """Whether ``claim_id`` is still the output's writer (a read, on the calling rank alone).

    Only a missing claim file counts as lost (an ``--overwrite`` removed it); any other read error
    (a timeout, a reset connection) is raised, so that a network blip is a retryable failure, not
    a run stopped for good."""
    try:
        return storage.read_json(storage.join(checkpoints_uri(output), WRITER)).get("claim_id") == claim_id
    except FileNotFoundError:
        return False


def taken_over(output: str, when: str) -> OutputTakenOver:
    return OutputTakenOver(
        f"another run started training into {output} after this one (see "
        f"{storage.join(checkpoints_uri(output), WRITER)}); this run stopped {when}. "
        "Two runs on one output resume from the same checkpoints: let one finish, or give each its own --output")


def check_claim(output: str, claim_id: str, when: str = "without writing to it again") -> None:
    """All ranks alike: raise ``OutputTakenOver`` if a newer attempt claimed ``output`` (rank 0 reads)."""
    if not _on_rank_0(lambda: holds_claim(output, claim_id), f"could not read the claim on {output}"):
        raise taken_over(output, when)


def _on_rank_0(action, failure: str):
    """Rank 0's ``action()`` result on every rank; if it raised, every rank raises alike (an
    ``OSError`` naming ``failure``), instead of rank 0 alone while the others wait in a collective."""
    outcome = None
    if _rank_world()[0] == 0:
        try:
            outcome = ("ok", action())
        except Exception as exc:  # raised below, on every rank
            outcome = ("error", f"{failure}: {type(exc).__name__}: {exc}")
    kind, value = broadcast(outcome)
    if kind == "error":
        raise OSError(value)
    return value


def save_resumable(engine, output: str, step: int, claim_id: str, settings: Optional[dict] = None) -> None:
    """All ranks: save the ZeRO state as ``step-<step>-<claim>`` (complete once rank 0 marks it, with
    ``settings``: ``trained_settings`` of the run), keep the newest ``KEEP``. Raises
    ``OutputTakenOver``, before writing anything, if ``claim_id`` lost its claim."""
    check_claim(output, claim_id)
    name = step_dir_name(step, claim_id)
    target = storage.join(checkpoints_uri(output), name)
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=DEEPSPEED_TAG, client_state={"step": step})
        storage.upload_dir(tmp, target)  # each rank its own shard files (rank 0 also the common ones)
    _barrier()

    def mark_and_prune() -> bool:
        # Checked again: a claim taken during the upload must not see this attempt mark or prune steps.
        if not holds_claim(output, claim_id):
            return False
        files = [name for name in _files_under(target) if name != PROGRESS]
        storage.write_json_atomic(storage.join(target, PROGRESS),
                                  {"step": step, "saved_unix": time.time(), "claim_id": claim_id, "files": files,
                                   "settings": settings})
        _prune(output)
        return True

    if not _on_rank_0(mark_and_prune, f"could not complete checkpoint {name} of {output}"):
        raise taken_over(output, f"before completing {name}")


def _prune(output: str) -> None:
    """Remove every step folder older than the ``KEEP`` newest complete ones (incomplete ones too)."""
    complete = sorted(set(complete_steps(output)))
    if len(complete) < KEEP:
        return
    for step, name in _step_folders(output):
        if step < complete[-KEEP]:
            storage.remove(storage.join(checkpoints_uri(output), name))


def restore(engine, output: str) -> int:
    """All ranks: load the newest complete checkpoint of ``output`` into ``engine``; return its step (0: none)."""
    complete = _on_rank_0(lambda: _complete_folders(output), f"could not list the checkpoints of {output}")
    if not complete:
        return 0
    source = storage.join(checkpoints_uri(output), complete[-1].name)
    with tempfile.TemporaryDirectory() as tmp:
        folder = storage.local_path(source) if storage.is_local(source) else str(storage.download_dir(source, tmp))
        _, client_state = engine.load_checkpoint(folder, tag=DEEPSPEED_TAG)
    _barrier()
    return int(client_state["step"])


def gathered_state_dict(engine) -> Optional[dict[str, torch.Tensor]]:
    """All ranks call this; rank 0 gets the full fp32 state dict of ``engine.module`` (ZeRO-3 shards
    gathered), others None."""
    import contextlib

    import deepspeed

    rank, _ = _rank_world()
    module = engine.module
    params = list(module.parameters())
    sharded = engine.zero_optimization_stage() == 3
    context = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if sharded else contextlib.nullcontext()
    with context:
        if rank != 0:
            return None
        return {k: v.detach().to(torch.float32).cpu().clone() for k, v in module.state_dict().items()}

