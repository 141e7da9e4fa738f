"""One local worker trained in the driver's own process (``training.local``): when ``--launcher auto``
picks it, and how it handles an error inside training (a restart from the subject's checkpoint,
as a Ray Train worker group would), all without Ray. These tests leave this process a one-rank
process group, as a `dreambooth run` process has."""

from __future__ import annotations

import pytest
import torch

from dreambooth import cluster, pipeline
from dreambooth.config import ConfigError, TrainConfig, build_config
from dreambooth.training import checkpoint, local


@pytest.mark.parametrize("launcher,workers,address,ray_up,expected", [
    ("auto", 1, None, False, "in-process"),
    ("auto", 2, None, False, "ray-train"),  # several ranks need a worker group
    ("auto", 1, "ray://head:10001", False, "ray-train"),  # inside `ray job submit`: train on the cluster's workers
    ("auto", 1, None, True, "ray-train"),  # this process already joined a cluster
    ("ray-train", 1, None, False, "ray-train"),
    ("in-process", 1, "ray://head:10001", False, "in-process"),  # asked for explicitly
])
def test_auto_trains_in_process_only_for_one_worker_off_cluster(monkeypatch, launcher, workers, address, ray_up, expected):
    monkeypatch.setattr(cluster, "ray_is_up", lambda: ray_up)
    if address:
        monkeypatch.setenv("RAY_ADDRESS", address)
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster.resolve_launcher(TrainConfig(launcher=launcher, workers=workers)) == expected


def test_gpu_setting_of_a_local_run_follows_this_machine(monkeypatch):
    monkeypatch.delenv(cluster.ALLOW_FAKE_GPUS_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cluster.local_use_gpu("auto") is False and cluster.local_use_gpu("false") is False
    with pytest.raises(ConfigError, match="--use-gpu true, but this machine has no CUDA device.*--use-gpu false"):
        cluster.local_use_gpu("true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cluster.local_use_gpu("auto") is True and cluster.local_use_gpu("true") is True


def _work(tmp_path, dog_dir, **train):
    cfg = build_config(({"model": "tiny", "instance_dir": str(dog_dir), "class_noun": "dog", "resolution": 32,
                         "output": str(tmp_path / "out"), "identifier": "sks", "prior_loss_weight": 0,
                         "train_batch_size": 1, "num_sample_images": 0, "before_after": False,
                         "launcher": "in-process", **train}, "test"))
    return pipeline.subject_work("subject", pipeline.preflight(cfg), None, use_gpu=False)


def test_an_error_inside_training_resumes_the_subject_from_its_checkpoint(tmp_path, dog_dir, tiny_model_path, monkeypatch):
    """The first save of step 4 raises (as a lost rank would in a collective): the slot starts again,
    restores step 4 and finishes; the state and the record say so."""
    save = checkpoint.save_resumable
    raised = []

    def save_then_fail_once(engine, output, step, claim_id, settings):
        save(engine, output, step, claim_id, settings)
        if step == 4 and not raised:
            raised.append(step)
            raise RuntimeError("a collective failed")

    monkeypatch.setattr(checkpoint, "save_resumable", save_then_fail_once)
    work = _work(tmp_path, dog_dir, max_train_steps=6, checkpointing_steps=2, max_failures=1)
    state = local.train_here([work], cuda=False, max_retries=0)["subject"]
    assert state.status == "succeeded", state.error
    assert (state.restarts, state.resumed_from) == (1, 4)
    assert state.record["metrics"]["step"] == 6 and state.record["training_attempts"] == 2
    assert torch.distributed.get_world_size() == 1


def test_a_run_that_another_run_took_over_stops_without_writing_and_the_newer_one_finishes(
        tmp_path, dog_dir, tiny_model_path, monkeypatch):
    """Two runs on one output (a killed driver's workers still training while the same command runs
    again): when the newer one claims the output, the older one stops at its next save, writes no
    checkpoint, export or record, and is not retried; the newer one resumes and finishes."""
    save = checkpoint.save_resumable

    def newer_run_claims_before_step_4(engine, output, step, claim_id, settings):
        if step == 4:
            checkpoint.claim(output)  # what the newer run's rank 0 does before it restores
        save(engine, output, step, claim_id, settings)

    monkeypatch.setattr(checkpoint, "save_resumable", newer_run_claims_before_step_4)
    work = _work(tmp_path, dog_dir, max_train_steps=6, checkpointing_steps=2, max_failures=2)
    older = local.train_here([work], cuda=False, max_retries=2)["subject"]
    out = tmp_path / "out"
    assert older.status == "failed" and older.attempts == 1 and older.restarts == 0, older
    assert "another run started training into" in older.error and "--output" in older.error
    assert checkpoint.complete_steps(str(out)) == [2] and not list((out / "checkpoints").glob("step-000004*"))
    assert not (out / "run.json").exists() and not (out / "unet").exists()

    monkeypatch.setattr(checkpoint, "save_resumable", save)
    newer = local.train_here([work], cuda=False, max_retries=0)["subject"]
    assert newer.status == "succeeded", newer.error
    assert newer.record["metrics"]["resumed_from"] == 2 and newer.record["metrics"]["step"] == 6


@pytest.mark.parametrize("module,function,stopped,not_written", [
    ("dreambooth.training.checkpoint", "gathered_state_dict", "before exporting into it", ("run.json", "unet")),
    ("dreambooth.export", "export_trained", "before writing its run record", ("run.json", "loss.png")),
])
def test_a_run_taken_over_after_its_last_save_leaves_the_record_and_checkpoints_to_the_newer_one(
        tmp_path, dog_dir, tiny_model_path, monkeypatch, module, function, stopped, not_written):
    """A newer run claims the output while this one gathers its weights (or exports them): this one
    stops there, is not retried, and neither the run record nor the checkpoints are touched."""
    import importlib

    owner = importlib.import_module(module)
    original = getattr(owner, function)
    out = tmp_path / "out"

    def newer_run_claims_first(*args):
        checkpoint.claim(str(out))
        return original(*args)

    monkeypatch.setattr(owner, function, newer_run_claims_first)
    work = _work(tmp_path, dog_dir, max_train_steps=4, checkpointing_steps=2)
    state = local.train_here([work], cuda=False, max_retries=2)["subject"]
    assert state.status == "failed" and state.attempts == 1 and stopped in state.error
    assert not any((out / name).exists() for name in not_written)
    assert checkpoint.complete_steps(str(out)) == [2]  # left for the newer run to resume from


def test_a_subject_that_fails_every_attempt_fails_after_its_restarts(tmp_path, dog_dir, tiny_model_path, monkeypatch):
    def always_fail(engine, output, step, claim_id, settings):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(checkpoint, "save_resumable", always_fail)
    work = _work(tmp_path, dog_dir, max_train_steps=3, checkpointing_steps=1, max_failures=1)
    state = local.train_here([work], cuda=False, max_retries=0)["subject"]
    assert state.status == "failed" and state.restarts == 2
    assert "failed 2 times" in state.error and "RuntimeError: out of memory" in state.error
    assert not (tmp_path / "out" / "run.json").exists()


def test_a_model_that_cannot_load_fails_without_restarting(tmp_path, dog_dir, tiny_model_path, monkeypatch):
    from dreambooth.training import loop

    calls = []

    def broken(*args):
        calls.append(args)
        raise OSError("model folder vanished")

    monkeypatch.setattr(loop, "load_components", broken)
    state = local.train_here([_work(tmp_path, dog_dir, max_failures=5)], cuda=False, max_retries=0)["subject"]
    assert state.status == "failed" and len(calls) == 1
    assert state.error == "training could not start (OSError: model folder vanished)"


def _interrupted_after_step_2(monkeypatch, argv) -> None:
    """Run ``argv`` and stop it with Ctrl-C right after its step-2 checkpoint, as a user would."""
    from dreambooth.cli import main

    save = checkpoint.save_resumable

    def save_then_interrupt(engine, output, step, claim_id, settings):
        save(engine, output, step, claim_id, settings)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_resumable", save_then_interrupt)
    assert main(argv) == 130
    monkeypatch.setattr(checkpoint, "save_resumable", save)


def test_an_unfinished_run_resumes_only_with_its_own_settings_and_overwrite_starts_it_over(
        tmp_path, dog_dir, tiny_model_path, monkeypatch, capsys):
    """Ctrl-C after step 2. The same command with another learning rate is refused before anything
    runs (and names the setting); with more steps it resumes from step 2; --overwrite with the other
    learning rate starts over from step 0, and the user's own file in the output survives."""
    from dreambooth import export, storage
    from dreambooth.cli import main

    out = tmp_path / "out"
    argv = ["run", "--model", "tiny", "--instance-dir", str(dog_dir), "--class-noun", "dog", "--output", str(out),
            "--resolution", "32", "--identifier", "sks", "--prior-loss-weight", "0", "--launcher", "in-process",
            "--max-train-steps", "4", "--checkpointing-steps", "2", "--num-sample-images", "0",
            "--before-after", "false"]
    _interrupted_after_step_2(monkeypatch, argv)
    (out / "notes.txt").write_text("mine\n")
    listing = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    capsys.readouterr()

    assert main([*argv, "--learning-rate", "1e-3"]) == 2
    error = capsys.readouterr().err
    assert "holds the checkpoints of an unfinished run (step 2)" in error
    assert "learning_rate 5e-06 there, 0.001 now" in error and "--overwrite" in error
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == listing  # nothing written or removed

    assert main([*argv, "--max-train-steps", "6"]) == 0  # how long it trains may change
    record = export.read_run_record(str(out))
    assert record["metrics"]["resumed_from"] == 2 and record["metrics"]["step"] == 6

    again = tmp_path / "again"
    again_argv = [*argv[:8], str(again), *argv[9:]]
    _interrupted_after_step_2(monkeypatch, again_argv)
    (again / "notes.txt").write_text("mine\n")
    assert main([*again_argv, "--learning-rate", "1e-3", "--overwrite"]) == 0
    record = storage.read_json(str(again / export.RUN_RECORD))
    assert record["metrics"]["resumed_from"] == 0 and record["metrics"]["step"] == 4
    assert record["config"]["train"]["learning_rate"] == 1e-3 and (again / "notes.txt").read_text() == "mine\n"


def test_an_unfinished_run_of_an_auto_identifier_keeps_the_identifier_it_trained(tmp_path, dog_dir, tiny_model_path):
    """Its run drew another identifier than a fresh draw gives now (a bulk run's earlier subjects took
    the first): the re-run resumes with the one it trained, and refuses if another subject holds it."""
    import dataclasses
    import json

    cfg = build_config(({"model": "tiny", "instance_dir": str(dog_dir), "class_noun": "dog", "resolution": 32,
                         "output": str(tmp_path / "out"), "prior_loss_weight": 0}, "test"))
    fresh = pipeline.preflight(cfg).config.subject.identifier
    trained = pipeline.preflight(cfg, {fresh}).config
    assert trained.subject.identifier != fresh
    folder = tmp_path / "out" / checkpoint.CHECKPOINTS / checkpoint.step_dir_name(2, "0f0f0f0f")
    folder.mkdir(parents=True)
    (folder / checkpoint.PROGRESS).write_text(json.dumps(
        {"step": 2, "files": [], "settings": checkpoint.trained_settings(trained)}))

    resumed = pipeline.preflight(cfg).config
    assert resumed.subject.identifier == trained.subject.identifier
    assert "unfinished run" in resumed.sources["identifier"]
    with pytest.raises(ConfigError, match="which another subject now uses"):
        pipeline.preflight(cfg, {trained.subject.identifier})
    starting_over = dataclasses.replace(cfg, overwrite=True)
    assert pipeline.preflight(starting_over).config.subject.identifier == fresh  # --overwrite draws afresh
