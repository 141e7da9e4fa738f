"""DINO / CLIP-I / CLIP-T (``dreambooth.evaluation.embedding``) and the DreamBench prompt lists.

The scorers run on tiny random ViT and CLIP models built here and saved into a temporary folder, so
nothing is downloaded: the tests check the arithmetic and the plumbing (loading, batching, prompt
handling, errors), not the quality of real DINO/CLIP embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dreambooth.config import ConfigError
from dreambooth.evaluation import dreambench as D
from dreambooth.evaluation.embedding import (DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL, EmbeddingScorer,
                                             mean_pairwise_cosine, strip_identifier)

IMAGE_SIZE = 32
DINO_HIDDEN = 32
CLIP_PROJECTION = 16


@dataclass
class TinyClip:
    folder: Path
    model: Any  # CLIPModel
    processor: Any  # CLIPProcessor


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory) -> Path:
    """A random ViT (32 px, 8 px patches, hidden 32, 2 layers) saved like a DINO checkpoint."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-dino")
    config = ViTConfig(image_size=IMAGE_SIZE, patch_size=8, hidden_size=DINO_HIDDEN, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=37)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> TinyClip:
    """A random CLIP (text and vision hidden 32, 2 layers, projection 16) with the real tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from dreambooth.models import CLIP_VOCAB_SIZE, load_clip_tokenizer

    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("tiny-clip")
    text = dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=37, num_attention_heads=2,
                num_hidden_layers=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407)
    vision = dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, intermediate_size=37,
                  num_attention_heads=2, num_hidden_layers=2)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=CLIP_PROJECTION)).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=load_clip_tokenizer())
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return TinyClip(folder, model, processor)


@pytest.fixture(scope="module")
def scorer(dino_dir, tiny_clip) -> EmbeddingScorer:
    return EmbeddingScorer(dino_model=str(dino_dir), clip_model=str(tiny_clip.folder))


def solid(rgb: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (48, 40), rgb)


def noise(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8))


def checker() -> Image.Image:
    return Image.fromarray((np.indices((40, 48)).sum(0) // 8 % 2 * 255).astype(np.uint8)).convert("RGB")


@pytest.mark.parametrize("metric", ["dino", "clip_i"])
def test_identical_images_score_one_and_beat_different_images(scorer, metric):
    score = getattr(scorer, metric)
    same = score([solid((220, 30, 30))], [solid((220, 30, 30))])
    different = score([solid((220, 30, 30))], [noise(0)])
    assert same == pytest.approx(1.0, abs=1e-5)
    assert different < same - 0.01


def test_scores_are_cosines_in_range(scorer):
    images = [solid((220, 30, 30)), noise(1), checker(), solid((10, 200, 90))]
    prompts = ["a red dog", "a photo of static", "a chessboard", "a green backpack on the beach"]
    for value in (scorer.dino(images[:2], images[2:]), scorer.clip_i(images[:2], images[2:]),
                  scorer.clip_t(images, prompts)):
        assert -1.0 <= value <= 1.0


def test_dino_averages_every_generated_real_pair(scorer):
    generated, references = [solid((220, 30, 30)), noise(2)], [checker(), noise(3), solid((0, 0, 255))]
    gen, ref = scorer.embed_dino(generated), scorer.embed_dino(references)
    assert gen.shape == (2, DINO_HIDDEN) and ref.shape == (3, DINO_HIDDEN)
    by_hand = np.mean([float(F.cosine_similarity(g, r, dim=0)) for g in gen for r in ref])
    assert scorer.dino(generated, references) == pytest.approx(by_hand, abs=1e-5)
    assert mean_pairwise_cosine(gen, ref) == pytest.approx(by_hand, abs=1e-5)


def test_dino_embedding_is_the_cls_token_of_the_last_hidden_state(scorer, dino_dir):
    from transformers import ViTImageProcessor, ViTModel

    images = [checker(), noise(7)]
    model = ViTModel.from_pretrained(dino_dir, add_pooling_layer=False).eval()
    with torch.no_grad():
        pixels = ViTImageProcessor.from_pretrained(dino_dir)(images=images, return_tensors="pt")["pixel_values"]
        cls = model(pixel_values=pixels).last_hidden_state[:, 0]
    assert torch.allclose(scorer.embed_dino(images), cls, atol=1e-5)


def test_embeddings_do_not_depend_on_batch_size(scorer, monkeypatch):
    images = [noise(seed) for seed in range(3)]
    full_dino, full_clip = scorer.embed_dino(images), scorer.embed_clip_images(images)
    texts = [f"a photo of {n} dogs" for n in range(3)]
    full_text = scorer.embed_clip_texts(texts)
    monkeypatch.setattr(scorer, "batch_size", 2)
    assert torch.allclose(scorer.embed_dino(images), full_dino, atol=1e-5)
    assert torch.allclose(scorer.embed_clip_images(images), full_clip, atol=1e-5)
    assert torch.allclose(scorer.embed_clip_texts(texts), full_text, atol=1e-5)


def test_clip_t_equals_cosine_computed_by_hand(scorer, tiny_clip):
    image, prompt = checker(), "a sks backpack on the beach"
    model, processor = tiny_clip.model, tiny_clip.processor
    with torch.no_grad():
        # Through the submodules, independent of what get_*_features returns in this transformers.
        pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
        image_embedding = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)[0]
        tokens = processor(text=[prompt], return_tensors="pt")
        text_embedding = model.text_projection(model.text_model(input_ids=tokens["input_ids"]).pooler_output)[0]
    by_hand = float(image_embedding @ text_embedding / (image_embedding.norm() * text_embedding.norm()))
    assert image_embedding.shape == (CLIP_PROJECTION,)
    assert scorer.clip_t([image], [prompt]) == pytest.approx(by_hand, abs=1e-5)


def test_clip_t_depends_on_the_prompt(scorer):
    image = solid((220, 30, 30))
    scores = {p: scorer.clip_t([image], [p]) for p in ("a dog", "a red backpack", "a teapot in the snow")}
    assert len({round(s, 6) for s in scores.values()}) == 3


def test_clip_t_scores_prompts_without_the_identifier(scorer):
    image = noise(4)
    stripped = scorer.clip_t([image], ["a sks dog on the beach"], identifier="sks")
    assert stripped == pytest.approx(scorer.clip_t([image], ["a dog on the beach"]), abs=1e-6)
    assert stripped != pytest.approx(scorer.clip_t([image], ["a sks dog on the beach"]), abs=1e-6)


def test_score_matches_the_single_metrics(scorer):
    generated, references = [noise(5), checker()], [solid((220, 30, 30)), noise(6)]
    prompts = ["a sks dog in the snow", "a sks dog in the jungle"]
    scores = scorer.score(generated, references, prompts, identifier="sks")
    assert scores.as_dict() == pytest.approx({
        "dino": scorer.dino(generated, references),
        "clip_i": scorer.clip_i(generated, references),
        "clip_t": scorer.clip_t(generated, prompts, identifier="sks"),
    }, abs=1e-6)


def test_bad_inputs_raise(scorer):
    with pytest.raises(ValueError, match="one prompt per generated image"):
        scorer.clip_t([noise(0), noise(1)], ["a dog"])
    with pytest.raises(ValueError, match="at least one image"):
        scorer.dino([], [noise(0)])
    with pytest.raises(TypeError, match="PIL images"):
        scorer.clip_i([np.zeros((8, 8, 3), np.uint8)], [noise(0)])


def test_scorer_accepts_a_path_and_skips_an_omitted_model(tiny_clip):
    clip_only = EmbeddingScorer(dino_model=None, clip_model=tiny_clip.folder)
    assert clip_only.clip_i([checker()], [checker()]) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(RuntimeError, match="without a DINO model"):
        clip_only.dino([checker()], [checker()])


def test_missing_model_folder_names_it_and_the_fix(tmp_path):
    missing = tmp_path / "no-such-dino"
    with pytest.raises(ConfigError, match="no such folder") as info:
        EmbeddingScorer(dino_model=missing, clip_model=None)
    assert str(missing) in str(info.value) and DEFAULT_DINO_MODEL in str(info.value)
    with pytest.raises(ConfigError, match="no config.json"):
        EmbeddingScorer(dino_model=None, clip_model=tmp_path)
    with pytest.raises(ConfigError, match="'org/name'"):
        EmbeddingScorer(dino_model=None, clip_model="clip")


def test_folder_without_its_processor_is_refused(tmp_path):
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(image_size=IMAGE_SIZE, patch_size=8, hidden_size=DINO_HIDDEN, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=37)
    ViTModel(config, add_pooling_layer=False).save_pretrained(tmp_path)  # no preprocessor_config.json
    with pytest.raises(ConfigError, match="cannot load it.*network and its processor"):
        EmbeddingScorer(dino_model=tmp_path, clip_model=None)


def test_wrong_architecture_is_refused(dino_dir, tiny_clip):
    # Loading would "work" with random weights and a warning; the scorer must refuse instead.
    with pytest.raises(ConfigError, match="'clip' checkpoint.*needs a 'vit'"):
        EmbeddingScorer(dino_model=tiny_clip.folder, clip_model=None)
    with pytest.raises(ConfigError, match=f"'vit' checkpoint.*{DEFAULT_CLIP_MODEL}"):
        EmbeddingScorer(dino_model=None, clip_model=dino_dir)


def test_unreachable_hub_id_says_to_pass_a_folder(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never touch the network
    hub_id = "dreambooth-tests/no-such-clip"
    with pytest.raises(ConfigError, match=f"'{hub_id}': cannot load it.*--local-dir DIR\\) and pass DIR"):
        EmbeddingScorer(dino_model=None, clip_model=hub_id)


@pytest.mark.parametrize("prompt, identifier, expected", [
    ("a sks dog on the beach", "sks", "a dog on the beach"),
    ("sks dog", "sks", "dog"),
    ("a red sks backpack, sks.", "sks", "a red backpack, ."),
    ("a dog who asks for sksx", "sks", "a dog who asks for sksx"),
    ("a  xyz  teapot", " xyz ", "a teapot"),
])
def test_strip_identifier(prompt, identifier, expected):
    assert strip_identifier(prompt, identifier) == expected


def test_strip_identifier_refuses_an_empty_identifier():
    with pytest.raises(ValueError):
        strip_identifier("a dog", " ")


def test_dreambench_classes():
    classes = D.dreambench_classes()
    assert len(classes) == 30
    assert classes["backpack_dog"] == "backpack" and classes["bear_plushie"] == "stuffed animal"
    live = sorted(name for name, noun in classes.items() if D.is_live_subject(noun))
    assert live == ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]


def test_is_live_subject():
    assert D.is_live_subject("dog") and D.is_live_subject(" Cat ")
    assert not D.is_live_subject("backpack") and not D.is_live_subject("stuffed animal")


@pytest.mark.parametrize("class_noun, live", [("dog", True), ("backpack", False)])
def test_dreambench_prompts(class_noun, live):
    prompts = D.dreambench_prompts("sks", class_noun, live=live)
    assert len(prompts) == 25 and len(set(prompts)) == 25
    assert all(f"sks {class_noun}" in p and "{" not in p for p in prompts)
    assert prompts[0] == f"a sks {class_noun} in the jungle"
    assert prompts[-1] == f"a cube shaped sks {class_noun}"
    assert ("a sks dog wearing a red hat" in prompts) is live
    assert (f"a sks {class_noun} with the Eiffel Tower in the background" in prompts) is not live
    assert D.dreambench_prompts("sks", class_noun) == prompts  # live=None follows is_live_subject


def test_dreambench_prompts_fill_placeholders_once():
    assert D.dreambench_prompts("{1}", "dog", live=False)[0] == "a {1} dog in the jungle"


def test_dreambench_data_ships_with_its_license():
    folder = resources.files("dreambooth") / "data" / "dreambench"
    for name in ("prompts_and_classes.txt", "LICENSE.md", "SOURCE.md"):
        assert (folder / name).is_file()
    assert "Attribution 4.0" in (folder / "LICENSE.md").read_text(encoding="utf-8")


def test_eval_command_scores_a_run_with_the_dreambench_suite(dino_dir, tiny_clip, tiny_model_path, dog_dir,
                                                             tmp_path, capsys):
    """``dreambooth eval --suite dreambench`` end to end on a finished run of the tiny model, with the
    tiny random ViT/CLIP standing in for DINO ViT-S/16 and CLIP: same code path as real models."""
    import json
    import shutil

    from dreambooth.cli import main

    run = tmp_path / "run"
    shutil.copytree(tiny_model_path, run)
    (run / "run.json").write_text(json.dumps({"identifier": "sks", "config": {
        "model": "tiny", "revision": None,
        "subject": {"identifier": "sks", "class_noun": "dog", "instance_dir": str(dog_dir)}}}))
    code = main(["eval", "--output", str(run), "--suite", "dreambench", "--dino-model", str(dino_dir),
                 "--clip-model", str(tiny_clip.folder), "--images-per-prompt", "2", "--steps", "2"])
    assert code == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["suite"] == "dreambench" and set(report["scores"]) == {"personalized", "base"}
    assert report["settings"]["guidance_scale"] == 7.5 and report["settings"]["lower_guidance_scale"] == 3.75
    for scores in report["scores"].values():
        assert set(scores) == {"dino", "clip_i", "clip_t", "pres_dino", "other_class_clip_t", "other_prompt_fidelity",
                               "dino_bare", "dino_bare_at_lower_guidance"}
        assert all(-1.0 <= v <= 1.0 for k, v in scores.items() if k != "other_prompt_fidelity")
    assert report["scores"]["base"]["other_prompt_fidelity"] == 1.0  # the ratio's reference
    assert report["scores"]["personalized"]["other_prompt_fidelity"] == pytest.approx(
        report["scores"]["personalized"]["other_class_clip_t"] / report["scores"]["base"]["other_class_clip_t"])
    out = capsys.readouterr().out
    assert "clip_t" in out  # the score table is printed
    # The "run" is the base model itself: its verdict says the subject was not learned and what to change.
    verdict = {finding["measure"]: finding["status"] for finding in report["verdict"]}
    assert verdict == {"dino": "miss", "clip_t": "ok", "pres_dino": "ok", "other_prompt_fidelity": "ok"}
    assert "verdict:" in out and "MISS  DINO" in out and "next:\n  learn more of the subject" in out
