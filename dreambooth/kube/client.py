"""The Kubernetes API client and submitting objects to it: server-side apply, results, error text.

Owns: the API client itself (kubeconfig or in-cluster credentials checked as user input; every call
under a timeout), reading a live RayCluster's head image, applying the objects ``manifests`` builds
with the official ``kubernetes`` client, and turning what the server says into actionable messages.

Submission uses server-side apply (PATCH ``application/apply-patch+yaml``, field manager
``dreambooth-cli``, ``force=True``, ``fieldValidation=Strict``), so a re-submit of an unchanged object
changes nothing on the server. Each result says ``created``, ``configured``, ``unchanged`` or ``failed``;
one bad subject never stops the others.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from dreambooth.kube.errors import KubeConfigError, KubeError
from dreambooth.kube.layouts import head_image
from dreambooth.kube.manifests import APPLY_PATCH, FIELD_MANAGER, GROUP, KIND, LABEL_SUBJECT, PLURAL, VERSION

REQUEST_TIMEOUT_S = 30.0
"""Default limit on each Kubernetes API call (connect and read), so a silent server cannot hang us."""


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


# --------------------------------------------------------------------------- what the server says


def api_error_text(exc: Exception) -> str:
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


def unreachable(api_client: Any, exc: Exception) -> KubeError:
    """The error for an API server that cannot be reached or did not answer in time: what to check."""
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


# --------------------------------------------------------------------------- reading


def cluster_head_image(api_client: Any, namespace: str, cluster: str) -> str:
    """The head image of a live RayCluster (the submitter pod of its RayJobs uses the same one)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        found = client.CustomObjectsApi(api_client).get_namespaced_custom_object(GROUP, VERSION, namespace, "rayclusters", cluster)
    except ApiException as exc:
        raise KubeConfigError(f"cannot read RayCluster {namespace}/{cluster} ({api_error_text(exc)}); check --cluster, "
                              "or pass --image (the cluster's image) for the submitter pod") from None
    except HTTPError as exc:
        raise unreachable(api_client, exc) from exc
    image = head_image(found.get("spec") or {})
    if not image:
        raise KubeConfigError(f"RayCluster {namespace}/{cluster} has no head image; pass --image")
    return image


# --------------------------------------------------------------------------- submitting


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
                reason = api_error_text(exc)
                what = f"RayJob {meta['namespace']}/{meta['name']}" if obj["kind"] == KIND else \
                    f"{obj['kind']} {meta['namespace']}/{meta['name']}"
                message = f"subject {subject!r} ({what}) was rejected: {reason}"
                results.append(SubmitResult(action="failed", message=message, **where))
                break
            except HTTPError as exc:
                raise unreachable(api_client, exc) from exc
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
