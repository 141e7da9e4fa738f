"""Background swap: subject photos also shown on backdrops they were not taken on.

Photos that share a backdrop teach the identifier the backdrop along with the subject: asked for a
background no photo shows, the fine-tune loses the subject (shapes, photos on 2 backgrounds: shown 0.26
of the time there vs 0.61 on the bare prompt; benchmarks/RESULTS.md, round 19). With
``train.background_swap`` = p, a share p of the subject rows is drawn from copies of the photos whose
plain backdrop is repainted in one of ``BACKGROUND_FILLS``, on the bare instance prompt, so "a [V]
[class]" stops meaning "... on its usual backdrop" (round 20 measures what it does and costs).

Only photos on a plain backdrop can be repainted without a segmentation model: the backdrop is the
colour most of the photo's border shows, and the subject's coverage (alpha) is read from how far each
pixel is from it, so anti-aliased edges blend into the new colour instead of keeping a fringe of the
old one. ``check_swappable`` refuses other photos before any cluster time is spent.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from PIL import Image

RGB = tuple[int, int, int]

BACKGROUND_FILLS: tuple[RGB, ...] = (
    (128, 128, 128), (0, 128, 128), (255, 150, 200), (120, 70, 30), (20, 20, 110), (120, 120, 20),
    (80, 220, 230), (170, 240, 110), (110, 10, 50), (190, 170, 240), (230, 210, 160), (60, 90, 60),
)
"""Grey, teal, pink, brown, navy, olive, cyan, lime, maroon, lavender, beige, dark green: none is within
60 (per channel) of a colour the ``shapes`` model was pretrained on, so its evaluation never asks for a
background a swapped copy showed: what the swap teaches is that the subject comes apart from its
backdrop, not the asked backdrops themselves."""

PLAIN_BORDER_SHARE = 0.9
"""Share of the photo's border pixels that must be within ``PLAIN_TOLERANCE`` of one colour."""

PLAIN_TOLERANCE = 24
"""Largest per-channel difference from the backdrop colour still counted as backdrop (JPEG noise,
gradients of a paper sweep)."""


def _border(pixels: np.ndarray) -> np.ndarray:
    """[4(W+H)-ish, 3] the outermost rows and columns."""
    return np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])


def plain_backdrop(image: Image.Image) -> tuple[Optional[RGB], float]:
    """(the backdrop colour, or None when the border is not plain; the share of the border it covers)."""
    border = _border(np.asarray(image.convert("RGB")).astype(np.int16))
    colours, counts = np.unique(border, axis=0, return_counts=True)
    commonest = colours[counts.argmax()]
    share = float((np.abs(border - commonest).max(-1) <= PLAIN_TOLERANCE).mean())
    return (tuple(int(c) for c in commonest) if share >= PLAIN_BORDER_SHARE else None), share


def subject_alpha(image: Image.Image, backdrop: RGB) -> np.ndarray:
    """float [H, W] in [0, 1]: how much of each pixel is subject rather than backdrop.

    A pixel's distance from the backdrop (largest channel difference) as a share of the distance the
    subject's own pixels mostly have (their 90th percentile): 1 inside the subject, a fraction on its
    anti-aliased edge, 0 on the backdrop."""
    pixels = np.asarray(image.convert("RGB")).astype(np.float32)
    distance = np.abs(pixels - np.asarray(backdrop, np.float32)).max(-1)
    inside = distance[distance > PLAIN_TOLERANCE]
    full = float(np.percentile(inside, 90)) if inside.size else 1.0
    return np.clip(distance / max(full, 1.0), 0.0, 1.0)


def swap_backdrop(image: Image.Image, backdrop: RGB, fill: RGB) -> Image.Image:
    """The photo with its backdrop repainted ``fill`` (edges blended by ``subject_alpha``)."""
    pixels = np.asarray(image.convert("RGB")).astype(np.float32)
    alpha = subject_alpha(image, backdrop)[..., None]
    shift = np.asarray(fill, np.float32) - np.asarray(backdrop, np.float32)
    return Image.fromarray(np.clip(pixels + (1 - alpha) * shift, 0, 255).round().astype(np.uint8))


def swapped_copies(image: Image.Image, fills: tuple[RGB, ...] = BACKGROUND_FILLS) -> list[Image.Image]:
    """One copy of a plain-backdrop photo per fill; ValueError when the backdrop is not plain."""
    backdrop, share = plain_backdrop(image)
    if backdrop is None:
        raise ValueError(f"not a plain backdrop: one colour covers {share:.0%} of the border")
    return [swap_backdrop(image, backdrop, fill) for fill in fills]


def unswappable(images: list[tuple[str, Image.Image]]) -> list[str]:
    """'name (NN % of its border one colour)' for each photo whose backdrop is not plain."""
    found = []
    for name, image in images:
        backdrop, share = plain_backdrop(image)
        if backdrop is None:
            found.append(f"{name} ({share:.0%} of its border one colour)")
    return found
