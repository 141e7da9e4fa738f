"""Distribution overhead: steady-state step time of Ray Train + DeepSpeed vs a bare PyTorch loop.

Both sides run the same work per step on the same model, batch, resolution and precision: draw
``B`` augmented subject photos, VAE-encode them, add ``B`` prior latents, forward UNet + text
encoder, the DreamBooth loss, backward, AdamW. The bare loop is one process with one thread; each
Ray worker also gets one CPU thread, so with 2 workers the global batch is twice as large.

    python benchmarks/train_step.py                 # tiny model, 1 and 2 workers, ZeRO 0/2/3
    python benchmarks/train_step.py --quick         # CI: proves the script works (few steps)

Prints a table and appends it to benchmarks/RESULTS.md with the machine, versions and command.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append_results, environment  # noqa: E402
from dreambooth import pipeline  # noqa: E402
from dreambooth.config import build_config  # noqa: E402
from dreambooth.models import load_components, quiet_libraries, resolve_model  # noqa: E402
from dreambooth.subjects import load_subject_images  # noqa: E402
from dreambooth.training.batches import BatchMaker  # noqa: E402
from dreambooth.training.module import DreamBoothModule, diffusion_target, dreambooth_loss  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SUBJECT = REPO / "examples" / "subjects" / "dog"


def bare_loop(model_path: str, resolution: int, batch: int, steps: int, warmup: int) -> float:
    """Seconds per step of the plain single-process loop (after ``warmup`` steps)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    parts = load_components(model_path)
    parts.vae.requires_grad_(False).eval()
    module = DreamBoothModule(parts.unet, parts.text_encoder, train_text_encoder=True)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    latent = resolution // (2 ** (len(parts.vae.config.block_out_channels) - 1))
    prior = {
        "latents": np.array([np.random.randn(4 * latent * latent).astype(np.float32)] * batch, dtype=object),
        "latent_shape": np.array([[4, latent, latent]] * batch, dtype=object),
    }

    def endless_priors():
        while True:
            yield prior

    maker = BatchMaker(
        load_subject_images(str(SUBJECT), resolution), parts.tokenizer, parts.vae, "a sks dog", "a dog",
        resolution=resolution, batch_size=batch, center_crop=False, random_flip=True, seed=0,
        priors=endless_priors(), device=torch.device("cpu"),
    )
    scheduler = parts.noise_scheduler
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        b = maker.next()
        noise = torch.randn_like(b.latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b.latents.shape[0],))
        prediction = module(scheduler.add_noise(b.latents, noise, t), t, b.input_ids)
        loss = dreambooth_loss(prediction, diffusion_target(scheduler, b.latents, noise, t), b.num_instance, 1.0)
        optimizer.zero_grad()
        loss.total.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def ray_run(workers: int, zero: int, resolution: int, batch: int, steps: int, root: str) -> dict:
    """Steady-state seconds per step (rank 0's mean over the last ``steps`` steps) and start-up."""
    out = f"{root}/w{workers}-z{zero}"
    cfg = build_config(({
        "model": "tiny", "instance_dir": str(SUBJECT), "class_noun": "dog", "output": out, "identifier": "sks",
        "resolution": resolution, "num_class_images": 4, "prior_batch_size": 4, "num_inference_steps": 2,
        "max_train_steps": 2 * steps, "log_every": steps, "train_batch_size": batch, "learning_rate": 1e-4,
        "workers": workers, "zero_stage": zero, "checkpointing_steps": 0, "num_sample_images": 0,
    }, "benchmark"))
    record = pipeline.execute(pipeline.preflight(cfg)).record or {}
    step_s = record["metrics"]["step_seconds"]
    return {"step_s": step_s, "startup_s": record["timings"]["train_s"] - 2 * steps * step_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps, one configuration (CI)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2, help="subject examples per worker (as many priors)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    quiet_libraries()
    random.seed(0)
    steps = 4 if args.quick else args.steps
    grid = [(2, 2)] if args.quick else [(1, 0), (1, 2), (1, 3), (2, 0), (2, 2), (2, 3)]

    model_path = resolve_model("tiny")
    bare = bare_loop(model_path, args.resolution, args.batch, steps, warmup=3)
    rows = [("bare PyTorch loop", 1, "-", bare, 1.0, args.batch / bare, 0.0)]
    import ray

    from dreambooth.cluster import connect

    connect()
    with tempfile.TemporaryDirectory() as root:
        for workers, zero in grid:
            result = ray_run(workers, zero, args.resolution, args.batch, steps, root)
            rows.append((f"Ray Train + DeepSpeed ZeRO-{zero}", workers, zero, result["step_s"],
                         result["step_s"] / bare, workers * args.batch / result["step_s"], result["startup_s"]))
    ray.shutdown()

    header = "| loop | workers | ZeRO | s/step | × bare | subject samples/s | start-up s |\n|---|---|---|---|---|---|---|"
    table = "\n".join([header] + [
        f"| {name} | {w} | {z} | {s:.3f} | {r:.2f} | {thr:.1f} | {up:.1f} |" for name, w, z, s, r, thr, up in rows
    ])
    print(table)
    if not args.no_write:
        append_results("Distribution overhead (train_step.py)", table, environment(), " ".join(sys.argv))


if __name__ == "__main__":
    main()
