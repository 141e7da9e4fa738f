"""``dreambooth doctor``: a one-screen check of this machine (a pod, or a laptop) before GPU time is spent.

Owns: what "ready to train" means for the environment, checked fast and read at a glance —
Python; torch, CUDA (devices, runtime, driver, NCCL) and the GKE driver path on ``LD_LIBRARY_PATH``;
DeepSpeed (version, accelerator, its CPU Adam / fused Adam ops, the C++ compiler and ninja that a
JIT build needs); the Ray cluster (joined, never started: resources and GPU nodes); and the output
location (a probe file written, read back and deleted, leaving nothing behind).

Each check returns ``Check`` lines (``ok`` / ``warn`` / ``fail``, what was found, and what to fix when
not ok). No check raises: an unexpected exception, or one that hangs, becomes a ``fail`` line naming
it. Heavy modules (torch, deepspeed, ray, fsspec backends) are imported inside the checks only; Ray
is joined in a child process so that an unreachable or silent address is cut off by a timeout.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

OK, WARN, FAIL = "ok", "warn", "fail"
STATUSES = (OK, WARN, FAIL)

MIN_PYTHON = (3, 10)
"""pyproject's ``requires-python``."""

NVIDIA_LIB64 = "/usr/local/nvidia/lib64"
"""Where GKE's driver installer puts libcuda & co. (mounted into pods that request GPUs)."""

NVIDIA_SMI_FALLBACKS = ("/usr/local/nvidia/bin/nvidia-smi",)
"""nvidia-smi where GKE mounts it, when it is not on PATH."""

CUDA_TORCH_HINT = "make venv TORCH_INDEX=https://download.pytorch.org/whl/cu128 (or an image with a CUDA build of torch)"

GUARD_SLACK_S = 20.0
"""A check may take ``timeout_s`` plus this (cold imports of torch/deepspeed) before it counts as hung."""

HANG_FIXES = {
    "storage": "the storage endpoint did not answer: check network access, the endpoint and credentials "
               "(a .dreambooth-doctor-* probe file may remain under the output)",
    "ray": "the Ray address did not answer: check RAY_ADDRESS / --ray-address and that the head is up",
}


@dataclass
class Check:
    """One line of the report."""

    name: str
    status: str  # "ok" | "warn" | "fail"
    detail: str
    fix: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {self.status!r}")


# --------------------------------------------------------------------------- helpers


def _one_line(text: object, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _exc(exc: BaseException) -> str:
    return _one_line(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


def _requirement(dist: str) -> Optional[str]:
    """The version specifier that the installed ``dreambooth`` package asks for ``dist``, if any."""
    try:
        from importlib.metadata import requires

        for req in requires("dreambooth") or []:
            if ";" in req:  # extras ("pytest>=9; extra == 'test'") are not runtime requirements
                continue
            m = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*(\[[^\]]*\])?\s*(.*)$", req)
            if m and m.group(1).lower().replace("_", "-") == dist:
                return m.group(3).strip() or None
    except Exception:
        return None
    return None


def _version_mismatch(dist: str, version: str) -> Optional[str]:
    """``"dreambooth requires X"`` when ``version`` is outside the package's requirement for ``dist``."""
    spec = _requirement(dist)
    if not spec:
        return None
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version

        if Version(version) in SpecifierSet(spec):
            return None
    except Exception:
        return None
    return f"dreambooth requires {dist}{spec}"


def _cuda_available() -> Optional[bool]:
    """torch's answer, or None when torch itself cannot be imported."""
    try:
        import torch
    except Exception:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bool(torch.cuda.is_available())


# --------------------------------------------------------------------------- checks


def check_python() -> list[Check]:
    version = platform.python_version()
    where = sys.executable + (" (venv)" if sys.prefix != sys.base_prefix else "")
    if sys.version_info[:2] < MIN_PYTHON:
        need = ".".join(map(str, MIN_PYTHON))
        return [Check("python", FAIL, f"{version} at {where}", f"use Python >= {need} (pyproject's requires-python)")]
    return [Check("python", OK, f"{version} at {where}")]


def check_torch(expect_gpu: bool = False) -> list[Check]:
    """torch's version and build, the CUDA devices it sees, and NCCL."""
    try:
        import torch
    except Exception as exc:
        return [Check("torch", FAIL, f"cannot import torch ({_exc(exc)})",
                      "install torch first, then the project: `make venv` (see README: Two commands)")]
    checks: list[Check] = []
    built_cuda = torch.version.cuda
    build = f"built for CUDA {built_cuda}" if built_cuda else (
        f"built for ROCm {torch.version.hip}" if getattr(torch.version, "hip", None) else "CPU-only build")
    mismatch = _version_mismatch("torch", torch.__version__)
    if mismatch:
        checks.append(Check("torch", WARN, f"{torch.__version__} ({build}) at {os.path.dirname(torch.__file__)}",
                            f"{mismatch}: reinstall with `make venv` or pin it in the image"))
    else:
        checks.append(Check("torch", OK, f"{torch.__version__} ({build})"))

    bad = FAIL if expect_gpu else WARN
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    reasons = "; ".join(_one_line(w.message, 200) for w in caught if "CUDA" in str(w.message))
    if available:
        count = torch.cuda.device_count()
        groups: dict[str, int] = {}
        for i in range(count):
            props = torch.cuda.get_device_properties(i)
            key = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})"
            groups[key] = groups.get(key, 0) + 1
        devices = ", ".join(f"{n} x {k}" for k, n in groups.items())
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        runtime = f"CUDA runtime {built_cuda}" + (f", cuDNN {cudnn}" if cudnn else "")
        checks.append(Check("cuda", OK, f"{count} device(s): {devices}; {runtime}"))
    else:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hidden = f"; CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
        if not built_cuda:
            detail = f"not available: torch {torch.__version__} is a CPU-only build{hidden}"
            fix = f"for GPU training install a CUDA build of torch: {CUDA_TORCH_HINT}"
        else:
            detail = f"not available: torch is built for CUDA {built_cuda} but sees no device{hidden}"
            if reasons:
                detail += f" ({reasons})"
            fix = ("give the container a GPU (Kubernetes: resources.limits nvidia.com/gpu on a GPU node pool), "
                   "check the driver with nvidia-smi" + (", and unset CUDA_VISIBLE_DEVICES" if hidden else ""))
        if not expect_gpu:
            fix = "fine on a CPU-only node (training runs on CPU); " + fix
        checks.append(Check("cuda", bad, detail, fix))

    if available:
        try:
            nccl = torch.cuda.nccl.version()
            nccl = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
            checks.append(Check("nccl", OK, f"NCCL {nccl}"))
        except Exception as exc:
            checks.append(Check("nccl", WARN, f"NCCL unavailable ({_exc(exc)})",
                                "multi-GPU training needs NCCL: use a CUDA build of torch from the PyTorch index"))
    else:
        checks.append(Check("nccl", OK, "not used without CUDA (CPU training uses gloo)"))
    return checks


def _nvidia_smi() -> Optional[str]:
    found = shutil.which("nvidia-smi")
    if found:
        return found
    return next((p for p in NVIDIA_SMI_FALLBACKS if os.access(p, os.X_OK)), None)


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:2])


def check_driver(expect_gpu: bool = False) -> list[Check]:
    """The NVIDIA driver (nvidia-smi, else what torch reports) and whether it is new enough for torch's CUDA."""
    cuda = _cuda_available()
    torch_cuda = None
    with contextlib.suppress(Exception):
        import torch

        torch_cuda = torch.version.cuda
    bad = FAIL if expect_gpu else WARN
    smi = _nvidia_smi()
    if smi is None:
        if cuda:
            detail = "nvidia-smi not on PATH; torch reaches the driver"
            with contextlib.suppress(Exception):
                import torch

                v = torch._C._cuda_getDriverVersion()  # e.g. 12080 for a driver supporting CUDA 12.8
                detail += f" (supports CUDA {v // 1000}.{v % 1000 // 10})"
            return [Check("nvidia driver", OK, detail)]
        fix = ("GPU nodes need the NVIDIA driver and a pod that requests nvidia.com/gpu (GKE mounts the driver and "
               "nvidia-smi under /usr/local/nvidia)")
        if not expect_gpu:
            fix = "fine on a CPU-only node; " + fix
        return [Check("nvidia driver", bad, "no NVIDIA driver found (nvidia-smi not on PATH)", fix)]
    try:
        proc = subprocess.run([smi], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return [Check("nvidia driver", FAIL, f"{smi} did not answer within 10 s",
                      "the driver is wedged: check `dmesg` on the node (Xid errors) or drain/reboot it")]
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return [Check("nvidia driver", bad if not cuda else WARN, f"{smi} failed: {_one_line(out, 240)}",
                      "the driver is not loaded or not reachable from this container: install it on the node, "
                      "request nvidia.com/gpu in the pod")]
    driver = re.search(r"Driver Version:\s*([\w.]+)", out)
    supports = re.search(r"CUDA Version:\s*([\d.]+)", out)
    detail = f"driver {driver.group(1) if driver else '?'}"
    if supports:
        detail += f", supports CUDA {supports.group(1)}"
    if torch_cuda:
        detail += f"; torch needs CUDA {torch_cuda}"
    if supports and torch_cuda:
        have, need = _version_tuple(supports.group(1)), _version_tuple(torch_cuda)
        if have and need and have[0] < need[0]:
            return [Check("nvidia driver", FAIL, detail + " (driver too old)",
                          f"upgrade the node's driver to one for CUDA {torch_cuda}, or install torch built for "
                          f"CUDA {supports.group(1)}")]
        if have and need and have < need:
            return [Check("nvidia driver", WARN, detail + " (older minor version: works by minor-version "
                          "compatibility, but kernels that need PTX JIT fail)",
                          f"upgrade the driver for CUDA {torch_cuda} or use torch built for CUDA {supports.group(1)}")]
    return [Check("nvidia driver", OK, detail)]


def check_ld_library_path(expect_gpu: bool = False) -> list[Check]:
    """On GKE the driver's libraries live in /usr/local/nvidia/lib64, which must be on LD_LIBRARY_PATH."""
    if not os.path.isdir(NVIDIA_LIB64):
        return [Check("ld_library_path", OK, f"{NVIDIA_LIB64} absent (not a GKE GPU node): nothing to check")]
    entries = [os.path.normpath(p) for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    if os.path.normpath(NVIDIA_LIB64) in entries:
        return [Check("ld_library_path", OK, f"contains {NVIDIA_LIB64}")]
    cuda = _cuda_available()
    status = FAIL if (expect_gpu and not cuda) else WARN
    detail = f"{NVIDIA_LIB64} exists but is not on LD_LIBRARY_PATH"
    if cuda:
        detail += " (CUDA works anyway here)"
    return [Check("ld_library_path", status, detail,
                  f"export LD_LIBRARY_PATH={NVIDIA_LIB64}:$LD_LIBRARY_PATH (in the image or the pod's env) so that "
                  "torch and Ray's workers find libcuda")]


def _jit_cache(op_name: str) -> Optional[str]:
    """The folder holding a JIT-built ``op_name`` from an earlier run on this node, if any."""
    try:
        from dreambooth.training.engine import extension_build_dirs

        for root in extension_build_dirs():
            folder = root / op_name
            if any(folder.glob(f"{op_name}*.so")):
                return str(folder)
    except Exception:
        return None
    return None


def check_deepspeed() -> list[Check]:
    """DeepSpeed's version and accelerator, and whether its CPU Adam / fused Adam are prebuilt or can JIT-build."""
    try:
        # Not under redirect_stdout: DeepSpeed's logger binds to the sys.stdout of its import, for good.
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except Exception as exc:
        return [Check("deepspeed", FAIL, f"cannot import deepspeed ({_exc(exc)})",
                      "install the project's dependencies: pip install -c constraints.txt -e .")]
    checks: list[Check] = []
    accelerator = get_accelerator()
    acc_name = getattr(accelerator, "_name", None) or accelerator.device_name()
    detail = f"{deepspeed.__version__}, accelerator {acc_name}"
    mismatch = _version_mismatch("deepspeed", deepspeed.__version__)
    cuda = _cuda_available()
    if cuda and acc_name != "cuda":
        ds_env = os.environ.get("DS_ACCELERATOR")
        checks.append(Check("deepspeed", WARN, detail + " although CUDA is available" +
                            (f" (DS_ACCELERATOR={ds_env})" if ds_env else ""),
                            "unset DS_ACCELERATOR (or set it to cuda) so that DeepSpeed uses the GPUs"))
    elif mismatch:
        checks.append(Check("deepspeed", WARN, detail, f"{mismatch}: reinstall with pip install -c constraints.txt -e ."))
    else:
        checks.append(Check("deepspeed", OK, detail))

    try:
        from deepspeed.git_version_info import accelerator_name as built_for, installed_ops
    except Exception:
        built_for, installed_ops = None, {}
    for builder_name, label in (("CPUAdamBuilder", "cpu_adam"), ("FusedAdamBuilder", "fused_adam")):
        name = f"ds op {label}"
        used_by = ("--offload-optimizer (DeepSpeed's CPU Adam)" if label == "cpu_adam"
                   else "nothing here (without --offload-optimizer the engine uses torch's AdamW)")
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                builder = accelerator.create_op_builder(builder_name)
        except Exception as exc:
            builder, error = None, _exc(exc)
        else:
            error = f"no {builder_name} for accelerator {acc_name}"
        if builder is None:
            status = WARN if label == "cpu_adam" else OK
            checks.append(Check(name, status, f"unavailable ({error}); used by {used_by}",
                                "train without --offload-optimizer, or use an accelerator DeepSpeed supports"
                                if status == WARN else ""))
            continue
        op = getattr(builder, "name", label)
        if installed_ops.get(op) and built_for == acc_name:
            checks.append(Check(name, OK, f"prebuilt; used by {used_by}"))
            continue
        cached = _jit_cache(op)
        if cached:
            checks.append(Check(name, OK, f"JIT-built earlier ({cached}); used by {used_by}"))
            continue
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                compatible = bool(builder.is_compatible(verbose=False))
            why = ""
        except Exception as exc:
            compatible, why = False, f" ({_exc(exc)})"
        if compatible:
            checks.append(Check(name, OK, f"compatible, not built: JIT-builds on first use (about a minute, needs "
                                          f"c++ and ninja); used by {used_by}"))
        elif label == "cpu_adam":
            checks.append(Check(name, WARN, f"not compatible with this machine{why}: --offload-optimizer cannot run",
                                "train without --offload-optimizer, or use an image with DeepSpeed's ops prebuilt "
                                "(DS_BUILD_CPU_ADAM=1 pip install deepspeed)"))
        else:
            checks.append(Check(name, OK, f"not compatible{why}; used by {used_by}"))
    return checks


def check_jit_toolchain() -> list[Check]:
    """A C++ compiler and ninja: what torch needs to JIT-build DeepSpeed's ops on this node."""
    checks: list[Check] = []
    needs = ("`--offload-optimizer` needs it to JIT-build DeepSpeed's CPU Adam (unless the cpu_adam line says "
             "prebuilt), and CPU-only training builds DeepSpeed's shared-memory comm op")
    cxx_env = os.environ.get("CXX")
    compiler = (shutil.which(cxx_env) if cxx_env else None) or shutil.which("c++") or shutil.which("g++")
    if compiler:
        version = ""
        with contextlib.suppress(Exception):
            out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=5).stdout
            version = f" ({_one_line(out.splitlines()[0], 80)})" if out.strip() else ""
        checks.append(Check("c++ compiler", OK, f"{compiler}{version}"))
    else:
        looked = f"CXX={cxx_env!r}, c++, g++" if cxx_env else "c++, g++"
        checks.append(Check("c++ compiler", WARN, f"none on PATH (looked for {looked}): DeepSpeed cannot JIT-build ops",
                            f"install one in the image (apt-get install g++); {needs}"))
    binary = shutil.which("ninja")
    try:
        import ninja  # noqa: F401  (the pip package ships the binary)

        module = True
    except Exception:
        module = False
    if binary:
        checks.append(Check("ninja", OK, binary + (" (ninja package installed)" if module else "")))
    elif module:
        checks.append(Check("ninja", WARN, "the ninja package is installed but its binary is not on PATH: torch's "
                                           "JIT build runs `ninja` from PATH",
                            f"add {os.path.join(sys.prefix, 'bin')} to PATH (activate the venv); {needs}"))
    else:
        checks.append(Check("ninja", WARN, "not installed (neither `import ninja` nor ninja on PATH)",
                            f"pip install ninja (or apt-get install ninja-build); {needs}"))
    return checks


# ----------------------------------------------------------------------------- Ray

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
        return exc.strerror or _exc(exc)


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
        return [Check("ray", FAIL, f"cannot start the probe process ({_exc(exc)})", "check that Python can run here")]
    out, err, refused = _wait_probe(proc, timeout_s)
    if refused:
        return [Check("ray", FAIL, f"{where} refused to authenticate: {_one_line(refused, 240)}", _ray_auth_fix())]
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
        tail = _one_line(err.strip().splitlines()[-1] if err.strip() else f"exit code {proc.returncode}", 300)
        return [Check("ray", FAIL, f"the probe that joins {where} died: {tail}",
                      "check that ray is installed in this environment (pip install -c constraints.txt -e .)")]
    if not result.get("ok"):
        message = _one_line(result.get("message", ""), 300)
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


# ------------------------------------------------------------------------- storage


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
        return [Check("storage", FAIL, _one_line(detail), fix)]
    except Exception as exc:
        return [Check("storage", FAIL, f"cannot open {output}: {_exc(exc)}",
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
        detail = f"cannot {step} under {output}: {_exc(error)}"
        if left:
            detail += f"; the probe {left} is left behind: delete it by hand"
        return [Check("storage", FAIL, detail, _storage_fix(output, error, local))]
    took = time.monotonic() - started
    note = " (the folder does not exist yet: it can be created)" if missing else ""
    kind = "local disk" if local else f"{fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]}://"
    return [Check("storage", OK, f"{output} ({kind}): wrote, read back and deleted a probe in {took:.2f} s{note}")]


# ------------------------------------------------------------------------ running


def _guarded(name: str, fn: Callable[[], list[Check]], budget_s: float) -> list[Check]:
    """``fn()``'s lines; a raise or a hang becomes one ``fail`` line naming the check."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["checks"] = fn()
        except BaseException as exc:  # noqa: BLE001 - a check must never take the report down
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"doctor-{name}", daemon=True)
    thread.start()
    thread.join(budget_s)
    if thread.is_alive():
        return [Check(name, FAIL, f"the {name} check did not finish within {budget_s:g} s",
                      HANG_FIXES.get(name, "run `dreambooth doctor` again; if it hangs again, this part of the "
                                           "environment is stuck (see the check's name)"))]
    if "error" in box:
        return [Check(name, FAIL, f"the {name} check crashed: {_exc(box['error'])}",
                      "an unexpected state of this environment; the error above says where")]
    checks = box.get("checks")
    if not isinstance(checks, list) or not all(isinstance(c, Check) for c in checks):
        return [Check(name, FAIL, f"the {name} check returned {type(checks).__name__}, not Check lines",
                      "a bug in dreambooth/doctor.py")]
    return checks


def run_checks(output: Optional[str] = None, ray_address: Optional[str] = None, expect_gpu: bool = False,
               timeout_s: float = 10) -> list[Check]:
    """Every check, in report order. Never raises; each check is cut off after ``timeout_s`` + GUARD_SLACK_S."""
    plan: list[tuple[str, Callable[[], list[Check]]]] = [
        ("python", lambda: check_python()),
        ("torch", lambda: check_torch(expect_gpu=expect_gpu)),
        ("nvidia driver", lambda: check_driver(expect_gpu=expect_gpu)),
        ("ld_library_path", lambda: check_ld_library_path(expect_gpu=expect_gpu)),
        ("deepspeed", lambda: check_deepspeed()),
        ("jit toolchain", lambda: check_jit_toolchain()),
        ("ray", lambda: check_ray(ray_address=ray_address, expect_gpu=expect_gpu, timeout_s=timeout_s)),
        ("storage", lambda: check_storage(output=output)),
    ]
    budget = float(timeout_s) + GUARD_SLACK_S
    checks: list[Check] = []
    for name, fn in plan:
        checks.extend(_guarded(name, fn, budget))
    return checks


def format_report(checks: list[Check]) -> str:
    """One aligned line per check (status, name, what was found), its fix indented below, then a summary."""
    width = max([len(c.name) for c in checks] + [4])
    lines = [f"dreambooth doctor on {platform.node() or 'this machine'}"]
    for c in checks:
        lines.append(f"  {c.status:<4}  {c.name:<{width}}  {_one_line(c.detail, 600)}")
        if c.status != OK and c.fix:
            lines.append(f"  {'':<4}  {'':<{width}}  fix: {_one_line(c.fix, 600)}")
    counts = {s: sum(1 for c in checks if c.status == s) for s in STATUSES}
    verdict = ("ready" if not counts[FAIL] and not counts[WARN] else
               "ready, read the warnings" if not counts[FAIL] else "not ready: fix the fail lines first")
    noun = "check" if len(checks) == 1 else "checks"
    lines.append(f"{len(checks)} {noun}: {counts[OK]} ok, {counts[WARN]} warn, {counts[FAIL]} fail — {verdict}")
    return "\n".join(lines)


def main_report(output: Optional[str] = None, ray_address: Optional[str] = None, expect_gpu: bool = False,
                timeout_s: float = 10) -> int:
    """Print the report; 0 when nothing failed, 1 otherwise (warnings do not fail)."""
    checks = run_checks(output=output, ray_address=ray_address, expect_gpu=expect_gpu, timeout_s=timeout_s)
    print(format_report(checks), flush=True)
    return 1 if any(c.status == FAIL for c in checks) else 0
