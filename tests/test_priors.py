"""Class priors on Ray Data: shard schema, manifest last, cache reuse, resume of missing seeds."""

import io

import pyarrow.parquet as pq
import pytest
from PIL import Image

from dreambooth import priors, storage

pytestmark = pytest.mark.ray


def _spec(tiny_model_path, **kw) -> priors.PriorSpec:
    base = dict(model="tiny", revision=None, prompt="a teapot", resolution=32, scheduler="DDPMScheduler",
                num_inference_steps=2, guidance_scale=3.0, first_seed=100)
    return priors.PriorSpec(**{**base, **kw})


def _rows(prior_set):
    tables = [pq.read_table(uri) for uri in prior_set.shard_uris]
    return [row for t in tables for row in t.to_pylist()]


def test_generate_reuse_and_resume(ray_cluster, tiny_model_path, tmp_path):
    root = str(tmp_path / "priors")
    spec = _spec(tiny_model_path)
    made = priors.generate(spec, tiny_model_path, root, 6, use_gpu=False, actors=2, batch_size=4)
    assert made.generated == 6 and made.seeds == list(range(100, 106))
    rows = _rows(made)
    assert sorted(r["seed"] for r in rows) == list(range(100, 106))  # every seed exactly once
    assert set(rows[0]) >= {"image", "prompt", "seed", "height", "width", "latents", "latent_shape"}
    row = rows[0]
    assert row["prompt"] == "a teapot" and (row["height"], row["width"]) == (32, 32)
    assert Image.open(io.BytesIO(row["image"])).size == (32, 32)
    assert row["latent_shape"] == [4, 16, 16] and len(row["latents"]) == 4 * 16 * 16
    manifest = priors.read_manifest(made.uri)
    assert manifest["seeds"] == made.seeds and manifest["spec"]["prompt"] == "a teapot"

    # A second subject of the same class and model reuses the cache: nothing is generated.
    again = priors.generate(spec, tiny_model_path, root, 6, use_gpu=False)
    assert again.generated == 0 and again.uri == made.uri
    # Fewer images are served from the same cache.
    assert priors.generate(spec, tiny_model_path, root, 3, use_gpu=False).generated == 0

    # Interrupted run: no manifest, one shard lost, one damaged → only the missing seeds are made.
    storage.remove(storage.join(made.uri, priors.MANIFEST))
    lost, damaged = made.shard_uris[0], made.shard_uris[1]
    lost_seeds = set(priors.committed_shards(made.uri)[lost])
    storage.remove(lost)
    with open(damaged, "r+b") as handle:
        handle.truncate(20)
    assert priors.lookup(spec, root, 6) is None  # without a manifest nothing counts as complete
    resumed = priors.generate(spec, tiny_model_path, root, 8, use_gpu=False, actors=1, batch_size=4)
    assert resumed.generated == 8 - (6 - len(lost_seeds) - 2)  # 2 = the damaged shard's seeds
    assert sorted(r["seed"] for r in _rows(resumed)) == list(range(100, 108))

    # The same seed gives the same image whatever batch it was generated in.
    first = {r["seed"]: r["latents"] for r in rows}
    later = {r["seed"]: r["latents"] for r in _rows(resumed)}
    for seed in lost_seeds:
        assert first[seed] == pytest.approx(later[seed], abs=1e-4)


def test_cache_key_changes_with_what_changes_images(tiny_model_path):
    spec = _spec(tiny_model_path)
    assert spec.key() == _spec(tiny_model_path).key()
    for change in ({"prompt": "a dog"}, {"resolution": 64}, {"num_inference_steps": 3}, {"guidance_scale": 1.0},
                   {"model": "other"}, {"first_seed": 0}, {"unconditional_share": 0.25}):
        assert _spec(tiny_model_path, **change).key() != spec.key()
    assert spec.cache_uri("root").startswith("root/a-teapot-")


def test_extra_prior_prompts_name_the_class_and_key_each_class_apart():
    """``{class_noun}`` in an extra prior prompt is filled per run, so one model recipe lists the class in
    other contexts and each class still gets (and shares) its own cache."""
    from dreambooth.config import RunConfig, validate

    def spec_for(noun: str) -> priors.PriorSpec:
        cfg = RunConfig()
        cfg.model, cfg.output, cfg.subject.instance_dir, cfg.subject.class_noun = "tiny", "/tmp/o", "/tmp/i", noun
        cfg.prior.extra_prior_prompts = ["a {class_noun} in the snow", "a red circle", "braces {{kept}}"]
        cfg.prior.extra_prior_share = 0.5
        return priors.spec_from_config(validate(cfg), "DDPMScheduler")

    dog, cat = spec_for("dog"), spec_for("cat")
    assert dog.extra_prompts == ("a dog in the snow", "a red circle", "braces {kept}")
    assert [dog.prompt_for(dog.first_seed + i) for i in range(4)] == [
        "a dog", "a dog in the snow", "a dog", "a red circle"]
    assert cat.extra_prompts[0] == "a cat in the snow" and cat.key() != dog.key()
    assert spec_for("dog").key() == dog.key()


def test_unconditional_priors_are_drawn_and_stored_with_the_empty_prompt(ray_cluster, tiny_model_path, tmp_path):
    """``--unconditional-prior-share``: the frozen model draws those seeds for "" (beside the class and
    extra prompts, in one batch) and the shard records "" as their prompt, which training reads back."""
    spec = _spec(tiny_model_path, extra_prompts=("a red circle",), extra_share=0.25, unconditional_share=0.25)
    made = priors.generate(spec, tiny_model_path, str(tmp_path / "priors"), 8, use_gpu=False, actors=1, batch_size=8)
    rows = sorted(_rows(made), key=lambda r: r["seed"])
    assert [r["prompt"] for r in rows] == [spec.prompt_for(r["seed"]) for r in rows]
    assert sum(r["prompt"] == "" for r in rows) == 2 and sum(r["prompt"] == "a red circle" for r in rows) == 2
    empty = next(r for r in rows if r["prompt"] == "")
    assert Image.open(io.BytesIO(empty["image"])).size == (32, 32) and len(empty["latents"]) == 4 * 16 * 16
