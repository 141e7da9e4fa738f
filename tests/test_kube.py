"""dreambooth.kube against an HTTP-level double of the API server (tests/kube_double.py).

The real ``kubernetes`` client sends real requests; the double validates every write against the
KubeRay v1.7.0 RayJob CRD schema (tests/fixtures/kuberay-crds), like the API server would.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from kube_double import KubeApiDouble
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from dreambooth import kube
from dreambooth.kube import status as kube_status

NS = "ml"
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
RAY_CLUSTER_SPEC = {
    "rayVersion": "2.40.0",
    "headGroupSpec": {
        "rayStartParams": {},
        "template": {"spec": {"containers": [{"name": "ray-head", "ports": [{"containerPort": 6379, "name": "gcs"}]}]}},
    },
    "workerGroupSpecs": [
        {
            "groupName": "gpu",
            "replicas": 1,
            "minReplicas": 1,
            "maxReplicas": 1,
            "rayStartParams": {},
            "template": {
                "spec": {"containers": [{"name": "ray-worker", "resources": {"limits": {"nvidia.com/gpu": 1}}}]}
            },
        }
    ],
}


@pytest.fixture(scope="module")
def server():
    double = KubeApiDouble().start()
    yield double
    double.stop()


@pytest.fixture
def double(server):
    server.reset()
    return server


@pytest.fixture
def api(double):
    with double.api_client() as api_client:
        yield api_client


def shared(**overrides) -> kube.RayJobTarget:
    return kube.RayJobTarget(**{"namespace": NS, "bulk_run": "b1", "cluster_name": "dreambooth", **overrides})


def dedicated(**overrides) -> kube.RayJobTarget:
    fields = {"namespace": NS, "bulk_run": "b1", "ray_cluster_spec": RAY_CLUSTER_SPEC, "image": "reg/db:1"}
    return kube.RayJobTarget(**{**fields, **overrides})


def subject(name: str, **args: str) -> kube.SubjectJob:
    base = {"model": "tiny", "instance-dir": f"s3://b/{name}", "class-noun": "dog", "output": f"s3://b/runs/{name}"}
    return kube.SubjectJob(name, {**base, **args})


def rayjobs(target: kube.RayJobTarget, *names: str) -> list[dict]:
    return [kube.build_rayjob(subject(n), target) for n in names]


# --------------------------------------------------------------------------- building


def test_build_rayjob_on_shared_cluster():
    obj = kube.build_rayjob(subject("dog"), shared())
    assert obj["apiVersion"] == "ray.io/v1" and obj["kind"] == "RayJob"
    assert obj["metadata"] == {
        "name": "b1-dog",
        "namespace": NS,
        "labels": {
            "app.kubernetes.io/name": "dreambooth",
            "app.kubernetes.io/managed-by": "dreambooth-cli",
            "dreambooth.io/bulk-run": "b1",
            "dreambooth.io/subject": "dog",
            "dreambooth.io/mode": "per-subject",
        },
    }
    assert obj["spec"] == {
        "entrypoint": "python -m ray_jobs.personalize --class-noun dog --instance-dir s3://b/dog "
        "--model tiny --output s3://b/runs/dog",
        "submissionMode": "K8sJobMode",
        "backoffLimit": 0,
        "clusterSelector": {"ray.io/cluster": "dreambooth"},
    }


def test_build_rayjob_on_dedicated_cluster():
    runtime_env = {"env_vars": {"HF_HOME": "/cache"}}
    obj = kube.build_rayjob(subject("dog"), dedicated(service_account="trainer", runtime_env=runtime_env))
    spec = obj["spec"]
    assert "clusterSelector" not in spec
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] == 3600
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == runtime_env
    head, worker = spec["rayClusterSpec"]["headGroupSpec"], spec["rayClusterSpec"]["workerGroupSpecs"][0]
    for group in (head, worker):
        assert group["template"]["spec"]["containers"][0]["image"] == "reg/db:1"
        assert group["template"]["spec"]["serviceAccountName"] == "trainer"
    assert "image" not in RAY_CLUSTER_SPEC["headGroupSpec"]["template"]["spec"]["containers"][0]  # not mutated


def test_entrypoint_is_quoted_and_survives_both_shells():
    job = kube.SubjectJob("dog", {"prompt": "a photo of sks dog", "output": "s3://b/x=1,y"})
    entrypoint = kube.build_rayjob(job, shared())["spec"]["entrypoint"]
    assert entrypoint == "python -m ray_jobs.personalize --output s3://b/x=1,y --prompt 'a photo of sks dog'"
    argv = shlex.split(entrypoint)  # the submitter's bash, then Ray re-joins and runs it in a shell again
    assert shlex.split(subprocess.list2cmdline(argv)) == argv
    assert argv[3:] == ["--output", "s3://b/x=1,y", "--prompt", "a photo of sks dog"]


def test_numbers_become_flag_values():
    entrypoint = kube.build_rayjob(kube.SubjectJob("dog", {"steps": 400, "lr": 5e-06}), shared())["spec"]["entrypoint"]
    assert entrypoint.endswith("--lr 5e-06 --steps 400")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({"output": "s3://b/dog;rm -rf /"}, r"subject 'dog': --output .*';'"),
        ({"output": "$HOME/x"}, r"'\$'"),
        ({"--output": "x"}, r"without leading dashes"),
        ({"with-prior": True}, r"--with-prior must be a string or a number, got bool True"),
    ],
)
def test_unsafe_args_are_refused(args, expected):
    with pytest.raises(ValueError, match=expected):
        kube.build_rayjob(kube.SubjectJob("dog", args), shared())


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"ray_cluster_spec": RAY_CLUSTER_SPEC}, "exactly one of cluster_name"),
        ({"cluster_name": None}, "exactly one of cluster_name"),
        ({"backoff_limit": 2}, "KubeRay refuses retries on a shared cluster"),
        ({"image": "reg/db:1"}, "image applies to dedicated clusters only"),
        ({"namespace": "ML"}, "invalid namespace 'ML'.*uppercase.*'ml'"),
    ],
)
def test_invalid_targets_are_refused(overrides, expected):
    with pytest.raises(ValueError, match=expected):
        shared(**overrides)


# --------------------------------------------------------------------------- names


def test_rayjob_name_is_deterministic_and_short():
    assert kube.rayjob_name("dog", "b1") == "b1-dog"
    assert kube.rayjob_name("dog", "2024-06-01") == "run-2024-06-01-dog"  # DNS-1035: starts with a letter
    prefix = "golden-retriever-from-the-neighbours-"
    long_a, long_b = prefix + "a" * 20, prefix + "b" * 20
    name_a, name_b = kube.rayjob_name(long_a, "spring-campaign"), kube.rayjob_name(long_b, "spring-campaign")
    assert name_a == kube.rayjob_name(long_a, "spring-campaign")
    assert name_a != name_b
    for name in (name_a, name_b):
        assert len(name) <= kube.MAX_RAYJOB_NAME == 47 and DNS1035.match(name), name


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("My Dog!", r"invalid subject name 'My Dog!': it has uppercase letters; .*' ' '!'.*'my-dog'"),
        ("dog_1", r"'_'.*Rename it, e.g. 'dog-1'"),
        ("-dog", "starts or ends with '-'"),
        ("d" * 64, "64 characters long"),
        ("", "subject name is empty"),
    ],
)
def test_invalid_subject_names_say_what_to_do(name, expected):
    with pytest.raises(ValueError, match=expected):
        kube.rayjob_name(name, "b1")


# --------------------------------------------------------------------------- submitting


def test_submit_creates_every_object(double, api):
    objs = rayjobs(shared(), "dog", "cat", "backpack") + rayjobs(dedicated(bulk_run="b2"), "dog")
    results = kube.submit(api, objs)
    assert [(r.subject, r.name, r.action) for r in results] == [
        ("dog", "b1-dog", "created"),
        ("cat", "b1-cat", "created"),
        ("backpack", "b1-backpack", "created"),
        ("dog", "b2-dog", "created"),
    ]
    assert all(r.ok for r in results)
    stored = double.get("b1-dog", NS)
    assert stored["spec"]["entrypoint"] == objs[0]["spec"]["entrypoint"]
    assert stored["metadata"]["labels"]["dreambooth.io/bulk-run"] == "b1"
    patches = [r for r in double.requests if r[0] == "PATCH"]
    assert len(patches) == 4 and all(ct == "application/apply-patch+yaml" for _, _, ct in patches)
    assert all("fieldManager=dreambooth-cli" in url and "force=true" in url for _, url, _ in patches)


def test_resubmit_of_same_objects_changes_nothing(double, api):
    objs = rayjobs(shared(), "dog", "cat") + rayjobs(dedicated(bulk_run="b2"), "dog")
    kube.submit(api, objs)
    before = {name: double.get(name, NS)["metadata"]["resourceVersion"] for name in ("b1-dog", "b1-cat", "b2-dog")}
    results = kube.submit(api, copy.deepcopy(objs))
    assert [r.action for r in results] == ["unchanged"] * 3
    after = {name: double.get(name, NS)["metadata"]["resourceVersion"] for name in before}
    assert after == before  # server defaults (e.g. ports[].protocol) do not count as a change


def test_changed_arg_reports_configured(double, api):
    kube.submit(api, rayjobs(shared(), "dog", "cat"))
    rv = double.get("b1-dog", NS)["metadata"]["resourceVersion"]
    changed = [kube.build_rayjob(subject("dog", output="s3://b/runs/dog-v2"), shared())] + rayjobs(shared(), "cat")
    results = kube.submit(api, changed)
    assert [r.action for r in results] == ["configured", "unchanged"]
    stored = double.get("b1-dog", NS)
    assert "--output s3://b/runs/dog-v2" in stored["spec"]["entrypoint"]
    assert stored["metadata"]["resourceVersion"] != rv and stored["metadata"]["generation"] == 2
    assert results[0].message == ""  # KubeRay has not picked it up yet: the new spec will be used


def test_changing_a_started_job_says_how_to_rerun_it(double, api):
    kube.submit(api, rayjobs(shared(), "dog"))
    double.set_status("b1-dog", {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, NS)
    (result,) = kube.submit(api, [kube.build_rayjob(subject("dog", model="sd15"), shared())])
    assert result.action == "configured"
    assert "already Running" in result.message and "kubectl delete rayjob -n ml b1-dog" in result.message
    assert "note: KubeRay does not restart" in kube.format_submit_results([result])


def test_duplicate_names_are_refused_before_sending_anything(double, api):
    with pytest.raises(ValueError, match="ml/b1-dog appear more than once"):
        kube.submit(api, rayjobs(shared(), "dog", "cat", "dog"))
    assert double.requests == []


def test_schema_violation_names_subject_and_field_and_others_still_go(double, api):
    objs = rayjobs(shared(), "dog", "cat", "owl")
    objs[1]["spec"]["backoffLimit"] = "three"
    results = kube.submit(api, objs)
    assert [r.action for r in results] == ["created", "failed", "created"]
    message = results[1].message
    assert "subject 'cat'" in message and "RayJob ml/b1-cat" in message
    assert "spec.backoffLimit" in message and "must be of type integer" in message
    assert double.get("b1-cat", NS) is None
    assert double.get("b1-owl", NS) is not None


def test_unknown_field_is_refused_not_silently_dropped(double, api):
    objs = rayjobs(shared(), "dog")
    objs[0]["spec"]["entrypointNumGPUs"] = 1  # typo of entrypointNumGpus
    (result,) = kube.submit(api, objs)
    assert result.action == "failed" and 'unknown field "spec.entrypointNumGPUs"' in result.message


def test_dry_run_submits_nothing(double, api):
    objs = rayjobs(shared(), "dog", "cat")
    results = kube.submit(api, objs, dry_run=True)
    assert [(r.action, r.dry_run) for r in results] == [("created", True), ("created", True)]
    assert double.objects == {}
    kube.submit(api, objs[:1])
    rv = double.get("b1-dog", NS)["metadata"]["resourceVersion"]
    changed = [kube.build_rayjob(subject("dog", model="sd15"), shared())]
    assert kube.submit(api, changed, dry_run=True)[0].action == "configured"
    assert double.get("b1-dog", NS)["metadata"]["resourceVersion"] == rv
    assert "--model tiny" in double.get("b1-dog", NS)["spec"]["entrypoint"]
    assert "(server dry run)" in kube.format_submit_results(results)


def test_dry_run_without_a_cluster_contacts_nothing(double):
    results = kube.submit(None, rayjobs(shared(), "dog"), dry_run=True)
    assert results[0].action == "rendered" and double.requests == []
    assert yaml.safe_load(kube.rayjobs_to_yaml(rayjobs(shared(), "dog")))["metadata"]["name"] == "b1-dog"
    with pytest.raises(ValueError, match="needs an api_client"):
        kube.submit(None, rayjobs(shared(), "dog"))


def _conflict_first(double, monkeypatch, times: int) -> None:
    real = double.handle
    left = [times]

    def handle(method, url, content_type, raw):
        if method == "PATCH" and left[0] > 0:
            left[0] -= 1
            double.requests.append((method, url, content_type))  # answered without touching the store
            body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409,
                    "message": 'Operation cannot be fulfilled on rayjobs.ray.io "b1-dog": the object has been modified'}
            return 409, body, {}
        return real(method, url, content_type, raw)

    monkeypatch.setattr(double, "handle", handle)


def test_conflict_is_retried_once(double, api, monkeypatch):
    _conflict_first(double, monkeypatch, times=1)
    (result,) = kube.submit(api, rayjobs(shared(), "dog"))
    assert result.action == "created"
    assert [r[0] for r in double.requests] == ["GET", "PATCH", "GET", "PATCH"]


def test_persistent_conflict_is_a_failed_result(double, api, monkeypatch):
    _conflict_first(double, monkeypatch, times=2)
    (result,) = kube.submit(api, rayjobs(shared(), "dog"))
    assert result.action == "failed" and "the object has been modified" in result.message


def test_missing_crd_hints_at_kuberay(double, api, monkeypatch):
    monkeypatch.setattr(double, "kinds", {})
    (result,) = kube.submit(api, rayjobs(shared(), "dog"))
    assert result.action == "failed"
    assert "is the KubeRay operator with its RayJob CRD ray.io/v1 installed?" in result.message


def test_list_status_without_the_crd_is_a_clear_error(double, api, monkeypatch):
    monkeypatch.setattr(double, "kinds", {})
    with pytest.raises(kube.KubeError, match="cannot list RayJobs in namespace 'ml'.*KubeRay operator"):
        kube_status.list_status(api, NS)


def test_unreachable_server_raises_kube_error():
    configuration = client.Configuration()
    configuration.host = "http://127.0.0.1:9"  # discard port: nothing listens
    configuration.retries = 0
    with client.ApiClient(configuration) as api_client, pytest.raises(kube.KubeError, match="cannot reach"):
        kube.submit(api_client, rayjobs(shared(), "dog"))


# --------------------------------------------------------------------------- status


def test_list_status_reads_what_kuberay_reports(double, api):
    kube.submit(api, rayjobs(shared(), "dog", "cat") + rayjobs(shared(bulk_run="b2"), "owl"))
    double.set_status("b1-dog", {"jobStatus": "SUCCEEDED", "jobDeploymentStatus": "Complete",
                                 "startTime": "2025-01-01T10:00:00Z", "endTime": "2025-01-01T10:20:00Z",
                                 "message": "Job finished successfully."}, NS)  # fmt: skip
    double.set_status("b1-cat", {"jobStatus": "FAILED", "jobDeploymentStatus": "Failed",
                                 "message": "Job entrypoint command failed with exit code 1"}, NS)  # fmt: skip
    rows = kube_status.list_status(api, NS, bulk_run="b1")
    assert [(r.subject, r.job_status, r.deployment_status) for r in rows] == [
        ("cat", "FAILED", "Failed"),
        ("dog", "SUCCEEDED", "Complete"),
    ]
    assert rows[1].start_time == "2025-01-01T10:00:00Z" and rows[1].end_time == "2025-01-01T10:20:00Z"
    assert len(kube_status.list_status(api, NS)) == 3
    selectors = [parse_qs(urlsplit(url).query).get("labelSelector") for method, url, _ in double.requests]
    assert ["dreambooth.io/bulk-run=b1"] in selectors  # not the app name: nameOverride changes that

    table = kube_status.format_status_table(rows).splitlines()
    assert table[0].split() == ["SUBJECT", "RAYJOB", "JOB", "STATUS", "DEPLOYMENT", "START", "END", "MESSAGE"]
    assert table[1].split()[:4] == ["cat", "b1-cat", "FAILED", "Failed"]
    assert "Job entrypoint command failed with exit code 1" in table[1]
    assert table[2].split()[:6] == [
        "dog", "b1-dog", "SUCCEEDED", "Complete", "2025-01-01T10:00:00Z", "2025-01-01T10:20:00Z"
    ]  # fmt: skip
    assert table[-1] == "2 RayJobs: 1 FAILED, 1 SUCCEEDED"
    assert kube_status.format_status_table([]) == "No RayJobs found."


# --------------------------------------------------------------------------- connecting


def test_load_api_client_from_kubeconfig(double, tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "other",
        "clusters": [{"name": "double", "cluster": {"server": double.configuration().host}}],
        "users": [{"name": "me", "user": {"token": "t"}}],
        "contexts": [{"name": "test", "context": {"cluster": "double", "user": "me"}},
                     {"name": "other", "context": {"cluster": "nowhere", "user": "me"}}],
    }))  # fmt: skip
    with kube.load_api_client(str(kubeconfig), context="test") as api_client:
        kube.submit(api_client, rayjobs(shared(), "dog"))
        assert [r.subject for r in kube_status.list_status(api_client, NS)] == ["dog"]
    with pytest.raises(kube.KubeError, match="is 'nope' a context in that file"):
        kube.load_api_client(str(kubeconfig), context="nope")


def test_load_api_client_without_any_config_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(kube.KubeError, match="pass --kubeconfig, set KUBECONFIG"):
        kube.load_api_client()
    with pytest.raises(kube.KubeError, match="does not exist"):
        kube.load_api_client(str(tmp_path / "missing.yaml"))


def test_in_cluster_without_service_account_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    with pytest.raises(kube.KubeError, match="running in a pod"):
        kube.load_api_client()


# --------------------------------------------------------------------------- the double itself


def _error(exc_info) -> dict:
    return json.loads(exc_info.value.body)


def test_double_answers_404_and_409_like_the_api_server(api):
    custom = client.CustomObjectsApi(api)
    with pytest.raises(ApiException) as missing:
        custom.get_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", "nope")
    assert missing.value.status == 404
    assert _error(missing) == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": 'rayjobs.ray.io "nope" not found', "reason": "NotFound",
        "details": {"name": "nope", "group": "ray.io", "kind": "rayjobs"}, "code": 404,
    }  # fmt: skip
    obj = rayjobs(shared(), "dog")[0]
    created = custom.create_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", obj)
    assert created["metadata"]["generation"] == 1 and created["metadata"]["uid"]
    assert created["spec"]["ttlSecondsAfterFinished"] == 0  # CRD default filled in
    with pytest.raises(ApiException) as exists:
        custom.create_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", obj)
    assert exists.value.status == 409 and _error(exists)["reason"] == "AlreadyExists"

    stale = copy.deepcopy(created)
    created["spec"]["entrypoint"] = "python -m other"
    replaced = custom.replace_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", "b1-dog", created)
    assert int(replaced["metadata"]["resourceVersion"]) > int(stale["metadata"]["resourceVersion"])
    with pytest.raises(ApiException) as conflict:
        custom.replace_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", "b1-dog", stale)
    assert conflict.value.status == 409 and _error(conflict)["reason"] == "Conflict"


def test_double_merge_patch_list_and_delete(double, api):
    custom = client.CustomObjectsApi(api)
    kube.submit(api, rayjobs(shared(), "dog") + rayjobs(shared(bulk_run="b2"), "cat"))
    rv = double.get("b1-dog", NS)["metadata"]["resourceVersion"]
    same = custom.patch_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", "b1-dog", {"spec": {"backoffLimit": 0}})
    assert same["metadata"]["resourceVersion"] == rv  # a no-op patch
    patched = custom.patch_namespaced_custom_object(
        "ray.io", "v1", NS, "rayjobs", "b1-dog", {"metadata": {"labels": {"team": "a"}}}
    )
    assert patched["metadata"]["labels"]["team"] == "a" and patched["metadata"]["generation"] == 1
    listed = custom.list_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", label_selector="team=a")
    assert [o["metadata"]["name"] for o in listed["items"]] == ["b1-dog"]
    listed = custom.list_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", label_selector="!team")
    assert [o["metadata"]["name"] for o in listed["items"]] == ["b2-cat"]
    custom.delete_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", "b1-dog")
    assert double.get("b1-dog", NS) is None


def test_double_422_lists_every_cause(api):
    custom = client.CustomObjectsApi(api)
    obj = rayjobs(dedicated(), "dog")[0]
    del obj["spec"]["rayClusterSpec"]["headGroupSpec"]
    obj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "one"
    obj["metadata"]["name"] = "Dog"
    with pytest.raises(ApiException) as invalid:
        custom.create_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", obj)
    body = _error(invalid)
    assert invalid.value.status == 422 and body["reason"] == "Invalid"
    assert body["message"].startswith('RayJob.ray.io "Dog" is invalid: ')
    causes = {c["field"]: (c["reason"], c["message"]) for c in body["details"]["causes"]}
    assert causes["metadata.name"][0] == "FieldValueInvalid"
    assert causes["spec.rayClusterSpec.headGroupSpec"] == ("FieldValueRequired", "Required value")
    assert causes["spec.rayClusterSpec.workerGroupSpecs[0].replicas"][0] == "FieldValueTypeInvalid"
