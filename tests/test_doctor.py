"""`dreambooth doctor`: each check's verdict on this (CPU-only) machine, the storage probe leaving
nothing behind, Ray reached (or not) without ever starting a cluster, and a check that raises or
hangs becoming a fail line instead of a crash."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dreambooth import doctor
from dreambooth.doctor import FAIL, OK, WARN, Check

REPO = Path(__file__).resolve().parents[1]

needs_cpu_only = pytest.mark.skipif(
    shutil.which("nvidia-smi") is not None or os.path.exists("/dev/nvidia0"), reason="this machine has a GPU")


def by_name(checks: list[Check], name: str) -> Check:
    found = [c for c in checks if c.name == name]
    assert len(found) == 1, [c.name for c in checks]
    return found[0]


def listing(root: Path) -> list[tuple[str, bool, bytes]]:
    """Everything under root, hidden files included: (relative path, is a folder, content)."""
    out = []
    for p in sorted(root.rglob("*")):
        out.append((p.relative_to(root).as_posix(), p.is_dir(), b"" if p.is_dir() else p.read_bytes()))
    return out


@pytest.fixture
def populated(tmp_path: Path) -> Path:
    root = tmp_path / "out"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"keep me")
    (root / ".hidden").write_bytes(b"hidden")
    (root / "sub" / "b.bin").write_bytes(b"\x00\x01")
    return root


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_listener():
    """A local TCP port that accepts connections and never says anything (passes the reachability pre-check)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield f"127.0.0.1:{server.getsockname()[1]}"
    server.close()


# ---------------------------------------------------------------------------------------- imports


def test_importing_the_module_imports_nothing_heavy():
    code = ("import sys, dreambooth.doctor; "
            "print([m for m in ('torch', 'ray', 'deepspeed', 'fsspec', 'diffusers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[]"


def test_check_rejects_unknown_status():
    with pytest.raises(ValueError):
        Check("x", "good", "detail")


# ------------------------------------------------------------------------------------ torch / CUDA


@needs_cpu_only
def test_cuda_is_warn_on_a_cpu_machine_and_fail_when_a_gpu_is_expected():
    plain = by_name(doctor.check_torch(), "cuda")
    assert plain.status == WARN
    assert "not available" in plain.detail
    assert "CPU-only node" in plain.fix  # says it is fine here, and what to do for GPU training
    expected = by_name(doctor.check_torch(expect_gpu=True), "cuda")
    assert expected.status == FAIL and expected.fix
    assert by_name(doctor.check_torch(), "torch").status in (OK, WARN)
    assert by_name(doctor.check_torch(), "nccl").status == OK  # not used without CUDA


@needs_cpu_only
def test_missing_driver_is_warn_and_fail_when_a_gpu_is_expected(monkeypatch):
    monkeypatch.setattr(doctor.machine, "NVIDIA_SMI_FALLBACKS", ())
    assert by_name(doctor.check_driver(), "nvidia driver").status == WARN
    failed = by_name(doctor.check_driver(expect_gpu=True), "nvidia driver")
    assert failed.status == FAIL and "nvidia.com/gpu" in failed.fix


def test_gke_driver_dir_must_be_on_ld_library_path(tmp_path, monkeypatch):
    lib64 = tmp_path / "nvidia" / "lib64"
    monkeypatch.setattr(doctor.machine, "NVIDIA_LIB64", str(lib64))
    assert by_name(doctor.check_ld_library_path(), "ld_library_path").status == OK  # absent: not GKE
    lib64.mkdir(parents=True)
    monkeypatch.setenv("LD_LIBRARY_PATH", "/usr/lib:/opt/x")
    missing = by_name(doctor.check_ld_library_path(), "ld_library_path")
    assert missing.status == WARN and f"LD_LIBRARY_PATH={lib64}" in missing.fix
    monkeypatch.setenv("LD_LIBRARY_PATH", f"/usr/lib:{lib64}/")
    assert by_name(doctor.check_ld_library_path(), "ld_library_path").status == OK


# -------------------------------------------------------------------------------------- DeepSpeed


def test_deepspeed_reports_version_and_its_adam_ops():
    import deepspeed

    checks = doctor.check_deepspeed()
    assert deepspeed.__version__ in by_name(checks, "deepspeed").detail
    cpu_adam = by_name(checks, "ds op cpu_adam")
    assert "--offload-optimizer" in cpu_adam.detail + cpu_adam.fix
    assert any(w in cpu_adam.detail for w in ("prebuilt", "JIT-built", "compatible", "unavailable"))
    by_name(checks, "ds op fused_adam")


def test_missing_compiler_and_ninja_are_warnings_naming_offload(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(doctor.machine.shutil, "which", lambda name, *a, **k: None)
    monkeypatch.setitem(sys.modules, "ninja", None)  # `import ninja` raises ImportError
    checks = doctor.check_jit_toolchain()
    compiler, ninja = by_name(checks, "c++ compiler"), by_name(checks, "ninja")
    assert compiler.status == WARN and "--offload-optimizer" in compiler.fix
    assert ninja.status == WARN and "pip install ninja" in ninja.fix


def test_ninja_package_without_binary_on_path_is_a_warning(monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(doctor.machine.shutil, "which", lambda name, *a, **k: None if name == "ninja" else real_which(name))
    monkeypatch.setitem(sys.modules, "ninja", type(sys)("ninja"))
    ninja = by_name(doctor.check_jit_toolchain(), "ninja")
    assert ninja.status == WARN and "PATH" in ninja.fix


# ------------------------------------------------------------------------------------------ storage


def test_storage_probe_leaves_an_existing_folder_exactly_as_it_was(populated):
    before = listing(populated)
    check = by_name(doctor.check_storage(str(populated)), "storage")
    assert check.status == OK, check
    assert "wrote, read back and deleted" in check.detail
    assert listing(populated) == before


def test_storage_probe_creates_no_folder_for_an_output_that_does_not_exist_yet(populated):
    before = listing(populated)
    target = populated / "runs" / "dog"  # neither folder exists
    check = by_name(doctor.check_storage(str(target)), "storage")
    assert check.status == OK, check
    assert not (populated / "runs").exists()
    assert listing(populated) == before


def test_storage_probe_on_a_file_uri(populated):
    before = listing(populated)
    assert by_name(doctor.check_storage(f"file://{populated}/new"), "storage").status == OK
    assert listing(populated) == before


def test_storage_probe_on_memory_fs_leaves_no_object():
    import fsspec

    fs = fsspec.filesystem("memory")
    before = sorted(fs.store)
    check = by_name(doctor.check_storage("memory://doctor-test/runs/x"), "storage")
    assert check.status == OK, check
    assert sorted(fs.store) == before


def test_storage_refused_delete_fails_and_says_the_probe_is_left(monkeypatch):
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    def refuse(self, path):
        raise PermissionError(f"AccessDenied: DeleteObject on {path}")

    monkeypatch.setattr(MemoryFileSystem, "rm_file", refuse)
    check = by_name(doctor.check_storage("memory://doctor-refused/runs"), "storage")
    assert check.status == FAIL
    assert "cannot delete the probe under memory://doctor-refused/runs" in check.detail
    assert "PermissionError" in check.detail and "left behind" in check.detail
    assert "delete access" in check.fix
    monkeypatch.undo()
    fs = fsspec.filesystem("memory")
    for key in [k for k in fs.store if "doctor-refused" in k]:
        fs.rm_file(key)


def test_storage_fails_under_a_regular_file_and_names_the_output(populated):
    before = listing(populated)
    output = str(populated / "a.txt" / "runs")
    check = by_name(doctor.check_storage(output), "storage")
    assert check.status == FAIL
    assert output in check.detail
    assert "NotADirectoryError" in check.detail or "FileExistsError" in check.detail
    assert "regular file" in check.fix
    assert listing(populated) == before  # a.txt untouched, nothing created


def test_storage_fails_when_the_output_itself_is_a_file(populated):
    check = by_name(doctor.check_storage(str(populated / "a.txt")), "storage")
    assert check.status == FAIL and "regular file" in check.fix
    assert (populated / "a.txt").read_bytes() == b"keep me"


def test_unknown_protocol_fails_with_the_fix():
    check = by_name(doctor.check_storage("nosuchproto://bucket/runs"), "storage")
    assert check.status == FAIL
    assert "nosuchproto://bucket/runs" in check.detail and "nosuchproto" in check.detail
    assert "s3://" in check.fix


def test_no_output_is_not_probed():
    check = by_name(doctor.check_storage(None), "storage")
    assert check.status == OK and "--output" in check.detail


# ---------------------------------------------------------------------------------------------- Ray


def ray_state() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def test_no_ray_reachable_at_a_closed_port_is_a_quick_warning(monkeypatch):
    port = closed_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    was = ray_state()
    start = time.monotonic()
    check = by_name(doctor.check_ray(timeout_s=2), "ray")
    assert time.monotonic() - start < 5
    assert check.status == WARN
    assert "no Ray cluster reachable" in check.detail and str(port) in check.detail and "RAY_ADDRESS" in check.detail
    assert "6379" in check.fix
    assert ray_state() == was  # nothing joined (or left) in this process


def test_ray_address_argument_wins_over_the_environment(monkeypatch):
    env_port, arg_port = closed_port(), closed_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{env_port}")
    check = by_name(doctor.check_ray(ray_address=f"127.0.0.1:{arg_port}", timeout_s=2), "ray")
    assert check.status == WARN and f":{arg_port}" in check.detail and "--ray-address" in check.detail


def test_no_address_and_no_local_cluster(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(doctor.ray_check, "_ray_address_file", lambda: str(tmp_path / "ray_current_cluster"))
    check = by_name(doctor.check_ray(timeout_s=2), "ray")
    assert check.status == WARN and "no Ray cluster reachable" in check.detail


def test_a_stale_local_cluster_file_is_unreachable_not_a_hang(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address_file = tmp_path / "ray_current_cluster"
    address_file.write_text(f"127.0.0.1:{closed_port()}")
    monkeypatch.setattr(doctor.ray_check, "_ray_address_file", lambda: str(address_file))
    check = by_name(doctor.check_ray(timeout_s=2), "ray")
    assert check.status == WARN and "no Ray cluster reachable" in check.detail and "local cluster" in check.detail


def test_dashboard_address_is_explained(monkeypatch):
    check = by_name(doctor.check_ray(ray_address=f"http://127.0.0.1:{closed_port()}", timeout_s=2), "ray")
    assert check.status == WARN and "dashboard" in check.detail and "6379" in check.fix


def test_a_silent_address_is_cut_off_by_the_timeout_and_the_probe_killed(monkeypatch, tmp_path, silent_listener):
    pid_file = tmp_path / "pid"
    # Stands in for a ray.init that never returns (what Ray does against a port that does not answer).
    monkeypatch.setattr(doctor.ray_check, "_RAY_PROBE", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
                                              "time.sleep(120)")
    start = time.monotonic()
    check = by_name(doctor.check_ray(ray_address=silent_listener, timeout_s=2), "ray")
    assert 1.5 < time.monotonic() - start < 8
    assert check.status == WARN and "did not finish within 2 s" in check.detail
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_refused_token_fails_at_once_with_the_auth_fix(monkeypatch, silent_listener):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    line = ("[2026-12-02 00:45:18,182 W 1 1] gcs_client.cc:210: Failed to get cluster ID from GCS server: "
            "Unauthenticated: RPC error: InvalidAuthToken: Authentication token is missing or incorrect")
    monkeypatch.setattr(doctor.ray_check, "_RAY_PROBE", f"import sys, time; print({line!r}, file=sys.stderr, flush=True); "
                                              "time.sleep(120)")
    start = time.monotonic()
    check = by_name(doctor.check_ray(ray_address=silent_listener, timeout_s=20), "ray")
    assert time.monotonic() - start < 8  # not the 20 s timeout: Ray would retry forever
    assert check.status == FAIL
    assert check.detail.endswith("Authentication token is missing or incorrect")
    assert "gcs_client.cc" not in check.detail
    assert "RAY_AUTH_MODE=token" in check.fix and "RAY_AUTH_TOKEN" in check.fix


def fake_probe(result: dict) -> str:
    return f"import sys; print(sys.argv[2] + {json.dumps(result)!r})"


def test_joined_cluster_resources_and_gpu_nodes(monkeypatch, silent_listener):
    import importlib.metadata as md

    result = {"ok": True, "cpus": 24.0, "gpus": 8.0, "nodes": 3, "gpu_nodes": 2, "accelerators": ["H100"],
              "version": md.version("ray")}
    monkeypatch.setattr(doctor.ray_check, "_RAY_PROBE", fake_probe(result))
    check = by_name(doctor.check_ray(ray_address=silent_listener, expect_gpu=True, timeout_s=10), "ray")
    assert check.status == OK, check
    for text in ("3 node(s)", "24 CPUs", "8 GPUs on 2 GPU node(s)", "H100"):
        assert text in check.detail

    result.update(gpus=0.0, gpu_nodes=0, accelerators=[])
    monkeypatch.setattr(doctor.ray_check, "_RAY_PROBE", fake_probe(result))
    assert by_name(doctor.check_ray(ray_address=silent_listener, timeout_s=10), "ray").status == OK
    no_gpu = by_name(doctor.check_ray(ray_address=silent_listener, expect_gpu=True, timeout_s=10), "ray")
    assert no_gpu.status == WARN and "autoscale" in no_gpu.detail


def test_join_errors_are_reported(monkeypatch, silent_listener):
    monkeypatch.setattr(doctor.ray_check, "_RAY_PROBE", fake_probe(
        {"ok": False, "type": "RuntimeError", "message": "Version mismatch: the cluster runs Ray 2.59"}))
    check = by_name(doctor.check_ray(ray_address=silent_listener, timeout_s=10), "ray")
    assert check.status == FAIL and "Version mismatch" in check.detail and "version" in check.fix
    monkeypatch.setattr(doctor.ray_check, "_RAY_PROBE", "import sys; sys.exit(3)")
    died = by_name(doctor.check_ray(ray_address=silent_listener, timeout_s=10), "ray")
    assert died.status == FAIL and "exit code 3" in died.detail


# ------------------------------------------------------------------------------ run / report / exit


def stub_all_checks(monkeypatch, **overrides):
    """Every check replaced by a fast ok line (named as run_checks names it), except ``overrides``."""
    for fn, name in (("check_python", "python"), ("check_torch", "torch"), ("check_driver", "nvidia driver"),
                     ("check_ld_library_path", "ld_library_path"), ("check_deepspeed", "deepspeed"),
                     ("check_jit_toolchain", "jit toolchain"), ("check_ray", "ray"), ("check_storage", "storage")):
        monkeypatch.setattr(doctor, fn, overrides.get(fn, lambda *a, _n=name, **k: [Check(_n, OK, "fine")]))


def test_an_exception_inside_a_check_becomes_a_fail_line(monkeypatch, populated):
    def boom():
        raise RuntimeError("deepspeed exploded")

    monkeypatch.setattr(doctor, "check_deepspeed", boom)
    checks = doctor.run_checks(output=str(populated), ray_address=f"127.0.0.1:{closed_port()}", timeout_s=2)
    crashed = by_name(checks, "deepspeed")
    assert crashed.status == FAIL and "RuntimeError: deepspeed exploded" in crashed.detail and crashed.fix
    names = [c.name for c in checks]
    for name in ("python", "torch", "cuda", "nvidia driver", "c++ compiler", "ninja", "ray", "storage"):
        assert name in names  # the other checks still ran
    assert by_name(checks, "storage").status == OK


def test_a_hanging_check_becomes_a_fail_line(monkeypatch):
    stub_all_checks(monkeypatch, check_storage=lambda *a, **k: time.sleep(30))
    monkeypatch.setattr(doctor, "GUARD_SLACK_S", 0.0)
    start = time.monotonic()
    checks = doctor.run_checks(output="/nowhere", timeout_s=0.5)
    assert time.monotonic() - start < 5
    hung = by_name(checks, "storage")
    assert hung.status == FAIL and "did not finish" in hung.detail and hung.fix
    assert by_name(checks, "python").status == OK


def test_a_check_returning_garbage_becomes_a_fail_line(monkeypatch):
    stub_all_checks(monkeypatch, check_ray=lambda *a, **k: "fine")
    assert by_name(doctor.run_checks(), "ray").status == FAIL


def test_run_checks_passes_its_arguments_on(monkeypatch):
    seen = {}

    def ray(ray_address=None, expect_gpu=False, timeout_s=10):
        seen.update(ray_address=ray_address, expect_gpu=expect_gpu, timeout_s=timeout_s)
        return [Check("ray", OK, "fine")]

    def storage(output=None):
        seen["output"] = output
        return [Check("storage", OK, "fine")]

    stub_all_checks(monkeypatch, check_ray=ray, check_storage=storage)
    doctor.run_checks(output="s3://b/x", ray_address="head:6379", expect_gpu=True, timeout_s=3)
    assert seen == {"ray_address": "head:6379", "expect_gpu": True, "timeout_s": 3, "output": "s3://b/x"}


def test_format_report_shows_every_check_aligned_with_fixes_under_non_ok_lines():
    checks = [Check("python", OK, "3.11", fix="never shown"), Check("cuda", WARN, "not available", "install CUDA"),
              Check("storage", FAIL, "cannot write", "pick another --output")]
    report = doctor.format_report(checks).splitlines()
    body = report[1:-1]
    assert report[-1].startswith("3 checks: 1 ok, 1 warn, 1 fail")
    assert "never shown" not in "\n".join(report)
    for c in checks:
        line = next(x for x in body if f" {c.name} " in x)
        assert line.split()[0] == c.status
    # the detail column starts at the same place on every line, fixes included
    starts = {x.index(d) for x, d in zip([body[0], body[1], body[3]], ["3.11", "not available", "cannot write"])}
    fix_starts = {x.index("fix:") for x in body if "fix:" in x}
    assert len(starts) == 1 and fix_starts == starts
    assert body[2].strip() == "fix: install CUDA" and body[4].strip() == "fix: pick another --output"


def test_format_report_summary_when_all_ok():
    assert doctor.format_report([Check("python", OK, "3.11")]).splitlines()[-1].startswith(
        "1 check: 1 ok, 0 warn, 0 fail — ready")


def test_main_report_exit_codes(monkeypatch, capsys):
    stub_all_checks(monkeypatch, check_ray=lambda *a, **k: [Check("ray", WARN, "none", "start one")])
    assert doctor.main_report() == 0  # warnings do not fail
    assert "warn  ray" in capsys.readouterr().out
    stub_all_checks(monkeypatch, check_storage=lambda *a, **k: [Check("storage", FAIL, "cannot write", "fix it")])
    assert doctor.main_report(output="/x") == 1
    out = capsys.readouterr().out
    assert "fail  storage" in out and "fix: fix it" in out and "1 fail" in out


def test_main_report_for_real_on_this_machine(populated, monkeypatch, capsys):
    before = listing(populated)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{closed_port()}")
    code = doctor.main_report(output=str(populated))
    out = capsys.readouterr().out
    summary = out.strip().splitlines()[-1]
    fails = int(summary.split(" warn, ")[1].split(" fail")[0])
    assert code == (1 if fails else 0)
    for name in ("python", "torch", "cuda", "nccl", "nvidia driver", "ld_library_path", "deepspeed",
                 "ds op cpu_adam", "ds op fused_adam", "c++ compiler", "ninja", "ray", "storage"):
        assert f" {name} " in out
    assert any(line.split()[:2] == ["ok", "storage"] for line in out.splitlines())
    assert listing(populated) == before
