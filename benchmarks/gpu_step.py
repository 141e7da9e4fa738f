"""One GPU, one worker: step time, throughput and MFU of full fine-tuning of the real SD 1.5 shapes.

Builds the Stable Diffusion 1.5 UNet (860 M parameters) and CLIP ViT-L/14 text encoder (123 M)
from their configs in code, with random weights (nothing is downloaded), and trains both with
DeepSpeed ZeRO-2 in one process (world size 1, the engine ``dreambooth.training.engine`` builds),
bf16, SDPA attention (diffusers' default ``AttnProcessor2_0``), 512 px images (latents 4x64x64).
Each step draws random latents, noise, timesteps and token ids for ``B`` subject + ``B`` prior
rows (DreamBooth's 1:1 mix, so the UNet sees ``2B`` rows), runs ``DreamBoothModule``, the
DreamBooth loss, ``engine.backward`` and ``engine.step`` (AdamW, clipping).

    python benchmarks/gpu_step.py                     # real SD 1.5 shapes on a GPU, batch 2+2
    python benchmarks/gpu_step.py --batch 4 --steps 30
    python benchmarks/gpu_step.py --count-flops-only  # params + FLOPs/step of SD 1.5 (any machine)
    python benchmarks/gpu_step.py --tiny              # CI: same code path, tiny model, CPU, < 1 min

FLOPs: one training step (text encoder + UNet forward, loss, backward) is counted once with
``torch.utils.flop_counter.FlopCounterMode`` on a copy of the model on the ``meta`` device (shapes
only: no memory, no time). There SDPA runs as its math decomposition, whose matmuls are exactly
what the counter's fused-SDPA formulas count on GPU (2 matmuls forward, 4 backward); on CPU the
counter has no formula for the fused CPU kernel and would miss attention. Only matmuls,
convolutions and attention are counted (the usual MFU convention); the optimizer's element-wise
work is not. MFU = FLOPs/step / (s/step) / peak.

Peak (``--peak-tflops``, default from the GPU's name): dense bf16 tensor-core TFLOP/s from NVIDIA's
data sheets, i.e. half the "with sparsity" figure (H100 SXM 1979 / 2 = 989). H100 SXM and H200:
989; H100 NVL: 835; H100 PCIe: 756; A100: 312; L40S: 362; L4: 121. Other GPUs, non-bf16 runs and
CPU print n/a unless ``--peak-tflops`` is given.

Prints a table and appends it to benchmarks/RESULTS.md with the machine, versions and command.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append_results, environment  # noqa: E402

CLIP_VOCAB_SIZE = 49408
TEXT_LENGTH = 77

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


@dataclass(frozen=True)
class Shapes:
    """What to build: the UNet and text-encoder configs, the image side and the VAE's downsampling."""

    name: str
    unet: dict
    text: dict
    resolution: int
    vae_factor: int  # image side / latent side


def sd15_shapes() -> Shapes:
    """Stable Diffusion 1.5: the unet/ text_encoder/ vae/ configs the project ships for ``dreambooth plan``."""
    from dreambooth.planning.architectures import ARCHITECTURES_DIR

    return model_shapes("SD 1.5", str(ARCHITECTURES_DIR / "stable-diffusion-v1-5"), resolution=512)


def model_shapes(name: str, model_path: str, resolution: int) -> Shapes:
    """The layout of a diffusers folder, read from its own ``unet/``, ``text_encoder/`` and ``vae/``
    configs (the project's built-in models, so the benchmark cannot drift from them)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    unet = dict(UNet2DConditionModel.load_config(model_path, subfolder="unet"))
    text = CLIPTextConfig.from_pretrained(model_path, subfolder="text_encoder").to_dict()
    vae_blocks = AutoencoderKL.load_config(model_path, subfolder="vae")["block_out_channels"]
    return Shapes(name, unet, text, resolution=resolution, vae_factor=2 ** (len(vae_blocks) - 1))


def tiny_shapes() -> Shapes:
    """The repo's built-in ``tiny`` model (its VAE downsamples 2x, so 32 px -> 16x16 latents)."""
    from dreambooth.models import resolve_model

    return model_shapes("tiny", resolve_model("tiny"), resolution=32)


def build_module(shapes: Shapes):
    """``DreamBoothModule`` (UNet + CLIP text encoder, both trainable) with random weights."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreambooth.training.module import DreamBoothModule

    unet = UNet2DConditionModel.from_config(shapes.unet)
    text_encoder = CLIPTextModel(
        CLIPTextConfig.from_dict({"bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407, **shapes.text})
    )
    return DreamBoothModule(unet, text_encoder, train_text_encoder=True)


def sd15_noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, steps_offset=1, prediction_type="epsilon",
    )


def make_batch(rows: int, latent: int, device: torch.device, generator: Optional[torch.Generator] = None):
    """Random latents, noise, timesteps and conditions (``input_ids``: BOS, 75 random tokens, EOS) for ``rows`` rows."""
    kwargs = {"device": device, "generator": generator}
    latents = torch.randn(rows, 4, latent, latent, **kwargs)
    noise = torch.randn(rows, 4, latent, latent, **kwargs)
    timesteps = torch.randint(0, 1000, (rows,), **kwargs)
    input_ids = torch.randint(0, CLIP_VOCAB_SIZE - 2, (rows, TEXT_LENGTH), **kwargs)
    input_ids[:, 0], input_ids[:, -1] = 49406, 49407
    return latents, noise, timesteps, {"input_ids": input_ids}


def count_step_flops(shapes: Shapes, rows: int) -> tuple[int, dict[str, int]]:
    """FLOPs of one forward + backward of text encoder + UNet + loss, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from dreambooth.training.module import diffusion_target

    latent = shapes.resolution // shapes.vae_factor
    with torch.device("meta"):
        module = build_module(shapes)
        latents, noise, timesteps, conditions = make_batch(rows, latent, torch.device("meta"))
    counter = FlopCounterMode(display=False)
    with counter:
        prediction = module(latents + noise, timesteps, conditions)  # add_noise's arithmetic is not counted
        target = diffusion_target(sd15_noise_scheduler(), latents, noise, timesteps)
        # dreambooth_loss's two MSE halves (it calls .item(), which meta tensors lack): no matmuls either way
        loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
        loss.backward()
    by_op = {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return counter.get_total_flops(), by_op


def count_params(module) -> tuple[int, int]:
    unet = sum(p.numel() for p in module.unet.parameters())
    text = sum(p.numel() for p in module.text_encoder.parameters())
    return unet, text


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


def run(shapes: Shapes, batch: int, precision: str, steps: int, warmup: int, device: torch.device) -> dict:
    """Train ``warmup + steps`` steps with ZeRO-2 in this process; return timings and sizes."""
    from dreambooth.config import TrainConfig
    from dreambooth.training.engine import build_engine
    from dreambooth.training.module import diffusion_target, dreambooth_loss

    init_single_process_group(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    module = build_module(shapes)
    unet_params, text_params = count_params(module)
    train = TrainConfig(
        zero_stage=2, mixed_precision=precision, train_batch_size=batch, max_train_steps=warmup + steps,
        learning_rate=1e-6, max_grad_norm=1.0, cpus_per_worker=float(torch.get_num_threads()),
    )
    if device.type == "cuda":
        module.to(device)  # DeepSpeed would move it too; here the bf16 cast happens on the GPU
    engine, _ = build_engine(module, train)
    dtype = next(engine.module.parameters()).dtype
    scheduler = sd15_noise_scheduler()
    latent = shapes.resolution // shapes.vae_factor
    generator = torch.Generator(device=device).manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for step in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        latents, noise, timesteps, conditions = make_batch(2 * batch, latent, device, generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = engine(noisy.to(dtype), timesteps, conditions)
        target = diffusion_target(scheduler, latents, noise, timesteps)
        loss = dreambooth_loss(prediction, target, batch, 1.0)
        engine.backward(loss.total)
        engine.step()
        sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(loss.total.item())
    if not all(np.isfinite(losses)):
        raise RuntimeError(f"non-finite loss: {losses}")
    peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    engine.destroy()
    torch.distributed.destroy_process_group()
    return {
        "step_s": float(np.median(times)), "unet_params": unet_params, "text_params": text_params,
        "peak_mem": peak_mem, "dtype": str(dtype).replace("torch.", ""), "final_loss": losses[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model, 32 px, CPU fp32 (CI; < 1 min)")
    parser.add_argument("--quick", action="store_true", help="alias of --tiny")
    parser.add_argument("--batch", type=int, default=None, help="subject rows per step (as many prior rows are added); default 2, tiny 1")
    parser.add_argument("--steps", type=int, default=None, help="timed steps; default 20, tiny 4")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps; default 5, tiny 2")
    parser.add_argument("--precision", choices=("bf16", "no"), default=None,
                        help="bf16 (default on GPU) or no = fp32 (default on CPU, which has no fast bf16)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s for MFU (default: from the GPU name)")
    parser.add_argument("--count-flops-only", action="store_true", help="print params and FLOPs/step, train nothing")
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    tiny = args.tiny or args.quick

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["DS_ACCELERATOR"] = device.type  # DeepSpeed's accelerator must match where the model runs
    from dreambooth.models import quiet_libraries

    quiet_libraries()
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    logging.getLogger("deepspeed").setLevel(logging.WARNING)

    shapes = tiny_shapes() if tiny else sd15_shapes()
    batch = args.batch or (1 if tiny else 2)
    steps = args.steps or (4 if tiny else 20)
    warmup = args.warmup if args.warmup is not None else (2 if tiny else 5)
    precision = args.precision or ("bf16" if device.type == "cuda" else "no")
    if not tiny and device.type == "cpu" and not args.count_flops_only:
        print("warning: the full SD 1.5 step on CPU takes minutes per step; use --tiny or --count-flops-only", file=sys.stderr)

    start = time.perf_counter()
    flops, by_op = count_step_flops(shapes, 2 * batch)
    count_s = time.perf_counter() - start
    with torch.device("meta"):
        unet_params, text_params = count_params(build_module(shapes))
    print(f"{shapes.name}: UNet {unet_params:,} params, text encoder {text_params:,} params, "
          f"total {unet_params + text_params:,} (all trainable)")
    print(f"FLOPs of one training step at {shapes.resolution} px, {2 * batch} rows: {flops / 1e9:.5g} GFLOP "
          f"({flops / 2 / batch / 1e9:.4g} GFLOP per row; counted in {count_s:.1f} s) by op: "
          + ", ".join(f"{op} {n / 1e9:.1f}G" for op, n in sorted(by_op.items(), key=lambda kv: -kv[1])))
    if args.count_flops_only:
        return

    result = run(shapes, batch, precision, steps, warmup, device)
    assert (result["unet_params"], result["text_params"]) == (unet_params, text_params)
    peak = args.peak_tflops if args.peak_tflops is not None else default_peak_tflops(device, precision)
    achieved = flops / result["step_s"] / 1e12
    mfu = f"{100 * achieved / peak:.1f}% of {peak:g}" if peak else "n/a"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    mem = f"{result['peak_mem'] / 2**30:.1f}" if result["peak_mem"] is not None else "n/a"
    header = (
        "| model | device | precision | ZeRO | rows/step (subject+prior) | params (UNet + text) | GFLOP/step | s/step (median) "
        "| UNet samples/s | TFLOP/s | MFU | peak GPU mem GiB |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    row = (
        f"| {shapes.name} {shapes.resolution} px | {device_name} | {result['dtype']} | 2 | {batch}+{batch} "
        f"| {unet_params / 1e6:.1f} M + {text_params / 1e6:.1f} M | {flops / 1e9:.4g} | {result['step_s']:.4f} "
        f"| {2 * batch / result['step_s']:.2f} | {achieved:.3g} | {mfu} | {mem} |"
    )
    table = f"{header}\n{row}"
    print(f"{warmup} warm-up + {steps} timed steps, final loss {result['final_loss']:.4f}")
    print(table)
    if not args.no_write:
        append_results("Single-GPU step and MFU (gpu_step.py)", table, environment(), " ".join(sys.argv))


if __name__ == "__main__":
    main()
