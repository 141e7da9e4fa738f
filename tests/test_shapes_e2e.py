"""`make demo`'s config end to end: personalize a shapes subject on the `shapes` model with Ray Train +
DeepSpeed (2 workers, ZeRO-2) on the model's own recipe, then `dreambooth eval` finds the subject far
more often than the base model does, on the same seeds, while "a [class]" and the other prompts stay
close to the base (collateral drift)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from dreambooth import models
from dreambooth.cli import main
from dreambooth.config import load_yaml
from dreambooth.evaluation.runner import SHAPES_DRIFT
from dreambooth.evaluation.shapes import VAE_CARRIED
from dreambooth.shapes import SUBJECTS

pytestmark = [pytest.mark.ray, pytest.mark.e2e]
REPO = Path(__file__).resolve().parents[1]


def test_demo_personalizes_two_tone_triangle_and_eval_beats_the_base(ray_cluster, tmp_path, monkeypatch):
    # The README's first command, `dreambooth run --config examples/demo.yaml`, in a fresh folder holding
    # what it names: its relative output and photo paths are the ones a user's shell resolves.
    shutil.copytree(REPO / "examples" / "subjects" / "two_tone_triangle", tmp_path / "examples" / "subjects" / "two_tone_triangle")
    shutil.copy(REPO / "examples" / "demo.yaml", tmp_path / "examples" / "demo.yaml")
    monkeypatch.chdir(tmp_path)
    demo = load_yaml("examples/demo.yaml")
    assert not Path(demo["output"]).is_absolute() and not Path(demo["instance_dir"]).is_absolute()
    assert main(["run", "--config", "examples/demo.yaml"]) == 0
    out = tmp_path / demo["output"]
    record = json.loads((out / "run.json").read_text())
    assert record["config_sources"]["extra_prior_prompts"].startswith("the shapes model's recipe")
    assert record["config"]["prior"]["extra_prior_prompts"]
    assert record["config"]["prior"]["guidance_scale"] == 4.0 and record["config"]["export"]["sample_guidance_scale"] == 2.0
    samples, before_after = Image.open(out / "samples.png"), Image.open(out / "before_after.png")
    assert before_after.height > samples.height and before_after.width > 2 * samples.width  # + headers

    # 64 images per prompt: at 8 one image moves a share by 0.125, too coarse for bounds 0.1 wide. At the
    # priors' guidance 4 (what the demo sampled at before the recipe's sample guidance of 2), this subject's
    # match read 0.22 ± 0.07 at 32 images, on its 3-standard-error line. The eval takes about 350 s of this
    # test's 550 s here.
    assert main(["eval", "--output", str(out), "--images-per-prompt", "64"]) == 0
    report = json.loads((out / "eval.json").read_text())
    tuned, base = report["scores"]["personalized"], report["scores"]["base"]
    print(json.dumps(report["scores"], indent=1))
    assert report["suite"] == "shapes" and report["identifier"] == record["identifier"]
    assert report["settings"]["guidance_scale"] == 2.0  # the recipe's sample guidance, from the run
    assert tuned["subject_fidelity"] >= base["subject_fidelity"] + 0.3  # measured: 0.86 vs 0.16 (160 priors: 0.75)
    # The subject is found far more often than in the base model's images: by 3 standard errors or more
    # (measured 0.89 ± 0.04 vs 0.00; 0.67 ± 0.06 with 160 priors, 0.28 ± 0.06 at guidance 4), and at least as
    # often in new contexts (a background, a place) as on the bare prompt (measured 0.94; 0.87 with 160 priors).
    assert tuned["subject_match"] - base["subject_match"] >= 3 * tuned["subject_match_stderr"] > 0
    assert tuned["recontext_shown"] >= tuned["subject_match"]
    # Collateral drift (#13): "a triangle" and captions of other shapes, colours and backgrounds (none
    # of them among the recipe's extra prior captions) are drawn within 0.1 of the base model.
    assert tuned["class_fidelity"] >= 0.9 and tuned["other_prompt_fidelity"] >= 0.9  # measured: 0.95 ± 0.05, 0.93
    # Drawn cleanly, not only nearest to a triangle: in eval.json, and not within 0.1 on this subject
    # (measured 0.43 ± 0.08 here, 0.88 with 160 priors; 0.77 of the base over round 26's 24 runs, 0.68 with 160).
    assert set(SHAPES_DRIFT) <= set(tuned) and "clean_class_fidelity" in SHAPES_DRIFT
    # Each ratio with its standard error over the 64 seeds (one image moves a share by 1/64).
    assert all(0 <= tuned[f"{ratio}_stderr"] < 0.25 for ratio in SHAPES_DRIFT)
    # Which asked backgrounds the VAE alone carries the subject on, and the background asks split by it.
    assert set(report["vae_carry"]) == set(SUBJECTS["two_tone_triangle"].backgrounds)
    assert ("recontext_shown_carried_backgrounds" in tuned) == any(v >= VAE_CARRIED for v in report["vae_carry"].values())
    # The verdict agrees with the bounds above (clean class fidelity is not one of them).
    verdict = {finding["measure"]: finding["status"] for finding in report["verdict"]}
    assert {verdict[m] for m in ("subject_fidelity", "recontext_shown", "class_fidelity", "other_prompt_fidelity")} == {"ok"}
    recorded = record["priors"]
    assert recorded["extra_prompts"] == 64 and recorded["images"] == 320  # the recipe's captions and priors
    assert recorded["unconditional_share"] == 0.2  # 64 of them drawn for, and trained on, the empty prompt
    # The photos trained on their captions beside the bare prompt, for the captioned recipe's steps.
    identifier = record["identifier"]
    assert len(record["instance_captions"]) == 5
    assert all(p.startswith(f"a {identifier} triangle ") and p.endswith(" background")
               for p in record["instance_captions"].values())
    train = record["config"]["train"]
    assert train["bare_prompt_with_captions"] is True and train["max_train_steps"] == 1200
    assert record["config_sources"]["max_train_steps"] == models.recipe_source("shapes")
