"""Micro-batches that mix subject and class-prior examples (default 1:1).

A micro-batch of a worker (``B`` = ``--train-batch-size``) is a ``MixedBatch``::

    latents    float32 [B + P, C, h, w]   rows 0..B-1: augmented subject photos, VAE-encoded (a fresh
                                          sample of the posterior each time) and scaled by
                                          ``vae.config.scaling_factor``;
                                          rows B..B+P-1: cached prior latents (already scaled)
    conditions                            the model family's inputs (``families.base.Conditions``):
      input_ids  int64 [B + P, L]         for subject rows the photo's prompt ("a [V] [class]", or
                                          its caption: ``subjects.instance_prompts``; the bare prompt
                                          for a backdrop-swapped copy); for prior rows the prompt
                                          each prior was generated from ("a [class]" unless the
                                          pool carries prompts of its own)
                                          (SDXL: also ``input_ids_2`` from its second tokenizer)
      time_ids   float [B + P, 6]         SDXL only: (photo h, w; crop top, left; target h, w) of each
                                          subject view, (R, R, 0, 0, R, R) for prior rows
    num_instance  int                     B; P is B with prior preservation, 0 without

where ``h = w = resolution / vae_scale_factor`` (R = resolution) and ``L`` is the tokenizer's max
length (77 for CLIP).
With ``background_swap`` = p a subject row is, with probability p, a copy of the drawn photo with its
plain backdrop repainted (``training.backgrounds``).
Prior rows come from this worker's ``PriorPool``, filled once from the prior cache
(``priors.read_priors``: this rank's share of the seeds, with the prompt of each).

The VAE is frozen, so the posterior (mean, std) of one augmented view — photo, crop offset, flip —
never changes: ``BatchMaker`` encodes each view once and then only draws ``mean + std * ε``, which
is the same distribution ``latent_dist.sample()`` draws from, without a VAE forward per step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from dreambooth.families import SD, Components, Conditions
from dreambooth.subjects import SubjectImage
from dreambooth.training.backgrounds import Repaintable


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
    return SD.tokenize((tokenizer,), prompt)["input_ids"]


def crop_top_left(image: Image.Image, resolution: int, crop: Crop) -> tuple[int, int]:
    """(top, left) of a view's crop in the resized (and, if flipped, mirrored) photo: SDXL's crop condition."""
    left, top, flipped = crop
    width = _resized_size(image, resolution)[0]
    return top, (width - resolution - left) if flipped else left


class PriorPool:
    """One worker's class-prior latents, held in memory and served in a new random order each epoch.

    Prior latents are small (4x64x64 float32 = 64 KiB each at 512 px), so a worker holds its share
    in memory and never re-reads the cache.

    ``latents``: float32 [P, C, h, w], already scaled by the VAE's ``scaling_factor``.
    ``prompts``: the prompt each prior was generated from (P strings), or None when every prior
    was generated from the class prompt.
    ``next()``: float32 [batch_size, C, h, w]; an epoch that does not divide evenly continues into
    the next epoch's order, so every prior is used equally often. ``next_with_prompts()`` also
    returns the drawn priors' prompts (None without ``prompts``).
    """

    def __init__(self, latents: torch.Tensor, batch_size: int, seed: int, prompts: Optional[list[str]] = None):
        if latents.shape[0] == 0:
            raise RuntimeError("this worker's prior dataset shard is empty; generate more class images")
        if prompts is not None and len(prompts) != latents.shape[0]:
            raise ValueError(f"{len(prompts)} prior prompts for {latents.shape[0]} prior latents")
        self.latents = latents.float()
        self.prompts = prompts
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._order = torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def next(self) -> torch.Tensor:
        return self.next_with_prompts()[0]

    def next_with_prompts(self) -> tuple[torch.Tensor, Optional[list[str]]]:
        while self._order.numel() < self.batch_size:
            self._order = torch.cat([self._order, torch.randperm(len(self), generator=self.generator)])
        take, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        prompts = None if self.prompts is None else [self.prompts[i] for i in take.tolist()]
        return self.latents[take], prompts


@dataclass
class MixedBatch:
    """One micro-batch (shapes in the module docstring): subject rows first, then prior rows."""

    latents: torch.Tensor
    conditions: Conditions
    num_instance: int

    @property
    def input_ids(self) -> torch.Tensor:
        """int64 [B + P, L]: the first tokenizer's ids."""
        return self.conditions["input_ids"]


class BatchMaker:
    """Builds ``MixedBatch``es on one worker from the subject photos and the prior stream."""

    def __init__(
        self,
        images: list[SubjectImage],
        parts: Components,
        instance_prompt: str | Sequence[str],
        class_prompt: str,
        *,
        resolution: int,
        batch_size: int,
        center_crop: bool,
        random_flip: bool,
        seed: int,
        priors: Optional[PriorPool],
        device: torch.device,
        background_swap: float = 0.0,
        bare_prompt: Optional[str] = None,
    ):
        self.images = [img.to_pil() for img in images]
        self.vae = parts.vae
        self.family = parts.family
        self.parts = parts
        self.class_inputs = parts.prompt_inputs(class_prompt)
        self._prompt_inputs = {class_prompt: self.class_inputs}
        prompts = [instance_prompt] * len(images) if isinstance(instance_prompt, str) else list(instance_prompt)
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} instance prompts for {len(images)} photos")
        self.instance_inputs = [self._inputs_of(p) for p in prompts]  # one per photo
        square = (resolution, resolution)
        self.prior_sizes = self.family.size_conditions(square, (0, 0), square)  # generated at R x R, uncropped
        self.resolution, self.batch_size = resolution, batch_size
        self.center_crop, self.random_flip = center_crop, random_flip
        self.rng = random.Random(seed)
        self.noise = torch.Generator().manual_seed(seed)  # posterior samples
        self._posteriors: dict[tuple[int | tuple[str, int], Crop], tuple[torch.Tensor, torch.Tensor]] = {}
        self._cached_bytes = 0
        self.priors = priors
        self.device = device
        self.background_swap = background_swap
        self.swap_rng = random.Random(f"background-swap-{seed}")  # apart, so p = 0 leaves the draws as they were
        self._repaintable: dict[str, Repaintable] = {}  # by photo name: examples may list a photo twice
        self._names = [img.name for img in images]
        if background_swap > 0:
            if bare_prompt is None:
                raise ValueError("background_swap needs the bare instance prompt the swapped copies train on")
            self._bare_inputs = self._inputs_of(bare_prompt)  # a caption may name the backdrop a copy lost
            for name, image in zip(self._names, self.images):
                if name not in self._repaintable:  # at the size crops are cut from: full-size copies cost GBs
                    self._repaintable[name] = Repaintable.of(image.resize(_resized_size(image, resolution),
                                                                          Image.BICUBIC))

    MAX_CACHED_BYTES = 256 * 2**20
    """Device memory the kept posteriors may take (2 x 64 KiB a view at 512 px, 2 x 256 KiB at 1024 px):
    photos far from square have many crop offsets, and repainted copies multiply the views, so the
    cache is bounded in bytes; views beyond it are encoded every time they are drawn."""

    def _view_image(self, index: int | tuple[str, int]) -> Image.Image:
        """An example's photo, or (photo name, fill) → that photo repainted (built when its view is encoded)."""
        if isinstance(index, tuple):
            name, fill = index
            return self._repaintable[name].copy(fill)
        return self.images[index]

    def _posterior(self, index: int | tuple[str, int], crop: Crop) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) [C, h, w] of the VAE posterior of one view, encoded on first use."""
        key = (index, crop)
        cached = self._posteriors.get(key)
        if cached is not None:
            return cached
        pixels = render_crop(self._view_image(index), self.resolution, crop)[None]
        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        # a copy: the mean is a view into the encoder's output, which holds the log-variance beside it
        posterior = (dist.mean[0].to(torch.float32, copy=True), dist.std[0].float())
        size = sum(t.numel() * t.element_size() for t in posterior)
        if self._cached_bytes + size <= self.MAX_CACHED_BYTES:
            self._posteriors[key] = posterior
            self._cached_bytes += size
        return posterior

    def _inputs_of(self, prompt: str) -> Conditions:
        """A prompt's token ids, tokenized once (photos and priors share few distinct prompts)."""
        if prompt not in self._prompt_inputs:
            self._prompt_inputs[prompt] = self.parts.prompt_inputs(prompt)
        return self._prompt_inputs[prompt]

    def next(self) -> MixedBatch:
        views, subject_rows = [], []
        square = (self.resolution, self.resolution)
        for _ in range(self.batch_size):
            index = self.rng.randrange(len(self.images))
            image, view, inputs = self.images[index], index, self.instance_inputs[index]
            if self.background_swap and self.swap_rng.random() < self.background_swap:
                name = self._names[index]
                view = (name, self.swap_rng.randrange(len(self._repaintable[name].fills)))
                inputs = self._bare_inputs
            # a copy has the photo's resized size, so the photo's crop (and SDXL's size conditions) fit it
            crop = draw_crop(image, self.resolution, self.rng, self.center_crop, self.random_flip)
            views.append(self._posterior(view, crop))
            subject_rows.append(inputs | self.family.size_conditions(
                (image.height, image.width), crop_top_left(image, self.resolution, crop), square))
        mean, std = torch.stack([m for m, _ in views]), torch.stack([s for _, s in views])
        noise = torch.randn(mean.shape, generator=self.noise).to(self.device)
        latents = [(mean + std * noise) * self.vae.config.scaling_factor]
        rows = [_stacked(subject_rows)]
        if self.priors is not None:
            prior, prompts = self.priors.next_with_prompts()
            latents.append(prior.to(self.device))
            if prompts is None:
                rows.append(_rows(self.class_inputs | self.prior_sizes, prior.shape[0]))
            else:
                rows.append(_stacked([self._inputs_of(p) | self.prior_sizes for p in prompts]))
        conditions = {key: torch.cat([part[key] for part in rows]).to(self.device) for key in rows[0]}
        return MixedBatch(torch.cat(latents), conditions, self.batch_size)


def _rows(inputs: Conditions, count: int) -> Conditions:
    """Each [1, ...] tensor repeated to [count, ...]."""
    return {key: value.expand(count, *value.shape[1:]) for key, value in inputs.items()}


def _stacked(per_example: list[Conditions]) -> Conditions:
    """[1, ...] tensors of each example → [len, ...] per key (empty for families without size conditions)."""
    return {key: torch.cat([example[key] for example in per_example]) for key in per_example[0]} if per_example else {}
