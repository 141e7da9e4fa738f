"""The ``dreambooth`` command: parse → build one validated config → call a stage. Nothing else.

Exit codes: 0 success (or already complete), 2 bad input (nothing was started), 1 a failure while running.
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from typing import Any, Callable, Optional, Sequence

from dreambooth.config import (
    ConfigError,
    FieldInfo,
    RunConfig,
    all_fields,
    build_config,
    load_yaml,
    validate_generation,
)
from dreambooth.subjects import SubjectError

log = logging.getLogger("dreambooth")

PRIOR_FIELDS = (
    "model", "revision", "class_noun", "resolution", "num_class_images", "prior_output", "prior_actors",
    "prior_batch_size", "num_inference_steps", "guidance_scale", "prior_seed", "use_gpu",
)


# --------------------------------------------------------------------------- flag plumbing


def _add_field_flag(parser: argparse.ArgumentParser, info: FieldInfo, flag: Optional[str] = None) -> None:
    tp = info.type
    if typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    help_text = f"{info.doc} (default: {info.default!r})"
    flag = flag or info.flag
    if tp is bool:
        parser.add_argument(flag, dest=info.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
    elif typing.get_origin(tp) is list:
        parser.add_argument(flag, dest=info.name, nargs="+", default=None, metavar="TEXT", help=help_text)
    else:
        parser.add_argument(flag, dest=info.name, default=None, metavar=info.name.upper(), help=help_text)


def _flag_values(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def config_from_args(args: argparse.Namespace, names: Sequence[str]) -> RunConfig:
    """YAML file (``--config``) first, flags on top; typed and checked field by field."""
    layers = []
    if getattr(args, "config", None):
        layers.append((load_yaml(args.config), args.config))
    layers.append((_flag_values(args, names), "command-line flags"))
    return build_config(*layers)


def _parser(sub, name: str, help_text: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


# --------------------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    from dreambooth import pipeline

    cfg = config_from_args(args, list(all_fields()))
    prepared = pipeline.preflight(cfg)
    for warning in prepared.identifier_warnings:
        log.warning(warning)
    if prepared.identifier_was_auto:
        log.info("identifier: picked %r (rare token; recorded in the run record)", cfg.subject.identifier)
    outcome = pipeline.execute(prepared)
    if outcome.skipped:
        print(f"{cfg.output} is already complete (run.json present); nothing to do. Use --overwrite to train again.")
        return 0
    record = outcome.record or {}
    print(
        f"\nDone: '{cfg.subject.instance_prompt}' in {record.get('timings', {}).get('total_s', 0):.0f} s.\n"
        f"  model:      {cfg.output}\n  grid:       {record.get('grid')}\n  run record: {cfg.output.rstrip('/')}/run.json\n"
        f"next:\n  dreambooth sample --model {cfg.output} --prompt \"{cfg.subject.instance_prompt} on the beach\" --output beach.png"
    )
    return 0


def cmd_prior(args: argparse.Namespace) -> int:
    from dreambooth import cluster, models, priors
    from dreambooth.pipeline import _scheduler_name

    cfg = config_from_args(args, PRIOR_FIELDS)
    if not cfg.prior.prior_output:
        raise ConfigError("--output is empty; pass where the prior shards should go")
    validate_generation(cfg)
    model_path = models.resolve_model(cfg.model, cfg.revision)
    from dreambooth.storage import check_writable

    check_writable(cfg.prior_root)
    cluster.connect()
    spec = priors.spec_from_config(cfg, _scheduler_name(model_path))
    result = priors.generate(
        spec,
        model_path,
        cfg.prior_root,
        cfg.prior.num_class_images,
        use_gpu=cluster.resolve_use_gpu(cfg.train.use_gpu),
        actors=cfg.prior.prior_actors,
        batch_size=cfg.prior.prior_batch_size,
    )
    verb = "reused" if result.generated == 0 else f"generated {result.generated} of"
    print(f"Done: {verb} {len(result.seeds)} images for '{spec.prompt}' at {result.uri} ({len(result.shard_uris)} shards)")
    return 0


def cmd_identifier(args: argparse.Namespace) -> int:
    from transformers import CLIPTokenizer

    from dreambooth import identifier, models

    path = models.resolve_model(args.model)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    if args.check:
        report = identifier.check_identifier(tokenizer, args.check)
        print(f"{args.check!r} → token ids {report.token_ids}")
        for warning in report.warnings:
            print(f"warning: {warning}")
        return 0
    for ident in identifier.pick_identifiers(tokenizer, args.count, args.seed):
        print(ident)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from dreambooth.sample import sample_to_file

    out = sample_to_file(
        args.model,
        args.prompt,
        args.output,
        num_images=args.num_images,
        seed=args.seed,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        resolution=args.resolution,
    )
    print(f"Done: {len(args.prompt)} prompt(s) x {args.num_images} image(s) → {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dreambooth",
        description="DreamBooth personalization of Stable Diffusion models on Ray (Data + Train + DeepSpeed).",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the final lines")
    sub = parser.add_subparsers(dest="command", required=True)
    fields = all_fields()

    run = _parser(
        sub, "run", "Personalize one subject: priors (cached) → train all layers → export.",
        "dreambooth run --model tiny --instance-dir examples/subjects/dog --class-noun dog --output runs/dog",
    )
    run.add_argument("--config", help="YAML config file; flags given here override it")
    for info in fields.values():
        _add_field_flag(run, info)
    run.set_defaults(func=cmd_run)

    prior = _parser(
        sub, "prior", "Generate (or reuse) class-prior images as Parquet shards with Ray Data.",
        "dreambooth prior --model tiny --class-noun dog --num-images 16 --output runs/priors",
    )
    prior.add_argument("--config", help="YAML config file; flags given here override it")
    for name in PRIOR_FIELDS:
        flag = {"num_class_images": "--num-images", "prior_output": "--output"}.get(name)
        _add_field_flag(prior, fields[name], flag)
    prior.set_defaults(func=cmd_prior)

    ident = _parser(
        sub, "identifier", "List rare-token identifiers from the model's own tokenizer, or check one.",
        "dreambooth identifier --model tiny --count 5 --seed 0",
    )
    ident.add_argument("--model", default="tiny", help="model whose tokenizer to search (default: tiny)")
    ident.add_argument("--count", type=int, default=5, help="how many identifiers to print")
    ident.add_argument("--seed", type=int, default=0, help="seed of the deterministic draw")
    ident.add_argument("--check", metavar="TEXT", help="explain how TEXT tokenizes and why it may be a poor identifier")
    ident.set_defaults(func=cmd_identifier)

    sample = _parser(
        sub, "sample", "Render prompts with a model to a PNG grid (rows = prompts).",
        'dreambooth sample --model runs/dog --prompt "a sks dog on the beach" --num-images 4 --output beach.png',
    )
    sample.add_argument("--model", required=True, help="personalized output folder/URI, hub id or built-in name")
    sample.add_argument("--prompt", required=True, nargs="+", help="one or more prompts (one grid row each)")
    sample.add_argument("--num-images", type=int, default=4, help="images per prompt")
    sample.add_argument("--seed", type=int, default=0, help="image j of each row uses seed + j")
    sample.add_argument("--steps", type=int, default=25, help="denoising steps")
    sample.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance scale")
    sample.add_argument("--resolution", type=int, default=None, help="image side (default: the model's)")
    sample.add_argument("--output", required=True, help="PNG file to write (local path or URI)")
    sample.set_defaults(func=cmd_sample)
    return parser


def setup_logging(quiet: bool) -> None:
    import os

    from dreambooth.models import quiet_libraries

    if not _has_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # silences DeepSpeed's accelerator probe
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    quiet_libraries()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ConfigError, SubjectError, PermissionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
