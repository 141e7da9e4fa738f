"""The queue that feeds warm worker groups: subjects handed out one at a time, with their fate.

A warm worker group (one per concurrency slot) loads the base model once and then asks this queue
for subject after subject. The queue remembers which subject each slot holds until the slot says
how it ended, so a worker group that Ray Train restarted after losing a worker gets *the same*
subject back and resumes it from its checkpoint. A subject whose training raised is handed out
again, up to ``max_retries`` more times, while the slot goes on with other subjects.

``SubjectQueue`` is plain Python (tested as such); ``remote_queue`` makes it a Ray actor that
takes no CPU. States: pending → running → succeeded | retrying → running … | failed.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Optional

from dreambooth.config import RunConfig
from dreambooth.priors import PriorSet
from dreambooth.subjects import SubjectImage


@dataclass
class SubjectWork:
    """One subject for a warm worker group (pickled to the workers)."""

    name: str
    """The subject's name (its folder in a bulk output)."""
    config: RunConfig
    """The subject's validated config; its ``output`` is where the pipeline and checkpoints go."""
    model_path: str
    """The resolved base model (local folder or hub snapshot) every subject of a group shares."""
    prior_set: Optional[PriorSet]
    """The subject's class priors (a complete cache), or None without prior preservation."""
    record: dict = field(default_factory=dict)
    """Run-record fields the driver knows (identifier, prompts, priors, driver timings)."""
    images: list[SubjectImage] = field(default_factory=list)
    """The photos, when the driver already read them (a local folder the workers may not see);
    empty: each worker reads ``config.subject.instance_dir`` itself."""


@dataclass
class SubjectState:
    """What happened to one subject so far (the bulk summary's source)."""

    name: str
    status: str = "pending"  # pending | running | retrying | succeeded | failed
    attempts: int = 0
    """Times the subject was handed out fresh (1 + retries after a failure)."""
    restarts: int = 0
    """Worker-group restarts (a lost worker) that resumed this subject from its checkpoint."""
    resumed_from: int = 0
    """The checkpoint step the last restart resumed from (0: none)."""
    slot: Optional[int] = None
    started_unix: Optional[float] = None
    finished_unix: Optional[float] = None
    error: Optional[str] = None
    record: Optional[dict] = None
    """The run record, once succeeded."""


class SubjectQueue:
    """Hands subjects to slots; every method is cheap (it runs inside one actor)."""

    def __init__(self, works: list[SubjectWork], max_retries: int, max_restarts: int):
        self.works = {w.name: w for w in works}
        self.states = {w.name: SubjectState(w.name) for w in works}
        self.pending = [w.name for w in works]
        self.holding: dict[int, str] = {}
        self.max_retries = max_retries
        self.max_restarts = max_restarts
        self._restarts_this_attempt: dict[str, int] = {}
        self._group_errors: dict[str, str] = {}
        """Why the group now training a subject is failing: its first report (later ones are its
        peers seeing the broken collective); none when a worker died without a word."""
        self._events: list[SubjectState] = []
        """A copy of a subject's state at each of its changes, in order (``changes_since`` reads them)."""

    def _changed(self, name: str) -> None:
        self._events.append(dataclasses.replace(self.states[name]))

    def take(self, slot: int) -> Optional[SubjectWork]:
        """The slot's current subject again (after a restart), else the next pending one; None when done.

        A subject whose attempt has restarted its group more than ``max_restarts`` times (it fails
        inside its training steps every time) fails that attempt instead, and the slot goes on.
        """
        name = self.holding.get(slot)
        if name is not None:
            cause = self._group_errors.pop(name, None) or "a lost worker"
            self.states[name].restarts += 1
            self._restarts_this_attempt[name] = self._restarts_this_attempt.get(name, 0) + 1
            if self._restarts_this_attempt[name] <= self.max_restarts:
                self._changed(name)
                return self.works[name]
            self.failed(slot, name, f"its worker group failed {self._restarts_this_attempt[name]} times while "
                                    f"training it (last: {cause})")
        if not self.pending:
            return None
        name = self.pending.pop(0)
        self._restarts_this_attempt[name] = 0
        state = self.states[name]
        state.status, state.slot, state.attempts = "running", slot, state.attempts + 1
        state.started_unix = state.started_unix or time.time()
        self.holding[slot] = name
        self._changed(name)
        return self.works[name]

    def group_raised(self, slot: int, name: str, error: str) -> None:
        """A rank of the slot's group raised inside subject ``name``'s training steps (the group fails
        and is restarted): keep the first such error, so a subject that fails for good says why
        rather than 'a lost worker'. A late report, once the slot holds another subject, is dropped."""
        if self.holding.get(slot) == name and name not in self._group_errors:
            self._group_errors[name] = error

    def resumed(self, name: str, step: int) -> None:
        self.states[name].resumed_from = step
        self._changed(name)

    def finished(self, slot: int, name: str, record: dict) -> None:
        state = self.states[name]
        state.status, state.error, state.record, state.finished_unix = "succeeded", None, record, time.time()
        self.holding.pop(slot, None)
        self._changed(name)

    def failed(self, slot: int, name: str, error: str, retry: bool = True) -> None:
        """The subject's attempt raised: hand it out again unless it has used its retries (or
        ``retry`` is False: another attempt would fail alike, or do harm)."""
        state = self.states[name]
        state.error, state.finished_unix = error, time.time()
        self.holding.pop(slot, None)
        self._group_errors.pop(name, None)
        if retry and state.attempts <= self.max_retries:
            state.status = "retrying"
            self.pending.append(name)
        else:
            state.status = "failed"
        self._changed(name)

    def slot_lost(self, slot: int, error: str) -> bool:
        """The slot's worker group gave up (out of restarts): its subject fails this attempt.

        Returns whether the slot held a subject (a group that dies before taking one, e.g. while
        loading the model, would die again: the caller stops starting groups then).
        """
        name = self.holding.get(slot)
        if name is not None:
            self.failed(slot, name, error)
        return name is not None

    def fail_pending(self, error: str) -> None:
        """No worker group can run: every subject not yet handed out fails with ``error``."""
        for name in self.pending:
            state = self.states[name]
            state.status, state.error, state.finished_unix = "failed", error, time.time()
            self._changed(name)
        self.pending = []

    def has_pending(self) -> bool:
        return bool(self.pending)

    def snapshot(self) -> dict[str, SubjectState]:
        return dict(self.states)

    def changes_since(self, cursor: int) -> tuple[int, list[SubjectState]]:
        """The states at each change after the first ``cursor`` changes, and the new cursor: a driver
        that polls sees every transition (pending → running → succeeded), however fast."""
        return len(self._events), self._events[cursor:]


def remote_queue(works: list[SubjectWork], max_retries: int, max_restarts: int):
    """A ``SubjectQueue`` actor that needs no CPU (it only answers the slots' calls)."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(SubjectQueue).remote(works, max_retries, max_restarts)
