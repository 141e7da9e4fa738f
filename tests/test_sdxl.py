"""SDXL as a model family: the built-in ``tiny-sdxl``, its conditioning against a hand construction
(both encoders' penultimate hidden states, the pooled projection, ``time_ids``) and against the
diffusers pipeline's own ``encode_prompt``/``_get_add_time_ids``, per-encoder freezing, and the
identifier rule for two tokenizers."""

from __future__ import annotations

import random

import pytest
import torch

from dreambooth import identifier as ident
from dreambooth.config import TrainConfig
from dreambooth.families import SD, SDXL, family_of
from dreambooth.models import load_components, resolve_model
from dreambooth.subjects import load_subject_images
from dreambooth.training.batches import BatchMaker, PriorPool
from dreambooth.training.module import DreamBoothModule

RES = 32


@pytest.fixture(scope="module")
def sdxl_path(model_cache) -> str:
    return resolve_model("tiny-sdxl")


@pytest.fixture(scope="module")
def parts(sdxl_path):
    return load_components(sdxl_path)


def test_tiny_sdxl_is_an_sdxl_folder_with_the_real_clip_tokenizer_twice(sdxl_path, tiny_model_path, parts):
    assert family_of(sdxl_path) is SDXL and family_of(tiny_model_path) is SD
    assert parts.family is SDXL and type(parts.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    for tokenizer in parts.tokenizers:
        assert len(tokenizer) == 49408 and tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
    unet = parts.unet.config
    assert unet.addition_embed_type == "text_time"
    assert unet.cross_attention_dim == parts.text_encoder.config.hidden_size + parts.text_encoder_2.config.hidden_size
    assert unet.projection_class_embeddings_input_dim == (
        6 * unet.addition_time_embed_dim + parts.text_encoder_2.config.projection_dim)


def _hand_time_ids(image, resolution: int) -> list[float]:
    """(orig h, orig w, crop top, crop left, target h, target w) of a centre crop, worked out by hand."""
    width, height = image.size
    scale = resolution / min(width, height)
    resized_w, resized_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    return [height, width, (resized_h - resolution) // 2, (resized_w - resolution) // 2, resolution, resolution]


def test_sdxl_batch_conditioning_matches_a_hand_construction_and_the_pipeline(parts, dog_dir):
    maker = BatchMaker(
        load_subject_images(str(dog_dir), RES), parts, "a sks dog", "a dog", resolution=RES, batch_size=2,
        center_crop=True, random_flip=False, seed=0,
        priors=PriorPool(torch.zeros(2, 4, 16, 16), batch_size=2, seed=0), device=torch.device("cpu"),
    )
    batch = maker.next()
    conditions = batch.conditions
    assert set(conditions) == {"input_ids", "input_ids_2", "time_ids"}
    assert conditions["input_ids"].shape == conditions["input_ids_2"].shape == (4, 77)
    assert conditions["time_ids"].shape == (4, 6)

    replay = random.Random(0)  # the maker's photo draws (centre crops draw nothing more)
    indices = [replay.randrange(len(maker.images)) for _ in range(2)]
    expected = [_hand_time_ids(maker.images[i], RES) for i in indices] + [[RES, RES, 0, 0, RES, RES]] * 2
    assert conditions["time_ids"].tolist() == expected
    assert any(row[0] != RES or row[1] != RES for row in expected[:2])  # the photos' own sizes, not R x R

    module = DreamBoothModule.from_components(parts).eval()
    with torch.no_grad():
        hidden, added = SDXL.condition(module, conditions)
        first = parts.text_encoder(conditions["input_ids"], output_hidden_states=True).hidden_states[-2]
        second = parts.text_encoder_2(conditions["input_ids_2"], output_hidden_states=True)
    width_1, width_2 = parts.text_encoder.config.hidden_size, parts.text_encoder_2.config.hidden_size
    assert hidden.shape == (4, 77, width_1 + width_2)
    assert torch.equal(hidden[..., :width_1], first) and torch.equal(hidden[..., width_1:], second.hidden_states[-2])
    assert added["text_embeds"].shape == (4, parts.text_encoder_2.config.projection_dim)
    assert torch.equal(added["text_embeds"], second.text_embeds)
    assert torch.equal(added["time_ids"], conditions["time_ids"])

    # What StableDiffusionXLPipeline computes at inference for the same prompt and sizes.
    pipe = parts.pipeline(parts.noise_scheduler)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt("a sks dog", device="cpu", do_classifier_free_guidance=False)
    assert torch.allclose(embeds[0], hidden[0], atol=1e-6) and torch.allclose(pooled[0], added["text_embeds"][0], atol=1e-6)
    height, width, top, left = expected[0][:4]
    pipe_ids = pipe._get_add_time_ids((height, width), (top, left), (RES, RES), torch.float32,
                                      text_encoder_projection_dim=parts.text_encoder_2.config.projection_dim)
    assert pipe_ids[0].tolist() == expected[0]


def test_unet_and_both_encoders_train_and_each_encoder_can_be_frozen(parts):
    def grads(trained: dict[str, bool]) -> dict[str, bool]:
        module = DreamBoothModule.from_components(parts, trained).train()
        module.zero_grad(set_to_none=True)
        conditions = parts.prompt_inputs("a sks dog") | SDXL.size_conditions((40, 50), (3, 4), (RES, RES))
        module(torch.randn(1, 4, 16, 16), torch.tensor([7]), conditions).pow(2).mean().backward()
        return {name: any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
                for name, part in module.parts().items()}

    assert grads({}) == {"unet": True, "text_encoder": True, "text_encoder_2": True}
    frozen = SDXL.trained_encoders(TrainConfig(train_text_encoder_2=False))
    assert frozen == {"text_encoder": True, "text_encoder_2": False}
    assert grads(frozen) == {"unet": True, "text_encoder": True, "text_encoder_2": False}
    assert SD.trained_encoders(TrainConfig(train_text_encoder=False)) == {"text_encoder": False}


class _SplittingTokenizer:
    """A second tokenizer that splits one chosen word into two pieces and keeps all else whole."""

    def __init__(self, base, split: str):
        self.base, self.split = base, split

    def __call__(self, text, add_special_tokens=True):
        ids = self.base(text, add_special_tokens=add_special_tokens).input_ids
        return type("Encoding", (), {"input_ids": ids + [0] if text == self.split else ids})()


def test_identifiers_are_one_token_in_both_tokenizers(parts):
    first = parts.tokenizer
    singles = ident.rare_token_candidates(first)
    assert ident.rare_token_candidates(first, parts.tokenizer_2) == singles  # the same BPE: nothing dropped
    splitter = _SplittingTokenizer(first, singles[0])
    assert ident.rare_token_candidates(first, splitter) == singles[1:]
    assert singles[0] not in ident.pick_identifiers(first, 20, seed=0, others=[splitter])
    warnings = ident.check_identifier(first, singles[0], splitter).warnings
    assert any("tokenizer 2" in w for w in warnings)
    assert not ident.check_identifier(first, singles[0], parts.tokenizer_2).warnings
