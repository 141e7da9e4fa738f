"""Pretrain the built-in ``shapes`` base model (one command, resumable) and optionally ship it.

    python -m ray_jobs.pretrain_shapes                      # train into runs/shapes-pretrain
    python -m ray_jobs.pretrain_shapes --ship               # ... and install into dreambooth/data/shapes

Re-running the same command resumes from ``<output>/checkpoint.pt``. It runs in one process (2
torch threads): the model is small enough that a single CPU process is the fastest way to train it,
and the same command works as a Ray job entrypoint (``ray job submit -- python -m ...``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time

from dreambooth.models import quiet_libraries
from dreambooth.shapes.basemodel import PACKAGE_DIR, check_size
from dreambooth.shapes.pretrain import PretrainConfig, Pretrainer, model_card


def parse(argv=None) -> tuple[PretrainConfig, bool]:
    defaults = PretrainConfig()
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.pretrain_shapes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("output", "seed", "dataset_size", "vae_steps", "vae_batch_size", "steps", "batch_size",
                 "learning_rate", "eval_every", "eval_images", "checkpoint_every", "threads"):
        value = getattr(defaults, name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value,
                            help=f"(default: {value})")
    parser.add_argument("--ship", action="store_true",
                        help=f"copy the finished pipeline into the package ({PACKAGE_DIR})")
    args = vars(parser.parse_args(argv))
    ship = args.pop("ship")
    return PretrainConfig(**args), ship


def main(argv=None) -> int:
    config, ship = parse(argv)
    quiet_libraries()
    started = time.time()
    pipeline = Pretrainer(config).run()
    print(f"pretrained pipeline: {pipeline} ({check_size(pipeline) / 2**20:.1f} MiB of weights, "
          f"{time.time() - started:.0f} s this run)")
    if ship:
        shutil.rmtree(PACKAGE_DIR, ignore_errors=True)
        shutil.copytree(pipeline, PACKAGE_DIR)
        (PACKAGE_DIR / "README.md").write_text(model_card(config))
        print(f"shipped to {PACKAGE_DIR}; the built-in model name `shapes` now loads it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
