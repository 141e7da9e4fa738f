"""Model resolution and the built-in tiny pipeline."""

import json

import pytest

from dreambooth.config import ConfigError
from dreambooth.models import resolve_model


def test_tiny_is_a_standard_diffusers_folder(tiny_model_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_path, local_files_only=True)
    assert len(pipe.tokenizer) == 49408
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert resolve_model("tiny") == tiny_model_path  # built once, then reused


def test_local_folder_and_v_prediction_models_resolve(tiny_model_path, tmp_path):
    import shutil

    from dreambooth.models import load_components

    copy = tmp_path / "sd2-like"
    shutil.copytree(tiny_model_path, copy)
    config = copy / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "v_prediction"}))
    assert resolve_model(str(copy)) == str(copy)
    assert load_components(str(copy)).prediction_type == "v_prediction"


@pytest.mark.parametrize(
    "model,message",
    [
        ("not-a-model", "not a built-in name"),
        ("./missing/folder", "not a built-in name"),
        ("some-org/some-model-that-is-not-cached", "cannot read model_index.json from the hub"),
    ],
)
def test_unknown_models_are_refused_clearly(model, message):
    with pytest.raises(ConfigError, match=message):
        resolve_model(model)


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ConfigError, match="no model_index.json"):
        resolve_model(str(tmp_path))
