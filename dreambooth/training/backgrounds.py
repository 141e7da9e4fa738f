"""Background swap: subject photos also shown on backdrops they were not taken on.

Photos that share a backdrop teach the identifier the backdrop along with the subject: asked for a
background no photo shows, the fine-tune loses the subject (shapes, photos on 2 backgrounds: shown 0.26
of the time there vs 0.61 on the bare prompt; benchmarks/RESULTS.md, round 19). With
``train.background_swap`` = p, a share p of the subject rows is drawn from copies of the photos whose
plain backdrop is repainted in one of ``BACKGROUND_FILLS``, on the bare instance prompt, so "a [V]
[class]" stops meaning "... on its usual backdrop" (round 20 measures what it does and costs).

Only photos on a plain backdrop can be repainted without a segmentation model. The backdrop colour is
the one most of the photo's border shows; the backdrop is the region of pixels near that colour that
reaches the border (so a subject's own patches of that colour stay the subject); pixels of the subject
are kept exactly, and only its one-pixel rim, anti-aliased against the old backdrop, is blended into the
new one by how much of it is backdrop (``subject_alpha``).
``subjects.check_backdrops_swappable`` refuses other photos before any cluster time is spent.
"""

from __future__ import annotations

from dataclasses import dataclass
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
background a swapped copy showed: what the swap teaches there is that the subject comes apart from its
backdrop, not the asked backdrops themselves."""

MIN_FILL_DISTANCE = 60
"""A fill this close (largest channel difference) to a photo's own backdrop is skipped for it: it would
barely change the photo."""

PLAIN_BORDER_SHARE = 0.9
"""Share of the photo's border pixels that must be within ``PLAIN_TOLERANCE`` of one colour."""

PLAIN_TOLERANCE = 24
"""Largest per-channel difference from the backdrop colour still counted as backdrop (JPEG noise,
gradients of a paper sweep)."""

_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def plain_backdrop(image: Image.Image) -> tuple[Optional[RGB], float]:
    """(the backdrop colour, or None when the border is not plain; the share of the border it covers)."""
    rgb = image.convert("RGB")
    width, height = rgb.size
    strips = [rgb.crop(box) for box in ((0, 0, width, 1), (0, height - 1, width, height),
                                        (0, 0, 1, height), (width - 1, 0, width, height))]
    border = np.concatenate([np.asarray(s, np.int16).reshape(-1, 3) for s in strips])
    colours, counts = np.unique(border, axis=0, return_counts=True)
    commonest = colours[counts.argmax()]
    share = float((np.abs(border - commonest).max(-1) <= PLAIN_TOLERANCE).mean())
    return (tuple(int(c) for c in commonest) if share >= PLAIN_BORDER_SHARE else None), share


def _shifted(array: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    """``array`` moved by (dy, dx): out[y, x] = array[y - dy, x - dx], ``fill`` where that is outside."""
    out = np.full_like(array, fill)
    height, width = array.shape[:2]
    out[max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
        array[max(-dy, 0):height + min(-dy, 0), max(-dx, 0):width + min(-dx, 0)]
    return out


def _reaching_border(near: np.ndarray) -> np.ndarray:
    """The pixels of ``near`` (bool [H, W]) connected (8-neighbourhood) to the image border through ``near``."""
    reached = np.zeros_like(near)
    reached[[0, -1], :], reached[:, [0, -1]] = near[[0, -1], :], near[:, [0, -1]]
    while True:
        grown = reached.copy()
        for dy, dx in _NEIGHBOURS:
            grown |= _shifted(reached, dy, dx, False)
        grown &= near
        if np.array_equal(grown, reached):
            return reached
        reached = grown


def subject_alpha(image: Image.Image, backdrop: RGB) -> np.ndarray:
    """float32 [H, W] in [0, 1]: how much of each pixel is subject rather than backdrop.

    0 on the backdrop (pixels near its colour that reach the border), 1 on the subject, and on the
    subject's one-pixel rim the share a of the mix a × subject + (1 − a) × backdrop that explains the pixel
    best, the subject colour taken from each subject pixel beside it in turn: an anti-aliased edge pixel
    half subject, half backdrop is 0.5, a rim pixel of the subject's own colour 1."""
    pixels = np.asarray(image.convert("RGB")).astype(np.float32)
    from_backdrop = pixels - np.asarray(backdrop, np.float32)
    outside = _reaching_border(np.abs(from_backdrop).max(-1) <= PLAIN_TOLERANCE)
    rim = np.zeros_like(outside)
    for dy, dx in _NEIGHBOURS:
        rim |= _shifted(outside, dy, dx, False)
    rim &= ~outside
    inside = ~outside & ~rim
    best_share = np.ones(outside.shape, np.float32)  # a thin line with no inside pixel beside it stays
    best_residual = np.full(outside.shape, np.inf, np.float32)
    for dy, dx in _NEIGHBOURS:
        colour = _shifted(from_backdrop, dy, dx, 0.0)  # a neighbour's colour, as an offset from the backdrop
        share = (from_backdrop * colour).sum(-1) / np.maximum((colour * colour).sum(-1), 1.0)
        residual = ((from_backdrop - share[..., None] * colour) ** 2).sum(-1)
        better = _shifted(inside, dy, dx, False) & (residual < best_residual)
        best_share, best_residual = np.where(better, share, best_share), np.where(better, residual, best_residual)
    alpha = inside.astype(np.float32)
    alpha[rim] = np.clip(best_share[rim], 0, 1)
    return alpha


def swap_backdrop(image: Image.Image, backdrop: RGB, fill: RGB, alpha: Optional[np.ndarray] = None) -> Image.Image:
    """The photo with its backdrop repainted ``fill`` (``alpha``: ``subject_alpha``, computed when not given)."""
    pixels = np.asarray(image.convert("RGB")).astype(np.float32)
    alpha = subject_alpha(image, backdrop) if alpha is None else alpha
    shift = np.asarray(fill, np.float32) - np.asarray(backdrop, np.float32)
    return Image.fromarray(np.clip(pixels + (1 - alpha[..., None]) * shift, 0, 255).round().astype(np.uint8))


@dataclass
class Repaintable:
    """One photo ready to be repainted: its backdrop, subject alpha and the fills that differ from it."""

    image: Image.Image
    backdrop: RGB
    alpha: np.ndarray
    fills: tuple[RGB, ...]

    @classmethod
    def of(cls, image: Image.Image) -> "Repaintable":
        """ValueError when the photo's backdrop is not plain."""
        backdrop, share = plain_backdrop(image)
        if backdrop is None:
            raise ValueError(f"not a plain backdrop: one colour covers {share:.0%} of the border")
        fills = tuple(f for f in BACKGROUND_FILLS
                      if np.abs(np.subtract(f, backdrop)).max() > MIN_FILL_DISTANCE)
        return cls(image, backdrop, subject_alpha(image, backdrop), fills)

    def copy(self, fill: int) -> Image.Image:
        """The photo on ``self.fills[fill]``."""
        return swap_backdrop(self.image, self.backdrop, self.fills[fill], self.alpha)


def unswappable(images: list[tuple[str, Image.Image]]) -> list[str]:
    """'name (NN % of its border one colour)' for each photo whose backdrop is not plain."""
    found = []
    for name, image in images:
        backdrop, share = plain_backdrop(image)
        if backdrop is None:
            found.append(f"{name} ({share:.0%} of its border within {PLAIN_TOLERANCE} of one colour)")
    return found
