"""A test double of the Kubernetes API server at the HTTP level, for namespaced custom resources (and
ConfigMaps, validated against the strict Kubernetes schema).

The real ``kubernetes`` client talks to it on 127.0.0.1 (``configuration()``); objects live in memory.
Answers like the API server: create (201; 409 AlreadyExists), get (404 NotFound with a Status), list
(equality ``labelSelector``), replace (409 Conflict on a stale resourceVersion), delete, JSON merge patch,
server-side apply (one manager: applied ``spec`` etc. replace the live ones, labels/annotations merge).
Every write runs the CRD pipeline: prune unknown fields (400 under ``fieldValidation=Strict``), fill schema
defaults, validate against the CRD's ``openAPIV3Schema`` (422 Invalid with field causes), keep status out,
keep resourceVersion on a no-op; ``dryRun=All`` stores nothing. Not modelled: CEL rules, field ownership,
watch, the /status endpoint (tests call ``set_status``), cluster-scoped resources.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import threading
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional
from urllib.parse import parse_qs, urlsplit

import jsonschema
import kubernetes
import yaml

CRD_DIR = Path(__file__).parent / "fixtures" / "kuberay-crds"
APPLY, MERGE = "application/apply-patch+yaml", "application/merge-patch+json"
_PATH = re.compile(r"/(?:apis/([^/]+)|api)/([^/]+)/namespaces/([^/]+)/([^/]+)(?:/([^/]+))?")
SCHEMA_DIR = Path(__file__).parent / "fixtures" / "k8s-schemas"
CORE_KINDS = {"configmaps": ("ConfigMap", "configmap-v1.json")}
"""Core (``/api/v1``) kinds the double also serves, validated against the strict Kubernetes schemas."""
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_SYSTEM = ("uid", "creationTimestamp", "generation", "resourceVersion")
_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number"}

Reply = tuple[int, dict, dict]  # HTTP code, JSON body, extra headers


class _Failure(Exception):
    """An error reply: a ``meta/v1 Status`` body, as the API server sends with every error."""

    def __init__(self, code: int, reason: str, message: str, details: Optional[dict] = None) -> None:
        super().__init__(message)
        body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}  # fmt: skip
        self.reply: Reply = (code, body if details is None else {**body, "details": details}, {})


class _Kind:
    """One served version of a CRD: names and its openAPIV3Schema validator."""

    def __init__(self, crd: dict, version: dict) -> None:
        self.group, self.version = crd["spec"]["group"], version["name"]
        self.kind, self.plural = crd["spec"]["names"]["kind"], crd["spec"]["names"]["plural"]
        self.schema = version["schema"]["openAPIV3Schema"]
        self.validator = jsonschema.Draft7Validator(self.schema)
        self.resource = f"{self.plural}.{self.group}" if self.group else self.plural
        self.api_version = f"{self.group}/{self.version}" if self.group else self.version

    @classmethod
    def core(cls, plural: str) -> _Kind:
        kind, schema_file = CORE_KINDS[plural]
        schema = json.loads((SCHEMA_DIR / schema_file).read_text())
        crd = {"spec": {"group": "", "names": {"kind": kind, "plural": plural}}}
        return cls(crd, {"name": "v1", "schema": {"openAPIV3Schema": schema}})

    def details(self, name: str, **extra: Any) -> dict:
        return {"name": name, "group": self.group, "kind": self.plural, **extra}

    def invalid(self, name: str, causes: list[dict]) -> _Failure:
        text = "; ".join(f"{c['field']}: {c['message']}" for c in causes)
        details = {"name": name, "group": self.group, "kind": self.kind, "causes": causes}
        return _Failure(422, "Invalid", f'{self.kind}.{self.group} "{name}" is invalid: {text}', details)


def _path(parts: list) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _sub_schemas(obj: Any, schema: dict):
    """(key, value, schema) of the children of ``obj`` the schema declares; schema None if undeclared."""
    if isinstance(obj, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        if props is None and not isinstance(extra, dict):
            return  # opaque (e.g. the top-level metadata, which the server handles as ObjectMeta)
        for key in list(obj):
            yield key, obj[key], (props or {}).get(key, extra if isinstance(extra, dict) else None)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            yield i, item, schema["items"]


def _prune(obj: Any, schema: dict, path: list, unknown: list) -> None:
    """Drop fields the schema does not declare (the API server's pruning); record their paths."""
    for key, value, sub in _sub_schemas(obj, schema):
        if sub is None:
            unknown.append(_path(path + [key]))
            del obj[key]
        else:
            _prune(value, sub, path + [key], unknown)


def _default(obj: Any, schema: dict) -> None:
    """Fill in schema ``default`` values of absent fields, as the API server does."""
    if isinstance(obj, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key not in obj and "default" in sub:
                obj[key] = copy.deepcopy(sub["default"])
    for _, value, sub in _sub_schemas(obj, schema):
        if sub is not None:
            _default(value, sub)


def _cause(error: jsonschema.ValidationError) -> dict:
    """One jsonschema error as an API server ``StatusCause`` (reason, message, field)."""
    field, got = _path(list(error.absolute_path)), json.dumps(error.instance)
    reason, message = "FieldValueInvalid", f"Invalid value: {got}: {error.message}"
    if error.validator == "required":
        missing = next(p for p in error.validator_value if p not in error.instance and repr(p) in error.message)
        field, reason, message = _path([*error.absolute_path, missing]), "FieldValueRequired", "Required value"
    elif error.validator == "type":
        kind = _JSON_TYPES.get(type(error.instance), "null")
        reason = "FieldValueTypeInvalid"
        message = f'Invalid value: "{kind}": {field} in body must be of type {error.validator_value}: "{kind}"'
    elif error.validator == "enum":
        allowed = ", ".join(json.dumps(v) for v in error.validator_value)
        reason, message = "FieldValueNotSupported", f"Unsupported value: {got}: supported values: {allowed}"
    return {"reason": reason, "message": message, "field": field}


def _name_causes(name: str) -> list[dict]:
    if name and len(name) <= 253 and _SUBDOMAIN.match(name):
        return []
    return [{"reason": "FieldValueInvalid", "field": "metadata.name", "message": (
        f"Invalid value: {json.dumps(name)}: a lowercase RFC 1123 subdomain must consist of lower case "
        "alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character")}]


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _matches(labels: dict, selector: str) -> bool:
    """Equality-based label selector: ``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k`` joined by commas."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        key, op, value = re.fullmatch(r"(!?[^!=\s]+)\s*(!=|==|=)?\s*(.*)", term).groups()
        if op is None:
            ok = key[1:] not in labels if key.startswith("!") else key in labels
        else:
            ok = (labels.get(key) == value) == (op != "!=")
        if not ok:
            return False
    return True


class KubeApiDouble:
    """In-memory API server for the custom resources of the given CRD files, on 127.0.0.1."""

    def __init__(self, crd_files: Optional[list[Path]] = None) -> None:
        self.kinds: dict[tuple[str, str, str], _Kind] = {}
        for path in crd_files or [CRD_DIR / "ray.io_rayjobs.yaml"]:
            crd = yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
            kinds = [_Kind(crd, version) for version in crd["spec"]["versions"]]
            self.kinds.update({(kind.group, kind.version, kind.plural): kind for kind in kinds})
        for plural in CORE_KINDS:
            kind = _Kind.core(plural)
            self.kinds[("", kind.version, plural)] = kind
        self.objects: dict[tuple[str, str, str], dict] = {}  # (plural, namespace, name) -> object
        self.requests: list[tuple[str, str, str]] = []  # (method, path?query, content type)
        self._rv, self._lock = itertools.count(1000), threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None

    def start(self) -> KubeApiDouble:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)  # loopback only, any free port
        self._server.daemon_threads, self._server.double = True, self  # type: ignore[attr-defined]
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def configuration(self) -> kubernetes.client.Configuration:
        configuration = kubernetes.client.Configuration()
        configuration.host = f"http://127.0.0.1:{self._server.server_address[1]}"
        return configuration

    def api_client(self) -> kubernetes.client.ApiClient:
        return kubernetes.client.ApiClient(self.configuration())

    def reset(self) -> None:
        with self._lock:
            self.objects.clear()
            self.requests.clear()

    def get(self, name: str, namespace: str = "default", plural: str = "rayjobs") -> Optional[dict]:
        with self._lock:
            return copy.deepcopy(self.objects.get((plural, namespace, name)))

    def set_status(self, name: str, status: dict, namespace: str = "default", plural: str = "rayjobs") -> None:
        """Replace an object's status, as the operator does via /status; bumps resourceVersion."""
        with self._lock:
            obj = self.objects[(plural, namespace, name)]
            obj["status"] = copy.deepcopy(status)
            obj["metadata"]["resourceVersion"] = str(next(self._rv))

    def handle(self, method: str, url: str, content_type: str, raw: bytes) -> Reply:
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.requests.append((method, url, content_type))
        content_type = content_type.split(";")[0].strip()
        match = _PATH.fullmatch(parts.path)
        kind = match and self.kinds.get((match.group(1) or "", match.group(2), match.group(4)))
        try:
            if not kind:
                raise _Failure(404, "NotFound", "the server could not find the requested resource", {})
            namespace, name = match.group(3), match.group(5)
            body = self._parse(raw, content_type) if method in ("POST", "PUT", "PATCH") else None
            with self._lock:
                return self._route(kind, method, namespace, name, content_type, body, query)
        except _Failure as failure:
            return failure.reply

    def _route(self, kind: _Kind, method: str, namespace: str, name: Optional[str], content_type: str,
               body: Any, query: dict) -> Reply:  # fmt: skip
        if name is None and method == "GET":
            items = [copy.deepcopy(o) for (plural, ns, _), o in sorted(self.objects.items())
                     if plural == kind.plural and ns == namespace
                     and _matches(o["metadata"].get("labels") or {}, query.get("labelSelector", ""))]  # fmt: skip
            return 200, {"apiVersion": kind.api_version, "kind": f"{kind.kind}List",
                         "metadata": {"resourceVersion": str(next(self._rv))}, "items": items}, {}  # fmt: skip
        if name is None and method == "POST":
            name = (body.get("metadata") or {}).get("name", "")
            if (kind.plural, namespace, name) in self.objects:
                raise _Failure(409, "AlreadyExists", f'{kind.resource} "{name}" already exists', kind.details(name))
            return self._write(kind, namespace, name, body, None, query, method)
        old = self.objects.get((kind.plural, namespace, name or ""))
        if name is not None and method == "PATCH" and content_type == APPLY:
            return self._apply(kind, namespace, name, body, old, query)
        if name is None or old is None or method not in ("GET", "PUT", "PATCH", "DELETE"):
            raise _Failure(404, "NotFound", f'{kind.resource} "{name or ""}" not found', kind.details(name or ""))
        if method == "GET":
            return 200, copy.deepcopy(old), {}
        if method == "DELETE":
            if query.get("dryRun") != "All":
                del self.objects[(kind.plural, namespace, name)]
            details = kind.details(name, uid=old["metadata"]["uid"])
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success", "details": details}, {}
        if method == "PATCH" and content_type != MERGE:
            raise _Failure(415, "UnsupportedMediaType", "the body of the request was in an unknown format - "
                           f"accepted media types include: {MERGE}, {APPLY}")  # fmt: skip
        new = _merge_patch(old, body) if method == "PATCH" else body
        return self._write(kind, namespace, name, new, old, query, method)

    @staticmethod
    def _parse(raw: bytes, content_type: str) -> dict:
        try:  # JSON is YAML: an apply body may be either
            body = yaml.safe_load(raw) if "yaml" in content_type else json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("the request body must be an object")
        except (ValueError, yaml.YAMLError) as exc:
            raise _Failure(400, "BadRequest", f"the request body is not valid: {exc}") from None
        return body

    def _apply(self, kind: _Kind, namespace: str, name: str, body: dict, old: Optional[dict], query: dict) -> Reply:
        if not query.get("fieldManager"):
            raise _Failure(400, "BadRequest", 'PatchOptions.meta.k8s.io "" is invalid: fieldManager: '
                           "Required value: is required for apply patch")  # fmt: skip
        if old is None:
            return self._write(kind, namespace, name, body, None, query, "PATCH")
        new = copy.deepcopy(old)
        for field in ("labels", "annotations"):
            merged = {**(old["metadata"].get(field) or {}), **((body.get("metadata") or {}).get(field) or {})}
            if merged:
                new["metadata"][field] = merged
        new.update({k: copy.deepcopy(v) for k, v in body.items() if k not in ("metadata", "status")})
        return self._write(kind, namespace, name, new, old, query, "PATCH")

    def _write(self, kind: _Kind, namespace: str, name: str, new: dict, old: Optional[dict], query: dict,
               method: str) -> Reply:  # fmt: skip
        """The CRD write pipeline: checks, pruning, defaulting, validation, system fields, store."""
        new = copy.deepcopy(new)
        meta = new.setdefault("metadata", {})
        meta.pop("managedFields", None)
        if new.get("apiVersion") != kind.api_version or new.get("kind") != kind.kind:
            raise _Failure(400, "BadRequest", f"expected apiVersion {kind.api_version} and kind "
                           f"{kind.kind}, got {new.get('apiVersion')} {new.get('kind')}")  # fmt: skip
        if meta.setdefault("namespace", namespace) != namespace or meta.setdefault("name", name) != name:
            raise _Failure(400, "BadRequest", "the namespace or name of the provided object does not match "
                           "the namespace or name sent on the request")  # fmt: skip
        unknown: list[str] = []
        _prune(new, kind.schema, [], unknown)
        if unknown and query.get("fieldValidation") == "Strict":
            fields = ", ".join(f'unknown field "{u}"' for u in unknown)
            raise _Failure(400, "BadRequest", f'{kind.kind} in version "{kind.version}" cannot be handled as '
                           f"a {kind.kind}: strict decoding error: {fields}")  # fmt: skip
        _default(new, kind.schema)
        causes = _name_causes(name) + [_cause(e) for e in kind.validator.iter_errors(new)]
        if causes:
            raise kind.invalid(name, causes)
        new.pop("status", None)  # the status subresource is the only way to write status
        code = 201
        if old is None:
            meta.update(uid=str(uuid.uuid4()), generation=1,
                        creationTimestamp=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))  # fmt: skip
        else:
            code, sent = 200, meta.get("resourceVersion")
            if sent and sent != old["metadata"]["resourceVersion"]:
                raise _Failure(409, "Conflict", f'Operation cannot be fulfilled on {kind.resource} "{name}": the '
                               "object has been modified; please apply your changes to the latest version and "
                               "try again", kind.details(name))  # fmt: skip
            meta.update({k: old["metadata"][k] for k in _SYSTEM})
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            if new == old:  # a no-op write changes nothing, not even resourceVersion
                return 200, copy.deepcopy(old), {}
            if any(new.get(k) != old.get(k) for k in (set(new) | set(old)) - {"metadata", "status"}):
                meta["generation"] += 1
        meta["resourceVersion"] = str(next(self._rv))
        if query.get("dryRun") != "All":
            self.objects[(kind.plural, namespace, name)] = copy.deepcopy(new)
        warnings = ", ".join(f'299 - "unknown field \\"{u}\\""' for u in unknown)
        return code, new, ({"Warning": warnings} if warnings else {})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # one reply = two writes (headers, body): no 40 ms delayed-ACK stall

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output quiet
        pass

    def _dispatch(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        content_type = self.headers.get("Content-Type", "")
        code, body, headers = self.server.double.handle(self.command, self.path, content_type, raw)
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch
