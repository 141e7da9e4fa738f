"""``--background-swap``: plain backdrops repainted, the batches that draw the copies, the local loop's wiring."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth import pipeline
from dreambooth.config import build_config
from dreambooth.models import load_components
from dreambooth.shapes.world import SUBJECTS, write_subject_images
from dreambooth.subjects import (SubjectError, check_backdrops_swappable, instance_prompts, load_subject_images,
                                 training_examples)
from dreambooth.training import batches as batches_module
from dreambooth.training import local
from dreambooth.training.backgrounds import (BACKGROUND_FILLS, PLAIN_TOLERANCE, plain_backdrop, subject_alpha,
                                             swap_backdrop, unswappable)
from dreambooth.training.batches import BatchMaker, tokenize


@pytest.fixture
def star_dir(tmp_path) -> Path:
    """A shapes subject's 5 photos on plain backdrops, each with a caption naming its backdrop."""
    folder = tmp_path / "dotted_star"
    write_subject_images(SUBJECTS["dotted_star"], folder, n=5, captions=True)
    return folder


def test_the_subject_is_kept_exactly_its_rim_blended_and_only_the_backdrop_repainted():
    """A two-colour subject, one colour near the backdrop's, with a patch of the backdrop's own colour inside it
    and one anti-aliased column: only the backdrop and that rim change."""
    white, red, tan, navy = (245, 245, 245), (215, 35, 35), (200, 160, 120), (20, 20, 110)
    pixels = np.full((32, 32, 3), white, np.uint8)
    pixels[8:24, 8:16], pixels[8:24, 16:24] = red, tan  # tan is 85 from white: near, but not backdrop
    pixels[14:18, 18:22] = white  # the subject's own white patch, not reaching the border
    pixels[8:24, 7] = np.add(red, white) // 2  # half red, half white: an anti-aliased edge
    image = Image.fromarray(pixels)
    backdrop, _ = plain_backdrop(image)
    assert backdrop == white
    alpha = subject_alpha(image, backdrop)
    assert (alpha[8:24, 8:24] == 1).all()  # both colours and the inner white patch: all subject
    assert np.allclose(alpha[8:24, 7], 0.5, atol=0.02)
    assert alpha[:, :7].max() == 0 and alpha[:8].max() == 0 and alpha[24:].max() == 0
    out = np.asarray(swap_backdrop(image, backdrop, navy)).astype(int)
    assert (out[8:24, 8:24] == pixels[8:24, 8:24]).all()
    assert (out[:8] == navy).all() and (out[:, :7] == navy).all()
    assert np.allclose(out[8:24, 7], (np.add(red, navy)) / 2, atol=3)


def test_a_shapes_photo_keeps_every_subject_pixel_and_loses_every_backdrop_pixel(star_dir):
    for path in sorted(star_dir.glob("*.png")):
        image = Image.open(path).convert("RGB")
        backdrop, share = plain_backdrop(image)
        assert backdrop is not None and share == 1.0
        pixels = np.asarray(image).astype(int)
        far = np.abs(pixels - np.asarray(backdrop)).max(-1) > PLAIN_TOLERANCE
        alpha = subject_alpha(image, backdrop)
        assert 0.02 < far.mean() < 0.9 and (alpha[far] > 0).all() and (alpha[~far] < 1).all()
        for fill in BACKGROUND_FILLS[:4]:
            out = np.asarray(swap_backdrop(image, backdrop, fill)).astype(int)
            # the backdrop repainted, its own shading (faint edges within the tolerance) carried over
            assert np.abs(out[alpha == 0] - np.asarray(fill)).max() <= PLAIN_TOLERANCE
            assert (out[alpha == 1] == pixels[alpha == 1]).all() and (alpha == 1).sum() > 0.5 * far.sum()
            # edges blend into the new colour: nothing of the old backdrop is left, not even a fringe
            assert not (np.abs(out - np.asarray(backdrop)).max(-1) <= PLAIN_TOLERANCE).any()


def test_photos_that_are_not_on_a_plain_backdrop_are_named_and_refused(dog_dir, star_dir):
    dogs = load_subject_images(str(dog_dir), 32)
    named = unswappable([(image.name, image.to_pil()) for image in dogs])
    assert len(named) == len(dogs) and all("of its border within 24 of one colour" in line for line in named)
    assert unswappable([(p.name, Image.open(p)) for p in star_dir.glob("*.png")]) == []
    with pytest.raises(SubjectError, match=rf"{len(dogs)} photo\(s\) are not on one: 00.jpg \(\d+% .*--background-swap 0"):
        check_backdrops_swappable(dogs)
    check_backdrops_swappable(load_subject_images(str(star_dir), 32))  # plain: accepted


def _maker(parts, images, prompts, **swap) -> BatchMaker:
    return BatchMaker(images, parts, prompts, "a star", resolution=32, batch_size=2, center_crop=True,
                      random_flip=False, seed=3, priors=None, device=torch.device("cpu"), **swap)


def _drawn(maker: BatchMaker, steps: int) -> tuple[list, list[torch.Tensor]]:
    """(the (view, crop) of every subject row drawn, its input ids) over ``steps`` batches; a view is an
    example index, or (photo name, fill) for a repainted copy."""
    views, ids = [], []
    posterior = maker._posterior
    maker._posterior = lambda index, crop: views.append((index, crop)) or posterior(index, crop)
    for _ in range(steps):
        ids += list(maker.next().input_ids)
    return views, ids


def test_a_share_of_subject_rows_are_repainted_copies_on_the_bare_prompt(tiny_model_path, star_dir):
    """Captions name each photo's backdrop, so a repainted copy must not train on its photo's caption."""
    parts = load_components(tiny_model_path)
    images = load_subject_images(str(star_dir), 32)
    prompts = instance_prompts(images, "a sks star", "sks", "star")
    assert all("background" in p for p in prompts)
    maker = _maker(parts, images, prompts, background_swap=0.5, bare_prompt="a sks star")
    views, ids = _drawn(maker, 100)
    copies = [view for view, _ in views if isinstance(view, tuple)]
    assert 0.38 < len(copies) / len(views) < 0.62  # 200 rows at p = 0.5
    assert len(set(copies)) > 20  # many photo x fill copies, not one
    bare = tokenize(parts.tokenizer, "a sks star")[0]
    for (view, _), row in zip(views, ids):
        expected = bare if isinstance(view, tuple) else tokenize(parts.tokenizer, prompts[view])[0]
        assert torch.equal(row, expected)
    photos = {image.name: image.to_pil() for image in images}
    for name, fill in set(copies):
        photo = np.asarray(photos[name]).astype(int)
        copy = np.asarray(maker._view_image((name, fill))).astype(int)
        backdrop = plain_backdrop(photos[name])[0]
        assert plain_backdrop(maker._view_image((name, fill)))[0] == maker._repaintable[name].fills[fill] != backdrop
        interior = subject_alpha(photos[name], backdrop) == 1
        assert (copy[interior] == photo[interior]).all()


def test_repainting_leaves_the_photo_and_crop_sequence_alone_and_copies_each_photo_once(tiny_model_path, star_dir):
    parts = load_components(tiny_model_path)
    images = load_subject_images(str(star_dir), 32)
    plain, _ = _drawn(_maker(parts, images, "a sks star"), 20)
    off, _ = _drawn(_maker(parts, images, "a sks star", background_swap=0.0, bare_prompt="a sks star"), 20)
    assert plain == off and all(isinstance(view, int) for view, _ in off)
    # p > 0 draws the same photos and crops: only which of them are shown repainted is drawn apart
    examples, prompts = training_examples([dataclasses.replace(i, caption="a {identifier} {class_noun} here")
                                           for i in images], "a sks star", "sks", "star", bare_prompt_with_captions=True)
    doubled = _maker(parts, examples, prompts, background_swap=0.5, bare_prompt="a sks star")
    assert len(doubled._repaintable) == len(images)  # a photo listed twice is repainted once
    undoubled = _maker(parts, examples, prompts)
    swapped, _ = _drawn(doubled, 20)
    unswapped, _ = _drawn(undoubled, 20)
    names = [example.name for example in examples]
    as_photos = lambda drawn: [(view[0] if isinstance(view, tuple) else names[view], crop) for view, crop in drawn]
    assert as_photos(swapped) == as_photos(unswapped) and swapped != unswapped
    with pytest.raises(ValueError, match="needs the bare instance prompt"):
        _maker(parts, images, ["a sks star"] * 5, background_swap=0.5)


def test_the_local_loop_trains_on_swapped_copies_and_preflight_refuses_unplain_photos(
        tmp_path, star_dir, dog_dir, tiny_model_path, monkeypatch):
    def work(folder, **train):
        cfg = build_config(({"model": "tiny", "instance_dir": str(folder), "class_noun": "star", "resolution": 32,
                             "output": str(tmp_path / "out"), "identifier": "sks", "prior_loss_weight": 0,
                             "train_batch_size": 2, "num_sample_images": 0, "before_after": False,
                             "launcher": "in-process", "checkpointing_steps": 0, **train}, "test"))
        return pipeline.subject_work("subject", pipeline.preflight(cfg), None, use_gpu=False)

    with pytest.raises(SubjectError, match="not on one"):
        work(dog_dir, background_swap=0.5)
    drawn = []
    original = batches_module.BatchMaker._posterior
    monkeypatch.setattr(batches_module.BatchMaker, "_posterior",
                        lambda self, index, crop: drawn.append(index) or original(self, index, crop))
    swapping = work(star_dir, background_swap=0.5, max_train_steps=4)
    state = local.train_here([swapping], cuda=False, max_retries=0)["subject"]
    assert state.status == "succeeded", state.error
    assert len(drawn) == 8 and any(isinstance(view, tuple) for view in drawn)
    # photos that stopped being plain after preflight (a bulk run reads them again): that subject fails, alone
    for path in star_dir.glob("*.png"):
        noisy = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(noisy).save(path)
    state = local.train_here([dataclasses.replace(swapping, images=[])], cuda=False, max_retries=0)["subject"]
    assert state.status == "failed" and "not on one" in state.error
