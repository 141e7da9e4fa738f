"""Loss, targets, batch composition and the DeepSpeed config, without Ray."""

import json
import random
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dreambooth.config import TrainConfig
from dreambooth.models import load_components
from dreambooth.subjects import instance_prompts, load_subject_images, training_examples
from dreambooth.training.batches import BatchMaker, PriorPool, augment, tokenize
from dreambooth.training.engine import deepspeed_config
from dreambooth.training.module import (DreamBoothModule, diffusion_target, dreambooth_loss, min_snr_weights,
                                        mixed_batch_loss)


def test_loss_matches_hand_computation():
    prediction = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 3.0], [1.0, 1.0]])
    target = torch.tensor([[0.0, 0.0], [0.0, 2.0], [1.0, 1.0], [1.0, 3.0]])
    # subject rows 0-1: squared errors 1, 4, 0, 4 → mean 2.25; prior rows 2-3: 4, 4, 0, 4 → mean 3.0
    parts = dreambooth_loss(prediction, target, num_instance=2, prior_loss_weight=0.5)
    assert parts.instance == pytest.approx(2.25)
    assert parts.prior == pytest.approx(3.0)
    assert parts.total.item() == pytest.approx(2.25 + 0.5 * 3.0)
    no_prior = dreambooth_loss(prediction[:2], target[:2], num_instance=2, prior_loss_weight=1.0)
    assert no_prior.total.item() == pytest.approx(2.25) and no_prior.prior == 0.0


def test_loss_weights_scale_each_row_within_its_half():
    prediction = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 3.0], [1.0, 1.0]])
    target = torch.tensor([[0.0, 0.0], [0.0, 2.0], [1.0, 1.0], [1.0, 3.0]])
    # per-row MSE 2.5, 2.0 | 4.0, 2.0; weights 1, 0.5 | 0.25, 1 → subject (2.5 + 1.0) / 2, prior (1.0 + 2.0) / 2
    parts = dreambooth_loss(prediction, target, 2, 0.5, weights=torch.tensor([1.0, 0.5, 0.25, 1.0]))
    assert parts.instance == pytest.approx(1.75) and parts.prior == pytest.approx(1.5)
    assert parts.total.item() == pytest.approx(1.75 + 0.5 * 1.5)
    unweighted = dreambooth_loss(prediction, target, 2, 0.5)
    assert dreambooth_loss(prediction, target, 2, 0.5, weights=torch.ones(4)).total.item() == pytest.approx(
        unweighted.total.item())


def test_min_snr_weights_cap_the_nearly_noise_free_timesteps(tiny_model_path):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(tiny_model_path, subfolder="scheduler")
    t = torch.arange(0, 1000, 37)
    snr = scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])
    low_noise, high_noise = snr > 5, snr <= 5
    assert low_noise.any() and high_noise.any()
    eps = min_snr_weights(scheduler, t, 5.0)  # ε-prediction: min(SNR, γ) / SNR
    assert torch.allclose(eps[high_noise], torch.ones(int(high_noise.sum())))
    assert torch.allclose(eps[low_noise], 5 / snr[low_noise], rtol=1e-4) and (eps[low_noise] < 1).all()
    assert (eps[:-1] <= eps[1:] + 1e-6).all()  # less noise, less weight
    v_scheduler = DDPMScheduler.from_config(scheduler.config, prediction_type="v_prediction")
    v = min_snr_weights(v_scheduler, t, 5.0)  # v-prediction: min(SNR, γ) / (SNR + 1), below 1 everywhere
    assert torch.allclose(v, torch.clamp(snr, max=5) / (snr + 1), rtol=1e-4) and (v < 1).all()


def test_snr_gamma_changes_the_loss_and_only_by_the_weights(tiny_model_path):
    from dreambooth.training.module import LossParts

    parts = load_components(tiny_model_path)
    module = DreamBoothModule.from_components(parts)
    latents = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    conditions = {"input_ids": tokenize(parts.tokenizer, ["a sks dog"] * 2 + ["a dog"] * 2)}

    def loss(gamma) -> LossParts:
        return mixed_batch_loss(module, parts.noise_scheduler, latents, conditions, 2, 1.0,
                                torch.Generator().manual_seed(3), snr_gamma=gamma)

    generator = torch.Generator().manual_seed(3)  # the timesteps mixed_batch_loss draws (after the noise)
    torch.randn(latents.shape, generator=generator)
    drawn = torch.randint(0, parts.noise_scheduler.config.num_train_timesteps, (4,), generator=generator)
    snr = parts.noise_scheduler.alphas_cumprod[drawn] / (1 - parts.noise_scheduler.alphas_cumprod[drawn])
    gamma = float(snr.min()) * 0.99  # caps every row's weight below 1
    plain, weighted = loss(None), loss(gamma)
    assert plain.total.item() == pytest.approx(loss(None).total.item())  # same generator, same draw
    assert weighted.total.item() < plain.total.item()
    assert parts.noise_scheduler.config.prediction_type == "epsilon"
    assert loss(1e9).total.item() == pytest.approx(plain.total.item(), rel=1e-5)  # a γ above every SNR caps nothing


def test_target_follows_prediction_type(tiny_model_path):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(tiny_model_path, subfolder="scheduler")
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    assert torch.equal(diffusion_target(scheduler, latents, noise, t), noise)
    v_scheduler = DDPMScheduler.from_config(scheduler.config, prediction_type="v_prediction")
    v = diffusion_target(v_scheduler, latents, noise, t)
    alpha = v_scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - v_scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(v, alpha * noise - sigma * latents, atol=1e-5)
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion_target(DDPMScheduler.from_config(scheduler.config, prediction_type="sample"), latents, noise, t)


def test_augment_shapes_range_and_flip(dog_dir):
    image = load_subject_images(str(dog_dir), 32)[0].to_pil()
    out = augment(image, 32, random.Random(0), center_crop=True, random_flip=False)
    assert out.shape == (3, 32, 32) and out.min() >= -1 and out.max() <= 1
    flips = {augment(image, 32, random.Random(s), True, True).flip(-1).equal(out) for s in range(20)}
    assert flips == {True, False}  # some draws flip, some don't


def test_batch_mixes_subject_and_prior_rows_with_their_prompts(tiny_model_path, dog_dir):
    parts = load_components(tiny_model_path)
    maker = BatchMaker(
        load_subject_images(str(dog_dir), 32), parts, "a sks dog", "a dog",
        resolution=32, batch_size=2, center_crop=False, random_flip=True, seed=0,
        priors=PriorPool(torch.full((2, 4, 16, 16), 7.0), batch_size=2, seed=0), device=torch.device("cpu"),
    )
    batch = maker.next()
    assert batch.num_instance == 2
    assert batch.latents.shape == (4, 4, 16, 16)
    assert torch.all(batch.latents[2:] == 7.0) and not torch.all(batch.latents[:2] == 7.0)
    sks, dog = tokenize(parts.tokenizer, "a sks dog")[0], tokenize(parts.tokenizer, "a dog")[0]
    assert batch.input_ids.shape == (4, 77)
    assert all(torch.equal(row, sks) for row in batch.input_ids[:2])
    assert all(torch.equal(row, dog) for row in batch.input_ids[2:])
    assert not torch.equal(sks, dog)


def test_subject_rows_are_trained_on_each_photos_own_caption(tiny_model_path, dog_dir):
    """Captions beside photos (``02.txt``): that photo's rows carry its caption, the others the instance prompt."""
    (dog_dir / "02.txt").write_text("a {identifier} {class_noun} on a red sofa\n")
    (dog_dir / "04.txt").write_text("a {identifier} {class_noun} in the snow")
    images = load_subject_images(str(dog_dir), 32)
    prompts = instance_prompts(images, "a sks dog", "sks", "dog")
    assert prompts == ["a sks dog", "a sks dog", "a sks dog on a red sofa", "a sks dog", "a sks dog in the snow"]
    parts = load_components(tiny_model_path)
    maker = BatchMaker(images, parts, prompts, "a dog", resolution=32, batch_size=2, center_crop=True,
                       random_flip=False, seed=0, priors=None, device=torch.device("cpu"))
    drawn = []
    posterior = maker._posterior
    maker._posterior = lambda index, crop: drawn.append(index) or posterior(index, crop)
    for _ in range(12):
        batch = maker.next()
        for index, ids in zip(drawn[-2:], batch.input_ids):
            assert torch.equal(ids, tokenize(parts.tokenizer, prompts[index])[0]), prompts[index]
    assert {2, 4} <= set(drawn) and set(drawn) - {2, 4}  # both kinds of rows were checked
    with pytest.raises(ValueError, match="4 instance prompts for 5 photos"):
        BatchMaker(images, parts, prompts[:4], "a dog", resolution=32, batch_size=2, center_crop=True,
                   random_flip=False, seed=0, priors=None, device=torch.device("cpu"))


def test_bare_prompt_with_captions_adds_each_captioned_photo_once_more_on_the_bare_prompt(dog_dir):
    (dog_dir / "02.txt").write_text("a {identifier} {class_noun} on a red sofa\n")
    images = load_subject_images(str(dog_dir), 32)
    alone, prompts = training_examples(images, "a sks dog", "sks", "dog")
    assert alone == images and prompts == instance_prompts(images, "a sks dog", "sks", "dog")
    examples, prompts = training_examples(images, "a sks dog", "sks", "dog", bare_prompt_with_captions=True)
    # Every photo twice, so each is still drawn 1/5 of the time; the captioned one on either prompt.
    assert [image.name for image in examples] == [image.name for image in images] * 2
    assert prompts.count("a sks dog on a red sofa") == 1 and prompts.count("a sks dog") == 9
    assert {prompts[2], prompts[7]} == {"a sks dog on a red sofa", "a sks dog"}
    (dog_dir / "02.txt").unlink()  # no caption at all: the photos as they are, nothing to pair
    uncaptioned = load_subject_images(str(dog_dir), 32)
    assert training_examples(uncaptioned, "a sks dog", "sks", "dog", bare_prompt_with_captions=True)[0] == uncaptioned


def test_prior_rows_are_trained_on_the_prompt_each_prior_was_generated_from(tiny_model_path, dog_dir):
    """Extra prior prompts (--extra-prior-prompts): a prior row's token ids are its own prompt's."""
    parts = load_components(tiny_model_path)
    prompts = ["a dog", "a red car", "a dog", "a cat on a sofa"]
    pool = PriorPool(_numbered_priors(4).expand(4, 4, 16, 16).clone(), batch_size=2, seed=1, prompts=prompts)
    maker = BatchMaker(
        load_subject_images(str(dog_dir), 32), parts, "a sks dog", "a dog", resolution=32, batch_size=2,
        center_crop=False, random_flip=False, seed=0, priors=pool, device=torch.device("cpu"),
    )
    seen = set()
    for _ in range(4):
        batch = maker.next()
        for latent, ids in zip(batch.latents[2:], batch.input_ids[2:]):
            prompt = prompts[int(latent[0, 0, 0])]
            assert torch.equal(ids, tokenize(parts.tokenizer, prompt)[0]), prompt
            seen.add(prompt)
    assert seen == set(prompts)
    with pytest.raises(ValueError, match="3 prior prompts for 4 prior latents"):
        PriorPool(_numbered_priors(4), batch_size=2, seed=1, prompts=prompts[:3])


def test_extra_prior_prompts_take_their_share_of_every_prefix_of_the_seeds():
    from dreambooth.priors import PriorSpec, prompt_at

    extras = ["a red car", "a cat", "a tree"]
    for share in (0.25, 0.5, 0.75):
        prompts = [prompt_at(i, "a dog", extras, share) for i in range(48)]
        for n in (4, 12, 48):  # a cache extended from n images keeps its first n prompts and their share
            assert sum(p != "a dog" for p in prompts[:n]) == int(n * share)
        assert [p for p in prompts if p != "a dog"][:6] == extras * 2  # cycled in order
    assert {prompt_at(i, "a dog", [], 0.5) for i in range(10)} == {"a dog"}

    plain = PriorSpec("tiny", None, "a dog", 32, "DDIMScheduler", 4, 7.5, 0)
    extra = PriorSpec("tiny", None, "a dog", 32, "DDIMScheduler", 4, 7.5, 0, tuple(extras), 0.5)
    assert plain.key() != extra.key() and plain.prompt_for(7) == "a dog"
    assert [extra.prompt_for(s) for s in range(4)] == ["a dog", "a red car", "a dog", "a cat"]
    legacy = {k: v for k, v in vars(plain).items() if k not in ("extra_prompts", "extra_share", "unconditional_share")}
    import hashlib
    import json
    assert plain.key() == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:16]  # old caches stay valid


def test_unconditional_priors_take_their_share_beside_the_extra_prompts():
    """The empty prompt gets its share of every prefix of the seeds, the extra prompts theirs, and a spec
    without unconditional priors keeps its key and every image's prompt."""
    from dreambooth.priors import PriorSpec, prompt_at

    extras = ["a red car", "a cat"]
    for extra_share, empty_share in ((0.25, 0.125), (0.2, 0.1), (0.0, 0.25)):
        prompts = [prompt_at(i, "a dog", extras, extra_share, empty_share) for i in range(144)]
        for n in (16, 48, 144):
            assert abs(sum(p == "" for p in prompts[:n]) - n * empty_share) <= 1
            assert abs(sum(p in extras for p in prompts[:n]) - n * extra_share) <= 1
        if extra_share:
            assert [p for p in prompts if p in extras][:4] == extras * 2  # still cycled in order
    with_extras = PriorSpec("tiny", None, "a dog", 32, "DDIMScheduler", 4, 7.5, 0, tuple(extras), 0.25)
    with_empty = PriorSpec("tiny", None, "a dog", 32, "DDIMScheduler", 4, 7.5, 0, tuple(extras), 0.25, 0.125)
    assert with_empty.key() != with_extras.key()
    assert "" in {with_empty.prompt_for(s) for s in range(16)}
    assert [with_extras.prompt_for(s) for s in range(16)] == [prompt_at(i, "a dog", extras, 0.25) for i in range(16)]
    import hashlib
    import json
    before = {k: v for k, v in vars(with_extras).items() if k != "unconditional_share"}
    before["extra_prompts"] = list(before["extra_prompts"])
    assert with_extras.key() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]


def _numbered_priors(count: int) -> torch.Tensor:
    """Prior latents [count, 1, 1, 1] that hold their own number."""
    return torch.arange(count, dtype=torch.float32).view(count, 1, 1, 1)


def test_prior_pool_uses_every_prior_equally_often_in_a_new_order_each_epoch():
    pool = PriorPool(_numbered_priors(6), batch_size=4, seed=3)
    assert len(pool) == 6
    drawn = torch.cat([pool.next() for _ in range(6)]).flatten().long().tolist()  # 24 draws = 4 epochs
    epochs = [drawn[i:i + 6] for i in range(0, 24, 6)]
    assert all(sorted(epoch) == list(range(6)) for epoch in epochs)  # no prior skipped or repeated
    assert len({tuple(epoch) for epoch in epochs}) > 1  # reshuffled between epochs
    again = PriorPool(_numbered_priors(6), batch_size=4, seed=3)
    assert torch.cat([again.next() for _ in range(6)]).flatten().long().tolist() == drawn  # seeded


def test_prior_pool_refuses_an_empty_shard():
    with pytest.raises(RuntimeError, match="generate more class images"):
        PriorPool(torch.empty(0, 4, 2, 2), batch_size=1, seed=0)


def test_module_trains_unet_and_text_encoder_unless_frozen(tiny_model_path):
    parts = load_components(tiny_model_path)
    module = DreamBoothModule(parts.unet, parts.text_encoder, train_text_encoder=True)
    ids = tokenize(parts.tokenizer, "a sks dog")
    out = module(torch.randn(1, 4, 16, 16), torch.tensor([5]), {"input_ids": ids})
    out.pow(2).mean().backward()
    assert parts.unet.conv_in.weight.grad is not None
    assert parts.text_encoder.get_input_embeddings().weight.grad is not None
    frozen = DreamBoothModule(parts.unet, parts.text_encoder, train_text_encoder=False)
    assert not any(p.requires_grad for p in frozen.text_encoder.parameters())


@pytest.mark.parametrize("stage,offload,precision,cuda", [(0, False, "no", False), (2, False, "bf16", True), (3, True, "fp16", False)])
def test_deepspeed_config(stage, offload, precision, cuda):
    train = TrainConfig(zero_stage=stage, offload_optimizer=offload, mixed_precision=precision,
                        train_batch_size=3, gradient_accumulation_steps=4, max_grad_norm=0.5)
    config = deepspeed_config(train, cuda=cuda)
    # flat gradient buffers fight GPU fragmentation; on CPU they are only an extra copy
    assert config["zero_optimization"]["contiguous_gradients"] == cuda
    assert config["zero_optimization"]["stage"] == stage
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_accumulation_steps"] == 4
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] == (precision == "bf16")
    assert config["fp16"]["enabled"] == (precision == "fp16")
    assert ("offload_optimizer" in config["zero_optimization"]) == offload
    assert ("optimizer" in config) == offload  # DeepSpeed's CPU Adam only when offloading


def test_attempt_log_coalesces_slow_writes_and_records_the_last_step(tmp_path, monkeypatch):
    from dreambooth import storage
    from dreambooth.training import checkpoint

    writes = []
    real_write = storage.write_json_atomic

    def slow_write(uri, obj):  # an object store's round trip
        time.sleep(0.02)
        writes.append(obj["step"])
        real_write(uri, obj)

    monkeypatch.setattr(storage, "write_json_atomic", slow_write)
    log = checkpoint.AttemptLog(str(tmp_path), start_step=10, claim_id="attempt-1")
    for step in range(11, 111):
        log.reached(step)
    log.close()
    assert writes[-1] == 110 and writes == sorted(writes)
    assert len(writes) < 100  # steps reached during a write are folded into the next one
    assert checkpoint.steps_run(str(tmp_path)) == (100, 1)


class _FilesEngine:
    """What ``checkpoint`` needs of a DeepSpeed engine: files per tag, and the client state back."""

    def __init__(self, payload: bytes = b"shard"):
        self.payload = payload

    def save_checkpoint(self, folder, tag, client_state):
        shard = Path(folder) / tag
        shard.mkdir(parents=True)
        for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                     "zero_pp_rank_1_mp_rank_00_optim_states.pt"):
            (shard / name).write_bytes(self.payload)
        torch.save(client_state, shard / "client_state.pt")

    def load_checkpoint(self, folder, tag):
        return folder, torch.load(Path(folder) / tag / "client_state.pt")


def test_a_checkpoint_missing_a_shard_is_not_resumed_from_and_is_pruned_later(tmp_path):
    from dreambooth.training import checkpoint

    out, engine = str(tmp_path), _FilesEngine()
    claim_id = checkpoint.claim(out)
    for step in (2, 4):
        checkpoint.save_resumable(engine, out, step, claim_id)
    assert checkpoint.complete_steps(out) == [2, 4]
    (step_4,) = (tmp_path / "checkpoints").glob("step-000004-*")
    (step_4 / "zero" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert checkpoint.complete_steps(out) == [2]  # progress.json is there, a shard it lists is not
    assert checkpoint.restore(engine, out) == 2
    for step in (6, 8):
        checkpoint.save_resumable(engine, out, step, claim_id)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert kept == [checkpoint.step_dir_name(step, claim_id) for step in (6, 8)]


def test_a_save_whose_claim_is_taken_during_the_upload_neither_completes_nor_prunes_and_stops(tmp_path, monkeypatch):
    from dreambooth import storage
    from dreambooth.training import checkpoint

    out, engine = str(tmp_path), _FilesEngine()
    older = checkpoint.claim(out)
    for step in (2, 4):
        checkpoint.save_resumable(engine, out, step, older)
    upload = storage.upload_dir

    def newer_claims_mid_upload(local_dir, uri):
        upload(local_dir, uri)
        checkpoint.claim(out)

    monkeypatch.setattr(storage, "upload_dir", newer_claims_mid_upload)
    with pytest.raises(checkpoint.OutputTakenOver, match="before completing step-000006"):
        checkpoint.save_resumable(engine, out, 6, older)
    assert checkpoint.complete_steps(out) == [2, 4]  # step 6 unmarked, step 2 not pruned
    monkeypatch.setattr(storage, "upload_dir", upload)
    with pytest.raises(checkpoint.OutputTakenOver, match="another run started training into"):
        checkpoint.save_resumable(engine, out, 8, older)
    assert not list((tmp_path / "checkpoints").glob("step-000008*"))


def test_an_older_attempts_last_upload_lands_in_its_own_folder_never_in_the_newer_runs(tmp_path, monkeypatch):
    """The older attempt's claim check passed just before the newer run claimed the output: its
    upload of step 4 still happens, but into a folder named after its claim, which it cannot mark
    complete; the newer run's step 4 holds only the newer run's files and is the one resumed."""
    from dreambooth.training import checkpoint

    out = str(tmp_path)
    older_engine, newer_engine = _FilesEngine(b"older"), _FilesEngine(b"newer")
    older = checkpoint.claim(out)
    checkpoint.save_resumable(older_engine, out, 2, older)
    newer = checkpoint.claim(out)
    checkpoint.save_resumable(newer_engine, out, 4, newer)
    check = checkpoint.check_claim
    monkeypatch.setattr(checkpoint, "check_claim", lambda *args, **kwargs: None)  # checked before the claim
    with pytest.raises(checkpoint.OutputTakenOver, match="before completing step-000004"):
        checkpoint.save_resumable(older_engine, out, 4, older)
    monkeypatch.setattr(checkpoint, "check_claim", check)

    folders = {p.name: p for p in (tmp_path / "checkpoints").glob("step-000004-*")}
    assert set(folders) == {checkpoint.step_dir_name(4, newer), checkpoint.step_dir_name(4, older)}
    newers = [f for f in folders[checkpoint.step_dir_name(4, newer)].rglob("*.pt") if "rank" in f.name]
    assert newers and {f.read_bytes() for f in newers} == {b"newer"}
    assert not (folders[checkpoint.step_dir_name(4, older)] / checkpoint.PROGRESS).exists()
    assert checkpoint.complete_steps(out) == [2, 4] and checkpoint.restore(newer_engine, out) == 4


def test_of_two_complete_folders_of_one_step_the_later_saved_is_resumed_and_pruning_keeps_two_steps(tmp_path):
    """Two attempts completed step 2 (a claim taken in the milliseconds between a check and the mark):
    the later saved is resumed, not the one whose random claim sorts last; pruning counts steps."""
    from dreambooth.training import checkpoint

    out, writer = str(tmp_path), tmp_path / "checkpoints" / checkpoint.WRITER
    saved_first, saved_later = "f" * 32, "0" * 32  # name order and save order disagree
    for claim_id in (saved_first, saved_later):
        writer.parent.mkdir(exist_ok=True)
        writer.write_text(json.dumps({"claim_id": claim_id}))
        checkpoint.save_resumable(_FilesEngine(), out, 2, claim_id)
        time.sleep(0.01)
    assert checkpoint.complete_steps(out) == [2, 2]
    assert checkpoint.unfinished(out).name == checkpoint.step_dir_name(2, saved_later)
    for step in (4, 6):
        checkpoint.save_resumable(_FilesEngine(), out, step, saved_later)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert kept == [checkpoint.step_dir_name(step, saved_later) for step in (4, 6)]


def test_a_checkpoint_written_before_step_folders_carried_a_claim_is_still_resumed(tmp_path):
    from dreambooth.training import checkpoint

    out, engine = str(tmp_path), _FilesEngine()
    claim_id = checkpoint.claim(out)
    checkpoint.save_resumable(engine, out, 6, claim_id)
    (folder,) = (tmp_path / "checkpoints").glob("step-000006-*")
    folder.rename(folder.with_name("step-000006"))  # the name older versions wrote
    assert checkpoint.complete_steps(out) == [6] and checkpoint.restore(engine, out) == 6


def test_resuming_needs_the_settings_the_checkpoint_was_trained_with_but_not_the_same_step_count(tmp_path, monkeypatch):
    from dreambooth.config import ConfigError, build_config
    from dreambooth.training import checkpoint

    out, engine = str(tmp_path), _FilesEngine()

    def config(**changes):
        return build_config(({"model": "tiny", "class_noun": "dog", "identifier": "sks", "resolution": 32,
                              "output": out, **changes}, "test"))

    def check(cfg):
        checkpoint.check_resumable(cfg, checkpoint.unfinished(out))

    check(config())  # nothing to resume: nothing to compare
    checkpoint.save_resumable(engine, out, 2, checkpoint.claim(out), checkpoint.trained_settings(config(workers=2)))
    check(config(workers=2, max_train_steps=800, checkpointing_steps=50, log_every=1))  # longer, logged more often
    with pytest.raises(ConfigError, match=r"\(step 2\) trained with other settings: class_noun 'dog' there, 'cat' "
                                          r"now; workers 2 there, 1 now\. Run it again .* --overwrite for `dreambooth run`"):
        check(config(class_noun="cat"))
    with pytest.raises(ConfigError, match=r"\(step 2\), already at or past --max-train-steps 2\. Run it again"):
        check(config(workers=2, max_train_steps=2))  # the checkpoint trained further than this run would
    linear = config(workers=2, lr_scheduler="linear")
    checkpoint.save_resumable(engine, out, 4, checkpoint.claim(out), checkpoint.trained_settings(linear))
    with pytest.raises(ConfigError, match="max_train_steps 400 there, 800 now"):  # a schedule shaped by the steps
        check(config(workers=2, lr_scheduler="linear", max_train_steps=800))

    newer_version = checkpoint.trained_settings(config(workers=2, lr_scheduler="linear")) | {"noise_offset": 0.1}
    checkpoint.save_resumable(engine, out, 6, checkpoint.claim(out), newer_version)
    check(config(workers=2, lr_scheduler="linear"))  # a setting only one version knows is not compared

    # Runs before 2026-12-06 recorded a local model folder as typed; now preflight makes it absolute.
    monkeypatch.chdir(tmp_path)
    typed = str(tmp_path / "typed")
    checkpoint.save_resumable(engine, typed, 2, checkpoint.claim(typed),
                              checkpoint.trained_settings(config(output=typed, model="models/sd")))
    checkpoint.check_resumable(config(output=typed, model=str(tmp_path / "models" / "sd")), checkpoint.unfinished(typed))
    with pytest.raises(ConfigError, match="model 'models/sd' there, '/elsewhere/sd' now"):
        checkpoint.check_resumable(config(output=typed, model="/elsewhere/sd"), checkpoint.unfinished(typed))

    unrecorded = str(tmp_path / "older-version")  # progress.json without settings: resumed as before
    checkpoint.save_resumable(engine, unrecorded, 2, checkpoint.claim(unrecorded))
    checkpoint.check_resumable(config(output=unrecorded, learning_rate=1e-3), checkpoint.unfinished(unrecorded))


def test_a_claim_that_cannot_be_read_is_a_retryable_error_not_a_takeover(tmp_path, monkeypatch):
    from dreambooth import storage
    from dreambooth.training import checkpoint

    out = str(tmp_path)
    claim_id = checkpoint.claim(out)
    checkpoint.check_claim(out, claim_id)  # held: no error

    def timeout(uri):
        raise TimeoutError("read timed out")

    monkeypatch.setattr(storage, "read_json", timeout)
    with pytest.raises(OSError, match="could not read the claim on .*TimeoutError: read timed out"):
        checkpoint.check_claim(out, claim_id)
    monkeypatch.undo()
    (tmp_path / "checkpoints" / checkpoint.WRITER).unlink()  # what --overwrite does to an older run's output
    with pytest.raises(checkpoint.OutputTakenOver):
        checkpoint.check_claim(out, claim_id)


def test_subject_latents_sample_the_cached_posterior_of_each_view(tiny_model_path, dog_dir):
    """The VAE is frozen: each (photo, crop, flip) view is encoded once, and every draw is a fresh
    sample mean + std * eps of exactly the posterior the VAE gives that view."""
    from dreambooth.training.batches import draw_crop, render_crop

    parts = load_components(tiny_model_path)
    images = load_subject_images(str(dog_dir), 32)
    encodes = []
    real_encode = parts.vae.encode
    parts.vae.encode = lambda pixels: encodes.append(pixels.shape[0]) or real_encode(pixels)
    maker = BatchMaker(images, parts, "a sks dog", "a dog", resolution=32, batch_size=2,
                       center_crop=True, random_flip=True, seed=0, priors=None, device=torch.device("cpu"))
    batches = [maker.next() for _ in range(40)]
    views = len(maker._posteriors)
    assert len(encodes) == views <= 2 * len(images)  # 80 examples, one encode per distinct view
    assert not torch.equal(batches[0].latents, batches[1].latents)

    replay = random.Random(0)  # the maker's draws, replayed: the first example's view
    index = replay.randrange(len(images))
    crop = draw_crop(maker.images[index], 32, replay, True, True)
    with torch.no_grad():
        dist = real_encode(render_crop(maker.images[index], 32, crop)[None]).latent_dist
    mean, std = maker._posteriors[(index, crop)]
    assert torch.allclose(mean, dist.mean[0], atol=1e-6) and torch.allclose(std, dist.std[0], atol=1e-6)
    eps = (batches[0].latents[0] / parts.vae.config.scaling_factor - mean) / std
    assert abs(eps.mean()) < 0.5 and 0.5 < eps.std() < 1.5  # a standard normal draw, not the mean


def test_the_posterior_cache_stays_within_its_byte_budget_and_encodes_the_rest_each_draw(
        tiny_model_path, dog_dir, monkeypatch):
    """Views past the cache's byte budget are encoded on every draw rather than kept (photos far from
    square, or repainted copies, have more views than a device should hold)."""
    parts = load_components(tiny_model_path)
    images = load_subject_images(str(dog_dir), 32)
    encodes = []
    real_encode = parts.vae.encode
    parts.vae.encode = lambda pixels: encodes.append(pixels.shape[0]) or real_encode(pixels)
    side = 32 // 2 ** (len(parts.vae.config.block_out_channels) - 1)  # the latents of a 32 px photo
    view_bytes = 2 * parts.vae.config.latent_channels * side * side * 4  # mean and std, float32
    monkeypatch.setattr(BatchMaker, "MAX_CACHED_BYTES", 2 * view_bytes)
    maker = BatchMaker(images, parts, "a sks dog", "a dog", resolution=32, batch_size=2,
                       center_crop=True, random_flip=True, seed=0, priors=None, device=torch.device("cpu"))
    for _ in range(40):
        maker.next()
    assert len(maker._posteriors) == 2 and maker._cached_bytes == 2 * view_bytes
    assert len(encodes) > 2 * len(images)  # 80 draws of up to 2 views per photo: the uncached are re-encoded


def test_each_rank_reads_its_own_share_of_the_prior_cache(tmp_path):
    from dreambooth.priors import PriorSet, read_prior_latents, read_priors

    uris = []
    for part, seeds in enumerate(([0, 1, 2], [3, 4])):
        table = pa.table({"seed": seeds, "latents": [[float(s)] * 4 for s in seeds], "prompt": [f"p{s}" for s in seeds],
                          "latent_shape": [[1, 2, 2]] * len(seeds), "image": [b""] * len(seeds)})
        uris.append(str(tmp_path / f"part-{part}.parquet"))
        pq.write_table(table, uris[-1])
    prior_set = PriorSet(str(tmp_path), uris, seeds=[0, 1, 2, 3], generated=0, seconds=0.0)  # seed 4: not asked for
    shares = [read_prior_latents(prior_set, rank, 2) for rank in range(2)]
    assert [s[:, 0, 0, 0].tolist() for s in shares] == [[0.0, 2.0], [1.0, 3.0]]
    assert shares[0].shape == (2, 1, 2, 2)
    latents, prompts = read_priors(prior_set, 1, 2)
    assert latents[:, 0, 0, 0].tolist() == [1.0, 3.0] and prompts == ["p1", "p3"]  # each latent with its prompt
    with pytest.raises(RuntimeError, match="--num-class-images"):
        read_prior_latents(PriorSet(str(tmp_path), uris, seeds=[0], generated=0, seconds=0.0), 1, 2)


def test_one_rank_does_not_build_the_shared_memory_comm_op(monkeypatch):
    import deepspeed.ops
    from deepspeed.comm.torch import build_shm_op
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    from dreambooth.training.engine import skip_shared_memory_comm_for_one_rank

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, ShareMemCommBuilder.NAME, True)
    assert skip_shared_memory_comm_for_one_rank(2) is False  # peers on one node all-reduce through it
    assert deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] is True
    assert skip_shared_memory_comm_for_one_rank(1) is True
    assert build_shm_op() is None  # what deepspeed.initialize calls: no JIT build, no load


@pytest.mark.parametrize("workers,stage,offload,expected", [
    (1, 2, False, 0), (1, 3, False, 0),  # one rank partitions nothing: no ZeRO hooks in its steps
    (1, 2, True, 2),  # ZeRO-Offload on one device is what stage >= 1 is for there
    (2, 2, False, 2), (2, 3, False, 3), (4, 1, False, 1),
])
def test_one_rank_trains_at_stage_zero_unless_it_offloads(workers, stage, offload, expected):
    from dreambooth.training.engine import effective_zero_stage

    train = TrainConfig(zero_stage=stage, offload_optimizer=offload, workers=workers)
    assert effective_zero_stage(train, workers) == expected
    assert deepspeed_config(train, cuda=False, world_size=workers)["zero_optimization"]["stage"] == expected


def test_text_encoder_learning_rate_moves_the_encoder_slower_or_not_at_all(tiny_model_path, dog_dir):
    from dreambooth.training.engine import parameter_groups
    from dreambooth.training.inprocess import FinetuneSettings, finetune

    parts = load_components(tiny_model_path)
    module = DreamBoothModule(parts.unet, parts.text_encoder)
    assert len(parameter_groups(module, 1e-4, None)) == 1
    unet_group, encoder_group = parameter_groups(module, 1e-4, 1e-6)
    assert (unet_group["lr"], encoder_group["lr"]) == (1e-4, 1e-6)
    assert len(encoder_group["params"]) == len(list(parts.text_encoder.parameters()))
    assert len(unet_group["params"]) == len(list(parts.unet.parameters()))

    images = load_subject_images(str(dog_dir), 32)
    unet_before = {k: v.clone() for k, v in parts.unet.state_dict().items()}
    encoder_before = {k: v.clone() for k, v in parts.text_encoder.state_dict().items()}
    finetune(parts, images, FinetuneSettings("a sks dog", "a dog", max_train_steps=2, learning_rate=1e-3,
                                             text_encoder_learning_rate=0.0, prior_loss_weight=0.0))
    assert any(not torch.equal(unet_before[k], v) for k, v in parts.unet.state_dict().items())
    assert all(torch.equal(encoder_before[k], v) for k, v in parts.text_encoder.state_dict().items())


def test_text_encoder_steps_stop_the_encoder_after_that_many_steps(tiny_model_path, dog_dir):
    from dreambooth.training.inprocess import FinetuneSettings, finetune

    images = load_subject_images(str(dog_dir), 32)
    settings = dict(max_train_steps=3, learning_rate=1e-3, prior_loss_weight=0.0)
    after_one = load_components(tiny_model_path)
    finetune(after_one, images, FinetuneSettings("a sks dog", "a dog", **settings | {"max_train_steps": 1}))
    limited = load_components(tiny_model_path)
    finetune(limited, images, FinetuneSettings("a sks dog", "a dog", text_encoder_steps=1, **settings))
    assert all(torch.equal(after_one.text_encoder.state_dict()[k], v)
               for k, v in limited.text_encoder.state_dict().items())
    assert any(not torch.equal(after_one.unet.state_dict()[k], v) for k, v in limited.unet.state_dict().items())


def test_in_process_fine_tune_follows_the_lr_schedule_and_the_prior_examples_per_photo(tiny_model_path, dog_dir,
                                                                                       monkeypatch):
    """The recipe study's levers: a linear schedule ends the rates at 0; two prior rows join each photo."""
    from dreambooth.training import inprocess

    rows = []
    real_loss = inprocess.mixed_batch_loss
    monkeypatch.setattr(inprocess, "mixed_batch_loss", lambda model, scheduler, latents, conditions, num_instance,
                        *rest: rows.append((latents.shape[0], num_instance))
                        or real_loss(model, scheduler, latents, conditions, num_instance, *rest))
    parts = load_components(tiny_model_path)
    side = 32 // 2 ** (len(parts.vae.config.block_out_channels) - 1)  # the latents of a 32 px photo
    priors = torch.randn(5, parts.unet.config.in_channels, side, side)
    history = inprocess.finetune(parts, load_subject_images(str(dog_dir), 32), inprocess.FinetuneSettings(
        "a sks dog", "a dog", max_train_steps=4, train_batch_size=1, learning_rate=1e-3, lr_scheduler="linear",
        prior_examples_per_subject_example=2), priors)
    assert [round(h["lr"], 6) for h in history] == [0.00075, 0.0005, 0.00025, 0.0]
    assert rows == [(3, 1)] * 4  # 1 photo + 2 priors, the photo first


def test_step_seeds_are_fixed_numbers_of_their_keys_in_any_process():
    """A resumed run (another process, another PYTHONHASHSEED) must draw the same noise: the seed is a
    pure function of (seed, rank, step, micro) — pinned here — and distinct keys give distinct seeds."""
    import subprocess
    import sys

    from dreambooth.training.module import derived_seed

    assert derived_seed(0, 1, 2, 3) == 1750788034 and derived_seed(7) == 2083679832
    code = "from dreambooth.training.module import derived_seed; print(derived_seed(0, 1, 2, 3))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "12345", "PATH": ""}).stdout.split()[-1]
    assert int(other) == 1750788034
    seeds = {derived_seed(0, rank, step, micro) for rank in range(4) for step in range(50) for micro in range(4)}
    assert len(seeds) == 4 * 50 * 4


class _CountingEngine(torch.nn.Module):
    """Stands in for a DeepSpeed engine: predicts ``noisy * w * input_ids`` and counts backward/step calls."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.calls = []

    def forward(self, noisy, timesteps, conditions):
        return noisy * self.w * conditions["input_ids"].float().view(-1, 1, 1, 1)

    def backward(self, loss):
        loss.backward()
        self.calls.append("backward")

    def step(self):
        self.calls.append("step")


def test_train_step_reports_the_mean_of_all_its_micro_batches(tiny_model_path):
    from dreambooth.training.batches import MixedBatch
    from dreambooth.training.loop import PhaseClock, step_generator, train_step
    from dreambooth.training.module import mixed_batch_loss

    scheduler = load_components(tiny_model_path).noise_scheduler
    micro_batches = [MixedBatch(torch.randn(2, 4, 2, 2), {"input_ids": torch.full((2, 1), scale)}, 1)
                     for scale in (1, 5, 9)]
    stream = iter(micro_batches)
    stub = type("Batches", (), {"next": lambda self: next(stream)})()
    train = TrainConfig(gradient_accumulation_steps=3, prior_loss_weight=0.5, seed=4)
    engine = _CountingEngine()
    losses = train_step(engine, scheduler, stub, train, rank=1, step=7, phases=PhaseClock())
    with torch.no_grad():
        each = [mixed_batch_loss(engine, scheduler, b.latents, b.conditions, 1, 0.5, step_generator(4, 1, 7, m))
                for m, b in enumerate(micro_batches)]
    assert losses["loss"] == pytest.approx(sum(p.total.item() for p in each) / 3)
    assert losses["instance_loss"] == pytest.approx(sum(p.instance for p in each) / 3)
    assert losses["prior_loss"] == pytest.approx(sum(p.prior for p in each) / 3)
    assert losses["loss"] != pytest.approx(each[-1].total.item())  # not the last micro-batch's
    assert engine.calls == ["backward", "step"] * 3  # DeepSpeed counts micro-batches to its boundary
