"""The ``dreambooth plan`` subcommand: its flags and what it prints (``dreambooth.cli`` registers it)."""

from __future__ import annotations

import argparse
from typing import Callable

from dreambooth.planning.memory import PRECISIONS
from dreambooth.planning.report import DEFAULT_RESERVE, PlanInputs, format_plan, make_plan, parse_size

HELP = "Plan GPU memory before renting GPUs: per-rank states and activations for every ZeRO / offload / checkpointing choice."
EXAMPLE = ("dreambooth plan --model stabilityai/stable-diffusion-xl-base-1.0 --gpus 4 --gpu-memory 24GiB "
           "--resolution 1024 --train-batch-size 1")


def cmd_plan(args: argparse.Namespace) -> int:
    inputs = PlanInputs(
        model=args.model,
        gpus=args.gpus,
        gpu_memory=parse_size(args.gpu_memory, "--gpu-memory"),
        resolution=args.resolution,
        train_batch_size=args.train_batch_size,
        mixed_precision=args.mixed_precision,
        prior_preservation=args.prior_loss_weight > 0,
        train_text_encoder=args.train_text_encoder,
        gpus_per_node=args.gpus_per_node or args.gpus,
        cpu_memory=parse_size(args.cpu_memory, "--cpu-memory") if args.cpu_memory else None,
        reserve=parse_size(args.reserve, "--reserve"),
    )
    print(format_plan(make_plan(inputs)))
    return 0


def _true_false(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def register_plan(sub, make_parser: Callable[..., argparse.ArgumentParser]) -> None:
    """Add ``plan`` to the ``dreambooth`` subcommands (``make_parser``: the CLI's own parser factory)."""
    plan = make_parser(sub, "plan", HELP, EXAMPLE)
    plan.add_argument("--model", required=True,
                      help="hub id (SD 1.5, SD 2.1 and SDXL base need nothing downloaded), local diffusers folder or built-in name")
    plan.add_argument("--gpus", type=int, default=1, help="GPUs (= training workers) the run would use (default: 1)")
    plan.add_argument("--gpu-memory", required=True, help="memory of each GPU: 24GiB, 80GB, 24G, ...")
    plan.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's native one)")
    plan.add_argument("--train-batch-size", type=int, default=1, help="subject examples per micro-batch per GPU (default: 1)")
    plan.add_argument("--mixed-precision", choices=tuple(PRECISIONS), default="bf16", help="training precision (default: bf16)")
    plan.add_argument("--prior-loss-weight", type=float, default=1.0,
                      help="> 0: prior preservation, one prior row per subject row (default: 1.0); 0: none")
    plan.add_argument("--train-text-encoder", type=_true_false, default=True, metavar="true|false",
                      help="whether the text encoders train (default: true)")
    plan.add_argument("--gpus-per-node", type=int, default=None, help="GPUs sharing one host's memory (default: --gpus)")
    plan.add_argument("--cpu-memory", default=None, help="host memory per node; offload options above it do not fit")
    plan.add_argument("--reserve", default=DEFAULT_RESERVE,
                      help=f"kept free per GPU for the CUDA context and allocator slack (default: {DEFAULT_RESERVE})")
    plan.set_defaults(func=cmd_plan)
