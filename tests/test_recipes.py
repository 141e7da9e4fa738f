"""Model recipes: ``dreambooth.yaml`` beside ``model_index.json`` sets a model's run defaults, below
the config file and the flags, and the run's config says where each setting came from."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dreambooth import pipeline, priors
from dreambooth.cli import build_parser, config_from_args
from dreambooth.config import ConfigError, TrainConfig, all_fields, validate
from dreambooth.models import NATIVE_RESOLUTION_SOURCE, RECIPE_FILE, recipe_source

REPO_SUBJECT = "examples/subjects/two_tone_triangle"


def _config(argv):
    return config_from_args(build_parser().parse_args(["run", *argv]), list(all_fields()))


@pytest.fixture
def model_with_recipe(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    (model / RECIPE_FILE).write_text("train:\n  resolution: 64\n  learning_rate: 1.0e-4\n  max_train_steps: 50\n"
                                     "prior:\n  guidance_scale: 3.0\n")
    return model


def test_recipe_is_below_the_config_file_and_the_flags(tmp_path, model_with_recipe):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {model_with_recipe}\ntrain:\n  learning_rate: 2.0e-4\n")
    cfg = _config(["--config", str(config), "--max-train-steps", "7"])
    assert cfg.train.resolution == 64 and cfg.prior.guidance_scale == 3.0  # the recipe
    assert cfg.train.learning_rate == 2e-4  # the config file beats the recipe
    assert cfg.train.max_train_steps == 7  # flags beat both
    recipe = f"the {model_with_recipe} model's recipe ({RECIPE_FILE})"
    assert cfg.sources["resolution"] == cfg.sources["guidance_scale"] == recipe
    assert cfg.sources["learning_rate"] == str(config) and cfg.sources["model"] == str(config)
    assert cfg.sources["max_train_steps"] == "command-line flags"
    assert "seed" not in cfg.sources  # a default
    assert "sources" not in cfg.to_dict()  # config.yaml stays a config file `--config` reads back


def test_a_recipe_may_not_name_a_subject_or_an_output(model_with_recipe):
    (model_with_recipe / RECIPE_FILE).write_text("output: /tmp/elsewhere\nsubject:\n  class_noun: dog\n")
    with pytest.raises(ConfigError, match="a model recipe sets only train, prior, export settings; remove class_noun, output"):
        _config(["--model", str(model_with_recipe)])


def test_a_model_without_recipe_keeps_the_defaults(tmp_path):
    cfg = _config(["--model", "tiny", "--output", str(tmp_path / "o")])
    # The resolution default is the model's native size: tiny's UNet sample_size 16 x VAE factor 2.
    assert cfg.train.resolution == 32 and cfg.sources["resolution"] == NATIVE_RESOLUTION_SOURCE.format(model="tiny")
    assert cfg.train.learning_rate == TrainConfig().learning_rate and "learning_rate" not in cfg.sources


def test_shapes_runs_with_nothing_but_subject_and_output(tmp_path):
    """`dreambooth run --model shapes --instance-dir D --class-noun C --output O` passes every check
    with the shipped recipe's settings (it failed on the default 512 px before): its captioned one for
    captioned photos, its ``without_captions`` one for the same photos bare."""
    cfg = _config(["--model", "shapes", "--instance-dir", REPO_SUBJECT, "--class-noun", "triangle",
                   "--output", str(tmp_path / "out")])
    assert (cfg.train.resolution, cfg.train.learning_rate, cfg.prior.guidance_scale) == (32, 3e-4, 4.0)
    prepared = pipeline.preflight(cfg)
    assert len(prepared.images) >= 3 and prepared.config.sources["resolution"].startswith("the shapes model's recipe")
    assert len(cfg.prior.extra_prior_prompts) > 0  # the recipe's caption priors
    # The shipped subjects are captioned: each photo on its caption and the bare prompt, for twice the steps.
    train = prepared.config.train
    assert all(image.caption for image in prepared.images)
    assert (train.bare_prompt_with_captions, train.max_train_steps, train.text_encoder_learning_rate) == (True, 1200, 5e-5)

    # The same photos without their captions train on the recipe measured on bare photos.
    bare = tmp_path / "bare"
    bare.mkdir()
    for photo in Path(REPO_SUBJECT).glob("*.png"):
        shutil.copy(photo, bare / photo.name)
    uncaptioned = pipeline.preflight(_config(["--model", "shapes", "--instance-dir", str(bare), "--class-noun",
                                              "triangle", "--output", str(tmp_path / "bare-out")])).config
    assert (uncaptioned.train.max_train_steps, uncaptioned.train.text_encoder_learning_rate) == (600, 1e-4)
    assert uncaptioned.sources["max_train_steps"] == recipe_source("shapes", without_captions=True)
    assert uncaptioned.train.learning_rate == 3e-4 and uncaptioned.sources["learning_rate"] == recipe_source("shapes")
    # Each recipe trains on each prior 7.5 times (steps x 2 / priors), from one cache: the bare one reads its first seeds.
    assert (prepared.config.prior.num_class_images, uncaptioned.prior.num_class_images) == (320, 160)
    assert uncaptioned.sources["num_class_images"] == recipe_source("shapes", without_captions=True)
    scheduler = "DDPMScheduler"
    assert priors.spec_from_config(uncaptioned, scheduler).key() == priors.spec_from_config(prepared.config, scheduler).key()


def test_a_bare_list_flag_empties_what_the_recipe_lists(tmp_path):
    """`--extra-prior-prompts` alone means none: how a RayJob carrying a whole config says that the
    user removed the recipe's caption priors."""
    cfg = _config(["--model", "shapes", "--instance-dir", REPO_SUBJECT, "--class-noun", "triangle",
                   "--output", str(tmp_path / "out"), "--extra-prior-prompts"])
    assert cfg.prior.extra_prior_prompts == [] and cfg.sources["extra_prior_prompts"] == "command-line flags"
    with pytest.raises(ConfigError, match="sample_prompts is empty; give at least one prompt, or set --num-sample-images 0"):
        validate(_config(["--model", "shapes", "--instance-dir", REPO_SUBJECT, "--class-noun", "triangle",
                          "--output", str(tmp_path / "out"), "--sample-prompts"]))


def test_sample_and_eval_take_their_sampler_from_flags_then_the_run_then_the_recipe(tmp_path, model_with_recipe):
    import json

    from dreambooth.sample import SAMPLER_DEFAULTS, sampler_settings

    from_recipe = sampler_settings(str(model_with_recipe))
    assert (from_recipe.guidance_scale, from_recipe.resolution) == (3.0, 64)
    assert from_recipe.num_inference_steps == SAMPLER_DEFAULTS["num_inference_steps"]
    assert from_recipe.sources == {"num_inference_steps": "default", "guidance_scale": f"the {model_with_recipe} model's recipe",
                                   "resolution": f"the {model_with_recipe} model's recipe"}
    flagged = sampler_settings(str(model_with_recipe), guidance_scale=9.0, num_inference_steps=None)
    assert flagged.guidance_scale == 9.0 and flagged.sources["guidance_scale"] == "flag"

    output = tmp_path / "personalized"
    output.mkdir()
    (output / "run.json").write_text(json.dumps({"config": {"prior": {"num_inference_steps": 12, "guidance_scale": 2.5},
                                                            "train": {"resolution": 48}}}))
    run = sampler_settings(str(output))
    assert (run.num_inference_steps, run.guidance_scale, run.resolution) == (12, 2.5, 48)
    assert set(run.sources.values()) == {f"{output}'s run"}
    assert "12 steps" in run.describe() and "48 px" in run.describe()
    # A run whose grids had a guidance of their own is sampled and scored at that one, not its priors'.
    (output / "run.json").write_text(json.dumps({"config": {"prior": {"num_inference_steps": 12, "guidance_scale": 2.5},
                                                            "export": {"sample_guidance_scale": 1.5}}}))
    assert sampler_settings(str(output)).guidance_scale == 1.5
    shapes = sampler_settings("shapes")  # its recipe: priors at 4, samples at 2
    assert (shapes.guidance_scale, shapes.resolution) == (2.0, 32)
    assert shapes.sources["guidance_scale"] == "the shapes model's recipe"


def test_a_run_samples_its_grids_at_its_own_guidance_and_draws_its_priors_at_theirs(tmp_path, model_with_recipe):
    from dreambooth.export import grid_settings
    from dreambooth.priors import spec_from_config

    shapes = ["--model", "shapes", "--instance-dir", REPO_SUBJECT, "--class-noun", "triangle", "--output", str(tmp_path / "o")]
    cfg = _config(shapes)
    assert (cfg.prior.guidance_scale, cfg.sample_guidance_scale, grid_settings(cfg)["guidance_scale"]) == (4.0, 2.0, 2.0)
    assert cfg.sources["sample_guidance_scale"] == recipe_source("shapes")
    assert spec_from_config(cfg, "DDPMScheduler").guidance_scale == 4.0  # the prior cache is keyed and drawn at the priors' guidance
    flagged = _config([*shapes, "--sample-guidance-scale", "3"])
    assert grid_settings(flagged)["guidance_scale"] == 3.0 and flagged.sources["sample_guidance_scale"] == "command-line flags"
    # A recipe (or config) without one samples at the priors' guidance, as before the setting existed.
    plain = _config(["--model", str(model_with_recipe), "--output", str(tmp_path / "p")])
    assert plain.export.sample_guidance_scale is None and grid_settings(plain)["guidance_scale"] == 3.0


def test_a_recipe_gives_its_own_settings_to_photos_without_captions(tmp_path, model_with_recipe):
    """``without_captions`` replaces what the recipe gave when no photo has a caption; a setting a flag gave
    stays, and photos with a caption keep the recipe's own."""
    from dreambooth.models import with_recipe_for_photos
    from dreambooth.subjects import SubjectImage

    (model_with_recipe / RECIPE_FILE).write_text(
        "train:\n  learning_rate: 1.0e-4\n  max_train_steps: 50\n  bare_prompt_with_captions: true\n"
        "without_captions:\n  train:\n    max_train_steps: 25\n    learning_rate: 1.0e-4\n")
    bare = [SubjectImage(f"p{i}.png", b"", (32, 32)) for i in range(3)]
    captioned = [*bare[:2], SubjectImage("p2.png", b"", (32, 32), caption="a {identifier} {class_noun} on grass")]

    cfg = _config(["--model", str(model_with_recipe)])
    assert cfg.train.max_train_steps == 50
    uncaptioned = with_recipe_for_photos(cfg, bare)
    assert uncaptioned.train.max_train_steps == 25 and cfg.train.max_train_steps == 50  # a copy
    assert uncaptioned.sources["max_train_steps"] == recipe_source(str(model_with_recipe), without_captions=True)
    assert uncaptioned.sources["max_train_steps"].endswith("without_captions: no photo has a caption)")
    # the same value in both is still the recipe's own
    assert uncaptioned.sources["learning_rate"] == recipe_source(str(model_with_recipe))
    assert with_recipe_for_photos(cfg, captioned) is cfg  # one caption is enough
    flagged = _config(["--model", str(model_with_recipe), "--max-train-steps", "7"])
    assert with_recipe_for_photos(flagged, bare).train.max_train_steps == 7
    # a config file that sets the recipe's own value has chosen it too
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {model_with_recipe}\ntrain:\n  max_train_steps: 50\n")
    assert with_recipe_for_photos(_config(["--config", str(config)]), bare).train.max_train_steps == 50


def test_a_recipe_without_captions_section_sets_only_what_a_recipe_may(model_with_recipe):
    (model_with_recipe / RECIPE_FILE).write_text("train:\n  max_train_steps: 50\nwithout_captions:\n  output: /tmp/x\n")
    with pytest.raises(ConfigError, match="a model recipe sets only train, prior, export settings; remove output"):
        _config(["--model", str(model_with_recipe)])
    (model_with_recipe / RECIPE_FILE).write_text("without_captions:\n  train:\n    max_train_stepz: 5\n")
    with pytest.raises(ConfigError, match="did you mean 'max_train_steps'"):
        _config(["--model", str(model_with_recipe)])
    # Only a setting the recipe sets can give way to photos without captions, and never the resolution.
    (model_with_recipe / RECIPE_FILE).write_text("train:\n  resolution: 64\n  max_train_steps: 50\n"
                                                 "without-captions:\n  train:\n    lr_scheduler: linear\n"
                                                 "    resolution: 32\n    max_train_steps: 25\n")
    with pytest.raises(ConfigError, match="set lr_scheduler, resolution in the recipe too, or remove it here"):
        _config(["--model", str(model_with_recipe)])
    (model_with_recipe / RECIPE_FILE).write_text("train:\n  max_train_steps: 50\nwithout_captions: false\n")
    with pytest.raises(ConfigError, match="section without_captions must be a mapping"):
        _config(["--model", str(model_with_recipe)])
