"""`dreambooth submit` / `status` end to end: the real kubernetes client, over HTTP, against the
API-server double (which validates every RayJob against the KubeRay v1.7.0 CRD and every ConfigMap
against the strict Kubernetes schema). Both layouts: one bulk driver per manifest (the default) and
one RayJob per subject (shared cluster with gated drivers, or dedicated clusters admitted by Kueue)."""

import dataclasses
import shlex

import pytest
import yaml

from dreambooth import bulk
from dreambooth.kube import layouts as kube_layouts
from dreambooth.cli import build_parser, config_from_args, main
from dreambooth.config import validate
from kube_double import KubeApiDouble

NS = "ml"
IMAGE = "ghcr.io/org/dreambooth:0.1.0"
RESTRICTED_CONTAINER = {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                        "seccompProfile": {"type": "RuntimeDefault"}}


@pytest.fixture
def cluster_api(tmp_path):
    double = KubeApiDouble().start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "double",
        "clusters": [{"name": "double", "cluster": {"server": double.configuration().host}}],
        "users": [{"name": "me", "user": {"token": "test"}}],
        "contexts": [{"name": "double", "context": {"cluster": "double", "user": "me"}}],
    }))
    yield double, str(kubeconfig)
    double.stop()


def _manifest(tmp_path) -> str:
    path = tmp_path / "team-a.yaml"
    path.write_text(yaml.safe_dump({
        "defaults": {"max_train_steps": 800},
        "subjects": [
            {"name": "dog", "instance_dir": "s3://bucket/subjects/dog", "class_noun": "dog"},
            {"name": "teapot", "instance_dir": "s3://bucket/subjects/teapot", "class_noun": "teapot", "identifier": "sks",
             "extra_prior_prompts": ["a teapot on a kitchen table", "a teapot in a garden"]},
            {"name": "cat", "instance_dir": "s3://bucket/subjects/cat", "class_noun": "cat", "train_text_encoder": False},
        ],
    }))
    return str(path)


def _submit(manifest, kubeconfig, *extra, image=IMAGE):
    return main(["submit", "--manifest", manifest, "--namespace", NS, "--kubeconfig", kubeconfig,
                 "--cluster", "db-dreambooth", "--output", "s3://bucket/runs", "--model", "tiny",
                 *(["--image", image] if image else []), *extra])


def _flags(entrypoint: str) -> dict[str, list[str]]:
    """``--flag v1 v2 --other v`` → {"--flag": [v1, v2], "--other": [v]}."""
    words, flags, current = shlex.split(entrypoint), {}, None
    for word in words:
        if word.startswith("--"):
            current = flags.setdefault(word, [])
        elif current is not None:
            current.append(word)
    return flags


def test_submit_is_idempotent_and_status_reads_kuberay_state(cluster_api, tmp_path, capsys):
    """The per-subject layout on the shared cluster: one RayJob each, every field of its config."""
    double, kubeconfig = cluster_api
    manifest = _manifest(tmp_path)
    per_subject = ("--layout", "per-subject", "--max-retries", "0")
    assert _submit(manifest, kubeconfig, *per_subject) == 0
    out = capsys.readouterr().out
    assert out.count("created") == 3 and "dreambooth status --namespace ml --bulk-run team-a" in out

    jobs = {name: double.get(f"team-a-{name}", NS) for name in ("dog", "teapot", "cat")}
    assert all(jobs.values())
    argv = {n: shlex.split(j["spec"]["entrypoint"]) for n, j in jobs.items()}
    flags = {n: dict(zip(a[3::2], a[4::2])) for n, a in argv.items()}
    assert argv["dog"][:3] == ["python", "-m", "ray_jobs.personalize"]
    flags = {n: {k: v[0] for k, v in _flags(j["spec"]["entrypoint"]).items() if v} for n, j in jobs.items()}
    assert flags["dog"]["--output"] == "s3://bucket/runs/dog" and flags["dog"]["--max-train-steps"] == "800"
    assert flags["teapot"]["--identifier"] == "sks"
    assert flags["cat"]["--train-text-encoder"] == "false"
    identifiers = [flags[n]["--identifier"] for n in ("dog", "teapot", "cat")]
    assert len(set(identifiers)) == 3  # auto-picked ones are unique across the manifest
    assert jobs["dog"]["metadata"]["labels"]["dreambooth.io/bulk-run"] == "team-a"
    assert jobs["dog"]["spec"]["clusterSelector"] == {"ray.io/cluster": "db-dreambooth"}
    versions = {n: j["metadata"]["resourceVersion"] for n, j in jobs.items()}

    # The whole resolved config travels: every field, GPUs on by default on Kubernetes.
    from dreambooth.config import all_fields

    full = _flags(jobs["dog"]["spec"]["entrypoint"])
    unset = {"revision", "text_encoder_learning_rate", "snr_gamma", "sample_guidance_scale"}  # optional and unset here: None has no flag
    assert {f"--{n.replace('_', '-')}" for n in all_fields() if n not in unset} <= set(full)
    assert not unset & {flag[2:].replace("-", "_") for flag in full}
    assert full["--use-gpu"] == ["true"] and full["--model"] == ["tiny"]
    assert full["--sample-prompts"][0] == f"a {flags['dog']['--identifier']} dog on the beach"  # filled in
    assert full["--extra-prior-prompts"] == []  # a bare flag: none, whatever a model's recipe lists

    # What `dreambooth run` on the head parses from each entrypoint is the config planned here.
    planned = dict(bulk.plan(bulk.BulkOptions(manifest=manifest, output="s3://bucket/runs"), {"model": "tiny"},
                             check_paths=False, base={"use_gpu": "true"}))
    for name, job in jobs.items():
        parsed = config_from_args(build_parser().parse_args(["run", *shlex.split(job["spec"]["entrypoint"])[3:]]),
                                  list(all_fields()))
        expected = dataclasses.replace(planned[name], subject=dataclasses.replace(
            planned[name].subject, identifier=flags[name]["--identifier"]))  # drawn at submit
        expected.export = dataclasses.replace(expected.export, sample_prompts=validate(expected).sample_prompts())
        assert validate(parsed).to_dict() == validate(expected).to_dict(), name
    assert parsed.prior.extra_prior_prompts == [] and planned["dog"].prior.extra_prior_prompts == []
    assert planned["teapot"].prior.extra_prior_prompts == ["a teapot on a kitchen table", "a teapot in a garden"]
    submitter = jobs["dog"]["spec"]["submitterPodTemplate"]["spec"]
    assert submitter["containers"][0]["image"] == IMAGE
    assert RESTRICTED_CONTAINER.items() <= submitter["containers"][0]["securityContext"].items()
    assert submitter["securityContext"]["runAsNonRoot"] is True

    # Re-submitting the same manifest changes nothing.
    assert _submit(manifest, kubeconfig, *per_subject) == 0
    assert capsys.readouterr().out.count("unchanged") == 3
    assert {n: double.get(f"team-a-{n}", NS)["metadata"]["resourceVersion"] for n in jobs} == versions

    # A changed option reconfigures every job, and only that.
    assert _submit(manifest, kubeconfig, *per_subject, "--learning-rate", "2e-6") == 0
    assert capsys.readouterr().out.count("configured") == 3

    double.set_status("team-a-dog", {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running"}, NS)
    double.set_status("team-a-cat", {"jobStatus": "FAILED", "jobDeploymentStatus": "Failed", "message": "OOM"}, NS)
    assert main(["status", "--namespace", NS, "--kubeconfig", kubeconfig, "--bulk-run", "team-a"]) == 0
    table = capsys.readouterr().out
    assert "RUNNING" in table and "FAILED" in table and "OOM" in table and "teapot" in table


def test_dry_run_offline_prints_objects_and_creates_nothing(cluster_api, tmp_path, capsys):
    double, kubeconfig = cluster_api
    assert _submit(_manifest(tmp_path), kubeconfig, "--dry-run", "--offline") == 0
    out = capsys.readouterr().out
    docs = [d for d in yaml.safe_load_all(out[: out.index("\nconfigmap/")]) if d]
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob"]
    assert double.get("team-a-bulk", NS) is None and not double.requests


def test_unreachable_cluster_is_a_clear_error(tmp_path, capsys):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "gone",
        "clusters": [{"name": "gone", "cluster": {"server": "http://127.0.0.1:9"}}],
        "users": [{"name": "me", "user": {}}],
        "contexts": [{"name": "gone", "context": {"cluster": "gone", "user": "me"}}],
    }))
    assert main(["status", "--namespace", NS, "--kubeconfig", str(kubeconfig)]) == 1
    assert "error:" in capsys.readouterr().err


def _five(tmp_path) -> str:
    path = tmp_path / "five.yaml"
    path.write_text(yaml.safe_dump({"defaults": {"max_train_steps": 600}, "subjects": [
        {"name": f"s{i}", "instance_dir": f"s3://bucket/subjects/s{i}", "class_noun": "dog"} for i in range(5)]}))
    return str(path)


def test_bulk_layout_is_one_driver_with_the_manifest_in_a_configmap(cluster_api, tmp_path, capsys):
    from dreambooth import bulk

    double, kubeconfig = cluster_api
    assert _submit(_five(tmp_path), kubeconfig, "--max-concurrent", "2") == 0
    out = capsys.readouterr().out
    assert "configmap/five-manifest created" in out and "rayjob.ray.io/five-bulk created" in out
    assert [k for k in double.objects] == [("configmaps", NS, "five-manifest"), ("rayjobs", NS, "five-bulk")]

    job = double.get("five-bulk", NS)
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:2] == ["dreambooth", "bulk"]
    flags = {k: v[0] for k, v in _flags(job["spec"]["entrypoint"]).items()}
    assert flags == {"--manifest": "manifest.yaml", "--output": "s3://bucket/runs", "--max-concurrent": "2",
                     "--max-retries": "1", "--summary-configmap": "five-bulk-summary"}
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"]) == {"working_dir": kube_layouts.MANIFEST_MOUNT}
    pod = job["spec"]["submitterPodTemplate"]["spec"]
    assert pod["volumes"] == [{"name": "manifest", "configMap": {"name": "five-manifest"}}]
    assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == kube_layouts.MANIFEST_MOUNT
    assert RESTRICTED_CONTAINER.items() <= pod["containers"][0]["securityContext"].items()
    assert job["metadata"]["labels"]["dreambooth.io/mode"] == "bulk"
    assert "entrypointResources" not in job["spec"]

    # The manifest holds each subject's whole resolved config; the driver's own plan reads it back.
    text = double.get("five-manifest", NS, plural="configmaps")["data"]["manifest.yaml"]
    manifest = yaml.safe_load(text)
    assert len(manifest["subjects"]) == 5 and manifest["defaults"]["max_train_steps"] == 600
    assert manifest["defaults"]["use_gpu"] == "true" and manifest["defaults"]["model"] == "tiny"
    assert len({s["identifier"] for s in manifest["subjects"]}) == 5
    local = tmp_path / "manifest.yaml"
    local.write_text(text)
    planned = dict(bulk.plan(bulk.BulkOptions(str(local), "s3://bucket/runs"), check_paths=False))
    assert planned["s3"].train.max_train_steps == 600 and planned["s3"].output == "s3://bucket/runs/s3"

    assert _submit(_five(tmp_path), kubeconfig, "--max-concurrent", "2") == 0
    assert capsys.readouterr().out.count("unchanged") == 2


def test_status_shows_every_subject_of_a_bulk_run_from_its_summary(cluster_api, tmp_path, capsys):
    double, kubeconfig = cluster_api
    assert _submit(_five(tmp_path), kubeconfig) == 0
    capsys.readouterr()
    assert main(["status", "--namespace", NS, "--kubeconfig", kubeconfig]) == 0
    assert "no summary yet" in capsys.readouterr().out

    states = ["succeeded", "running", "pending", "failed", "retrying"]
    with double.api_client() as api_client:
        kube_layouts.publish_summary(api_client, NS, "five-bulk-summary", {"finished": False, "subjects": [
            {"name": f"s{i}", "status": state, "error": "OOM" if state == "failed" else None,
             "started_unix": 1.7e9 if state != "pending" else None} for i, state in enumerate(states)]})
    double.set_status("five-bulk", {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running"}, NS)
    assert main(["status", "--namespace", NS, "--kubeconfig", kubeconfig, "--bulk-run", "five"]) == 0
    table = capsys.readouterr().out
    for i, state in enumerate(states):
        assert any(line.startswith(f"s{i} ") and state.upper() in line for line in table.splitlines()), table
    assert "OOM" in table and "5 subjects in 1 RayJob: 1 FAILED, 1 PENDING, 1 RETRYING, 1 RUNNING, 1 SUCCEEDED" in table


def test_status_finds_chart_jobs_whatever_the_release_name(cluster_api, capsys):
    """A release with nameOverride labels its RayJobs app.kubernetes.io/name=<override>: still found."""
    double, kubeconfig = cluster_api
    with double.api_client() as api_client:
        from kubernetes import client

        client.CustomObjectsApi(api_client).create_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", {
            "apiVersion": "ray.io/v1", "kind": "RayJob",
            "metadata": {"name": "team-x-dog", "labels": {"app.kubernetes.io/name": "personalize",
                                                          "dreambooth.io/bulk-run": "team-x", "dreambooth.io/subject": "dog"}},
            "spec": {"entrypoint": "python -m ray_jobs.personalize", "clusterSelector": {"ray.io/cluster": "x"}}})
    assert main(["status", "--namespace", NS, "--kubeconfig", kubeconfig]) == 0
    assert "team-x-dog" in capsys.readouterr().out


def test_per_subject_jobs_on_dedicated_clusters_wait_for_kueue(cluster_api, tmp_path, capsys):
    double, kubeconfig = cluster_api
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"headGroupSpec": {"rayStartParams": {}, "template": {"spec": {"containers": [
        {"name": "ray-head", "image": IMAGE}]}}}, "workerGroupSpecs": [{"groupName": "gpu", "replicas": 1, "rayStartParams": {},
        "template": {"spec": {"containers": [{"name": "ray-worker", "image": IMAGE}]}}}]}))
    argv = ["submit", "--manifest", _five(tmp_path), "--namespace", NS, "--kubeconfig", kubeconfig, "--output",
            "s3://bucket/runs", "--model", "tiny", "--layout", "per-subject", "--ray-cluster-spec", str(spec),
            "--queue-name", "gpu-queue", "--max-retries", "2"]
    assert main(argv) == 0
    jobs = [double.get(f"five-s{i}", NS) for i in range(5)]
    assert all(j["spec"]["suspend"] is True and j["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
               for j in jobs)
    assert all(j["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] is False and j["spec"]["backoffLimit"] == 2
               and j["spec"]["shutdownAfterJobFinishes"] is True for j in jobs)
    assert jobs[0]["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"] == IMAGE  # the spec's head image


def test_per_subject_drivers_on_the_shared_cluster_are_gated(cluster_api, tmp_path):
    double, kubeconfig = cluster_api
    assert _submit(_five(tmp_path), kubeconfig, "--layout", "per-subject", "--max-concurrent", "2", "--max-retries", "0") == 0
    jobs = [double.get(f"five-s{i}", NS) for i in range(5)]
    assert all(j["spec"]["entrypointResources"] == '{"dreambooth-driver": 1}' for j in jobs)


@pytest.mark.parametrize("extra,message", [
    (("--layout", "per-subject", "--max-retries", "2"), "KubeRay refuses retries of RayJobs on a shared cluster"),
    (("--queue-name", "q"), "--queue-name (Kueue) needs --layout per-subject"),
])
def test_submit_refuses_limits_its_layout_cannot_honour(cluster_api, tmp_path, capsys, extra, message):
    double, kubeconfig = cluster_api
    assert _submit(_five(tmp_path), kubeconfig, *extra) == 2
    assert message in capsys.readouterr().err and not double.objects


def test_submit_without_an_image_reads_the_clusters_own(cluster_api, tmp_path, capsys):
    double, kubeconfig = cluster_api
    assert _submit(_five(tmp_path), kubeconfig, image=None) == 2  # the double has no RayCluster db-dreambooth
    assert "cannot read RayCluster ml/db-dreambooth" in capsys.readouterr().err
