"""DeepSpeed: the ZeRO config built from ``TrainConfig`` and the engine around ``DreamBoothModule``."""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch

from dreambooth.config import ConfigError, OptimizerName, TrainConfig

log = logging.getLogger(__name__)

STALE_JIT_LOCK_SECONDS = 600
"""A JIT build lock older than this is left by a killed build (builds take about a minute)."""


def adamw(params, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """torch's AdamW with its fused kernel: one pass over every tensor instead of a Python loop of
    small ops per parameter (the optimizer phase of a shapes-model step went from 22 to 6 ms on 2
    CPU cores). Same update rule as the default implementation, to float rounding."""
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, fused=True)


ADAMW_8BIT_NEEDS = "--optimizer adamw8bit needs CUDA GPUs and bitsandbytes (pip install bitsandbytes)"
"""The start of every refusal of ``adamw8bit``: what it needs."""
ADAMW_8BIT_INSTEAD = "use --optimizer adafactor, which also saves optimizer memory and runs anywhere"


def require_optimizer(train: TrainConfig, *, cuda: Optional[bool] = None) -> None:
    """Refuse an optimizer that cannot run here, before any cluster time: ``adamw8bit`` needs
    bitsandbytes importable (the driver runs the workers' image) and, once known (``cuda``: whether
    training gets CUDA devices), CUDA GPUs. A ConfigError says what to install or use instead."""
    if train.optimizer != "adamw8bit":
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{ADAMW_8BIT_NEEDS}, and bitsandbytes is not installed; "
                          f"install it in the image, or {ADAMW_8BIT_INSTEAD}")
    if cuda is False:
        raise ConfigError(f"{ADAMW_8BIT_NEEDS}, and this run has no CUDA devices to train on; "
                          f"train on CUDA GPUs (--use-gpu true), or {ADAMW_8BIT_INSTEAD}")


def make_optimizer(name: OptimizerName, params, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """The ``--optimizer`` over ``params`` (tensors or ``parameter_groups``; a group's own ``lr`` wins).

    Under ZeRO 1-3, DeepSpeed hands the optimizer flat 1-D partitions, so Adafactor cannot factor a
    matrix's second moment there; it still keeps no first moment (half of AdamW's state)."""
    if name == "adamw":
        return adamw(params, learning_rate, weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed learning rate, as given (no relative step, no scaling by each parameter's RMS), so
        # --learning-rate, the LR schedule and the text encoder's group rate mean what they say.
        return Adafactor(params, lr=learning_rate, weight_decay=weight_decay, relative_step=False,
                         scale_parameter=False, warmup_init=False)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=learning_rate, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


def parameter_groups(module: torch.nn.Module, learning_rate: float,
                     text_encoder_learning_rate: float | None) -> list[dict]:
    """The trainable parameters of a ``DreamBoothModule`` as optimizer groups: the UNet (and every
    other trainable module) at ``learning_rate``, the text encoder(s) at ``text_encoder_learning_rate``
    when it is set. Group 0 is always the UNet's; group 1, when present, the text encoders'.

    A text encoder moved less than the UNet keeps what the base model's prompts mean: at one rate,
    the words every caption shares ("a", the class noun, colours) drift with the subject's
    (benchmarks/recipe_search.py)."""
    if text_encoder_learning_rate is None:
        return [{"params": [p for p in module.parameters() if p.requires_grad]}]
    encoders = [p for name, p in module.named_parameters() if p.requires_grad and name.startswith("text_encoder")]
    encoder_ids = {id(p) for p in encoders}
    rest = [p for p in module.parameters() if p.requires_grad and id(p) not in encoder_ids]
    groups = [{"params": rest, "lr": learning_rate}]
    if encoders:
        groups.append({"params": encoders, "lr": text_encoder_learning_rate})
    return groups


def effective_zero_stage(train: TrainConfig, world_size: int) -> int:
    """The ZeRO stage a run trains with: ``--zero-stage``, except that one rank without offload has
    nothing to partition, and stages 1-3 would only add their gradient bucketing and parameter
    gather hooks to every step (3.7x the step time at ZeRO-3 on the shapes model here,
    benchmarks/train_step.py): the same training runs at stage 0. Offload needs its stage (optimizer
    offload >= 1, parameter offload 3), so an offloading run keeps it."""
    if world_size == 1 and not (train.offload_optimizer or train.offload_params):
        return 0
    return train.zero_stage


def deepspeed_config(train: TrainConfig, *, cuda: bool, world_size: int = 2) -> dict[str, Any]:
    """The DeepSpeed JSON config for a run (ZeRO stage, optimizer and parameter offload, precision,
    accumulation, clipping).

    ``cuda``: whether the ranks train on CUDA devices (else on CPU); ``world_size``: the ranks
    (one rank trains at stage 0 unless it offloads, see ``effective_zero_stage``).
    With optimizer offload DeepSpeed builds its CPU Adam (a one-time JIT build); otherwise the
    engine receives the ``--optimizer`` object (``make_optimizer``), which builds no extension.
    """
    stage = effective_zero_stage(train, world_size)
    zero: dict[str, Any] = {
        "stage": stage,
        # Copying each gradient into one flat buffer as it is produced avoids fragmenting GPU
        # memory (DeepSpeed's default). CPU memory does not fragment that way, and on CPU the
        # extra copy per parameter cost ~10 % of a small model's step (benchmarks/train_step.py).
        "contiguous_gradients": cuda,
    }
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if train.offload_params:  # validate() allows it at stage 3 only
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    if stage == 3:
        # Full weights are gathered for export through GatheredParameters; this lets
        # engine.save_16bit_model work too.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.train_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "zero_optimization": zero,
        "bf16": {"enabled": train.mixed_precision == "bf16"},
        "fp16": {"enabled": train.mixed_precision == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if train.max_grad_norm > 0:
        config["gradient_clipping"] = train.max_grad_norm
    if train.offload_optimizer:
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": train.learning_rate, "weight_decay": train.adam_weight_decay},
        }
    return config


def extension_build_dirs() -> list[Path]:
    """Where torch JIT-builds DeepSpeed's ops on this node (TORCH_EXTENSIONS_DIR or torch's default)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return [Path(root)]
    from torch.utils.cpp_extension import get_default_build_root

    base = Path(get_default_build_root())
    return [base, *sorted(p for p in base.glob("py*") if p.is_dir())]


def clear_stale_jit_locks(max_age_s: float = STALE_JIT_LOCK_SECONDS) -> list[Path]:
    """Remove build locks that a killed worker left behind.

    torch's JIT builder waits *forever* for another process's ``lock`` file to disappear; a worker
    killed mid-build (preemption, a restarted worker group) would otherwise hang every later run.
    """
    removed = []
    for root in extension_build_dirs():
        for lock in root.glob("*/lock"):
            try:
                if time.time() - lock.stat().st_mtime > max_age_s:
                    lock.unlink()
                    removed.append(lock)
                    log.warning("removed stale JIT build lock %s (left by a killed build)", lock)
            except FileNotFoundError:
                pass
    return removed


def prebuild_deepspeed_ops() -> None:
    """JIT-build the op every ``deepspeed.initialize`` loads on CPU (shared-memory comm) once, here.

    Workers then find it built. Used by tests and benchmarks so the build cost is paid once.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    clear_stale_jit_locks()
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


def skip_shared_memory_comm_for_one_rank(world_size: int) -> bool:
    """With one rank there is nothing to all-reduce: keep DeepSpeed from JIT-building (70-95 s when
    its cache is cold) and loading its CPU shared-memory comm op, which ``deepspeed.initialize``
    otherwise does unconditionally. Returns whether it was skipped.

    DeepSpeed asks ``deepspeed.ops.__compatible_ops__`` whether the op may be built; marking it
    incompatible makes its communication fall back to torch.distributed (gloo), as it does on
    platforms without the op.
    """
    if world_size != 1 or torch.cuda.is_available():
        return False
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    return True


def build_engine(module: torch.nn.Module, train: TrainConfig, *, cuda: bool | None = None):
    """``deepspeed.initialize`` on an already-initialized process group (Ray Train made it).

    ``cuda`` defaults to whether this process sees a CUDA device (where ``module`` must already be).
    """
    import deepspeed

    clear_stale_jit_locks()
    from diffusers.optimization import get_scheduler

    params = parameter_groups(module, train.learning_rate, train.text_encoder_learning_rate)
    optimizer = None
    if not train.offload_optimizer:
        optimizer = make_optimizer(train.optimizer, params, train.learning_rate, train.adam_weight_decay)

    def make_scheduler(opt):
        return get_scheduler(
            train.lr_scheduler,
            optimizer=opt,
            num_warmup_steps=train.lr_warmup_steps,
            num_training_steps=train.max_train_steps,
        )

    engine, _, _, scheduler = deepspeed.initialize(
        model=module,
        model_parameters=params,
        optimizer=optimizer,
        lr_scheduler=make_scheduler,
        config=deepspeed_config(train, cuda=torch.cuda.is_available() if cuda is None else cuda,
                                world_size=torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1),
        dist_init_required=False,
    )
    return engine, scheduler
