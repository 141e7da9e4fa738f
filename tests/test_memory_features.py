"""Memory features (issue #14 point 3): gradient checkpointing, optimizers, parameter offload,
the attention backend in the run record, the model's native resolution."""

import copy

import pytest
import torch

from dreambooth.config import TrainConfig
from dreambooth.models import load_components
from dreambooth.training.engine import adamw, deepspeed_config, skip_shared_memory_comm_for_one_rank
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


@pytest.mark.parametrize("stage", [2, 3])
def test_gradient_checkpointing_under_deepspeed_zero(tiny_parts, stage):
    """A one-rank gloo group; the config is built as for two ranks so the stage is not demoted to 0."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from dreambooth.training.local import one_rank_process_group

    skip_shared_memory_comm_for_one_rank(1)
    train = TrainConfig(zero_stage=stage, max_grad_norm=0)
    config = deepspeed_config(train, cuda=False, world_size=2)
    assert config["zero_optimization"]["stage"] == stage
    latents, conditions = _batch(tiny_parts)
    results = {}
    with one_rank_process_group(cuda=False):
        for checkpointing in (False, True):
            module = _module(tiny_parts, checkpointing)
            names = [n for n, _ in module.named_parameters()]
            engine, *_ = deepspeed.initialize(model=module, optimizer=adamw(module.parameters(), 1e-4, 0.0),
                                              config=config, dist_init_required=False)
            assert engine.zero_optimization_stage() == stage
            loss = _loss(engine, tiny_parts, latents, conditions)
            engine.backward(loss)
            grads = {n: safe_get_full_grad(p).detach().clone().flatten()
                     for n, p in zip(names, engine.module.parameters())}
            results[checkpointing] = (loss.item(), grads)
            engine.destroy()
    (plain_loss, plain_grads), (ckpt_loss, ckpt_grads) = results[False], results[True]
    assert ckpt_loss == pytest.approx(plain_loss, rel=1e-6)
    for name, grad in plain_grads.items():
        assert grad.abs().sum() > 0 or name.startswith("text_encoder.text_model.embeddings.position"), name
        assert torch.allclose(ckpt_grads[name], grad, rtol=1e-4, atol=1e-6), name
