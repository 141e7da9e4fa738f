"""Storage on any fsspec URI (local paths, s3://, gs://, memory://, ...).

Owns the rules every stage relies on:
- atomic writes: a file appears under its final name only when it is whole (write to a hidden
  temporary name beside it, then move; object stores make single-object puts atomic anyway);
- completion markers: a stage's output is complete when its marker file (a manifest, a run record)
  exists, and the marker is always written last;
- no surprises from a backend: an unreachable host, missing credentials or a refused connection
  becomes a ``StorageError`` naming the URI (``guard``), and checking that a place is writable
  leaves nothing behind, not even an empty parent folder;
- where two locations overlap (``contains``), so that no stage writes into or deletes a user's files.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import uuid
from pathlib import Path
from typing import Any, Iterator

import fsspec
from fsspec.core import url_to_fs


class StorageError(ValueError):
    """A URI that cannot be used: unknown protocol or missing fsspec backend; says what to install."""


@contextlib.contextmanager
def guard(uri: str, action: str = "read") -> Iterator[None]:
    """Turn a backend's failure (no route, refused, timeout, bad credentials) into a StorageError."""
    try:
        yield
    except (StorageError, PermissionError):
        raise
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise
    except Exception as exc:  # each fsspec backend raises its own types (socket, botocore, aiohttp...)
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise StorageError(
            f"cannot {action} {uri}: {type(exc).__name__}: {reason}; check the address, that the service is up, "
            "and the credentials"
        ) from None


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
    except Exception as exc:  # backends that connect on construction (ftp, sftp, ...)
        with guard(uri, "connect to"):
            raise exc
    return fs, path


def join(uri: str, *parts: str) -> str:
    return "/".join([str(uri).rstrip("/"), *(p.strip("/") for p in parts)])


def is_local(uri: str) -> bool:
    return "://" not in str(uri) or str(uri).startswith("file://")


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    with guard(uri):
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


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(uri: str) -> None:
    """Fail now, not after training, if ``uri`` cannot be written. Leaves nothing behind.

    Local paths are checked without creating anything: the nearest existing ancestor must be a
    writable folder. Object stores get a probe object under ``uri``, deleted at once.
    """
    if is_local(uri):
        path = Path(local_path(uri))
        existing = _nearest_existing(path)
        if not existing.is_dir():
            raise PermissionError(f"cannot write to {uri}: {existing} is a file, not a folder; pick another location")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot write to {uri}: {existing} is not writable; pick a writable location")
        return
    fs, path = filesystem(uri)
    probe = f"{path.rstrip('/')}/.write-probe-{uuid.uuid4().hex}"
    try:
        with fs.open(probe, "wb") as handle:
            handle.write(b"ok")
        fs.rm(probe)
    except Exception as exc:  # PermissionError, missing bucket, bad credentials...
        reason = " ".join(str(exc).split())[:200]
        raise PermissionError(f"cannot write to {uri} ({type(exc).__name__}: {reason}); pick a writable location") from None


def absolute(uri: str) -> str:
    """``uri`` with a plain local path made absolute against this process's working directory; any other
    URI as it is. A path handed to Ray Train (its storage) or to training workers must be absolute: Ray
    refuses a relative storage path, and a worker's working directory is not the driver's."""
    text = str(uri)
    if text.startswith("file://"):
        return "file://" + absolute(text[len("file://"):])
    if "://" in text:
        return text
    return os.path.abspath(os.path.expanduser(text))


def local_path(uri: str) -> str:
    """The absolute, symlink-resolved path of a local URI (``file://`` or a plain path)."""
    text = str(uri)[len("file://"):] if str(uri).startswith("file://") else str(uri)
    return str(Path(os.path.expanduser(text)).resolve())


def _comparable(uri: str) -> tuple[str, str]:
    """(protocol, normalized path) of a URI, so that two spellings of one place compare equal."""
    if is_local(uri):
        return "file", local_path(uri)
    protocol, rest = str(uri).split("://", 1)
    return protocol, "/" + posixpath.normpath(rest.strip("/"))


def contains(outer: str, inner: str) -> bool:
    """Whether ``inner`` is ``outer`` or lies inside it (same protocol, path prefix by components)."""
    (p1, a), (p2, b) = _comparable(outer), _comparable(inner)
    if p1 != p2:
        return False
    return b == a or b.startswith(a.rstrip("/") + "/")


def is_root(uri: str) -> bool:
    """A filesystem root, a home folder, or an object-store bucket root: never a run's output."""
    protocol, path = _comparable(uri)
    if protocol == "file":
        return path in ("/", str(Path.home().resolve())) or Path(path).parent == Path(path)
    return path.strip("/").count("/") == 0
