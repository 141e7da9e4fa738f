"""The README's Ray Jobs example, run exactly as written on this machine (fresh HOME: new token)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = [pytest.mark.exclusive_ray]


def _readme_block() -> str:
    readme = (REPO / "README.md").read_text()
    match = re.search(r"<!-- ray-job-example.*?-->\n```sh\n(.*?)```", readme, re.S)
    assert match, "README lost its ray-job-example block"
    return match.group(1)


def test_readme_ray_job_submit_example(exclusive_ray, tmp_path):
    script = _readme_block()
    output = Path(re.search(r"--output (\S+)", script).group(1))
    shutil.rmtree(output.parent, ignore_errors=True)
    home = tmp_path / "home"
    home.mkdir()
    from dreambooth.training.engine import extension_build_dirs

    # A fresh user (no Ray token yet), who keeps the session's JIT-built DeepSpeed op.
    env = {**os.environ, "HOME": str(home), "TORCH_EXTENSIONS_DIR": str(extension_build_dirs()[-1])}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "succeeded" in log and "Done:" in log
    assert (output / "run.json").is_file() and (output / "model_index.json").is_file()
    assert (home / ".ray" / "auth_token").is_file()
    shutil.rmtree(output.parent, ignore_errors=True)
