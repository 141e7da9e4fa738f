"""Distribution overhead: a training step of Ray Train + DeepSpeed vs the plain diffusers-style loop.

Rows, all on the same model, subject, resolution, batch (``B`` subject + ``B`` class examples per
step), text encoder trained, fp32, with the same threads:

- **plain loop** (the baseline): ``plain_dreambooth.PlainDreamBooth``, written the way diffusers'
  ``train_dreambooth.py`` is: it VAE-encodes subject and class images every step.
- **in-process project loop**: ``dreambooth.training.inprocess.finetune`` (the project's batches
  and loss in one process: cached prior latents, cached subject posteriors).
- **Ray Train + DeepSpeed ZeRO-k**: ``dreambooth run`` with 1 worker of ``--threads`` CPUs (or
  more workers of one CPU each, ``--configs``), through the warm-trainer path.

Each reports the *median* step time over ``--steps`` steps after as many warm-up steps. This
machine's speed drifts by tens of percent between minutes (shared cores), so runs alternate
(plain, Ray, plain, Ray, ..., plain), each Ray run's ratio divides by the mean of the two plain runs
around it, and each configuration runs ``--repeats`` times; cells show medians and ranges.

A second table splits a step into phases (batch, forward, backward, optimizer) for the plain loop
and each Ray configuration (the run record's ``step_phases_s``); ZeRO-3's gathering of the full
weights for export is reported apart (``gather s``), as are the start-up phases.

``--wall`` adds the end-to-end comparison: the whole ``plain_dreambooth.py`` command against the
whole ``dreambooth run --workers 1`` command (``--wall-steps`` steps, priors already cached for
both), as subprocesses, alternating: with ``--launcher auto`` (one local worker trains in-process)
and with ``--launcher ray-train`` (a local Ray cluster and a one-worker Ray Train group).

    python benchmarks/train_step.py                           # shapes, 32 px, plain vs ZeRO 0/2/3
    python benchmarks/train_step.py --resolution 64 --wall    # 64 px, plus whole-command wall times
    python benchmarks/train_step.py --quick                   # CI: proves the script works (few steps)

Prints the tables and appends them to benchmarks/RESULTS.md with the machine, versions and command.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append_results, environment  # noqa: E402
from benchmarks.plain_dreambooth import PlainDreamBooth, _images  # noqa: E402
from dreambooth import pipeline  # noqa: E402
from dreambooth.config import TrainConfig, build_config  # noqa: E402
from dreambooth.models import load_components, quiet_libraries, resolve_model  # noqa: E402
from dreambooth.subjects import load_subject_images  # noqa: E402
from dreambooth.training.inprocess import FinetuneSettings, finetune  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SUBJECTS = {"shapes": (REPO / "examples" / "subjects" / "two_tone_triangle", "triangle"),
            "tiny": (REPO / "examples" / "subjects" / "dog", "dog")}
NUM_PRIORS = 8
PHASES = ("batch", "forward", "backward", "optimizer")


def run_config(args, root: str, output: str, workers: int, zero: int, steps: int, launcher: str = "ray-train") -> dict:
    subject, noun = SUBJECTS[args.model]
    return {"launcher": launcher,
        "model": args.model, "instance_dir": str(subject), "class_noun": noun, "output": output, "identifier": "sks",
        "prior_output": f"{root}/priors", "resolution": args.resolution, "num_class_images": NUM_PRIORS,
        "prior_batch_size": 4, "num_inference_steps": 2, "max_train_steps": steps, "log_every": max(1, steps // 2),
        "train_batch_size": args.batch, "workers": workers, "zero_stage": zero, "checkpointing_steps": 0,
        "cpus_per_worker": args.threads if workers == 1 else 1, "random_flip": True, "num_sample_images": 0,
        "before_after": False,
    }


def class_image_folder(prior_cache: str, folder: Path) -> Path:
    """The cached class-prior images as PNG files, for the plain loop (it reads images, not latents)."""
    import pyarrow.parquet as pq
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for shard in sorted(Path(prior_cache, "shards").glob("*.parquet")):
        for row in pq.read_table(shard, columns=["seed", "image"]).to_pylist():
            Image.open(io.BytesIO(row["image"])).save(folder / f"{row['seed']:04d}.png")
    return folder


def plain_loop(args, model_path: str, class_dir: Path, steps: int) -> dict:
    """Median seconds per step of the diffusers-style plain loop, and its mean phase split."""
    torch.set_num_threads(args.threads)
    subject, noun = SUBJECTS[args.model]
    run = PlainDreamBooth(model_path, _images(str(subject)), _images(str(class_dir)), f"a sks {noun}", f"a {noun}",
                          resolution=args.resolution, batch_size=args.batch)
    seconds = []
    for index in range(2 * steps):
        if index == steps:
            run.phase_seconds.clear()
        started = time.perf_counter()
        run.step()
        seconds.append(time.perf_counter() - started)
    return {"step_s": statistics.median(seconds[steps:]),
            "phases": {k: statistics.median(v) for k, v in run.phase_seconds.items()}}


def inprocess_loop(args, model_path: str, steps: int) -> float:
    """Median seconds per step of the project's own single-process loop (same batches and loss as the cluster's)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    parts = load_components(model_path)
    subject, noun = SUBJECTS[args.model]
    latent = args.resolution // (2 ** (len(parts.vae.config.block_out_channels) - 1))
    settings = FinetuneSettings(f"a sks {noun}", f"a {noun}", max_train_steps=2 * steps, train_batch_size=args.batch,
                                learning_rate=5e-6, adam_weight_decay=TrainConfig().adam_weight_decay,
                                resolution=args.resolution, random_flip=True)
    history = finetune(parts, load_subject_images(str(subject), args.resolution), settings,
                       prior_latents=torch.randn(NUM_PRIORS, parts.vae.config.latent_channels, latent, latent))
    return statistics.median(entry["seconds"] for entry in history[steps:])


def ray_run(args, root: str, name: str, workers: int, zero: int, steps: int) -> dict:
    """Rank 0's median step over the last ``steps`` of ``2 * steps`` steps, its phase split and start-up."""
    cfg = build_config((run_config(args, root, f"{root}/{name}", workers, zero, 2 * steps), "benchmark"))
    record = pipeline.execute(pipeline.preflight(cfg)).record or {}
    metrics = record["metrics"]
    startup = {k.removeprefix("setup_").removesuffix("_s"): v for k, v in metrics.items()
               if k.startswith("setup_") and k != "setup_gather_weights_s"}
    return {"step_s": metrics["step_seconds_median"], "phases": metrics["step_phases_s"], "zero": metrics["zero_stage"],
            "gather_s": metrics["setup_gather_weights_s"], "startup": startup}


def wall_comparison(args, root: str, model_path: str, class_dir: Path, repeats: int) -> str:
    """Whole commands as a user runs them: plain script vs `dreambooth run`, priors cached for both."""
    subject, noun = SUBJECTS[args.model]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    plain_cmd = [sys.executable, str(REPO / "benchmarks" / "plain_dreambooth.py"), "--model", model_path,
                 "--instance-dir", str(subject), "--class-dir", str(class_dir), "--instance-prompt", f"a sks {noun}",
                 "--class-prompt", f"a {noun}", "--resolution", str(args.resolution), "--steps", str(args.wall_steps),
                 "--batch-size", str(args.batch), "--threads", str(args.threads)]

    def ours_cmd(launcher: str) -> list[str]:
        cmd = [str(Path(sys.executable).with_name("dreambooth")), "run"]
        for key, value in run_config(args, root, "", 1, 0, args.wall_steps, launcher).items():
            if key != "output":
                cmd += [f"--{key.replace('_', '-')}", str(value).lower() if isinstance(value, bool) else str(value)]
        return cmd

    def timed(cmd: list[str]) -> float:
        started = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{cmd[:3]} exited {proc.returncode}: {proc.stderr[-2000:]}")
        return time.perf_counter() - started

    launchers = ("auto", "ray-train")  # auto: one local worker trains in-process
    plain, walls, phases = [], {launcher: [] for launcher in launchers}, {}
    for repeat in range(repeats):
        plain.append(timed(plain_cmd + ["--output", f"{root}/wall-plain-{repeat}"]))
        for launcher in launchers:
            out = f"{root}/wall-{launcher}-{repeat}"
            walls[launcher].append(timed(ours_cmd(launcher) + ["--output", out]))
            record = json.loads(Path(out, "run.json").read_text())
            phases[launcher] = {**record["timings"], **{k: v for k, v in record["metrics"].items()
                                                        if k in ("setup_worker_group_s", "setup_load_model_s")}}
    rows = [f"| command ({args.wall_steps} steps, priors cached) | wall s (each run) | × plain |", "|---|---|---|",
            f"| plain diffusers-style script | {', '.join(f'{s:.1f}' for s in plain)} | 1.00 |"]
    for launcher, label in zip(launchers, ("`dreambooth run --workers 1 --zero-stage 0` (auto: in-process)",
                                           "same, `--launcher ray-train`")):
        ours = walls[launcher]
        rows.append(f"| {label} | {', '.join(f'{s:.1f}' for s in ours)} "
                    f"| {statistics.median(o / p for o, p in zip(ours, plain)):.2f} |")
    rows.append("")
    for launcher in launchers:
        rows.append(f"Where the `--launcher {launcher}` wall goes (last run): " + ", ".join(
            f"{k.removesuffix('_s').removeprefix('setup_')} {v:.1f} s" for k, v in phases[launcher].items()
            if k.endswith("_s") and k != "total_s") + "; the rest is the CLI's checks and process start.")
        rows.append("")
    return "\n".join(rows[:-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps, one configuration, tiny model (CI)")
    parser.add_argument("--model", choices=sorted(SUBJECTS), default="shapes")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2, help="subject examples per worker (as many priors)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the plain loop and of a 1-worker run")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each Ray configuration (alternating with plain runs)")
    parser.add_argument("--configs", nargs="+", metavar="WORKERSxZERO", default=["1x0", "1x2", "1x3"],
                        help="Ray configurations to measure, e.g. 2x2 = 2 workers (1 CPU each) at ZeRO-2")
    parser.add_argument("--wall", action="store_true", help="also time whole commands (plain script vs dreambooth run)")
    parser.add_argument("--wall-steps", type=int, default=120)
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    quiet_libraries()
    random.seed(0)
    if args.quick:
        args.model, args.steps, args.repeats, args.configs, args.wall_steps = "tiny", 3, 1, ["1x2"], 4
    grid = [tuple(int(n) for n in c.split("x")) for c in args.configs]
    model_path = resolve_model(args.model)
    from dreambooth.cluster import connect

    started = time.perf_counter()
    connect()
    cluster_s = time.perf_counter() - started

    with tempfile.TemporaryDirectory() as root:
        ray_run(args, root, "warm-up", 1, 0, 1)  # generates the priors once; both sides then read them
        (cache,) = Path(root, "priors").glob("*/")
        class_dir = class_image_folder(str(cache), Path(root, "class-images"))
        plain_runs, inprocess_runs, rows = [plain_loop(args, model_path, class_dir, args.steps)], [], []
        for workers, zero in grid:
            runs = []
            for repeat in range(args.repeats):
                result = ray_run(args, root, f"w{workers}-z{zero}-{repeat}", workers, zero, args.steps)
                plain_runs.append(plain_loop(args, model_path, class_dir, args.steps))
                around = (plain_runs[-2]["step_s"] + plain_runs[-1]["step_s"]) / 2
                runs.append((result, result["step_s"] / around))
            rows.append((workers, zero, runs))
            inprocess_runs.append(inprocess_loop(args, model_path, args.steps))
        wall = wall_comparison(args, root, model_path, class_dir, 1 if args.quick else 2) if args.wall or args.quick else ""
    import ray

    ray.shutdown()

    def cell(values: list[float], digits: int) -> str:
        middle = statistics.median(values)
        return f"{middle:.{digits}f}" if len(values) == 1 else f"{middle:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

    plain_s = statistics.median(r["step_s"] for r in plain_runs)
    inprocess_s = statistics.median(inprocess_runs)
    lines = ["| loop | workers | ZeRO | s/step | × plain | subject samples/s |", "|---|---|---|---|---|---|",
             f"| plain diffusers-style loop (baseline) | 1 | - | {cell([r['step_s'] for r in plain_runs], 4)} | 1.00 "
             f"| {args.batch / plain_s:.1f} |",
             f"| in-process project loop | 1 | - | {cell(inprocess_runs, 4)} | {inprocess_s / plain_s:.2f} "
             f"| {args.batch / inprocess_s:.1f} |"]
    for workers, zero, runs in rows:
        step_s = [r["step_s"] for r, _ in runs]
        trained = runs[-1][0]["zero"]
        lines.append(f"| Ray Train + DeepSpeed ZeRO-{zero} | {workers} | {zero}{'' if trained == zero else f' (trains at {trained})'} | {cell(step_s, 4)} "
                     f"| {cell([x for _, x in runs], 2)} | {workers * args.batch / statistics.median(step_s):.1f} |")

    def mean_phases(runs: list[dict]) -> dict[str, float]:
        return {p: statistics.median(r["phases"].get(p, 0.0) for r in runs) for p in PHASES}

    split = ["| loop | " + " | ".join(f"{p} s" for p in PHASES) + " | gather s (export) | start-up s |",
             "|---|" + "---|" * (len(PHASES) + 2)]
    plain_phases = mean_phases(plain_runs)
    split.append("| plain loop | " + " | ".join(f"{plain_phases[p]:.4f}" for p in PHASES) + " | - | - |")
    for workers, zero, runs in rows:
        phases = mean_phases([r for r, _ in runs])
        startup = runs[-1][0]["startup"]
        split.append(f"| ZeRO-{zero} x{workers} | " + " | ".join(f"{phases[p]:.4f}" for p in PHASES)
                     + f" | {statistics.median(r['gather_s'] for r, _ in runs):.3f} | "
                     + ", ".join(f"{k} {v:.1f}" for k, v in startup.items()) + " |")
    table = "\n".join(lines) + "\n\n" + "\n".join(split) + (
        f"\n\n{args.model} model, {args.resolution} px, {args.batch} subject + {args.batch} class examples per worker per "
        f"step, fp32, {args.threads} threads (1 per worker with more workers). Each s/step is the median of {args.steps} "
        f"steps after {args.steps} warm-up steps; each Ray configuration ran {args.repeats} time(s), each beside a plain "
        f"run before and after it. Phases are medians per step (Ray rows: over all steps of the run). Local Ray cluster start {cluster_s:.1f} s (once).")
    if wall:
        table += "\n\n" + wall
    print(table)
    if not args.no_write:
        append_results("Distribution overhead (train_step.py)", table, environment(), " ".join(sys.argv))


if __name__ == "__main__":
    main()
