"""One GPU, one worker: step time, throughput, MFU and peak memory of full DreamBooth fine-tuning
of the real SD 1.5 or SDXL shapes, next to ``dreambooth plan``'s memory prediction.

Builds the model from the configs the project ships for ``dreambooth plan`` with random weights
(nothing is downloaded): ``--model sd15`` the SD 1.5 UNet (860 M parameters) and CLIP ViT-L/14 text
encoder (123 M) at 512 px (latents 4x64x64); ``--model sdxl`` the SDXL base UNet (2.57 B), CLIP
ViT-L (123 M) and OpenCLIP ViT-bigG (695 M) at 1024 px (latents 4x128x128). All of it trains, as
``DreamBoothModule`` of the model's family (``benchmarks/gpu_step_models.py``): SDXL's UNet gets
both encoders' penultimate states, the pooled ``text_embeds`` and ``time_ids``. DeepSpeed ZeRO
(``--zero-stage 2|3``, default 2; at the stage asked for, although ``dreambooth run`` trains one
rank at stage 0) in one process (world size 1), bf16, SDPA attention (diffusers' default
``AttnProcessor2_0``), optionally gradient checkpointing (the family's, in every trained part).
Each step draws random latents, timesteps and token ids for ``B`` subject + ``B`` prior rows
(DreamBooth's 1:1 mix, so the UNet sees ``2B`` rows) and runs the training loop's loss
(``mixed_batch_loss``: noise, ``DreamBoothModule``, the DreamBooth loss), ``engine.backward`` and
``engine.step`` (AdamW, clipping).

    python benchmarks/gpu_step.py                     # real SD 1.5 shapes on a GPU, batch 2+2, ZeRO-2
    python benchmarks/gpu_step.py --batch 4 --steps 30
    python benchmarks/gpu_step.py --model sdxl --sweep                    # SDXL 1024 px: ZeRO-2/3 x checkpointing off/on
    python benchmarks/gpu_step.py --model sdxl --zero-stage 3 --gradient-checkpointing   # one SDXL row
    python benchmarks/gpu_step.py --model sdxl --count-flops-only        # params + FLOPs/step (any machine)
    python benchmarks/gpu_step.py --tiny              # CI: same code path, tiny model, CPU, < 1 min
    python benchmarks/gpu_step.py --tiny --model sdxl --zero-stage 3 --gradient-checkpointing   # CI: tiny-sdxl

``--sweep`` runs every configuration (ZeRO-2/3 x checkpointing off/on) in a fresh subprocess of
this script (its own CUDA peak-memory counter and process group); a row that runs out of GPU
memory says OOM and the sweep goes on.

FLOPs: one training step (text encoders + UNet forward, loss, backward) is counted once with
``torch.utils.flop_counter.FlopCounterMode`` on a copy of the model on the ``meta`` device (shapes
only: no memory, no time). There SDPA runs as its math decomposition, whose matmuls are exactly
what the counter's fused-SDPA formulas count on GPU (2 matmuls forward, 4 backward); on CPU the
counter has no formula for the fused CPU kernel and would miss attention. Only matmuls,
convolutions and attention are counted (the usual MFU convention); the optimizer's element-wise
work and gradient checkpointing's recomputed forward are not (model FLOPs, so checkpointing shows
as lower MFU). MFU = FLOPs/step / (s/step) / peak.

Peak (``--peak-tflops``, default from the GPU's name): dense bf16 tensor-core TFLOP/s from NVIDIA's
data sheets, i.e. half the "with sparsity" figure (H100 SXM 1979 / 2 = 989). H100 SXM and H200:
989; H100 NVL: 835; H100 PCIe: 756; A100: 312; L40S: 362; L4: 121. Other GPUs, non-bf16 runs and
CPU print n/a unless ``--peak-tflops`` is given.

Memory: ``torch.cuda.max_memory_allocated`` over the warm-up and timed steps (model states,
optimizer states, activations, DeepSpeed's buffers; not the CUDA context), n/a on CPU. Beside it
``dreambooth plan``'s per-rank prediction for the same configuration on one GPU (same stage,
checkpointing, resolution and rows; without the VAE, which this benchmark does not build, and
without plan's reserve for the CUDA context) and the ratio measured / predicted.

Prints a table and appends it to benchmarks/RESULTS.md with the machine, versions and command.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append_results, environment  # noqa: E402
from benchmarks.gpu_step_models import (  # noqa: E402,F401  (memory.py imports the batch and shape helpers from here)
    CLIP_VOCAB_SIZE, TEXT_LENGTH, Shapes, Workload, build_engine_at_stage, build_module, count_params,
    count_step_flops, make_batch, noise_scheduler, part_label, planned_peak, tiny_shapes, workload,
)

GIB = 2**30
SWEEP = ((2, False), (2, True), (3, False), (3, True))
"""``--sweep``'s configurations: (ZeRO stage, gradient checkpointing)."""

# Dense bf16 tensor-core peaks (TFLOP/s), first match on torch.cuda.get_device_name() wins.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM: 1979 with sparsity / 2
    ("H200", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def init_single_process_group(device: torch.device) -> None:
    """World size 1: this process is rank 0 of its own process group (nccl on GPU, gloo on CPU)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def default_peak_tflops(device: torch.device, precision: str) -> Optional[float]:
    if device.type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_TFLOPS:
        if key in name:
            return peak
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(work: Workload, batch: int, precision: str, steps: int, warmup: int, device: torch.device, *,
        zero_stage: int = 2, checkpointing: bool = False) -> dict:
    """Train ``warmup + steps`` steps at ``zero_stage`` in this process; return timings and sizes."""
    from dreambooth.config import TrainConfig
    from dreambooth.training.engine import skip_shared_memory_comm_for_one_rank
    from dreambooth.training.module import mixed_batch_loss

    init_single_process_group(device)
    skip_shared_memory_comm_for_one_rank(1)  # CPU only: nothing to all-reduce, no JIT build of DeepSpeed's shm op
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    module = work.build()
    if checkpointing:
        module.enable_gradient_checkpointing()
    params = count_params(module)
    train = TrainConfig(
        zero_stage=zero_stage, mixed_precision=precision, train_batch_size=batch, max_train_steps=warmup + steps,
        learning_rate=1e-6, max_grad_norm=1.0, cpus_per_worker=float(torch.get_num_threads()),
        gradient_checkpointing=checkpointing,
    )
    if device.type == "cuda":
        module.to(device)  # DeepSpeed would move it too; here the bf16 cast happens on the GPU
    engine = build_engine_at_stage(module, train, cuda=device.type == "cuda")
    dtype = next(engine.module.parameters()).dtype
    scheduler = noise_scheduler()
    generator = torch.Generator(device=device).manual_seed(0)
    noise_generator = torch.Generator().manual_seed(1)  # mixed_batch_loss draws noise and timesteps on the CPU
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for step in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        latents, _, _, conditions = make_batch(2 * batch, work.latent, device, generator, family=work.family,
                                               resolution=work.resolution, channels=work.channels)
        loss = mixed_batch_loss(engine, scheduler, latents, conditions, batch, 1.0, noise_generator)
        engine.backward(loss.total)
        engine.step()
        sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(loss.total.item())
    if not all(np.isfinite(losses)):
        raise RuntimeError(f"non-finite loss: {losses}")
    peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    stage = engine.zero_optimization_stage()
    engine.destroy()
    torch.distributed.destroy_process_group()
    return {"step_s": float(np.median(times)), "params": params, "peak_mem": peak_mem, "zero_stage": stage,
            "dtype": str(dtype).replace("torch.", ""), "final_loss": losses[-1]}


def run_in_subprocess(args: argparse.Namespace, zero_stage: int, checkpointing: bool) -> dict:
    """One configuration in a fresh process of this script (``--row-json``); OOM or a crash is a row, not an exception."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--model", args.model, "--zero-stage", str(zero_stage),
                   "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--precision", args.precision, "--device", args.device, "--resolution", str(args.resolution),
                   "--row-json", str(out), *(["--tiny"] if args.tiny else []),
                   *(["--gradient-checkpointing"] if checkpointing else [])]
        proc = subprocess.run(command, capture_output=True, text=True)
        if out.is_file():
            return json.loads(out.read_text())
    tail = proc.stderr[-3000:]
    if "out of memory" in tail.lower():
        return {"error": "OOM"}
    print(f"ZeRO-{zero_stage}, checkpointing {'on' if checkpointing else 'off'}: exit {proc.returncode}\n{tail}", file=sys.stderr)
    return {"error": f"failed (exit {proc.returncode})"}


def measure_row(args: argparse.Namespace, work: Workload, device: torch.device) -> dict:
    """``--row-json``'s job: one configuration here; a CUDA OOM is recorded, not raised."""
    try:
        return run(work, args.batch, args.precision, args.steps, args.warmup, device,
                   zero_stage=args.zero_stage, checkpointing=args.gradient_checkpointing)
    except torch.cuda.OutOfMemoryError as exc:
        return {"error": "OOM", "detail": str(exc).splitlines()[0]}


HEADER = (
    "| model | device | precision | ZeRO | checkpointing | rows/step (subject+prior) | params (UNet + text) | GFLOP/step "
    "| s/step (median) | UNet samples/s | TFLOP/s | MFU | peak GPU mem GiB | plan GiB | measured / plan |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def format_row(work: Workload, device_name: str, batch: int, params: dict[str, int], flops: int, stage: int,
               checkpointing: bool, result: dict, predicted: int, peak_tflops: Optional[float]) -> str:
    """One table row; a failed configuration keeps its plan prediction and says OOM / failed in the measured cells."""
    sizes = " + ".join(f"{n / 1e6:.1f} M" for n in params.values())
    lead = f"| {work.name} {work.resolution} px | {device_name} | {result.get('dtype', '-')} | {result.get('zero_stage', stage)} " \
           f"| {'on' if checkpointing else 'off'} | {batch}+{batch} | {sizes} | {flops / 1e9:.4g} "
    plan = f"{predicted / GIB:.2f}"
    if "error" in result:
        return lead + f"| {result['error']} | - | - | - | {result['error']} | {plan} | - |"
    achieved = flops / result["step_s"] / 1e12
    mfu = f"{100 * achieved / peak_tflops:.1f}% of {peak_tflops:g}" if peak_tflops else "n/a"
    peak = result["peak_mem"]
    mem, ratio = (f"{peak / GIB:.2f}", f"{peak / predicted:.2f}") if peak is not None else ("n/a", "n/a")
    return lead + (f"| {result['step_s']:.4f} | {2 * batch / result['step_s']:.2f} | {achieved:.3g} | {mfu} "
                   f"| {mem} | {plan} | {ratio} |")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("sd15", "sdxl"), default="sd15", help="SD 1.5 at 512 px (default) or SDXL base at 1024 px")
    parser.add_argument("--tiny", action="store_true", help="the model's tiny built-in (tiny / tiny-sdxl), 32 px, CPU fp32 (CI)")
    parser.add_argument("--quick", action="store_true", help="alias of --tiny")
    parser.add_argument("--zero-stage", type=int, choices=(2, 3), default=2, help="DeepSpeed ZeRO stage (default 2)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--sweep", action="store_true", help="ZeRO-2/3 x checkpointing off/on, each in a fresh subprocess")
    parser.add_argument("--resolution", type=int, default=None, help="image side in px (default: the model's native one)")
    parser.add_argument("--batch", type=int, default=None,
                        help="subject rows per step (as many prior rows are added); default 2 SD 1.5, 1 SDXL and tiny")
    parser.add_argument("--steps", type=int, default=None, help="timed steps; default 20 SD 1.5, 10 SDXL, 4 tiny")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps; default 5 SD 1.5, 3 SDXL, 2 tiny")
    parser.add_argument("--precision", choices=("bf16", "no"), default=None,
                        help="bf16 (default on GPU) or no = fp32 (default on CPU, which has no fast bf16)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s for MFU (default: from the GPU name)")
    parser.add_argument("--count-flops-only", action="store_true", help="print params and FLOPs/step, train nothing")
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--row-json", default=None, help=argparse.SUPPRESS)  # --sweep's subprocess: one row, as JSON
    args = parser.parse_args()
    args.tiny = args.tiny or args.quick
    sdxl = args.model == "sdxl"
    args.batch = args.batch or (1 if args.tiny or sdxl else 2)
    args.steps = args.steps or (4 if args.tiny else 10 if sdxl else 20)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.tiny else 3 if sdxl else 5)
    return args


def main() -> None:
    args = parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    args.device = device.type
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "no")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["DS_ACCELERATOR"] = device.type  # DeepSpeed's accelerator must match where the model runs
    from dreambooth.models import quiet_libraries

    quiet_libraries()
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    logging.getLogger("deepspeed").setLevel(logging.WARNING)

    work = workload(args.model, args.tiny, args.resolution)
    args.resolution = work.resolution
    if args.row_json:
        Path(args.row_json).write_text(json.dumps(measure_row(args, work, device)))
        return
    if not args.tiny and device.type == "cpu" and not args.count_flops_only:
        print(f"warning: the full {work.name} step on CPU takes minutes per step; use --tiny or --count-flops-only", file=sys.stderr)

    batch = args.batch
    start = time.perf_counter()
    flops, by_op = count_step_flops(work, 2 * batch)
    count_s = time.perf_counter() - start
    with torch.device("meta"):
        params = count_params(work.build())
    print(f"{work.name}: " + ", ".join(f"{part_label(name)} {n:,} params" for name, n in params.items())
          + f", total {sum(params.values()):,} (all trainable)")
    print(f"FLOPs of one training step at {work.resolution} px, {2 * batch} rows: {flops / 1e9:.5g} GFLOP "
          f"({flops / 2 / batch / 1e9:.4g} GFLOP per row; counted in {count_s:.1f} s) by op: "
          + ", ".join(f"{op} {n / 1e9:.1f}G" for op, n in sorted(by_op.items(), key=lambda kv: -kv[1])))
    if args.count_flops_only:
        return

    peak = args.peak_tflops if args.peak_tflops is not None else default_peak_tflops(device, args.precision)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    configs = SWEEP if args.sweep else ((args.zero_stage, args.gradient_checkpointing),)
    rows = []
    for stage, checkpointing in configs:
        predicted = planned_peak(work, batch=batch, precision=args.precision, zero_stage=stage, checkpointing=checkpointing)
        if args.sweep:
            result = run_in_subprocess(args, stage, checkpointing)
        else:
            result = run(work, batch, args.precision, args.steps, args.warmup, device, zero_stage=stage, checkpointing=checkpointing)
        if "params" in result:
            assert result["params"] == params, (result["params"], params)
        rows.append(format_row(work, device_name, batch, params, flops, stage, checkpointing, result, predicted, peak))
        if "final_loss" in result:
            print(f"ZeRO-{stage}, checkpointing {'on' if checkpointing else 'off'}: {args.warmup} warm-up + "
                  f"{args.steps} timed steps, final loss {result['final_loss']:.4f}")
    table = "\n".join([HEADER, *rows])
    print(table)
    if not args.no_write:
        append_results("Single-GPU step, MFU and peak memory vs plan (gpu_step.py)", table, environment(), " ".join(sys.argv))


if __name__ == "__main__":
    main()
