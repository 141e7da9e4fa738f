"""Sampling: render prompts with any pipeline to one PNG grid (rows = prompts)."""

from __future__ import annotations

import io
import logging
import tempfile
import time
from typing import Optional

import torch
from PIL import Image

from dreambooth import models, storage

log = logging.getLogger(__name__)


def render_grid(
    pipe,
    prompts: list[str],
    *,
    num_images: int = 2,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    resolution: Optional[int] = None,
) -> Image.Image:
    """One row per prompt, ``num_images`` columns; image j of every row uses seed ``seed + j``."""
    from diffusers.utils import make_image_grid

    resolution = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = []
    started = time.monotonic()
    for index, prompt in enumerate(prompts):
        if len(prompts) > 1 and index:
            log.info("sampled %d of %d prompts (%.0f s)", index, len(prompts), time.monotonic() - started)
        generators = [torch.Generator(pipe.device).manual_seed(seed + j) for j in range(num_images)]
        with torch.no_grad():
            images += pipe(
                [prompt] * num_images,
                height=resolution,
                width=resolution,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generators,
            ).images
    return make_image_grid(images, rows=len(prompts), cols=num_images)


def side_by_side(left: Image.Image, right: Image.Image, gap: int = 4) -> Image.Image:
    """Two grids of equal height next to each other, a white gap between them."""
    out = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)), "white")
    out.paste(left, (0, 0))
    out.paste(right, (left.width + gap, 0))
    return out


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def load_any_pipeline(model: str, revision: Optional[str] = None, device: Optional[str] = None):
    """Load a personalized output (local or any fsspec URI), a hub id, or a built-in name."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not storage.is_local(model) and storage.exists(storage.join(model, "model_index.json")):
        local = storage.download_dir(model, tempfile.mkdtemp(prefix="dreambooth-model-"))
        return models.load_pipeline(str(local), device=device)
    return models.load_pipeline(models.resolve_model(model, revision), revision, device=device)


def sample_to_file(model: str, prompts: list[str], output: str, **grid_kwargs) -> str:
    pipe = load_any_pipeline(model)
    grid = render_grid(pipe, prompts, **grid_kwargs)
    storage.write_bytes_atomic(output, png_bytes(grid))
    return output
