"""The `dreambooth` command: exit codes, clear errors before any Ray work, nothing left behind."""

import json

import pytest
from PIL import Image

from dreambooth.cli import main


def _run_args(dog_dir, out, *extra):
    return ["run", "--model", "tiny", "--instance-dir", str(dog_dir), "--class-noun", "dog",
            "--output", str(out), "--resolution", "32", *extra]


@pytest.mark.parametrize(
    "mutate,extra,message",
    [
        (lambda d: (d / "notes.txt").write_text("x"), [], "not images: notes.txt"),
        (lambda d: (d / "00.jpg").write_bytes(b"garbage"), [], "00.jpg is corrupt"),
        (lambda d: None, ["--model", "nope"], "not a built-in name"),
        (lambda d: None, ["--class-noun", "!!"], "not a plain noun"),
        (lambda d: None, ["--resolution", "256"], "smaller than --resolution 256"),
        (lambda d: None, ["--zero-stage", "5"], "--zero-stage must be"),
        (lambda d: None, ["--workers", "two"], "'workers' (command-line flags) must be an integer"),
    ],
)
def test_bad_input_exits_2_with_a_message_and_writes_nothing(dog_dir, tmp_path, capsys, mutate, extra, message):
    mutate(dog_dir)
    out = tmp_path / "runs" / "dog"
    assert main(_run_args(dog_dir, out, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "runs").exists()


def test_unwritable_output_is_refused_before_training(dog_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(_run_args(dog_dir, blocker / "dog")) == 2
    assert "cannot write to" in capsys.readouterr().err


def test_missing_config_file(dog_dir, tmp_path, capsys):
    assert main(["run", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_complete_output_is_not_trained_again(dog_dir, tmp_path, capsys):
    out = tmp_path / "done"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"identifier": "sks"}))
    assert main(_run_args(dog_dir, out)) == 0
    assert "already complete" in capsys.readouterr().out


def test_identifier_command(capsys):
    assert main(["identifier", "--model", "tiny", "--count", "3", "--seed", "4"]) == 0
    first = capsys.readouterr().out.split()
    assert len(first) == 3 and len(set(first)) == 3
    assert main(["identifier", "--model", "tiny", "--count", "3", "--seed", "4"]) == 0
    assert capsys.readouterr().out.split() == first
    assert main(["identifier", "--model", "tiny", "--check", "unique"]) == 0
    assert "common word" in capsys.readouterr().out


def test_sample_command_writes_a_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    code = main(["sample", "--model", "tiny", "--prompt", "a dog", "a cat", "--num-images", "3",
                 "--steps", "2", "--resolution", "32", "--output", str(out)])
    assert code == 0 and "→" in capsys.readouterr().out
    from dreambooth.sample import GridLayout

    layout = GridLayout(rows=2, cols=3, groups=1, cell=(128, 128), headers=False)  # 32 px, enlarged 4x
    assert Image.open(out).size == layout.size
    # --prompt given once per prompt: every one is a row, not only the last.
    assert main(["sample", "--model", "tiny", "--prompt", "a dog", "--prompt", "a cat", "--num-images", "3",
                 "--steps", "2", "--resolution", "32", "--output", str(out)]) == 0
    assert "2 prompt(s)" in capsys.readouterr().out and Image.open(out).size == layout.size


@pytest.mark.ray
def test_prior_command_generates_then_reuses(ray_cluster, tmp_path, capsys):
    args = ["prior", "--model", "tiny", "--class-noun", "cat", "--num-images", "3", "--resolution", "32",
            "--num-inference-steps", "2", "--prior-batch-size", "2", "--output", str(tmp_path / "priors")]
    assert main(args) == 0
    assert "generated 3 of 3 images for 'a cat'" in capsys.readouterr().out
    assert main(args) == 0
    assert "reused 3 images" in capsys.readouterr().out
