"""Export precision: `--save-dtype` sets the dtype of the saved UNet and text encoder, the VAE stays as
the base has it, the folder reloads with plain diffusers, and the run reports its bytes."""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dreambooth.config import build_config
from dreambooth.export import export_trained
from dreambooth.models import load_components, load_sampling_scheduler


def _export(cfg, model_path: str) -> dict:
    """Export the base weights as if they were trained (the state dict of a DreamBoothModule)."""
    base = load_components(model_path)
    state = {**{f"unet.{k}": v for k, v in base.unet.state_dict().items()},
             **{f"text_encoder.{k}": v for k, v in base.text_encoder.state_dict().items()}}
    return export_trained(cfg, base, load_sampling_scheduler(model_path), state, "cpu")


def _dtypes(folder: Path, component: str) -> set[str]:
    (file,) = (folder / component).glob("*.safetensors")
    with safe_open(str(file), "pt") as handle:
        return {str(handle.get_slice(k).get_dtype()) for k in handle.keys()}


@pytest.mark.parametrize("save_dtype,expected", [("fp16", "F16"), ("bf16", "BF16"), ("fp32", "F32")])
def test_save_dtype_sets_the_exported_weights_and_reloads(tmp_path, tiny_model_path, save_dtype, expected):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    cfg = build_config(({"model": "tiny", "instance_dir": "x", "class_noun": "dog", "output": str(out),
                         "resolution": 32, "num_sample_images": 0, "save_dtype": save_dtype}, "test"))
    result = _export(cfg, tiny_model_path)
    assert _dtypes(out, "unet") == {expected} and _dtypes(out, "text_encoder") == {expected}
    assert _dtypes(out, "vae") == {"F32"}
    on_disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and p.name != "config.yaml")
    assert result["output_bytes"]["total"] == on_disk
    assert result["output_bytes"]["unet"] < result["output_bytes"]["total"]
    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)  # as a user would, no dtype
    assert {pipe.unet.dtype, pipe.text_encoder.dtype, pipe.vae.dtype} == {torch.float32}
    image = pipe("a dog", num_inference_steps=2, height=32, width=32).images[0]
    assert image.size == (32, 32)
    half = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True, dtype=torch.float16)
    assert {half.unet.dtype, half.text_encoder.dtype, half.vae.dtype} == {torch.float16}


def test_fp16_output_is_about_half_the_fp32_one(tmp_path, tiny_model_path):
    sizes = {}
    for dtype in ("fp32", "fp16"):
        cfg = build_config(({"model": "tiny", "instance_dir": "x", "class_noun": "dog", "output": str(tmp_path / dtype),
                             "resolution": 32, "num_sample_images": 0, "save_dtype": dtype}, "test"))
        sizes[dtype] = _export(cfg, tiny_model_path)["output_bytes"]
    for part in ("unet", "text_encoder"):
        assert 0.45 < sizes["fp16"][part] / sizes["fp32"][part] < 0.55, (part, sizes)
    print({d: s["total"] for d, s in sizes.items()})
