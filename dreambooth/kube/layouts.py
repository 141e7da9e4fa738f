"""How a manifest becomes Kubernetes objects: the two job layouts, and the bulk summary ConfigMap.

Owns the choice between the layouts and what each renders (``manifests`` owns names and the
per-subject RayJob, ``client`` applies objects, ``status`` reads them back):

- ``bulk`` (the default): ONE driver per manifest. A ConfigMap ``<run>-manifest`` holds the manifest
  with every subject's whole resolved config; one RayJob ``<run>-bulk`` runs
  ``dreambooth bulk --manifest manifest.yaml ...`` on the cluster. Its submitter pod mounts the
  ConfigMap and ``ray job submit`` uploads that folder as the job's ``working_dir``, so the driver on
  the head finds ``manifest.yaml`` in its working directory. Priors are shared, ``--max-concurrent``
  and ``--max-retries`` mean what they mean locally, and the head runs one driver instead of
  hundreds. The driver publishes its summary to the ConfigMap ``<run>-bulk-summary`` as subjects
  change state; ``dreambooth status`` reads it.
- ``per-subject``: one RayJob per subject, for Kubernetes-level accounting. On a dedicated cluster
  per job with ``queue_name`` set, each RayJob is suspended for Kueue to admit
  (``kueue.x-k8s.io/queue-name``, no in-tree autoscaler); on the shared cluster, ``driver_slots``
  gates drivers with ``entrypointResources`` on a custom head resource (at most N at once).

Every RayJob gets a submitter pod template with the restricted Pod Security Standard's
securityContext (KubeRay's default submitter pod has none and is rejected where it is enforced).
The Helm chart renders the same objects (``jobs.layout``); ``tests/test_kube_cli.py`` and
``tests/test_helm_layouts.py`` check them.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import yaml

LABEL_MODE = "dreambooth.io/mode"
ANNOTATION_SUMMARY = "dreambooth.io/summary-configmap"
ANNOTATION_OUTPUT = "dreambooth.io/output"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
MANIFEST_KEY = "manifest.yaml"
SUMMARY_KEY = "bulk-summary.json"
MANIFEST_MOUNT = "/dreambooth/manifest"
SUBMITTER_CONTAINER = "ray-job-submitter"
DRIVER_RESOURCE = "dreambooth-driver"
"""Custom resource the shared head advertises (chart: ``jobs.maxConcurrent``); each per-subject driver takes one."""

MAX_CONFIGMAP_BYTES = 1_000_000
"""Kubernetes refuses ConfigMaps over 1 MiB (all keys together); we stay a little below."""

RUN_AS = 1000
"""UID/GID of the image's ``ray`` user (helm/Dockerfile, chart ``securityContext``)."""

SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def submitter_pod_template(image: str, manifest_configmap: Optional[str] = None) -> dict[str, Any]:
    """The K8sJobMode submitter pod: restricted securityContext; the manifest mounted in the bulk layout.

    KubeRay fills in the container's ``ray job submit`` command, the dashboard address and the token.
    """
    container: dict[str, Any] = {
        "name": SUBMITTER_CONTAINER,
        "image": image,
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "500m", "memory": "512Mi"}},
        "securityContext": {
            "runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
    }
    if manifest_configmap:
        container["volumeMounts"] = [{"name": "manifest", "mountPath": MANIFEST_MOUNT, "readOnly": True}]
        spec["volumes"] = [{"name": "manifest", "configMap": {"name": manifest_configmap}}]
    return {"metadata": {"labels": {"app.kubernetes.io/name": "dreambooth",
                                    "app.kubernetes.io/component": "ray-job-submitter"}}, "spec": spec}


def head_image(ray_cluster_spec: Mapping[str, Any]) -> Optional[str]:
    """The image of a RayCluster spec's head (Ray) container, which the submitter can use too."""
    containers = (((ray_cluster_spec.get("headGroupSpec") or {}).get("template") or {}).get("spec") or {}).get("containers")
    return (containers or [{}])[0].get("image")


# --------------------------------------------------------------------------- bulk layout


def manifest_document(subjects: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """A ``dreambooth bulk`` manifest holding each subject's whole resolved config.

    ``subjects``: (name, flat {field: value}) with every field. Values shared by all subjects go to
    ``defaults`` once; each subject keeps only what differs, so hundreds of subjects fit a ConfigMap.
    """
    if not subjects:
        return {"defaults": {}, "subjects": []}
    first = subjects[0][1]
    shared = {k: v for k, v in first.items() if all(k in s and s[k] == v for _, s in subjects[1:])}
    entries = [{"name": name, **{k: v for k, v in values.items() if k not in shared}} for name, values in subjects]
    return {"defaults": shared, "subjects": entries}


def manifest_configmap(name: str, namespace: str, labels: Mapping[str, str], manifest: Mapping[str, Any]) -> dict[str, Any]:
    text = yaml.safe_dump(dict(manifest), sort_keys=False)
    if len(text.encode()) > MAX_CONFIGMAP_BYTES:
        raise ValueError(
            f"the resolved manifest is {len(text.encode()):,} bytes, more than a ConfigMap holds "
            f"({MAX_CONFIGMAP_BYTES:,}); split the manifest into several bulk runs (--bulk-run NAME each)"
        )
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
            "data": {MANIFEST_KEY: text}}


def bulk_entrypoint_args(output: str, max_concurrent: int, max_retries: int, summary_configmap: str) -> dict[str, str]:
    """The flags of ``dreambooth bulk`` that the bulk RayJob runs (the manifest is in its working_dir)."""
    return {"manifest": MANIFEST_KEY, "output": output, "max-concurrent": str(max_concurrent),
            "max-retries": str(max_retries), "summary-configmap": summary_configmap}


# --------------------------------------------------------------------------- the summary ConfigMap


def pod_namespace() -> str:
    """The namespace of the pod this runs in (its service account's)."""
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE) as handle:
            return handle.read().strip()
    except OSError:
        raise ValueError("not running in a pod (no service-account namespace file): pass --summary-namespace") from None


def publish_summary(api_client: Any, namespace: str, name: str, payload: Mapping[str, Any]) -> None:
    """Server-side apply the summary ConfigMap (the bulk driver's head pod needs configmaps get/patch)."""
    from kubernetes import client

    from dreambooth.kube.manifests import APPLY_PATCH, FIELD_MANAGER  # here: manifests imports this module

    body = {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/name": "dreambooth",
                                                                          "app.kubernetes.io/managed-by": FIELD_MANAGER}},
            "data": {SUMMARY_KEY: json.dumps(dict(payload), sort_keys=True, default=str)}}
    client.CoreV1Api(api_client).patch_namespaced_config_map(
        name, namespace, body, field_manager=FIELD_MANAGER, force=True, _content_type=APPLY_PATCH)


def read_summary(api_client: Any, namespace: str, name: str) -> Optional[dict[str, Any]]:
    """The bulk summary a driver published, or None when there is none (yet)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        found = client.CoreV1Api(api_client).read_namespaced_config_map(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    data = (found.data or {}).get(SUMMARY_KEY)
    try:
        return json.loads(data) if data else None
    except ValueError:
        return None


def in_a_pod() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
