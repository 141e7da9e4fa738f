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

Modules: ``base`` (the ``Check`` line), ``machine`` (Python, torch/CUDA, driver, DeepSpeed, JIT toolchain),
``ray_check``, ``storage_check``; this one runs them, each under a time limit, and prints the report.
"""

from __future__ import annotations

import platform
import threading
from typing import Callable, Optional

from dreambooth.doctor.base import FAIL, OK, STATUSES, WARN, Check, describe_exception, one_line
from dreambooth.doctor.machine import (check_deepspeed, check_driver, check_jit_toolchain, check_ld_library_path,
                                       check_python, check_torch)
from dreambooth.doctor.ray_check import check_ray
from dreambooth.doctor.storage_check import check_storage

__all__ = ["FAIL", "OK", "WARN", "Check", "check_deepspeed", "check_driver", "check_jit_toolchain",
           "check_ld_library_path", "check_python", "check_ray", "check_storage", "check_torch", "format_report",
           "main_report", "run_checks"]

GUARD_SLACK_S = 20.0
"""A check may take ``timeout_s`` plus this (cold imports of torch/deepspeed) before it counts as hung."""

HANG_FIXES = {
    "storage": "the storage endpoint did not answer: check network access, the endpoint and credentials "
               "(a .dreambooth-doctor-* probe file may remain under the output)",
    "ray": "the Ray address did not answer: check RAY_ADDRESS / --ray-address and that the head is up",
}


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
        return [Check(name, FAIL, f"the {name} check crashed: {describe_exception(box['error'])}",
                      "an unexpected state of this environment; the error above says where")]
    checks = box.get("checks")
    if not isinstance(checks, list) or not all(isinstance(c, Check) for c in checks):
        return [Check(name, FAIL, f"the {name} check returned {type(checks).__name__}, not Check lines",
                      "a bug in dreambooth/doctor/")]
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
        lines.append(f"  {c.status:<4}  {c.name:<{width}}  {one_line(c.detail, 600)}")
        if c.status != OK and c.fix:
            lines.append(f"  {'':<4}  {'':<{width}}  fix: {one_line(c.fix, 600)}")
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
