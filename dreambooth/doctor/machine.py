"""The machine's own stack: Python, torch and CUDA, the NVIDIA driver and GKE's library path, DeepSpeed and
the compiler and ninja its JIT-built ops need."""

from __future__ import annotations

import contextlib
import io
import os
import platform
import re
import shutil
import subprocess
import sys
import warnings
from typing import Optional

from dreambooth.doctor.base import FAIL, OK, WARN, Check, describe_exception, one_line, version_mismatch

MIN_PYTHON = (3, 10)
"""pyproject's ``requires-python``."""

NVIDIA_LIB64 = "/usr/local/nvidia/lib64"
"""Where GKE's driver installer puts libcuda & co. (mounted into pods that request GPUs)."""

NVIDIA_SMI_FALLBACKS = ("/usr/local/nvidia/bin/nvidia-smi",)
"""nvidia-smi where GKE mounts it, when it is not on PATH."""

CUDA_TORCH_HINT = "make venv TORCH_INDEX=https://download.pytorch.org/whl/cu128 (or an image with a CUDA build of torch)"


def _cuda_available() -> Optional[bool]:
    """torch's answer, or None when torch itself cannot be imported."""
    try:
        import torch
    except Exception:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bool(torch.cuda.is_available())


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
        return [Check("torch", FAIL, f"cannot import torch ({describe_exception(exc)})",
                      "install torch first, then the project: `make venv` (see README: Two commands)")]
    checks: list[Check] = []
    built_cuda = torch.version.cuda
    build = f"built for CUDA {built_cuda}" if built_cuda else (
        f"built for ROCm {torch.version.hip}" if getattr(torch.version, "hip", None) else "CPU-only build")
    mismatch = version_mismatch("torch", torch.__version__)
    if mismatch:
        checks.append(Check("torch", WARN, f"{torch.__version__} ({build}) at {os.path.dirname(torch.__file__)}",
                            f"{mismatch}: reinstall with `make venv` or pin it in the image"))
    else:
        checks.append(Check("torch", OK, f"{torch.__version__} ({build})"))

    bad = FAIL if expect_gpu else WARN
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    reasons = "; ".join(one_line(w.message, 200) for w in caught if "CUDA" in str(w.message))
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
            checks.append(Check("nccl", WARN, f"NCCL unavailable ({describe_exception(exc)})",
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
        return [Check("nvidia driver", bad if not cuda else WARN, f"{smi} failed: {one_line(out, 240)}",
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
        return [Check("deepspeed", FAIL, f"cannot import deepspeed ({describe_exception(exc)})",
                      "install the project's dependencies: pip install -c constraints.txt -e .")]
    checks: list[Check] = []
    accelerator = get_accelerator()
    acc_name = getattr(accelerator, "_name", None) or accelerator.device_name()
    detail = f"{deepspeed.__version__}, accelerator {acc_name}"
    mismatch = version_mismatch("deepspeed", deepspeed.__version__)
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
            builder, error = None, describe_exception(exc)
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
            compatible, why = False, f" ({describe_exception(exc)})"
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
            version = f" ({one_line(out.splitlines()[0], 80)})" if out.strip() else ""
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
