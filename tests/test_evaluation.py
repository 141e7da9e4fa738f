"""Shapes-world evaluation measures on scripted "pipelines" whose behaviour is known, and the checks
``dreambooth eval`` runs before loading any model."""

from __future__ import annotations

import dataclasses
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dreambooth.cli import main
from dreambooth.config import ConfigError
from dreambooth.evaluation import runner
from dreambooth.evaluation.shapes import (evaluate_subject, photographed_contexts, recontext_asks, score,
                                          shown_at_sizes, subject_at_lower_guidance)
from dreambooth.shapes import SUBJECTS, Scene, caption, render, render_subject
from dreambooth.shapes.world import PLACE_PHRASES

SUBJECT = SUBJECTS["checker_square"]
V = "sks"
_BG = re.compile(r"on an? (\w+) background")


class ScriptedPipe:
    """Draws from the prompt's text, with the call signature of a diffusers pipeline.

    ``mode``: ``faithful`` draws the subject when the identifier is in the prompt and a plain
    class object otherwise, where and on what the prompt asks; ``overfit`` draws the same subject
    image whatever the prompt; ``base`` never draws the subject; ``shrinks`` is ``faithful`` except
    that a prompt naming a place or background gets, on odd seeds, a small object without the
    subject's pattern (as a model that draws the subject smaller in new contexts, where the VAE loses
    the pattern); ``loses`` does the same at the subject's own size; ``recalls`` is ``faithful`` only
    in the ``photographed`` contexts (and on the bare prompt), as a model that memorized its photos.
    """

    def __init__(self, mode: str, photographed: set | None = None):
        self.mode, self.photographed = mode, photographed or set()

    def __call__(self, prompts, num_inference_steps, guidance_scale, generator):
        images = []
        for prompt, gen in zip(prompts, generator):
            if self.mode == "overfit":
                images.append(render_subject(SUBJECT, "green", "center", "large", 32, 0))
                continue
            rng = np.random.default_rng(gen.initial_seed())
            match = _BG.search(prompt)
            bg = match[1] if match else SUBJECT.backgrounds[rng.integers(len(SUBJECT.backgrounds))]
            position = next((p for p, phrase in PLACE_PHRASES.items() if phrase in prompt), "center")
            in_context = prompt != f"a {V} {SUBJECT.class_noun}"
            asked = {("background", match[1])} if match else {("position", position)} if in_context else set()
            forgets = self.mode == "recalls" and not asked <= self.photographed
            if self.mode in ("shrinks", "loses") and V in prompt.split() and in_context and gen.initial_seed() % 2:
                size = "small" if self.mode == "shrinks" else "large"
                images.append(render(Scene(SUBJECT.class_noun, SUBJECT.color, bg, position, size), 32, rng))
            elif self.mode in ("faithful", "shrinks", "loses", "recalls") and V in prompt.split() and not forgets:
                images.append(render_subject(SUBJECT, bg, position, "large", 32, rng))
            else:
                color = "yellow" if bg != "yellow" else "black"
                images.append(render(Scene(SUBJECT.class_noun, color, bg, position, "large"), 32, rng))
        return SimpleNamespace(images=images)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    from dreambooth.shapes import write_subject_images

    from PIL import Image

    paths = write_subject_images(SUBJECT, tmp_path_factory.mktemp("subject"), n=5, seed=0)
    return [Image.open(p).convert("RGB") for p in paths]


def test_a_faithful_model_scores_full_fidelity_and_no_prior_drift(references):
    report = evaluate_subject(ScriptedPipe("faithful"), SUBJECT, references, V, images_per_prompt=4)
    assert report.subject_match == 1.0 and report.subject_fidelity > 0.8
    assert report.prompt_fidelity == 1.0 and report.recontext_subject_match == 1.0
    assert report.recontext_shown == 1.0
    assert report.pres == 0.0 and report.div > 0.05


def test_an_overfit_model_scores_drift_no_diversity_and_ignores_prompts(references):
    report = evaluate_subject(ScriptedPipe("overfit"), SUBJECT, references, V, images_per_prompt=4)
    assert report.subject_match == 1.0
    assert report.pres == 1.0 and report.div == 0.0
    assert report.prompt_fidelity == pytest.approx(1 / len(recontext_asks(SUBJECT)))  # only the "green" ask


def test_the_base_model_never_shows_the_subject(references):
    report = evaluate_subject(ScriptedPipe("base"), SUBJECT, references, "", images_per_prompt=4)
    faithful = evaluate_subject(ScriptedPipe("faithful"), SUBJECT, references, V, images_per_prompt=4)
    assert report.subject_match == 0.0 and report.pres == 0.0 and report.recontext_shown == 0.0
    assert report.subject_fidelity < faithful.subject_fidelity - 0.2
    assert report.prompt_fidelity == 1.0 and report.recontext_subject_match == 0.0


class OversaturatingPipe(ScriptedPipe):
    """``faithful`` up to guidance 2; above it the subject's pattern is drawn in black and white, as a strong
    guidance pushes a learned two-colour pattern's colours apart."""

    def __call__(self, prompts, num_inference_steps, guidance_scale, generator):
        out = super().__call__(prompts, num_inference_steps, guidance_scale, generator)
        if guidance_scale > 2:
            saturated = dataclasses.replace(SUBJECT, color="black", secondary="white")
            out.images = [render_subject(saturated, "green", "center", "large", 32, 0) if V in prompt.split() else image
                          for prompt, image in zip(prompts, out.images)]
        return out


def test_the_bare_prompt_is_also_scored_at_a_lower_guidance(references):
    pipe = OversaturatingPipe("faithful")
    at_four = evaluate_subject(pipe, SUBJECT, references, V, images_per_prompt=4, guidance_scale=4.0)
    lower = subject_at_lower_guidance(pipe, SUBJECT, references, V, guidance_scale=2.0, images_per_prompt=4)
    assert at_four.subject_match == 0.0
    assert lower["subject_match_at_lower_guidance"] == 1.0 and lower["subject_match_at_lower_guidance_stderr"] == 0.0
    assert lower["subject_fidelity_at_lower_guidance"] > at_four.subject_fidelity + 0.2
    faithful = subject_at_lower_guidance(ScriptedPipe("faithful"), SUBJECT, references, V, guidance_scale=2.0,
                                         images_per_prompt=4)  # guidance-blind: scores as at the eval's guidance
    assert faithful["subject_fidelity_at_lower_guidance"] == pytest.approx(
        evaluate_subject(ScriptedPipe("faithful"), SUBJECT, references, V, images_per_prompt=4).subject_fidelity)
    base = subject_at_lower_guidance(OversaturatingPipe("base"), SUBJECT, references, "", guidance_scale=2.0,
                                     images_per_prompt=4)
    assert base["subject_match_at_lower_guidance"] == 0.0
    # Half the eval's guidance, but never below 1, where classifier-free guidance is off: nothing lower at 1.
    assert [runner.lower_guidance(g) for g in (7.5, 4.0, 2.0, 1.5, 1.0)] == [3.75, 2.0, 1.0, 1.0, None]


def test_shown_at_sizes_weights_each_drawn_size_by_the_bare_prompts_sizes():
    shown = [True, False, False, True, False]
    drawn = ["large", "large", "small", "medium", "small"]
    # large 1/2 (weight 3), small 0/2 (weight 1); "medium" is never drawn by the bare prompt
    assert shown_at_sizes(shown, drawn, ["large"] * 3 + ["small"]) == pytest.approx(0.375)
    assert shown_at_sizes(shown, drawn, ["medium"]) == 1.0
    assert shown_at_sizes(shown, drawn, ["none"]) == pytest.approx(0.4)  # no size in common: the plain share


def test_a_model_that_draws_the_subject_smaller_in_new_contexts_keeps_it_at_the_bare_prompts_sizes(references):
    shrinks = evaluate_subject(ScriptedPipe("shrinks"), SUBJECT, references, V, images_per_prompt=4)
    assert shrinks.subject_match == 1.0 and shrinks.recontext_shown == 0.5
    assert shrinks.subject_small_share == 0.0 and shrinks.recontext_small_share == 0.5
    assert shrinks.recontext_shown_at_subject_sizes == 1.0
    loses = evaluate_subject(ScriptedPipe("loses"), SUBJECT, references, V, images_per_prompt=4)
    # Odd seeds lose it on every ask, background or place: each kind's share is the half kept.
    assert loses.recontext_shown_backgrounds == loses.recontext_shown_places == 0.5
    assert loses.recontext_shown == 0.5 and loses.recontext_small_share == 0.0
    assert loses.recontext_shown_at_subject_sizes == 0.5


def test_photographed_contexts_are_read_from_the_photos_pixels():
    photos = [render_subject(SUBJECT, "green", "top left", "large", 32, 0),
              render_subject(SUBJECT, "yellow", "center", "medium", 32, 1)]
    assert photographed_contexts(photos) == {("background", "green"), ("background", "yellow"),
                                             ("position", "top left"), ("position", "center")}


def test_new_contexts_are_split_into_those_the_photos_show_and_those_none_shows(references):
    photographed = photographed_contexts(references)
    asks = {(field, value) for _, field, value in recontext_asks(SUBJECT)}
    assert asks - photographed and asks & photographed  # the fixture's photos leave asks on both sides
    recalls = evaluate_subject(ScriptedPipe("recalls", photographed), SUBJECT, references, V, images_per_prompt=4)
    assert recalls.subject_match == 1.0
    assert recalls.recontext_shown_seen == 1.0 and recalls.recontext_shown_unseen == 0.0
    unseen_share = len(asks - photographed) / len(asks)
    assert recalls.recontext_shown == pytest.approx(1 - unseen_share)
    for kind, share in (("background", recalls.recontext_shown_backgrounds), ("position", recalls.recontext_shown_places)):
        of_kind = {ask for ask in asks if ask[0] == kind}
        assert share == pytest.approx(len(of_kind & photographed) / len(of_kind))
    unseen_backgrounds = {ask for ask in asks if ask[0] == "background"} - photographed
    assert unseen_backgrounds  # the fixture's 5 photos leave one of the 6 backgrounds unseen
    assert recalls.recontext_shown_unseen_backgrounds == 0.0 and recalls.recontext_shown_seen_backgrounds == 1.0
    # A model that also recalls the unseen places: every unseen context but the backgrounds keeps the subject.
    unseen_places = {ask for ask in asks if ask[0] == "position"} - photographed
    assert unseen_places
    places_too = evaluate_subject(ScriptedPipe("recalls", photographed | unseen_places), SUBJECT, references, V,
                                  images_per_prompt=4)
    assert places_too.recontext_shown_unseen > 0.0 and places_too.recontext_shown_unseen_backgrounds == 0.0
    faithful = evaluate_subject(ScriptedPipe("faithful"), SUBJECT, references, V, images_per_prompt=4)
    assert faithful.recontext_shown_unseen == faithful.recontext_shown_seen == 1.0
    assert faithful.recontext_shown_backgrounds == faithful.recontext_shown_places == 1.0
    assert faithful.recontext_shown_unseen_backgrounds == faithful.recontext_shown_seen_backgrounds == 1.0
    corners = ["top left", "top right", "bottom left", "bottom right"]
    everywhere = [render_subject(SUBJECT, bg, corners[i % 4], "large", 32, i) for i, bg in enumerate(SUBJECT.backgrounds)]
    all_seen = evaluate_subject(ScriptedPipe("faithful"), SUBJECT, everywhere, V, images_per_prompt=1).as_dict()
    assert all_seen["recontext_shown_seen"] == 1.0
    assert "recontext_shown_unseen" not in all_seen and "recontext_shown_unseen_stderr" not in all_seen
    assert "recontext_shown_unseen_backgrounds" not in all_seen


def test_score_reports_each_asked_field():
    scenes = [Scene("circle", "red", "blue"), Scene("star", "white", "black", "top left")]
    images = [render(s, 32, 0) for s in scenes]
    wrong = {"shape": "square", "color": "white", "background": "black", "position": "top left"}
    result = score(images, [{"shape": "circle", "color": "red", "background": "blue"}, wrong])
    assert (result.shape, result.color, result.background, result.position) == (0.5, 1.0, 1.0, 1.0)
    assert result.count == 2


def _fake_run(tmp_path, instance_dir: str, class_noun: str = "square", model: str = "shapes"):
    out = tmp_path / "run"
    out.mkdir()
    record = {"identifier": V, "config": {"model": model, "revision": None,
                                          "subject": {"identifier": V, "class_noun": class_noun,
                                                      "instance_dir": instance_dir}}}
    (out / "run.json").write_text(json.dumps(record))
    return out


def test_run_record_gives_suite_and_subject(tmp_path):
    run = runner.read_run(str(_fake_run(tmp_path, "examples/subjects/checker_square")))
    options = runner.EvalOptions(output=run.output)
    assert runner.resolve_suite(options, run) == "shapes"
    assert runner.shapes_subject(options, run) is SUBJECT
    assert runner.resolve_suite(options, runner.RunInfo(**{**vars(run), "model": "org/sd"})) == "dreambench"


@pytest.mark.parametrize("setup, flags, message", [
    ("none", [], "has no run.json"),
    ("dog", [], "is not one"),
    ("square-as-circle", [], "class noun is 'circle'"),
    ("ok", ["--suite", "colour"], "invalid choice"),
    ("ok", ["--images-per-prompt", "1"], "at least 2"),
])
def test_eval_refuses_bad_input_before_loading_models(tmp_path, capsys, setup, flags, message):
    if setup == "none":
        out = tmp_path
    else:
        folder = {"dog": "examples/subjects/dog"}.get(setup, "examples/subjects/checker_square")
        out = _fake_run(tmp_path, folder, class_noun="circle" if setup == "square-as-circle" else "square")
    with pytest.raises(SystemExit) if "invalid choice" in message else _no_raise():
        code = main(["eval", "--output", str(out), *flags])
        assert code == 2
    assert message in capsys.readouterr().err
    assert not (out / "eval.json").exists()


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_CAPTION = re.compile(r"^an? (?:(?P<color>\w+) )?(?P<shape>circle|square|triangle|star)(?: on an? (?P<bg>\w+) background)?$")


class CaptionPipe:
    """Draws exactly what a base-grammar caption asks ("a red circle on a blue background",
    "a square"): a model that kept every prompt."""

    def __call__(self, prompts, num_inference_steps, guidance_scale, generator):
        images = []
        for prompt, gen in zip(prompts, generator):
            rng = np.random.default_rng(gen.initial_seed())
            asked = _CAPTION.match(prompt)
            assert asked, prompt
            bg = asked["bg"] or "white"
            color = asked["color"] or ("black" if bg != "black" else "white")
            images.append(render(Scene(asked["shape"], color, bg, "center", "large"), 32, rng))
        return SimpleNamespace(images=images)


def test_drift_measures_reach_their_extremes_on_scripted_pipelines():
    """A model that keeps every prompt scores full class and other-prompt accuracy; one that draws
    the subject for every prompt loses both; as ratios to the base, 1.0 and far below."""
    from dreambooth.evaluation.shapes import evaluate_drift

    kept = evaluate_drift(CaptionPipe(), SUBJECT.class_noun, images_per_prompt=2)
    collapsed = evaluate_drift(ScriptedPipe("overfit"), SUBJECT.class_noun, images_per_prompt=2)
    assert kept.class_accuracy == 1.0 and kept.other_prompt_accuracy > 0.95
    assert collapsed.other_prompt_accuracy < 0.5  # the subject (a green-background square) for every caption
    scores = {"base": kept.as_dict(), "personalized": collapsed.as_dict()}
    runner.drift_ratios(scores, runner.SHAPES_DRIFT)
    assert scores["base"]["class_fidelity"] == scores["base"]["other_prompt_fidelity"] == 1.0
    assert scores["personalized"]["other_prompt_fidelity"] < 0.5
    same = {"base": kept.as_dict(), "personalized": kept.as_dict()}
    runner.drift_ratios(same, runner.SHAPES_DRIFT)
    assert same["personalized"]["class_fidelity"] == same["personalized"]["other_prompt_fidelity"] == 1.0
    assert same["personalized"]["clean_class_fidelity"] == 1.0 and kept.clean_class_accuracy == 1.0


class HalfKeptPipe(CaptionPipe):
    """Draws what a caption asks on even seeds and a star on a white background on odd ones: a model
    that kept exactly half of every prompt's images."""

    def __call__(self, prompts, num_inference_steps, guidance_scale, generator):
        images = super().__call__(prompts, num_inference_steps, guidance_scale, generator).images
        for i, gen in enumerate(generator):
            if gen.initial_seed() % 2:
                images[i] = render(Scene("star", "black", "white", "center", "large"), 32, 0)
        return SimpleNamespace(images=images)


def test_drift_measures_carry_their_standard_error_over_the_seeds():
    """Half the images kept: each share is 0.5 ± sqrt(0.25 / n), four times the images halve the error, a
    model that keeps every image has none; the ratio to the base carries it and the table prints it."""
    from dreambooth.evaluation.shapes import evaluate_drift, other_prompt_scenes

    kept = evaluate_drift(CaptionPipe(), SUBJECT.class_noun, images_per_prompt=8)
    assert kept.class_accuracy_stderr == kept.other_prompt_accuracy_stderr == 0.0
    half = evaluate_drift(HalfKeptPipe(), SUBJECT.class_noun, images_per_prompt=8)
    assert half.class_accuracy == 0.5 and half.class_accuracy_stderr == pytest.approx(0.5 / np.sqrt(8))
    quadrupled = evaluate_drift(HalfKeptPipe(), SUBJECT.class_noun, images_per_prompt=32)
    assert quadrupled.class_accuracy_stderr == pytest.approx(half.class_accuracy_stderr / 2)
    # The other-prompt accuracy is still the mean of its shape, colour and background accuracies.
    scenes = other_prompt_scenes(SUBJECT.class_noun)
    seeds = list(range(8))
    images = HalfKeptPipe()([caption(s, "short") for s in scenes for _ in seeds], 25, 4.0,
                            [torch.Generator().manual_seed(i) for _ in scenes for i in seeds]).images
    accuracy = score(images, [{"shape": s.shape, "color": s.color, "background": s.background}
                              for s in scenes for _ in seeds])
    assert half.other_prompt_accuracy == pytest.approx(np.mean([accuracy.shape, accuracy.color, accuracy.background]))
    assert 0 < half.other_prompt_accuracy_stderr < half.class_accuracy_stderr  # 12 captions x 8 images, not 8

    scores = {"base": kept.as_dict(), "personalized": half.as_dict()}
    runner.drift_ratios(scores, runner.SHAPES_DRIFT)
    assert scores["personalized"]["class_fidelity_stderr"] == pytest.approx(half.class_accuracy_stderr)
    table = runner.format_table({"scores": scores, "settings": {"images_per_prompt": 8}})
    assert re.search(r"class_fidelity +1\.000 +0\.500 ± 0\.177", table), table
    assert "8 images per prompt" in table and "class_fidelity_stderr" not in table
    assert "vae_carry" not in table  # a dreambench report has none
    carried = runner.format_table({"scores": scores, "settings": {"images_per_prompt": 8},
                                   "vae_carry": {"blue": 0.0, "orange": 0.92, "black": 0.33}})
    assert carried.splitlines()[-1].endswith("(carried: 0.85 or more): blue 0.00, black 0.33, orange 0.92")


class SmudgePipe:
    """Draws every prompt's shape with a "foot" (a square blob beside it): still the nearest shape to
    the shape reader, not one a person would call clean (the demo's drifted "a triangle" images)."""

    def __call__(self, prompts, num_inference_steps, guidance_scale, generator):
        from dreambooth.shapes.world import compose, coverage

        images = []
        for prompt in prompts:
            shape = next(s for s in ("circle", "square", "triangle", "star") if s in prompt)
            body = coverage(shape, 16, 17, 8, 32)[0] + coverage("square", 23, 24, 5, 32)[0]
            images.append(compose("yellow", [(np.clip(body, 0, 1), "blue")]))
        return SimpleNamespace(images=images)


def test_smudged_class_images_count_as_the_class_but_not_as_clean():
    from dreambooth.evaluation.shapes import evaluate_drift
    from dreambooth.shapes.analyzers import CLEAN_SHAPE_FIT, shape_fit
    from dreambooth.shapes.world import Scene, render

    smudged = evaluate_drift(SmudgePipe(), "triangle", images_per_prompt=2)
    assert smudged.class_accuracy == 1.0 and smudged.clean_class_accuracy == 0.0
    clean = [shape_fit(render(Scene(s, "red", "blue", "center", size), 32, seed))
             for s in ("circle", "square", "triangle", "star") for size in ("small", "large") for seed in (0, 1)]
    assert min(clean) >= CLEAN_SHAPE_FIT + 0.2, clean
    scores = {"base": evaluate_drift(CaptionPipe(), "triangle", images_per_prompt=2).as_dict(),
              "personalized": smudged.as_dict()}
    runner.drift_ratios(scores, runner.SHAPES_DRIFT)
    assert scores["personalized"]["class_fidelity"] == 1.0 and scores["personalized"]["clean_class_fidelity"] == 0.0


def test_other_prompts_are_fixed_and_leave_out_the_subjects_class():
    from dreambooth.evaluation.dreambench import other_class_prompts
    from dreambooth.evaluation.shapes import other_prompt_scenes

    scenes = other_prompt_scenes("triangle")
    assert scenes == other_prompt_scenes("triangle") and all(s.shape != "triangle" for s in scenes)
    assert len({s.shape for s in scenes}) >= 2 and len({s.background for s in scenes}) >= 3
    assert "a photo of a dog" not in other_class_prompts("dog") and len(other_class_prompts("dog")) == 4


class _PixelVae(torch.nn.Module):
    """A "VAE" whose latents are the pixels: ``lossy`` decodes every image to mid-grey."""

    def __init__(self, lossy: bool):
        super().__init__()
        self.lossy = lossy
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def encode(self, pixels):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=pixels))

    def decode(self, latents):
        return SimpleNamespace(sample=torch.zeros_like(latents) if self.lossy else latents)


def test_vae_ceiling_is_what_the_decoder_keeps_of_the_subject(references):
    from dreambooth.evaluation.shapes import vae_ceiling
    from dreambooth.models import load_components, resolve_model

    lossless, lossy = vae_ceiling(_PixelVae(False), references, 32), vae_ceiling(_PixelVae(True), references, 32)
    assert lossless > 0.8 and lossy < 0.5
    shipped = vae_ceiling(load_components(resolve_model("shapes")).vae, references, 32)
    assert 0.7 < shipped <= lossless + 1e-6  # the shipped VAE carries the shipped subjects


def test_vae_carry_is_per_asked_background_what_the_decoder_keeps_of_true_renders():
    from dreambooth.evaluation.shapes import VAE_CARRIED, vae_carry
    from dreambooth.models import load_components, resolve_model

    lossless, lossy = vae_carry(_PixelVae(False), SUBJECT, 32, 2), vae_carry(_PixelVae(True), SUBJECT, 32, 2)
    assert set(lossless) == set(lossy) == set(SUBJECT.backgrounds)
    assert min(lossless.values()) > 0.8 and max(lossy.values()) == 0.0
    shipped = vae_carry(load_components(resolve_model("shapes")).vae, SUBJECTS["dotted_star"], 32)
    assert shipped["blue"] < VAE_CARRIED <= shipped["orange"]  # a purple star blurs into blue, not into orange


def test_background_asks_are_split_by_whether_the_vae_carries_the_subject_there(references):
    photographed = photographed_contexts(references)
    unseen = [bg for bg in SUBJECT.backgrounds if ("background", bg) not in photographed]
    seen = [bg for bg in SUBJECT.backgrounds if ("background", bg) in photographed]
    assert len(unseen) == 1 and len(seen) == 5
    # Carried: 3 photographed backgrounds; not carried: the 2 others and the unphotographed one, which the
    # recalling model loses: the split follows the carry, not whether a photo shows the background.
    carry = {bg: 0.9 if bg in seen[:3] else 0.5 for bg in SUBJECT.backgrounds}
    recalls = evaluate_subject(ScriptedPipe("recalls", photographed), SUBJECT, references, V, images_per_prompt=2,
                               carry=carry)
    assert recalls.recontext_shown_carried_backgrounds == 1.0
    assert recalls.recontext_shown_uncarried_backgrounds == pytest.approx(2 / 3)
    faithful = evaluate_subject(ScriptedPipe("faithful"), SUBJECT, references, V, images_per_prompt=2, carry=carry)
    assert faithful.recontext_shown_carried_backgrounds == faithful.recontext_shown_uncarried_backgrounds == 1.0
    everywhere = {bg: 1.0 for bg in SUBJECT.backgrounds}
    one_side = evaluate_subject(ScriptedPipe("faithful"), SUBJECT, references, V, images_per_prompt=1,
                                carry=everywhere).as_dict()
    assert "recontext_shown_uncarried_backgrounds" not in one_side and "recontext_shown_carried_backgrounds" in one_side
    unscored = evaluate_subject(ScriptedPipe("faithful"), SUBJECT, references, V, images_per_prompt=1).as_dict()
    assert not any("carried" in measure for measure in unscored)


def test_scripted_subjects_are_new_and_eval_reads_their_subject_json(tmp_path):
    import subprocess
    import sys

    from dreambooth.shapes import new_subjects

    made = new_subjects(4, 7)
    shipped = {(s.class_noun, s.pattern) for s in SUBJECTS.values()}
    assert made == new_subjects(4, 7) and len({s.name for s in made}) == 4
    assert not {(s.class_noun, s.pattern) for s in made} & shipped
    subprocess.run([sys.executable, "scripts/make-shapes-subjects.py", "--new", "4", "--seed", "7",
                    "--output", str(tmp_path)], check=True, capture_output=True)
    first = made[0]
    folder = tmp_path / first.name
    assert len(list(folder.glob("*.png"))) == 5
    run = runner.read_run(str(_fake_run(tmp_path, str(folder), class_noun=first.class_noun)))
    assert runner.shapes_subject(runner.EvalOptions(output=run.output), run) == first
    (folder / "subject.json").write_text('{"name": "x", "class_noun": "hexagon"}')
    with pytest.raises(ConfigError, match="is not a shapes subject"):
        runner.shapes_subject(runner.EvalOptions(output=run.output), run)


def test_the_shapes_recipes_caption_priors_are_never_a_prompt_eval_scores():
    """Priors trained on a scored caption would make other-prompt fidelity measure memory, not drift:
    the shipped recipe's extra prior prompts, filled for every class, miss every scored caption."""
    from pathlib import Path

    import yaml

    from dreambooth.config import fill_prior_prompt
    from dreambooth.evaluation.shapes import other_prompt_scenes
    from dreambooth.models import RECIPE_FILE, resolve_model
    from dreambooth.shapes import SHAPES, caption, parse_caption

    recipe = yaml.safe_load((Path(resolve_model("shapes")) / RECIPE_FILE).read_text())
    templates = recipe["prior"]["extra_prior_prompts"]
    assert 0 < recipe["prior"]["extra_prior_share"] < 1 and len(templates) >= 16
    scored_scenes = [s for other in SHAPES for s in other_prompt_scenes(other)]
    scored_captions = {caption(s, "short") for s in scored_scenes}
    scored_triples = {(s.shape, s.color, s.background) for s in scored_scenes}
    for noun in SHAPES:
        filled = [fill_prior_prompt(t, noun) for t in templates]
        assert not (scored_captions | {f"a {noun}"}) & set(filled)
        for prompt in filled:
            fields = parse_caption(prompt)  # every prior prompt is in the base model's grammar
            assert (fields["shape"], fields["color"], fields["background"]) not in scored_triples, prompt


def test_class_caption_templates_put_the_class_in_other_contexts():
    """``class_caption_templates`` (recipe_search's in-class caption priors): each names the class once,
    and filled for any class is a full base-grammar caption of that class, in varied places."""
    from dreambooth.config import fill_prior_prompt, validate_prompt_template
    from dreambooth.evaluation.shapes import class_caption_templates
    from dreambooth.shapes import SHAPES, parse_caption

    templates = class_caption_templates(16)
    assert templates == class_caption_templates(16) and len(set(templates)) >= 12
    for template in templates:
        validate_prompt_template(template, flag="--extra-prior-prompts")
        assert template.count("{class_noun}") == 1
    for noun in SHAPES:
        fields = [parse_caption(fill_prior_prompt(t, noun)) for t in templates]
        assert {f["shape"] for f in fields} == {noun} and len({f["position"] for f in fields}) >= 4
