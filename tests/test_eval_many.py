"""``dreambooth eval`` on a bulk output: every finished subject scored, one table, eval-summary.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dreambooth.bulk import BulkOptions, BulkReport, SubjectResult, summary_payload
from dreambooth.cli import main
from dreambooth.evaluation.many import EVAL_SUMMARY
from dreambooth.evaluation.verdict import LEARN_FIX
from dreambooth.models import resolve_model
from dreambooth.shapes import SUBJECTS

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--images-per-prompt", "2", "--steps", "2"]


def finished_run(folder, subject: str, class_noun: str):
    """A "run" of ``subject`` that is the shapes base model itself (nothing learned), with its run record."""
    shutil.copytree(resolve_model("shapes"), folder)
    (folder / "run.json").write_text(json.dumps({"identifier": "sks", "config": {
        "model": "shapes", "revision": None,
        "subject": {"identifier": "sks", "class_noun": class_noun,
                    "instance_dir": str(REPO / "examples" / "subjects" / subject)}}}))


@pytest.fixture(scope="module")
def bulk_output(tmp_path_factory):
    root = tmp_path_factory.mktemp("bulk")
    finished_run(root / "checker_square", "checker_square", "square")
    finished_run(root / "dotted_star", "dotted_star", "star")
    results = [SubjectResult("checker_square", "succeeded", str(root / "checker_square")),
               SubjectResult("dotted_star", "skipped", str(root / "dotted_star")),  # finished by an earlier bulk
               SubjectResult("striped_circle", "failed", str(root / "striped_circle"), error="OOM")]
    payload = summary_payload(BulkOptions("subjects.yaml", str(root)), BulkReport(results), finished=True)
    (root / "bulk-summary.json").write_text(json.dumps(payload))
    return root


def test_eval_of_a_bulk_output_scores_each_finished_subject_and_lists_the_rest(bulk_output, capsys):
    assert main(["eval", "--output", str(bulk_output), *QUICK]) == 0
    out = capsys.readouterr().out
    summary = json.loads((bulk_output / EVAL_SUMMARY).read_text())
    by_name = {s["name"]: s for s in summary["subjects"]}
    assert list(by_name) == ["checker_square", "dotted_star", "striped_circle"] and summary["scored"] == 2
    for name in ("checker_square", "dotted_star"):
        own = json.loads((bulk_output / name / "eval.json").read_text())  # as a single eval writes it
        assert by_name[name]["scores"] == own["scores"]["personalized"] and by_name[name]["verdict"] == own["verdict"]
        assert by_name[name]["vae_carry"] == own["vae_carry"] and set(own["vae_carry"]) == set(SUBJECTS[name].backgrounds)
        # The "runs" are the base model: nothing learned, and the verdict says so. Nor is anything learned at half
        # the guidance (scored for both models), so it is sent to training, not to the sampler.
        tuned, base = own["scores"]["personalized"], own["scores"]["base"]
        assert own["settings"]["lower_guidance_scale"] == own["settings"]["guidance_scale"] / 2  # 3.75 of 7.5
        assert 0 < tuned["subject_fidelity_at_lower_guidance"] < base["subject_fidelity_at_lower_guidance"] + 0.3
        assert tuned["subject_match_at_lower_guidance"] == base["subject_match_at_lower_guidance"] == 0
        missed = {f["measure"]: f for f in own["verdict"] if f["status"] == "miss"}
        assert missed["subject_fidelity"]["next"] == LEARN_FIX
    assert summary["within_every_bound"] == 0
    assert "failed" in by_name["striped_circle"]["error"] and by_name["striped_circle"]["scores"] is None
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()}
    assert "MISS subject_fidelity" in lines["checker_square"] and "MISS subject_fidelity" in lines["dotted_star"]
    assert "not scored: the bulk run left it failed" in lines["striped_circle"]
    assert EVAL_SUMMARY in out


def test_eval_of_a_bulk_output_refuses_single_run_flags(bulk_output, capsys):
    assert main(["eval", "--output", str(bulk_output), "--report", "/tmp/x.json", *QUICK]) != 0
    assert "--report names one run" in capsys.readouterr().err
    assert main(["eval", "--output", str(bulk_output), "--shapes-subject", "checker_square", *QUICK]) != 0
    assert "is a bulk output (3 subjects)" in capsys.readouterr().err


def test_a_bad_flag_on_a_bulk_output_is_refused_once_not_per_subject(bulk_output, capsys):
    assert main(["eval", "--output", str(bulk_output), "--images-per-prompt", "1", "--steps", "2"]) != 0
    assert "--images-per-prompt must be at least 2" in capsys.readouterr().err


def test_a_broken_bulk_summary_is_named_with_the_fix(tmp_path, capsys):
    (tmp_path / "bulk-summary.json").write_text(json.dumps({"subjects": [{"name": "x"}]}))
    assert main(["eval", "--output", str(tmp_path), *QUICK]) != 0
    assert "is not a bulk summary" in capsys.readouterr().err
