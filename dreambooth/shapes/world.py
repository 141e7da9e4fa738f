"""Shapes world: a procedural, seeded generator of small captioned RGB images.

Owns the vocabulary (shapes, palette, positions, sizes), the geometry, rendering, captions and their
parser, scene sampling with held-out combinations, and personalization subjects: patterned objects
the base grammar cannot express. Reading images back is ``analyzers``' job.

Caption grammar (``detail="short"`` drops the bracketed parts; A is "a", or "an" before a vowel)::

    caption := A " " [SIZE " "] COLOR " " SHAPE [" " PLACE] " on " A " " COLOR " background"
    SIZE    := "small" | "medium" | "large"
    SHAPE   := "circle" | "square" | "triangle" | "star"
    COLOR   := "red" | "green" | "blue" | "yellow" | "white" | "black" | "orange" | "purple"
    PLACE   := "in the top left" | "at the top" | "in the top right" | "on the left"
             | "in the center" | "on the right" | "in the bottom left" | "at the bottom"
             | "in the bottom right"

e.g. "a large red circle in the top left on a blue background" / "an orange star on a black
background". The object colour is never the background colour.

Geometry, in units of the image half-width h (so the image spans [-1, 1]): an object has a centre
and a scale r. A circle has radius r, a square half-side 0.8 r, a triangle (point up) circumradius
1.15 r, a star (five points, one up) outer radius 1.15 r and inner radius 0.575 r. Each shape's
centroid is its centre and each fits within ``EXTENT`` * r of it. ``SIZES`` are ranges of r.
A centre offset is within +-``CENTER_JITTER`` on a middle row/column and within ``SIDE_OFFSET`` on a
side, clamped so the shape stays 1 px inside the image; offsets beyond +-``SIDE_THRESHOLD`` name a
side (``position_name``). Rendering supersamples 4x4 per pixel (anti-aliased, deterministic).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import product
from pathlib import Path

import numpy as np
from PIL import Image

RGB = tuple[int, int, int]
Triple = tuple[str, str, str]  # (shape, color, background)
Seed = int | np.random.Generator | None

PALETTE: dict[str, RGB] = {
    "red": (215, 35, 35),
    "green": (30, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (245, 225, 50),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "orange": (250, 130, 20),
    "purple": (150, 60, 190),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
POSITIONS: dict[str, tuple[int, int]] = {  # name -> (column, row), each in {-1, 0, 1}
    "top left": (-1, -1), "top": (0, -1), "top right": (1, -1),
    "left": (-1, 0), "center": (0, 0), "right": (1, 0),
    "bottom left": (-1, 1), "bottom": (0, 1), "bottom right": (1, 1),
}
PLACE_PHRASES: dict[str, str] = {
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
SIZES: dict[str, tuple[float, float]] = {
    "small": (0.28, 0.34), "medium": (0.38, 0.44), "large": (0.48, 0.54)
}
SIZE_THRESHOLDS = (0.36, 0.46)  # r boundaries between small|medium and medium|large
PATTERNS: tuple[str, ...] = ("checker", "stripes", "two_tone", "dot")
EXTENT = 1.15
CENTER_JITTER = 0.05
SIDE_OFFSET = (0.40, 0.60)
SIDE_THRESHOLD = 0.15
SUPERSAMPLE = 4


def article(word: str) -> str:
    """The indefinite article for word: 'an' before a vowel, else 'a'."""
    return "an" if word[0] in "aeiou" else "a"


def _check(kind: str, value: str, allowed: Collection[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; expected one of {sorted(allowed)}")


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    position: str = "center"
    size: str = "medium"

    def __post_init__(self) -> None:
        _check("shape", self.shape, SHAPES)
        _check("color", self.color, PALETTE)
        _check("background", self.background, PALETTE)
        _check("position", self.position, POSITIONS)
        _check("size", self.size, SIZES)
        if self.color == self.background:
            raise ValueError(f"object and background are both {self.color}")

    @property
    def combination(self) -> Triple:
        return (self.shape, self.color, self.background)


_POLYGONS: dict[str, tuple[np.ndarray, np.ndarray]] = {  # vertex angles (deg), radii (units of r)
    "square": (np.array([-135, -45, 45, 135]), np.full(4, 0.8 * np.sqrt(2))),
    "triangle": (np.array([-90, 30, 150]), np.full(3, EXTENT)),
    "star": (-90 + 36 * np.arange(10), np.where(np.arange(10) % 2 == 0, EXTENT, EXTENT / 2)),
}


def shape_vertices(shape: str, cx: float, cy: float, r: float) -> np.ndarray | None:
    """Polygon vertices (k, 2) as (x, y) pixels, y down; None for a circle."""
    _check("shape", shape, SHAPES)
    if shape == "circle":
        return None
    angles, radii = np.radians(_POLYGONS[shape][0]), r * _POLYGONS[shape][1]
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)


@lru_cache(maxsize=None)
def shape_area(shape: str) -> float:
    """Area of the shape at r = 1 (so area = shape_area * r**2)."""
    v = shape_vertices(shape, 0.0, 0.0, 1.0)
    if v is None:
        return float(np.pi)
    x, y = v[:, 0], v[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


@lru_cache(maxsize=16)
def _grid(resolution: int, supersample: int) -> tuple[np.ndarray, np.ndarray]:
    t = (np.arange(resolution * supersample) + 0.5) / supersample
    return np.meshgrid(t, t)


def _inside(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float,
            r: float) -> np.ndarray:
    verts = shape_vertices(shape, cx, cy, r)
    if verts is None:
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    inside = np.zeros(x.shape, bool)
    for (xa, ya), (xb, yb) in zip(verts, np.roll(verts, -1, axis=0)):
        if ya == yb:
            continue
        crosses = (ya > y) != (yb > y)
        inside ^= crosses & (x < xa + (y - ya) * (xb - xa) / (yb - ya))
    return inside


def _pattern(pattern: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float,
             r: float) -> np.ndarray:
    """Where a subject shows its secondary colour (u, v: coordinates in units of r)."""
    u, v = (x - cx) / r, (y - cy) / r
    if pattern == "checker":  # 3x3 cells across the square, centre cell primary
        cell = 1.6 / 3
        return (np.floor(u / cell + 0.5) + np.floor(v / cell + 0.5)) % 2 == 1
    if pattern == "stripes":  # vertical stripes 0.4 r wide, centre stripe primary
        return np.floor(u / 0.4 + 0.5) % 2 == 1
    if pattern == "two_tone":
        return u > 0
    if pattern == "dot":
        return u * u + v * v < 0.25
    raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")


def coverage(shape: str, cx: float, cy: float, r: float, resolution: int, *,
             pattern: str | None = None,
             supersample: int = SUPERSAMPLE) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel coverage (primary, secondary) in [0, 1]; secondary is zero without a pattern."""
    x, y = _grid(resolution, supersample)
    inside = _inside(shape, x, y, cx, cy, r)
    second = inside & _pattern(pattern, x, y, cx, cy, r) if pattern else np.zeros_like(inside)

    def down(m: np.ndarray) -> np.ndarray:
        return m.reshape(resolution, supersample, resolution, supersample).mean(axis=(1, 3))

    return down(inside & ~second), down(second)


def compose(background: str, layers: Sequence[tuple[np.ndarray, str]]) -> Image.Image:
    """Blend colour layers (coverage, palette name) over a plain background."""
    bg = np.array(PALETTE[background], float)
    res = layers[0][0].shape[0]
    out = np.broadcast_to(bg, (res, res, 3)).copy()
    for alpha, name in layers:
        out += alpha[..., None] * (np.array(PALETTE[name], float) - bg)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def _rng(rng: Seed) -> np.random.Generator | None:
    if rng is None or isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def position_name(u: float, v: float) -> str:
    """Grid name of a centre offset (u, v) in half-widths from the image centre, y down."""
    def side(t: float) -> int:
        return -1 if t < -SIDE_THRESHOLD else (1 if t > SIDE_THRESHOLD else 0)

    cell = (side(u), side(v))
    return next(name for name, at in POSITIONS.items() if at == cell)


def size_name(scale: float) -> str:
    """Size name of a scale r in half-widths."""
    small_medium, medium_large = SIZE_THRESHOLDS
    return "small" if scale < small_medium else ("medium" if scale < medium_large else "large")


def placement(scene: Scene, resolution: int = 32, rng: Seed = None) -> tuple[float, float, float]:
    """(cx, cy, r) in pixels. Without rng: the canonical place (mid-range, no jitter)."""
    gen = _rng(rng)
    h = resolution / 2
    lo, hi = SIZES[scene.size]
    scale = (lo + hi) / 2 if gen is None else float(gen.uniform(lo, hi))
    room = 1 - EXTENT * scale - 1 / h

    def offset(side: int) -> float:
        if side == 0:
            return 0.0 if gen is None else float(gen.uniform(-CENTER_JITTER, CENTER_JITTER))
        mag = sum(SIDE_OFFSET) / 2 if gen is None else float(gen.uniform(*SIDE_OFFSET))
        return side * min(mag, room)

    col, row = POSITIONS[scene.position]
    return h * (1 + offset(col)), h * (1 + offset(row)), h * scale


def render(scene: Scene, resolution: int = 32, rng: Seed = None) -> Image.Image:
    """The scene as an RGB image; identical pixels for the same scene, resolution and seed."""
    cx, cy, r = placement(scene, resolution, rng)
    primary, _ = coverage(scene.shape, cx, cy, r, resolution)
    return compose(scene.background, [(primary, scene.color)])


def caption(scene: Scene, detail: str = "full") -> str:
    if detail not in ("short", "full"):
        raise ValueError(f"detail must be 'short' or 'full', not {detail!r}")
    full = detail == "full"
    words = f"{scene.size} {scene.color}" if full else scene.color
    place = f" {PLACE_PHRASES[scene.position]}" if full else ""
    bg = scene.background
    return f"{article(words)} {words} {scene.shape}{place} on {article(bg)} {bg} background"


_PLACE_TO_NAME = {phrase: name for name, phrase in PLACE_PHRASES.items()}
_CAPTION = re.compile(
    r"^an? (?:(?P<size>small|medium|large) )?(?P<color>[a-z]+) (?P<shape>[a-z]+)"
    rf"(?: (?P<place>{'|'.join(map(re.escape, PLACE_PHRASES.values()))}))?"
    r" on an? (?P<background>[a-z]+) background$"
)


def parse_caption(text: str) -> dict[str, str]:
    """Scene fields named by a caption (short captions give no position/size): Scene(**result)."""
    m = _CAPTION.match(text.strip().lower())
    if not m:
        raise ValueError(f"not a shapes-world caption: {text!r}")
    fields = {k: v for k, v in m.groupdict().items() if v is not None and k != "place"}
    if m["place"]:
        fields["position"] = _PLACE_TO_NAME[m["place"]]
    _check("color", fields["color"], PALETTE)
    _check("shape", fields["shape"], SHAPES)
    _check("background", fields["background"], PALETTE)
    return fields


def all_combinations(shapes: Sequence[str] = SHAPES,
                     colors: Sequence[str] = COLORS) -> list[Triple]:
    return [(s, c, b) for s, c, b in product(shapes, colors, colors) if c != b]


def sample_scenes(n: int, seed: int, *, shapes: Sequence[str] = SHAPES,
                  colors: Sequence[str] = COLORS, positions: Sequence[str] = tuple(POSITIONS),
                  sizes: Sequence[str] = tuple(SIZES), exclude: Collection[Triple] = (),
                  only: Collection[Triple] | None = None) -> list[Scene]:
    """n random scenes whose (shape, color, background) is not in ``exclude`` and, if given, is
    in ``only``. Deterministic for a seed."""
    combos = [t for t in all_combinations(shapes, colors)
              if t not in exclude and (only is None or t in only)]
    if not combos:
        raise ValueError("no (shape, color, background) combination is left to sample")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s, c, b = combos[rng.integers(len(combos))]
        pos, size = positions[rng.integers(len(positions))], sizes[rng.integers(len(sizes))]
        out.append(Scene(s, c, b, pos, size))
    return out


def _parts(t: Triple) -> list[tuple]:
    s, c, b = t
    return [("s", s), ("c", c), ("b", b), ("sc", s, c), ("sb", s, b), ("cb", c, b)]


def held_out_combinations(
    seed: int, fraction: float = 0.2, *, shapes: Sequence[str] = SHAPES,
    colors: Sequence[str] = COLORS,
) -> tuple[frozenset[Triple], frozenset[Triple]]:
    """(train, test) sets of (shape, color, background). Test triples are novel compositions: every
    single value and every pair of values of a test triple still occurs in some train triple."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), not {fraction}")
    combos = all_combinations(shapes, colors)
    left = Counter(p for t in combos for p in _parts(t))
    test: set[Triple] = set()
    target = round(fraction * len(combos))
    for i in np.random.default_rng(seed).permutation(len(combos)):
        if len(test) >= target:
            break
        t = combos[i]
        if all(left[p] > 1 for p in _parts(t)):
            test.add(t)
            left.subtract(_parts(t))
    return frozenset(combos) - test, frozenset(test)


def make_dataset(n: int, seed: int, *, resolution: int = 32, detail: str = "full",
                 **sample_kw) -> list[tuple[Image.Image, str, Scene]]:
    """(image, caption, scene) triples; image i is rendered with the seed [seed, i]."""
    scenes = sample_scenes(n, seed, **sample_kw)
    return [(render(s, resolution, np.random.default_rng([seed, i])), caption(s, detail), s)
            for i, s in enumerate(scenes)]


@dataclass(frozen=True)
class Subject:
    """A patterned object: ``class_noun`` shape in ``color`` with a ``secondary`` colour pattern."""

    name: str
    class_noun: str
    color: str
    secondary: str
    pattern: str

    def __post_init__(self) -> None:
        _check("class noun", self.class_noun, SHAPES)
        _check("color", self.color, PALETTE)
        _check("color", self.secondary, PALETTE)
        _check("pattern", self.pattern, PATTERNS)
        if self.color == self.secondary:
            raise ValueError("a subject needs two different colours")

    @property
    def backgrounds(self) -> tuple[str, ...]:
        return tuple(c for c in COLORS if c not in (self.color, self.secondary))

    def prompt(self, identifier: str, background: str | None = None) -> str:
        text = f"a {identifier} {self.class_noun}"
        return f"{text} on {article(background)} {background} background" if background else text


SUBJECTS: dict[str, Subject] = {s.name: s for s in (
    Subject("checker_square", "square", "red", "white", "checker"),
    Subject("striped_circle", "circle", "blue", "yellow", "stripes"),
    Subject("two_tone_triangle", "triangle", "orange", "blue", "two_tone"),
    Subject("dotted_star", "star", "purple", "white", "dot"),
)}


def new_subjects(n: int, seed: int) -> list[Subject]:
    """n subjects unlike the shipped ones, fixed by ``seed``: each pairs a shape with a pattern no
    shipped subject has, in a random pair of colours (for checking a recipe on subjects it was not
    tuned on)."""
    rng = np.random.default_rng([seed, 13])
    shipped = {(s.class_noun, s.pattern) for s in SUBJECTS.values()}
    pairs = [(shape, pattern) for shape in SHAPES for pattern in PATTERNS if (shape, pattern) not in shipped]
    subjects = []
    for i in rng.permutation(len(pairs))[:n]:
        shape, pattern = pairs[i]
        color, secondary = (COLORS[j] for j in rng.choice(len(COLORS), 2, replace=False))
        subjects.append(Subject(f"{secondary}_{pattern}_{color}_{shape}", shape, color, secondary, pattern))
    return subjects


def render_subject(subject: Subject, background: str, position: str = "center",
                   size: str = "medium", resolution: int = 32, seed: Seed = None) -> Image.Image:
    if background == subject.secondary:
        raise ValueError(f"background {background} is one of the subject's colours")
    scene = Scene(subject.class_noun, subject.color, background, position, size)
    cx, cy, r = placement(scene, resolution, seed)
    primary, second = coverage(subject.class_noun, cx, cy, r, resolution, pattern=subject.pattern)
    return compose(background, [(primary, subject.color), (second, subject.secondary)])


def subject_caption(position: str, background: str, size: str | None = None) -> str:
    """A subject photo's caption (``dreambooth.subjects``): the base grammar with ``{identifier}
    {class_noun}`` for colour and shape, e.g. "a {identifier} {class_noun} in the top left on a blue
    background". ``size`` adds the size word ("a large {identifier} ..."); left out by default: a
    caption that names the size ties the photo's size to that word rather than to the subject, and
    the recontextualization prompts name none (benchmarks/RESULTS.md, round 17)."""
    words = " ".join(w for w in ("a", size, "{identifier} {class_noun}") if w)
    return f"{words} {PLACE_PHRASES[position]} on {article(background)} {background} background"


def write_subject_images(subject: Subject, folder: str | Path, n: int = 5, resolution: int = 32,
                         seed: int = 0, sizes: Sequence[str] = ("medium", "large"), captions: bool = False,
                         caption_size: bool = False, photo_backgrounds: int | None = None) -> list[Path]:
    """n PNGs of the subject at varied positions, sizes and plain backgrounds; returns the paths.
    ``captions``: also a ``.txt`` beside each saying what it shows (``subject_caption``: place and
    background, and its size with ``caption_size``). ``photo_backgrounds``: the photos share this many of
    the subject's backgrounds (as a real subject's photos share a room), leaving the rest for new contexts;
    None: one background per photo while they last."""
    if photo_backgrounds is not None and not 1 <= photo_backgrounds <= len(subject.backgrounds):
        raise ValueError(f"photo_backgrounds {photo_backgrounds}: {subject.name} has {len(subject.backgrounds)} "
                         f"backgrounds; ask for 1 to {len(subject.backgrounds)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    backgrounds = [subject.backgrounds[i] for i in rng.permutation(len(subject.backgrounds))][:photo_backgrounds]
    positions = [list(POSITIONS)[i] for i in rng.permutation(len(POSITIONS))]
    paths = []
    for i in range(n):
        size = sizes[rng.integers(len(sizes))]
        background, position = backgrounds[i % len(backgrounds)], positions[i % len(positions)]
        image = render_subject(subject, background, position, size, resolution, rng)
        paths.append(folder / f"{subject.name}_{i:02d}.png")
        image.save(paths[-1])
        caption = paths[-1].with_suffix(".txt")
        if captions:
            caption.write_text(subject_caption(position, background, size if caption_size else None) + "\n")
        else:
            caption.unlink(missing_ok=True)  # a caption left from an earlier run would still be trained on
    return paths
