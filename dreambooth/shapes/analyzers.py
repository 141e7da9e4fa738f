"""Read shapes-world images back: background, object colour, position, size, shape, subjects.

Owns image analysis (the inverse of ``world``) and the subject-fidelity/diversity measures. Inputs
are square RGB images: PIL images, uint8 arrays or float arrays in [0, 1] (HWC, CHW or HW).

Method, built to survive the blurry, noisy samples of a small diffusion model:

1. Background: the border ring. Its median names it; its mean is the reference colour.
2. Object pixels: far from the background after a 3x3 box smoothing (largest 4-connected blob).
   Each is labelled with the palette colour whose line from the background explains it best (so
   edge pixels blended with the background vote for the right colour); colour fractions follow.
3. Coverage alpha: every pixel unmixed (least squares) into the object's one or two colours. It is
   linear, hence zero-mean under noise, and its sum (the area) and centroid survive blurring.
4. Position: the alpha centroid, named by ``world.position_name``.
5. Shape, by synthesis: each shape is rendered at the centroid with the scale that gives the
   measured area, blurred by a few widths; the one closest to alpha (sum of squares) wins.
6. Size: the scale r = sqrt(area / shape_area), named by ``world.size_name``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from itertools import combinations

import numpy as np
from PIL import Image

from dreambooth.shapes.world import (COLORS, PALETTE, SHAPES, Scene, Subject, coverage,
                                     position_name, shape_area, size_name)

ImageLike = Image.Image | np.ndarray
NONE = "none"  # what the analyzers answer for an image without an object
_RGB = np.array([PALETTE[c] for c in COLORS], np.float32) / 255
_BLURS = (0.0, 0.6, 1.0, 1.4, 1.9, 2.5)  # template blur widths in px at 32 px, scaled with resolution
MIN_COLOR_FRACTION = 0.15  # a second object colour must cover this much of the object


def to_array(img: ImageLike) -> np.ndarray:
    """float32 (H, W, 3) in [0, 1]."""
    a = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img)
    a = a.astype(np.float32) / 255 if a.dtype == np.uint8 else a.astype(np.float32)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    elif a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[2] not in (1, 3):
        a = np.moveaxis(a, 0, 2)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3 or a.shape[0] != a.shape[1]:
        raise ValueError(f"expected a square RGB image, got shape {a.shape}")
    return np.clip(a, 0.0, 1.0)


def nearest_color(rgb: np.ndarray, exclude: Sequence[str] = ()) -> str:
    d = np.linalg.norm(_RGB - np.asarray(rgb, np.float32), axis=1)
    d[[COLORS.index(c) for c in exclude]] = np.inf
    return COLORS[int(np.argmin(d))]


def _box3(a: np.ndarray) -> np.ndarray:
    p = np.pad(a, [(1, 1), (1, 1)] + [(0, 0)] * (a.ndim - 2), mode="edge")
    h, w = a.shape[:2]
    return sum(p[i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9


@lru_cache(maxsize=64)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) Gaussian blur along one axis, edge pixels repeated beyond the border."""
    k = int(np.ceil(3 * sigma))
    w = np.exp(-np.arange(-k, k + 1) ** 2 / (2 * sigma * sigma))
    m = np.zeros((n, n))
    for i in range(n):
        np.add.at(m[i], np.clip(np.arange(i - k, i + k + 1), 0, n - 1), w / w.sum())
    return m


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return a
    m = _blur_matrix(a.shape[0], round(sigma, 3))
    return m @ a @ m.T


def _neighbours_max(m: np.ndarray) -> np.ndarray:
    out = m.copy()
    out[1:] = np.maximum(out[1:], m[:-1])
    out[:-1] = np.maximum(out[:-1], m[1:])
    out[:, 1:] = np.maximum(out[:, 1:], m[:, :-1])
    out[:, :-1] = np.maximum(out[:, :-1], m[:, 1:])
    return out


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        mask = _neighbours_max(mask)
    return mask


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected blob, by label propagation (ties: any)."""
    if not mask.any():
        return mask
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        grown = np.where(mask, _neighbours_max(labels), 0)
        if np.array_equal(grown, labels):
            break
        labels = grown
    ids, counts = np.unique(labels[mask], return_counts=True)
    return labels == ids[np.argmax(counts)]


def _line_fit(pixels: np.ndarray, bg: np.ndarray, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Best colour per pixel among ``names`` on the line bg -> colour: (index, blend fraction)."""
    d = _RGB[[COLORS.index(c) for c in names]] - bg  # (k, 3)
    v = pixels - bg  # (n, 3)
    t = np.clip(v @ d.T / (d * d).sum(axis=1), 0.3, 1.0)  # (n, k)
    resid = np.linalg.norm(v[:, None, :] - t[..., None] * d[None], axis=2)
    best = np.argmin(resid, axis=1)
    return best, t[np.arange(len(best)), best]


@dataclass(frozen=True)
class _Segment:
    background: str
    bg: np.ndarray  # measured background colour (border mean)
    colors: tuple[tuple[str, float], ...]  # object colours by fraction, largest first
    alpha: np.ndarray  # object coverage per pixel (unclipped)
    mask: np.ndarray  # the object, alpha > 0.5 after smoothing
    cx: float
    cy: float
    area: float  # sum of alpha near the object, px


def _segment(img: ImageLike) -> tuple[np.ndarray, _Segment | None]:
    a = to_array(img)
    n = a.shape[0]
    ring = max(1, n // 32)
    border = np.concatenate([a[:ring].reshape(-1, 3), a[-ring:].reshape(-1, 3),
                             a[:, :ring].reshape(-1, 3), a[:, -ring:].reshape(-1, 3)])
    background, bg = nearest_color(np.median(border, axis=0)), border.mean(axis=0)
    smooth = _box3(a)
    dist = np.linalg.norm(smooth - bg, axis=2)
    if dist.max() < 0.12:
        return a, None
    rough = _largest_component(dist > max(0.12, min(0.5 * dist.max(), 0.2)))
    names = [c for c in COLORS if c != background]
    best, _ = _line_fit(smooth[rough], bg, names)
    counts = np.bincount(best, minlength=len(names)) / len(best)
    order = np.argsort(-counts, kind="stable")
    colors = tuple((names[i], float(counts[i])) for i in order if counts[i] > 0)
    keep = [i for i in order[:2] if counts[i] >= MIN_COLOR_FRACTION] or [order[0]]
    refs = _RGB[[COLORS.index(names[i]) for i in keep]]  # (k, 3)
    unmix = np.linalg.pinv(refs.T - bg[:, None])  # (k, 3)
    alpha = ((a - bg) @ unmix.T).sum(axis=2)
    mask = _largest_component(_box3(alpha) > 0.5)
    if not mask.any():
        mask = rough
    region = _dilate(mask, max(2, round(5 * n / 32)))
    w = np.where(region, alpha, 0.0)
    area = float(w.sum())
    if area <= 1.0:
        return a, None
    ys, xs = np.mgrid[0:n, 0:n] + 0.5
    cx, cy = float((w * xs).sum() / area), float((w * ys).sum() / area)
    return a, _Segment(background, bg, colors, alpha, mask, cx, cy, area)


def _shape(seg: _Segment, n: int) -> str:
    best, best_err = NONE, np.inf
    for shape in SHAPES:
        r = np.sqrt(seg.area / shape_area(shape))
        template = coverage(shape, seg.cx, seg.cy, r, n, supersample=2)[0]
        for sigma in _BLURS:
            err = float(((seg.alpha - _blur(template, sigma * n / 32)) ** 2).sum())
            if err < best_err:
                best, best_err = shape, err
    return best


@dataclass(frozen=True)
class Analysis:
    background: str
    color: str
    shape: str
    position: str
    size: str
    center: tuple[float, float]  # centroid offset (u, v) in half-widths from the image centre
    scale: float  # r in half-widths
    colors: tuple[tuple[str, float], ...]  # object colour fractions, largest first

    def as_dict(self) -> dict:
        return asdict(self)


def _analysis(a: np.ndarray, seg: _Segment | None) -> Analysis:
    if seg is None:
        bg = nearest_color(np.median(a[0], axis=0))
        return Analysis(bg, NONE, NONE, NONE, NONE, (0.0, 0.0), 0.0, ())
    n = a.shape[0]
    h = n / 2
    shape = _shape(seg, n)
    u, v = seg.cx / h - 1, seg.cy / h - 1
    scale = float(np.sqrt(seg.area / shape_area(shape)) / h)
    return Analysis(seg.background, seg.colors[0][0], shape, position_name(u, v), size_name(scale),
                    (u, v), scale, seg.colors)


def analyze(img: ImageLike) -> Analysis:
    return _analysis(*_segment(img))


def background_color(img: ImageLike) -> str:
    a, seg = _segment(img)
    return seg.background if seg else _analysis(a, None).background


def object_color(img: ImageLike) -> str:
    seg = _segment(img)[1]
    return seg.colors[0][0] if seg else NONE


def object_position(img: ImageLike) -> str:
    a, seg = _segment(img)
    return position_name(seg.cx * 2 / a.shape[0] - 1, seg.cy * 2 / a.shape[0] - 1) if seg else NONE


def object_size(img: ImageLike) -> str:
    return analyze(img).size


def shape_of(img: ImageLike) -> str:
    a, seg = _segment(img)
    return _shape(seg, a.shape[0]) if seg else NONE


def matches(analysis: Analysis, scene: Scene | Mapping[str, str]) -> dict[str, bool]:
    """Per field, whether the analysis agrees; a mapping (e.g. ``parse_caption``) checks its keys."""
    wanted = scene if isinstance(scene, Mapping) else asdict(scene)
    return {k: getattr(analysis, k) == v for k, v in wanted.items()}


# ---------------------------------------------------------------- subjects and diversity


def _two_colour_labels(a: np.ndarray, seg: _Segment, first: str, second: str) -> np.ndarray:
    """Per object pixel, True where ``second`` explains it better than ``first``."""
    best, _ = _line_fit(a[seg.mask], seg.bg, [first, second])
    return best == 1


def subject_features(img: ImageLike) -> np.ndarray:
    """Colour fractions over the palette, then pattern statistics of the top two colours: second
    colour fraction, label changes across columns and rows, left/right and top/bottom asymmetry,
    centre/rim contrast. Non-negative; invariant to which of two equal colours counts as first."""
    a, seg = _segment(img)
    feats = np.zeros(len(COLORS) + 6, np.float32)
    if seg is None:
        return feats
    for name, frac in seg.colors:
        feats[COLORS.index(name)] = frac
    if len(seg.colors) < 2 or seg.mask.sum() < 4:
        return feats
    second = np.zeros(seg.mask.shape, bool)
    second[seg.mask] = _two_colour_labels(a, seg, seg.colors[0][0], seg.colors[1][0])
    m = seg.mask
    n = a.shape[0]
    ys, xs = np.mgrid[0:n, 0:n] + 0.5

    def changes(x: np.ndarray, y: np.ndarray, both: np.ndarray) -> float:
        return float((x != y)[both].mean()) if both.any() else 0.0

    def split(part: np.ndarray) -> float:
        p, q = m & part, m & ~part
        return abs(float(second[p].mean()) - float(second[q].mean())) if p.any() and q.any() else 0.0

    rim = np.hypot(xs - seg.cx, ys - seg.cy) > 0.5 * np.sqrt(seg.area / np.pi)
    feats[len(COLORS):] = [second[m].mean(),
                           changes(second[:, 1:], second[:, :-1], m[:, 1:] & m[:, :-1]),
                           changes(second[1:], second[:-1], m[1:] & m[:-1]),
                           split(xs < seg.cx), split(ys < seg.cy), split(rim)]
    return feats


def subject_similarity(a: ImageLike | np.ndarray, b: ImageLike | np.ndarray) -> float:
    """1 - Bray-Curtis distance of ``subject_features`` (images or feature vectors), in [0, 1]."""
    fa, fb = (x if isinstance(x, np.ndarray) and x.ndim == 1 else subject_features(x) for x in (a, b))
    total = float(np.abs(fa).sum() + np.abs(fb).sum())
    return 1.0 if total == 0 else 1.0 - float(np.abs(fa - fb).sum()) / total


def is_subject(img: ImageLike, subject: Subject, min_agreement: float = 0.75) -> bool:
    """The subject's colours and outline, and its pattern where a render of it at the measured
    place and scale puts it (per-pixel colour agreement inside the object)."""
    a, seg = _segment(img)
    if seg is None:
        return False
    fractions = dict(seg.colors)
    if min(fractions.get(subject.color, 0.0), fractions.get(subject.secondary, 0.0)) < MIN_COLOR_FRACTION:
        return False
    n = a.shape[0]
    if _shape(seg, n) != subject.class_noun:
        return False
    r = np.sqrt(seg.area / shape_area(subject.class_noun))
    primary, second = coverage(subject.class_noun, seg.cx, seg.cy, r, n, pattern=subject.pattern)
    where = seg.mask & (primary + second > 0.5)
    if not where.any():
        return False
    observed = _two_colour_labels(a, seg, subject.color, subject.secondary)
    expected = (second > primary)[seg.mask]
    return float((observed == expected)[where[seg.mask]].mean()) >= min_agreement


def pairwise_distance(images: Sequence[ImageLike], kind: str = "pixel") -> float:
    """Mean over pairs of the RMS pixel distance (``pixel``) or 1 - subject_similarity
    (``feature``): a diversity (DIV) score; 0 for fewer than two images."""
    if kind == "pixel":
        items = [to_array(i) for i in images]
        dist = lambda x, y: float(np.sqrt(((x - y) ** 2).mean()))  # noqa: E731
    elif kind == "feature":
        items = [subject_features(i) for i in images]
        dist = lambda x, y: 1.0 - subject_similarity(x, y)  # noqa: E731
    else:
        raise ValueError(f"kind must be 'pixel' or 'feature', not {kind!r}")
    pairs = list(combinations(items, 2))
    return float(np.mean([dist(x, y) for x, y in pairs])) if pairs else 0.0
