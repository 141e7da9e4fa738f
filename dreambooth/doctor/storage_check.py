"""The output location: a probe file written, read back and deleted, leaving nothing behind; a failure
names the fix (credentials, permissions, a read-only or full disk, a missing bucket)."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from typing import Optional

from dreambooth.doctor.base import FAIL, OK, Check, describe_exception, one_line

def _storage_fix(output: str, exc: BaseException, local: bool) -> str:
    kind = type(exc).__name__
    text = f"{kind} {exc}".lower()
    if isinstance(exc, (NotADirectoryError, FileExistsError)):
        return f"a part of {output} is a regular file, not a folder: pick another --output"
    if "credential" in text or ("token" in text and "expired" in text):
        return ("provide credentials: for s3:// AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an IAM role "
                "(EKS: IRSA / pod identity); for gs:// GOOGLE_APPLICATION_CREDENTIALS or Workload Identity")
    if isinstance(exc, PermissionError) or "accessdenied" in text or "forbidden" in text or "403" in text:
        return (f"grant this pod's identity (service account / IAM role) write and delete access on {output}, "
                "or pick another --output" if not local else
                f"make {output} writable for this user (uid {os.getuid()}), or pick another --output")
    if getattr(exc, "errno", None) == 30 or "read-only" in text:
        return "that filesystem is read-only: mount a writable volume there, or use object storage (s3://, gs://)"
    if isinstance(exc, FileNotFoundError) or "nosuchbucket" in text or "no such bucket" in text:
        return "the bucket (or parent folder) does not exist: create it or fix the name"
    if getattr(exc, "errno", None) == 28 or "no space" in text:
        return "the disk is full: free space or use another volume"
    return f"check that {output} is writable from here (permissions, credentials, network, endpoint)"


def check_storage(output: Optional[str] = None) -> list[Check]:
    """Write, read back and delete a probe under ``output``; leave nothing behind (no created folders either)."""
    if not output:
        return [Check("storage", OK, "not checked: pass --output URI to probe where a run will write")]
    from dreambooth import storage

    try:
        fs, path = storage.filesystem(output)
    except storage.StorageError as exc:
        message = str(exc)
        detail, _, fix = message.partition("; ")
        if not fix:
            fix = "use a local path or a URI such as s3://bucket/path with its fsspec backend installed"
        return [Check("storage", FAIL, one_line(detail), fix)]
    except Exception as exc:
        return [Check("storage", FAIL, f"cannot open {output}: {describe_exception(exc)}",
                      "check the URI and the fsspec backend for it")]
    local = storage.is_local(output)
    base = path.rstrip("/") or "/"
    token = uuid.uuid4().hex
    probe = f"{base.rstrip('/')}/.dreambooth-doctor-{token}"
    data = f"dreambooth doctor probe {token}\n".encode()
    missing: list[str] = []  # local folders this probe creates (deepest first), removed again at the end
    if local:
        p = os.path.abspath(base)
        while not os.path.lexists(p) and os.path.dirname(p) != p:
            missing.append(p)
            p = os.path.dirname(p)
    step = "create the folder"
    written = deleted = False
    error: Optional[Exception] = None
    started = time.monotonic()
    try:
        if missing:
            os.makedirs(base)
        step = "write a probe file"
        fs.pipe_file(probe, data)
        written = True
        step = "read the probe back"
        got = fs.cat_file(probe)
        if got != data:
            raise OSError(f"read back {len(got)} bytes that differ from the {len(data)} written")
        step = "delete the probe"
        fs.rm_file(probe)
        with contextlib.suppress(Exception):
            fs.invalidate_cache(base)
        if fs.exists(probe):
            raise OSError(f"{probe} still exists after deleting it")
        deleted = True
    except Exception as exc:
        error = exc
    finally:
        left = None
        if written and not deleted:
            with contextlib.suppress(Exception):
                fs.rm_file(probe)
            with contextlib.suppress(Exception):
                left = probe if fs.exists(probe) else None
        for folder in missing:  # deepest first; only removes what is still empty
            with contextlib.suppress(OSError):
                os.rmdir(folder)
    if error is not None:
        detail = f"cannot {step} under {output}: {describe_exception(error)}"
        if left:
            detail += f"; the probe {left} is left behind: delete it by hand"
        return [Check("storage", FAIL, detail, _storage_fix(output, error, local))]
    took = time.monotonic() - started
    note = " (the folder does not exist yet: it can be created)" if missing else ""
    kind = "local disk" if local else f"{fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]}://"
    return [Check("storage", OK, f"{output} ({kind}): wrote, read back and deleted a probe in {took:.2f} s{note}")]
