"""``dreambooth run``: preflight (no Ray) → class priors (cached) → training, export and run record.

Everything a user can get wrong is checked in ``preflight`` before Ray starts; nothing is written
to the output until training begins. Training, export and the run record (the completion marker,
written last) happen on the training workers (``training.loop``): one subject on one warm worker
group, the same path ``bulk`` takes for many — or, for one local worker, the same loop in this
process (``training.local``, ``--launcher``).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Collection, Optional

from dreambooth import cluster, export, identifier, models, priors, storage
from dreambooth.config import ConfigError, RunConfig, validate
from dreambooth.subjects import SubjectImage, check_backdrops_swappable, load_subject_images
from dreambooth.training import checkpoint
from dreambooth.training.engine import require_optimizer

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A run that passed every check and can take cluster time."""

    config: RunConfig
    model_path: str
    images: list[SubjectImage]
    identifier_warnings: list[str] = field(default_factory=list)
    identifier_was_auto: bool = False


@lru_cache(maxsize=4)
def _tokenizers(model_path: str, revision: Optional[str]) -> tuple:
    """The model's tokenizers (one per text encoder), as its family loads them."""
    return models.model_family(model_path, revision).load_tokenizers(model_path, revision)


def resolve_identifier(
    cfg: RunConfig,
    model_path: str,
    taken: Collection[str] = frozenset(),
    drawers: Optional[dict[str, identifier.IdentifierDrawer]] = None,
) -> tuple[str, bool, list[str]]:
    """``(identifier, drawn, warnings)``: ``identifier: auto`` drawn from the model's tokenizer (one token
    in each of its tokenizers), or a user-given one checked. ``cfg`` is not written.

    ``drawers`` (one per model path) carries the draw's position from subject to subject of a bulk run.
    """
    tokenizers = _tokenizers(model_path, cfg.revision)
    if cfg.subject.identifier == "auto":
        drawer = identifier.drawer_for(*tokenizers) if drawers is None else drawers.setdefault(
            model_path, identifier.drawer_for(*tokenizers))
        return drawer.draw(cfg.subject.identifier_seed, taken), True, []
    if cfg.subject.identifier in taken:
        raise ConfigError(f"--identifier {cfg.subject.identifier!r} is already used by another subject; pick another")
    return cfg.subject.identifier, False, identifier.check_identifier(
        tokenizers[0], cfg.subject.identifier, *tokenizers[1:]).warnings


def unfinished_identifier(cfg: RunConfig, resumed: Optional[checkpoint.Complete]) -> Optional[str]:
    """The identifier an unfinished run of an ``identifier: auto`` subject drew and trained (None: none to resume)."""
    if resumed is None or cfg.subject.identifier != "auto" or cfg.overwrite:
        return None
    return (resumed.settings or {}).get("identifier")


def with_identifier(cfg: RunConfig, chosen: str, source: Optional[str] = None) -> RunConfig:
    """A copy of ``cfg`` whose identifier is ``chosen`` (drawn ones, or ``source``, say so in ``sources``)."""
    if chosen == cfg.subject.identifier:
        return cfg
    sources = {**cfg.sources, "identifier": source or f"drawn from the tokenizer (identifier_seed {cfg.subject.identifier_seed})"}
    return replace(cfg, subject=replace(cfg.subject, identifier=chosen), sources=sources)


def check_output_location(cfg: RunConfig) -> None:
    """Refuse an output that would put the user's own files in the way of a run or of --overwrite.

    The output may not be a filesystem root, a home folder or a bucket root, may not hold (or be)
    the subject's photos or the prior cache, and may not lie inside the photo folder.
    """
    out = cfg.output
    if storage.is_root(out):
        raise ConfigError(f"--output {out} is a filesystem, home or bucket root; pass a folder of its own, "
                          f"e.g. {storage.join(out, 'runs', 'my-subject')}")
    instance = cfg.subject.instance_dir
    if storage.contains(out, instance):
        raise ConfigError(f"--output {out} contains the subject's photos (--instance-dir {instance}); "
                          "write the model to a folder of its own, e.g. a sibling of the photo folder")
    if storage.contains(instance, out):
        raise ConfigError(f"--output {out} lies inside the photo folder --instance-dir {instance}; "
                          "write the model somewhere else")
    if cfg.train.prior_loss_weight > 0:
        prior_root = cfg.prior_root
        if storage.contains(out, prior_root) or storage.contains(prior_root, out):
            raise ConfigError(f"--output {out} and the prior cache {prior_root} overlap; the cache is shared by "
                              "every subject of a class: give --prior-output a folder outside the output")
        if storage.contains(prior_root, instance):
            raise ConfigError(f"the prior cache {prior_root} contains the subject's photos ({instance}); "
                              "set --prior-output to a folder of its own")


def check_settings(cfg: RunConfig) -> None:
    """What a validated config needs from this machine before any cluster time: a usable output location,
    the tracker's library and configuration, the optimizer (the workers run this image)."""
    check_output_location(cfg)
    if cfg.export.report_to != "none":
        from dreambooth import tracking

        tracking.check_report_to(cfg.export.report_to)
    require_optimizer(cfg.train)


def _with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its local output, photo and prior folders absolute (``storage.absolute``): this runs
    where the run does, so a relative path means this process's working directory, also on the workers."""
    cfg.output = storage.absolute(cfg.output)
    if cfg.subject.instance_dir:
        cfg.subject.instance_dir = storage.absolute(cfg.subject.instance_dir)
    if cfg.prior.prior_output:
        cfg.prior.prior_output = storage.absolute(cfg.prior.prior_output)
    return cfg


def preflight(
    cfg: RunConfig,
    taken_identifiers: Collection[str] = frozenset(),
    keep_images: bool = True,
    drawers: Optional[dict[str, identifier.IdentifierDrawer]] = None,
) -> Prepared:
    """Validate config, model, photos, identifier and output; raise ConfigError/SubjectError/PermissionError.

    ``cfg`` is not written: ``Prepared.config`` is a resolved copy (class noun normalized, native
    resolution, ``auto`` identifier and a recipe's settings for photos without captions filled in, each
    recorded in ``sources``), and it is the only
    config the stages after this read. ``keep_images=False`` checks the photos but does not keep them
    (bulk runs of thousands of subjects load each subject's photos again when it starts).
    """
    cfg = _with_absolute_paths(validate(copy.deepcopy(cfg)))
    check_settings(cfg)
    model_path = models.resolve_model(cfg.model, cfg.revision)
    cfg = models.with_native_resolution(cfg)  # before anything reads cfg.train.resolution
    images = load_subject_images(cfg.subject.instance_dir, cfg.train.resolution)
    for_photos = models.with_recipe_for_photos(cfg, images)  # a recipe may differ for photos without captions
    if for_photos is not cfg:
        cfg = validate(for_photos)
        check_settings(cfg)
    if models.local_model_folder(cfg.model) is not None:
        # After the recipe's layers, which name the model as typed (``settings_for_photos`` looks them up by it):
        # the checkpoint, the prior cache and run.json then name the folder any later `eval` can load.
        cfg.model = storage.absolute(cfg.model)
    if cfg.train.background_swap > 0:
        check_backdrops_swappable(images)
    complete = export.is_complete(cfg.output)
    resumed = None if complete or cfg.overwrite else checkpoint.unfinished(cfg.output)
    drawn_before = unfinished_identifier(cfg, resumed)
    if drawn_before:  # the unfinished run's own draw, which a bulk run's later draws may no longer give
        if drawn_before in taken_identifiers:
            raise ConfigError(f"the unfinished run in {cfg.output} trained the identifier {drawn_before!r}, which "
                              "another subject now uses: give one of them another --identifier, or start this one "
                              "over (--overwrite)")
        chosen, was_auto, warnings = drawn_before, True, []
        source = f"the unfinished run's checkpoint in {cfg.output}"
    else:
        chosen, was_auto, warnings = resolve_identifier(cfg, model_path, taken_identifiers, drawers)
        source = None
    cfg = with_identifier(cfg, chosen, source)
    checkpoint.check_resumable(cfg, resumed)
    if not keep_images:
        images = []
    if not complete or cfg.overwrite:
        storage.check_writable(cfg.output)
        if cfg.train.prior_loss_weight > 0:
            storage.check_writable(cfg.prior_root)
    return Prepared(cfg, model_path, images, warnings, was_auto)


def clear_earlier_run(cfg: RunConfig) -> None:
    """``--overwrite``, once the run is known to be able to start: remove what an earlier run wrote
    in ``cfg.output`` — its record first, its checkpoints too (an unfinished run is started over,
    not resumed) — and nothing else."""
    if not cfg.overwrite:
        return
    removed = export.remove_run_outputs(cfg.output)
    if removed:
        log.info("--overwrite: removed the earlier run's %s from %s (nothing else)", ", ".join(removed), cfg.output)


class TrainingFailed(RuntimeError):
    """The subject's training (or export) failed after its retries; the message says where to look."""


@dataclass
class RunOutcome:
    output: str
    skipped: bool
    record: Optional[dict] = None


def execute(prepared: Prepared) -> RunOutcome:
    """Run the stages for a prepared subject: on Ray Train, or in this process (``--launcher``)."""
    cfg = prepared.config
    complete = export.is_complete(cfg.output)
    if complete and not cfg.overwrite:
        return RunOutcome(cfg.output, skipped=True, record=export.read_run_record(cfg.output))

    timings: dict[str, float] = {"driver_started_unix": time.time()}
    launcher = cluster.resolve_launcher(cfg.train)
    if launcher == "in-process":
        use_gpu = cluster.local_use_gpu(cfg.train.use_gpu)  # Ray starts only if priors must be generated
    else:
        start = time.monotonic()
        cluster.connect()
        timings["connect_s"] = time.monotonic() - start
        use_gpu = cluster.resolve_use_gpu(cfg.train.use_gpu)
        cluster.check_feasible(cfg.train, use_gpu)
        cluster.require_cuda(use_gpu)
    require_optimizer(cfg.train, cuda=use_gpu)  # where training runs is known now
    clear_earlier_run(cfg)

    ray_was_up = cluster.ray_is_up()
    prior_set = make_priors(prepared, use_gpu, timings)
    if launcher == "in-process" and not ray_was_up and cluster.ray_is_up():
        cluster.shutdown()  # started for the priors alone: its processes would compete with training
    work = subject_work("subject", prepared, prior_set, use_gpu, timings)
    work.record["launcher"] = launcher
    log.info("training %s %s", cfg.output, "in this process (--launcher in-process)" if launcher == "in-process"
             else f"on a Ray Train worker group of {cfg.train.workers}")
    if launcher == "in-process":
        from dreambooth.training.local import train_here

        states = train_here([work], cuda=use_gpu, max_retries=0)
    else:
        from dreambooth.training.trainer import train_subjects

        states = train_subjects([work], slots=1, use_gpu=use_gpu, max_retries=0,
                                trainer_storage=storage.join(cfg.output, export.TRAINER_STORAGE))
    state = states[work.name]
    if state.status != "succeeded":
        where = ("the log above" if launcher == "in-process"
                 else "the training workers' logs (`ray logs`, or the RayJob's pods on Kubernetes)")
        raise TrainingFailed(f"training failed: {state.error} — see {where}; `dreambooth doctor` checks the "
                           "installation and cluster")
    return RunOutcome(cfg.output, skipped=False, record=state.record)


def make_priors(prepared: Prepared, use_gpu: bool, timings: Optional[dict] = None) -> Optional[priors.PriorSet]:
    """The subject's class priors, generated where the cache lacks them (None without prior preservation).

    A complete cache is read without Ray; generating starts (or joins) the Ray cluster.
    """
    cfg = prepared.config
    if cfg.train.prior_loss_weight <= 0:
        return None
    timings = {} if timings is None else timings
    spec = priors.spec_from_config(cfg, models.scheduler_class_name(prepared.model_path))
    cached = priors.lookup(spec, cfg.prior_root, cfg.prior.num_class_images)
    if cached is not None:
        timings["priors_s"] = 0.0
        return cached
    start = time.monotonic()
    cluster.connect()
    timings.setdefault("connect_s", time.monotonic() - start)
    prior_set = priors.generate(spec, prepared.model_path, cfg.prior_root, cfg.prior.num_class_images,
                                use_gpu=use_gpu, actors=cfg.prior.prior_actors, batch_size=cfg.prior.prior_batch_size)
    timings["priors_s"] = prior_set.seconds
    return prior_set


def subject_work(name: str, prepared: Prepared, prior_set: Optional[priors.PriorSet], use_gpu: bool,
                 timings: Optional[dict] = None):
    """A ``SubjectWork`` for the warm trainers, with the run-record fields the driver knows."""
    from dreambooth.training.subject_queue import SubjectWork

    cfg = prepared.config
    record = {
        "identifier": cfg.subject.identifier,
        "identifier_auto": prepared.identifier_was_auto,
        "identifier_warnings": prepared.identifier_warnings,
        "class_noun": cfg.subject.class_noun,
        "instance_prompt": cfg.subject.instance_prompt,
        "class_prompt": cfg.subject.class_prompt,
        "sample_prompts": cfg.sample_prompts(),
        "model": cfg.model,
        "priors": {
            "cache": prior_set.uri if prior_set else None,
            "images": len(prior_set.seeds) if prior_set else 0,
            "generated": prior_set.generated if prior_set else 0,
            "extra_prompts": len(cfg.prior.extra_prior_prompts),
            "extra_share": cfg.prior.extra_share_used,
            "unconditional_share": cfg.prior.unconditional_prior_share,
        },
        "timings": dict(timings or {}),
        "use_gpu": use_gpu,
        # Where each setting came from (model recipe, config file, flags, bulk manifest); unlisted: defaults.
        "config_sources": dict(cfg.sources),
    }
    return SubjectWork(name, cfg, prepared.model_path, prior_set, record, images=prepared.images)
