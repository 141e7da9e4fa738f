"""The chart's values contract: helm lint, values.schema.json, values refused, and head/worker pod values."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import yaml

import chart_helpers as ch
from chart_helpers import CI_FILES, CI_IDS, PER_SUBJECT, ci_values, ray_group_templates, render_default, values_yaml


# --- lint and schema ---------------------------------------------------------------


def test_ci_scenarios_exist():
    names = set(CI_IDS)
    assert {"default-values.yaml", "dedicated-clusters-values.yaml", "exposed-dashboard-values.yaml",
            "bulk-dedicated-values.yaml", "per-subject-shared-values.yaml", "per-subject-kueue-values.yaml"} <= names
    assert names & {"pvc-storage-values.yaml", "s3-storage-values.yaml"}


@pytest.mark.parametrize("values", CI_FILES, ids=CI_IDS)
def test_lint_strict_passes(helm, values):
    proc = ch.run_helm(helm, "lint", "--strict", str(ch.CHART), "-f", str(values))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "bad, expected",  # `expected` matches both Helm 4 ("/a/b") and Helm 3 ("a.b") messages
    [
        ({"worker": {"maxReplica": 3}}, r"maxReplica"),
        ({"trainning": {"workers": 2}}, r"trainning"),
        ({"training": {"workers": "two"}}, r"training[./]workers"),
        ({"worker": {"resources": {"gpu": 0}}}, r"worker[./]resources[./]gpu"),
        ({"jobs": {"mode": "sharded"}}, r"jobs[./]mode"),
        ({"subjects": [{"name": "Dog_1", "instanceDir": "/d", "classNoun": "dog"}]}, r"subjects[./]0[./]name"),
        ({"subjects": [{"name": "dog", "classNoun": "dog"}]}, r"instanceDir"),
        ({"subjects": [{"name": "d", "instanceDir": "/x/$HOME", "classNoun": "dog"}]}, r"instanceDir"),
        ({"subjects": [{"name": "d", "instanceDir": "/x", "classNoun": "o'dog"}]}, r"classNoun"),
        ({"training": {"model": "m;rm -rf /"}}, r"training[./]model"),
        ({"head": {"affinity": {"nodeAfinity": {}}}}, r"head[./]affinity"),
        ({"worker": {"volumes": [{"name": "host", "hostPath": {"path": "/"}}]}}, r"hostPath"),  # not restricted
        ({"worker": {"volumeMounts": [{"name": "m"}]}}, r"worker[./]volumeMounts"),  # no mountPath
        ({"head": {"envFrom": [{"secretRef": {}}]}}, r"head[./]envFrom"),
        ({"head": {"priorityClassName": "High Priority"}}, r"head[./]priorityClassName"),
        ({"worker": {"labels": {"team": 1}}}, r"worker[./]labels"),
        ({"jobs": {"layout": "per-subject"}}, r"jobs[./]layout"),
        ({"jobs": {"maxConcurrent": -1}}, r"jobs[./]maxConcurrent"),
        ({"jobs": {"maxRetries": "1"}}, r"jobs[./]maxRetries"),
        ({"jobs": {"backoffLimit": 1}}, r"jobs[./]backoffLimit.*jobs\.maxRetries"),  # removed: says what replaces it
        ({"kueue": {"queueName": "My Queue"}}, r"kueue[./]queueName"),
        ({"kueue": {"queue": "q"}}, r"queue"),
    ],
)
def test_lint_rejects_bad_values(helm, tmp_path, bad, expected):
    f = tmp_path / "bad-values.yaml"
    f.write_text(yaml.safe_dump(bad))
    proc = ch.run_helm(helm, "lint", "--strict", str(ch.CHART), "-f", str(f))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "schema" in out and re.search(expected, out), out


def test_schema_is_strict_and_values_comply():
    schema = json.loads((ch.CHART / "values.schema.json").read_text())
    assert ch.loose_objects(schema) == []
    jsonschema.Draft7Validator(schema).validate(values_yaml())


def test_every_value_has_a_comment():
    assert ch.uncommented_keys((ch.CHART / "values.yaml").read_text()) == []


# --- values refused at render time ---------------------------------------------------


@pytest.mark.parametrize("bad, message", [
    (["--set", "training.workers=5"], "needs 5 GPUs"),
    ([*PER_SUBJECT, "--set", "jobs.maxRetries=2"], "needs jobs.maxRetries=0"),
    (["--set", "jobs.submissionMode=SidecarMode"], "SidecarMode needs jobs.mode=dedicated"),
    (["--set", "jobs.mode=dedicated", "--set", "dashboard.ingress.enabled=true"], "need jobs.mode=shared"),
    (["--set", "jobs.mode=dedicated", "--set", "dashboard.service.type=NodePort"], "need jobs.mode=shared"),
    (["--set-json", 'subjects=[{"name":"a","instanceDir":"/x","classNoun":"c"},'
      '{"name":"a","instanceDir":"/y","classNoun":"c"}]'], "same RayJob name"),
    (["--set-json", 'worker.volumes=[{"name":"dshm","emptyDir":{}}]'], "is the chart's own"),
    (["--set-json", 'head.volumes=[{"name":"shared","emptyDir":{}}]'], "is the chart's own"),
])
def test_inconsistent_values_fail(helm, bad, message):
    with pytest.raises(RuntimeError, match=re.escape(message)):
        render_default(helm, *bad)


# --- pod values (the KubeRay ray-cluster chart's names) ---------------------------------

POD_VALUES = ("serviceAccountName", "annotations", "labels", "affinity", "nodeSelector",
              "tolerations", "priorityClassName", "volumes", "volumeMounts", "envFrom")


def test_every_pod_value_is_documented_and_typed():
    v = values_yaml()
    schema = json.loads((ch.CHART / "values.schema.json").read_text())
    for group in ("head", "worker"):
        assert set(POD_VALUES) <= set(v[group]), group
        props = schema["properties"][group]
        assert set(POD_VALUES) <= set(props["properties"]) and set(POD_VALUES) <= set(props["required"])
        assert props["additionalProperties"] is False
    placement = ci_values("pod-placement-values.yaml")
    for group in ("head", "worker"):
        assert set(POD_VALUES) <= set(placement[group]), f"ci/pod-placement-values.yaml must set every {group} value"


@pytest.mark.parametrize("mode", ["shared", "dedicated"])
def test_pod_values_land_on_head_and_worker_pods(helm, mode):
    values = ci_values("pod-placement-values.yaml")
    docs = ch.render(helm, "-f", str(ch.CI_DIR / "pod-placement-values.yaml"), "--set", f"jobs.mode={mode}")
    errors = [e for d in docs for e in ch.validation_errors(d)]
    assert not errors, "\n".join(errors)
    problems = [p for d in docs if d["kind"] in ("RayCluster", "RayJob")
                for where, t, extra in ch.pod_templates(d) for p in ch.restricted_violations(where, t, extra)]
    assert not problems, "\n".join(problems)
    templates = ray_group_templates(docs)
    assert {g for g, _ in templates} == {"head", "worker"}
    assert len(templates) == (2 if mode == "shared" else 2 * len(values["subjects"]))
    for group, template in templates:
        want, meta, pod = values[group], template["metadata"], template["spec"]
        (c,) = pod["containers"]
        assert pod["serviceAccountName"] == want["serviceAccountName"]
        assert pod["priorityClassName"] == want["priorityClassName"]
        assert pod["affinity"] == want["affinity"]
        assert pod["nodeSelector"] == want["nodeSelector"]
        assert pod["tolerations"] == want["tolerations"]
        assert meta["annotations"] == want["annotations"]
        assert want["labels"].items() <= meta["labels"].items()
        assert meta["labels"]["app.kubernetes.io/component"] == f"ray-{group}"  # chart labels kept
        for vol in want["volumes"]:
            assert vol in pod["volumes"]
        for mount in want["volumeMounts"]:
            assert mount in c["volumeMounts"]
        assert c["envFrom"] == want["envFrom"]
        # the chart's own wiring is still there
        assert "shared" in {v["name"] for v in pod["volumes"]}
        assert "shared" in {m["name"] for m in c["volumeMounts"]}
    # The submitter pod is not a Ray pod: none of it applies there (its only volume is the
    # bulk manifest it uploads).
    for job in ch.of_kind(docs, "RayJob"):
        sub = job["spec"]["submitterPodTemplate"]["spec"]
        assert "serviceAccountName" not in sub and "affinity" not in sub
        assert [v["name"] for v in sub.get("volumes", [])] == ["manifest"]


def test_chart_labels_win_over_pod_labels(helm):
    docs = render_default(helm, "--set-json", 'head.labels={"app.kubernetes.io/component":"x","a":"b"}')
    (rc,) = ch.of_kind(docs, "RayCluster")
    labels = rc["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "ray-head" and labels["a"] == "b"


def test_ray_pods_run_as_the_chart_service_account(rendered):
    """Ray pods run as the chart's ServiceAccount (the one serviceAccount.annotations give a
    cloud identity). The head mounts its token, because KubeRay's autoscaler sidecar patches
    the RayCluster with it; workers never mount one."""
    for values in ("default-values.yaml", "dedicated-clusters-values.yaml"):
        docs = rendered[values]
        sa_names = {sa["metadata"]["name"] for sa in ch.of_kind(docs, "ServiceAccount")}
        for group, template in ray_group_templates(docs):
            pod = template["spec"]
            assert pod["serviceAccountName"] in sa_names == {"dreambooth"}, (values, group)
            assert pod["automountServiceAccountToken"] is (group == "head"), (values, group)
    # A name the chart does not create is used as given (it must exist: KubeRay checks).
    for group, template in ray_group_templates(rendered["pod-placement-values.yaml"]):
        assert template["spec"]["serviceAccountName"] == f"ray-{group}-sa"
