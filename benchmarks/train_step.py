"""Distribution overhead: steady-state step time of Ray Train + DeepSpeed vs a bare PyTorch loop.

Both sides run the same work per step on the same model, batch, resolution and precision: draw
``B`` augmented subject photos, VAE-encode them, add ``B`` prior latents from an in-memory
``PriorPool``, forward UNet + text encoder, the DreamBooth loss, backward, clip, AdamW. The bare loop
is ``dreambooth.training.inprocess.finetune`` in one process with one thread; each Ray worker also gets one CPU thread, so with 2 workers the
global batch is twice as large.

Both report the *median* step time over ``--steps`` steps after as many warm-up steps. This
machine's speed drifts by tens of percent between minutes (shared cores), so runs alternate
(bare, Ray, bare, Ray, ..., bare), each Ray run's ratio divides by the mean of the two bare runs
around it, and each configuration runs ``--repeats`` times; the table shows medians and ranges.

Start-up is reported apart: starting the local Ray cluster and JIT-building DeepSpeed's CPU
communication op (both once), and per run the worker group's start (``trainer.fit`` until the
loop runs), ``deepspeed.initialize`` and the rest of the workers' setup (model load, prior read).

    python benchmarks/train_step.py                 # tiny model, 1 and 2 workers, ZeRO 0/2/3
    python benchmarks/train_step.py --configs 1x2 --steps 60   # one configuration, longer window
    python benchmarks/train_step.py --quick         # CI: proves the script works (few steps)

Prints a table and appends it to benchmarks/RESULTS.md with the machine, versions and command.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append_results, environment  # noqa: E402
from dreambooth import pipeline  # noqa: E402
from dreambooth.config import TrainConfig, build_config  # noqa: E402
from dreambooth.models import load_components, quiet_libraries, resolve_model  # noqa: E402
from dreambooth.subjects import load_subject_images  # noqa: E402
from dreambooth.training.engine import prebuild_deepspeed_ops  # noqa: E402
from dreambooth.training.inprocess import FinetuneSettings, finetune  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SUBJECT = REPO / "examples" / "subjects" / "dog"
NUM_PRIORS = 8


def bare_loop(model_path: str, resolution: int, batch: int, steps: int) -> float:
    """Median seconds per step of the plain single-process loop (``inprocess.finetune``: the same
    batches, loss, clipping and AdamW as the cluster loop) over ``steps`` steps after as many
    warm-up steps (the window a Ray run of ``2 * steps`` steps reports)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    parts = load_components(model_path)
    latent = resolution // (2 ** (len(parts.vae.config.block_out_channels) - 1))
    settings = FinetuneSettings(
        "a sks dog", "a dog", max_train_steps=2 * steps, train_batch_size=batch, learning_rate=1e-4,
        adam_weight_decay=TrainConfig().adam_weight_decay, resolution=resolution, random_flip=True,
    )
    history = finetune(parts, load_subject_images(str(SUBJECT), resolution), settings,
                       prior_latents=torch.randn(NUM_PRIORS, 4, latent, latent))
    return statistics.median(entry["seconds"] for entry in history[steps:])


def ray_run(workers: int, zero: int, resolution: int, batch: int, steps: int, root: str) -> dict:
    """Steady-state seconds per step (rank 0's median over the last ``steps`` of ``2 * steps``
    steps) and the start-up phases of the run's training."""
    out = f"{root}/w{workers}-z{zero}"
    cfg = build_config(({
        "model": "tiny", "instance_dir": str(SUBJECT), "class_noun": "dog", "output": out, "identifier": "sks",
        "resolution": resolution, "num_class_images": NUM_PRIORS, "prior_batch_size": 4, "num_inference_steps": 2,
        "max_train_steps": 2 * steps, "log_every": steps, "train_batch_size": batch, "learning_rate": 1e-4,
        "workers": workers, "zero_stage": zero, "checkpointing_steps": 0, "num_sample_images": 0,
        "before_after": False,
    }, "benchmark"))
    metrics = (pipeline.execute(pipeline.preflight(cfg)).record or {})["metrics"]
    other = sum(v for k, v in metrics.items() if k.startswith("setup_") and k not in
                ("setup_worker_group_s", "setup_deepspeed_initialize_s"))
    return {"step_s": metrics["step_seconds_median"], "worker_group_s": metrics["setup_worker_group_s"],
            "deepspeed_initialize_s": metrics["setup_deepspeed_initialize_s"], "other_setup_s": other}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps, one configuration (CI)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2, help="subject examples per worker (as many priors)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each Ray configuration (alternating with bare runs)")
    parser.add_argument("--configs", nargs="+", metavar="WORKERSxZERO", default=["1x0", "1x2", "1x3", "2x0", "2x2", "2x3"],
                        help="Ray configurations to measure, e.g. 1x2 = 1 worker at ZeRO-2 (default: all six)")
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    quiet_libraries()
    random.seed(0)
    steps, repeats = (4, 1) if args.quick else (args.steps, args.repeats)
    grid = [(1, 2)] if args.quick else [tuple(int(n) for n in c.split("x")) for c in args.configs]

    model_path = resolve_model("tiny")
    import ray

    from dreambooth.cluster import connect

    started = time.perf_counter()
    connect()
    cluster_s = time.perf_counter() - started
    started = time.perf_counter()
    prebuild_deepspeed_ops()
    jit_s = time.perf_counter() - started

    def bare() -> float:
        return bare_loop(model_path, args.resolution, args.batch, steps)

    # bare, ray, bare, ray, ..., bare: each Ray run is compared with the bare runs on either side.
    bare_runs, rows = [bare()], []
    with tempfile.TemporaryDirectory() as root:
        for workers, zero in grid:
            runs = []
            for repeat in range(repeats):
                result = ray_run(workers, zero, args.resolution, args.batch, steps, f"{root}/{repeat}")
                bare_runs.append(bare())
                runs.append((result, result["step_s"] / ((bare_runs[-2] + bare_runs[-1]) / 2)))
            rows.append((workers, zero, runs))
    ray.shutdown()

    def cell(values: list[float], digits: int) -> str:
        middle = statistics.median(values)
        return f"{middle:.{digits}f}" if len(values) == 1 else f"{middle:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

    header = ("| loop | workers | ZeRO | s/step | × bare | subject samples/s | worker group start s "
              "| deepspeed.initialize s | other worker setup s |\n|---|---|---|---|---|---|---|---|---|")
    bare_s = statistics.median(bare_runs)
    lines = [header, f"| bare PyTorch loop | 1 | - | {cell(bare_runs, 3)} | 1.00 | {args.batch / bare_s:.1f} | - | - | - |"]
    for workers, zero, runs in rows:
        step_s = [r["step_s"] for r, _ in runs]
        lines.append(
            f"| Ray Train + DeepSpeed ZeRO-{zero} | {workers} | {zero} | {cell(step_s, 3)} | {cell([x for _, x in runs], 2)} "
            f"| {workers * args.batch / statistics.median(step_s):.1f} | {cell([r['worker_group_s'] for r, _ in runs], 1)} "
            f"| {cell([r['deepspeed_initialize_s'] for r, _ in runs], 1)} | {cell([r['other_setup_s'] for r, _ in runs], 1)} |")
    table = "\n".join(lines) + (
        f"\n\nOnce per benchmark: local Ray cluster start {cluster_s:.1f} s; DeepSpeed CPU comm op JIT build "
        f"{jit_s:.1f} s (near 0 when cached). Tiny model, {args.resolution} px, {args.batch} subject + "
        f"{args.batch} prior examples per worker per step, fp32. Each s/step is the median of {steps} steps after "
        f"{steps} warm-up steps; each Ray configuration ran {repeats} time(s), each run beside a bare run before and "
        f"after it; cells show the median over runs (min-max).")
    print(table)
    if not args.no_write:
        append_results("Distribution overhead (train_step.py)", table, environment(), " ".join(sys.argv))


if __name__ == "__main__":
    main()
