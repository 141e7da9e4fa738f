"""Job layouts (jobs.layout: bulk, perSubject, Kueue) for five subjects, and what NOTES.txt and the chart README say."""

from __future__ import annotations

import json
import re
import shlex
import subprocess

import pytest
import yaml

import chart_helpers as ch
from chart_helpers import argv, bulk_args, bulk_plan, flags, layout_of, values_yaml


def manifest_of(docs: list[dict]) -> dict:
    (cm,) = ch.of_kind(docs, "ConfigMap")
    return yaml.safe_load(cm["data"]["manifest.yaml"])


# --- docs, NOTES, image --------------------------------------------------------------


RWX_NEEDLES = ("efs.csi.aws.com", "filestore.csi.storage.gke.io", "file.csi.azure.com", "ReadWriteOnce")


def notes_of(helm, values, *args):
    proc = ch.run_helm(helm, "install", ch.RELEASE, str(ch.CHART), "--dry-run=client",
                       "--namespace", "ml", "-f", str(ch.CI_DIR / values), *args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("NOTES:", 1)[1]


@pytest.mark.parametrize("values", ["default-values.yaml", "dedicated-clusters-values.yaml"])
def test_notes_print_next_commands(helm, values):
    notes = notes_of(helm, values)
    job = "dreambooth-bulk" if layout_of(values) == "bulk" else "dreambooth-dog"
    for needle in ("kubectl -n ml get rayjobs", "port-forward", "dreambooth status --namespace ml",
                   "auth_token", "RAY_AUTH_TOKEN", job, "cp -c ray-head",
                   "kubectl -n ml get pvc dreambooth-shared", "storage.type=s3",
                   "-c ray-head -- dreambooth doctor --output /mnt/shared/outputs", *RWX_NEEDLES):
        assert needle in notes, needle


def test_notes_follow_storage_and_token_mode(helm):
    shared = notes_of(helm, "default-values.yaml")
    assert "get secret dreambooth -o" in shared  # the operator's Secret, named after the RayCluster
    assert "ray.io/cluster=dreambooth,ray.io/node-type=head" in shared
    exposed = notes_of(helm, "exposed-dashboard-values.yaml")
    assert "get secret ray-dashboard-token -o" in exposed
    existing_claim = notes_of(helm, "pvc-storage-values.yaml")
    assert "get pvc team-dreambooth-rwx" in existing_claim and "filestore" not in existing_claim
    wi = notes_of(helm, "s3-workload-identity-values.yaml")
    assert "workload identity" in wi and "ServiceAccount dreambooth" in wi
    assert "dreambooth doctor --output s3://my-bucket/dreambooth" in wi
    assert "get pvc" not in wi and "efs.csi.aws.com" not in wi
    assert "workload identity" not in notes_of(helm, "s3-storage-values.yaml")  # it has a key Secret


def test_readme_documents_prerequisites():
    readme = (ch.CHART / "README.md").read_text()
    assert "KubeRay operator v1.7.0" in readme and "--version 1.7.0" in readme
    assert "auth_token" in readme and "existingSecret" in readme
    # Which StorageClasses give ReadWriteMany on the big three, and the way out.
    for needle in RWX_NEEDLES + ("storage.type=s3", "Pending", "eks.amazonaws.com/role-arn",
                                 "iam.gke.io/gcp-service-account", "dreambooth doctor"):
        assert needle in readme, needle


# helm/Dockerfile: see tests/test_dockerfile.py.


# --- job layouts (jobs.layout) ---------------------------------------------------------

FIVE = [
    {"name": "dog", "instanceDir": "/mnt/shared/subjects/dog", "classNoun": "dog"},
    {"name": "cat", "instanceDir": "/mnt/shared/subjects/cat", "classNoun": "cat", "identifier": "sks"},
    {"name": "teapot", "instanceDir": "/mnt/shared/subjects/teapot", "classNoun": "teapot",
     "extraArgs": {"max-train-steps": 800, "learning-rate": 2e-6, "random-flip": False}},
    {"name": "duck-toy", "instanceDir": "/mnt/shared/subjects/duck toy", "classNoun": "toy",
     "extraArgs": {"workers": 4, "use-gpu": True}},
    {"name": "backpack", "instanceDir": "s3://bucket/subjects/backpack", "classNoun": "backpack"},
]
LAYOUTS = {
    "bulk-shared": [],
    "bulk-dedicated": ["--set", "jobs.mode=dedicated"],
    "per-subject-shared": ["--set", "jobs.layout=perSubject", "--set", "jobs.maxRetries=0"],
    "per-subject-kueue": ["--set", "jobs.layout=perSubject", "--set", "jobs.mode=dedicated",
                          "--set", "kueue.queueName=gpu-queue"],
}
# What each layout renders for 5 subjects (jobs.maxConcurrent=2).
LAYOUT_KINDS = {
    "bulk-shared": {"ConfigMap": 1, "RayJob": 1, "RayCluster": 1, "Service": 1, "Role": 2, "RoleBinding": 2,
                    "ServiceAccount": 1, "PersistentVolumeClaim": 1},
    "bulk-dedicated": {"ConfigMap": 1, "RayJob": 1, "Role": 2, "RoleBinding": 2,
                       "ServiceAccount": 1, "PersistentVolumeClaim": 1},
    "per-subject-shared": {"RayJob": 5, "RayCluster": 1, "Service": 1, "Role": 1, "RoleBinding": 1,
                           "ServiceAccount": 1, "PersistentVolumeClaim": 1},
    "per-subject-kueue": {"RayJob": 5, "Role": 1, "RoleBinding": 1, "ServiceAccount": 1, "PersistentVolumeClaim": 1},
}


def five_args(layout: str, *extra: str) -> list[str]:
    return ["--set-json", f"subjects={json.dumps(FIVE)}", "--set", "jobs.maxConcurrent=2", *LAYOUTS[layout], *extra]


@pytest.fixture(scope="session")
def five(helm) -> dict[str, list[dict]]:
    return {layout: ch.render(helm, *five_args(layout)) for layout in LAYOUTS}


def test_values_default_to_the_bulk_layout():
    jobs = values_yaml()["jobs"]
    assert jobs["layout"] == "bulk" and "backoffLimit" not in jobs
    assert jobs["maxConcurrent"] == 0 and jobs["maxRetries"] >= 0
    assert values_yaml()["kueue"] == {"queueName": ""}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_objects_for_five_subjects(five, layout):
    docs = five[layout]
    kinds: dict[str, int] = {}
    for d in docs:
        kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
    assert kinds == LAYOUT_KINDS[layout]
    errors = [e for d in docs for e in ch.validation_errors(d)]
    assert not errors, "\n".join(errors)
    problems = [p for d in docs if d["kind"] in ("RayCluster", "RayJob")
                for where, t, extra in ch.pod_templates(d) for p in ch.restricted_violations(where, t, extra)]
    assert not problems, "\n".join(problems)
    mode = "bulk" if layout.startswith("bulk") else "per-subject"
    for job in ch.of_kind(docs, "RayJob"):
        labels = job["metadata"]["labels"]
        assert labels["dreambooth.io/mode"] == mode and labels["dreambooth.io/bulk-run"] == "dreambooth"
        assert labels["app.kubernetes.io/instance"] == "dreambooth"  # the chart's labels too
        if mode == "per-subject":
            assert labels["dreambooth.io/subject"] in {s["name"] for s in FIVE}
        shared = "dedicated" not in layout and "kueue" not in layout
        assert ("clusterSelector" in job["spec"]) is shared and ("rayClusterSpec" in job["spec"]) is not shared


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_renders_are_deterministic(helm, layout):
    assert ch.render_text(helm, *five_args(layout)) == ch.render_text(helm, *five_args(layout))


def test_bulk_manifest_holds_the_defaults_and_every_subject(five, helm):
    manifest = manifest_of(five["bulk-shared"])
    assert set(manifest) == {"defaults", "subjects"}
    t = values_yaml()["training"]
    assert manifest["defaults"] == {
        "model": t["model"], "prior_output": "/mnt/shared/outputs/priors",
        "num_class_images": t["numClassImages"], "resolution": t["resolution"],
        "max_train_steps": t["maxTrainSteps"], "mixed_precision": t["mixedPrecision"],
        "workers": t["workers"], "zero_stage": t["zeroStage"], "use_gpu": "true",
    }
    subjects = manifest["subjects"]
    assert len(subjects) == 5
    assert [s["name"] for s in subjects] == [s["name"] for s in FIVE]
    by_name = {s["name"]: s for s in subjects}
    assert by_name["dog"] == {"name": "dog", "instance_dir": "/mnt/shared/subjects/dog", "class_noun": "dog"}
    assert by_name["cat"]["identifier"] == "sks" and "identifier" not in by_name["dog"]
    assert by_name["teapot"]["max_train_steps"] == 800 and by_name["teapot"]["random_flip"] is False
    assert float(by_name["teapot"]["learning_rate"]) == 2e-6
    assert by_name["duck-toy"]["instance_dir"] == "/mnt/shared/subjects/duck toy"
    assert by_name["duck-toy"]["workers"] == 4 and by_name["duck-toy"]["use_gpu"] == "true"  # text field
    assert all("output" not in s for s in subjects)  # the driver writes <output>/<name>
    # Optional training values reach the defaults too.
    docs = ch.render(helm, *five_args("bulk-shared", "--set-json", "training.learningRate=0.0001",
                                              "--set", "training.checkpointingSteps=100"))
    defaults = manifest_of(docs)["defaults"]
    assert float(defaults["learning_rate"]) == 1e-4 and defaults["checkpointing_steps"] == 100


def test_bulk_manifest_trains_what_per_subject_jobs_train(five, tmp_path):
    """The bulk driver, reading the rendered manifest, builds for every subject the same run
    config as that subject's perSubject RayJob entrypoint (`dreambooth run` flags)."""
    from dreambooth import cli
    from dreambooth.config import all_fields

    planned = dict(bulk_plan(five["bulk-shared"], tmp_path))
    assert list(planned) == [s["name"] for s in FIVE]
    parser = cli.build_parser()
    for job in ch.of_kind(five["per-subject-shared"], "RayJob"):
        name = job["metadata"]["labels"]["dreambooth.io/subject"]
        cfg = cli.config_from_args(parser.parse_args(["run", *argv(job)[3:]]), list(all_fields()))
        assert planned[name] == cfg, name
    assert planned["teapot"].train.max_train_steps == 800 and planned["duck-toy"].train.workers == 4
    assert planned["cat"].subject.identifier == "sks"


def test_bulk_entrypoint_flags(five, helm):
    (job,) = ch.of_kind(five["bulk-shared"], "RayJob")
    assert argv(job) == ["dreambooth", "bulk", "--manifest", "manifest.yaml", "--output", "/mnt/shared/outputs",
                         "--max-concurrent", "2", "--max-retries", str(values_yaml()["jobs"]["maxRetries"]),
                         "--summary-configmap", "dreambooth-bulk-summary"]
    assert job["metadata"]["name"] == "dreambooth-bulk"
    assert job["metadata"]["annotations"]["dreambooth.io/summary-configmap"] == "dreambooth-bulk-summary"
    assert job["metadata"]["annotations"]["dreambooth.io/output"] == "/mnt/shared/outputs"
    assert job["spec"]["backoffLimit"] == 0  # retries happen per subject inside the driver
    # Values are shell-quoted (an output root with a space, a trailing slash dropped).
    docs = ch.render(helm, *five_args("bulk-shared", "--set", "storage.outputRoot=/mnt/shared/my runs/",
                                      "--set", "jobs.maxRetries=3", "--set", "jobs.maxConcurrent=0"))
    (job,) = ch.of_kind(docs, "RayJob")
    first = argv(job)
    assert shlex.split(subprocess.list2cmdline(first)) == first  # the head's shell sees the same words
    assert bulk_args(job) == {"manifest": "manifest.yaml", "output": "/mnt/shared/my runs", "max-concurrent": "0",
                              "max-retries": "3", "summary-configmap": "dreambooth-bulk-summary"}
    assert job["metadata"]["annotations"]["dreambooth.io/output"] == "/mnt/shared/my runs"
    assert manifest_of(docs)["defaults"]["prior_output"] == "/mnt/shared/my runs/priors"


@pytest.mark.parametrize("layout", ["bulk-shared", "bulk-dedicated"])
def test_bulk_submitter_uploads_the_manifest(five, layout):
    docs = five[layout]
    (cm,) = ch.of_kind(docs, "ConfigMap")
    (job,) = ch.of_kind(docs, "RayJob")
    spec = job["spec"]
    assert cm["metadata"]["name"] == "dreambooth-manifest" and set(cm["data"]) == {"manifest.yaml"}
    assert spec["submissionMode"] == "K8sJobMode"
    working_dir = yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"]
    assert working_dir == "/dreambooth/manifest"
    pod = spec["submitterPodTemplate"]["spec"]
    (vol,) = pod["volumes"]
    assert vol["configMap"]["name"] == cm["metadata"]["name"]
    assert vol["configMap"]["items"] == [{"key": "manifest.yaml", "path": "manifest.yaml"}]
    (c,) = pod["containers"]
    assert c["volumeMounts"] == [{"name": vol["name"], "mountPath": working_dir, "readOnly": True}]
    assert pod["automountServiceAccountToken"] is False  # the submitter needs no API access
    assert bulk_args(job)["manifest"] == "manifest.yaml"  # relative to the uploaded working_dir
    if layout == "bulk-dedicated":
        cs = spec["rayClusterSpec"]
        assert cs["enableInTreeAutoscaling"] is True and spec["shutdownAfterJobFinishes"] is True
        assert "entrypointResources" not in spec and "suspend" not in spec
    else:
        assert spec["clusterSelector"] == {"ray.io/cluster": "dreambooth"}
        (rc,) = ch.of_kind(docs, "RayCluster")
        assert "resources" not in rc["spec"]["headGroupSpec"]["rayStartParams"]  # no driver slots needed


def test_bulk_driver_may_write_its_summary_configmap(helm):
    """The head pod's ServiceAccount holds get/create/update/patch on configmaps (and a head
    running as another ServiceAccount gets it, next to the chart's)."""
    for args, head_sa in (([], "dreambooth"), (["--set", "head.serviceAccountName=ray-head"], "ray-head")):
        docs = ch.render(helm, *five_args("bulk-shared", *args))
        (rc,) = ch.of_kind(docs, "RayCluster")
        assert rc["spec"]["headGroupSpec"]["template"]["spec"]["serviceAccountName"] == head_sa
        (binding,) = [b for b in ch.of_kind(docs, "RoleBinding") if b["metadata"]["name"] == "dreambooth-bulk-summary"]
        (role,) = [r for r in ch.of_kind(docs, "Role") if r["metadata"]["name"] == "dreambooth-bulk-summary"]
        assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"],
                                  "verbs": ["get", "create", "update", "patch"]}]
        assert head_sa in {s["name"] for s in binding["subjects"]}
    per_subject = ch.render(helm, *five_args("per-subject-shared"))
    assert all(r["metadata"]["name"] != "dreambooth-bulk-summary" for r in ch.of_kind(per_subject, "Role"))


def test_per_subject_shared_gates_drivers_on_the_head(five, helm):
    docs = five["per-subject-shared"]
    jobs = ch.of_kind(docs, "RayJob")
    assert len(jobs) == 5
    for job in jobs:
        assert json.loads(job["spec"]["entrypointResources"]) == {"dreambooth-driver": 1}
        assert job["spec"]["backoffLimit"] == 0
    (rc,) = ch.of_kind(docs, "RayCluster")
    head = rc["spec"]["headGroupSpec"]
    value = head["rayStartParams"]["resources"]
    # KubeRay v1.7.0 strips surrounding quotes and parses the JSON (to merge accelerators in),
    # then runs `ray start --head --resources=<value>` in a shell.
    assert json.loads(value.strip("'\"` ")) == {"dreambooth-driver": 2}
    (word,) = shlex.split(f"--resources={value}")
    assert json.loads(word.split("=", 1)[1]) == {"dreambooth-driver": 2}
    # Queued drivers wait for a slot longer than Ray's 15-minute job start timeout.
    env = {e["name"]: e["value"] for e in head["template"]["spec"]["containers"][0]["env"]}
    assert int(env["RAY_JOB_START_TIMEOUT_SECONDS"]) >= 24 * 3600
    for wg in rc["spec"]["workerGroupSpecs"]:
        assert "resources" not in wg["rayStartParams"]  # drivers only on the head
    # The slot count follows jobs.maxConcurrent, and a user's env value wins.
    docs = ch.render(helm, *five_args("per-subject-shared", "--set", "jobs.maxConcurrent=7",
                                      "--set-string", "env.RAY_JOB_START_TIMEOUT_SECONDS=60"))
    (rc,) = ch.of_kind(docs, "RayCluster")
    head = rc["spec"]["headGroupSpec"]
    assert json.loads(head["rayStartParams"]["resources"].strip("'")) == {"dreambooth-driver": 7}
    env = [e for e in head["template"]["spec"]["containers"][0]["env"] if e["name"] == "RAY_JOB_START_TIMEOUT_SECONDS"]
    assert env == [{"name": "RAY_JOB_START_TIMEOUT_SECONDS", "value": "60"}]


def test_kuberay_crd_has_entrypoint_resources_as_a_json_string():
    crd = yaml.safe_load((ch.CRD_DIR / ch.CRD_FILES["RayJob"]).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    props = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert props["entrypointResources"]["type"] == "string"
    assert props["suspend"]["type"] == "boolean" and props["runtimeEnvYAML"]["type"] == "string"


def test_per_subject_kueue_jobs_wait_for_admission(five, helm):
    docs = five["per-subject-kueue"]
    assert ch.of_kind(docs, "RayCluster") == []
    jobs = ch.of_kind(docs, "RayJob")
    assert len(jobs) == 5
    retries = values_yaml()["jobs"]["maxRetries"]
    for job in jobs:
        spec = job["spec"]
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
        assert spec["suspend"] is True and spec["shutdownAfterJobFinishes"] is True
        assert spec["backoffLimit"] == retries
        assert "entrypointResources" not in spec  # Kueue's quota bounds concurrency
        cs = spec["rayClusterSpec"]
        assert cs["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in cs
        (wg,) = cs["workerGroupSpecs"]
        # A fixed-size cluster: the GPU pods the subject's training workers need.
        workers = int(flags(argv(job))["workers"][0])
        assert wg["replicas"] == wg["minReplicas"] == wg["maxReplicas"] == workers  # 1 GPU per pod
    # 2 GPUs per pod: ceil(workers / 2) pods; shutdown forced on even if jobs.* says otherwise.
    docs = ch.render(helm, *five_args("per-subject-kueue", "--set", "worker.resources.gpu=2",
                                      "--set", "training.workers=3", "--set", "jobs.shutdownAfterJobFinishes=false"))
    pods = {j["metadata"]["labels"]["dreambooth.io/subject"]: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"]
            for j in ch.of_kind(docs, "RayJob")}
    assert pods == {"dog": 2, "cat": 2, "teapot": 2, "duck-toy": 2, "backpack": 2}
    assert all(j["spec"]["shutdownAfterJobFinishes"] is True for j in ch.of_kind(docs, "RayJob"))
    # Without a queue name, dedicated perSubject RayJobs autoscale and are not suspended.
    plain = ch.render(helm, *five_args("per-subject-kueue", "--set", "kueue.queueName="))
    for job in ch.of_kind(plain, "RayJob"):
        assert "suspend" not in job["spec"] and "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]
        assert job["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] is True


@pytest.mark.parametrize("layout, extra, message", [
    ("bulk-shared", ["--set-json", 'subjects=[{"name":"a","instanceDir":"/x","classNoun":"c","output":"/o/a"}]'],
     "subject a: output is not allowed with jobs.layout=bulk"),
    ("bulk-shared", ["--set", "jobs.submissionMode=HTTPMode"], "jobs.layout=bulk needs jobs.submissionMode=K8sJobMode"),
    ("bulk-dedicated", ["--set", "jobs.submissionMode=SidecarMode"], "jobs.layout=bulk needs jobs.submissionMode=K8sJobMode"),
    ("per-subject-shared", ["--set", "jobs.maxConcurrent=0"], "needs jobs.maxConcurrent >= 1 (got 0)"),
    ("per-subject-shared", ["--set", "jobs.maxRetries=1"], "needs jobs.maxRetries=0 (got 1)"),
    ("bulk-shared", ["--set", "kueue.queueName=q"], "kueue.queueName needs jobs.layout=perSubject and jobs.mode=dedicated"),
    ("bulk-dedicated", ["--set", "kueue.queueName=q"], "kueue.queueName needs jobs.layout=perSubject and jobs.mode=dedicated"),
    ("per-subject-shared", ["--set", "kueue.queueName=q"], "kueue.queueName needs jobs.layout=perSubject"),
    ("bulk-shared", ["--set", "jobs.backoffLimit=1"], "jobs.maxRetries"),  # the removed key names its replacement
])
def test_invalid_layout_combinations_fail(helm, layout, extra, message):
    with pytest.raises(RuntimeError, match=re.escape(message)):
        ch.render(helm, *five_args(layout), *extra)


def test_notes_follow_the_layout(helm):
    bulk = notes_of(helm, "default-values.yaml")
    for needle in ("dreambooth status --namespace ml", "get rayjobs -l dreambooth.io/bulk-run=dreambooth",
                   "logs -f job/dreambooth-bulk", "get configmap dreambooth-bulk-summary", "ConfigMap dreambooth-manifest"):
        assert needle in bulk, needle
    assert "dreambooth-dog" not in bulk
    shared = notes_of(helm, "per-subject-shared-values.yaml")
    assert "at most 2 driver(s) at once" in shared and "  - dreambooth-dog" in shared
    assert "dreambooth status --namespace ml" in shared and "kubectl -n ml get rayjobs" in shared
    kueue = notes_of(helm, "per-subject-kueue-values.yaml")
    assert "LocalQueue dreambooth" in kueue and "kubectl -n ml get workloads" in kueue
    assert "dreambooth-bulk-summary" not in shared + kueue


def test_readme_documents_the_layouts():
    readme = (ch.CHART / "README.md").read_text()
    for needle in ("jobs.layout", "bulk", "perSubject", "jobs.maxConcurrent", "jobs.maxRetries", "kueue.queueName",
                   "ClusterQueue", "entrypointResources", "dreambooth-driver", "<fullname>-bulk-summary",
                   "dreambooth status", "jobs.backoffLimit"):
        assert needle in readme, needle
