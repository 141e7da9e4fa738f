"""Prior generation throughput: the Ray Data actor pool (1 and 2 actors) vs a plain loop over the
same diffusers pipeline, same prompt, resolution, steps and batch size.

    python benchmarks/prior_gen.py            # 32 images of the tiny model, 20 sampler steps
    python benchmarks/prior_gen.py --quick    # CI: 4 images, 1 and 2 actors

Every generator thread gets one CPU thread (as the actors do), so on an N-core machine the pool
can scale to N actors. Reports images/s with and without actor start-up (model load).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append_results, environment  # noqa: E402
from dreambooth import priors  # noqa: E402
from dreambooth.models import load_pipeline, quiet_libraries, resolve_model  # noqa: E402


def plain_loop(model_path: str, spec: priors.PriorSpec, images: int, batch: int) -> float:
    """Seconds to generate ``images`` in one process, one thread (model already loaded)."""
    torch.set_num_threads(1)
    pipe = load_pipeline(model_path)
    start = time.perf_counter()
    for first in range(0, images, batch):
        seeds = list(range(first, min(images, first + batch)))
        with torch.no_grad():
            pipe([spec.prompt] * len(seeds), height=spec.resolution, width=spec.resolution,
                 num_inference_steps=spec.num_inference_steps, guidance_scale=spec.guidance_scale,
                 generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pil")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="sampler steps per image")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_libraries()
    images = 4 if args.quick else args.images
    steps = 2 if args.quick else args.steps
    model_path = resolve_model("tiny")
    spec = priors.PriorSpec(model="tiny", revision=None, prompt="a dog", resolution=32, scheduler="DDPMScheduler",
                            num_inference_steps=steps, guidance_scale=7.5, first_seed=0)

    plain_s = plain_loop(model_path, spec, images, args.batch)
    rows = [("plain loop (1 process, 1 thread)", "-", plain_s, images / plain_s, 1.0)]
    from dreambooth.cluster import connect

    connect()
    rates = {}
    with tempfile.TemporaryDirectory() as root:
        for actors in (1, 2):
            start = time.perf_counter()
            made = priors.generate(spec, model_path, f"{root}/a{actors}", images, use_gpu=False, actors=actors,
                                   batch_size=args.batch)
            seconds = time.perf_counter() - start
            assert made.generated == images
            rates[actors] = images / seconds
            rows.append((f"Ray Data actor pool (incl. actor start-up)", actors, seconds, rates[actors], plain_s / seconds))
    import ray

    ray.shutdown()
    efficiency = rates[2] / (2 * rates[1])
    table = "\n".join(
        ["| generator | actors | seconds | images/s | speed-up vs plain |", "|---|---|---|---|---|"]
        + [f"| {name} | {a} | {s:.1f} | {r:.2f} | {x:.2f} |" for name, a, s, r, x in rows]
    ) + f"\n\nScaling efficiency 1 → 2 actors: {efficiency:.2f} ({images} images, {steps} steps, batch {args.batch})."
    print(table)
    if not args.no_write:
        append_results("Prior generation (prior_gen.py)", table, environment(), " ".join(sys.argv))


if __name__ == "__main__":
    main()
