"""Rendered chart objects: schemas, RayCluster and RayJobs, storage, security, determinism, k8s/ in sync."""

from __future__ import annotations

import json
import re
import shlex
import subprocess

import pytest
import yaml

import chart_helpers as ch
from chart_helpers import (
    CI_FILES, CI_IDS, PER_SUBJECT, argv, bulk_plan, ci_values, flags, layout_of, ray_group_templates,
    render_default, values_yaml,
)

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


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
