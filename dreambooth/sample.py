"""Sampling: render prompts with any pipeline into labelled PNG grids (rows = prompts, each with its
text; column groups such as base | personalized under their headers; small images enlarged)."""

from __future__ import annotations

import io
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image

from dreambooth import models, storage

log = logging.getLogger(__name__)


MIN_CELL_PX = 128
"""Images smaller than this are enlarged (nearest neighbour, whole multiples) so a 32 px model's
grid can be read; the pixels stay the model's own."""
LABEL_PX = 18
"""Height of a prompt strip above each row and of the column headers."""
GAP_PX = 8
"""White space between column groups (base | personalized)."""


def render_rows(
    pipe,
    prompts: list[str],
    *,
    num_images: int = 2,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    resolution: Optional[int] = None,
) -> list[list[Image.Image]]:
    """``num_images`` images per prompt; image j of every prompt uses seed ``seed + j``."""
    resolution = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    rows = []
    started = time.monotonic()
    for index, prompt in enumerate(prompts):
        if len(prompts) > 1 and index:
            log.info("sampled %d of %d prompts (%.0f s)", index, len(prompts), time.monotonic() - started)
        generators = [torch.Generator(pipe.device).manual_seed(seed + j) for j in range(num_images)]
        with torch.no_grad():
            rows.append(pipe(
                [prompt] * num_images,
                height=resolution,
                width=resolution,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generators,
            ).images)
    return rows


@dataclass(frozen=True)
class GridLayout:
    """Where each image of a labelled grid lies: a header strip (when groups have headers), then per
    row a prompt strip and the row's cells, group after group with a gap between groups."""

    rows: int
    cols: int
    groups: int
    cell: tuple[int, int]
    """Width and height of one (enlarged) image."""
    headers: bool

    def cell_box(self, row: int, col: int, group: int = 0) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of image ``col`` of ``row`` in ``group``."""
        width, height = self.cell
        left = group * (self.cols * width + GAP_PX) + col * width
        top = (LABEL_PX if self.headers else 0) + row * (LABEL_PX + height) + LABEL_PX
        return left, top, left + width, top + height

    @property
    def size(self) -> tuple[int, int]:
        width, height = self.cell
        return (self.groups * self.cols * width + (self.groups - 1) * GAP_PX,
                (LABEL_PX if self.headers else 0) + self.rows * (LABEL_PX + height))


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # a scalable font where Pillow has FreeType
    except (TypeError, OSError):
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
    """``text``, cut with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def labelled_grid(prompts: Sequence[str],
                  groups: Sequence[tuple[str, Sequence[Sequence[Image.Image]]]]) -> tuple[Image.Image, GridLayout]:
    """One row per prompt, its text above it; ``groups`` side by side, each ``(header, rows)``
    (e.g. ``[("base", before), ("personalized", after)]``, or one group with header ``""``)."""
    from PIL import ImageDraw

    first = groups[0][1][0][0]
    scale = max(1, -(-MIN_CELL_PX // min(first.size)))  # ceil: the smallest whole factor that reaches it
    cols = max(len(row) for _, rows in groups for row in rows)
    layout = GridLayout(rows=len(prompts), cols=cols, groups=len(groups),
                        cell=(first.width * scale, first.height * scale),
                        headers=any(header for header, _ in groups))
    canvas = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(LABEL_PX - 5)
    group_width = cols * layout.cell[0]
    for g, (header, rows) in enumerate(groups):
        left = layout.cell_box(0, 0, g)[0]
        if header:
            text = _fit(draw, header, font, group_width)
            draw.text((left + (group_width - draw.textlength(text, font=font)) / 2, 2), text, fill="black", font=font)
        for r, row in enumerate(rows):
            if g == 0:
                top = layout.cell_box(r, 0)[1] - LABEL_PX
                draw.text((2, top + 2), _fit(draw, prompts[r], font, layout.size[0] - 4), fill="black", font=font)
            for c, image in enumerate(row):
                box = layout.cell_box(r, c, g)
                canvas.paste(image.convert("RGB").resize(layout.cell, Image.NEAREST), box[:2])
    return canvas, layout


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


@dataclass(frozen=True)
class SamplerSettings:
    """How to sample a model when the command line does not say, and where each value came from."""

    num_inference_steps: int
    guidance_scale: float
    resolution: Optional[int]
    """None: the model's native size."""
    sources: dict[str, str]
    """``{setting: "flag" | "<output>'s run" | "the <model> model's recipe" | "default"}``."""

    def describe(self) -> str:
        """"25 steps (default), guidance 2 (the shapes model's recipe), 32 px (...)"."""
        shown = {"num_inference_steps": f"{self.num_inference_steps} steps", "guidance_scale":
                 f"guidance {self.guidance_scale:g}", "resolution": f"{self.resolution or 'native'} px"}
        return ", ".join(f"{text} ({self.sources[name]})" for name, text in shown.items())


SAMPLER_DEFAULTS = {"num_inference_steps": 25, "guidance_scale": 7.5, "resolution": None}
"""Without a flag, a run record or a recipe: diffusers' usual 25 steps at guidance 7.5, native size."""


def _as_sampler(settings: dict) -> dict:
    """Flat run or recipe settings as the sampler reads them: the guidance is the sample grids' own
    (``sample_guidance_scale``) where one is set, else the priors'."""
    if settings.get("sample_guidance_scale") is None:
        return settings
    return settings | {"guidance_scale": settings["sample_guidance_scale"]}


def sampler_settings(model: str, revision: Optional[str] = None, **flags) -> SamplerSettings:
    """Sampler settings for ``model``: the flags given (not None), then what a personalized output's
    run used (its prior sampler's steps, its sample grids' guidance and its training resolution), then
    the model's recipe (``dreambooth.yaml``), then ``SAMPLER_DEFAULTS``."""
    from dreambooth.config import ConfigError

    layers: list[tuple[dict, str]] = []
    if not storage.is_local(model) or Path(model).is_dir():
        if storage.exists(storage.join(model, "run.json")):
            from dreambooth.export import read_run_record

            config = read_run_record(model).get("config", {})
            layers.append((_as_sampler({**config.get("prior", {}), **config.get("train", {}), **config.get("export", {})}),
                           f"{model}'s run"))
    if not layers:
        try:
            layers.append((_as_sampler(models.read_recipe(models.resolve_model(model, revision), revision)),
                           f"the {model} model's recipe"))
        except ConfigError:
            pass  # an unknown model: loading it reports that, with its fix
    layers.append(({k: v for k, v in flags.items() if v is not None}, "flag"))
    values, sources = dict(SAMPLER_DEFAULTS), {name: "default" for name in SAMPLER_DEFAULTS}
    for settings, source in reversed(layers):
        for name in SAMPLER_DEFAULTS:
            if sources[name] == "default" and settings.get(name) is not None:
                values[name], sources[name] = settings[name], source
    return SamplerSettings(int(values["num_inference_steps"]), float(values["guidance_scale"]),
                           None if values["resolution"] is None else int(values["resolution"]), sources)


def sample_to_file(model: str, prompts: list[str], output: str, **grid_kwargs) -> str:
    pipe = load_any_pipeline(model)
    grid, _ = labelled_grid(prompts, [("", render_rows(pipe, prompts, **grid_kwargs))])
    storage.write_bytes_atomic(output, png_bytes(grid))
    return output
