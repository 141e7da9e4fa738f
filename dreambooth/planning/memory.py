"""Per-rank memory of one training configuration: model states by ZeRO stage and offload, plus the
rest of a GPU's budget.

Owns the arithmetic (no measurement, no printing). Bytes per trainable parameter Ψ, as DeepSpeed
keeps them under mixed precision (bf16 / fp16) with Adam:

    16-bit weights 2, 16-bit gradients 2, fp32 gradient partition 4 (materialized for the optimizer
    step), fp32 master weights 4, Adam moments 8

(the ZeRO paper's 2 + 2 + 12 = 16 bytes, plus the fp32 gradient copy that DeepSpeed's own
estimators count); fp32 training keeps weights 4, gradients 4, Adam moments 8 and no copies.
Partitioned across N ranks per stage, as DeepSpeed does: ZeRO-1 the optimizer states (master,
moments, fp32 gradients), ZeRO-2 also the 16-bit gradients, ZeRO-3 also the 16-bit weights, less
the small "persistent" tensors it keeps whole, plus the largest layer gathered at a time (weights +
gradients: DeepSpeed's ``4 * largest_layer_params``). Optimizer offload moves master, moments and
fp32 gradients to CPU memory (DeepSpeed CPU Adam); parameter offload (ZeRO-3) moves the weight
partition there too. Communication buckets use DeepSpeed's default sizes
(``DeepSpeedZeroConfig``), read from the installed DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass

from dreambooth.planning.architectures import ParameterCounts


@dataclass(frozen=True)
class Precision:
    """Bytes per trainable parameter of each model state under one training precision."""

    weights: int
    """Working weights the forward uses (16-bit under mixed precision)."""

    grads: int
    """Gradients backward produces, in the weights' dtype."""

    fp32_grads: int
    """The fp32 copy of the gradient partition the optimizer step reads (0 in fp32 training)."""

    master: int
    """fp32 master weights the optimizer updates (0 in fp32 training: the weights are fp32)."""

    adam: int
    """Adam's two fp32 moments."""

    @property
    def optimizer(self) -> int:
        """What ZeRO-1 partitions as "optimizer states": master + moments."""
        return self.master + self.adam


FP32_BYTES = 4
HALF_BYTES = 2
ADAM_MOMENTS = 2
MIXED = Precision(weights=HALF_BYTES, grads=HALF_BYTES, fp32_grads=FP32_BYTES, master=FP32_BYTES, adam=ADAM_MOMENTS * FP32_BYTES)
FULL = Precision(weights=FP32_BYTES, grads=FP32_BYTES, fp32_grads=0, master=0, adam=ADAM_MOMENTS * FP32_BYTES)
PRECISIONS = {"bf16": MIXED, "fp16": MIXED, "no": FULL}


@dataclass(frozen=True)
class Option:
    """One way to train: ZeRO stage, offloads and gradient checkpointing."""

    zero_stage: int
    """DeepSpeed ZeRO stage 0-3."""

    offload_optimizer: bool
    """Master weights, Adam moments and fp32 gradients in CPU memory (stage >= 1)."""

    offload_params: bool
    """ZeRO-3's weight partition in CPU memory too (stage 3 with optimizer offload)."""

    checkpointing: bool
    """Gradient checkpointing in the UNet and text encoders (activations recomputed in backward)."""

    @property
    def cost(self) -> tuple[int, int, int, int]:
        """Sort key, cheapest first: no offload, then lower stage, then no checkpointing."""
        return (int(self.offload_params), int(self.offload_optimizer), self.zero_stage, int(self.checkpointing))

    @property
    def offload(self) -> str:
        """What is offloaded to CPU memory: ``-``, ``optim`` or ``params+optim``."""
        return "params+optim" if self.offload_params else "optim" if self.offload_optimizer else "-"

    @property
    def label(self) -> str:
        """Table cells: stage | offload | checkpointing."""
        return f"ZeRO-{self.zero_stage} | {self.offload} | {'on' if self.checkpointing else 'off'}"

    @property
    def describe(self) -> str:
        """The option in words, for the verdict line."""
        offload = "no offload" if self.offload == "-" else f"{self.offload} offloaded"
        return f"ZeRO-{self.zero_stage}, {offload}, gradient checkpointing {'on' if self.checkpointing else 'off'}"


def all_options() -> list[Option]:
    """Every combination DeepSpeed accepts, cheapest first."""
    options = []
    for stage in range(4):
        offloads = [(False, False)] + ([(True, False)] if stage >= 1 else []) + ([(True, True)] if stage == 3 else [])
        for offload_optimizer, offload_params in offloads:
            for checkpointing in (False, True):
                options.append(Option(stage, offload_optimizer, offload_params, checkpointing))
    return sorted(options, key=lambda o: o.cost)


@dataclass(frozen=True)
class BucketSizes:
    """DeepSpeed's communication buffer sizes (elements), from its config defaults."""

    reduce_bucket: int
    """``reduce_bucket_size``: the flat gradient bucket reduced at once (ZeRO 1-3)."""

    overlap_comm_stage2: bool
    """Whether ZeRO 1/2 double-buffers that bucket (``overlap_comm``'s default there)."""

    persistence_threshold: int
    """``stage3_param_persistence_threshold``: ZeRO-3 keeps tensors this small whole on every rank."""


def deepspeed_defaults() -> BucketSizes:
    """The installed DeepSpeed's defaults (the project's DeepSpeed config does not change them)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    stage2 = DeepSpeedZeroConfig(stage=2)
    return BucketSizes(int(stage2.reduce_bucket_size), bool(stage2.overlap_comm), int(DeepSpeedZeroConfig(stage=3).param_persistence_threshold))


@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank needs, on its GPU and in its host's memory."""

    params: int
    """Working weights on the GPU (full, or ZeRO-3's partition + persistent tensors)."""

    grads: int
    """Gradients on the GPU (16-bit, full or partitioned, + the fp32 partition for the step)."""

    optimizer: int
    """Master weights + Adam moments on the GPU."""

    gathered: int
    """ZeRO-3's gathered layer (weights + gradients of the largest layer), 0 otherwise."""

    activations: int
    """Measured activation peak of one micro-batch."""

    buffers: int
    """DeepSpeed's gradient bucket(s)."""

    frozen: int
    """Frozen weights held in the training dtype (VAE; text encoders when not trained)."""

    reserve: int
    """Set aside for the CUDA context, kernels' workspaces and allocator slack."""

    cpu: int
    """Host memory this rank's offloaded states take (0 without offload)."""

    @property
    def model_states(self) -> int:
        """What DeepSpeed's ``estimate_zero*_model_states_mem_needs`` estimate per GPU."""
        return self.params + self.grads + self.optimizer + self.gathered

    @property
    def gpu_total(self) -> int:
        """Everything on the GPU: model states, activations, buffers, frozen weights and the reserve."""
        return self.model_states + self.activations + self.buffers + self.frozen + self.reserve


def rank_memory(option: Option, counts: ParameterCounts, precision: Precision, world_size: int, *,
                activations: int, buckets: BucketSizes, reserve: int) -> RankMemory:
    """Per-rank bytes of ``option`` for a model of ``counts`` on ``world_size`` ranks."""
    psi, n = counts.trainable, world_size
    stage = option.zero_stage

    def shard(total: int) -> int:
        return total // n

    p = precision
    params = shard(p.weights * psi) + p.weights * counts.persistent if stage == 3 else p.weights * psi
    grads16 = shard(p.grads * psi) if stage >= 2 else p.grads * psi
    fp32_grads = shard(p.fp32_grads * psi) if stage >= 1 else p.fp32_grads * psi
    optimizer = shard(p.optimizer * psi) if stage >= 1 else p.optimizer * psi
    gathered = (p.weights + p.grads) * counts.largest_layer if stage == 3 else 0
    cpu = 0
    if option.offload_optimizer:
        # CPU Adam steps the fp32 partition in host memory; 16-bit gradients go there from the bucket
        cpu += optimizer + fp32_grads
        optimizer = fp32_grads = 0
        if stage >= 2:
            grads16 = 0
    if option.offload_params:
        persistent = p.weights * counts.persistent
        cpu += params - persistent
        params = persistent
    if stage == 0:
        bucket = min(buckets.reduce_bucket, psi) * p.grads
    else:
        bucket = buckets.reduce_bucket * p.grads * (2 if stage < 3 and buckets.overlap_comm_stage2 else 1)
    return RankMemory(
        params=params, grads=grads16 + fp32_grads, optimizer=optimizer, gathered=gathered, activations=activations,
        buffers=bucket, frozen=p.weights * counts.frozen, reserve=reserve, cpu=cpu,
    )
