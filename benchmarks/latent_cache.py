"""Latent caching: step time when prior examples come as cached latents (what the Parquet shards
hold) vs decoding their PNGs and VAE-encoding them every step.

    python benchmarks/latent_cache.py             # tiny model, 64 px, 30 steps each
    python benchmarks/latent_cache.py --quick     # CI

Same bare single-process loop, batch, model and resolution on both sides; only where the prior
latents come from differs.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append_results, environment  # noqa: E402
from dreambooth.models import load_components, quiet_libraries, resolve_model  # noqa: E402
from dreambooth.training.batches import augment, tokenize  # noqa: E402
from dreambooth.training.module import DreamBoothModule, diffusion_target, dreambooth_loss  # noqa: E402


def measure(model_path: str, resolution: int, batch: int, steps: int, cached: bool) -> float:
    import random

    torch.manual_seed(0)
    torch.set_num_threads(1)
    parts = load_components(model_path)
    parts.vae.requires_grad_(False).eval()
    module = DreamBoothModule.from_components(parts)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    rng = np.random.default_rng(0)
    pngs = []
    for _ in range(batch):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    scale = parts.vae.config.scaling_factor
    with torch.no_grad():
        pixels = torch.stack([augment(Image.open(io.BytesIO(p)).convert("RGB"), resolution, random.Random(0), True, False) for p in pngs])
        cached_latents = parts.vae.encode(pixels).latent_dist.sample() * scale
    ids = tokenize(parts.tokenizer, "a dog").repeat(2 * batch, 1)
    subject = cached_latents.clone()
    times = []
    for step in range(steps + 3):
        start = time.perf_counter()
        if cached:
            prior = cached_latents
        else:
            with torch.no_grad():
                pixels = torch.stack([augment(Image.open(io.BytesIO(p)).convert("RGB"), resolution, random.Random(step), True, False) for p in pngs])
                prior = parts.vae.encode(pixels).latent_dist.sample() * scale
        latents = torch.cat([subject, prior])
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],))
        pred = module(parts.noise_scheduler.add_noise(latents, noise, t), t, {"input_ids": ids})
        loss = dreambooth_loss(pred, diffusion_target(parts.noise_scheduler, latents, noise, t), batch, 1.0)
        optimizer.zero_grad()
        loss.total.backward()
        optimizer.step()
        if step >= 3:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_libraries()
    steps = 3 if args.quick else args.steps
    model_path = resolve_model("tiny")
    cached = measure(model_path, args.resolution, args.batch, steps, cached=True)
    encoded = measure(model_path, args.resolution, args.batch, steps, cached=False)
    table = "\n".join([
        "| prior examples | s/step | relative |", "|---|---|---|",
        f"| cached latents (Parquet) | {cached:.4f} | 1.00 |",
        f"| PNG decode + VAE encode every step | {encoded:.4f} | {encoded / cached:.2f} |",
    ]) + f"\n\ntiny model, {args.resolution} px, {args.batch} subject + {args.batch} prior examples per step, median of {steps} steps."
    print(table)
    if not args.no_write:
        append_results("Latent caching (latent_cache.py)", table, environment(), " ".join(sys.argv))


if __name__ == "__main__":
    main()
