"""Read shapes-world images back: background, object colour, position, size, shape, subjects.

Owns image analysis (the inverse of ``world``) and the subject-fidelity/diversity measures. Inputs
are square RGB images: PIL images, uint8 arrays or float arrays in [0, 1] (HWC, CHW or HW).

Method, built to survive the blurry, noisy samples of a small diffusion model:

1. Background: the border ring. Its median names it; its mean is the reference colour.
2. Object pixels: far from the background after a 3x3 box smoothing (largest 4-connected blob).
   Object colours: the one or two palette colours whose blends with the background and with each
   other best explain those pixels (3x3 vector-median filtered), so the blurred edges a sampler
   draws vote for the right colours instead of for whatever palette colour they resemble.
3. Coverage alpha: every pixel unmixed (least squares) into the object's colours. It is linear,
   hence zero-mean under noise, and its sum (the area) and centroid survive blurring.
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
_BLURS = (0.0, 0.6, 1.0, 1.4, 1.9, 2.5)  # template blur widths, px at 32 px (scaled)
MIN_COLOR_FRACTION = 0.15  # a second object colour must cover this much of the object


def to_array(img: ImageLike) -> np.ndarray:
    """float32 (H, W, 3) in [0, 1] from a PIL image or a uint8 / float array (HWC, CHW or HW)."""
    a = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img)
    a = a.astype(np.float32) / 255 if a.dtype == np.uint8 else a.astype(np.float32)
    a = a[..., None] if a.ndim == 2 else a
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[2] not in (1, 3):
        a = np.moveaxis(a, 0, 2)
    if a.ndim != 3 or a.shape[2] not in (1, 3) or a.shape[0] != a.shape[1]:
        raise ValueError(f"expected a square RGB image, got shape {a.shape}")
    return np.clip(np.broadcast_to(a, a.shape[:2] + (3,)), 0.0, 1.0)


def nearest_color(rgb: np.ndarray, exclude: Sequence[str] = ()) -> str:
    d = np.linalg.norm(_RGB - np.asarray(rgb, np.float32), axis=1)
    d[[COLORS.index(c) for c in exclude]] = np.inf
    return COLORS[int(np.argmin(d))]


def _box3(a: np.ndarray) -> np.ndarray:
    p = np.pad(a, [(1, 1), (1, 1)] + [(0, 0)] * (a.ndim - 2), mode="edge")
    h, w = a.shape[:2]
    return sum(p[i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9


def _median3_at(a: np.ndarray, where: np.ndarray) -> np.ndarray:
    """3x3 vector median at the pixels ``where``: the neighbour closest (L1) to all others. Keeps
    edges and, unlike a per-channel median, invents no colours. Returns (n, 3)."""
    p = np.pad(a, [(1, 1), (1, 1), (0, 0)], mode="edge")
    ys, xs = np.nonzero(where)
    s = np.stack([p[ys + i, xs + j] for i in range(3) for j in range(3)], axis=1)  # (n, 9, 3)
    cost = np.abs(s[:, :, None] - s[:, None]).sum(axis=(2, 3))  # (n, 9)
    return s[np.arange(len(s)), cost.argmin(axis=1)]


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


def _object_colors(v: np.ndarray, bg: np.ndarray,
                   names: Sequence[str]) -> tuple[tuple[str, float], ...]:
    """The one or two palette colours whose blends with the background and each other explain the
    object pixels ``v`` (n, 3; relative to bg) best, with their shares, largest first. A pixel's
    blend is the closest point of the triangle (bg, c1, c2): coverages >= 0 summing to <= 1.
    Two colours only when that halves the error and the lesser one holds ``MIN_COLOR_FRACTION``."""
    v = v[np.linspace(0, len(v) - 1, min(len(v), 256)).astype(int)]  # plenty for a colour
    d = _RGB[[COLORS.index(c) for c in names]] - bg  # (k, 3)
    t1 = np.clip(v @ d.T / (d * d).sum(axis=1), 0, 1)  # (n, k): blends bg -> one colour
    e1 = ((v[:, None] - t1[..., None] * d) ** 2).sum(axis=2)
    single = int(np.argmin(e1.sum(axis=0)))
    best, best_err = ((names[single], 1.0),), 0.5 * float(e1[:, single].sum())
    i, j = np.triu_indices(len(names), 1)  # all pairs
    pair = np.stack([d[i], d[j]], axis=1)  # (p, 2, 3)
    inner = np.einsum("nc,pck->npk", v, np.linalg.pinv(pair))  # (n, p, 2), unconstrained
    inner[(inner < 0).any(axis=2) | (inner.sum(axis=2) > 1)] = np.nan
    step = d[j] - d[i]
    s = np.clip(((v[:, None] - d[i]) * step).sum(axis=2) / (step * step).sum(axis=1), 0, 1)
    zero = np.zeros_like(s)
    options = np.stack([inner, np.stack([t1[:, i], zero], 2), np.stack([zero, t1[:, j]], 2),
                        np.stack([1 - s, s], 2)])  # (4, n, p, 2): inside, or on an edge
    errors = ((v[None, :, None] - (options[..., None, :] @ pair)[..., 0, :]) ** 2).sum(axis=3)
    pick = np.nan_to_num(errors, nan=np.inf).argmin(axis=0)[None, ..., None]  # (1, n, p, 1)
    err = np.take_along_axis(errors, pick[..., 0], axis=0)[0].sum(axis=0)  # (p,)
    cover = np.take_along_axis(options, np.repeat(pick, 2, axis=3), axis=0)[0].sum(axis=0)
    shares = cover / np.maximum(cover.sum(axis=1, keepdims=True), 1e-9)  # (p, 2)
    ok = np.flatnonzero((err < best_err) & (shares.min(axis=1) >= MIN_COLOR_FRACTION))
    if len(ok):
        q = ok[np.argmin(err[ok])]
        two = sorted(zip((names[i[q]], names[j[q]]), shares[q]), key=lambda x: -x[1])
        best = tuple((c, float(f)) for c, f in two)
    return best


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


def _border(a: np.ndarray) -> tuple[str, np.ndarray]:
    """(palette name of the border median, border mean) over a ring 1 px wide per 32 px."""
    k = max(1, a.shape[0] // 32)
    ring = np.concatenate([a[:k].reshape(-1, 3), a[-k:].reshape(-1, 3),
                           a[:, :k].reshape(-1, 3), a[:, -k:].reshape(-1, 3)])
    return nearest_color(np.median(ring, axis=0)), ring.mean(axis=0)


def _segment(img: ImageLike) -> tuple[np.ndarray, _Segment | None]:
    a = to_array(img)
    n = a.shape[0]
    background, bg = _border(a)
    dist = np.linalg.norm(_box3(a) - bg, axis=2)
    if dist.max() < 0.12:
        return a, None
    rough = _largest_component(dist > max(0.12, min(0.5 * dist.max(), 0.2)))
    colors = _object_colors(_median3_at(a, rough) - bg, bg, [c for c in COLORS if c != background])
    refs = _RGB[[COLORS.index(c) for c, _ in colors]]  # (k, 3)
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


def _fit(seg: _Segment, n: int) -> tuple[str, float]:
    """(shape, blur width in px) whose blurred template at the centroid and area fits alpha best."""
    best, best_err = (NONE, 0.0), np.inf
    for shape in SHAPES:
        r = np.sqrt(seg.area / shape_area(shape))
        template = coverage(shape, seg.cx, seg.cy, r, n, supersample=2)[0]
        for sigma in _BLURS:
            err = float(((seg.alpha - _blur(template, sigma * n / 32)) ** 2).sum())
            if err < best_err:
                best, best_err = (shape, sigma * n / 32), err
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
        return Analysis(_border(a)[0], NONE, NONE, NONE, NONE, (0.0, 0.0), 0.0, ())
    n = a.shape[0]
    h = n / 2
    shape = _fit(seg, n)[0]
    u, v = seg.cx / h - 1, seg.cy / h - 1
    scale = float(np.sqrt(seg.area / shape_area(shape)) / h)
    return Analysis(seg.background, seg.colors[0][0], shape, position_name(u, v), size_name(scale),
                    (u, v), scale, seg.colors)


def analyze(img: ImageLike) -> Analysis:
    return _analysis(*_segment(img))


def background_color(img: ImageLike) -> str:
    return _border(to_array(img))[0]


def object_color(img: ImageLike) -> str:
    seg = _segment(img)[1]
    return seg.colors[0][0] if seg else NONE


def object_position(img: ImageLike) -> str:
    a, seg = _segment(img)
    return position_name(seg.cx * 2 / a.shape[0] - 1, seg.cy * 2 / a.shape[0] - 1) if seg else NONE


def object_size(img: ImageLike) -> str:
    return analyze(img).size


CLEAN_SHAPE_FIT = 0.5
"""``shape_fit`` from which a drawn shape reads as that shape to a person. ``shape_of`` names the
nearest of the four shapes for any blob; smudges it calls triangles (a triangle with a "foot", the
demo's drifted "a triangle" images) fit 0.33-0.48; the base model's "a triangle" images 0.46-0.75,
6 of 8 above 0.5; rendered shapes above 0.7."""


def shape_fit(img: ImageLike) -> float:
    """Soft IoU in [0, 1] of the object's coverage with its fitted template (``shape_of``'s shape,
    blur, centroid and area); 0 without an object."""
    a, seg = _segment(img)
    if seg is None:
        return 0.0
    n = a.shape[0]
    shape, blur = _fit(seg, n)
    template = _blur(coverage(shape, seg.cx, seg.cy, np.sqrt(seg.area / shape_area(shape)), n, supersample=2)[0], blur)
    return float(np.minimum(seg.alpha, template).sum() / np.maximum(seg.alpha, template).sum())


def shape_of(img: ImageLike) -> str:
    a, seg = _segment(img)
    return _fit(seg, a.shape[0])[0] if seg else NONE


def matches(analysis: Analysis, scene: Scene | Mapping[str, str]) -> dict[str, bool]:
    """Per field, whether the analysis agrees; a mapping (``parse_caption``) checks its keys."""
    wanted = scene if isinstance(scene, Mapping) else asdict(scene)
    return {k: getattr(analysis, k) == v for k, v in wanted.items()}


def _second_wins(a: np.ndarray, seg: _Segment, first: str, second: str) -> np.ndarray:
    """Per object pixel, whether a blend of bg and ``second`` explains it better than ``first``."""
    d = _RGB[[COLORS.index(first), COLORS.index(second)]] - seg.bg  # (2, 3)
    v = a[seg.mask] - seg.bg
    t = np.clip(v @ d.T / (d * d).sum(axis=1), 0.3, 1.0)  # (n, 2)
    resid = ((v[:, None] - t[..., None] * d) ** 2).sum(axis=2)
    return resid[:, 1] < resid[:, 0]


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
    second[seg.mask] = _second_wins(a, seg, seg.colors[0][0], seg.colors[1][0])
    m = seg.mask
    n = a.shape[0]
    ys, xs = np.mgrid[0:n, 0:n] + 0.5

    def changes(x: np.ndarray, y: np.ndarray, both: np.ndarray) -> float:
        return float((x != y)[both].mean()) if both.any() else 0.0

    def split(part: np.ndarray) -> float:
        p, q = m & part, m & ~part
        if not (p.any() and q.any()):
            return 0.0
        return abs(float(second[p].mean()) - float(second[q].mean()))

    rim = np.hypot(xs - seg.cx, ys - seg.cy) > 0.5 * np.sqrt(seg.area / np.pi)
    feats[len(COLORS):] = [second[m].mean(),
                           changes(second[:, 1:], second[:, :-1], m[:, 1:] & m[:, :-1]),
                           changes(second[1:], second[:-1], m[1:] & m[:-1]),
                           split(xs < seg.cx), split(ys < seg.cy), split(rim)]
    return feats


def subject_similarity(a: ImageLike, b: ImageLike) -> float:
    """1 - Bray-Curtis distance of ``subject_features`` (of images, or 1-D feature vectors given
    directly), in [0, 1]."""
    fa, fb = (x if isinstance(x, np.ndarray) and x.ndim == 1 else subject_features(x)
              for x in (a, b))
    total = float(np.abs(fa).sum() + np.abs(fb).sum())
    return 1.0 if total == 0 else 1.0 - float(np.abs(fa - fb).sum()) / total


def is_subject(img: ImageLike, subject: Subject, min_correlation: float = 0.6) -> bool:
    """The subject's two colours, its outline, and its pattern: the per-pixel balance of the two
    colours correlates with a render of the subject at the measured place, scale and blur."""
    a, seg = _segment(img)
    if seg is None:
        return False
    if {c for c, _ in seg.colors} != {subject.color, subject.secondary}:
        return False
    n = a.shape[0]
    shape, sigma = _fit(seg, n)
    if shape != subject.class_noun:
        return False
    r = np.sqrt(seg.area / shape_area(shape))
    primary, second = coverage(shape, seg.cx, seg.cy, r, n, pattern=subject.pattern)
    refs = _RGB[[COLORS.index(subject.color), COLORS.index(subject.secondary)]]
    alphas = (a - seg.bg) @ np.linalg.pinv(refs.T - seg.bg[:, None]).T  # (n, n, 2)
    observed = (alphas[..., 1] - alphas[..., 0])[seg.mask]
    expected = _blur(second - primary, sigma)[seg.mask]
    if observed.std() == 0 or expected.std() == 0:
        return False
    return float(np.corrcoef(observed, expected)[0, 1]) >= min_correlation


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
