"""Relative local paths: made absolute where the run runs (Ray Train refuses a relative storage path, and
training workers do not share the driver's working directory), refused in jobs bound for a cluster."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dreambooth import models, pipeline, storage
from dreambooth.cli import build_parser, config_from_args, main
from dreambooth.config import all_fields

REPO = Path(__file__).resolve().parents[1]


def test_a_plain_path_is_made_absolute_and_a_uri_is_left_as_it_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("runs/dog") == str(tmp_path / "runs" / "dog")
    assert storage.absolute("./runs/../runs/dog") == str(tmp_path / "runs" / "dog")
    assert storage.absolute("~/runs") == os.path.expanduser("~/runs")
    assert storage.absolute("file://runs/dog") == f"file://{tmp_path}/runs/dog"
    assert storage.absolute("/data/runs") == "/data/runs"
    assert storage.absolute("s3://bucket/runs/dog") == "s3://bucket/runs/dog"


def test_preflight_makes_the_outputs_photos_priors_and_model_absolute(tmp_path, monkeypatch):
    shutil.copytree(REPO / "examples" / "subjects" / "two_tone_triangle", tmp_path / "photos")
    shutil.copytree(models.resolve_model("shapes"), tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--model", "model", "--instance-dir", "photos", "--class-noun", "triangle", "--output", "runs/x",
            "--prior-output", "cache"]
    cfg = config_from_args(build_parser().parse_args(argv), list(all_fields()))
    prepared = pipeline.preflight(cfg)
    resolved = prepared.config
    assert (resolved.output, resolved.subject.instance_dir) == (str(tmp_path / "runs" / "x"), str(tmp_path / "photos"))
    assert resolved.prior_root == str(tmp_path / "cache") and prepared.model_path == str(tmp_path / "model")
    assert resolved.model == str(tmp_path / "model")  # as run.json records it: `eval` loads the base from anywhere
    # The copy carries the shapes recipe: photos without captions still get its without_captions settings.
    (tmp_path / "bare").mkdir()
    for photo in (tmp_path / "photos").glob("*.png"):
        shutil.copy(photo, tmp_path / "bare" / photo.name)
    bare = pipeline.preflight(config_from_args(build_parser().parse_args(
        [*argv[:4], "bare", *argv[5:]]), list(all_fields()))).config
    assert (bare.train.max_train_steps, bare.prior.num_class_images) == (600, 160)
    assert (resolved.train.max_train_steps, resolved.prior.num_class_images) == (1200, 320)
    assert cfg.output == "runs/x"  # the caller's config is not written
    default_cache = pipeline.preflight(config_from_args(build_parser().parse_args(argv[:-2]), list(all_fields())))
    assert default_cache.config.prior_root == str(tmp_path / "runs" / "priors")


def test_submit_refuses_relative_paths_a_cluster_job_would_resolve_in_its_own_folder(tmp_path, capsys, monkeypatch):
    manifest = tmp_path / "m.yaml"
    manifest.write_text("subjects:\n  - {name: a, instance_dir: photos/a, class_noun: dog}\n")
    argv = ["submit", "--manifest", str(manifest), "--namespace", "ml", "--cluster", "db", "--model", "tiny", "--image", "db:1", "--dry-run",
            "--offline"]
    assert main([*argv, "--output", "runs"]) == 2
    assert "--output runs is a relative path" in capsys.readouterr().err
    assert main([*argv, "--output", "s3://b/runs"]) == 2
    err = capsys.readouterr().err
    assert "subject a's instance_dir photos/a is a relative path" in err and "s3://bucket/photos/a" in err
    manifest.write_text("subjects:\n  - {name: a, instance_dir: s3://b/photos/a, class_noun: dog}\n")
    assert main([*argv, "--output", "s3://b/runs", "--prior-output", "cache"]) == 2
    assert "--prior-output cache is a relative path" in capsys.readouterr().err
    assert main([*argv, "--output", "s3://b/runs", "--prior-output", "/mnt/shared/cache"]) == 0  # absolute: allowed
    assert main([*argv, "--output", "/mnt/shared/runs/", "--prior-output", "/mnt/shared/./cache/"]) == 0  # untidy, still absolute
    assert main([*argv, "--output", "~/runs"]) == 2
    assert "~ is this machine's home, not the pod's" in capsys.readouterr().err
    # A model folder here, named relatively, is refused; a hub id (also without a leading /) is not a path.
    shutil.copytree(models.resolve_model("tiny"), tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--output", "s3://b/runs", "--model", "model"]) == 2
    assert "--model folder model is a relative path" in capsys.readouterr().err
    assert main([*argv, "--output", "s3://b/runs", "--model", str(tmp_path / "model")]) == 0
