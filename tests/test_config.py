"""The one typed config: YAML < flags, typed fields, one docstring per field, validation messages."""

import dataclasses

import pytest

from dreambooth.cli import build_parser, config_from_args
from dreambooth.config import SECTIONS, ConfigError, RunConfig, all_fields, build_config, flatten, load_yaml, validate


def _valid(**overrides) -> RunConfig:
    values = {"model": "tiny", "instance_dir": "x", "class_noun": "dog", "output": "out", **overrides}
    return build_config((values, "test"))


def test_every_field_has_a_docstring_and_a_flag():
    fields = all_fields()
    assert len(fields) > 30
    for info in fields.values():
        assert info.doc, f"field {info.name} has no docstring"
    help_text = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    for name in ["--model", "--instance-dir", "--class-noun", "--identifier", "--output", "--prior-output",
                 "--num-class-images", "--resolution", "--max-train-steps", "--train-batch-size",
                 "--learning-rate", "--prior-loss-weight", "--mixed-precision", "--workers", "--zero-stage",
                 "--checkpointing-steps", "--config"]:
        assert name in help_text, name


def test_flags_override_yaml_and_yaml_overrides_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny\ntrain:\n  learning_rate: 1.0e-4\n  workers: 3\nclass_noun: cat\n")
    args = build_parser().parse_args(["run", "--config", str(path), "--workers", "2", "--no-train-text-encoder"])
    cfg = config_from_args(args, list(all_fields()))
    assert cfg.train.workers == 2  # flag wins
    assert cfg.train.learning_rate == 1e-4  # from YAML
    assert cfg.subject.class_noun == "cat"  # flat YAML key routed to its section
    assert cfg.train.train_text_encoder is False
    assert cfg.train.zero_stage == RunConfig().train.zero_stage  # default kept


def test_a_list_flag_keeps_every_item_whether_given_once_or_once_per_item_and_alone_means_none():
    parse = build_parser().parse_args
    once = parse(["run", "--sample-prompts", "a {class_noun}", "a red {class_noun}"])
    per_item = parse(["run", "--sample-prompts", "a {class_noun}", "--sample-prompts", "a red {class_noun}"])
    assert once.sample_prompts == per_item.sample_prompts == ["a {class_noun}", "a red {class_noun}"]
    assert parse(["run", "--extra-prior-prompts"]).extra_prior_prompts == []  # none, over the recipe's list
    assert parse(["run"]).extra_prior_prompts is None  # not given: the recipe's or the default


def test_unknown_key_suggests_the_right_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rat: 1\n")
    with pytest.raises(ConfigError, match=r"learning_rat.*did you mean 'learning_rate'"):
        load_yaml(str(path))
    with pytest.raises(ConfigError, match="unknown config key 'workerz'"):
        flatten({"workerz": 2}, "manifest")


def test_key_in_wrong_section_is_rejected():
    with pytest.raises(ConfigError, match="learning_rate"):
        flatten({"prior": {"learning_rate": 1}}, "f.yaml")


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("workers", "two", "'workers' .* must be an integer"),
        ("learning_rate", "fast", "'learning_rate' .* must be a number"),
        ("train_text_encoder", "maybe", "must be true or false"),
        ("class_noun", {"a": 1}, "must be a string"),
    ],
)
def test_wrong_types_name_the_field(key, value, message):
    with pytest.raises(ConfigError, match=message):
        build_config(({key: value}, "f.yaml"))


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"class_noun": ""}, "--class-noun is empty"),
        ({"class_noun": "dog!!"}, "not a plain noun"),
        ({"output": ""}, "--output is empty"),
        ({"instance_dir": ""}, "--instance-dir is empty"),
        ({"resolution": 500}, "multiple of 8"),
        ({"zero_stage": 4}, "--zero-stage must be 0, 1, 2 or 3"),
        ({"mixed_precision": "fp8"}, "--mixed-precision must be one of"),
        ({"workers": 0}, "--workers must be between 1 and 4096"),
        ({"offload_optimizer": True, "zero_stage": 0}, "--offload-optimizer needs"),
        ({"num_class_images": 0}, "--num-class-images must be >= 1"),
        ({"lr_scheduler": "exp"}, "--lr-scheduler must be one of"),
        ({"identifier": "one two three four"}, "has 4 words"),
        ({"sample_prompts": ["a {subject}"]}, "may only use"),
        ({"extra_prior_prompts": ["a cat", " "]}, "--extra-prior-prompts has an empty prompt"),
        ({"extra_prior_prompts": ["a cat"], "extra_prior_share": 1.0}, r"--extra-prior-share must be in \(0, 1\)"),
        ({"extra_prior_prompts": ["a {identifier} {class_noun}"]}, "frozen model, which does not know the subject"),
        ({"extra_prior_prompts": ["a {class} in the snow"]}, "may only use"),
        ({"unconditional_prior_share": -0.1}, r"--unconditional-prior-share must be in \[0, 1\)"),
        ({"extra_prior_prompts": ["a cat"], "extra_prior_share": 0.6, "unconditional_prior_share": 0.4},
         "leave no priors of the class prompt"),
    ],
)
def test_validation_messages(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(_valid(**overrides))


def test_validation_normalizes_and_derives():
    cfg = validate(_valid(class_noun="  Stuffed   Animal ", output="s3://bucket/runs/dog", identifier="sks"))
    assert cfg.subject.class_noun == "stuffed animal"
    assert cfg.subject.instance_prompt == "a sks stuffed animal"
    assert cfg.subject.class_prompt == "a stuffed animal"
    assert cfg.prior_root == "s3://bucket/runs/priors"
    assert "a sks stuffed animal on the beach" in cfg.sample_prompts()


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = validate(_valid(learning_rate=3e-6, workers=4))
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    again = build_config((load_yaml(str(path)), str(path)))
    assert again.to_dict() == cfg.to_dict() and again == cfg  # the settings; provenance is not compared
    assert set(SECTIONS) <= set(cfg.to_dict())
