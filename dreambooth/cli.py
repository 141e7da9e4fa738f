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
    check_range,
    load_yaml,
    validate_generation,
)
from dreambooth.inputs import InputError
from dreambooth.storage import StorageError
from dreambooth.subjects import SubjectError

log = logging.getLogger("dreambooth")

PRIOR_FIELDS = (
    "model", "revision", "class_noun", "resolution", "num_class_images", "prior_output", "prior_actors",
    "prior_batch_size", "num_inference_steps", "guidance_scale", "prior_seed", "extra_prior_prompts",
    "extra_prior_share", "unconditional_prior_share", "use_gpu",
)


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
        # "none" where the model's recipe lists some (e.g. --extra-prior-prompts).
        parser.add_argument(flag, dest=info.name, nargs="*", default=None, metavar="TEXT",
                            help=f"{help_text}; the flag alone means none")
    else:
        parser.add_argument(flag, dest=info.name, default=None, metavar=info.name.upper(), help=help_text)


def _flag_values(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def config_from_args(args: argparse.Namespace, names: Sequence[str]) -> RunConfig:
    """The model's recipe (``dreambooth.yaml`` in its folder) first, then the YAML file (``--config``),
    flags on top; typed and checked field by field. ``cfg.sources`` says which set each field."""
    from dreambooth.models import with_recipe

    layers = []
    if getattr(args, "config", None):
        layers.append((load_yaml(args.config), args.config))
    layers.append((_flag_values(args, names), "command-line flags"))
    return build_config(*with_recipe(*layers))


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
    cfg = prepared.config  # resolved: native resolution and identifier filled in
    for warning in prepared.identifier_warnings:
        log.warning(warning)
    if prepared.identifier_was_auto:
        log.info("identifier: picked %r (rare token; recorded in the run record)", cfg.subject.identifier)
    outcome = pipeline.execute(prepared)
    if outcome.skipped:
        print(f"{cfg.output} is already complete (run.json present); nothing to do. Use --overwrite to train again.")
        return 0
    record = outcome.record or {}
    out = cfg.output.rstrip("/")
    before_after = cfg.export.before_after and cfg.export.num_sample_images > 0
    print(
        f"\nDone: '{cfg.subject.instance_prompt}' in {record.get('timings', {}).get('total_s', 0):.0f} s.\n"
        f"  model:        {cfg.output}\n  grid:         {record.get('grid')}\n"
        + (f"  before/after: {out}/before_after.png\n" if before_after else "")
        + f"  run record:   {out}/run.json\n"
        f"next:\n  dreambooth sample --model {cfg.output} --prompt \"{cfg.sample_prompts()[0]}\" --output sample.png\n"
        f"  dreambooth eval --output {cfg.output}"
    )
    return 0


def cmd_prior(args: argparse.Namespace) -> int:
    from dreambooth import cluster, models, priors

    cfg = config_from_args(args, PRIOR_FIELDS)
    if not cfg.prior.prior_output:
        raise ConfigError("--output is empty; pass where the prior shards should go")
    validate_generation(cfg)
    model_path = models.resolve_model(cfg.model, cfg.revision)
    cfg = models.with_native_resolution(cfg)
    from dreambooth.storage import check_writable

    check_writable(cfg.prior_root)
    cluster.connect()
    spec = priors.spec_from_config(cfg, models.scheduler_class_name(model_path))
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
    from dreambooth import identifier, models

    from dreambooth.inputs import shorten

    check_range(args.count, 1, 100_000, "--count")
    check_range(args.seed, 0, 2**31 - 1, "--seed")
    if args.check is not None and (not args.check.strip() or len(args.check) > 200 or any(ord(c) < 32 for c in args.check)):
        raise ConfigError(f"--check {shorten(args.check)} must be 1-200 characters of text without line breaks")
    path = models.resolve_model(args.model)
    tokenizers = models.model_family(path).load_tokenizers(path)  # SDXL: both; a pick is one token in each
    if args.check:
        report = identifier.check_identifier(tokenizers[0], args.check, *tokenizers[1:])
        print(f"{args.check!r} → token ids {report.token_ids}")
        for warning in report.warnings:
            print(f"warning: {warning}")
        return 0
    for ident in identifier.pick_identifiers(tokenizers[0], args.count, args.seed, others=tokenizers[1:]):
        print(ident)
    return 0


def _check_sample_args(args: argparse.Namespace) -> None:
    """`sample` flags, checked before any model is loaded."""
    from dreambooth import storage
    from dreambooth.config import MAX_SEED, validate_resolution
    from dreambooth.inputs import MAX_PROMPT_CHARS, shorten

    check_range(args.num_images, 1, 64, "--num-images")
    if args.steps is not None:
        check_range(args.steps, 1, 1000, "--steps")
    if args.guidance_scale is not None:
        check_range(args.guidance_scale, 0, 100, "--guidance-scale")
    check_range(args.seed, 0, MAX_SEED, "--seed")
    if args.resolution is not None:
        validate_resolution(args.resolution)
    if len(args.prompt) > MAX_SAMPLE_PROMPTS:
        raise ConfigError(f"--prompt has {len(args.prompt)} prompts; at most {MAX_SAMPLE_PROMPTS} per grid")
    for prompt in args.prompt:
        if not prompt.strip() or len(prompt) > MAX_PROMPT_CHARS or any(ord(c) < 32 for c in prompt):
            raise ConfigError(f"--prompt {shorten(prompt)} must be 1-{MAX_PROMPT_CHARS} characters of text "
                              "without line breaks")
    if not args.output.lower().endswith(".png"):
        raise ConfigError(f"--output {args.output} must name a .png file, e.g. {args.output.rstrip('/')}/grid.png")
    fs, path = storage.filesystem(args.output)
    with storage.guard(args.output):
        is_dir = fs.isdir(path)
    if is_dir:
        raise ConfigError(f"--output {args.output} is a folder; name a PNG file inside it, e.g. {storage.join(args.output, 'grid.png')}")
    storage.check_writable(args.output.rsplit("/", 1)[0] if "/" in args.output else ".")


MAX_SAMPLE_PROMPTS = 256


def cmd_sample(args: argparse.Namespace) -> int:
    from dreambooth.sample import sample_to_file, sampler_settings

    _check_sample_args(args)
    sampler = sampler_settings(args.model, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                               resolution=args.resolution)
    out = sample_to_file(
        args.model,
        args.prompt,
        args.output,
        num_images=args.num_images,
        seed=args.seed,
        num_inference_steps=sampler.num_inference_steps,
        guidance_scale=sampler.guidance_scale,
        resolution=sampler.resolution,
    )
    print(f"Done: {len(args.prompt)} prompt(s) x {args.num_images} image(s) → {out} ({sampler.describe()})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from dreambooth.evaluation.runner import EvalOptions, evaluate, format_table

    check_range(args.images_per_prompt, 1, 64, "--images-per-prompt")
    if args.steps is not None:
        check_range(args.steps, 1, 1000, "--steps")
    if args.guidance_scale is not None:
        check_range(args.guidance_scale, 0, 100, "--guidance-scale")
    check_range(args.seed, 0, 2**31 - 1, "--seed")
    options = EvalOptions(
        output=args.output, suite=args.suite, shapes_subject=args.shapes_subject,
        images_per_prompt=args.images_per_prompt, seed=args.seed, num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale, compare_base=not args.no_base,
        dino_model=args.dino_model, clip_model=args.clip_model, report=args.report,
    )
    report = evaluate(options)
    where = args.report or f"{args.output.rstrip('/')}/eval.json"
    print(f"{report['suite']} suite, identifier {report['identifier']!r}, class {report['class_noun']!r}:")
    print(format_table(report))
    print(f"report: {where}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from dreambooth.doctor import main_report

    return main_report(output=args.output, ray_address=args.ray_address, expect_gpu=args.expect_gpu,
                       timeout_s=args.timeout)


def _bulk_options(args: argparse.Namespace):
    from dreambooth.bulk import BulkOptions

    return BulkOptions(args.manifest, args.output, max_concurrent=args.max_concurrent or 0,
                       max_retries=1 if args.max_retries is None else args.max_retries,
                       distinct_identifiers=args.distinct_identifiers,
                       summary_configmap=getattr(args, "summary_configmap", None),
                       summary_namespace=getattr(args, "summary_namespace", None))


def _run_flags(args: argparse.Namespace) -> dict[str, Any]:
    return _flag_values(args, [n for n in all_fields() if n != "output"])


def cmd_bulk(args: argparse.Namespace) -> int:
    from dreambooth import bulk

    options = _bulk_options(args)
    planned = bulk.plan(options, _run_flags(args), args.config)
    report = bulk.run_bulk(options, planned)
    summary = bulk.write_summary(options, report)
    print(bulk.format_table(report))
    print(f"summary: {summary}")
    if not report.ok:
        print("next: fix the failed subjects and run the same command again; finished subjects are skipped")
        return 1
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from dreambooth import bulk, kube
    from dreambooth.kube import layouts as kube_layouts

    options = _bulk_options(args)
    planned = bulk.plan(options, _run_flags(args), args.config, check_paths=False, base={"use_gpu": "true"})
    bulk_run = args.bulk_run or kube.default_bulk_run(args.manifest)
    spec = kube.load_cluster_spec(args.ray_cluster_spec) if args.ray_cluster_spec else None
    per_subject = args.layout == "per-subject"
    shared = spec is None
    _check_submit_limits(args, per_subject, shared)
    api = None if (args.dry_run and args.offline) else kube.load_api_client(args.kubeconfig, args.context, args.request_timeout)
    image = args.image or (kube_layouts.head_image(spec) if spec else None) or (
        kube.cluster_head_image(api, args.namespace, args.cluster) if api is not None and args.cluster else None)
    if not image:
        raise ConfigError("--image is needed for the RayJobs' submitter pod (the cluster's image, with the `ray` CLI); "
                          "without --offline it is read from the RayCluster named by --cluster")
    try:
        target = kube.RayJobTarget(
            namespace=args.namespace, bulk_run=bulk_run, cluster_name=args.cluster, ray_cluster_spec=spec,
            submitter_image=image, queue_name=args.queue_name,
            driver_slots=per_subject and shared and bool(args.max_concurrent),
            backoff_limit=(args.max_retries or 0) if per_subject and not shared else 0,
        )
        if per_subject:
            objects = [kube.build_rayjob(job, target) for job in bulk.subject_jobs(planned, options.distinct_identifiers)]
        else:
            objects = kube.build_bulk_objects(bulk.manifest_for_cluster(planned, options.distinct_identifiers), target,
                                              args.output, options.max_concurrent, options.max_retries)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.dry_run:
        print(kube.rayjobs_to_yaml(objects))
    results = kube.submit(api, objects, dry_run=args.dry_run)
    print(kube.format_submit_results(results))
    if not all(r.ok for r in results):
        return 1
    if target.driver_slots:
        print(f"note: each driver waits for one '{kube_layouts.DRIVER_RESOURCE}' resource of the head of {args.cluster}; "
              "the chart advertises jobs.maxConcurrent of them with jobs.layout perSubject (else the jobs never start)")
    if not args.dry_run:
        print(f"next:\n  dreambooth status --namespace {args.namespace} --bulk-run {bulk_run}\n"
              f"  kubectl -n {args.namespace} get rayjobs -l dreambooth.io/bulk-run={bulk_run} -w")
    return 0


def _check_submit_limits(args: argparse.Namespace, per_subject: bool, shared: bool) -> None:
    """--max-concurrent/--max-retries are used where the layout can honour them and refused elsewhere."""
    if not per_subject:
        if args.queue_name:
            raise ConfigError("--queue-name (Kueue) needs --layout per-subject with --ray-cluster-spec: Kueue admits "
                              "one RayJob per subject, each with its own cluster")
        return  # the in-cluster bulk driver takes both, as `dreambooth bulk` does locally
    if shared and args.max_retries:
        raise ConfigError(f"--max-retries {args.max_retries}: KubeRay refuses retries of RayJobs on a shared cluster; "
                          "pass --max-retries 0, use --layout bulk (the driver retries subjects), or give each job "
                          "its own cluster (--ray-cluster-spec)")
    if not shared and args.max_concurrent:
        raise ConfigError(f"--max-concurrent {args.max_concurrent}: with one cluster per RayJob the cluster's capacity "
                          "(or Kueue's ClusterQueue quota, --queue-name) bounds how many run at once; drop the flag")


def cmd_status(args: argparse.Namespace) -> int:
    from dreambooth import kube
    from dreambooth.kube import status as kube_status

    api = kube.load_api_client(args.kubeconfig, args.context, args.request_timeout)
    rows = kube_status.list_status(api, args.namespace, args.bulk_run)
    print(kube_status.format_status_table(rows))
    return 0


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
    sample.add_argument("--prompt", required=True, nargs="+", help="one or more prompts (one grid row each)")
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
        "dreambooth eval --output runs/demo/checker_square --images-per-prompt 8",
    )
    evaluate.add_argument("--output", required=True, help="finished run folder/URI (holds run.json)")
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


def _kube_config_error() -> type:
    from dreambooth.kube import KubeConfigError

    return KubeConfigError


def _kube_error() -> type:
    from dreambooth.kube import KubeError

    return KubeError


def _training_failed() -> type[Exception]:
    from dreambooth.pipeline import TrainingFailed

    return TrainingFailed


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ConfigError, SubjectError, StorageError, PermissionError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except _kube_config_error() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except _training_failed() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except _kube_error() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
