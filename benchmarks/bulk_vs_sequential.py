"""Bulk: K subjects of one class in one `dreambooth bulk` run vs K sequential single-subject runs
that each generate their own priors (what running a single-subject script K times does).

    python benchmarks/bulk_vs_sequential.py            # K = 4, tiny model
    python benchmarks/bulk_vs_sequential.py --quick    # CI: K = 2, 2 steps
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    quiet_libraries()
    k = 2 if args.quick else args.subjects
    run = {"model": "tiny", "class_noun": "dog", "resolution": 32, "num_class_images": 8, "prior_batch_size": 4,
           "num_inference_steps": 10, "max_train_steps": 2 if args.quick else 10, "checkpointing_steps": 0,
           "workers": 1, "num_sample_images": 1}
    from dreambooth.cluster import connect

    connect()
    with tempfile.TemporaryDirectory() as root:
        start, generated = time.perf_counter(), 0
        for i in range(k):  # each run brings its own prior folder, as independent jobs would
            cfg = build_config(({**run, "instance_dir": str(SUBJECT), "output": f"{root}/seq/{i}/dog",
                                 "identifier_seed": i}, "benchmark"))
            generated += pipeline.execute(pipeline.preflight(cfg)).record["priors"]["generated"]
        sequential_s = time.perf_counter() - start

        manifest = Path(root) / "subjects.yaml"
        manifest.write_text(yaml.safe_dump({"defaults": run, "subjects": [
            {"name": f"dog-{i}", "instance_dir": str(SUBJECT)} for i in range(k)]}))
        options = bulk.BulkOptions(str(manifest), f"{root}/bulk")
        start = time.perf_counter()
        report = bulk.run_bulk(options, bulk.plan(options))
        bulk_s = time.perf_counter() - start
        assert report.ok, bulk.format_table(report)
        bulk_generated = sum(report.prior_caches.values())
    import ray

    ray.shutdown()
    table = "\n".join([
        "| way | subjects | wall s | prior images generated | × bulk time |", "|---|---|---|---|---|",
        f"| {k} sequential `run`s, own priors each | {k} | {sequential_s:.1f} | {generated} | {sequential_s / bulk_s:.2f} |",
        f"| one `bulk` run (shared priors, concurrent) | {k} | {bulk_s:.1f} | {bulk_generated} | 1.00 |",
    ])
    print(table)
    if not args.no_write:
        append_results("Bulk vs sequential (bulk_vs_sequential.py)", table, environment(), " ".join(sys.argv))


if __name__ == "__main__":
    main()
