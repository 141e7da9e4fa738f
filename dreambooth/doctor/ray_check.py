"""The Ray cluster: joined (never started) in a child process, so an unreachable or silent address is cut
off by a timeout; what it offers (CPUs, GPUs, GPU nodes and their accelerators)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Optional

from dreambooth.doctor.base import FAIL, OK, WARN, Check, describe_exception, one_line

_RAY_MARK = "DOCTOR-RAY-RESULT "

_RAY_PROBE = r'''
import json, sys
mark = sys.argv[2]
try:
    import ray
    # Ray Client (ray://) would forward these to a ray.init on the server: pass none there.
    quiet = {} if sys.argv[1].startswith("ray://") else {"logging_level": "ERROR", "log_to_driver": False}
    ray.init(address=sys.argv[1], **quiet)
    try:
        res = ray.cluster_resources()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        gpu_nodes = [n for n in nodes if n.get("Resources", {}).get("GPU", 0) > 0]
        kinds = sorted({k.split(":", 1)[1] for n in gpu_nodes for k in n.get("Resources", {})
                        if k.startswith("accelerator_type:")})
        out = {"ok": True, "cpus": res.get("CPU", 0), "gpus": res.get("GPU", 0), "nodes": len(nodes),
               "gpu_nodes": len(gpu_nodes), "accelerators": kinds, "version": ray.__version__}
    finally:
        ray.shutdown()
except BaseException as exc:
    out = {"ok": False, "type": type(exc).__name__, "message": str(exc)}
print(mark + json.dumps(out), flush=True)
'''


def _ray_address_file() -> str:
    with contextlib.suppress(Exception):
        from ray._common.utils import get_ray_address_file  # cheap: no cluster is touched

        return get_ray_address_file(None)
    tmp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return os.path.join(tmp, "ray", "ray_current_cluster")


def _local_cluster_address() -> Optional[str]:
    """The GCS address of the last ``ray start`` on this machine, if it left one."""
    path = _ray_address_file()
    try:
        with open(path) as handle:
            return handle.read().strip() or None
    except OSError:
        return None


def _endpoint(address: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a Ray address: host:port (GCS), ray://host:port (client), http(s)://host:port."""
    scheme, rest = address.split("://", 1) if "://" in address else ("", address)
    rest = rest.split("/", 1)[0]
    defaults = {"": 6379, "ray": 10001, "http": 80, "https": 443}
    m = re.match(r"^\[([^\]]+)\](?::(\d+))?$", rest) or re.match(r"^([^:]+)(?::(\d+))?$", rest)
    if not m:
        raise ValueError(f"cannot read host:port from {address!r}")
    return scheme.lower(), m.group(1), int(m.group(2) or defaults.get(scheme.lower(), 6379))


def _tcp_reachable(host: str, port: int, timeout_s: float) -> Optional[str]:
    """None when something listens at host:port, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except socket.gaierror as exc:
        return f"cannot resolve {host} ({exc.strerror or exc})"
    except socket.timeout:
        return f"no answer within {timeout_s:.0f} s"
    except OSError as exc:
        return exc.strerror or describe_exception(exc)


_RAY_AUTH_REFUSED = re.compile(r"Unauthenticated|InvalidAuthToken|authentication token", re.I)


def _ray_auth_fix() -> str:
    fix = ("the cluster uses token authentication: export RAY_AUTH_MODE=token and give this client the cluster's "
           "token in RAY_AUTH_TOKEN (or a file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token)")
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        fix += "; RAY_AUTH_MODE is not set to token here"
    return fix


def _wait_probe(proc: subprocess.Popen, timeout_s: float) -> tuple[Optional[str], str, Optional[str]]:
    """(stdout or None if cut off, stderr, the auth refusal Ray logged if any).

    Ray's client retries a refused token forever (logging each try), so the first such line ends the wait.
    """
    out_lines: list[str] = []
    err_lines: list[str] = []
    refused: list[str] = []

    def pump(stream, sink, watch):
        with contextlib.suppress(Exception):
            for line in stream:
                sink.append(line)
                if watch and not refused and _RAY_AUTH_REFUSED.search(line):
                    # "[2026-... W 123 123] gcs_client.cc:210: Failed to ..." -> "Failed to ..."
                    refused.append(re.sub(r"^\[[^\]]*\]\s*[\w.]+:\d+:\s*", "", line.strip()))

    pumps = [threading.Thread(target=pump, args=(proc.stdout, out_lines, False), daemon=True),
             threading.Thread(target=pump, args=(proc.stderr, err_lines, True), daemon=True)]
    for t in pumps:
        t.start()
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and not refused and time.monotonic() < deadline:
        time.sleep(0.05)
    finished = proc.poll() is not None
    if not finished:
        with contextlib.suppress(Exception):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            proc.wait(timeout=5)
    for t in pumps:
        t.join(timeout=2)
    out = "".join(out_lines)
    if refused:
        return out, "".join(err_lines), refused[0]
    return (out if finished else None), "".join(err_lines), None


RAY_UNREACHABLE_FIX = ("start the cluster or fix the address: the head's GCS address host:6379 (KubeRay: "
                       "<cluster>-head-svc.<namespace>.svc:6379) or ray://host:10001; locally, `dreambooth run` "
                       "starts its own cluster when RAY_ADDRESS is unset")


def check_ray(ray_address: Optional[str] = None, expect_gpu: bool = False, timeout_s: float = 10) -> list[Check]:
    """Join the cluster at ``ray_address`` / RAY_ADDRESS / a running local one (never start one); report resources."""
    source = "--ray-address" if ray_address else "RAY_ADDRESS"
    address = ray_address or os.environ.get("RAY_ADDRESS") or None
    probe_target: Optional[str] = None  # what to TCP-probe before joining
    if not address:
        local = _local_cluster_address()
        if not local:
            return [Check("ray", WARN, "no Ray cluster reachable: RAY_ADDRESS is not set and no local cluster is "
                                       "running", "fine for a local `dreambooth run` (it starts a cluster); to check "
                                       "a cluster, set RAY_ADDRESS or pass --ray-address host:6379")]
        address, source, probe_target = "auto", f"the local cluster ({local})", local
    if address == "local":
        return [Check("ray", WARN, f"{source}=local means: start a new cluster; nothing to join",
                      "unset it (or set the head's address host:6379) to check a running cluster")]
    where = f"{address} (from {source})" if address != "auto" else source
    try:
        scheme, host, port = _endpoint(probe_target or address)
    except ValueError as exc:
        return [Check("ray", FAIL, f"{source}={address!r}: {exc}",
                      "use host:6379 (GCS), ray://host:10001 (Ray Client) or auto")]
    reason = _tcp_reachable(host, port, min(3.0, float(timeout_s)))
    if scheme in ("http", "https"):
        state = "reachable" if reason is None else f"unreachable: {reason}"
        return [Check("ray", WARN, f"{where} is a dashboard (Ray Jobs API) address, {state}; ray.init cannot join it",
                      "that is right for `ray job submit`; to run `dreambooth run` (or this check) from here, "
                      "use the GCS address host:6379 or ray://host:10001")]
    if reason is not None:
        return [Check("ray", WARN, f"no Ray cluster reachable at {where}: {reason}", RAY_UNREACHABLE_FIX)]

    env = dict(os.environ)
    if address == "auto":
        env.pop("RAY_ADDRESS", None)
    else:
        env["RAY_ADDRESS"] = address  # ray.init prefers the environment's address in places
    started = time.monotonic()
    try:
        proc = subprocess.Popen([sys.executable, "-c", _RAY_PROBE, address, _RAY_MARK], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    except Exception as exc:
        return [Check("ray", FAIL, f"cannot start the probe process ({describe_exception(exc)})", "check that Python can run here")]
    out, err, refused = _wait_probe(proc, timeout_s)
    if refused:
        return [Check("ray", FAIL, f"{where} refused to authenticate: {one_line(refused, 240)}", _ray_auth_fix())]
    if out is None:
        return [Check("ray", WARN, f"no Ray cluster reachable at {where}: something listens at {host}:{port} but "
                                   f"joining did not finish within {timeout_s:g} s", RAY_UNREACHABLE_FIX)]
    result = None
    for line in reversed(out.splitlines()):
        if line.startswith(_RAY_MARK):
            with contextlib.suppress(ValueError):
                result = json.loads(line[len(_RAY_MARK):])
            break
    if result is None:
        tail = one_line(err.strip().splitlines()[-1] if err.strip() else f"exit code {proc.returncode}", 300)
        return [Check("ray", FAIL, f"the probe that joins {where} died: {tail}",
                      "check that ray is installed in this environment (pip install -c constraints.txt -e .)")]
    if not result.get("ok"):
        message = one_line(result.get("message", ""), 300)
        kind = result.get("type", "Error")
        lowered = message.lower()
        if "auth" in lowered or "token" in lowered or "unauthenticated" in lowered:
            return [Check("ray", FAIL, f"{where} refused to authenticate: {kind}: {message}", _ray_auth_fix())]
        if "version" in lowered and "mismatch" in lowered:
            return [Check("ray", FAIL, f"{where}: {kind}: {message}",
                          "use the cluster's Ray and Python versions here (the image and this venv must match)")]
        if kind in ("ConnectionError", "TimeoutError", "GetTimeoutError") or "could not find" in lowered:
            return [Check("ray", WARN, f"no Ray cluster reachable at {where}: {kind}: {message}", RAY_UNREACHABLE_FIX)]
        return [Check("ray", FAIL, f"cannot join {where}: {kind}: {message}", RAY_UNREACHABLE_FIX)]
    took = time.monotonic() - started
    gpus, gpu_nodes = result.get("gpus", 0), result.get("gpu_nodes", 0)
    kinds = f" ({', '.join(result['accelerators'])})" if result.get("accelerators") else ""
    detail = (f"joined {where} in {took:.1f} s: Ray {result.get('version')}, {result.get('nodes')} node(s), "
              f"{result.get('cpus', 0):g} CPUs, {gpus:g} GPUs on {gpu_nodes} GPU node(s){kinds}")
    if gpu_nodes == 0:
        detail += "; GPU workers that autoscale from zero appear once work asks for GPUs"
        if expect_gpu:
            return [Check("ray", WARN, detail,
                          "if GPU work never starts, check the GPU worker group (nvidia.com/gpu limits, maxReplicas, "
                          "node pool quota) and the autoscaler's log on the head")]
    mine = result.get("version")
    with contextlib.suppress(Exception):
        import importlib.metadata as md

        here = md.version("ray")
        if mine and here != mine:
            return [Check("ray", WARN, detail + f"; this environment has Ray {here}",
                          "use the cluster's Ray version here (the image and this venv must match)")]
    return [Check("ray", OK, detail)]
