"""SDXL end to end on local Ray with ``tiny-sdxl``: priors from the SDXL pipeline → 2 workers under
ZeRO-3 → export → reload with plain ``StableDiffusionXLPipeline`` and generate; UNet and both text
encoders trained; a second subject of the same class reuses the priors (and freezes the second
encoder with ``train_text_encoder_2: false``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dreambooth import pipeline, storage
from dreambooth.config import build_config
from dreambooth.export import RUN_RECORD

pytestmark = [pytest.mark.ray, pytest.mark.e2e]

FAST = {
    "model": "tiny-sdxl",
    "class_noun": "dog",
    "resolution": 32,
    "num_class_images": 4,
    "prior_batch_size": 2,
    "num_inference_steps": 2,
    "max_train_steps": 2,
    "train_batch_size": 1,
    "learning_rate": 1e-3,
    "workers": 2,
    "zero_stage": 3,
    "checkpointing_steps": 0,
    "num_sample_images": 1,
    "before_after": False,
    "log_every": 1,
}


def _weights(folder, component):
    from safetensors.torch import load_file

    (file,) = Path(folder, component).glob("*.safetensors")
    return load_file(str(file))


def _changed(base_folder, tuned_folder, component) -> float:
    """The share of the component's tensors that differ from the base model's."""
    base, tuned = _weights(base_folder, component), _weights(tuned_folder, component)
    assert base.keys() == tuned.keys()
    return sum(not torch.equal(base[k].to(tuned[k].dtype), tuned[k]) for k in base) / len(base)


def test_sdxl_all_layers_zero3_exports_a_plain_sdxl_pipeline_and_a_second_subject_reuses_priors(
        ray_cluster, dog_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from dreambooth.models import resolve_model

    base = resolve_model("tiny-sdxl")
    out = tmp_path / "run-dog"
    pipeline.execute(pipeline.preflight(build_config(({**FAST, "instance_dir": str(dog_dir), "output": str(out)}, "test"))))
    record = storage.read_json(str(out / RUN_RECORD))
    assert record["priors"]["generated"] == 4 and record["metrics"]["step"] == 2
    assert record["metrics"]["zero_stage"] == 3 and record["metrics"]["loss"] > 0  # 2 ranks: sharded
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    for component in ("unet", "text_encoder", "text_encoder_2"):  # all layers trained
        assert _changed(base, out, component) > 0.5, component

    pipe = StableDiffusionXLPipeline.from_pretrained(str(out), local_files_only=True)
    image = pipe(f"a {record['identifier']} dog", num_inference_steps=2, height=32, width=32).images[0]
    assert image.size == (32, 32)

    other_dir = tmp_path / "dog2"
    shutil.copytree(dog_dir, other_dir)
    (other_dir / "04.jpg").unlink()
    out2 = tmp_path / "run-dog2"
    cfg2 = build_config(({**FAST, "instance_dir": str(other_dir), "output": str(out2), "identifier_seed": 1,
                          "max_train_steps": 1, "train_text_encoder_2": False}, "test"))
    pipeline.execute(pipeline.preflight(cfg2))
    record2 = storage.read_json(str(out2 / RUN_RECORD))
    assert record2["priors"]["generated"] == 0 and record2["priors"]["cache"] == record["priors"]["cache"]
    assert _changed(base, out2, "unet") > 0.5 and _changed(base, out2, "text_encoder") > 0.5
    assert _changed(base, out2, "text_encoder_2") == 0  # frozen by the flag
