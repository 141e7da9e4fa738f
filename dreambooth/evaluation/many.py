"""``dreambooth eval --output <bulk output>``: score every finished subject of a bulk run.

Owns finding a bulk run's subjects (its ``bulk-summary.json``), scoring each one as ``dreambooth eval``
scores a single run (``runner.evaluate``: each subject's own ``eval.json``), and the one table and
``<bulk output>/eval-summary.json`` that say which subjects came out well and which need another
recipe. A subject that cannot be scored (failed training, a run record gone) is listed with the reason;
the others are still scored.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from dreambooth import storage
from dreambooth.config import ConfigError
from dreambooth.evaluation.runner import EvalOptions, evaluate

log = logging.getLogger(__name__)

BULK_SUMMARY = "bulk-summary.json"
"""Written by ``dreambooth bulk`` at its output root (``bulk.SUMMARY``)."""
EVAL_SUMMARY = "eval-summary.json"
"""This module's summary, beside the bulk summary."""
FINISHED = ("succeeded", "skipped")
"""Bulk states of a subject whose exported model is in place (skipped: finished by an earlier bulk)."""
KEY_MEASURES = {"shapes": ("subject_fidelity", "recontext_shown", "class_fidelity", "other_prompt_fidelity"),
                "dreambench": ("dino", "clip_t", "other_prompt_fidelity")}
"""The columns of the table, per suite (every measure is in each subject's eval.json)."""


@dataclass
class SubjectEval:
    """One subject's line: its scores and verdict, or why it was not scored."""

    name: str
    output: str
    suite: str = ""
    scores: dict | None = None
    verdict: list[dict] | None = None
    error: str = ""
    vae_carry: dict[str, float] | None = None
    """The shapes suite's ``vae_carry`` (``eval.json`` beside the scores)."""

    @property
    def misses(self) -> list[str]:
        return [f["measure"] for f in self.verdict or [] if f["status"] == "miss"]


def bulk_subjects(root: str) -> list[tuple[str, str, str]] | None:
    """(name, bulk status, output) of every subject in ``<root>/bulk-summary.json``; None when ``root``
    holds no bulk summary (a single run's output)."""
    uri = storage.join(root, BULK_SUMMARY)
    if not storage.exists(uri):
        return None
    try:
        return [(str(s["name"]), str(s["status"]), str(s["output"])) for s in storage.read_json(uri)["subjects"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{uri} is not a bulk summary ({type(exc).__name__}); re-run `dreambooth bulk` "
                          "with the same manifest to write it again") from None


def evaluate_bulk(root: str, options: EvalOptions, subjects: list[tuple[str, str, str]]) -> list[SubjectEval]:
    """Score each finished subject (its ``eval.json`` as a single eval writes it), then write
    ``<root>/eval-summary.json``; returns one ``SubjectEval`` per subject of the summary, in order."""
    options.check()  # a bad flag is every subject's error: refuse it once, before any model loads
    results = []
    for name, status, output in subjects:
        if status not in FINISHED:
            results.append(SubjectEval(name, output, error=f"not scored: the bulk run left it {status}"))
            continue
        log.info("scoring %s (%s)", name, output)
        try:
            report = evaluate(dataclasses.replace(options, output=output, report=None))
        except ConfigError as exc:
            results.append(SubjectEval(name, output, error=f"not scored: {exc}"))
            continue
        results.append(SubjectEval(name, output, report["suite"], report["scores"]["personalized"], report["verdict"],
                                   vae_carry=report.get("vae_carry")))
    storage.write_json_atomic(storage.join(root, EVAL_SUMMARY), {
        "bulk_output": root,
        "settings": {k: v for k, v in vars(options).items() if k not in ("output", "report")},
        "scored": sum(r.scores is not None for r in results),
        "within_every_bound": sum(r.scores is not None and not r.misses for r in results),
        "subjects": [dataclasses.asdict(r) for r in results],
    })
    return results


def format_bulk(results: list[SubjectEval]) -> str:
    """One line per subject: its key measures and what its verdict missed."""
    suites = {r.suite for r in results if r.scores}
    measures = KEY_MEASURES.get(next(iter(suites)), ()) if len(suites) == 1 else ()
    width = max([len(r.name) for r in results] + [7])
    lines = [f"{'subject':<{width}}" + "".join(f"{m:>23}" for m in measures) + "  verdict"]
    for r in results:
        if r.scores is None:
            lines.append(f"{r.name:<{width}}  {r.error}")
            continue
        cells = "".join(f"{r.scores[m]:>23.3f}" if m in r.scores else f"{'-':>23}" for m in measures)
        noise = [f["measure"] for f in r.verdict or [] if f["status"] == "noise"]
        said = ("MISS " + ", ".join(r.misses)) if r.misses else "ok"
        lines.append(f"{r.name:<{width}}{cells}  {said}" + (f" (noise: {', '.join(noise)})" if noise else ""))
    return "\n".join(lines)
