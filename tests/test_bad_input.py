"""The bad-input catalogue: every case exits with code 2 and a one-line message that names the field
or file and what to do, within seconds, before any Ray work starts, and without writing or deleting
anything (a listing of the test's folder is compared before and after). The README's
troubleshooting table lists the same cases (checked below).

Classes (``Case.area``): subject images, config, identifiers, storage, manifest, kubernetes names,
helm values, and from the hostile-input review: data loss, writes outside the output, resource
exhaustion, accepted nonsense, tracebacks, leftovers. Hangs and unmeetable resources need a live
server or cluster and have their own tests at the end of this file.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import subprocess
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from conftest import REPO
from dreambooth.cli import main

MAX_SECONDS = 8.0
"""No case may take longer than this before it is refused (a hang detector, not a benchmark)."""


@dataclass
class Case:
    id: str
    area: str
    make: Callable[[Path, Path], list[str]]  # (tmp, dog copy) -> argv of `dreambooth`, or [helm values file]
    message: str
    tool: str = "cli"
    forbid: str = ""  # text the message must not contain (e.g. an object repr instead of a reason)


def run_args(tmp, dog, *extra):
    return ["run", "--model", "tiny", "--instance-dir", str(dog), "--class-noun", "dog", "--output",
            str(tmp / "out" / "dog"), "--resolution", "32", *extra]


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    return path


def manifest(tmp, dog, subjects, raw=None):
    path = write(tmp / "subjects.yaml", raw if raw is not None else yaml.safe_dump({"subjects": subjects}))
    return ["bulk", "--manifest", str(path), "--output", str(tmp / "out"), "--model", "tiny"]


def sub(name, dog, **kw):
    return {"name": name, "instance_dir": str(dog), "class_noun": "dog", **kw}


def submit_args(tmp, dog, *extra):
    path = manifest(tmp, dog, [sub("a", dog)])[2]
    return ["submit", "--manifest", path, "--output", "s3://b/runs", "--cluster", "db", "--model", "tiny", "--image", "db:1",
            "--dry-run", "--offline", *extra]


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def many_images(tmp, dog):
    from PIL import Image

    folder = tmp / "many"
    folder.mkdir()
    for i in range(51):
        Image.new("RGB", (40, 40)).save(folder / f"{i:02d}.png")
    return run_args(tmp, folder)


ALIAS_BOMB = "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")
)
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + ALIAS_BOMB  # ~1 KB that expands to 9**9 nodes


def mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def sparse(path: Path, size: int) -> Path:
    """A file of ``size`` bytes that takes no disk space."""
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


def fake_png(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (nothing is allocated to write it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    return path


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def nest(dog: Path) -> Path:
    """Move the photos one level down, into ``photos/``: the folder itself has none."""
    (dog / "photos").mkdir()
    for photo in list(dog.glob("*.jpg")):
        photo.rename(dog / "photos" / photo.name)
    return dog


def finished_run_around(tmp: Path, dog: Path) -> list[str]:
    """A complete earlier run whose output folder also holds the photos; then `--overwrite` onto it."""
    output = dog.parent
    write(output / "run.json", "{}")
    return ["run", "--model", "tiny", "--instance-dir", str(dog), "--class-noun", "dog", "--output", str(output),
            "--resolution", "32", "--overwrite"]


def unfinished_run(tmp: Path, dog: Path) -> list[str]:
    """An output holding the step-2 checkpoint of a run stopped at the default learning rate; then the
    same command with another one."""
    from dreambooth import pipeline
    from dreambooth.config import build_config
    from dreambooth.training import checkpoint

    argv = run_args(tmp, dog, "--identifier", "sks")
    cfg = pipeline.preflight(build_config(({"model": "tiny", "instance_dir": str(dog), "class_noun": "dog",
                                            "output": argv[argv.index("--output") + 1], "resolution": 32,
                                            "identifier": "sks"}, "test"))).config
    folder = Path(checkpoint.checkpoints_uri(cfg.output)) / checkpoint.step_dir_name(2, "0f0f0f0f")
    write(folder / checkpoint.PROGRESS, json.dumps({"step": 2, "files": [], "settings": checkpoint.trained_settings(cfg)}))
    return [*argv, "--learning-rate", "1e-4"]


def kubeconfig(tmp: Path, cluster_extra: dict) -> Path:
    return write(tmp / "kc", yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443", **cluster_extra}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
    }))


def status_args(kubeconfig_path: Path) -> list[str]:
    return ["status", "--namespace", "ml", "--kubeconfig", str(kubeconfig_path)]


def spec_args(tmp: Path, dog: Path, spec: Path) -> list[str]:
    path = manifest(tmp, dog, [sub("a", dog)])[2]
    return ["submit", "--manifest", path, "--output", "s3://b/runs", "--namespace", "ml", "--model", "tiny",
            "--ray-cluster-spec", str(spec), "--dry-run", "--offline"]


CASES = [
    # subject images
    Case("missing-instance-dir", "subject images", lambda t, d: run_args(t, d / "nope"), "does not exist or is not a folder"),
    Case("empty-instance-dir", "subject images", lambda t, d: run_args(t, (t / "empty").mkdir() or t / "empty"), "is empty"),
    Case("non-image-file", "subject images", lambda t, d: write(d / "notes.txt", "x") and run_args(t, d), "not images: notes.txt"),
    Case("caption-without-identifier", "subject images", lambda t, d: write(d / "01.txt", "a dog on a sofa") and run_args(t, d),
         "01.txt ('a dog on a sofa') does not name the subject: write {identifier} where it is named"),
    Case("caption-unknown-field", "subject images", lambda t, d: write(d / "01.txt", "a {identifier} {breed}") and run_args(t, d),
         "may only use {identifier} and {class_noun}"),
    Case("corrupt-image", "subject images", lambda t, d: write(d / "00.jpg", b"\xff\xd8junk") and run_args(t, d), "00.jpg is corrupt or truncated", forbid="BytesIO"),
    Case("truncated-image", "subject images", lambda t, d: truncate(d / "01.jpg") and run_args(t, d), "01.jpg is corrupt or truncated"),
    Case("too-many-images", "subject images", many_images, "at most 50"),
    Case("image-too-small", "subject images", lambda t, d: run_args(t, d, "--resolution", "256"), "smaller than --resolution 256"),
    Case("background-swap-photos-not-plain", "subject images", lambda t, d: run_args(t, d, "--background-swap", "0.5"),
         "--background-swap repaints a plain backdrop, and 5 photo(s) are not on one"),
    # config files and flags
    Case("config-file-missing", "config", lambda t, d: ["run", "--config", str(t / "nope.yaml")], "does not exist; pass an existing YAML"),
    Case("config-file-bad-yaml", "config", lambda t, d: ["run", "--config", str(write(t / "c.yaml", "a: [1,"))], "is not valid YAML"),
    Case("config-unknown-key", "config", lambda t, d: ["run", "--config", str(write(t / "c.yaml", "learning_rat: 1"))], "did you mean 'learning_rate'"),
    Case("flag-wrong-type", "config", lambda t, d: run_args(t, d, "--workers", "two"), "'workers' (command-line flags) must be an integer"),
    Case("zero-stage-out-of-range", "config", lambda t, d: run_args(t, d, "--zero-stage", "5"), "--zero-stage must be 0, 1, 2 or 3"),
    Case("launcher-unknown", "config", lambda t, d: run_args(t, d, "--launcher", "local"), "--launcher must be one of auto, ray-train, in-process"),
    Case("launcher-in-process-two-workers", "config", lambda t, d: run_args(t, d, "--launcher", "in-process", "--workers", "2"), "--launcher in-process trains one worker, got --workers 2"),
    Case("unknown-precision", "config", lambda t, d: run_args(t, d, "--mixed-precision", "fp8"), "--mixed-precision must be one of"),
    Case("resolution-not-multiple-of-8", "config", lambda t, d: run_args(t, d, "--resolution", "100"), "multiple of 8"),
    Case("learning-rate-out-of-range", "config", lambda t, d: run_args(t, d, "--learning-rate", "5"), "--learning-rate must be in (0, 1)"),
    Case("background-swap-out-of-range", "config", lambda t, d: run_args(t, d, "--background-swap", "1"), "--background-swap must be at least 0 and below 1"),
    Case("offload-without-zero", "config", lambda t, d: run_args(t, d, "--zero-stage", "0", "--offload-optimizer"), "--offload-optimizer needs --zero-stage"),
    Case("offload-params-without-zero3", "config", lambda t, d: run_args(t, d, "--offload-params"), "--offload-params needs --zero-stage 3"),
    Case("optimizer-unknown", "config", lambda t, d: run_args(t, d, "--optimizer", "sgd"), "--optimizer must be one of adamw, adafactor, adamw8bit"),
    Case("offload-optimizer-with-adafactor", "config", lambda t, d: run_args(t, d, "--optimizer", "adafactor", "--offload-optimizer"), "works with --optimizer adamw only"),
    Case("adamw8bit-without-cuda-or-bitsandbytes", "config", lambda t, d: run_args(t, d, "--optimizer", "adamw8bit"), "--optimizer adamw8bit needs CUDA GPUs and bitsandbytes"),
    Case("adamw8bit-with-use-gpu-false", "config", lambda t, d: run_args(t, d, "--optimizer", "adamw8bit", "--use-gpu", "false"), "--optimizer adamw8bit runs on CUDA GPUs only"),
    Case("empty-class-noun", "config", lambda t, d: run_args(t, d, "--class-noun", " "), "--class-noun is empty"),
    Case("odd-class-noun", "config", lambda t, d: run_args(t, d, "--class-noun", "dog!!"), "not a plain noun"),
    Case("model-not-given", "config", lambda t, d: [a for a in run_args(t, d) if a not in ("--model", "tiny")], "--model is required"),
    Case("bulk-model-not-given", "config", lambda t, d: manifest(t, d, [sub("a", d)])[:-2], "subject 'a': --model is required"),
    Case("bulk-launcher-in-process", "config", lambda t, d: manifest(t, d, [sub("a", d)]) + ["--launcher", "in-process"], "subject 'a': --launcher in-process is for `dreambooth run`"),
    Case("unknown-model", "config", lambda t, d: run_args(t, d, "--model", "no-such-model"), "is not a built-in name"),
    Case("model-folder-not-diffusers", "config", lambda t, d: run_args(t, d, "--model", str(t)), "no model_index.json"),
    # identifiers
    Case("identifier-too-many-words", "identifiers", lambda t, d: run_args(t, d, "--identifier", "my old brown dog"), "has 4 words"),
    Case("identifier-used-twice", "identifiers", lambda t, d: manifest(t, d, [sub("a", d, identifier="sks"), sub("b", d, identifier="sks")]), "identifier 'sks' is also used by 'a'"),
    # storage URIs
    Case("unknown-protocol-output", "storage", lambda t, d: run_args(t, d)[:-4] + ["--output", "nosuch://bucket/x", "--resolution", "32"], "unknown storage protocol 'nosuch'"),
    Case("unknown-protocol-instance-dir", "storage", lambda t, d: run_args(t, "nosuch://bucket/dog"), "unknown storage protocol 'nosuch'"),
    Case("output-not-writable", "storage", lambda t, d: run_args(t, d)[:-4] + ["--output", str(write(t / "file", "x") / "dog"), "--resolution", "32"], "cannot write to"),
    # manifest YAML
    Case("manifest-missing", "manifest", lambda t, d: ["bulk", "--manifest", str(t / "nope.yaml"), "--output", str(t / "out")], "--manifest"),
    Case("manifest-bad-yaml", "manifest", lambda t, d: manifest(t, d, None, raw="subjects: [\n"), "is not valid YAML"),
    Case("manifest-no-subjects", "manifest", lambda t, d: manifest(t, d, []), "has no subjects"),
    Case("manifest-duplicate-names", "manifest", lambda t, d: manifest(t, d, [sub("a", d), sub("a", d)]), "is used twice"),
    Case("manifest-unknown-key", "manifest", lambda t, d: manifest(t, d, [sub("a", d, max_steps=3)]), "unknown config key 'max_steps'"),
    # Kubernetes names
    Case("subject-name-not-dns", "kubernetes names", lambda t, d: manifest(t, d, [sub("My Dog", d)]), "'my-dog'"),
    Case("subject-name-too-long", "kubernetes names", lambda t, d: manifest(t, d, [sub("a" * 70, d)]), "characters long"),
    Case("namespace-not-dns", "kubernetes names", lambda t, d: submit_args(t, d, "--namespace", "ML_Team"), "namespace 'ML_Team'"),
    # Helm values (helm lint --strict with values.schema.json)
    Case("helm-typo-key", "helm values", lambda t, d: [str(write(t / "v.yaml", "worker:\n  maxReplica: 3\n"))], "maxReplica", tool="helm"),
    Case("helm-wrong-type", "helm values", lambda t, d: [str(write(t / "v.yaml", "training:\n  workers: two\n"))], "workers", tool="helm"),
    Case("helm-retries-on-shared-cluster", "helm values", lambda t, d: [str(write(t / "v.yaml", "jobs:\n  backoffLimit: 2\n"))], "backoffLimit", tool="helm"),
    # data loss: an output that would hold, or be held by, the user's own files
    Case("output-contains-instance-dir", "data loss", lambda t, d: run_args(t, d)[:-4] + ["--output", str(d.parent), "--resolution", "32"], "contains the subject's photos"),
    Case("output-equals-instance-dir", "data loss", lambda t, d: run_args(t, d)[:-4] + ["--output", str(d), "--resolution", "32"], "contains the subject's photos"),
    Case("output-inside-instance-dir", "data loss", lambda t, d: run_args(t, d)[:-4] + ["--output", str(d / "model"), "--resolution", "32"], "lies inside the photo folder"),
    Case("output-overwrite-parent-of-photos", "data loss", lambda t, d: finished_run_around(t, d), "contains the subject's photos"),
    Case("output-is-filesystem-root", "data loss", lambda t, d: run_args(t, d)[:-4] + ["--output", "/", "--resolution", "32"], "filesystem, home or bucket root"),
    Case("output-is-home", "data loss", lambda t, d: run_args(t, d)[:-4] + ["--output", "~", "--resolution", "32"], "filesystem, home or bucket root"),
    Case("output-is-bucket-root", "data loss", lambda t, d: run_args(t, d)[:-4] + ["--output", "memory://bucket", "--resolution", "32"], "filesystem, home or bucket root"),
    Case("prior-cache-inside-output", "data loss", lambda t, d: run_args(t, d, "--prior-output", str(t / "out" / "dog" / "priors")), "and the prior cache"),
    Case("prior-cache-holds-photos", "data loss", lambda t, d: run_args(t, d)[:-4] + ["--output", str(t / "runs" / "dog"), "--prior-output", str(d), "--resolution", "32"], "contains the subject's photos"),
    Case("bulk-output-is-root", "data loss", lambda t, d: manifest(t, d, [sub("a", d)])[:3] + ["--output", "/", "--model", "tiny"], "filesystem, home or bucket root"),
    Case("bulk-output-holds-photos", "data loss", lambda t, d: manifest(t, d, [sub("dog", d)])[:3] + ["--output", str(d.parent), "--model", "tiny"], "contains the subject's photos"),
    # writes outside the output
    Case("bulk-empty-output", "writes outside the output", lambda t, d: manifest(t, d, [sub("a", d)])[:3] + ["--output", "", "--model", "tiny"], "--output is empty"),
    Case("submit-empty-output", "writes outside the output", lambda t, d: submit_args(t, d, "--namespace", "ml")[:3] + ["--output", "", "--cluster", "db", "--dry-run", "--offline", "--namespace", "ml"], "--output is empty"),
    Case("subject-named-like-prior-cache", "writes outside the output", lambda t, d: manifest(t, d, [sub("priors", d)]), "and the prior cache"),
    Case("subject-name-octal-number", "writes outside the output", lambda t, d: manifest(t, d, None, raw=f"subjects:\n  - {{name: 012, instance_dir: {d}, class_noun: dog}}\n"), 'quote it in the manifest: name: "012"'),
    Case("subject-name-hex-number", "writes outside the output", lambda t, d: manifest(t, d, None, raw=f"subjects:\n  - {{name: 0x1f, instance_dir: {d}, class_noun: dog}}\n"), 'name: "0x1f"'),
    Case("subject-name-boolean", "writes outside the output", lambda t, d: manifest(t, d, None, raw=f"subjects:\n  - {{name: yes, instance_dir: {d}, class_noun: dog}}\n"), "read by YAML as a bool"),
    Case("subject-name-float", "writes outside the output", lambda t, d: manifest(t, d, None, raw=f"subjects:\n  - {{name: 1.50, instance_dir: {d}, class_noun: dog}}\n"), 'name: "1.50"'),
    # resource exhaustion from a few bytes
    Case("config-yaml-alias-bomb", "resource exhaustion", lambda t, d: ["run", "--config", str(write(t / "c.yaml", ALIAS_BOMB + "model: *i\n"))], "expands to more than"),
    Case("manifest-yaml-alias-bomb", "resource exhaustion", lambda t, d: manifest(t, d, None, raw=ALIAS_BOMB + "subjects: *i\n"), "expands to more than"),
    Case("config-recursive-alias", "resource exhaustion", lambda t, d: ["run", "--config", str(write(t / "c.yaml", "a: &a [*a]\n"))], "recursive YAML alias"),
    Case("config-file-too-large", "resource exhaustion", lambda t, d: ["run", "--config", str(write(t / "c.yaml", "# x\n" * 300_000))], "byte limit"),
    Case("manifest-file-too-large", "resource exhaustion", lambda t, d: manifest(t, d, [])[:2] + [str(sparse(t / "huge.yaml", 65 << 20))] + ["--output", str(t / "out")], "byte limit"),
    Case("image-too-many-pixels", "resource exhaustion", lambda t, d: fake_png(d / "02.png", 12_000, 10_000) and run_args(t, d), "120 megapixels"),
    Case("image-decompression-bomb", "resource exhaustion", lambda t, d: fake_png(d / "02.png", 20_000, 20_000) and run_args(t, d), "more pixels than the 100-megapixel limit"),
    Case("image-file-too-large", "resource exhaustion", lambda t, d: sparse(d / "big.jpg", 2 << 30) and run_args(t, d), "more than the 64 MiB"),
    Case("prompt-format-spec", "resource exhaustion", lambda t, d: run_args(t, d, "--sample-prompts", "{identifier:>300000000}"), "no format specs"),
    Case("prompt-conversion", "resource exhaustion", lambda t, d: run_args(t, d, "--sample-prompts", "a {identifier!r} dog"), "no format specs"),
    Case("prompt-attribute-access", "resource exhaustion", lambda t, d: run_args(t, d, "--sample-prompts", "{identifier.__class__}"), "may only use {identifier} and {class_noun}"),
    Case("prompt-too-long", "resource exhaustion", lambda t, d: run_args(t, d, "--sample-prompts", "a " * 600), "at most 1000"),
    Case("too-many-sample-prompts", "resource exhaustion", lambda t, d: run_args(t, d, "--sample-prompts", *["a {class_noun}"] * 100), "at most 64"),
    Case("value-too-long", "resource exhaustion", lambda t, d: run_args(t, d, "--model", "m" * 5000), "at most 4096"),
    Case("sample-prompt-too-long", "resource exhaustion", lambda t, d: ["sample", "--model", "tiny", "--prompt", "x" * 3000, "--output", str(t / "g.png")], "must be 1-1000 characters"),
    Case("integer-flag-huge-text", "resource exhaustion", lambda t, d: run_args(t, d, "--workers", "9" * 5000), "must be an integer"),
    # accepted nonsense
    Case("prior-loss-weight-nan", "accepted nonsense", lambda t, d: run_args(t, d, "--prior-loss-weight", "nan"), "'prior_loss_weight' (command-line flags) must be a finite number"),
    Case("snr-gamma-zero", "accepted nonsense", lambda t, d: run_args(t, d, "--snr-gamma", "0"), "--snr-gamma must be in (0, 1000]"),
    Case("resume-with-other-settings", "accepted nonsense", unfinished_run, "holds the checkpoints of an unfinished run (step 2) trained with other settings: learning_rate 5e-06 there, 0.0001 now"),
    Case("weight-decay-infinite", "accepted nonsense", lambda t, d: run_args(t, d, "--adam-weight-decay", "inf"), "must be a finite number"),
    Case("guidance-nan", "accepted nonsense", lambda t, d: run_args(t, d, "--guidance-scale", "NaN"), "must be a finite number"),
    Case("run-sample-guidance-negative", "accepted nonsense", lambda t, d: run_args(t, d, "--sample-guidance-scale", "-1"), "--sample-guidance-scale must be between 0 and 100, got -1"),
    Case("learning-rate-infinite", "accepted nonsense", lambda t, d: run_args(t, d, "--learning-rate", "inf"), "must be a finite number"),
    Case("weight-decay-out-of-range", "accepted nonsense", lambda t, d: run_args(t, d, "--adam-weight-decay", "5"), "--adam-weight-decay must be between 0 and 1"),
    Case("bulk-max-concurrent-negative", "accepted nonsense", lambda t, d: manifest(t, d, [sub("a", d)]) + ["--max-concurrent", "-1"], "--max-concurrent must be between"),
    Case("bulk-max-retries-negative", "accepted nonsense", lambda t, d: manifest(t, d, [sub("a", d)]) + ["--max-retries", "-3"], "--max-retries must be between"),
    Case("identifier-with-newline", "accepted nonsense", lambda t, d: run_args(t, d, "--identifier", "sks\nrm"), "control character"),
    Case("identifier-punctuation", "accepted nonsense", lambda t, d: run_args(t, d, "--identifier", "sks;"), "is not a word"),
    Case("prior-resolution-huge", "accepted nonsense", lambda t, d: ["prior", "--model", "tiny", "--class-noun", "dog", "--resolution", "100000", "--output", str(t / "out")], "between 8 and 2048"),
    Case("prior-unconditional-share-whole", "accepted nonsense", lambda t, d: ["prior", "--model", "tiny", "--class-noun", "dog", "--unconditional-prior-share", "1", "--output", str(t / "out")], "--unconditional-prior-share must be in"),
    Case("run-resolution-huge", "accepted nonsense", lambda t, d: run_args(t, d, "--resolution", "99992"), "between 8 and 2048"),
    Case("num-class-images-huge", "accepted nonsense", lambda t, d: run_args(t, d, "--num-class-images", "1000000000"), "--num-class-images must be between 0 and 100000"),
    Case("max-train-steps-huge", "accepted nonsense", lambda t, d: run_args(t, d, "--max-train-steps", "1000000000000"), "--max-train-steps must be between"),
    Case("seed-negative", "accepted nonsense", lambda t, d: run_args(t, d, "--seed", "-1"), "--seed must be between 0"),
    Case("workers-huge", "accepted nonsense", lambda t, d: run_args(t, d, "--workers", "100000"), "--workers must be between 1 and 4096"),
    Case("num-sample-images-huge", "accepted nonsense", lambda t, d: run_args(t, d, "--num-sample-images", "1000"), "--num-sample-images must be between 0 and 64"),
    Case("sample-zero-images", "accepted nonsense", lambda t, d: ["sample", "--model", "tiny", "--prompt", "a dog", "--num-images", "0", "--output", str(t / "g.png")], "--num-images must be between 1"),
    Case("sample-zero-steps", "accepted nonsense", lambda t, d: ["sample", "--model", "tiny", "--prompt", "a dog", "--steps", "0", "--output", str(t / "g.png")], "--steps must be between 1"),
    Case("sample-resolution-12", "accepted nonsense", lambda t, d: ["sample", "--model", "tiny", "--prompt", "a dog", "--resolution", "12", "--output", str(t / "g.png")], "multiple of 8"),
    Case("sample-guidance-nan", "accepted nonsense", lambda t, d: ["sample", "--model", "tiny", "--prompt", "a dog", "--guidance-scale", "nan", "--output", str(t / "g.png")], "--guidance-scale must be between"),
    Case("sample-output-is-folder", "accepted nonsense", lambda t, d: ["sample", "--model", "tiny", "--prompt", "a dog", "--output", str(mkdir(t / "grid.png"))], "is a folder"),
    Case("sample-output-not-png", "accepted nonsense", lambda t, d: ["sample", "--model", "tiny", "--prompt", "a dog", "--output", str(t / "grid.jpg")], "must name a .png file"),
    Case("identifier-count-negative", "accepted nonsense", lambda t, d: ["identifier", "--model", "tiny", "--count", "-1"], "--count must be between 1"),
    Case("identifier-count-huge", "accepted nonsense", lambda t, d: ["identifier", "--model", "tiny", "--count", "1000000000"], "--count must be between 1 and 100000"),
    Case("eval-zero-images", "accepted nonsense", lambda t, d: ["eval", "--output", str(t), "--images-per-prompt", "0"], "--images-per-prompt must be between 1"),
    # tracebacks instead of messages
    Case("ftp-instance-dir-unreachable", "tracebacks", lambda t, d: run_args(t, f"ftp://127.0.0.1:{closed_port()}/dog"), "cannot connect to ftp://127.0.0.1"),
    Case("http-output-unreachable", "tracebacks", lambda t, d: run_args(t, d)[:-4] + ["--output", f"http://127.0.0.1:{closed_port()}/runs/dog", "--resolution", "32"], "cannot write to http://127.0.0.1"),
    Case("binary-config", "tracebacks", lambda t, d: ["run", "--config", str(write(t / "c.yaml", b"\x89PNG\r\n\x1a\n\x00\xff\xfe"))], "is not a UTF-8 text file"),
    Case("config-is-a-list", "tracebacks", lambda t, d: ["run", "--config", str(write(t / "c.yaml", "- a\n- b\n"))], "must be a mapping of config keys"),
    Case("config-python-tag", "tracebacks", lambda t, d: ["run", "--config", str(write(t / "c.yaml", "model: !!python/object/apply:os.system ['touch x']\n"))], "is not valid YAML"),
    Case("manifest-binary", "tracebacks", lambda t, d: manifest(t, d, None, raw=b"\x00\x01\x02\xff"), "is not a UTF-8 text file"),
    Case("manifest-python-tag", "tracebacks", lambda t, d: manifest(t, d, None, raw="subjects: !!python/name:os.system\n"), "is not valid YAML"),
    Case("kubeconfig-bad-yaml", "tracebacks", lambda t, d: status_args(write(t / "kc", "clusters: [\n")), "kubeconfig"),
    Case("kubeconfig-python-tag", "tracebacks", lambda t, d: status_args(write(t / "kc", "clusters: !!python/object/apply:os.system ['touch x']\n")), "is not valid YAML"),
    Case("kubeconfig-bad-base64", "tracebacks", lambda t, d: status_args(kubeconfig(t, {"certificate-authority-data": "not*base64!"})), "no usable Kubernetes configuration"),
    Case("kubeconfig-binary", "tracebacks", lambda t, d: status_args(write(t / "kc", b"\xff\xfe\x00binary")), "is not a UTF-8 text file"),
    Case("kubeconfig-no-clusters", "tracebacks", lambda t, d: status_args(write(t / "kc", "apiVersion: v1\nkind: Config\n")), "has no 'clusters'"),
    Case("ray-cluster-spec-missing", "tracebacks", lambda t, d: spec_args(t, d, t / "nope.yaml"), "does not exist"),
    Case("ray-cluster-spec-bad-yaml", "tracebacks", lambda t, d: spec_args(t, d, write(t / "spec.yaml", "headGroupSpec: [\n")), "is not valid YAML"),
    Case("ray-cluster-spec-no-head", "tracebacks", lambda t, d: spec_args(t, d, write(t / "spec.yaml", "workerGroupSpecs: []\n")), "has no headGroupSpec"),
    Case("eval-empty-run-record", "tracebacks", lambda t, d: ["eval", "--output", str(write(t / "run" / "run.json", "").parent)], "run.json is empty"),
    Case("eval-garbage-run-record", "tracebacks", lambda t, d: ["eval", "--output", str(write(t / "run" / "run.json", "{not json").parent)], "is not a run record"),
    Case("eval-wrong-shape-run-record", "tracebacks", lambda t, d: ["eval", "--output", str(write(t / "run" / "run.json", "[1, 2]").parent)], "is not a run record"),
    Case("damaged-run-record-on-rerun", "tracebacks", lambda t, d: write(t / "out" / "dog" / "run.json", "{half a rec") and run_args(t, d), "is damaged"),
    Case("eval-no-run-record", "tracebacks", lambda t, d: ["eval", "--output", str(mkdir(t / "run"))], "has no run.json"),
    # leftovers and unclear messages
    Case("no-parent-folders-left", "leftovers", lambda t, d: run_args(t, d)[:-4] + ["--output", str(t / "a" / "b" / "c" / "dog"), "--prior-output", str(write(t / "f", "x") / "priors"), "--resolution", "32"], "cannot write to"),
    Case("photos-only-in-subfolder", "leftovers", lambda t, d: run_args(t, nest(d)), "its photos are in subfolder(s) photos/ (5)"),
    Case("only-empty-subfolders", "leftovers", lambda t, d: run_args(t, mkdir(mkdir(t / "subj") / "empty").parent), "has no photos at its top level (only subfolders: empty/)"),
    Case("heic-without-plugin", "leftovers", lambda t, d: write(d / "05.heic", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00") and run_args(t, d), "needs the pillow-heif plugin"),
    Case("unrecognized-image-reason", "leftovers", lambda t, d: write(d / "06.png", b"not a png at all") and run_args(t, d), "its data is not in any image format Pillow can read", forbid="BytesIO"),
]


@pytest.fixture(scope="module")
def helm_binary() -> str:
    return subprocess.run([str(REPO / "scripts" / "ensure-helm.sh")], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def no_ray(monkeypatch):
    """Any attempt to start or join Ray fails the case: bad input must be caught before."""
    from dreambooth import cluster

    def refuse():
        raise AssertionError("Ray work started for bad input")

    monkeypatch.setattr(cluster, "connect", refuse)


def listing(root: Path) -> dict[str, int]:
    """Every file and folder under ``root`` with its size (-1 for folders)."""
    return {str(p.relative_to(root)): (-1 if p.is_dir() else p.stat().st_size) for p in sorted(root.rglob("*"))}


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_clearly(case, tmp_path, dog_dir, capsys, no_ray, request, tiny_model_path):
    argv = case.make(tmp_path, dog_dir)
    if case.tool == "helm":  # what `helm install -f` runs: schema validation, then the templates' checks
        helm = request.getfixturevalue("helm_binary")
        proc = subprocess.run([helm, "template", "db", str(REPO / "helm" / "dreambooth"), "-f", argv[0]],
                              capture_output=True, text=True)
        assert proc.returncode != 0
        assert case.message in proc.stdout + proc.stderr, proc.stdout + proc.stderr
        return
    before = listing(tmp_path)
    started = time.monotonic()
    code = main(argv)
    seconds = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    line = error_line(err)
    assert case.message in line, line
    assert len(line) < 1200, f"{len(line)} characters"
    if case.forbid:
        assert case.forbid not in line, line
    assert seconds < MAX_SECONDS, f"refused after {seconds:.1f} s"
    assert listing(tmp_path) == before  # nothing written, nothing deleted


def test_catalogue_is_large_and_listed_in_the_readme():
    assert len(CASES) >= 80
    areas = {c.area for c in CASES}
    assert {"data loss", "writes outside the output", "resource exhaustion", "accepted nonsense",
            "tracebacks", "leftovers"} <= areas
    for area in areas - {"helm values", "identifiers", "kubernetes names"}:
        assert sum(c.area == area for c in CASES) >= 3, area
    readme = (REPO / "README.md").read_text()
    section = re.search(r"## Troubleshooting\n(.*?)(\n## |\Z)", readme, re.S)
    assert section, "README has no Troubleshooting section"
    missing = [c.id for c in CASES if f"`{c.id}`" not in section.group(1)]
    missing += [case_id for case_id, *_ in LIVE_CASES if f"`{case_id}`" not in section.group(1)]
    assert not missing, f"README troubleshooting lacks: {missing}"


# --------------------------------------------------------------------------- hangs: live servers and clusters

LIVE_CASES = [
    # (id, class, message excerpt, what to do) of the cases below, for the README table
    ("api-server-never-answers", "hangs", "did not answer within 1 s",
     "check the API server address in the kubeconfig, or raise `--request-timeout`"),
    ("use-gpu-true-without-gpus", "hangs", "can never start: this Ray cluster has 4 CPU, 0 GPU",
     "pass `--use-gpu false` or run on a cluster with GPU nodes"),
    ("workers-more-than-the-cluster", "hangs", "--workers 8 x (1 CPU, 0 GPU, --use-gpu false) can never start",
     "lower `--workers` or `--cpus-per-worker`, or use a bigger (or autoscaling) cluster"),
    ("cpus-per-worker-more-than-any-node", "hangs", "fits 0 such worker(s)",
     "lower `--cpus-per-worker`: one worker must fit on one node"),
    ("overwrite-keeps-user-files", "data loss", "(not an error) --overwrite removes only what the run wrote",
     "nothing: photos and other files in the output folder survive"),
]


@pytest.fixture
def silent_api_server():
    """An HTTP address that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.1)
    held, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


@pytest.mark.parametrize("command", ["status", "submit"])
def test_api_server_that_never_answers_fails_within_the_timeout(command, silent_api_server, tmp_path, dog_dir, capsys):
    kc = write(tmp_path / "kc", yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": silent_api_server}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
    }))
    argv = status_args(kc) if command == "status" else [
        "submit", "--manifest", manifest(tmp_path, dog_dir, [sub("a", dog_dir)])[2], "--namespace", "ml",
        "--kubeconfig", str(kc), "--cluster", "db", "--output", "s3://b/runs", "--model", "tiny"]
    started = time.monotonic()
    code = main([*argv, "--request-timeout", "1"])
    seconds = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 1, err
    assert "did not answer within 1 s" in error_line(err) and "--request-timeout" in err
    assert seconds < MAX_SECONDS, f"gave up after {seconds:.1f} s"


@pytest.mark.ray
@pytest.mark.parametrize("extra,message", [
    (["--use-gpu", "true"], "can never start: this Ray cluster has 4 CPU, 0 GPU"),
    (["--workers", "8"], "--workers 8 x (1 CPU, 0 GPU, --use-gpu false) can never start"),
    (["--cpus-per-worker", "6"], "fits 0 such worker(s)"),
])
def test_resources_the_cluster_can_never_give_are_refused(extra, message, ray_cluster, tmp_path, dog_dir, capsys):
    """The shared test cluster is fixed-size (4 logical CPUs, no GPUs, no autoscaler)."""
    before = listing(tmp_path)
    started = time.monotonic()
    code = main(run_args(tmp_path, dog_dir, "--use-gpu", "false", *extra))
    seconds = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in error_line(err)
    assert seconds < MAX_SECONDS
    assert listing(tmp_path) == before


# --------------------------------------------------------------------------- scale


def test_ten_thousand_subjects_validate_in_seconds_with_progress(tmp_path, dog_dir, caplog):
    import logging

    from dreambooth import bulk

    subjects = [sub(f"s{i}", dog_dir) for i in range(10_000)]
    path = write(tmp_path / "big.yaml", yaml.safe_dump({"subjects": subjects}))
    caplog.set_level(logging.INFO, logger="dreambooth.bulk")
    started = time.monotonic()
    planned = bulk.plan(bulk.BulkOptions(str(path), str(tmp_path / "out")), {"model": "tiny"})
    seconds = time.monotonic() - started
    print(f"10,000 subjects checked in {seconds:.1f} s")
    assert len(planned) == 10_000
    progress = [r.getMessage() for r in caplog.records if "subjects" in r.getMessage()]
    assert any("checked 5000 of 10000 subjects" in m for m in progress), progress
    assert seconds < 120  # a guard against quadratic work, not a benchmark


def test_more_subjects_than_single_rare_tokens_get_distinct_identifiers(tmp_path, dog_dir, capsys, tiny_model_path):
    """304 single rare tokens pass the rules; 400 subjects go on to pairs (the paper's 1-3 token [V])."""
    subjects = [sub(f"s{i}", "s3://b/photos") for i in range(400)]
    path = write(tmp_path / "many.yaml", yaml.safe_dump({"subjects": subjects}))
    code = main(["submit", "--manifest", str(path), "--namespace", "ml", "--cluster", "db", "--output", "s3://b/runs",
                 "--model", "tiny", "--layout", "per-subject", "--max-retries", "0", "--image", "db:1", "--dry-run", "--offline"])
    out = capsys.readouterr().out
    assert code == 0
    docs = [d for d in yaml.safe_load_all(out[: out.index("\nrayjob.ray.io/")]) if d]
    assert len(docs) == 400
    import shlex

    identifiers = []
    for doc in docs:
        words = shlex.split(doc["spec"]["entrypoint"])
        identifiers.append(words[words.index("--identifier") + 1])
    assert len(set(identifiers)) == 400
    assert sum(" " in i for i in identifiers) >= 400 - 310  # the rest are 2-token sequences


def test_sample_with_many_prompts_shows_progress(tmp_path, caplog, tiny_model_path):
    import logging

    caplog.set_level(logging.INFO, logger="dreambooth.sample")
    prompts = [f"a photo number {i}" for i in range(4)]
    assert main(["sample", "--model", "tiny", "--prompt", *prompts, "--num-images", "1", "--steps", "2",
                 "--resolution", "32", "--output", str(tmp_path / "grid.png")]) == 0
    progress = [r.getMessage() for r in caplog.records if "prompts" in r.getMessage()]
    assert "sampled 3 of 4 prompts" in " ".join(progress), progress
    assert (tmp_path / "grid.png").is_file()


def test_gpus_without_cuda_are_refused_before_any_work(monkeypatch):
    """GPU resources whose nodes have no CUDA (a CPU-only image, a missing driver) fail fast; only
    clusters with fake GPU resources (tests) may opt out."""
    from dreambooth import cluster
    from dreambooth.config import ConfigError

    monkeypatch.setattr(cluster, "gpu_nodes_have_cuda", lambda: False)
    monkeypatch.delenv(cluster.ALLOW_FAKE_GPUS_ENV, raising=False)
    with pytest.raises(ConfigError, match=r"CUDA is not available where GPU work runs.*--use-gpu false"):
        cluster.require_cuda(True)
    cluster.require_cuda(False)  # CPU training asks nothing of CUDA
    monkeypatch.setenv(cluster.ALLOW_FAKE_GPUS_ENV, "1")
    cluster.require_cuda(True)
