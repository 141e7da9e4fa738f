"""Storage on any fsspec URI (local paths, s3://, gs://, memory://, ...).

Owns the two rules every stage relies on:
- atomic writes: a file appears under its final name only when it is whole (write to a hidden
  temporary name beside it, then move; object stores make single-object puts atomic anyway);
- completion markers: a stage's output is complete when its marker file (a manifest, a run record)
  exists, and the marker is always written last.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import url_to_fs


class StorageError(ValueError):
    """A URI that cannot be used: unknown protocol or missing fsspec backend; says what to install."""


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it for a URI or local path."""
    try:
        fs, path = url_to_fs(str(uri))
    except ImportError as exc:
        raise StorageError(f"{uri}: the fsspec backend for this protocol is not installed ({exc}); "
                           "install it, e.g. `pip install s3fs` for s3:// or `gcsfs` for gs://") from None
    except ValueError as exc:
        protocol = str(uri).split("://", 1)[0]
        raise StorageError(f"{uri}: unknown storage protocol {protocol!r} ({exc}); use a local path or a URI "
                           "such as s3://bucket/path") from None
    return fs, path


def join(uri: str, *parts: str) -> str:
    return "/".join([str(uri).rstrip("/"), *(p.strip("/") for p in parts)])


def is_local(uri: str) -> bool:
    return "://" not in str(uri) or str(uri).startswith("file://")


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` so that ``uri`` is either absent or whole, never partial."""
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}" if parent else f".tmp-{uuid.uuid4().hex}"
    with fs.open(tmp, "wb") as handle:
        handle.write(data)
    fs.mv(tmp, path)


def write_json_atomic(uri: str, obj: Any) -> None:
    write_bytes_atomic(uri, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(uri: str) -> Any:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as handle:
        return json.load(handle)


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local folder's contents to ``uri`` (a no-op copy for the same local path)."""
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)
    for src in sorted(Path(local_dir).rglob("*")):
        if src.is_file():
            rel = src.relative_to(local_dir).as_posix()
            fs.makedirs(f"{path}/{rel}".rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(src), f"{path}/{rel}")


def download_dir(uri: str, local_dir: str | Path) -> Path:
    fs, path = filesystem(uri)
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    fs.get(path.rstrip("/") + "/", str(local_dir), recursive=True)
    return local_dir


def check_writable(uri: str) -> None:
    """Fail now, not after training, if ``uri`` cannot be written. Leaves nothing behind."""
    fs, path = filesystem(uri)
    created = not fs.exists(path)
    probe = f"{path.rstrip('/')}/.write-probe-{uuid.uuid4().hex}"
    try:
        fs.makedirs(path, exist_ok=True)
        with fs.open(probe, "wb") as handle:
            handle.write(b"ok")
        fs.rm(probe)
    except Exception as exc:  # PermissionError, read-only FS, missing bucket, bad credentials...
        raise PermissionError(f"cannot write to {uri} ({type(exc).__name__}: {exc}); pick a writable location") from None
    finally:
        if created and is_local(uri):
            try:
                os.rmdir(path)  # only removes it if still empty
            except OSError:
                pass
