"""Bulk runs on one Ray cluster: manifest checks first, shared priors once, a bad subject fails alone,
finished subjects are skipped on a re-run."""

import json
import shutil
import threading
import time

import pytest
import torch
import yaml

from dreambooth import bulk, storage
from dreambooth.cli import main
from dreambooth.config import ConfigError


def _manifest(tmp_path, subjects, defaults=None):
    path = tmp_path / "subjects.yaml"
    path.write_text(yaml.safe_dump({"subjects": subjects, **({"defaults": defaults} if defaults else {})}))
    return str(path)


@pytest.mark.parametrize(
    "subjects,message",
    [
        ([{"name": "a", "instance_dir": "{dog}", "class_noun": "dog"}, {"name": "a", "instance_dir": "{dog}", "class_noun": "dog"}], "used twice"),
        ([{"name": "My Dog", "instance_dir": "{dog}", "class_noun": "dog"}], "my-dog"),
        ([{"instance_dir": "{dog}", "class_noun": "dog"}], "needs a 'name'"),
        ([{"name": "a", "instance_dir": "{dog}/missing", "class_noun": "dog"}], "does not exist"),
        ([{"name": "a", "instance_dir": "{dog}", "class_noun": "dog", "identifier": "sks"},
          {"name": "b", "instance_dir": "{dog}", "class_noun": "cat", "identifier": "sks"}], "also used by 'a'"),
        ([{"name": "a", "instance_dir": "{dog}", "class_noun": "dog", "learning_rat": 1}], "did you mean 'learning_rate'"),
        ([{"name": "a", "instance_dir": "{dog}", "class_noun": "dog", "output": "x"}], "'output' is set by bulk"),
        ([{"name": "a", "instance_dir": "{dog}", "class_noun": ""}], "subject 'a': --class-noun is empty"),
        ([], "has no subjects"),
    ],
)
def test_manifest_is_checked_before_anything_runs(tmp_path, dog_dir, subjects, message):
    subjects = json.loads(json.dumps(subjects).replace("{dog}", str(dog_dir)))
    options = bulk.BulkOptions(_manifest(tmp_path, subjects), str(tmp_path / "runs"))
    with pytest.raises(ConfigError, match=message):
        bulk.plan(options, {"model": "tiny"})
    assert not (tmp_path / "runs").exists()


def test_layers_defaults_flags_and_subject_keys(tmp_path, dog_dir):
    subjects = [{"name": "a", "instance_dir": str(dog_dir), "class_noun": "dog", "learning_rate": 3e-6},
                {"name": "b", "instance_dir": str(dog_dir), "class_noun": "cat"}]
    path = _manifest(tmp_path, subjects, defaults={"max_train_steps": 7, "learning_rate": 1e-6, "workers": 3})
    planned = dict(bulk.plan(bulk.BulkOptions(path, "s3://bucket/runs"), {"workers": 2, "model": "tiny"}))
    assert planned["a"].train.learning_rate == 3e-6 and planned["b"].train.learning_rate == 1e-6
    assert planned["a"].train.max_train_steps == 7 and planned["b"].train.workers == 2  # flags beat defaults
    assert planned["a"].output == "s3://bucket/runs/a" and planned["a"].prior_root == "s3://bucket/runs/priors"



def test_validated_configs_are_not_written_afterwards(tmp_path, dog_dir):
    """Identifiers drawn for the cluster's jobs and by preflight land in copies; the planned configs
    (validated once) stay as they were, and the copies agree with each other."""
    import copy

    from dreambooth import pipeline

    subjects = [{"name": n, "instance_dir": str(dog_dir), "class_noun": "dog"} for n in ("a", "b")]
    planned = bulk.plan(bulk.BulkOptions(_manifest(tmp_path, subjects), str(tmp_path / "runs")), {"model": "tiny"})
    before = copy.deepcopy(planned)
    drawn = [cfg.subject.identifier for _, cfg in bulk.resolve_identifiers(planned)]
    jobs = bulk.subject_jobs(planned)
    prepared = pipeline.preflight(planned[0][1])
    assert planned == before and all(cfg.subject.identifier == "auto" for _, cfg in planned)
    assert "auto" not in drawn and len(set(drawn)) == 2
    assert [job.args["identifier"] for job in jobs] == drawn  # the same draw, however often it is asked
    assert prepared.config.subject.identifier == drawn[0] and prepared.config.train.resolution == 32
    assert prepared.config.sources["identifier"].startswith("drawn from the tokenizer")

@pytest.mark.ray
@pytest.mark.e2e
def test_bulk_shares_priors_isolates_failures_skips_finished_and_overwrites_on_request(ray_cluster, tmp_path, dog_dir, capsys):
    bad_dir = tmp_path / "bad-dog"
    shutil.copytree(dog_dir, bad_dir)
    (bad_dir / "00.jpg").write_bytes(b"\xff\xd8 broken")
    subjects = [
        {"name": "dog-a", "instance_dir": str(dog_dir), "class_noun": "dog"},
        {"name": "dog-b", "instance_dir": str(bad_dir), "class_noun": "dog"},
        {"name": "cat-c", "instance_dir": str(dog_dir), "class_noun": "cat"},
    ]
    defaults = {"model": "tiny", "resolution": 32, "num_class_images": 2, "prior_batch_size": 2, "num_inference_steps": 2,
                "max_train_steps": 2, "checkpointing_steps": 0, "workers": 1, "num_sample_images": 1}
    manifest = _manifest(tmp_path, subjects, defaults=defaults)
    out = tmp_path / "runs"
    argv = ["bulk", "--manifest", manifest, "--output", str(out), "--max-concurrent", "2"]

    assert main(argv) == 1  # one subject failed
    summary = storage.read_json(str(out / bulk.SUMMARY))
    status = {s["name"]: s for s in summary["subjects"]}
    assert status["dog-a"]["status"] == status["cat-c"]["status"] == "succeeded"
    assert status["dog-b"]["status"] == "failed" and "00.jpg is corrupt" in status["dog-b"]["error"]
    assert len(summary["prior_caches"]) == 2 and all(n == 2 for n in summary["prior_caches"].values())
    identifiers = [status[n]["identifier"] for n in ("dog-a", "cat-c")]
    assert len(set(identifiers)) == 2 and None not in identifiers
    table = capsys.readouterr().out
    assert "dog-b" in table and "failed" in table and "2 succeeded, 1 failed" in table

    # Fix the bad subject and run the same manifest again: finished subjects are skipped and the
    # fixed one trains on the already generated dog priors.
    shutil.copy(dog_dir / "00.jpg", bad_dir / "00.jpg")
    assert main(argv) == 0
    summary = storage.read_json(str(out / bulk.SUMMARY))
    status = {s["name"]: s for s in summary["subjects"]}
    assert status["dog-a"]["status"] == status["cat-c"]["status"] == "skipped"
    assert status["dog-b"]["status"] == "succeeded"
    assert list(summary["prior_caches"].values()) == [0]  # reused, nothing generated
    assert status["dog-b"]["identifier"] not in identifiers
    record = storage.read_json(str(out / "dog-b" / "run.json"))
    assert record["priors"]["generated"] == 0

    # `overwrite: true` on one subject: its earlier run goes, checkpoints too (none is resumed), its
    # user's notes stay, and it trains again from step 0.
    from dreambooth.training import checkpoint

    notes = out / "dog-a" / "notes.txt"
    notes.write_text("mine\n")
    stale = out / "dog-a" / "checkpoints" / checkpoint.step_dir_name(1, "0badc0de")
    stale.mkdir(parents=True)
    (stale / checkpoint.PROGRESS).write_text(json.dumps({"step": 1, "files": []}))
    (tmp_path / "again").mkdir()
    again = _manifest(tmp_path / "again", [{**subjects[0], "overwrite": True}], defaults=defaults)
    assert main(["bulk", "--manifest", again, "--output", str(out)]) == 0
    record = storage.read_json(str(out / "dog-a" / "run.json"))
    assert record["metrics"]["resumed_from"] == 0 and record["metrics"]["step"] == 2
    assert notes.read_text() == "mine\n" and not stale.exists()


FAST_SUBJECT = {"model": "tiny", "resolution": 32, "num_class_images": 2, "prior_batch_size": 2,
                "num_inference_steps": 2, "checkpointing_steps": 0, "workers": 1, "num_sample_images": 0,
                "before_after": False}


@pytest.mark.ray
@pytest.mark.e2e
def test_failed_subjects_are_retried_up_to_the_limit_without_stopping_the_group(ray_cluster, tmp_path, dog_dir, monkeypatch):
    """Two subjects' photos are gone when their worker reads them (one for good, one only the first
    time): each is retried on the same warm worker group, which trains the third meanwhile."""
    from dreambooth import pipeline

    late = tmp_path / "late-photos"  # appears once its subject's first attempt has failed
    real_work = pipeline.subject_work

    def work_reading_elsewhere(name, prepared, *args, **kwargs):  # after preflight checked the real photos
        work = real_work(name, prepared, *args, **kwargs)
        if name == "always-fails":
            work.config.subject.instance_dir = str(tmp_path / "deleted-photos")
        elif name == "fails-once":
            work.config.subject.instance_dir = str(late)
        return work

    monkeypatch.setattr(pipeline, "subject_work", work_reading_elsewhere)
    summary = tmp_path / "runs" / bulk.SUMMARY
    stop = threading.Event()

    def put_back_photos():  # as a user would, on seeing the failure in the summary
        while not stop.is_set():
            if summary.exists() and '"retrying"' in summary.read_text() and not late.exists():
                states = {s["name"]: s["status"] for s in json.loads(summary.read_text())["subjects"]}
                if states["fails-once"] == "retrying":
                    shutil.copytree(dog_dir, late)
            time.sleep(0.05)

    watcher = threading.Thread(target=put_back_photos, daemon=True)
    watcher.start()
    subjects = [{"name": n, "instance_dir": str(dog_dir), "class_noun": "dog"} for n in ("always-fails", "fails-once", "fine")]
    subjects[2]["max_train_steps"] = 30  # trains between the two tries of fails-once: time to put its photos back
    options = bulk.BulkOptions(_manifest(tmp_path, subjects), str(tmp_path / "runs"), max_concurrent=1, max_retries=2)
    planned = bulk.plan(options, {**FAST_SUBJECT, "max_train_steps": 2, "prior_loss_weight": 0})
    try:
        report = bulk.run_bulk(options, planned)
    finally:
        stop.set()
        watcher.join()
    status = {r.name: r for r in report.results}
    assert (status["always-fails"].status, status["always-fails"].attempts) == ("failed", 3)
    assert "deleted-photos does not exist" in status["always-fails"].error
    assert (status["fails-once"].status, status["fails-once"].attempts) == ("succeeded", 2)
    assert (status["fine"].status, status["fine"].attempts) == ("succeeded", 1)
    assert not report.ok
    records = {n: storage.read_json(str(tmp_path / "runs" / n / "run.json")) for n in ("fails-once", "fine")}
    # One worker group did it all: both trained after other subjects on it, none restarted.
    assert all(r["metrics"]["warm_start"] for r in records.values())
    assert records["fails-once"]["metrics"]["subjects_before_on_this_group"] == 4
    assert all(status[n].restarts == 0 for n in status)


@pytest.mark.ray
@pytest.mark.e2e
def test_warm_reset_trains_exactly_like_a_fresh_start(ray_cluster, tmp_path, dog_dir):
    """The same subject twice on one warm worker group: the second (reset to the base weights in
    memory, a fresh optimizer) has the first's losses step for step and ends at the same weights."""
    from safetensors.torch import load_file

    subjects = [{"name": n, "instance_dir": str(dog_dir), "class_noun": "dog", "identifier": "sks"} for n in ("fresh", "warm")]
    options = bulk.BulkOptions(_manifest(tmp_path, subjects), str(tmp_path / "runs"), max_concurrent=1,
                               distinct_identifiers=False)
    report = bulk.run_bulk(options, bulk.plan(options, {**FAST_SUBJECT, "max_train_steps": 3, "save_dtype": "fp32"}))
    assert report.ok, report.results
    fresh, warm = (storage.read_json(str(tmp_path / "runs" / n / "run.json")) for n in ("fresh", "warm"))
    assert (fresh["metrics"]["warm_start"], warm["metrics"]["warm_start"]) == (False, True)
    assert warm["loss_curve"]["step"] == [1, 2, 3]
    assert warm["loss_curve"]["loss"][0] == pytest.approx(fresh["loss_curve"]["loss"][0], abs=1e-6)
    assert warm["loss_curve"]["loss"] == pytest.approx(fresh["loss_curve"]["loss"], abs=1e-5)
    for part in ("unet", "text_encoder"):
        (a,), (b,) = ((tmp_path / "runs" / n / part).glob("*.safetensors") for n in ("fresh", "warm"))
        first, second = load_file(str(a)), load_file(str(b))
        assert all(torch.allclose(first[k], second[k], atol=1e-6) for k in first), part
    # and the warm subject did not pay the group's start-up (worker group, model load) again; compared
    # as what was done, not as sub-second times (those swap order under a noisy neighbour)
    assert {"setup_worker_group_s", "setup_load_model_s"} <= set(fresh["metrics"])
    assert not {"setup_worker_group_s", "setup_load_model_s"} & set(warm["metrics"])


@pytest.mark.ray
@pytest.mark.e2e
def test_in_cluster_bulk_driver_publishes_each_subject_state_while_it_runs(ray_cluster, tmp_path, dog_dir, monkeypatch, capsys):
    """What `dreambooth submit` (bulk layout) makes the cluster run, run here: the manifest from its
    ConfigMap in the working directory, the RayJob's own entrypoint, the summary ConfigMap on an API
    double; then `dreambooth status` reads every subject's state from it."""
    import shlex
    import threading
    import time

    from dreambooth.kube import layouts as kube_layouts
    from kube_double import KubeApiDouble

    bad_dir = tmp_path / "bad-dog"
    shutil.copytree(dog_dir, bad_dir)
    (bad_dir / "00.jpg").write_bytes(b"\xff\xd8 broken")
    subjects = [{"name": "dog-a", "instance_dir": str(dog_dir), "class_noun": "dog"},
                {"name": "dog-bad", "instance_dir": str(bad_dir), "class_noun": "dog"},
                {"name": "dog-c", "instance_dir": str(dog_dir), "class_noun": "dog"}]
    manifest = _manifest(tmp_path, subjects, defaults={
        "resolution": 32, "num_class_images": 2, "prior_batch_size": 2, "num_inference_steps": 2,
        # enough steps that a subject is still running when the driver next publishes (it polls twice a second)
        "max_train_steps": 20, "checkpointing_steps": 0, "workers": 1, "num_sample_images": 0, "use_gpu": "false"})
    out = tmp_path / "runs"

    double = KubeApiDouble().start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "d",
        "clusters": [{"name": "d", "cluster": {"server": double.configuration().host}}],
        "users": [{"name": "u", "user": {"token": "t"}}], "contexts": [{"name": "d", "context": {"cluster": "d", "user": "u"}}]}))
    try:
        assert main(["submit", "--manifest", manifest, "--namespace", "ml", "--kubeconfig", str(kubeconfig), "--cluster", "db",
                     "--image", "db:1", "--output", str(out), "--model", "tiny", "--max-concurrent", "1", "--max-retries", "0"]) == 0
        job = double.get("subjects-bulk", "ml")
        workdir = tmp_path / "working_dir"  # what `ray job submit --runtime-env-json {working_dir: ...}` uploads
        workdir.mkdir()
        (workdir / "manifest.yaml").write_text(double.get("subjects-manifest", "ml", plural="configmaps")["data"]["manifest.yaml"])
        namespace_file = tmp_path / "namespace"
        namespace_file.write_text("ml")
        monkeypatch.setattr(kube_layouts, "SERVICE_ACCOUNT_NAMESPACE", str(namespace_file))  # as in the head pod
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.chdir(workdir)

        seen: dict[str, list[str]] = {}
        done = threading.Event()

        def watch():
            while True:
                last = done.is_set()  # one more read after the driver ends: its final write
                cm = double.get(job["metadata"]["annotations"]["dreambooth.io/summary-configmap"], "ml", plural="configmaps")
                for s in (json.loads(cm["data"]["bulk-summary.json"])["subjects"] if cm else []):
                    states = seen.setdefault(s["name"], [])
                    if not states or states[-1] != s["status"]:
                        states.append(s["status"])
                if last:
                    return
                time.sleep(0.1)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        words = shlex.split(job["spec"]["entrypoint"])
        assert words[:2] == ["dreambooth", "bulk"]
        try:
            code = main(words[1:])
        finally:
            done.set()
            watcher.join()
        assert code == 1  # one subject failed
        assert seen["dog-bad"][-1] == "failed"
        assert seen["dog-a"][-2:] == ["running", "succeeded"] and seen["dog-c"][-2:] == ["running", "succeeded"]
        assert seen["dog-c"][0] == "pending"  # --max-concurrent 1: it waited for dog-a
        summary = storage.read_json(str(out / bulk.SUMMARY))
        assert summary["finished"] is True and summary["counts"] == {"succeeded": 2, "failed": 1}
        sizes = {s["name"]: s["output_bytes"] for s in summary["subjects"]}
        assert sizes["dog-a"] > 1_000_000 and sizes["dog-bad"] is None
        capsys.readouterr()

        assert main(["status", "--namespace", "ml", "--kubeconfig", str(kubeconfig)]) == 0
        table = capsys.readouterr().out
        rows = {line.split()[0]: line for line in table.splitlines()[1:-1]}
        assert "SUCCEEDED" in rows["dog-a"] and "SUCCEEDED" in rows["dog-c"] and "FAILED" in rows["dog-bad"]
        assert "SubjectError" in rows["dog-bad"]  # the message column is cut to 60 characters
    finally:
        double.stop()


def test_jobs_planned_away_from_the_photos_leave_the_recipes_caption_dependent_settings_to_the_cluster(tmp_path):
    """`submit` plans without reading the photos, so settings the model's recipe gives by whether they have
    captions (shapes: steps and the text encoder's rate) are left out of the job; the rest of the recipe, and
    what the user set, travel with it."""
    subjects = [{"name": "tri", "instance_dir": "/mnt/photos/tri", "class_noun": "triangle"},
                {"name": "set", "instance_dir": "/mnt/photos/set", "class_noun": "star", "max_train_steps": 900}]
    options = bulk.BulkOptions(_manifest(tmp_path, subjects), "/mnt/out")
    planned = bulk.plan(options, {"model": "shapes"}, check_paths=False)
    jobs = {job.name: job.args for job in bulk.subject_jobs(planned)}
    assert "max-train-steps" not in jobs["tri"] and "text-encoder-learning-rate" not in jobs["tri"]
    assert jobs["tri"]["learning-rate"] == "0.0003" and jobs["tri"]["bare-prompt-with-captions"] == "true"
    assert jobs["set"]["max-train-steps"] == "900"  # the manifest's, not the recipe's
    document = bulk.manifest_for_cluster(planned)  # the in-cluster bulk driver's manifest: the same
    entries = {entry["name"]: {**document["defaults"], **entry} for entry in document["subjects"]}
    assert "max_train_steps" not in entries["tri"] and entries["set"]["max_train_steps"] == 900
    assert entries["tri"]["learning_rate"] == 3e-4
