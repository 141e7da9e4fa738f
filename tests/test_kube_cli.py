"""`dreambooth submit` / `status` end to end: the real kubernetes client, over HTTP, against the
API-server double (which validates every RayJob against the KubeRay v1.7.0 CRD)."""

import shlex

import pytest
import yaml

from dreambooth.cli import main
from kube_double import KubeApiDouble

NS = "ml"


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
            {"name": "teapot", "instance_dir": "s3://bucket/subjects/teapot", "class_noun": "teapot", "identifier": "sks"},
            {"name": "cat", "instance_dir": "s3://bucket/subjects/cat", "class_noun": "cat", "train_text_encoder": False},
        ],
    }))
    return str(path)


def _submit(manifest, kubeconfig, *extra):
    return main(["submit", "--manifest", manifest, "--namespace", NS, "--kubeconfig", kubeconfig,
                 "--cluster", "db-dreambooth", "--output", "s3://bucket/runs", "--model", "tiny", *extra])


def test_submit_is_idempotent_and_status_reads_kuberay_state(cluster_api, tmp_path, capsys):
    double, kubeconfig = cluster_api
    manifest = _manifest(tmp_path)
    assert _submit(manifest, kubeconfig) == 0
    out = capsys.readouterr().out
    assert out.count("created") == 3 and "dreambooth status --namespace ml --bulk-run team-a" in out

    jobs = {name: double.get(f"team-a-{name}", NS) for name in ("dog", "teapot", "cat")}
    assert all(jobs.values())
    argv = {n: shlex.split(j["spec"]["entrypoint"]) for n, j in jobs.items()}
    flags = {n: dict(zip(a[3::2], a[4::2])) for n, a in argv.items()}
    assert argv["dog"][:3] == ["python", "-m", "ray_jobs.personalize"]
    assert flags["dog"]["--output"] == "s3://bucket/runs/dog" and flags["dog"]["--max-train-steps"] == "800"
    assert flags["teapot"]["--identifier"] == "sks"
    assert flags["cat"]["--train-text-encoder"] == "false"
    identifiers = [flags[n]["--identifier"] for n in ("dog", "teapot", "cat")]
    assert len(set(identifiers)) == 3  # auto-picked ones are unique across the manifest
    assert jobs["dog"]["metadata"]["labels"]["dreambooth.io/bulk-run"] == "team-a"
    assert jobs["dog"]["spec"]["clusterSelector"] == {"ray.io/cluster": "db-dreambooth"}
    versions = {n: j["metadata"]["resourceVersion"] for n, j in jobs.items()}

    # Re-submitting the same manifest changes nothing.
    assert _submit(manifest, kubeconfig) == 0
    assert capsys.readouterr().out.count("unchanged") == 3
    assert {n: double.get(f"team-a-{n}", NS)["metadata"]["resourceVersion"] for n in jobs} == versions

    # A changed option reconfigures every job, and only that.
    assert _submit(manifest, kubeconfig, "--learning-rate", "2e-6") == 0
    assert capsys.readouterr().out.count("configured") == 3

    double.set_status("team-a-dog", {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running"}, NS)
    double.set_status("team-a-cat", {"jobStatus": "FAILED", "jobDeploymentStatus": "Failed", "message": "OOM"}, NS)
    assert main(["status", "--namespace", NS, "--kubeconfig", kubeconfig, "--bulk-run", "team-a"]) == 0
    table = capsys.readouterr().out
    assert "RUNNING" in table and "FAILED" in table and "OOM" in table and "teapot" in table


def test_dry_run_offline_prints_objects_and_creates_nothing(cluster_api, tmp_path, capsys):
    double, kubeconfig = cluster_api
    assert _submit(_manifest(tmp_path), kubeconfig, "--dry-run", "--offline") == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out.split("\n\n")[0]) if d]
    assert [d["kind"] for d in docs] == ["RayJob"] * 3
    assert double.get("team-a-dog", NS) is None


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
