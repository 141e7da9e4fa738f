"""Per-subject overhead of bulk personalization: a worker group per subject vs warm worker groups.

K tiny subjects of one class, ``--steps`` steps each, 1 worker, one at a time, priors cached:

- **a worker group per subject**: K `dreambooth run`s in one driver (each starts a worker group,
  imports, loads the model and initializes — what every bulk subject paid before warm trainers);
- **warm worker group**: one `dreambooth bulk` with ``--max-concurrent 1``: one group loads the
  model once and trains subject after subject, reset to the base weights in memory.

Per-subject overhead = (wall − Σ steady training time) / K, where a subject's steady training
time is its steps × its median step time (from its run record).

    python benchmarks/bulk_overhead.py            # K = 8, 20 steps
    python benchmarks/bulk_overhead.py --quick    # CI: K = 2, 2 steps
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append_results, environment  # noqa: E402
from dreambooth import bulk, pipeline  # noqa: E402
from dreambooth.config import build_config  # noqa: E402
from dreambooth.models import quiet_libraries  # noqa: E402

SUBJECT = Path(__file__).resolve().parents[1] / "examples" / "subjects" / "dog"


def steady_seconds(output: str) -> float:
    record = json.loads(Path(output, "run.json").read_text())
    return record["steps"] * record["metrics"]["step_seconds_median"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    quiet_libraries()
    k, steps = (2, 2) if args.quick else (args.subjects, args.steps)
    run = {"model": "tiny", "class_noun": "dog", "resolution": 32, "num_class_images": 4, "prior_batch_size": 4,
           "num_inference_steps": 2, "max_train_steps": steps, "checkpointing_steps": 0, "workers": 1,
           "num_sample_images": 1, "identifier": "sks"}
    from dreambooth.cluster import connect

    connect()
    rows = []
    with tempfile.TemporaryDirectory() as root:
        prior_output = f"{root}/priors"
        warm_up = build_config(({**run, "instance_dir": str(SUBJECT), "output": f"{root}/warm-up",
                                 "prior_output": prior_output}, "benchmark"))
        pipeline.execute(pipeline.preflight(warm_up))  # priors generated once, JIT caches and model files warm

        start = time.perf_counter()
        outputs = []
        for i in range(k):
            cfg = build_config(({**run, "instance_dir": str(SUBJECT), "output": f"{root}/cold/dog-{i}",
                                 "prior_output": prior_output}, "benchmark"))
            outputs.append(pipeline.execute(pipeline.preflight(cfg)).output)
        cold_s = time.perf_counter() - start
        rows.append(("a worker group per subject (before warm trainers)", cold_s, sum(map(steady_seconds, outputs))))

        manifest = Path(root) / "subjects.yaml"
        manifest.write_text(yaml.safe_dump({"defaults": {**run, "prior_output": prior_output}, "subjects": [
            {"name": f"dog-{i}", "instance_dir": str(SUBJECT)} for i in range(k)]}))
        options = bulk.BulkOptions(str(manifest), f"{root}/warm", max_concurrent=1, distinct_identifiers=False)
        start = time.perf_counter()
        report = bulk.run_bulk(options, bulk.plan(options))
        warm_s = time.perf_counter() - start
        assert report.ok, bulk.format_table(report)
        rows.append(("warm worker group (`bulk --max-concurrent 1`)", warm_s,
                     sum(steady_seconds(r.output) for r in report.results)))
    import ray

    ray.shutdown()
    cold_overhead = (rows[0][1] - rows[0][2]) / k
    lines = ["| way | subjects | wall s | Σ steady training s | overhead per subject s | × warm overhead |",
             "|---|---|---|---|---|---|"]
    for name, wall, steady in rows:
        overhead = (wall - steady) / k
        lines.append(f"| {name} | {k} | {wall:.1f} | {steady:.1f} | {overhead:.1f} | "
                     f"{overhead / ((rows[1][1] - rows[1][2]) / k):.2f} |")
    table = "\n".join(lines) + (
        f"\n\nTiny model, 32 px, {steps} steps per subject, 1 worker, priors cached, sample grids on. "
        f"Warm overhead is {((rows[1][1] - rows[1][2]) / k) / cold_overhead:.2f} of the per-subject-group overhead.")
    print(table)
    if not args.no_write:
        append_results("Bulk per-subject overhead (bulk_overhead.py)", table, environment(), " ".join(sys.argv))


if __name__ == "__main__":
    main()
