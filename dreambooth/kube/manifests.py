"""Subject jobs and manifests as KubeRay objects: names, entrypoints, RayJobs, ConfigMaps, YAML.

Owns: the names of everything the CLI puts on a cluster (RayJob names, labels, the bulk-run label
value), checking Kubernetes names as user input, turning a ``SubjectJob`` (a subject name + the CLI
flags of ``python -m ray_jobs.personalize``) or a whole manifest (the bulk layout, ``layouts``) into
KubeRay ``RayJob`` objects (``ray.io/v1``) and ConfigMaps as plain dicts, and their YAML. Nothing here
talks to a cluster (``client`` applies the objects).

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
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import yaml

from dreambooth.kube import layouts
from dreambooth.kube.errors import KubeConfigError

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
    spec: dict[str, Any] = {"entrypoint": entrypoint, "submissionMode": "K8sJobMode", "backoffLimit": target.backoff_limit}
    env = {**dict(target.runtime_env or {}), **dict(runtime_env or {})}
    if env:
        spec["runtimeEnvYAML"] = yaml.safe_dump(env, sort_keys=True)
    if target.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = target.active_deadline_seconds
    if target.cluster_name is not None:
        spec["clusterSelector"] = {CLUSTER_SELECTOR_KEY: target.cluster_name}
        if target.driver_slots:
            spec["entrypointResources"] = json.dumps({layouts.DRIVER_RESOURCE: 1})
    else:
        spec["rayClusterSpec"] = _dedicated_cluster(target)
        spec["shutdownAfterJobFinishes"] = True
        spec["ttlSecondsAfterFinished"] = target.ttl_seconds_after_finished
    if target.submitter_image:
        spec["submitterPodTemplate"] = layouts.submitter_pod_template(target.submitter_image, manifest_configmap)
    elif manifest_configmap:
        raise ValueError("the bulk layout needs a submitter pod to carry the manifest: pass --image")
    labels = {LABEL_NAME: APP_NAME, LABEL_MANAGED_BY: FIELD_MANAGER, LABEL_BULK_RUN: target.bulk_run, **labels}
    if target.queue_name:
        labels[layouts.LABEL_KUEUE_QUEUE] = target.queue_name
        spec["suspend"] = True  # Kueue unsuspends the job when its quota admits it
    metadata: dict[str, Any] = {"name": name, "namespace": target.namespace, "labels": labels}
    if annotations:
        metadata["annotations"] = dict(annotations)
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec}


def build_rayjob(job: SubjectJob, target: RayJobTarget) -> dict[str, Any]:
    """The RayJob custom object (a plain dict) that runs one subject's ``job`` on ``target``."""
    validate_k8s_name(job.name, what="subject name")
    entrypoint = build_entrypoint(target.entrypoint_module, job.args, subject=job.name)
    return _rayjob(rayjob_name(job.name, target.bulk_run), {LABEL_SUBJECT: job.name, layouts.LABEL_MODE: "per-subject"},
                   entrypoint, target)


def build_bulk_objects(manifest: Mapping[str, Any], target: RayJobTarget, output: str, max_concurrent: int,
                       max_retries: int) -> list[dict[str, Any]]:
    """The bulk layout: the manifest ConfigMap and the one RayJob whose driver runs ``dreambooth bulk``."""
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
