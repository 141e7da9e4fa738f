"""Shapes world and its analyzers: determinism, caption grammar, held-out splits, subjects, and the
analyzers' accuracy measured on held-out generated images (``pytest -s`` prints the numbers)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFilter

from dreambooth.shapes import analyzers as A
from dreambooth.shapes import world as W
from dreambooth.shapes.world import SUBJECTS, Scene, Subject

FIELDS = ("background", "color", "position", "shape", "size")
N_IMAGES = 300


def degrade(img: Image.Image, seed: int, blur: float = 0.0, noise: float = 0.0) -> np.ndarray:
    """Like a small sampler's output: Gaussian blur (px at 32 px, scaled) then Gaussian noise."""
    if blur:
        img = img.filter(ImageFilter.GaussianBlur(blur * img.width / 32))
    a = np.asarray(img, np.float32) / 255
    if noise:
        a = np.clip(a + np.random.default_rng(seed).normal(0, noise, a.shape), 0, 1)
    return a


def held_out_renders(n: int, resolution: int) -> list[tuple[Scene, Image.Image]]:
    _, test = W.held_out_combinations(seed=0, fraction=0.2)
    scenes = W.sample_scenes(n, seed=resolution, only=test)
    return [(s, W.render(s, resolution, np.random.default_rng([1, i]))) for i, s in enumerate(scenes)]


@pytest.fixture(scope="module")
def renders32() -> list[tuple[Scene, Image.Image]]:
    return held_out_renders(N_IMAGES, 32)


def accuracy(renders: list[tuple[Scene, Image.Image]], blur: float, noise: float) -> dict[str, float]:
    hits: Counter[str] = Counter()
    for i, (scene, img) in enumerate(renders):
        found = A.matches(A.analyze(degrade(img, i, blur, noise)), scene)
        hits.update(k for k, ok in found.items() if ok)
    return {k: hits[k] / len(renders) for k in FIELDS}


CLEAN_FLOOR = {"background": 0.98, "color": 0.98, "position": 0.98, "shape": 0.95, "size": 0.95}
NOISY_FLOOR = dict.fromkeys(FIELDS, 0.9)
CONDITIONS = [  # name, blur (px at 32 px), noise sigma, floors
    ("clean", 0.0, 0.0, CLEAN_FLOOR),
    ("noise 0.1", 0.0, 0.1, NOISY_FLOOR),
    ("blur 1px", 1.0, 0.0, NOISY_FLOOR),
    ("blur 1px + noise 0.1", 1.0, 0.1, NOISY_FLOOR),
]


@pytest.mark.parametrize("name, blur, noise, floor", CONDITIONS, ids=[c[0] for c in CONDITIONS])
def test_analyzer_accuracy_32px(renders32, name, blur, noise, floor):
    acc = accuracy(renders32, blur, noise)
    print(f"\n[shapes 32px, {len(renders32)} held-out images, {name}] "
          + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    assert {k: v for k, v in acc.items() if v < floor[k]} == {}


@pytest.mark.parametrize("name, blur, noise, floor", [CONDITIONS[0], CONDITIONS[3]],
                         ids=["clean", "blur+noise"])
def test_analyzer_accuracy_64px(name, blur, noise, floor):
    renders = held_out_renders(60, 64)
    acc = accuracy(renders, blur, noise)
    print(f"\n[shapes 64px, {len(renders)} held-out images, {name}] "
          + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    assert {k: v for k, v in acc.items() if v < floor[k]} == {}


def test_render_is_deterministic_and_seeded():
    scene = Scene("star", "yellow", "purple", "top right", "small")
    assert np.array_equal(np.asarray(W.render(scene, 32, 5)), np.asarray(W.render(scene, 32, 5)))
    assert np.array_equal(np.asarray(W.render(scene)), np.asarray(W.render(scene)))
    assert len({np.asarray(W.render(scene, 32, s)).tobytes() for s in range(5)}) == 5
    a, b = W.make_dataset(8, seed=3), W.make_dataset(8, seed=3)
    assert [c for _, c, _ in a] == [c for _, c, _ in b]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for (x, _, _), (y, _, _) in zip(a, b))
    img = W.render(scene, 64, 1)
    assert img.mode == "RGB" and img.size == (64, 64)


@pytest.mark.parametrize("resolution", [32, 64])
def test_objects_stay_inside_and_match_their_names(resolution):
    for i, scene in enumerate(W.sample_scenes(200, seed=9)):
        a = np.asarray(W.render(scene, resolution, i))
        border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
        assert (border == W.PALETTE[scene.background]).all(), scene
        cx, cy, r = W.placement(scene, resolution, i)
        h = resolution / 2
        assert W.position_name(cx / h - 1, cy / h - 1) == scene.position
        assert W.size_name(r / h) == scene.size


def test_captions_and_round_trip():
    scene = Scene("circle", "red", "blue", "top left", "large")
    assert W.caption(scene) == "a large red circle in the top left on a blue background"
    assert W.caption(scene, detail="short") == "a red circle on a blue background"
    assert W.caption(Scene("star", "orange", "black")) == (
        "a medium orange star in the center on a black background")
    assert W.caption(Scene("star", "orange", "black"), "short") == "an orange star on a black background"
    for scene in W.sample_scenes(300, seed=4):
        assert Scene(**W.parse_caption(W.caption(scene))) == scene
        assert W.parse_caption(W.caption(scene, "short")) == {
            "shape": scene.shape, "color": scene.color, "background": scene.background}
    for bad in ("a red dog on a blue background", "a red circle", "a teal circle on a red background"):
        with pytest.raises(ValueError):
            W.parse_caption(bad)
    with pytest.raises(ValueError):
        W.caption(scene, detail="long")


def test_scene_validation():
    with pytest.raises(ValueError):
        Scene("circle", "red", "red")
    with pytest.raises(ValueError):
        Scene("hexagon", "red", "blue")
    with pytest.raises(ValueError):
        Scene("circle", "red", "blue", position="middle")


def test_held_out_split():
    train, test = W.held_out_combinations(seed=0, fraction=0.2)
    everything = set(W.all_combinations())
    assert train.isdisjoint(test) and train | test == everything
    assert len(test) == round(0.2 * len(everything))
    assert W.held_out_combinations(seed=0, fraction=0.2) == (train, test)
    assert W.held_out_combinations(seed=1, fraction=0.2)[1] != test
    for s, c, b in test:  # novel compositions of seen parts
        assert any(t[0] == s and t[1] == c for t in train)
        assert any(t[0] == s and t[2] == b for t in train)
        assert any(t[1] == c and t[2] == b for t in train)
    assert all(sc.combination in train for sc in W.sample_scenes(500, seed=2, exclude=test))
    assert all(sc.combination in test for sc in W.sample_scenes(100, seed=2, only=test))
    assert W.sample_scenes(20, seed=5) == W.sample_scenes(20, seed=5)


def test_analyzers_accept_pil_uint8_float_and_chw():
    img = W.render(Scene("triangle", "green", "white", "bottom", "large"), 32, 0)
    u8 = np.asarray(img)
    forms = [img, u8, u8.astype(np.float32) / 255, np.moveaxis(u8, 2, 0).astype(np.float64) / 255]
    results = {A.analyze(x) for x in forms}
    assert len(results) == 1
    found = results.pop()
    assert (found.shape, found.color, found.background, found.position, found.size) == (
        "triangle", "green", "white", "bottom", "large")
    assert A.shape_of(img) == "triangle" and A.object_color(img) == "green"
    assert A.background_color(img) == "white" and A.object_position(img) == "bottom"
    assert A.object_size(img) == "large"
    empty = A.analyze(Image.new("RGB", (32, 32), W.PALETTE["blue"]))
    assert empty.background == "blue" and empty.shape == empty.color == A.NONE
    assert A.matches(found, {"shape": "triangle", "color": "red"}) == {"shape": True, "color": False}


def subject_renders(subject: Subject, n: int, resolution: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(len(subject.name))
    return [W.render_subject(subject, subject.backgrounds[i % len(subject.backgrounds)],
                             list(W.POSITIONS)[i % 9], ("medium", "large")[i % 2], resolution, rng)
            for i in range(n)]


def plain_renders(subject: Subject, n: int) -> list[Image.Image]:
    return [W.render(Scene(subject.class_noun, subject.color, subject.backgrounds[i % 6],
                           list(W.POSITIONS)[i % 9], ("medium", "large")[i % 2]), 32, i)
            for i in range(n)]


@pytest.mark.parametrize("name", list(SUBJECTS))
def test_is_subject(name):
    subject = SUBJECTS[name]
    renders = subject_renders(subject, 12)
    hits = np.mean([A.is_subject(img, subject) for img in renders])
    noisy = np.mean([A.is_subject(degrade(img, i, 1.0, 0.1), subject) for i, img in enumerate(renders)])
    big = np.mean([A.is_subject(img, subject) for img in subject_renders(subject, 4, 64)])
    plain = np.mean([A.is_subject(img, subject) for img in plain_renders(subject, 12)])
    others = [Subject("other", subject.class_noun, subject.color, subject.secondary, p)
              for p in W.PATTERNS if p != subject.pattern]
    impostor = np.mean([A.is_subject(img, subject) for o in others for img in subject_renders(o, 3)])
    print(f"\n[{name}] is_subject: renders {hits:.2f}, blur+noise {noisy:.2f}, 64px {big:.2f}, "
          f"plain shapes {plain:.2f}, other patterns {impostor:.2f}")
    assert hits == 1.0 and big == 1.0 and noisy >= 0.9
    assert plain == 0.0 and impostor == 0.0


@pytest.mark.parametrize("name", list(SUBJECTS))
def test_subject_similarity(name):
    subject = SUBJECTS[name]
    feats = [A.subject_features(img) for img in subject_renders(subject, 6)]
    plain = [A.subject_features(img) for img in plain_renders(subject, 6)]
    same = np.mean([A.subject_similarity(a, b) for i, a in enumerate(feats) for b in feats[i + 1:]])
    versus = np.mean([A.subject_similarity(a, b) for a in feats for b in plain])
    print(f"\n[{name}] similarity: subject-subject {same:.3f}, subject-plain {versus:.3f}")
    assert 0.0 <= versus < same <= 1.0 and same - versus > 0.3
    img = subject_renders(subject, 1)[0]
    assert A.subject_similarity(img, img) == pytest.approx(1.0)


def test_write_subject_images(tmp_path):
    subject = SUBJECTS["checker_square"]
    paths = W.write_subject_images(subject, tmp_path / "inst", n=5, resolution=64, seed=0)
    assert len(paths) == 5 and all(p.suffix == ".png" and p.exists() for p in paths)
    images = [Image.open(p) for p in paths]
    assert all(im.mode == "RGB" and im.size == (64, 64) for im in images)
    assert len({A.analyze(im).position for im in images}) == 5  # varied positions
    assert all(A.is_subject(im, subject) for im in images)
    again = W.write_subject_images(subject, tmp_path / "again", n=5, resolution=64, seed=0)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    assert subject.prompt("sks", "blue") == "a sks square on a blue background"
    with pytest.raises(ValueError):
        W.render_subject(subject, "white")  # white is the subject's secondary colour


def test_subject_captions_name_place_and_background_and_size_only_when_asked(tmp_path):
    subject = SUBJECTS["checker_square"]
    paths = W.write_subject_images(subject, tmp_path / "plain", n=5, seed=0, captions=True)
    for path in paths:
        caption = path.with_suffix(".txt").read_text().strip()
        seen = A.analyze(Image.open(path))
        assert caption == W.subject_caption(seen.position, seen.background)  # what the photo shows
        assert caption.startswith("a {identifier} {class_noun} ") and not set(caption.split()) & set(W.SIZES)
    sized = W.write_subject_images(subject, tmp_path / "sized", n=5, seed=0, captions=True, caption_size=True)
    for path in sized:
        size = path.with_suffix(".txt").read_text().split()[1]
        assert size == A.analyze(Image.open(path)).size
    W.write_subject_images(subject, tmp_path / "sized", n=5, seed=0)  # rewritten without: no stale caption
    assert not list((tmp_path / "sized").glob("*.txt"))


def test_photos_can_share_a_few_backgrounds_leaving_the_rest_unseen(tmp_path):
    subject = SUBJECTS["checker_square"]
    spread = W.write_subject_images(subject, tmp_path / "spread", n=5, seed=0)
    shared = W.write_subject_images(subject, tmp_path / "shared", n=5, seed=0, photo_backgrounds=2)
    spread_backgrounds = [A.analyze(Image.open(p)).background for p in spread]
    shared_backgrounds = [A.analyze(Image.open(p)).background for p in shared]
    assert len(set(spread_backgrounds)) == 5  # one per photo by default
    assert len(set(shared_backgrounds)) == 2 and set(shared_backgrounds) <= set(subject.backgrounds)
    assert all(A.is_subject(Image.open(p), subject) for p in shared)
    for wrong in (0, -1, len(subject.backgrounds) + 1):
        with pytest.raises(ValueError, match="photo_backgrounds"):
            W.write_subject_images(subject, tmp_path / "wrong", n=5, seed=0, photo_backgrounds=wrong)


def test_pairwise_distance():
    scene = Scene("circle", "red", "blue")
    same = [W.render(scene)] * 3
    varied = [W.render(s, 32, i) for i, s in enumerate(W.sample_scenes(4, seed=0))]
    assert A.pairwise_distance(same) == 0.0
    assert A.pairwise_distance(same[:1]) == 0.0
    assert A.pairwise_distance(varied) > 0.1
    assert A.pairwise_distance(same, kind="feature") == 0.0
    assert 0.0 < A.pairwise_distance(varied, kind="feature") <= 1.0
    with pytest.raises(ValueError):
        A.pairwise_distance(same, kind="lpips")
