"""``dreambooth plan``: every ZeRO / offload / checkpointing choice for a model on a set of GPUs,
which fit, and the cheapest ``dreambooth run`` flags that do.

Owns: the plan's inputs (sizes such as ``24GiB`` parsed here), putting architecture, parameter
counts, measured activations (cached per model and shape, since an SDXL measurement takes a
minute) and the per-rank arithmetic together, and the printed table and flags line.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from dreambooth.config import ConfigError, validate_resolution
from dreambooth.planning.activations import ActivationPeak, measure_activations
from dreambooth.planning.architectures import Architecture, ParameterCounts, count_parameters, load_architecture
from dreambooth.planning.memory import PRECISIONS, Option, RankMemory, all_options, deepspeed_defaults, rank_memory

UNITS = {"": 2**30, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
         "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
"""Size suffixes (case-insensitive): binary for ``G``/``GiB`` (what ``nvidia-smi`` means), decimal for ``GB``."""

SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
GIB = 2**30
MIB = 2**20
SMALL_GPU = 4 * GIB
"""Below this GPU size the table is in MiB (built-in test models)."""
DEFAULT_RESERVE = "1GiB"
"""Kept free per GPU by default: CUDA context, cuBLAS/cuDNN workspaces, allocator fragmentation."""

ACTIVATION_CACHE_VERSION = 2
"""Bump when the measured graph changes, so cached activation peaks are measured again."""

TRAINING_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}


def parse_size(text: str, flag: str) -> int:
    """Bytes in ``text`` (``24GiB``, ``80GB``, ``24G``, ``512MiB``, ``1.5T``); ConfigError saying what to write."""
    match = SIZE_PATTERN.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in UNITS or float(match.group(1)) <= 0:
        raise ConfigError(
            f"{flag} {text!r} is not a size: write a number and a unit, e.g. 24GiB, 80GB or 24G "
            "(G/GiB = 2^30 bytes, GB = 10^9 bytes; also M/MiB/MB and T/TiB/TB)"
        )
    return int(float(match.group(1)) * UNITS[unit])


@dataclass(frozen=True)
class PlanInputs:
    """What the user asked: a model on ``gpus`` GPUs of ``gpu_memory`` bytes, a micro-batch shape."""

    model: str
    """``--model``: a hub id, local diffusers folder or built-in name."""

    gpus: int
    """Ranks (one GPU each) the run would use: ``dreambooth run --workers``."""

    gpu_memory: int
    """Memory of each GPU, bytes."""

    resolution: Optional[int]
    """Image side in pixels; None: the model's native resolution."""

    train_batch_size: int
    """Subject examples per micro-batch per rank."""

    mixed_precision: str
    """bf16, fp16 or no (fp32), as ``dreambooth run --mixed-precision``."""

    prior_preservation: bool
    """Whether prior rows are added 1:1 (doubles the rows each rank runs)."""

    train_text_encoder: bool
    """Whether the text encoders train (else they are frozen weights)."""

    gpus_per_node: int
    """GPUs sharing one host's memory (offloaded states of all of them live there)."""

    cpu_memory: Optional[int]
    """Host memory per node, bytes, if known: offload rows that exceed it do not fit."""

    reserve: int
    """Bytes per GPU kept free for the CUDA context and allocator slack."""


@dataclass(frozen=True)
class PlanRow:
    """One option and its per-rank memory."""

    option: Option
    """ZeRO stage, offloads, checkpointing."""

    memory: RankMemory
    """Per-rank bytes on the GPU and in host memory."""

    cpu_per_node: int
    """Host memory all ranks of one node need for offloaded states."""

    fits: bool
    """GPU total within ``gpu_memory`` and, if known, host memory within ``cpu_memory``."""


@dataclass(frozen=True)
class Plan:
    """The whole plan: inputs, model, and every option's row (cheapest first)."""

    inputs: PlanInputs
    """The request."""

    arch: Architecture
    """The model's architecture."""

    counts: ParameterCounts
    """Parameter counts."""

    resolution: int
    """Resolution used (``inputs.resolution`` or the native one)."""

    rows: int
    """Examples per micro-batch per rank (subject + prior)."""

    activations: dict[bool, ActivationPeak]
    """Measured activation peak without (False) and with (True) gradient checkpointing."""

    table: list[PlanRow]
    """Every option, cheapest first."""

    @property
    def cheapest(self) -> Optional[PlanRow]:
        return next((row for row in self.table if row.fits), None)


def _cache_file(arch: Architecture, **shape) -> Path:
    import diffusers
    import transformers

    from dreambooth.models import cache_root

    key = json.dumps({"unet": arch.unet.config, "text": [c.config for c in arch.text_encoders],
                      "versions": [ACTIVATION_CACHE_VERSION, torch.__version__, diffusers.__version__, transformers.__version__],
                      "pipeline": arch.pipeline_class, **shape},
                     sort_keys=True, default=str)
    return Path(cache_root()) / "plan" / f"activations-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def cached_activations(arch: Architecture, *, resolution: int, rows: int, dtype: torch.dtype, checkpointing: bool,
                       train_text_encoder: bool) -> ActivationPeak:
    """``measure_activations`` on fake tensors, remembered on disk per architecture, shape and library versions."""
    shape = dict(resolution=resolution, rows=rows, dtype=str(dtype), checkpointing=checkpointing, train_text_encoder=train_text_encoder)
    path = _cache_file(arch, **shape)
    if path.is_file():
        return ActivationPeak(**json.loads(path.read_text()))
    peak = measure_activations(arch, resolution=resolution, rows=rows, dtype=dtype, checkpointing=checkpointing,
                               train_text_encoder=train_text_encoder)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(peak)))
    return peak


def check_inputs(inputs: PlanInputs) -> None:
    """ConfigError (exit 2) for values no plan can be made for."""
    if inputs.gpus < 1:
        raise ConfigError(f"--gpus must be at least 1, got {inputs.gpus}")
    if inputs.train_batch_size < 1:
        raise ConfigError(f"--train-batch-size must be at least 1, got {inputs.train_batch_size}")
    if inputs.mixed_precision not in PRECISIONS:
        raise ConfigError(f"--mixed-precision must be one of {', '.join(PRECISIONS)}, got {inputs.mixed_precision!r}")
    if inputs.gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node must be at least 1, got {inputs.gpus_per_node}")
    if inputs.resolution is not None:
        validate_resolution(inputs.resolution)


def _runs_as_another_stage(option: Option, gpus: int) -> bool:
    """Whether ``dreambooth run`` would train ``option`` at another ZeRO stage (one rank without
    offload trains at stage 0: ``training.engine.effective_zero_stage``), so its row would repeat that one."""
    from dreambooth.config import TrainConfig
    from dreambooth.training.engine import effective_zero_stage

    train = TrainConfig(zero_stage=option.zero_stage, offload_optimizer=option.offload_optimizer)
    return effective_zero_stage(train, gpus) != option.zero_stage


def make_plan(inputs: PlanInputs) -> Plan:
    """Architecture → parameter counts → activations (with and without checkpointing) → every option."""
    check_inputs(inputs)
    arch = load_architecture(inputs.model)
    resolution = inputs.resolution or arch.native_resolution
    if resolution % arch.vae_scale_factor:
        raise ConfigError(f"--resolution must be a multiple of {arch.vae_scale_factor} for {inputs.model}, got {resolution}")
    buckets = deepspeed_defaults()
    counts = count_parameters(arch, train_text_encoder=inputs.train_text_encoder, persistence_threshold=buckets.persistence_threshold)
    rows = inputs.train_batch_size * (2 if inputs.prior_preservation else 1)
    dtype = TRAINING_DTYPES[inputs.mixed_precision]
    activations = {gc: cached_activations(arch, resolution=resolution, rows=rows, dtype=dtype, checkpointing=gc,
                                          train_text_encoder=inputs.train_text_encoder) for gc in (False, True)}
    precision = PRECISIONS[inputs.mixed_precision]
    ranks_per_node = min(inputs.gpus_per_node, inputs.gpus)
    table = []
    for option in all_options():
        if _runs_as_another_stage(option, inputs.gpus):
            continue
        memory = rank_memory(option, counts, precision, inputs.gpus, activations=activations[option.checkpointing].peak_bytes,
                             buckets=buckets, reserve=inputs.reserve)
        cpu = memory.cpu * ranks_per_node
        fits = memory.gpu_total <= inputs.gpu_memory and (inputs.cpu_memory is None or cpu <= inputs.cpu_memory)
        table.append(PlanRow(option, memory, cpu, fits))
    return Plan(inputs, arch, counts, resolution, rows, activations, table)


def run_flags(plan: Plan, row: PlanRow) -> str:
    """The ``dreambooth run`` flags of ``row``; flags this version of ``run`` lacks are named after it."""
    from dreambooth.config import all_fields

    o, i = row.option, plan.inputs
    flags = [f"--model {i.model}", f"--workers {i.gpus}", f"--zero-stage {o.zero_stage}"]
    wanted = {"offload_optimizer": o.offload_optimizer, "offload_params": o.offload_params, "gradient_checkpointing": o.checkpointing}
    known = all_fields()
    flags += ["--" + name.replace("_", "-") for name, on in wanted.items() if on]
    flags += [f"--mixed-precision {i.mixed_precision}", f"--resolution {plan.resolution}", f"--train-batch-size {i.train_batch_size}"]
    if not i.train_text_encoder:
        flags += [f"--train-{c.name.replace('_', '-')} false" for c in plan.arch.text_encoders]
    if not i.prior_preservation:
        flags.append("--prior-loss-weight 0")
    line = "dreambooth run " + " ".join(flags)
    missing = ["--" + name.replace("_", "-") for name, on in wanted.items() if on and name not in known]
    if missing:
        line += f"\n  (this version of `dreambooth run` does not have {', '.join(missing)} yet)"
    return line


def gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def mib(n: int) -> str:
    return f"{n / MIB:.1f}"


def format_plan(plan: Plan) -> str:
    """The header lines, the table and the verdict with the cheapest flags."""
    i, c = plan.inputs, plan.counts
    unit, fmt = ("MiB", mib) if i.gpu_memory < SMALL_GPU else ("GiB", gib)
    sizes = ", ".join(f"{name} {n / 1e6:,.1f} M" for name, n in c.per_component.items())
    lines = [
        f"{i.model}: {sizes}; trainable {c.trainable / 1e6:,.1f} M, frozen {c.frozen / 1e6:,.1f} M "
        f"(largest layer {c.largest_layer / 1e6:.1f} M, ZeRO-3 persistent {c.persistent / 1e6:.2f} M)",
        f"{i.gpus} GPU(s) x {i.gpu_memory / GIB:.1f} GiB, {i.mixed_precision}, {plan.resolution} px "
        f"(latents {plan.resolution // plan.arch.vae_scale_factor}^2), {plan.rows} row{'s' if plan.rows > 1 else ''} per micro-batch "
        f"({i.train_batch_size} subject{' + ' + str(i.train_batch_size) + ' prior' if i.prior_preservation else ''}); "
        f"activations measured on fake tensors: {fmt(plan.activations[False].peak_bytes)} {unit}, "
        f"{fmt(plan.activations[True].peak_bytes)} {unit} with gradient checkpointing",
        "",
        f"Per rank, {unit} (others = DeepSpeed gradient bucket + frozen VAE"
        f"{'/text encoders' if not i.train_text_encoder else ''} + {fmt(i.reserve)} {unit} reserve; CPU = offloaded states of one node's "
        f"{min(i.gpus_per_node, i.gpus)} rank(s)):",
        "",
        "| ZeRO | offload | checkpointing | params | grads | optimizer | ZeRO-3 gathered | activations | others | GPU total | CPU per node | fits |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in plan.table:
        m = row.memory
        lines.append(
            f"| {row.option.label} | {fmt(m.params)} | {fmt(m.grads)} | {fmt(m.optimizer)} | {fmt(m.gathered)} "
            f"| {fmt(m.activations)} | {fmt(m.buffers + m.frozen + m.reserve)} | {fmt(m.gpu_total)} | {fmt(row.cpu_per_node)} "
            f"| {'yes' if row.fits else 'no'} |"
        )
    lines.append("")
    best = plan.cheapest
    if best is None:
        smallest = min(plan.table, key=lambda r: r.memory.gpu_total)
        lines.append(
            f"Nothing fits on {i.gpus} x {i.gpu_memory / GIB:.1f} GiB: the smallest option ({smallest.option.describe}) needs "
            f"{fmt(smallest.memory.gpu_total)} {unit} per GPU. Use more or larger GPUs, or a lower --resolution."
        )
    else:
        lines.append(f"Cheapest that fits ({best.option.describe}: {fmt(best.memory.gpu_total)} {unit} per GPU"
                     f"{', ' + fmt(best.cpu_per_node) + ' ' + unit + ' CPU per node' if best.cpu_per_node else ''}):")
        lines.append(run_flags(plan, best))
    return "\n".join(lines)


def format_plan_matrix(model: str, gpus: Sequence[int], memories_gib: Sequence[int], *, resolution: int,
                       train_batch_size: int, mixed_precision: str = "bf16") -> str:
    """Per-GPU totals of every option for each GPU count, and the cheapest that fits each GPU size."""
    reserve = parse_size(DEFAULT_RESERVE, "--reserve")
    plans = {(n, mem): make_plan(PlanInputs(model, n, mem * GIB, resolution, train_batch_size, mixed_precision, True, True,
                                            n, None, reserve)) for n in gpus for mem in memories_gib}
    widest = plans[(max(gpus), memories_gib[0])]
    lines = ["| ZeRO | offload | checkpointing | " + " | ".join(f"{n} GPU(s): GiB per GPU (CPU per node)" for n in gpus) + " |",
             "|---|---|---|" + "---|" * len(gpus)]
    for row in widest.table:
        cells = []
        for n in gpus:
            match = next((r for r in plans[(n, memories_gib[0])].table if r.option == row.option), None)
            cells.append("(runs as ZeRO-0)" if match is None else f"{gib(match.memory.gpu_total)}"
                         + (f" ({match.cpu_per_node / GIB:.0f})" if match.cpu_per_node else ""))
        lines.append(f"| {row.option.label} | " + " | ".join(cells) + " |")
    lines += ["", "| GPUs | GPU memory | cheapest that fits | GiB per GPU | `dreambooth run` flags |", "|---|---|---|---|---|"]
    for (n, mem), plan in plans.items():
        best = plan.cheapest
        if best is None:
            lines.append(f"| {n} | {mem} GiB | nothing fits | - | - |")
            continue
        flags = run_flags(plan, best).splitlines()[0].removeprefix(f"dreambooth run --model {model} ")
        lines.append(f"| {n} | {mem} GiB | {best.option.describe} | {gib(best.memory.gpu_total)} | `{flags}` |")
    a, c = widest.activations, widest.counts
    lines += ["", f"{model}: {c.trainable / 1e6:,.0f} M trainable + {c.frozen / 1e6:,.0f} M frozen; activations of one rank "
              f"({widest.rows} rows, {widest.resolution} px, {mixed_precision}) measured on fake tensors: "
              f"{gib(a[False].peak_bytes)} GiB, {gib(a[True].peak_bytes)} GiB with gradient checkpointing. Totals include "
              f"DeepSpeed's gradient bucket, the frozen weights and a {DEFAULT_RESERVE} reserve."]
    return "\n".join(lines)
