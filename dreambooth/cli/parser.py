"""The ``dreambooth`` argument parser: every subcommand, its flags, help text and example.

Owns: how config fields become flags (``--flag``, ``--flag false``, ``--no-flag``; lists take several
words), the flag groups subcommands share (run, bulk, Kubernetes), and ``build_parser``. Each
subcommand's ``func`` is its ``cmd_*`` in ``commands``; ``plan`` registers itself from
``dreambooth.planning.command``.
"""

from __future__ import annotations

import argparse
import typing
from typing import Optional

from dreambooth.cli.commands import (
    PRIOR_FIELDS,
    cmd_bulk,
    cmd_doctor,
    cmd_eval,
    cmd_identifier,
    cmd_prior,
    cmd_run,
    cmd_sample,
    cmd_status,
    cmd_submit,
)
from dreambooth.config import FieldInfo, all_fields


# --------------------------------------------------------------------------- flag plumbing


def _add_field_flag(parser: argparse.ArgumentParser, info: FieldInfo, flag: Optional[str] = None) -> None:
    tp = info.type
    if typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    help_text = f"{info.doc} (default: {info.default!r})"
    flag = flag or info.flag
    if tp is bool:
        # `--flag`, `--flag false` and `--no-flag` all work, so manifests and RayJobs can pass values.
        parser.add_argument(flag, dest=info.name, nargs="?", const="true", default=None, metavar="true|false", help=help_text)
        parser.add_argument("--no-" + flag[2:], dest=info.name, action="store_const", const="false", help=argparse.SUPPRESS)
    elif typing.get_origin(tp) is list:
        # `*`, not `+`: a bare flag is the empty list, so a RayJob carrying the whole config can say
        # "none" where the model's recipe lists some (e.g. --extra-prior-prompts). `extend`: a flag given once
        # per item keeps every item, not only the last.
        parser.add_argument(flag, dest=info.name, nargs="*", action="extend", default=None, metavar="TEXT",
                            help=f"{help_text}; the flag alone means none")
    else:
        parser.add_argument(flag, dest=info.name, default=None, metavar=info.name.upper(), help=help_text)


def _parser(sub, name: str, help_text: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


# --------------------------------------------------------------------------- flag groups and subcommands


def _add_run_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    parser.add_argument("--config", help="YAML config file; flags given here override it")
    for info in all_fields().values():
        if info.name not in skip:
            _add_field_flag(parser, info)


def _add_bulk_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, help="YAML with a 'subjects' list (and optional 'defaults')")
    parser.add_argument("--output", required=True, help="root URI; subject NAME writes to OUTPUT/NAME")
    parser.add_argument("--max-concurrent", type=int, default=None, help="subjects at once (default 0 = what the cluster fits)")
    parser.add_argument("--max-retries", type=int, default=None, help="retries of a subject that failed while running (default 1)")
    parser.add_argument("--distinct-identifiers", type=_bool_flag, nargs="?", const=True, default=True, metavar="true|false",
                        help="give every subject its own identifier (auto ones: 1-3 rare tokens); false lets them share")
    _add_run_flags(parser, skip=("output",))


def _bool_flag(text: str) -> bool:
    if text.lower() not in ("true", "false", "yes", "no", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "yes", "1")


def _add_kube_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", required=True, help="Kubernetes namespace of the RayJobs")
    parser.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster, then ~/.kube/config)")
    parser.add_argument("--context", default=None, help="kubeconfig context")
    parser.add_argument("--bulk-run", default=None, help="label value linking this run's RayJobs (default: manifest name)")
    parser.add_argument("--request-timeout", type=float, default=30.0,
                        help="seconds each Kubernetes API call may take before it fails (default: 30)")


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
    _add_run_flags(run)
    run.set_defaults(func=cmd_run)

    bulk = _parser(
        sub, "bulk", "Personalize every subject of a manifest on this Ray cluster (shared priors, concurrent training).",
        "dreambooth bulk --manifest subjects.yaml --output s3://bucket/runs --max-train-steps 400",
    )
    _add_bulk_flags(bulk)
    bulk.add_argument("--summary-configmap", default=None,
                      help="also publish the summary, as subjects finish, to this ConfigMap (in a pod: its namespace)")
    bulk.add_argument("--summary-namespace", default=None, help="namespace of --summary-configmap (default: the pod's)")
    bulk.set_defaults(func=cmd_bulk)

    submit = _parser(
        sub, "submit", "Run a manifest on KubeRay: one bulk-driver RayJob (default) or one RayJob per subject (idempotent).",
        "dreambooth submit --manifest subjects.yaml --model stable-diffusion-v1-5/stable-diffusion-v1-5 "
        "--namespace ml --cluster db-dreambooth --output /mnt/shared/outputs --max-concurrent 4",
    )
    _add_bulk_flags(submit)
    _add_kube_flags(submit)
    submit.add_argument("--cluster", default=None, help="existing RayCluster to run on (e.g. the chart's)")
    submit.add_argument("--ray-cluster-spec", default=None, help="YAML rayClusterSpec: one dedicated cluster per job")
    submit.add_argument("--layout", choices=("bulk", "per-subject"), default="bulk",
                        help="bulk (default): one RayJob runs `dreambooth bulk` on the whole manifest; "
                             "per-subject: one RayJob per subject (Kubernetes-level accounting, Kueue)")
    submit.add_argument("--image", default=None, help="image of the submitter pod (default: the RayCluster's head image)")
    submit.add_argument("--queue-name", default=None, help="per-subject + --ray-cluster-spec: Kueue LocalQueue; jobs wait suspended for admission")
    submit.add_argument("--dry-run", action="store_true", help="print the RayJobs; the server only validates them")
    submit.add_argument("--offline", action="store_true", help="with --dry-run: print without contacting Kubernetes")
    submit.set_defaults(func=cmd_submit)

    status = _parser(
        sub, "status", "Show the RayJobs of a namespace (or one bulk run): job and deployment states.",
        "dreambooth status --namespace ml --bulk-run subjects",
    )
    _add_kube_flags(status)
    status.set_defaults(func=cmd_status)

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
    sample.add_argument("--prompt", required=True, nargs="+", action="extend",
                        help="one or more prompts (one grid row each): --prompt A B, or --prompt A --prompt B")
    sample.add_argument("--num-images", type=int, default=4, help="images per prompt")
    sample.add_argument("--seed", type=int, default=0, help="image j of each row uses seed + j")
    sample.add_argument("--steps", type=int, default=None,
                        help="denoising steps (default: the run's or the model recipe's, else 25)")
    sample.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance scale (default: the run's or the model recipe's, else 7.5)")
    sample.add_argument("--resolution", type=int, default=None,
                        help="image side (default: the run's or the model recipe's, else the model's native size)")
    sample.add_argument("--output", required=True, help="PNG file to write (local path or URI)")
    sample.set_defaults(func=cmd_sample)

    evaluate = _parser(
        sub, "eval", "Score a personalized run: subject fidelity, prompt fidelity, PRES, DIV (or DINO/CLIP-I/CLIP-T).",
        "dreambooth eval --output runs/demo/checker_square --images-per-prompt 8\n"
        "  dreambooth eval --output s3://bucket/runs     # a bulk output: scores every finished subject",
    )
    evaluate.add_argument("--output", required=True,
                          help="finished run folder/URI (holds run.json), or a bulk output (holds bulk-summary.json): "
                               "every finished subject is scored")
    evaluate.add_argument("--suite", default="auto", choices=("auto", "shapes", "dreambench"),
                          help="shapes-world analyzers or the paper's embedding metrics (auto: shapes for the shapes model)")
    evaluate.add_argument("--shapes-subject", default=None, help="shapes subject name (default: the photo folder's name)")
    evaluate.add_argument("--images-per-prompt", type=int, default=8, help="images per prompt (image j uses seed + j)")
    evaluate.add_argument("--seed", type=int, default=0, help="first sampling seed")
    evaluate.add_argument("--steps", type=int, default=None, help="denoising steps (default: the run's, else 25)")
    evaluate.add_argument("--guidance-scale", type=float, default=None,
                          help="classifier-free guidance scale (default: the run's, else 7.5)")
    evaluate.add_argument("--no-base", action="store_true", help="skip scoring the base model for comparison")
    evaluate.add_argument("--dino-model", default="facebook/dino-vits16", help="dreambench: DINO model id or folder")
    evaluate.add_argument("--clip-model", default="openai/clip-vit-base-patch32", help="dreambench: CLIP model id or folder")
    evaluate.add_argument("--report", default=None, help="where to write the JSON report (default: <output>/eval.json)")
    evaluate.set_defaults(func=cmd_eval)

    doctor = _parser(
        sub, "doctor", "Check this machine or pod before spending GPU time: CUDA, NCCL, DeepSpeed ops, Ray, storage.",
        "kubectl -n ml exec db-dreambooth-head-xxxxx -c ray-head -- dreambooth doctor --output /mnt/shared/outputs --expect-gpu",
    )
    doctor.add_argument("--output", default=None, help="folder/URI to probe for read/write access (nothing is left behind)")
    doctor.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local one if running)")
    doctor.add_argument("--expect-gpu", action="store_true", help="a missing GPU, driver or CUDA build is a failure, not a warning")
    doctor.add_argument("--timeout", type=float, default=10.0, help="seconds each network check may take")
    doctor.set_defaults(func=cmd_doctor)

    from dreambooth.planning.command import register_plan  # its flags and printing live in dreambooth/planning

    register_plan(sub, _parser)
    return parser
