"""Micro-batches that mix subject and class-prior examples (default 1:1).

A micro-batch of a worker (``B`` = ``--train-batch-size``) is a ``MixedBatch``::

    latents    float32 [B + P, C, h, w]   rows 0..B-1: augmented subject photos, VAE-encoded (a fresh
                                          sample of the posterior each time) and scaled by
                                          ``vae.config.scaling_factor``;
                                          rows B..B+P-1: cached prior latents (already scaled)
    input_ids  int64   [B + P, L]         "a [V] [class]" for subject rows, "a [class]" for prior rows
    num_instance  int                     B; P is B with prior preservation, 0 without

where ``h = w = resolution / vae_scale_factor`` and ``L`` is the tokenizer's max length (77 for CLIP).
Prior rows come from this worker's ``PriorPool``, filled once from the prior cache
(``priors.read_prior_latents``: this rank's share of the seeds).

The VAE is frozen, so the posterior (mean, std) of one augmented view — photo, crop offset, flip —
never changes: ``BatchMaker`` encodes each view once and then only draws ``mean + std * ε``, which
is the same distribution ``latent_dist.sample()`` draws from, without a VAE forward per step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image

from dreambooth.subjects import SubjectImage


Crop = tuple[int, int, bool]
"""(left, top, flipped) of one augmented view of a photo."""


def draw_crop(image: Image.Image, resolution: int, rng: random.Random, center_crop: bool, random_flip: bool) -> Crop:
    """Where to crop the photo (after resizing its short side to ``resolution``) and whether to flip."""
    w, h = _resized_size(image, resolution)
    if center_crop:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left, top = rng.randint(0, w - resolution), rng.randint(0, h - resolution)
    return left, top, bool(random_flip and rng.random() < 0.5)


def _resized_size(image: Image.Image, resolution: int) -> tuple[int, int]:
    w, h = image.size
    scale = resolution / min(w, h)
    return max(resolution, round(w * scale)), max(resolution, round(h * scale))


def render_crop(image: Image.Image, resolution: int, crop: Crop) -> torch.Tensor:
    """float [3, R, R] in [-1, 1]: the photo resized, cropped at ``crop`` and maybe flipped."""
    left, top, flipped = crop
    image = image.resize(_resized_size(image, resolution), Image.BICUBIC)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flipped:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def augment(image: Image.Image, resolution: int, rng: random.Random, center_crop: bool, random_flip: bool) -> torch.Tensor:
    """Resize the short side to ``resolution``, crop a square, maybe flip; → float [3, R, R] in [-1, 1]."""
    return render_crop(image, resolution, draw_crop(image, resolution, rng, center_crop, random_flip))


def tokenize(tokenizer, prompt: str) -> torch.Tensor:
    """int64 [1, L]: a prompt padded/truncated to the tokenizer's max length, as at inference."""
    return tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


class PriorPool:
    """One worker's class-prior latents, held in memory and served in a new random order each epoch.

    Prior latents are small (4x64x64 float32 = 64 KiB each at 512 px), so a worker holds its share
    in memory and never re-reads the cache.

    ``latents``: float32 [P, C, h, w], already scaled by the VAE's ``scaling_factor``.
    ``next()``: float32 [batch_size, C, h, w]; an epoch that does not divide evenly continues into
    the next epoch's order, so every prior is used equally often.
    """

    def __init__(self, latents: torch.Tensor, batch_size: int, seed: int):
        if latents.shape[0] == 0:
            raise RuntimeError("this worker's prior dataset shard is empty; generate more class images")
        self.latents = latents.float()
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._order = torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def next(self) -> torch.Tensor:
        while self._order.numel() < self.batch_size:
            self._order = torch.cat([self._order, torch.randperm(len(self), generator=self.generator)])
        take, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        return self.latents[take]


@dataclass
class MixedBatch:
    latents: torch.Tensor
    input_ids: torch.Tensor
    num_instance: int


class BatchMaker:
    """Builds ``MixedBatch``es on one worker from the subject photos and the prior stream."""

    def __init__(
        self,
        images: list[SubjectImage],
        tokenizer,
        vae,
        instance_prompt: str,
        class_prompt: str,
        *,
        resolution: int,
        batch_size: int,
        center_crop: bool,
        random_flip: bool,
        seed: int,
        priors: Optional[PriorPool],
        device: torch.device,
    ):
        self.images = [img.to_pil() for img in images]
        self.vae = vae
        self.instance_ids = tokenize(tokenizer, instance_prompt)
        self.class_ids = tokenize(tokenizer, class_prompt)
        self.resolution, self.batch_size = resolution, batch_size
        self.center_crop, self.random_flip = center_crop, random_flip
        self.rng = random.Random(seed)
        self.noise = torch.Generator().manual_seed(seed)  # posterior samples
        self._posteriors: dict[tuple[int, Crop], tuple[torch.Tensor, torch.Tensor]] = {}
        self.priors = priors
        self.device = device

    MAX_CACHED_VIEWS = 1024
    """Views whose posterior is kept (2 x 64 KiB each at 512 px); photos far from square have
    many crop offsets, and views beyond the cap are encoded every time they are drawn."""

    def _posterior(self, index: int, crop: Crop) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) [C, h, w] of the VAE posterior of one view, encoded on first use."""
        key = (index, crop)
        cached = self._posteriors.get(key)
        if cached is not None:
            return cached
        pixels = render_crop(self.images[index], self.resolution, crop)[None]
        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        posterior = (dist.mean[0].float(), dist.std[0].float())
        if len(self._posteriors) < self.MAX_CACHED_VIEWS:
            self._posteriors[key] = posterior
        return posterior

    def next(self) -> MixedBatch:
        views = []
        for _ in range(self.batch_size):
            index = self.rng.randrange(len(self.images))
            views.append(self._posterior(index, draw_crop(self.images[index], self.resolution, self.rng,
                                                          self.center_crop, self.random_flip)))
        mean, std = torch.stack([m for m, _ in views]), torch.stack([s for _, s in views])
        noise = torch.randn(mean.shape, generator=self.noise).to(self.device)
        latents = [(mean + std * noise) * self.vae.config.scaling_factor]
        ids = [self.instance_ids.repeat(self.batch_size, 1)]
        if self.priors is not None:
            prior = self.priors.next().to(self.device)
            latents.append(prior)
            ids.append(self.class_ids.repeat(prior.shape[0], 1))
        return MixedBatch(torch.cat(latents), torch.cat(ids).to(self.device), self.batch_size)
