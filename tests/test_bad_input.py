"""The bad-input catalogue: every case exits non-zero with a message that names the field or file
and what to do, before any Ray work starts, leaving no output behind. The README's
troubleshooting table lists the same cases (checked below)."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from conftest import REPO
from dreambooth.cli import main


@dataclass
class Case:
    id: str
    area: str
    make: Callable[[Path, Path], list[str]]  # (tmp, dog copy) -> argv of `dreambooth`, or [helm values file]
    message: str
    tool: str = "cli"


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
    return ["submit", "--manifest", path, "--output", "s3://b/runs", "--cluster", "db", "--dry-run", "--offline", *extra]


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


CASES = [
    # subject images
    Case("missing-instance-dir", "subject images", lambda t, d: run_args(t, d / "nope"), "does not exist or is not a folder"),
    Case("empty-instance-dir", "subject images", lambda t, d: run_args(t, (t / "empty").mkdir() or t / "empty"), "is empty"),
    Case("non-image-file", "subject images", lambda t, d: write(d / "notes.txt", "x") and run_args(t, d), "not images: notes.txt"),
    Case("corrupt-image", "subject images", lambda t, d: write(d / "00.jpg", b"\xff\xd8junk") and run_args(t, d), "00.jpg is corrupt or truncated"),
    Case("truncated-image", "subject images", lambda t, d: truncate(d / "01.jpg") and run_args(t, d), "01.jpg is corrupt or truncated"),
    Case("too-many-images", "subject images", many_images, "at most 50"),
    Case("image-too-small", "subject images", lambda t, d: run_args(t, d, "--resolution", "256"), "smaller than --resolution 256"),
    # config files and flags
    Case("config-file-missing", "config", lambda t, d: ["run", "--config", str(t / "nope.yaml")], "does not exist; pass an existing YAML"),
    Case("config-file-bad-yaml", "config", lambda t, d: ["run", "--config", str(write(t / "c.yaml", "a: [1,"))], "is not valid YAML"),
    Case("config-unknown-key", "config", lambda t, d: ["run", "--config", str(write(t / "c.yaml", "learning_rat: 1"))], "did you mean 'learning_rate'"),
    Case("flag-wrong-type", "config", lambda t, d: run_args(t, d, "--workers", "two"), "'workers' (command-line flags) must be an integer"),
    Case("zero-stage-out-of-range", "config", lambda t, d: run_args(t, d, "--zero-stage", "5"), "--zero-stage must be 0, 1, 2 or 3"),
    Case("unknown-precision", "config", lambda t, d: run_args(t, d, "--mixed-precision", "fp8"), "--mixed-precision must be one of"),
    Case("resolution-not-multiple-of-8", "config", lambda t, d: run_args(t, d, "--resolution", "100"), "multiple of 8"),
    Case("learning-rate-out-of-range", "config", lambda t, d: run_args(t, d, "--learning-rate", "5"), "--learning-rate must be in (0, 1)"),
    Case("offload-without-zero", "config", lambda t, d: run_args(t, d, "--zero-stage", "0", "--offload-optimizer"), "--offload-optimizer needs --zero-stage"),
    Case("empty-class-noun", "config", lambda t, d: run_args(t, d, "--class-noun", " "), "--class-noun is empty"),
    Case("odd-class-noun", "config", lambda t, d: run_args(t, d, "--class-noun", "dog!!"), "not a plain noun"),
    Case("unknown-model", "config", lambda t, d: run_args(t, d, "--model", "no-such-model"), "is not a built-in name"),
    Case("model-folder-not-diffusers", "config", lambda t, d: run_args(t, d, "--model", str(t)), "no model_index.json"),
    # identifiers
    Case("identifier-with-space", "identifiers", lambda t, d: run_args(t, d, "--identifier", "my dog"), "must be one word"),
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


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_clearly(case, tmp_path, dog_dir, capsys, no_ray, request):
    argv = case.make(tmp_path, dog_dir)
    if case.tool == "helm":  # what `helm install -f` runs: schema validation, then the templates' checks
        helm = request.getfixturevalue("helm_binary")
        proc = subprocess.run([helm, "template", "db", str(REPO / "helm" / "dreambooth"), "-f", argv[0]],
                              capture_output=True, text=True)
        assert proc.returncode != 0
        assert case.message in proc.stdout + proc.stderr, proc.stdout + proc.stderr
        return
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and case.message in err, err
    assert not (tmp_path / "out").exists()  # nothing left behind


def test_catalogue_is_large_and_listed_in_the_readme():
    assert len(CASES) >= 25
    readme = (REPO / "README.md").read_text()
    section = re.search(r"## Troubleshooting\n(.*?)(\n## |\Z)", readme, re.S)
    assert section, "README has no Troubleshooting section"
    missing = [c.id for c in CASES if f"`{c.id}`" not in section.group(1)]
    assert not missing, f"README troubleshooting lacks: {missing}"
