"""Memory features (issue #14 point 3): gradient checkpointing, optimizers, parameter offload,
the attention backend in the run record, the model's native resolution."""

import copy

import pytest
import torch

from dreambooth.config import TrainConfig
from dreambooth.models import load_components
from dreambooth.training.engine import deepspeed_config, skip_shared_memory_comm_for_one_rank
from dreambooth.training.module import DreamBoothModule, mixed_batch_loss

LATENT_SIDE = 16
"""Latent side of a 32 px image through the tiny VAE (downsamples 2x)."""


@pytest.fixture(scope="module")
def tiny_parts(tiny_model_path):
    parts = load_components(tiny_model_path)
    parts.vae.requires_grad_(False)
    return parts


def _batch(parts, rows: int = 2):
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(rows, parts.unet.config.in_channels, LATENT_SIDE, LATENT_SIDE, generator=generator)
    conditions = {key: ids.repeat(rows, 1) for key, ids in parts.prompt_inputs("a sks dog").items()}
    return latents, conditions


def _loss(model, parts, latents, conditions):
    return mixed_batch_loss(model, parts.noise_scheduler, latents, conditions, num_instance=1,
                            prior_loss_weight=1.0, generator=torch.Generator().manual_seed(7)).total


def _module(parts, checkpointing: bool) -> DreamBoothModule:
    fresh = {name: copy.deepcopy(module) for name, module in parts.trainable().items()}
    module = DreamBoothModule.from_components(parts, modules=fresh).train()
    return module.enable_gradient_checkpointing() if checkpointing else module


def _checkpointed_flags(module: DreamBoothModule) -> dict[str, bool]:
    return {name: any(getattr(m, "gradient_checkpointing", False) for m in part.modules())
            for name, part in module.parts().items()}


def test_gradient_checkpointing_keeps_loss_and_gradients(tiny_parts):
    latents, conditions = _batch(tiny_parts)
    results = {}
    for checkpointing in (False, True):
        module = _module(tiny_parts, checkpointing)
        assert set(_checkpointed_flags(module).values()) == {checkpointing}  # the UNet and the text encoder
        loss = _loss(module, tiny_parts, latents, conditions)
        loss.backward()
        results[checkpointing] = (loss.item(), {n: p.grad.clone() for n, p in module.named_parameters()})
    (plain_loss, plain_grads), (ckpt_loss, ckpt_grads) = results[False], results[True]
    assert ckpt_loss == pytest.approx(plain_loss, rel=1e-6)
    assert plain_grads.keys() == ckpt_grads.keys()
    assert any(n.startswith("text_encoder") for n in plain_grads) and any(n.startswith("unet") for n in plain_grads)
    for name, grad in plain_grads.items():
        assert torch.allclose(ckpt_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_gradient_checkpointing_leaves_a_frozen_text_encoder_alone(tiny_parts):
    fresh = {name: copy.deepcopy(module) for name, module in tiny_parts.trainable().items()}
    module = DreamBoothModule.from_components(tiny_parts, {"text_encoder": False}, fresh).enable_gradient_checkpointing()
    assert _checkpointed_flags(module) == {"unet": True, "text_encoder": False}


@pytest.fixture(scope="module")
def one_rank_group():
    """A one-rank gloo group (and the launcher variables DeepSpeed reads) for this module's engines."""
    from dreambooth.training.local import one_rank_process_group

    skip_shared_memory_comm_for_one_rank(1)
    with one_rank_process_group(cuda=False):
        yield


def _zero_engine(module: DreamBoothModule, stage: int, optimizer: str = "adamw"):
    """A DeepSpeed engine at ``stage`` on the one-rank group; the config is built as for two ranks so
    the stage is not demoted to 0 (``effective_zero_stage``)."""
    import deepspeed

    from dreambooth.training.engine import make_optimizer

    config = deepspeed_config(TrainConfig(zero_stage=stage, max_grad_norm=0), cuda=False, world_size=2)
    engine, *_ = deepspeed.initialize(model=module, optimizer=make_optimizer(optimizer, module.parameters(), 1e-3, 0.0),
                                      config=config, dist_init_required=False)
    assert engine.zero_optimization_stage() == stage
    return engine


@pytest.mark.parametrize("stage", [2, 3])
def test_gradient_checkpointing_under_deepspeed_zero(tiny_parts, one_rank_group, stage):
    from deepspeed.utils import safe_get_full_grad

    latents, conditions = _batch(tiny_parts)
    results = {}
    for checkpointing in (False, True):
        module = _module(tiny_parts, checkpointing)
        names = [n for n, _ in module.named_parameters()]
        engine = _zero_engine(module, stage)
        loss = _loss(engine, tiny_parts, latents, conditions)
        engine.backward(loss)
        grads = {n: safe_get_full_grad(p).detach().clone().flatten() for n, p in zip(names, engine.module.parameters())}
        results[checkpointing] = (loss.item(), grads)
        engine.destroy()
    (plain_loss, plain_grads), (ckpt_loss, ckpt_grads) = results[False], results[True]
    assert ckpt_loss == pytest.approx(plain_loss, rel=1e-6)
    assert sum(bool(g.abs().sum() > 0) for g in plain_grads.values()) > len(plain_grads) // 2
    for name, grad in plain_grads.items():
        assert torch.allclose(ckpt_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_adafactor_steps_under_deepspeed_zero2(tiny_parts, one_rank_group):
    """ZeRO hands the optimizer flat fp32 partitions: Adafactor must step them (unfactored)."""
    latents, conditions = _batch(tiny_parts)
    module = _module(tiny_parts, checkpointing=False)
    before = _state(module.unet)
    engine = _zero_engine(module, 2, "adafactor")
    engine.backward(_loss(engine, tiny_parts, latents, conditions))
    engine.step()
    assert _changed(before, engine.module.unet)
    engine.destroy()


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _changed(before: dict, module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


@pytest.mark.parametrize("encoder_rate, encoder_moves", [(None, True), (0.0, False)])
def test_adafactor_trains_with_the_text_encoder_group_rate(tiny_model_path, dog_dir, encoder_rate, encoder_moves):
    from transformers.optimization import Adafactor

    from dreambooth.subjects import load_subject_images
    from dreambooth.training.engine import make_optimizer
    from dreambooth.training.inprocess import FinetuneSettings, finetune

    assert isinstance(make_optimizer("adafactor", [torch.nn.Parameter(torch.ones(2))], 1e-3, 0.0), Adafactor)
    parts = load_components(tiny_model_path)
    unet_before, encoder_before = _state(parts.unet), _state(parts.text_encoder)
    history = finetune(parts, load_subject_images(str(dog_dir), 32), FinetuneSettings(
        "a sks dog", "a dog", max_train_steps=2, learning_rate=1e-3, text_encoder_learning_rate=encoder_rate,
        prior_loss_weight=0.0, optimizer="adafactor"))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert _changed(unet_before, parts.unet)
    assert _changed(encoder_before, parts.text_encoder) == encoder_moves


def test_optimizer_offload_is_adamw_only_and_adamw8bit_needs_cuda():
    from dreambooth.config import ConfigError, RunConfig, validate
    from dreambooth.training.engine import require_optimizer

    def config(**train) -> RunConfig:
        cfg = RunConfig(model="tiny", output="/tmp/x")
        cfg.subject.instance_dir, cfg.subject.class_noun = "/tmp/dog", "dog"
        for key, value in train.items():
            setattr(cfg.train, key, value)
        return cfg

    validate(config(optimizer="adafactor"))
    validate(config(optimizer="adamw", offload_optimizer=True))
    with pytest.raises(ConfigError, match="works with --optimizer adamw only, got --optimizer adafactor"):
        validate(config(optimizer="adafactor", offload_optimizer=True))
    with pytest.raises(ConfigError, match="--optimizer must be one of adamw, adafactor, adamw8bit"):
        validate(config(optimizer="sgd"))
    require_optimizer(TrainConfig(optimizer="adafactor"), cuda=False)  # runs anywhere
    with pytest.raises(ConfigError, match="adamw8bit needs CUDA GPUs and bitsandbytes.*--optimizer adafactor"):
        require_optimizer(TrainConfig(optimizer="adamw8bit"), cuda=False)


@pytest.mark.parametrize("cuda", [False, True])
def test_offload_params_puts_zero3_parameters_on_the_cpu(cuda):
    from dreambooth.training.engine import effective_zero_stage

    zero = deepspeed_config(TrainConfig(zero_stage=3, offload_params=True), cuda=cuda, world_size=2)["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"] == {"device": "cpu", "pin_memory": cuda}
    assert "offload_optimizer" not in zero
    assert "offload_param" not in deepspeed_config(TrainConfig(zero_stage=3), cuda=cuda, world_size=2)["zero_optimization"]
    # One rank keeps stage 3 when it offloads parameters (without offload it would train at stage 0).
    assert effective_zero_stage(TrainConfig(zero_stage=3, offload_params=True), 1) == 3


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_offload_params_is_refused_below_zero3(stage):
    from dreambooth.config import ConfigError, RunConfig, validate

    cfg = RunConfig(model="tiny", output="/tmp/x")
    cfg.subject.instance_dir, cfg.subject.class_noun = "/tmp/dog", "dog"
    cfg.train.offload_params, cfg.train.zero_stage = True, stage
    with pytest.raises(ConfigError, match=f"--offload-params needs --zero-stage 3 .* got --zero-stage {stage}; add --zero-stage 3"):
        validate(cfg)
    cfg.train.zero_stage = 3
    validate(cfg)


def test_offload_params_trains_one_step_at_zero3(tiny_parts, one_rank_group):
    import deepspeed

    from dreambooth.training import checkpoint

    latents, conditions = _batch(tiny_parts)
    module = _module(tiny_parts, checkpointing=False)
    before = _state(module.unet)
    config = deepspeed_config(TrainConfig(zero_stage=3, offload_params=True, max_grad_norm=0), cuda=False, world_size=1)
    engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.AdamW(module.parameters(), lr=1e-3),
                                      config=config, dist_init_required=False)
    assert engine.zero_optimization_stage() == 3 and engine.zero_offload_param()
    engine.backward(_loss(engine, tiny_parts, latents, conditions))
    engine.step()
    state = checkpoint.gathered_state_dict(engine)
    engine.destroy()
    assert any(not torch.equal(before[k], state[f"unet.{k}"]) for k in before)


def test_attention_backend_names_the_unets_processors_and_sdpa_kernels(tiny_parts, monkeypatch):
    from diffusers.models.attention_processor import AttnProcessor

    from dreambooth.training.module import attention_backend

    unet = copy.deepcopy(tiny_parts.unet)
    assert attention_backend(unet, torch.device("cpu")) == {"processors": ["AttnProcessor2_0"], "sdpa_backends": ["cpu"]}
    unet.set_attn_processor(AttnProcessor())
    assert attention_backend(unet, torch.device("cpu"))["processors"] == ["AttnProcessor"]
    # On CUDA: the enabled kernels, in torch's order; flash only where this build has it.
    cuda = torch.backends.cuda
    for flag in ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled", "is_flash_attention_available"):
        monkeypatch.setattr(cuda, flag, lambda: True)
    monkeypatch.setattr(cuda, "cudnn_sdp_enabled", lambda: False)
    assert attention_backend(unet, torch.device("cuda", 0))["sdpa_backends"] == ["flash", "memory_efficient", "math"]
    monkeypatch.setattr(cuda, "is_flash_attention_available", lambda: False)
    assert attention_backend(unet, torch.device("cuda", 0))["sdpa_backends"] == ["memory_efficient", "math"]


@pytest.mark.parametrize("model, native", [
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", 512),
    ("stabilityai/stable-diffusion-2-1", 768),
    ("stabilityai/stable-diffusion-xl-base-1.0", 1024),
    ("tiny", 32),
    ("shapes", 32),
])
def test_native_resolution_is_read_from_the_model_configs(model, native):
    from dreambooth.models import NATIVE_RESOLUTION_SOURCE, native_resolution_layer

    assert native_resolution_layer(model) == ({"resolution": native}, NATIVE_RESOLUTION_SOURCE.format(model=model))


def test_preflight_fills_an_unset_resolution_from_the_model_and_keeps_a_set_one(tmp_path, dog_dir):
    from dreambooth import pipeline
    from dreambooth.config import build_config

    run = {"model": "tiny", "instance_dir": str(dog_dir), "class_noun": "dog", "output": str(tmp_path / "o")}
    cfg = build_config((run, "test"))  # no recipe layer: as a program builds it
    assert cfg.train.resolution is None
    resolved = pipeline.preflight(cfg).config
    assert resolved.train.resolution == 32 and resolved.sources["resolution"].startswith("the tiny model's native size")
    assert cfg.train.resolution is None and "resolution" not in cfg.sources  # the caller's config is not written
    resolved = pipeline.preflight(build_config(({**run, "resolution": 48}, "test"))).config
    assert resolved.train.resolution == 48 and resolved.sources["resolution"] == "test"
