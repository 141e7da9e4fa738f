"""The README stays true: its config reference matches the code."""

import re

from conftest import REPO
from dreambooth.config import reference_markdown


def test_readme_config_reference_is_current():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- config-reference.*?-->\n(.*?)\n<!-- /config-reference -->", readme, re.S)
    assert block, "README lost its config-reference block"
    assert block.group(1).strip() == reference_markdown().strip(), (
        "README config reference is stale: run scripts/update-readme-reference.py"
    )


def test_readme_submit_dry_run_runs_as_written(tmp_path, monkeypatch, capsys):
    """The README's `dreambooth submit --dry-run --offline` block, on its own subjects.yaml example."""
    import shlex

    import yaml

    from dreambooth.cli import main

    readme = (REPO / "README.md").read_text()
    manifest = re.search(r"`subjects.yaml`:\n\n```yaml\n(.*?)```", readme, re.S)
    command = re.search(r"<!-- submit-dry-run-example.*?-->\n```sh\n(.*?)```", readme, re.S)
    assert manifest and command, "README lost its subjects.yaml example or its dry-run block"
    (tmp_path / "subjects.yaml").write_text(manifest.group(1))
    monkeypatch.chdir(tmp_path)
    words = shlex.split(command.group(1).replace("\\\n", " "))
    assert words[:2] == ["dreambooth", "submit"]
    assert main(words[1:]) == 0
    out = capsys.readouterr().out
    docs = [d for d in yaml.safe_load_all(out[: out.index("\nconfigmap/")]) if d]
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob"]
    subjects = yaml.safe_load(docs[0]["data"]["manifest.yaml"])["subjects"]
    assert [s["name"] for s in subjects] == ["my-dog", "her-dog", "teapot"]
    assert docs[1]["spec"]["clusterSelector"] == {"ray.io/cluster": "db-dreambooth"}
