"""The paper's embedding metrics (Ruiz et al., DreamBooth, CVPR 2023, section 4.1) for real models.

Owns: loading the two scoring networks (hub id or local folder), embedding PIL images and prompts
with them, and the three scores:

- DINO: mean cosine similarity over every (generated, real) pair of ViT-S/16 DINO embeddings, the
  CLS token of the last hidden state (after the final layer norm). The paper's preferred subject
  fidelity measure: DINO is trained without labels to tell images apart, so it separates two
  subjects of one class, which CLIP-I, trained to match captions, largely does not.
- CLIP-I: the same mean over pairs, with CLIP image embeddings (``get_image_features``: pooled
  vision output through the visual projection).
- CLIP-T: mean cosine similarity between each generated image's CLIP image embedding and its own
  prompt's CLIP text embedding. Raw cosine, not CLIPScore's ``2.5 * max(cos, 0)``: the paper's
  reported values (about 0.30) are plain cosines.

CLIP backbone: the paper cites CLIP without naming a checkpoint. ``openai/clip-vit-base-patch32``
(ViT-B/32) is the default because it is the CLIP that most public DreamBench reproductions report
with; scores from different backbones are not comparable, so name the backbone with every number.

The identifier in CLIP-T: DreamBench prompts contain the rare token (``a sks dog on the beach``),
which means nothing to the original CLIP. The usual practice, followed here when ``identifier`` is
passed, is to score against the prompt with the identifier removed (``a dog on the beach``, see
``strip_identifier``); the paper does not spell this out.

All forward passes run batched under ``torch.no_grad()`` in float32 (also on GPUs: the metrics must
not depend on the device), and embeddings come back on the CPU.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.nn.functional as F
from PIL import Image

from dreambooth.config import ConfigError

DEFAULT_DINO_MODEL = "facebook/dino-vits16"
"""ViT-S/16 trained with DINO (Caron et al., 2021): the paper's DINO metric."""

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
"""CLIP ViT-B/32: the default backbone of CLIP-I and CLIP-T (the paper names none)."""

DEFAULT_BATCH_SIZE = 32

ModelSource = str | Path
T = TypeVar("T")


def strip_identifier(prompt: str, identifier: str) -> str:
    """The prompt with every whole-word occurrence of ``identifier`` removed, spaces collapsed.

    ``strip_identifier("a sks dog on the beach", "sks") == "a dog on the beach"``; ``sks`` inside a
    longer word (``asks``) is kept.
    """
    if not identifier.strip():
        raise ValueError("identifier must not be empty")
    without = re.sub(rf"(?<!\w){re.escape(identifier.strip())}(?!\w)", " ", prompt)
    return " ".join(without.split())


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean of cos(a_i, b_j) over all N x M pairs; ``a`` is (N, D), ``b`` is (M, D)."""
    return float((F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T).mean())


def mean_paired_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean of cos(a_i, b_i) over the N rows; ``a`` and ``b`` are both (N, D)."""
    if a.shape != b.shape:
        raise ValueError(f"paired embeddings must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).mean())


@dataclass(frozen=True)
class EmbeddingScores:
    """The paper's three scores for one set of generated images (each a cosine in [-1, 1])."""

    dino: float
    """Subject fidelity: mean DINO cosine over (generated, real) pairs."""

    clip_i: float
    """Subject fidelity: mean CLIP image-embedding cosine over (generated, real) pairs."""

    clip_t: float
    """Prompt fidelity: mean CLIP cosine of each generated image with its prompt."""

    def as_dict(self) -> dict[str, float]:
        """``{"dino": ..., "clip_i": ..., "clip_t": ...}``, e.g. for a JSON report."""
        return asdict(self)


def _batches(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _rgb(images: Sequence[Image.Image], what: str) -> list[Image.Image]:
    if len(images) == 0:
        raise ValueError(f"{what}: expected at least one image")
    bad = [type(image).__name__ for image in images if not isinstance(image, Image.Image)]
    if bad:
        raise TypeError(f"{what}: expected PIL images, got {', '.join(sorted(set(bad)))}")
    return [image.convert("RGB") for image in images]


def _features(output: Any) -> torch.Tensor:
    """The projected embeddings from ``get_image_features``/``get_text_features``.

    transformers 4 returns the (N, E) tensor; transformers 5 returns a ``BaseModelOutputWithPooling``
    whose ``pooler_output`` holds the projected (N, E) embeddings.
    """
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _scored_prompts(generated: Sequence[Image.Image], prompts: Sequence[str],
                    identifier: Optional[str]) -> list[str]:
    """The texts CLIP-T scores: one per generated image, the identifier removed when given."""
    if len(prompts) != len(generated):
        raise ValueError(f"CLIP-T needs one prompt per generated image, got {len(prompts)} prompts for "
                         f"{len(generated)} images")
    return [strip_identifier(p, identifier) for p in prompts] if identifier else list(prompts)


def _source(role: str, model: ModelSource, example: str) -> str:
    """A local folder (must hold ``config.json``) or an ``org/name`` hub id, else ConfigError."""
    text = str(model)
    local = Path(text).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ConfigError(
                f"{role} model {text!r}: the folder has no config.json; pass a folder written by "
                f"save_pretrained (model and its processor) or a hub id such as {example!r}"
            )
        return str(local)
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise ConfigError(
            f"{role} model {text!r}: no such folder; pass a folder written by save_pretrained (model and "
            f"its processor) or a hub id such as {example!r}"
        )
    if text.count("/") != 1:
        raise ConfigError(
            f"{role} model {text!r} is not an existing folder and not a hub id of the form 'org/name'; "
            f"pass a folder written by save_pretrained or a hub id such as {example!r}"
        )
    return text


def _cannot_load(role: str, source: str, exc: Exception) -> ConfigError:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if Path(source).exists():
        fix = "the folder must hold the network and its processor, both written by save_pretrained"
    else:
        fix = ("check the id, log in for gated models, or download it where there is network "
               f"(hf download {source} --local-dir DIR) and pass DIR")
    return ConfigError(f"{role} model {source!r}: cannot load it ({type(exc).__name__}: {first_line}); {fix}")


def _load(role: str, model: ModelSource, example: str, model_type: str,
          load: Callable[[str], tuple[torch.nn.Module, Any, list[str]]]) -> tuple[torch.nn.Module, Any]:
    """Resolve ``model``, check its architecture, and ``load`` it into (network, processor).

    ``load`` returns the network, its processor and the weights the checkpoint lacked. A checkpoint of
    another architecture loads with random weights and only a warning, which would give plausible but
    meaningless scores: hence the ``model_type`` check and missing weights being an error.
    """
    from transformers import AutoConfig

    source = _source(role, model, example)
    try:
        config_type = AutoConfig.from_pretrained(source).model_type
    except Exception as exc:  # offline, unknown repo, gated, ...: all mean "cannot use it"
        raise _cannot_load(role, source, exc) from None
    if config_type != model_type:
        raise ConfigError(
            f"{role} model {source!r} is a {config_type!r} checkpoint; the {role} score needs a "
            f"{model_type!r} one such as {example!r}"
        )
    try:
        network, processor, missing = load(source)
    except Exception as exc:  # e.g. no processor files next to the weights
        raise _cannot_load(role, source, exc) from None
    if missing:
        raise ConfigError(
            f"{role} model {source!r}: the checkpoint lacks {len(missing)} weights (e.g. {missing[0]}); "
            f"pass a complete {model_type!r} checkpoint such as {example!r}"
        )
    return network, processor


def _load_dino(source: str) -> tuple[torch.nn.Module, Any, list[str]]:
    from transformers import AutoImageProcessor, ViTModel

    # DINO checkpoints carry no classification pooler; the CLS token is read directly.
    network, info = ViTModel.from_pretrained(source, add_pooling_layer=False, output_loading_info=True)
    return network, AutoImageProcessor.from_pretrained(source), list(info["missing_keys"])


def _load_clip(source: str) -> tuple[torch.nn.Module, Any, list[str]]:
    from transformers import AutoProcessor, CLIPModel

    network, info = CLIPModel.from_pretrained(source, output_loading_info=True)
    return network, AutoProcessor.from_pretrained(source), list(info["missing_keys"])


class EmbeddingScorer:
    """DINO / CLIP-I / CLIP-T with the scoring networks loaded once, at construction.

    ``dino_model`` and ``clip_model`` are hub ids or local folders written by ``save_pretrained``
    (network plus processor); ``None`` skips that network, and the scores needing it then raise.
    Raises ConfigError naming the model and the fix when one cannot be loaded.
    """

    def __init__(
        self,
        dino_model: Optional[ModelSource] = DEFAULT_DINO_MODEL,
        clip_model: Optional[ModelSource] = DEFAULT_CLIP_MODEL,
        device: str | torch.device = "cpu",
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._dino: Optional[tuple[torch.nn.Module, Any]] = None
        self._clip: Optional[tuple[torch.nn.Module, Any]] = None
        if dino_model is not None:
            self._dino = self._ready(_load("DINO", dino_model, DEFAULT_DINO_MODEL, "vit", _load_dino))
        if clip_model is not None:
            self._clip = self._ready(_load("CLIP", clip_model, DEFAULT_CLIP_MODEL, "clip", _load_clip))

    def _ready(self, loaded: tuple[torch.nn.Module, Any]) -> tuple[torch.nn.Module, Any]:
        network, processor = loaded
        return network.to(self.device, dtype=torch.float32).eval(), processor

    def _need(self, loaded: Optional[tuple[torch.nn.Module, Any]], role: str) -> tuple[torch.nn.Module, Any]:
        if loaded is None:
            raise RuntimeError(f"this EmbeddingScorer was built without a {role} model")
        return loaded

    def _pixels(self, processor: Any, images: Sequence[Image.Image]) -> torch.Tensor:
        """(B, 3, H, W) float32 on the device, resized and normalized as the checkpoint expects."""
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, dtype=torch.float32)

    @torch.no_grad()
    def embed_dino(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) DINO embeddings: the CLS token of the ViT's last hidden state (D = 384 for ViT-S)."""
        network, processor = self._need(self._dino, "DINO")
        images = _rgb(images, "DINO")
        return torch.cat([
            network(pixel_values=self._pixels(processor, batch)).last_hidden_state[:, 0].float().cpu()
            for batch in _batches(images, self.batch_size)
        ])

    @torch.no_grad()
    def embed_clip_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, E) projected CLIP image embeddings (E = 512 for ViT-B/32)."""
        network, processor = self._need(self._clip, "CLIP")
        images = _rgb(images, "CLIP")
        return torch.cat([
            _features(network.get_image_features(pixel_values=self._pixels(processor, batch))).float().cpu()
            for batch in _batches(images, self.batch_size)
        ])

    @torch.no_grad()
    def embed_clip_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, E) projected CLIP text embeddings; texts longer than the text encoder allows are cut."""
        network, processor = self._need(self._clip, "CLIP")
        if len(texts) == 0:
            raise ValueError("CLIP: expected at least one text")
        max_length = network.config.text_config.max_position_embeddings
        chunks = []
        for batch in _batches(list(texts), self.batch_size):
            tokens = processor(text=list(batch), padding=True, truncation=True, max_length=max_length,
                               return_tensors="pt")
            chunks.append(_features(network.get_text_features(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
            )).float().cpu())
        return torch.cat(chunks)

    def dino(self, generated: Sequence[Image.Image], references: Sequence[Image.Image]) -> float:
        """DINO score: mean cosine over all (generated, real) pairs of DINO embeddings.

        Passing one set as both arguments includes its self pairs (cosine 1).
        """
        return mean_pairwise_cosine(self.embed_dino(generated), self.embed_dino(references))

    def clip_i(self, generated: Sequence[Image.Image], references: Sequence[Image.Image]) -> float:
        """CLIP-I score: mean cosine over all (generated, real) pairs of CLIP image embeddings."""
        return mean_pairwise_cosine(self.embed_clip_images(generated), self.embed_clip_images(references))

    def clip_t(self, generated: Sequence[Image.Image], prompts: Sequence[str],
               identifier: Optional[str] = None) -> float:
        """CLIP-T score: mean cosine of image i's and prompt i's CLIP embeddings.

        ``prompts[i]`` is the prompt that produced ``generated[i]``. With ``identifier``, it is
        removed from every prompt first (``strip_identifier``), the usual way to score DreamBench.
        """
        texts = _scored_prompts(generated, prompts, identifier)
        return mean_paired_cosine(self.embed_clip_images(generated), self.embed_clip_texts(texts))

    def score(self, generated: Sequence[Image.Image], references: Sequence[Image.Image],
              prompts: Sequence[str], identifier: Optional[str] = None) -> EmbeddingScores:
        """All three scores, embedding the generated images with CLIP once for CLIP-I and CLIP-T."""
        texts = _scored_prompts(generated, prompts, identifier)
        clip_generated = self.embed_clip_images(generated)
        return EmbeddingScores(
            dino=self.dino(generated, references),
            clip_i=mean_pairwise_cosine(clip_generated, self.embed_clip_images(references)),
            clip_t=mean_paired_cosine(clip_generated, self.embed_clip_texts(texts)),
        )
