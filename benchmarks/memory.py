"""Per-rank memory of the model states (parameters, gradients, optimizer state) at ZeRO 0/1/2/3.

Runs 2 Ray Train workers (gloo, one CPU each) per configuration. Each worker builds the model,
wraps it with ``dreambooth.training.engine.build_engine`` (bf16 like GPU runs, torch AdamW; with
``offload`` DeepSpeed's CPU Adam, a one-time JIT build), trains one step so the optimizer state
exists, runs the forward and backward of a second step and, at that point (gradients and
optimizer state both alive: the peak of the model states), counts the bytes of every tensor the
rank holds, per kind:

    params        the module's working weights: full bf16 copies (ZeRO 0-2), or this rank's
                  partitions (``p.ds_tensor``) plus the small "persistent" parameters that ZeRO-3
                  keeps whole (below ``stage3_param_persistence_threshold``)
    grads         gradients DeepSpeed keeps (``p.grad``, ``averaged_gradients``, the grad partition
                  buffers, the fp32 master's ``.grad`` under offload)
    fp32 master   the fp32 copy of the weights the optimizer updates (full at ZeRO-0, partitioned at 1-3)
    Adam state    ``exp_avg`` + ``exp_avg_sq`` (+ step) of the inner optimizer
    buffers       anything else the ZeRO optimizer allocated (communication / offload staging buffers);
                  not model states, shown apart

Tensors are counted once per storage (views into DeepSpeed's flat buffers count the buffer once).
With optimizer offload, fp32 master, fp32 grads and Adam state live in host memory: the
"offloaded" column (on this CPU-only machine everything is host memory anyway). RSS growth is the
worker's resident memory at the measurement minus before the model was built (includes
activations and allocator slack: a sanity check, not the figure compared).

Beside them: DeepSpeed's own estimators (``estimate_zero2_model_states_mem_needs`` /
``estimate_zero3_model_states_mem_needs``, the functions behind ``*_all_live`` / ``*_all_cold``;
they exist for ZeRO-2 and 3 only), and the ZeRO paper's (2 + 2 + 12)·Ψ rule for mixed-precision
Adam: 16Ψ, 4Ψ + 12Ψ/N, 2Ψ + 14Ψ/N, 16Ψ/N at stages 0-3.

The model is DreamBoothModule with the SD 1.5 UNet structure at 1/5 of the width
(block_out_channels 64/128/256/256, 2 layers per block, SD 1.5's block types) and a CLIP text
encoder of SD 1.5's depth at width 256, so it fits this machine.

``--sdxl``: SDXL base's shipped architecture at 1/5 of every width (``planning.architectures.narrowed``:
3 UNet levels with transformer depth 1/2/10, both text encoders at full depth; 149 M parameters), built
as training builds it (``DreamBoothModule`` of the SDXL family). Model states at ZeRO 0/2/3 are counted
in the workers as above; activations of one micro-batch with gradient checkpointing off and on are
measured on real CPU tensors. Each sits next to ``dreambooth plan``'s prediction for the same shapes;
then plan's table for full-size SDXL on 1/2/4/8 GPUs of 24 and 80 GiB (~15 min on 2 shared cores).

    python benchmarks/memory.py            # scaled SD 1.5, ZeRO 0/1/2/3 + offload at 2 and 3 (~5 min)
    python benchmarks/memory.py --quick    # CI: tiny model, ZeRO 0 and 3, no offload
    python benchmarks/memory.py --sdxl     # SDXL at 1/5 width: ZeRO 0/2/3 x checkpointing, measured vs
                                           # `dreambooth plan`; then plan's SDXL table on 1/2/4/8 x 24/80 GiB

Prints a table and appends it to benchmarks/RESULTS.md with the machine, versions and command.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import append_results, environment  # noqa: E402
from benchmarks.gpu_step import CLIP_VOCAB_SIZE, TEXT_LENGTH, Shapes, build_module, make_batch, tiny_shapes  # noqa: E402

WORKERS = 2
RESULT_FILE = "memory.json"
MB = 2**20
KINDS = ("params", "grads", "fp32 master", "Adam state", "buffers")
OFFLOADED_KINDS = ("fp32 master", "Adam state")  # + the fp32 grads of the master, under offload


def scaled_sd15_shapes() -> Shapes:
    """SD 1.5's UNet structure at 1/5 width and a 12-layer CLIP text encoder of width 256."""
    unet = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 256, 256),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=256,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    text = dict(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=1024,
        num_attention_heads=4,
        num_hidden_layers=12,
        max_position_embeddings=TEXT_LENGTH,
        hidden_act="quick_gelu",
        projection_dim=256,
    )
    # 64 px with SD's 8x VAE: 8x8 latents, the smallest the 4-level UNet takes (activations are not measured)
    return Shapes("SD 1.5 UNet at 1/5 width", unet, text, resolution=64, vae_factor=8)


# --------------------------------------------------------------------------- counting (in the workers)


def _tensors(obj, depth: int = 3):
    """Tensors in ``obj``: a tensor, or lists/tuples/dicts of them up to ``depth`` levels deep."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth > 0 and isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item, depth - 1)
    elif depth > 0 and isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item, depth - 1)


def _kind_of_attribute(name: str) -> str:
    """Which kind a ZeRO optimizer's attribute holds (DeepSpeed 0.19's names: ``single_partition_of_fp32_groups``,
    ``fp32_partitioned_groups_flat``, ``averaged_gradients``, ``grad_partitions_flat_buffer``, ...)."""
    lowered = name.lower()
    if lowered.startswith("temp_") or "norm" in lowered:
        return "buffers"  # offload staging buffers, per-parameter norms
    if "grad" in lowered:
        return "grads"
    if "fp32" in lowered:
        return "fp32 master"
    return "buffers"  # views of the params (seen already), communication / offload buffers


def model_state_bytes(engine, offload: bool) -> dict[str, int]:
    """Bytes this rank holds per kind; each storage is counted once, by the first kind that reaches it."""
    seen: set[int] = set()
    sizes = dict.fromkeys(KINDS, 0)
    sizes["offloaded"] = 0

    def add(kind: str, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in seen:
            return
        seen.add(storage.data_ptr())
        sizes[kind] += storage.nbytes()
        # under offload the master, its fp32 grads and the Adam state are in host memory
        if offload and (kind in OFFLOADED_KINDS or (kind == "grads" and tensor.dtype == torch.float32)):
            sizes["offloaded"] += storage.nbytes()

    zero_opt = engine.optimizer
    inner = getattr(zero_opt, "optimizer", zero_opt)  # the torch AdamW / DeepSpeedCPUAdam inside the wrapper
    wrapped = inner is not zero_opt
    attributes = [(name, value) for name, value in vars(zero_opt).items() if value is not inner] if wrapped else []
    params = list(engine.module.parameters())
    # 1. working weights: flat buffers the parameters are views of count as params
    for p in params:
        add("params", p.data)
        if hasattr(p, "ds_tensor"):
            add("params", p.ds_tensor)
    # 2. the fp32 master (the weights the inner optimizer steps)
    for name, value in attributes:
        if _kind_of_attribute(name) == "fp32 master":
            for tensor in _tensors(value):
                add("fp32 master", tensor)
    for group in inner.param_groups:
        for p in group["params"]:
            add("fp32 master" if wrapped else "params", p)
    # 3. gradients: .grad of parameters, master and optimizer-held tensors, and the grad buffers
    holders = params + [p for group in inner.param_groups for p in group["params"]]
    holders += [tensor for _, value in attributes for tensor in _tensors(value)]
    for tensor in holders:
        if tensor.grad is not None:
            add("grads", tensor.grad)
    for name, value in attributes:
        if _kind_of_attribute(name) == "grads":
            for tensor in _tensors(value):
                add("grads", tensor)
    # 4. Adam's exp_avg / exp_avg_sq / step
    for state in inner.state.values():
        for tensor in _tensors(state):
            add("Adam state", tensor)
    # 5. whatever else the ZeRO optimizer holds
    for name, value in attributes:
        for tensor in _tensors(value):
            add("buffers", tensor)
    return sizes


def measure_worker(config: dict) -> None:
    """Ray Train worker: build, one step, forward+backward of a second, count, report."""
    import psutil
    import ray.train
    import torch.distributed as dist

    from dreambooth.config import TrainConfig
    from dreambooth.models import quiet_libraries
    from dreambooth.planning.activations import example_conditions, training_module
    from dreambooth.training.engine import build_engine

    quiet_libraries()
    torch.set_num_threads(1)
    rank = ray.train.get_context().get_world_rank()
    process = psutil.Process()
    import deepspeed  # noqa: F401  (imports before the RSS baseline)
    from diffusers import UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    gc.collect()
    rss_before = process.memory_info().rss
    torch.manual_seed(0)
    shapes: Shapes = config["shapes"]
    arch = config.get("arch")  # an Architecture (SDXL-shaped runs): built as training builds it, family and all
    module = build_module(shapes) if arch is None else training_module(arch, checkpointing=False)
    train = TrainConfig(
        zero_stage=config["zero"], offload_optimizer=config["offload"], mixed_precision=config["precision"],
        train_batch_size=1, max_train_steps=2, learning_rate=1e-5, cpus_per_worker=1.0,
    )
    start = time.perf_counter()
    engine, _ = build_engine(module, train)
    init_s = time.perf_counter() - start
    del module
    dtype = next(engine.module.parameters()).dtype
    latent = shapes.resolution // shapes.vae_factor
    generator = torch.Generator().manual_seed(rank)
    start = time.perf_counter()
    for step in range(2):
        latents, noise, timesteps, conditions = make_batch(2, latent, torch.device("cpu"), generator)
        if arch is not None:  # the family's conditions (SDXL: both tokenizers' ids and time_ids)
            conditions = example_conditions(engine.module, 2, shapes.resolution, CLIP_VOCAB_SIZE)
        prediction = engine(latents.to(dtype) + noise.to(dtype), timesteps, conditions)
        loss = torch.nn.functional.mse_loss(prediction.float(), noise)
        engine.backward(loss)
        if step == 1:
            gc.collect()
            sizes = model_state_bytes(engine, config["offload"])
            sizes["rss_growth"] = process.memory_info().rss - rss_before
        engine.step()
    step_s = (time.perf_counter() - start) / 2
    persistent = sum(p.numel() for p in engine.module.parameters() if getattr(p, "ds_persist", False))
    sizes.update(rank=rank, persistent_params=persistent, init_s=init_s, step_s=step_s,
                 optimizer=type(engine.optimizer).__name__,
                 inner=type(getattr(engine.optimizer, "optimizer", engine.optimizer)).__name__)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sizes)
    engine.destroy()
    # Ray Train keeps the metrics of the last *checkpointed* report: rank 0 attaches them as a checkpoint
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            Path(folder, RESULT_FILE).write_text(json.dumps(everyone))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report({"rank": rank}, checkpoint=checkpoint)


# --------------------------------------------------------------------------- driver


def run_config(shapes: Shapes, zero: int, offload: bool, precision: str, storage: str, arch=None) -> list[dict]:
    import ray.train
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    env = {key: os.environ[key] for key in ("TORCH_EXTENSIONS_DIR", "DREAMBOOTH_CACHE", "HF_HUB_OFFLINE", "HF_HOME")
           if key in os.environ}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    trainer = TorchTrainer(
        measure_worker,
        train_loop_config={"shapes": shapes, "arch": arch, "zero": zero, "offload": offload, "precision": precision},
        scaling_config=ScalingConfig(num_workers=WORKERS, use_gpu=False, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=ray.train.RunConfig(
            name=f"memory-z{zero}{'-offload' if offload else ''}", storage_path=storage,
            worker_runtime_env={"env_vars": env},
        ),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as folder:
        ranks = json.loads(Path(folder, RESULT_FILE).read_text())
    return sorted(ranks, key=lambda r: r["rank"])


def estimates(total: int, largest_layer: int, zero: int, offload: bool) -> dict[str, str]:
    """DeepSpeed's estimator (per GPU / per CPU, MB) and the ZeRO paper's rule for ``zero`` at N ranks."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n = WORKERS
    paper = {0: 16 * total, 1: 4 * total + 12 * total / n, 2: 2 * total + 14 * total / n, 3: 16 * total / n}[zero]
    if zero == 2:
        cpu, gpu = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=n, cpu_offload=offload)
        ds = f"{gpu / MB:.1f} / {cpu / MB:.1f}"
    elif zero == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total, largest_layer, num_gpus_per_node=n, cpu_offload=offload, cpu_offload_params=False, zero_init=False,
        )
        ds = f"{gpu / MB:.1f} / {cpu / MB:.1f}"
    else:
        ds = "(none for ZeRO-0/1)"
    return {"deepspeed": ds, "paper": "-" if offload else f"{paper / MB:.1f}"}  # the rule has no offload form


# --------------------------------------------------------------------------- SDXL-shaped (--sdxl)

SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
WIDTH_DIVISOR = 5  # channels and hidden sizes at 1/5 (parameters ~1/25): SDXL's states fit this machine
HEAD_DIM = 64  # SDXL's attention head width, kept: widths round to multiples of it
STATES_RESOLUTION = 64  # px for the model-state runs (8x8 latents: the smallest SDXL's 3 levels take)
ACTIVATION_RESOLUTION = 512  # px for the activation runs (64x64 latents)
ROWS = 2  # one subject + one prior example, as a DreamBooth micro-batch of 1
ACTIVATION_DTYPE = torch.float32  # this CPU has no bf16 units (bf16 convolutions run ~50x slower); bytes scale by 2
PLAN_GPUS = (1, 2, 4, 8)
PLAN_MEMORY_GIB = (24, 80)


def scaled_sdxl():
    """SDXL base (its shipped configs: 3 UNet levels, transformer depth 1/2/10, text_time conditioning,
    CLIP ViT-L 12 layers + OpenCLIP bigG 32 layers) with every width / 5, in 64-wide heads."""
    from dreambooth.planning.architectures import load_architecture, narrowed

    return narrowed(load_architecture(SDXL), WIDTH_DIVISOR, HEAD_DIM)


def run_sdxl(args) -> None:
    """Scaled SDXL on 2 ranks: model states at ZeRO 0/2/3 (measured in DeepSpeed workers) and activations
    with checkpointing off/on (measured on real CPU tensors), each next to ``plan``'s prediction."""
    from dataclasses import replace

    import ray

    from dreambooth.planning.activations import measure_activations
    from dreambooth.planning.architectures import count_parameters
    from dreambooth.planning.memory import MIXED, Option, deepspeed_defaults, rank_memory

    arch = scaled_sdxl()
    buckets = deepspeed_defaults()
    counts = count_parameters(arch, persistence_threshold=buckets.persistence_threshold)
    sizes = ", ".join(f"{name} {n / 1e6:.2f} M" for name, n in counts.per_component.items())
    print(f"{arch.model}: {sizes}; trainable {counts.trainable / 1e6:.2f} M; {WORKERS} ranks, bf16")
    shapes = Shapes(arch.model, arch.unet.config, arch.text_encoders[0].config, resolution=STATES_RESOLUTION,
                    vae_factor=arch.vae_scale_factor)
    after_backward = replace(MIXED, fp32_grads=0)  # measured before the step makes the fp32 gradient partition
    from dreambooth.training.engine import prebuild_deepspeed_ops

    prebuild_deepspeed_ops()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    states = {}
    try:
        with tempfile.TemporaryDirectory() as storage:
            for zero in (0, 2, 3):
                ranks = run_config(shapes, zero, False, "bf16", storage, arch=arch)
                worst = max(ranks, key=lambda r: sum(r[k] for k in KINDS if k != "buffers"))
                planned = rank_memory(Option(zero, False, False, False), counts, after_backward, WORKERS, activations=0,
                                      buckets=buckets, reserve=0)
                states[zero] = (worst, planned)
    finally:
        ray.shutdown()
    acts = {}
    for checkpointing in (False, True):
        shape = dict(resolution=ACTIVATION_RESOLUTION, rows=ROWS, dtype=ACTIVATION_DTYPE, checkpointing=checkpointing)
        acts[checkpointing] = (measure_activations(arch, fake=True, **shape), measure_activations(arch, fake=False, **shape))

    def mb(n: float) -> str:
        return f"{n / MB:.1f}"

    lines = ["| ZeRO | checkpointing | params MB (measured / plan) | grads MB | fp32 master + Adam MB | model states MB "
             "| activations MB (measured / plan) | states + activations MB (measured / plan) |",
             "|---|---|---|---|---|---|---|---|"]
    for zero, (r, planned) in states.items():
        measured_states = r["params"] + r["grads"] + r["fp32 master"] + r["Adam state"]
        planned_states = planned.params + planned.grads + planned.optimizer
        for checkpointing, (predicted, measured) in acts.items():
            lines.append(
                f"| {zero} | {'on' if checkpointing else 'off'} | {mb(r['params'])} / {mb(planned.params)} "
                f"| {mb(r['grads'])} / {mb(planned.grads)} | {mb(r['fp32 master'] + r['Adam state'])} / {mb(planned.optimizer)} "
                f"| {mb(measured_states)} / {mb(planned_states)} | {mb(measured.peak_bytes)} / {mb(predicted.peak_bytes)} "
                f"| {mb(measured_states + measured.peak_bytes)} / {mb(planned_states + predicted.peak_bytes)} |")
    table = "\n".join(lines)
    summary = (
        f"{arch.model} ({sizes}; {counts.trainable / 1e6:.2f} M trainable), {WORKERS} ranks, bf16. Model states: the "
        f"largest rank of DeepSpeed workers after backward (before the step's fp32 gradient copy, which plan adds on "
        f"top), at {STATES_RESOLUTION} px. Activations: one micro-batch of {ROWS} rows at {ACTIVATION_RESOLUTION} px in fp32, "
        f"measured on real CPU tensors (MemTracker's live tensor bytes, activations + backward temporaries) next to "
        f"plan's fake-tensor prediction (bf16 halves both). Process RSS is no check here: glibc keeps freed blocks "
        f"and reuses the model build's, so its growth over one step ranged from 0.4x to 15x the live bytes across runs here."
    )
    from dreambooth.planning.report import format_plan_matrix

    matrix = format_plan_matrix(SDXL, PLAN_GPUS, PLAN_MEMORY_GIB, resolution=1024, train_batch_size=1)
    print(table, summary, "", matrix, sep="\n")
    if not args.no_write:
        append_results("SDXL-shaped memory, measured vs `dreambooth plan`, and the SDXL plan (memory.py --sdxl)",
                       f"{table}\n\n{summary}\n\n### `dreambooth plan` for SDXL base, 1024 px, batch 1 + 1 prior, bf16\n\n{matrix}",
                       environment(), " ".join(sys.argv))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, ZeRO 0 and 3, no offload (CI)")
    parser.add_argument("--precision", choices=("bf16", "no"), default="bf16", help="bf16 (default, as on GPUs) or no = fp32")
    parser.add_argument("--sdxl", action="store_true",
                        help="SDXL-shaped model at 1/5 width: ZeRO 0/2/3 x checkpointing off/on next to `dreambooth plan`, "
                             "and the full-size SDXL plan on 1/2/4/8 x 24/80 GiB GPUs")
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    from dreambooth.models import quiet_libraries

    quiet_libraries()
    if args.sdxl:
        run_sdxl(args)
        return
    shapes = tiny_shapes() if args.quick else scaled_sd15_shapes()
    grid = [(0, False), (3, False)] if args.quick else [(0, False), (1, False), (2, False), (3, False), (2, True), (3, True)]

    from deepspeed.runtime.zero.stage3 import model_to_params

    module = build_module(shapes)  # real weights: DeepSpeed's model_to_params dedups by data_ptr
    unet_params = sum(p.numel() for p in module.unet.parameters())
    text_params = sum(p.numel() for p in module.text_encoder.parameters())
    total_params, largest_layer = model_to_params(module)  # what the *_all_live estimators use
    del module
    print(f"{shapes.name}: UNet {unet_params:,} params, text encoder {text_params:,} params, "
          f"total {unet_params + text_params:,}; {WORKERS} ranks, {args.precision}")

    from dreambooth.training.engine import prebuild_deepspeed_ops

    prebuild_deepspeed_ops()
    if any(offload for _, offload in grid):
        start = time.perf_counter()
        from deepspeed.ops.op_builder import CPUAdamBuilder

        CPUAdamBuilder().load()  # the one JIT build, here rather than in both workers at once
        print(f"CPU Adam ready in {time.perf_counter() - start:.1f} s")

    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    rows, measured = [], {}
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as storage:
            for zero, offload in grid:
                start = time.perf_counter()
                ranks = run_config(shapes, zero, offload, args.precision, storage)
                seconds = time.perf_counter() - start
                est = estimates(total_params, largest_layer, zero, offload)
                for r in ranks:
                    total = sum(r[k] for k in KINDS if k != "buffers")
                    measured.setdefault((zero, offload), []).append(total)
                    rows.append((zero, offload, r, total, est, seconds))
    finally:
        ray.shutdown()
    total_s = time.perf_counter() - started

    def mb(n: float) -> str:
        return f"{n / MB:.1f}"

    header = (
        "| ZeRO | offload | rank | params MB | grads MB | fp32 master MB | Adam state MB | model states MB "
        "| of which offloaded MB | buffers MB | RSS growth MB | ZeRO paper rule MB | DeepSpeed estimate MB (per GPU / per CPU) "
        "| ZeRO optimizer |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for zero, offload, r, total, est, _ in rows:
        lines.append(
            f"| {zero} | {'CPU' if offload else '-'} | {r['rank']} | {mb(r['params'])} | {mb(r['grads'])} "
            f"| {mb(r['fp32 master'])} | {mb(r['Adam state'])} | {mb(total)} | {mb(r['offloaded']) if offload else '-'} "
            f"| {mb(r['buffers'])} | {mb(r['rss_growth'])} | {est['paper']} | {est['deepspeed']} "
            f"| {r['optimizer']} ({r['inner']}) |"
        )
    table = "\n".join(lines)
    zero0 = max(measured[(0, False)])
    zero3 = max(measured[(3, False)])
    ratio = zero3 / zero0
    summary = (
        f"{shapes.name}: {unet_params / 1e6:.2f} M UNet + {text_params / 1e6:.2f} M text encoder = "
        f"{total_params / 1e6:.2f} M params (largest layer {largest_layer / 1e6:.2f} M), {WORKERS} ranks, "
        f"{args.precision}. Model states per rank at ZeRO-3 / ZeRO-0: {mb(zero3)} / {mb(zero0)} MB = {ratio:.2f} "
        f"(target <= 0.6: {'met' if ratio <= 0.6 else 'NOT met'})."
    )
    persistent = max(r["persistent_params"] for z, o, r, *_ in rows if z == 3 and not o)
    if persistent:
        summary += (
            f" ZeRO-3 keeps {persistent / 1e6:.2f} M small parameters (< 1e5 elements each, DeepSpeed's default "
            f"stage3_param_persistence_threshold) whole on every rank: {mb(2 * persistent if args.precision == 'bf16' else 4 * persistent)} "
            "MB of its params column beyond the 1/N partition."
        )
    per_config = "; ".join(f"ZeRO-{z}{' + offload' if o else ''} {s:.0f} s" for (z, o), s in
                           dict(((z, o), s) for z, o, _, _, _, s in rows).items())
    print(table)
    print()
    print(summary)
    print(f"wall time {total_s:.0f} s ({per_config})")
    if not args.no_write:
        append_results("Per-rank model-state memory by ZeRO stage (memory.py)", f"{table}\n\n{summary}", environment(),
                       " ".join(sys.argv))


if __name__ == "__main__":
    main()
