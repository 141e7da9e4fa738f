"""Shared by the benchmark scripts: the machine/version header and appending to RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
PACKAGES = ("torch", "ray", "deepspeed", "diffusers", "transformers")


def environment() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in PACKAGES)
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}; {versions}"


def append_results(title: str, table: str, env: str, command: str) -> None:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with RESULTS.open("a") as handle:
        handle.write(f"\n## {title} — {stamp}\n\nMachine: {env}\n\nCommand: `{command}`\n\n{table}\n")
