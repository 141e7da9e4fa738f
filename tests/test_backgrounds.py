"""``--background-swap``: plain backdrops repainted, the batches that draw the copies, the local loop's wiring."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth import pipeline
from dreambooth.config import build_config
from dreambooth.models import load_components
from dreambooth.shapes.world import SUBJECTS, write_subject_images
from dreambooth.subjects import SubjectError, check_backdrops_swappable, instance_prompts, load_subject_images
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


def test_a_swapped_copy_keeps_the_subject_and_repaints_every_backdrop_pixel(star_dir):
    for path in sorted(star_dir.glob("*.png")):
        image = Image.open(path).convert("RGB")
        backdrop, share = plain_backdrop(image)
        assert backdrop is not None and share == 1.0
        pixels = np.asarray(image).astype(int)
        alpha = subject_alpha(image, backdrop)
        assert 0.02 < (alpha > 0).mean() < 0.9  # the subject is found, and it is not the whole frame
        for fill in BACKGROUND_FILLS[:4]:
            out = np.asarray(swap_backdrop(image, backdrop, fill)).astype(int)
            assert (out[alpha == 0] == fill).all()  # every backdrop pixel repainted
            assert (out[alpha == 1] == pixels[alpha == 1]).all()  # the subject untouched
            # edges blend into the new colour: nothing of the old backdrop is left, not even a fringe
            assert not (np.abs(out - np.asarray(backdrop)).max(-1) <= PLAIN_TOLERANCE).any()


def test_photos_that_are_not_on_a_plain_backdrop_are_named_and_refused(dog_dir, star_dir):
    dogs = load_subject_images(str(dog_dir), 32)
    named = unswappable([(image.name, image.to_pil()) for image in dogs])
    assert len(named) == len(dogs) and all("of its border one colour" in line for line in named)
    assert unswappable([(p.name, Image.open(p)) for p in star_dir.glob("*.png")]) == []
    with pytest.raises(SubjectError, match=rf"{len(dogs)} photo\(s\) are not on one: 00.jpg \(\d+% .*--background-swap 0"):
        check_backdrops_swappable(dogs)
    check_backdrops_swappable(load_subject_images(str(star_dir), 32))  # plain: accepted


def _maker(parts, images, prompts, **swap) -> BatchMaker:
    return BatchMaker(images, parts, prompts, "a star", resolution=32, batch_size=2, center_crop=True,
                      random_flip=False, seed=3, priors=None, device=torch.device("cpu"), **swap)


def _drawn(maker: BatchMaker, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """(the image index of every subject row drawn, its input ids) over ``steps`` batches."""
    indices, ids = [], []
    posterior = maker._posterior
    maker._posterior = lambda index, crop: indices.append(index) or posterior(index, crop)
    for _ in range(steps):
        ids += list(maker.next().input_ids)
    return indices, ids


def test_a_share_of_subject_rows_are_swapped_copies_on_the_bare_prompt(tiny_model_path, star_dir):
    """Captions name each photo's backdrop, so a repainted copy must not train on its photo's caption."""
    parts = load_components(tiny_model_path)
    images = load_subject_images(str(star_dir), 32)
    prompts = instance_prompts(images, "a sks star", "sks", "star")
    assert all("background" in p for p in prompts)
    maker = _maker(parts, images, prompts, background_swap=0.5, bare_prompt="a sks star")
    assert len(maker.images) == 5 * (1 + len(BACKGROUND_FILLS))
    indices, ids = _drawn(maker, 100)
    swapped = [i >= 5 for i in indices]
    assert 0.38 < np.mean(swapped) < 0.62  # 200 rows at p = 0.5
    bare = tokenize(parts.tokenizer, "a sks star")[0]
    for index, row in zip(indices, ids):
        expected = bare if index >= 5 else tokenize(parts.tokenizer, prompts[index])[0]
        assert torch.equal(row, expected)
    for copy in {i for i in indices if i >= 5}:  # photo i's copies follow the photos, one per fill, in order
        photo, fill = divmod(copy - 5, len(BACKGROUND_FILLS))
        expected = swap_backdrop(maker.images[photo], plain_backdrop(maker.images[photo])[0], BACKGROUND_FILLS[fill])
        assert np.array_equal(np.asarray(maker.images[copy]), np.asarray(expected))
    assert len({i for i in indices if i >= 5}) > 20  # many photo x fill copies, not one


def test_no_swap_draws_exactly_the_rows_it_drew_before_the_option(tiny_model_path, star_dir):
    parts = load_components(tiny_model_path)
    images = load_subject_images(str(star_dir), 32)
    plain, _ = _drawn(_maker(parts, images, "a sks star"), 20)
    off, _ = _drawn(_maker(parts, images, "a sks star", background_swap=0.0, bare_prompt="a sks star"), 20)
    assert plain == off and max(off) < 5
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
    original = batches_module.BatchMaker.next

    def spying_next(self):
        drawn.append((self.photos, len(self.images)))
        return original(self)

    monkeypatch.setattr(batches_module.BatchMaker, "next", spying_next)
    state = local.train_here([work(star_dir, background_swap=0.5, max_train_steps=3)], cuda=False,
                             max_retries=0)["subject"]
    assert state.status == "succeeded", state.error
    assert drawn == [(5, 5 * (1 + len(BACKGROUND_FILLS)))] * 3
