"""What each ``dreambooth`` subcommand does once its flags are parsed (``parser`` defines the flags).

Owns: the config fields ``prior`` takes, turning parsed flags into one validated ``RunConfig`` (the
model's recipe, then ``--config``, flags on top), each ``cmd_*`` (check what is cheap to check, call one
stage, print the result and the next command), and the checks of flags that no config field holds.
Each ``cmd_*`` returns the exit code; errors are raised and ``dreambooth.cli.main`` maps them to codes.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Sequence

from dreambooth.config import (
    ConfigError,
    RunConfig,
    all_fields,
    build_config,
    check_range,
    load_yaml,
    validate_generation,
)

log = logging.getLogger("dreambooth")

PRIOR_FIELDS = (
    "model", "revision", "class_noun", "resolution", "num_class_images", "prior_output", "prior_actors",
    "prior_batch_size", "num_inference_steps", "guidance_scale", "prior_seed", "extra_prior_prompts",
    "extra_prior_share", "unconditional_prior_share", "use_gpu",
)


# --------------------------------------------------------------------------- flags to a config


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
    from dreambooth import cluster, models, priors, storage

    cfg = config_from_args(args, PRIOR_FIELDS)
    if not cfg.prior.prior_output:
        raise ConfigError("--output is empty; pass where the prior shards should go")
    cfg.prior.prior_output = storage.absolute(cfg.prior.prior_output)  # the generation actors write it, from elsewhere
    validate_generation(cfg)
    model_path = models.resolve_model(cfg.model, cfg.revision)
    cfg = models.with_native_resolution(cfg)
    storage.check_writable(cfg.prior_root)
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


def _check_sampler_flags(args: argparse.Namespace) -> None:
    """The sampler flags `sample` and `eval` share: --steps, --guidance-scale (when given) and --seed."""
    from dreambooth.config import MAX_SEED

    if args.steps is not None:
        check_range(args.steps, 1, 1000, "--steps")
    if args.guidance_scale is not None:
        check_range(args.guidance_scale, 0, 100, "--guidance-scale")
    check_range(args.seed, 0, MAX_SEED, "--seed")


def _check_sample_args(args: argparse.Namespace) -> None:
    """`sample` flags, checked before any model is loaded."""
    from dreambooth import storage
    from dreambooth.config import validate_resolution
    from dreambooth.inputs import MAX_PROMPT_CHARS, shorten

    check_range(args.num_images, 1, 64, "--num-images")
    _check_sampler_flags(args)
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
    from dreambooth import storage
    from dreambooth.evaluation import many
    from dreambooth.evaluation.runner import EvalOptions, evaluate, format_table
    from dreambooth.evaluation.verdict import Finding, format_findings

    check_range(args.images_per_prompt, 1, 64, "--images-per-prompt")
    _check_sampler_flags(args)
    options = EvalOptions(
        output=args.output, suite=args.suite, shapes_subject=args.shapes_subject,
        images_per_prompt=args.images_per_prompt, seed=args.seed, num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale, compare_base=not args.no_base,
        dino_model=args.dino_model, clip_model=args.clip_model, report=args.report,
    )
    subjects = many.bulk_subjects(args.output)
    if subjects is not None:
        for flag, value in (("--report", args.report), ("--shapes-subject", args.shapes_subject)):
            if value:
                raise ConfigError(f"{flag} names one run, but {args.output} is a bulk output ({len(subjects)} "
                                  f"subjects); each subject's eval.json and {many.EVAL_SUMMARY} are written there")
        results = many.evaluate_bulk(args.output, options, subjects)
        print(many.format_bulk(results))
        print(f"summary: {storage.join(args.output, many.EVAL_SUMMARY)} (each subject's eval.json beside its model)")
        return 0
    report = evaluate(options)
    where = args.report or f"{args.output.rstrip('/')}/eval.json"
    print(f"{report['suite']} suite, identifier {report['identifier']!r}, class {report['class_noun']!r}:")
    print(format_table(report))
    if report["verdict"]:
        print(format_findings([Finding(**finding) for finding in report["verdict"]]))
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
    print(f"next: dreambooth eval --output {args.output}   # scores every subject, with a verdict each")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from dreambooth import bulk, kube
    from dreambooth.kube import layouts as kube_layouts

    options = _bulk_options(args)
    planned = bulk.plan(options, _run_flags(args), args.config, check_paths=False, base={"use_gpu": "true"})
    bulk.check_cluster_paths(options, planned)
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
