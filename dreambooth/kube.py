"""Subject jobs as KubeRay RayJobs: build them and submit them idempotently (status: ``kube_status``).

Owns: names, turning a ``SubjectJob`` (a subject name + the CLI flags of ``python -m ray_jobs.personalize``)
or a whole manifest (the bulk layout, ``kube_layouts``) into KubeRay ``RayJob`` objects (``ray.io/v1``)
and ConfigMaps, applying them with the official ``kubernetes`` client, and the API client itself
(kubeconfig or in-cluster credentials checked as user input; every call under a timeout).

Submission uses server-side apply (PATCH ``application/apply-patch+yaml``, field manager
``dreambooth-cli``, ``force=True``, ``fieldValidation=Strict``), so a re-submit of an unchanged object
changes nothing on the server. Each result says ``created``, ``configured``, ``unchanged`` or ``failed``;
one bad subject never stops the others.

KubeRay rules enforced here before anything reaches the cluster (the operator would otherwise only mark
the RayJob ``ValidationFailed`` after it was accepted): the name is a DNS-1035 label of at most 47
characters, ``backoffLimit`` must be 0 on a shared cluster (``clusterSelector``), and
``ttlSecondsAfterFinished`` needs ``shutdownAfterJobFinishes``. Note that KubeRay does not re-run a
RayJob whose spec changes after it started: to re-train a subject, delete its RayJob and submit again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import yaml

GROUP, VERSION, PLURAL, KIND = "ray.io", "v1", "rayjobs", "RayJob"
API_VERSION = f"{GROUP}/{VERSION}"
FIELD_MANAGER = "dreambooth-cli"
APPLY_PATCH = "application/apply-patch+yaml"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_BULK_RUN = "dreambooth.io/bulk-run"
LABEL_SUBJECT = "dreambooth.io/subject"
APP_NAME = "dreambooth"
CLUSTER_SELECTOR_KEY = "ray.io/cluster"
DEFAULT_ENTRYPOINT_MODULE = "ray_jobs.personalize"

# KubeRay v1.7.0 (utils.MaxRayJobNameLength): 53 (RayCluster names) - 6 (suffix of the generated
# RayCluster). The operator marks longer names ValidationFailed.
MAX_RAYJOB_NAME = 47
MAX_LABEL = 63
_FLAG = re.compile(r"^[a-z0-9][a-z0-9-]*$")
# The entrypoint goes through two shells: KubeRay's submitter runs ``ray job submit -- <entrypoint>``
# in bash, then Ray re-joins the words (subprocess.list2cmdline, which only adds double quotes around
# words with blanks) and runs them in a shell on the head node. Only these characters survive both
# unchanged; anything else ($, `, ;, quotes, globs...) could be expanded or executed on the head.
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_@%+=:,./ -]*$")



class KubeError(RuntimeError):
    """The cluster cannot be reached or used; the message says what to check."""


class KubeConfigError(KubeError, ValueError):
    """A kubeconfig or cluster spec the user must fix (bad input: exit code 2)."""


REQUEST_TIMEOUT_S = 30.0
"""Default limit on each Kubernetes API call (connect and read), so a silent server cannot hang us."""


@dataclass(frozen=True)
class SubjectJob:
    """One subject to personalize: its name and the entrypoint flags (without leading dashes)."""

    name: str
    args: dict[str, str] = field(hash=False)


@dataclass(frozen=True)
class RayJobTarget:
    """Where and how the RayJobs of one bulk run execute.

    Exactly one of ``cluster_name`` (an existing RayCluster, shared by all jobs: ``spec.clusterSelector``)
    and ``ray_cluster_spec`` (a dedicated RayCluster per job, deleted ``ttl_seconds_after_finished``
    seconds after the job finishes) must be given. ``image``, ``service_account``, a non-zero
    ``backoff_limit`` and the TTL apply to dedicated clusters only (KubeRay rules).
    """

    namespace: str
    bulk_run: str
    cluster_name: Optional[str] = None
    ray_cluster_spec: Optional[Mapping[str, Any]] = field(default=None, hash=False)
    image: Optional[str] = None  # dedicated clusters only: image of the Ray container of every group
    service_account: Optional[str] = None  # dedicated clusters only: serviceAccountName of Ray pods
    backoff_limit: int = 0
    ttl_seconds_after_finished: int = 3600
    active_deadline_seconds: Optional[int] = None
    entrypoint_module: str = DEFAULT_ENTRYPOINT_MODULE
    runtime_env: Optional[Mapping[str, Any]] = field(default=None, hash=False)
    submitter_image: Optional[str] = None  # image of the K8sJobMode submitter pod (needs the `ray` CLI)
    queue_name: Optional[str] = None  # dedicated clusters only: Kueue LocalQueue that admits each job
    driver_slots: bool = False  # shared cluster only: each driver takes one `dreambooth-driver` head resource

    def __post_init__(self) -> None:
        validate_k8s_name(self.namespace, what="namespace")
        validate_k8s_name(self.bulk_run, what="bulk run name")
        if (self.cluster_name is None) == (self.ray_cluster_spec is None):
            raise ValueError(
                "give exactly one of cluster_name (run on an existing RayCluster) or ray_cluster_spec "
                "(a dedicated RayCluster per job)"
            )
        if self.cluster_name is not None:
            validate_k8s_name(self.cluster_name, what="RayCluster name")
            if self.queue_name:
                raise ValueError("--queue-name (Kueue) applies to dedicated clusters (--ray-cluster-spec): Kueue "
                                 "admits whole RayJobs with their own cluster, not drivers on a shared one")
            if self.backoff_limit:
                raise ValueError(
                    f"backoff_limit={self.backoff_limit}: KubeRay refuses retries on a shared cluster "
                    "(clusterSelector); set it to 0 or use a dedicated cluster (ray_cluster_spec)"
                )
            for name in ("image", "service_account"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name} applies to dedicated clusters only; for the shared RayCluster "
                        f"{self.cluster_name!r} set it where that cluster is defined (the Helm chart)"
                    )
        elif "headGroupSpec" not in self.ray_cluster_spec:
            raise ValueError("ray_cluster_spec has no headGroupSpec; it must be a RayCluster spec")
        elif self.driver_slots:
            raise ValueError("driver slots gate drivers on a shared cluster; a dedicated cluster runs one driver")
        if self.queue_name is not None:
            validate_k8s_name(self.queue_name, what="Kueue queue name")
        for name in ("backoff_limit", "ttl_seconds_after_finished"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.active_deadline_seconds is not None and self.active_deadline_seconds <= 0:
            raise ValueError(f"active_deadline_seconds must be positive, got {self.active_deadline_seconds}")


@dataclass(frozen=True)
class SubmitResult:
    """What happened to one RayJob: ``created``, ``configured``, ``unchanged``, ``failed`` or ``rendered``.

    ``message``: why it failed, or a note worth showing (e.g. a changed RayJob that already started).
    """

    subject: str
    name: str
    namespace: str
    action: str
    message: str = ""
    dry_run: bool = False
    kind: str = KIND

    @property
    def ok(self) -> bool:
        return self.action != "failed"


# --------------------------------------------------------------------------- names


def _suggest_name(name: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", name.lower())).strip("-") or "x"


def validate_k8s_name(name: str, what: str = "name", max_len: int = MAX_LABEL) -> None:
    """Raise ``ValueError`` unless ``name`` is a DNS-1123 label (lowercase, digits, '-') ≤ ``max_len``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} is empty; use lowercase letters, digits and '-'")
    problems = []
    if len(name) > max_len:
        problems.append(f"is {len(name)} characters long (at most {max_len})")
    if name != name.lower():
        problems.append("has uppercase letters")
    bad = sorted({c for c in name.lower() if not (c.isascii() and (c.isalnum() or c == "-"))})
    if bad:
        problems.append("has characters other than a-z, 0-9 and '-': " + " ".join(repr(c) for c in bad))
    if name[0] == "-" or name[-1] == "-":
        problems.append("starts or ends with '-'")
    if problems:
        hint = _suggest_name(name)[:max_len].strip("-")
        raise ValueError(f"invalid {what} {name!r}: it {'; it '.join(problems)}. Rename it, e.g. {hint!r}")


def cluster_head_image(api_client: Any, namespace: str, cluster: str) -> str:
    """The head image of a live RayCluster (the submitter pod of its RayJobs uses the same one)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    from dreambooth.kube_layouts import head_image

    try:
        found = client.CustomObjectsApi(api_client).get_namespaced_custom_object(GROUP, VERSION, namespace, "rayclusters", cluster)
    except ApiException as exc:
        raise KubeConfigError(f"cannot read RayCluster {namespace}/{cluster} ({_api_error_text(exc)}); check --cluster, "
                              "or pass --image (the cluster's image) for the submitter pod") from None
    except HTTPError as exc:
        raise _unreachable(api_client, exc) from exc
    image = head_image(found.get("spec") or {})
    if not image:
        raise KubeConfigError(f"RayCluster {namespace}/{cluster} has no head image; pass --image")
    return image


def default_bulk_run(manifest_path: str) -> str:
    """A bulk-run label from a manifest's file name: ``subjects.yaml`` → ``subjects``."""
    from pathlib import Path

    return _suggest_name(Path(manifest_path).stem)[:MAX_LABEL] or "bulk"


def load_cluster_spec(path: str) -> dict[str, Any]:
    """A ``rayClusterSpec`` from a YAML file (either the spec itself or a whole RayCluster)."""
    from dreambooth.inputs import InputError, load_yaml_file

    try:
        data = load_yaml_file(path, "--ray-cluster-spec") or {}
    except InputError as exc:
        raise KubeConfigError(str(exc)) from None
    if not isinstance(data, dict):
        raise KubeConfigError(f"--ray-cluster-spec {path} must be a mapping (a RayCluster or its spec), "
                              f"got a {type(data).__name__}")
    spec = data.get("spec", data) if data.get("kind") == "RayCluster" else data
    if not isinstance(spec, dict) or not isinstance(spec.get("headGroupSpec"), dict):
        raise KubeConfigError(f"--ray-cluster-spec {path} has no headGroupSpec; pass a RayCluster manifest or its "
                              "spec (see KubeRay's ray-cluster.sample.yaml)")
    return spec


def rayjob_name(subject_name: str, bulk_run: str) -> str:
    """``<bulk_run>-<subject>``: deterministic, a DNS-1035 label of at most 47 characters.

    Too long: cut and suffixed with 8 hex digits of a hash of both inputs, so distinct subjects keep
    distinct names. A name that would start with a digit gets the prefix ``run-``.
    """
    validate_k8s_name(subject_name, what="subject name")
    validate_k8s_name(bulk_run, what="bulk run name")
    name = f"{bulk_run}-{subject_name}"
    if not name[0].isalpha():
        name = f"run-{name}"
    if len(name) > MAX_RAYJOB_NAME:
        digest = hashlib.sha256(f"{bulk_run}/{subject_name}".encode()).hexdigest()[:8]
        name = f"{name[: MAX_RAYJOB_NAME - 9].rstrip('-')}-{digest}"
    return name


# --------------------------------------------------------------------------- building


def build_entrypoint(module: str, args: Mapping[str, Any], subject: str = "", command: Optional[Sequence[str]] = None) -> str:
    """``python -m <module> --flag value ...`` with flags sorted and values shell-quoted.

    A list value becomes several words after its flag (``--sample-prompts "a" "b"``). ``command``
    replaces ``python -m <module>`` (e.g. ``["dreambooth", "bulk"]``).
    """
    words = list(command) if command else ["python", "-m", module]
    for flag in sorted(args):
        values = args[flag] if isinstance(args[flag], list) else [args[flag]]
        where = f"subject {subject!r}: " if subject else ""
        words += [f"--{flag}", *(_entrypoint_word(flag, v, where) for v in values)]
    return " ".join(shlex.quote(w) for w in words)


def _entrypoint_word(flag: str, value: Any, where: str) -> str:
    """One checked value of ``--flag``: a string both shells on the way to the head leave as it is."""
    if not _FLAG.match(flag):
        raise ValueError(f"{where}flag {flag!r} is not a flag name; write it without leading dashes in "
                         "lowercase, e.g. 'instance-dir'")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError(f"{where}--{flag} must be a string or a number, got {type(value).__name__} {value!r}; "
                         "write the value the flag takes on the command line, e.g. 'true'")
    if not _SAFE_VALUE.match(value):
        bad = " ".join(sorted({repr(c) for c in value if not _SAFE_VALUE.match(c)}))
        raise ValueError(f"{where}--{flag} {value!r} has characters a shell on the Ray head would interpret: "
                         f"{bad}; use only letters, digits, spaces and _@%+=:,./-")
    return value


def _dedicated_cluster(target: RayJobTarget) -> dict[str, Any]:
    spec = copy.deepcopy(dict(target.ray_cluster_spec or {}))
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    for group in groups:
        pod = group.setdefault("template", {}).setdefault("spec", {})
        if target.service_account is not None:
            pod["serviceAccountName"] = target.service_account
        if target.image is not None:
            containers = pod.get("containers") or []
            if not containers:
                raise ValueError("ray_cluster_spec: a group template has no containers to set the image on")
            containers[0]["image"] = target.image  # KubeRay: the Ray container is the first one
    if target.queue_name:
        spec["enableInTreeAutoscaling"] = False  # Kueue admits fixed-size clusters
    return spec


def _rayjob(name: str, labels: Mapping[str, str], entrypoint: str, target: RayJobTarget,
            annotations: Optional[Mapping[str, str]] = None, manifest_configmap: Optional[str] = None,
            runtime_env: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The parts every RayJob of the CLI shares: where it runs, the submitter pod, Kueue and driver gates."""
    from dreambooth import kube_layouts

    spec: dict[str, Any] = {"entrypoint": entrypoint, "submissionMode": "K8sJobMode", "backoffLimit": target.backoff_limit}
    env = {**dict(target.runtime_env or {}), **dict(runtime_env or {})}
    if env:
        spec["runtimeEnvYAML"] = yaml.safe_dump(env, sort_keys=True)
    if target.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = target.active_deadline_seconds
    if target.cluster_name is not None:
        spec["clusterSelector"] = {CLUSTER_SELECTOR_KEY: target.cluster_name}
        if target.driver_slots:
            spec["entrypointResources"] = json.dumps({kube_layouts.DRIVER_RESOURCE: 1})
    else:
        spec["rayClusterSpec"] = _dedicated_cluster(target)
        spec["shutdownAfterJobFinishes"] = True
        spec["ttlSecondsAfterFinished"] = target.ttl_seconds_after_finished
    if target.submitter_image:
        spec["submitterPodTemplate"] = kube_layouts.submitter_pod_template(target.submitter_image, manifest_configmap)
    elif manifest_configmap:
        raise ValueError("the bulk layout needs a submitter pod to carry the manifest: pass --image")
    labels = {LABEL_NAME: APP_NAME, LABEL_MANAGED_BY: FIELD_MANAGER, LABEL_BULK_RUN: target.bulk_run, **labels}
    if target.queue_name:
        labels[kube_layouts.LABEL_KUEUE_QUEUE] = target.queue_name
        spec["suspend"] = True  # Kueue unsuspends the job when its quota admits it
    metadata: dict[str, Any] = {"name": name, "namespace": target.namespace, "labels": labels}
    if annotations:
        metadata["annotations"] = dict(annotations)
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec}


def build_rayjob(job: SubjectJob, target: RayJobTarget) -> dict[str, Any]:
    """The RayJob custom object (a plain dict) that runs one subject's ``job`` on ``target``."""
    from dreambooth.kube_layouts import LABEL_MODE

    validate_k8s_name(job.name, what="subject name")
    entrypoint = build_entrypoint(target.entrypoint_module, job.args, subject=job.name)
    return _rayjob(rayjob_name(job.name, target.bulk_run), {LABEL_SUBJECT: job.name, LABEL_MODE: "per-subject"},
                   entrypoint, target)


def build_bulk_objects(manifest: Mapping[str, Any], target: RayJobTarget, output: str, max_concurrent: int,
                       max_retries: int) -> list[dict[str, Any]]:
    """The bulk layout: the manifest ConfigMap and the one RayJob whose driver runs ``dreambooth bulk``."""
    from dreambooth import kube_layouts as layouts

    job_name = rayjob_name("bulk", target.bulk_run)
    configmap = f"{target.bulk_run}-manifest"[:MAX_LABEL].rstrip("-")
    summary = f"{job_name}-summary"[:MAX_LABEL].rstrip("-")
    labels = {LABEL_NAME: APP_NAME, LABEL_MANAGED_BY: FIELD_MANAGER, LABEL_BULK_RUN: target.bulk_run,
              layouts.LABEL_MODE: "bulk"}
    args = layouts.bulk_entrypoint_args(output, max_concurrent, max_retries, summary)
    entrypoint = build_entrypoint("", args, command=["dreambooth", "bulk"])
    rayjob = _rayjob(job_name, {layouts.LABEL_MODE: "bulk"}, entrypoint, target,
                     annotations={layouts.ANNOTATION_SUMMARY: summary, layouts.ANNOTATION_OUTPUT: output},
                     manifest_configmap=configmap, runtime_env={"working_dir": layouts.MANIFEST_MOUNT})
    return [layouts.manifest_configmap(configmap, target.namespace, labels, manifest), rayjob]


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (runtimeEnvYAML, a manifest) as ``|`` blocks, readable as they are."""


_BlockDumper.add_representer(
    str, lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def rayjobs_to_yaml(rayjobs: Sequence[Mapping[str, Any]]) -> str:
    """A multi-document YAML of the objects (what ``kubectl apply -f`` would take)."""
    return yaml.dump_all([dict(o) for o in rayjobs], Dumper=_BlockDumper, sort_keys=False)


# --------------------------------------------------------------------------- submitting


def _api_error_text(exc: Exception) -> str:
    """The server's own words from an ApiException: message and each field cause."""
    body = getattr(exc, "body", None)
    try:
        status = json.loads(body) if body else {}
    except (TypeError, ValueError):
        status = {}
    if not isinstance(status, dict) or not status.get("message"):
        return f"HTTP {getattr(exc, 'status', '?')} {getattr(exc, 'reason', '') or ''}".strip()
    causes = (status.get("details") or {}).get("causes") or []
    fields = [f"{c.get('field', '?')}: {c.get('message', '')}" for c in causes if c.get("field")]
    text = status["message"] if not fields else "; ".join(fields)
    if status.get("code") == 404 and status.get("reason") == "NotFound" and not status.get("details"):
        text += " (is the KubeRay operator with its RayJob CRD ray.io/v1 installed?)"
    return text


def _unreachable(api_client: Any, exc: Exception) -> KubeError:
    host = getattr(getattr(api_client, "configuration", None), "host", "?")
    text = str(exc)
    if "timed out" in text.lower() or "timeout" in type(exc).__name__.lower():
        limit = getattr(api_client, "request_timeout", REQUEST_TIMEOUT_S)
        return KubeError(
            f"the Kubernetes API server at {host} accepted the connection but did not answer within {limit:g} s; "
            "check that the address in the kubeconfig is the API server (not a proxy or load balancer that "
            "holds connections), or raise --request-timeout"
        )
    return KubeError(
        f"cannot reach the Kubernetes API server at {host} ({type(exc).__name__}: {' '.join(text.split())[:200]}); "
        "check the kubeconfig context (--kubeconfig, KUBECONFIG) and that the cluster is up"
    )


def _content(obj: Optional[Mapping[str, Any]]) -> Any:
    meta = (obj or {}).get("metadata") or {}
    return (obj or {}).get("spec"), (obj or {}).get("data"), meta.get("labels") or {}, meta.get("annotations") or {}


class _Objects:
    """Get and server-side apply for the two kinds the CLI submits: RayJobs and ConfigMaps."""

    def __init__(self, api_client: Any):
        from kubernetes import client

        self.api_client = api_client
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    def get(self, obj: Mapping[str, Any]) -> Optional[dict]:
        from kubernetes.client.exceptions import ApiException

        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        try:
            if obj["kind"] == "ConfigMap":
                return self.api_client.sanitize_for_serialization(self.core.read_namespaced_config_map(name, ns))
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        except ApiException as exc:
            if exc.status != 404:
                raise
            return None

    def apply(self, obj: Mapping[str, Any], dry_run: bool) -> Any:
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        options = dict(field_manager=FIELD_MANAGER, force=True, field_validation="Strict", _content_type=APPLY_PATCH,
                       **({"dry_run": "All"} if dry_run else {}))
        if obj["kind"] == "ConfigMap":
            return self.api_client.sanitize_for_serialization(self.core.patch_namespaced_config_map(name, ns, dict(obj), **options))
        return self.custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, dict(obj), **options)


def _apply_one(api: _Objects, obj: Mapping[str, Any], dry_run: bool) -> tuple[str, str]:
    """Server-side apply one object: (action, note)."""
    live = api.get(obj)
    applied = api.apply(obj, dry_run)
    if live is None:
        return "created", ""
    if applied is None:  # the client drops bodies of statuses it does not expect (201)
        applied = api.get(obj)
    if _content(applied) == _content(live):
        return "unchanged", ""
    state = (live.get("status") or {}).get("jobDeploymentStatus")
    if not state:
        return "configured", ""
    ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    return "configured", (
        f"KubeRay does not restart a RayJob whose spec changes and this one is already {state}; to run it "
        f"with the new flags: kubectl delete rayjob -n {ns} {name}, then submit again"
    )


def submit(api_client: Any, objects: Sequence[Mapping[str, Any]], dry_run: bool = False) -> list[SubmitResult]:
    """Apply each object (RayJobs, ConfigMaps); one result per object, in order. Failures are results.

    ``dry_run=True`` asks the server to validate and compute every change without persisting anything
    (``dryRun=All``); with ``api_client=None`` it contacts nothing and reports every object ``rendered``.
    Raises ``ValueError`` when two objects share a kind and name (nothing is sent), ``KubeError`` when
    the API server cannot be reached at all.
    """
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    keys = [(o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]) for o in objects]
    twice = sorted({f"{ns}/{name}" for kind, ns, name in keys if keys.count((kind, ns, name)) > 1})
    if twice:
        raise ValueError(f"RayJobs {', '.join(twice)} appear more than once; each subject needs a unique name")
    results: list[SubmitResult] = []
    api = _Objects(api_client) if api_client is not None else None
    for obj in objects:
        meta = obj["metadata"]
        subject = (meta.get("labels") or {}).get(LABEL_SUBJECT, meta["name"])
        where = dict(subject=subject, name=meta["name"], namespace=meta["namespace"], dry_run=dry_run, kind=obj["kind"])
        if api is None:
            if not dry_run:
                raise ValueError("submit needs an api_client unless dry_run=True")
            results.append(SubmitResult(action="rendered", **where))
            continue
        for attempt in (1, 2):
            try:
                action, note = _apply_one(api, obj, dry_run)
                results.append(SubmitResult(action=action, message=note, **where))
                break
            except ApiException as exc:
                if exc.status == 409 and attempt == 1:
                    continue  # someone changed it between our read and write: read again, once
                reason = _api_error_text(exc)
                what = f"RayJob {meta['namespace']}/{meta['name']}" if obj["kind"] == KIND else \
                    f"{obj['kind']} {meta['namespace']}/{meta['name']}"
                message = f"subject {subject!r} ({what}) was rejected: {reason}"
                results.append(SubmitResult(action="failed", message=message, **where))
                break
            except HTTPError as exc:
                raise _unreachable(api_client, exc) from exc
    return results


def format_submit_results(results: Sequence[SubmitResult]) -> str:
    """One line per object like ``kubectl apply``: ``rayjob.ray.io/<name> created (server dry run)``."""
    lines = []
    for r in results:
        suffix = " (server dry run)" if r.dry_run and r.action != "rendered" else ""
        if r.action == "failed":
            lines.append(r.message)
        else:
            resource = "rayjob.ray.io" if r.kind == KIND else r.kind.lower()
            lines.append(f"{resource}/{r.name} {r.action}{suffix}" + (f"\n  note: {r.message}" if r.message else ""))
    return "\n".join(lines)


# --------------------------------------------------------------------------- connecting


class _TimeoutApiClient:
    """Mixin: every call gets ``request_timeout`` unless the caller gives its own."""

    request_timeout: float = REQUEST_TIMEOUT_S

    def call_api(self, *args, _request_timeout=None, **kwargs):  # noqa: D401 (kubernetes' signature)
        timeout = _request_timeout or (min(5.0, self.request_timeout), self.request_timeout)
        return super().call_api(*args, _request_timeout=timeout, **kwargs)


def _api_client(configuration: Any, request_timeout: float) -> Any:
    from kubernetes import client
    from urllib3.util.retry import Retry

    # urllib3's default retries a timed-out GET three more times: a silent server would take 4x the limit.
    configuration.retries = Retry(total=2, connect=2, read=0, status=0, backoff_factor=0.2)
    cls = type("ApiClient", (_TimeoutApiClient, client.ApiClient), {"request_timeout": float(request_timeout)})
    return cls(configuration)


def _check_kubeconfig_file(path: str) -> None:
    """Read a kubeconfig as a user's YAML (size and alias limits, no Python tags) before the client does."""
    from dreambooth.inputs import InputError, load_yaml_file

    try:
        data = load_yaml_file(os.path.expanduser(path), "kubeconfig")
    except InputError as exc:
        raise KubeConfigError(f"{exc}; pass a valid kubeconfig (kubectl config view --raw > FILE)") from None
    if not isinstance(data, dict) or not data.get("clusters"):
        raise KubeConfigError(f"kubeconfig {path} has no 'clusters'; pass a kubeconfig file "
                              "(kubectl config view --raw > FILE)")


def load_api_client(kubeconfig: Optional[str] = None, context: Optional[str] = None,
                    request_timeout: float = REQUEST_TIMEOUT_S) -> Any:
    """A ``kubernetes.client.ApiClient``: in-cluster credentials inside a pod, else the kubeconfig.

    In a pod (``KUBERNETES_SERVICE_HOST`` set) with neither argument given, the pod's service account
    is used. Otherwise ``kubeconfig`` (default: ``$KUBECONFIG`` or ``~/.kube/config``) and ``context``.
    Every API call made through the client times out after ``request_timeout`` seconds.
    """
    from kubernetes import client, config

    if not (request_timeout > 0):
        raise KubeConfigError(f"--request-timeout must be a positive number of seconds, got {request_timeout}")
    configuration = client.Configuration()
    if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException as exc:
            raise KubeError(f"running in a pod but cannot use its service account: {exc}") from exc
        return _api_client(configuration, request_timeout)
    if kubeconfig is not None and not os.path.isfile(os.path.expanduser(kubeconfig)):
        raise KubeConfigError(f"kubeconfig {kubeconfig} does not exist; pass the path of a kubeconfig file")
    source = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    for path in ([kubeconfig] if kubeconfig else [p for p in (os.environ.get("KUBECONFIG") or "~/.kube/config").split(os.pathsep) if p]):
        if os.path.isfile(os.path.expanduser(path)):
            _check_kubeconfig_file(path)
    try:
        config.load_kube_config(  # KUBECONFIG read now: the client reads it once, at import
            config_file=kubeconfig or os.environ.get("KUBECONFIG") or None, context=context,
            client_configuration=configuration, persist_config=False,
        )
    except Exception as exc:  # ConfigException, OSError, bad base64 (binascii.Error), YAML errors...
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise KubeConfigError(
            f"no usable Kubernetes configuration in {source} ({type(exc).__name__}: {reason}); pass --kubeconfig, "
            "set KUBECONFIG, or run `kubectl config use-context <name>`"
            + (f" (is {context!r} a context in that file?)" if context else "")
        ) from None
    return _api_client(configuration, request_timeout)
