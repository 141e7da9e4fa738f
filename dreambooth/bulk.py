"""``dreambooth bulk``: personalize many subjects on one Ray cluster.

Owns the manifest and the scheduling of subjects. A manifest is YAML::

    defaults:                 # optional: any `run` option, for every subject
      max_train_steps: 400
    subjects:
      - name: my-dog          # a Kubernetes-style name: the subject's folder and RayJob name
        instance_dir: s3://bucket/subjects/my-dog
        class_noun: dog
        identifier: sks       # optional; `auto` (default) draws a unique rare token
        learning_rate: 2e-6   # any `run` option overrides the defaults for this subject

Layers, later winning: built-in defaults < ``--config`` file < manifest ``defaults`` < bulk flags <
the subject's own keys. Subject ``name`` writes to ``<output>/<name>/``; priors go to
``<output>/priors`` unless ``prior_output`` says otherwise.

Order of work: (1) the whole manifest is checked before anything runs (names, duplicates, config
values, instance folders, identifiers unique across subjects — auto-picked ones too); (2) each
subject's photos are checked: a subject with bad photos fails alone; (3) the priors of each distinct
(model, class, sampler settings) are generated once; (4) subjects train on warm worker groups, at
most ``max_concurrent`` groups at once: each group loads the base model once and trains subject
after subject (``training.trainer``), a failed subject retried up to ``max_retries`` times, a lost
worker resumed from the subject's checkpoint; (5) a table and ``<output>/bulk-summary.json``
report every subject.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Collection, Iterator, Optional

import yaml

from dreambooth import cluster, export, models, pipeline, priors, storage
from dreambooth.config import ConfigError, RunConfig, build_config, flatten, validate
from dreambooth.inputs import MAX_MANIFEST_BYTES, InputError, load_yaml_file
from dreambooth.subjects import SubjectError
from dreambooth.training import checkpoint
from dreambooth.training.engine import require_optimizer

log = logging.getLogger(__name__)

SUMMARY = "bulk-summary.json"
PROGRESS_EVERY = 1000
"""Log a progress line every this many subjects while checking a manifest."""


@dataclass
class BulkOptions:
    """How a bulk run is scheduled (the subjects' own settings live in their RunConfigs)."""

    manifest: str
    """YAML file listing the subjects (see the module docstring)."""

    output: str
    """Root URI; subject ``name`` writes to ``<output>/<name>/``."""

    max_concurrent: int = 0
    """Subjects training at once; 0 = as many as the cluster's GPUs (or CPUs) fit right now."""

    max_retries: int = 1
    """Times a subject that failed while running is tried again (bad photos are not retried)."""

    distinct_identifiers: bool = True
    """Give every subject its own identifier (auto ones are drawn to be distinct, 1-3 rare tokens
    each). Separate models do not need it: false lets subjects share one (e.g. all ``sks``)."""

    summary_configmap: Optional[str] = None
    """Also publish the summary, as it changes, to this ConfigMap (in-cluster bulk driver; read by
    ``dreambooth status``)."""

    summary_namespace: Optional[str] = None
    """Namespace of ``summary_configmap``; default: the pod's own namespace."""

    def __post_init__(self) -> None:
        if not str(self.output).strip():
            raise ConfigError("--output is empty; pass the root folder or URI under which each subject's model goes")
        if storage.is_root(self.output):
            raise ConfigError(f"--output {self.output} is a filesystem, home or bucket root; pass a folder of its own, "
                              f"e.g. {storage.join(self.output, 'runs')}")
        if not 0 <= self.max_concurrent <= 10_000:
            raise ConfigError(f"--max-concurrent must be between 0 (what the cluster fits) and 10000, got {self.max_concurrent}")
        if not 0 <= self.max_retries <= 100:
            raise ConfigError(f"--max-retries must be between 0 and 100, got {self.max_retries}")


@dataclass
class SubjectResult:
    name: str
    status: str  # pending | running | retrying | succeeded | skipped | failed
    output: str
    identifier: Optional[str] = None
    attempts: int = 0
    seconds: float = 0.0
    started_unix: Optional[float] = None  # first launch
    finished_unix: Optional[float] = None  # last attempt's end
    error: Optional[str] = None
    output_bytes: Optional[int] = None  # the exported pipeline's size
    restarts: int = 0  # worker-group restarts (a lost worker) that resumed it from its checkpoint
    resumed_from: int = 0  # the checkpoint step the last restart resumed from


@dataclass
class BulkReport:
    results: list[SubjectResult]
    prior_caches: dict[str, int] = field(default_factory=dict)  # cache uri -> images generated now
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.status != "failed" for r in self.results)


# --------------------------------------------------------------------------- manifest → configs


def load_manifest(path: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The subjects and the flat defaults of a manifest file (size and alias expansion limited)."""
    if not Path(path).is_file():
        raise ConfigError(f"--manifest {path} does not exist; pass a YAML file with a 'subjects' list")
    try:
        data = load_yaml_file(path, "manifest", MAX_MANIFEST_BYTES) or {}
    except InputError as exc:
        raise ConfigError(str(exc)) from None
    if not isinstance(data, dict) or set(data) - {"subjects", "defaults"}:
        raise ConfigError(f"manifest {path} must be a mapping with 'subjects' (and optional 'defaults')")
    subjects = data.get("subjects")
    if not isinstance(subjects, list) or not subjects:
        raise ConfigError(f"manifest {path} has no subjects; add a 'subjects:' list with name, instance_dir, class_noun")
    defaults = flatten(data.get("defaults") or {}, f"{path} (defaults)")
    return subjects, defaults


def plan(
    options: BulkOptions,
    flags: Optional[dict[str, Any]] = None,
    config_file: Optional[str] = None,
    check_paths: bool = True,
    base: Optional[dict[str, Any]] = None,
) -> list[tuple[str, RunConfig]]:
    """Check the whole manifest and build one validated RunConfig per subject. Raises ConfigError.

    ``base`` holds defaults below every user layer (e.g. `submit`'s ``use_gpu: true``: on Kubernetes
    GPUs are on unless asked otherwise).

    ``check_paths=False`` skips the instance-folder check, for `submit`: the folders are read on
    the cluster and may not be visible from where the RayJobs are created.
    """
    from dreambooth.config import load_yaml
    from dreambooth.kube import validate_k8s_name

    subjects, defaults = load_manifest(options.manifest)
    file_layers = [(base, "defaults of this command")] if base else []
    file_layers += [(load_yaml(config_file), config_file)] if config_file else []
    seen: dict[str, int] = {}
    given_identifiers: dict[str, str] = {}
    planned = []
    started = time.monotonic()
    for index, entry in enumerate(subjects):
        if index and index % PROGRESS_EVERY == 0:
            log.info("checked %d of %d subjects (%.1f s)", index, len(subjects), time.monotonic() - started)
        where = f"{options.manifest}: subjects[{index}]"
        if not isinstance(entry, dict) or entry.get("name") in (None, ""):
            raise ConfigError(f"{where} needs a 'name' (a lowercase Kubernetes-style name such as 'my-dog')")
        if not isinstance(entry["name"], str):
            raise ConfigError(
                f"{where}: name {entry['name']!r} was read by YAML as a {type(entry['name']).__name__}, not text "
                f"(YAML reads 012 as 10 and 0x1f as 31); quote it in the manifest: name: \"{_raw_name(options.manifest, index)}\""
            )
        name = entry["name"]
        try:
            validate_k8s_name(name, what=f"subject name {name!r}")
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if name in seen:
            raise ConfigError(f"{where}: name {name!r} is used twice (also subjects[{seen[name]}]); names must be unique")
        seen[name] = index
        own = flatten({k: v for k, v in entry.items() if k != "name"}, f"{where} ({name})")
        if "output" in own:
            raise ConfigError(f"{where} ({name}): 'output' is set by bulk as <output>/{name}; remove it")
        cfg = build_config(*models.with_recipe(
            *file_layers,
            (defaults, f"{options.manifest} (defaults)"),
            (flags or {}, "command-line flags"),
            (own, f"{where} ({name})"),
            ({"output": storage.join(options.output, name)}, "bulk"),
        ))
        if not cfg.prior.prior_output:
            cfg.prior.prior_output = storage.join(options.output, "priors")
        try:
            validate(cfg)
            pipeline.check_output_location(cfg)
            if cfg.train.launcher == "in-process":
                raise ConfigError("--launcher in-process is for `dreambooth run`; bulk trains on warm Ray Train "
                                  "worker groups (drop --launcher, or set it to auto or ray-train)")
        except ConfigError as exc:
            raise ConfigError(f"subject {name!r}: {exc}") from None
        if check_paths and not storage.exists(cfg.subject.instance_dir):
            raise ConfigError(f"subject {name!r}: instance_dir {cfg.subject.instance_dir} does not exist")
        ident = cfg.subject.identifier
        if ident != "auto" and options.distinct_identifiers:
            if ident in given_identifiers:
                raise ConfigError(
                    f"subject {name!r}: identifier {ident!r} is also used by {given_identifiers[ident]!r}; "
                    "each subject needs its own (or use 'auto', or pass --distinct-identifiers false)"
                )
            given_identifiers[ident] = name
        planned.append((name, cfg))
    if len(subjects) >= PROGRESS_EVERY:
        log.info("checked all %d subjects in %.1f s", len(subjects), time.monotonic() - started)
    return planned


def _raw_name(manifest: str, index: int) -> str:
    """The text of ``subjects[index].name`` as written in the file, before YAML read it as a number."""
    try:
        root = yaml.compose(Path(manifest).read_text(), Loader=yaml.SafeLoader)
        subjects = next(v for k, v in root.value if k.value == "subjects")
        entry = subjects.value[index]
        return next(v.value for k, v in entry.value if k.value == "name")
    except Exception:  # only used to quote the user's text back; never fail because of it
        return "..."


# --------------------------------------------------------------------------- running


def _completed_identifier(cfg: RunConfig) -> Optional[str]:
    if export.is_complete(cfg.output):
        try:
            return export.read_run_record(cfg.output).get("identifier")
        except ConfigError:
            return None  # a damaged record: the subject is not done, and trains again
    return None


def _resumed_identifier(cfg: RunConfig) -> Optional[str]:
    try:
        return pipeline.unfinished_identifier(cfg, checkpoint.unfinished(cfg.output))
    except (storage.StorageError, OSError):
        return None  # unreadable here: the subject's own preflight reports it


def _default_concurrency(configs: list[RunConfig], use_gpu: bool) -> int:
    import ray

    key = "GPU" if use_gpu else "CPU"
    total = ray.cluster_resources().get(key, 0)
    need = max(cfg.train.workers * cluster.resource_shapes(cfg.train, use_gpu).train_worker[key] for cfg in configs)
    return max(1, int(total // need))


class _Without(Collection[str]):
    """``taken`` minus one identifier, without copying a set of thousands for every subject."""

    def __init__(self, taken: set[str], own: str):
        self._taken, self._own = taken, own

    def __contains__(self, item: object) -> bool:
        return item != self._own and item in self._taken

    def __iter__(self) -> Iterator[str]:
        return (i for i in self._taken if i != self._own)

    def __len__(self) -> int:
        return len(self._taken) - (self._own in self._taken)


def check_cluster_paths(options: BulkOptions, planned: list[tuple[str, RunConfig]]) -> None:
    """Refuse relative local paths in jobs bound for a cluster (`submit`): a job resolves them in its own
    temporary working directory on one pod, so outputs would vanish with it and photos not be found."""
    named = [("--output", options.output)]
    for name, cfg in planned:
        named += [(f"subject {name}'s instance_dir", cfg.subject.instance_dir), ("--prior-output", cfg.prior.prior_output)]
    # A hub id looks relative too: only a folder on this machine is a path. Models load from a folder or the hub.
    models_here = {cfg.model for _, cfg in planned if models.local_model_folder(cfg.model) is not None}
    named += [("--model folder", model) for model in sorted(models_here)]
    for what, path in named:
        local = path[len("file://"):] if path.startswith("file://") else None if "://" in path else path
        if not local or os.path.isabs(local):
            continue
        where = ("~ is this machine's home, not the pod's" if local.startswith("~") else
                 "a job on the cluster would resolve it in its own temporary working directory")
        other = "a hub id (org/name)" if what == "--model folder" else f"a URI such as s3://bucket/{local.lstrip('./~')}"
        raise ConfigError(f"{what} {path} is a relative path: {where}; pass an absolute path on storage every pod "
                          f"mounts, or {other}")


def run_bulk(options: BulkOptions, planned: list[tuple[str, RunConfig]]) -> BulkReport:
    """Preflight every subject, generate shared priors once, train subjects on warm worker groups."""
    options = replace(options, output=storage.absolute(options.output))  # Ray Train's storage is under it
    start = time.monotonic()
    # Absolute in the summary too: `eval --output <bulk root>` reads the subjects' outputs from it, from anywhere.
    outputs = {name: storage.absolute(cfg.output) for name, cfg in planned}
    results = {name: SubjectResult(name, "pending", outputs[name]) for name, _ in planned}
    report = BulkReport([])
    writer = SummaryWriter(options)

    def publish() -> BulkReport:
        """Every subject's state, now: to the returned report and the summary file (and ConfigMap)."""
        report.results = [results[name] for name, _ in planned]
        report.seconds = time.monotonic() - start
        writer.write(report)
        return report

    # Identifiers: user-given ones and those of finished subjects are taken before any auto draw.
    distinct = options.distinct_identifiers
    taken = {cfg.subject.identifier for _, cfg in planned if cfg.subject.identifier != "auto"} if distinct else set()
    done_ids = {name: _completed_identifier(cfg) for name, cfg in planned}
    # An unfinished auto subject keeps the identifier it trained: no other subject may draw it first.
    resumed_ids = {name: _resumed_identifier(cfg) for name, cfg in planned
                   if done_ids[name] is None and cfg.subject.identifier == "auto"}
    if distinct:
        taken |= {i for i in (*done_ids.values(), *resumed_ids.values()) if i}
    ready: list[tuple[str, pipeline.Prepared]] = []
    drawers: dict = {}
    for index, (name, cfg) in enumerate(planned):
        if index and index % PROGRESS_EVERY == 0:
            log.info("preflight: %d of %d subjects checked", index, len(planned))
        if done_ids[name] is not None and not cfg.overwrite:
            results[name] = SubjectResult(name, "skipped", outputs[name], identifier=done_ids[name])
            continue
        own = resumed_ids.get(name) or cfg.subject.identifier
        try:
            prepared = pipeline.preflight(cfg, _Without(taken, own), keep_images=False, drawers=drawers)
        except (SubjectError, ConfigError, storage.StorageError, PermissionError) as exc:
            results[name] = SubjectResult(name, "failed", outputs[name], error=f"{type(exc).__name__}: {exc}")
            continue
        chosen = prepared.config.subject.identifier
        if distinct:
            taken.add(chosen)
        results[name].identifier = chosen
        ready.append((name, prepared))

    publish()
    if not ready:
        return report

    cluster.connect()
    use_gpu = cluster.resolve_use_gpu(ready[0][1].config.train.use_gpu)
    startable = []
    for name, prepared in ready:  # a subject whose worker group can never start fails now, not after a wait
        try:
            cluster.check_feasible(prepared.config.train, use_gpu)
            require_optimizer(prepared.config.train, cuda=use_gpu)
            startable.append((name, prepared))
        except ConfigError as exc:
            results[name].status, results[name].error = "failed", f"ConfigError: {exc}"
    ready = startable
    if ready:
        cluster.require_cuda(use_gpu)  # one answer for the whole cluster: refuse before any prior is made
    if not ready:
        return publish()
    for _, prepared in ready:  # --overwrite: the earlier run's record and checkpoints go before any training
        pipeline.clear_earlier_run(prepared.config)

    # Priors: once per distinct spec, with the largest image count any subject of it asks for.
    groups: dict[str, tuple[priors.PriorSpec, list[tuple[str, pipeline.Prepared]]]] = {}
    for name, prepared in ready:
        cfg = prepared.config
        if cfg.train.prior_loss_weight > 0:
            spec = priors.spec_from_config(cfg, models.scheduler_class_name(prepared.model_path))
            groups.setdefault(spec.cache_uri(cfg.prior_root), (spec, []))[1].append((name, prepared))
    prior_sets: dict[str, Optional[priors.PriorSet]] = {name: None for name, _ in ready}
    for spec, members in groups.values():
        cfg = max((p.config for _, p in members), key=lambda c: c.prior.num_class_images)
        try:
            made = priors.generate(
                spec, members[0][1].model_path, cfg.prior_root, cfg.prior.num_class_images,
                use_gpu=use_gpu, actors=cfg.prior.prior_actors, batch_size=cfg.prior.prior_batch_size,
            )
            report.prior_caches[made.uri] = made.generated
            for name, prepared in members:  # each subject's own count, read from the now complete cache
                prior_sets[name] = made if prepared.config.prior.num_class_images == cfg.prior.num_class_images else \
                    pipeline.make_priors(prepared, use_gpu)
        except Exception as exc:  # the subjects of this class fail; others go on
            for name, _ in members:
                results[name].status, results[name].error = "failed", f"prior generation failed: {exc}"
                prior_sets.pop(name, None)
    publish()

    from dreambooth.training.trainer import group_key, train_subjects

    works = [pipeline.subject_work(name, prepared, prior_sets[name], use_gpu)
             for name, prepared in ready if name in prior_sets]
    cap = options.max_concurrent or _default_concurrency([w.config for w in works] or [ready[0][1].config], use_gpu)
    groups_of_work: dict[tuple, list] = {}
    for work in works:
        groups_of_work.setdefault(group_key(work), []).append(work)
    log.info("training %d subject(s) on at most %d warm worker group(s) at a time", len(works), cap)

    def update(states: dict) -> None:
        for name, state in states.items():
            result = results[name]
            result.status, result.attempts, result.error = state.status, state.attempts, state.error
            result.restarts, result.resumed_from = state.restarts, state.resumed_from
            result.started_unix, result.finished_unix = state.started_unix, state.finished_unix
            if state.started_unix:
                result.seconds = (state.finished_unix or time.time()) - state.started_unix
            if state.record:
                result.output_bytes = (state.record.get("output_bytes") or {}).get("total")
        publish()

    for group in groups_of_work.values():  # one process layout at a time, each on up to `cap` slots
        update(train_subjects(group, slots=cap, use_gpu=use_gpu, max_retries=options.max_retries,
                              trainer_storage=storage.join(options.output, export.TRAINER_STORAGE), on_change=update))
    for name, state in ((r.name, r) for r in report.results):
        if state.status == "succeeded":
            log.info("subject %s succeeded (%d attempt(s), %d restart(s))", name, state.attempts, state.restarts)
        elif state.status == "failed":
            log.error("subject %s failed after %d attempt(s): %s", name, state.attempts, state.error)
    return publish()


def summary_payload(options: BulkOptions, report: BulkReport, finished: bool) -> dict:
    """The summary's JSON: ``finished`` is false while subjects are still pending or running."""
    return {
        "manifest": options.manifest,
        "finished": finished,
        "ok": report.ok,
        "seconds": report.seconds,
        "counts": {s: n for s in ("pending", "running", "retrying", "succeeded", "skipped", "failed")
                   if (n := sum(r.status == s for r in report.results))},
        "prior_caches": report.prior_caches,
        "subjects": [asdict(r) for r in report.results],
    }


class SummaryWriter:
    """Writes ``<output>/bulk-summary.json`` (and its ConfigMap mirror) whenever a subject changes state.

    A failing mirror (no RBAC, no API server) is logged once and skipped: the file stays authoritative.
    """

    LARGE_RUN = 200
    """Above this many subjects, writes are at most one per ``LARGE_RUN_INTERVAL_S`` (a summary of
    thousands of subjects is megabytes: one write per state change would be quadratic)."""

    LARGE_RUN_INTERVAL_S = 5.0

    def __init__(self, options: BulkOptions):
        self.options = options
        self.uri = storage.join(options.output, SUMMARY)
        self._api = None
        self._mirror = bool(options.summary_configmap)
        self._last = float("-inf")
        self.dirty = False

    def write(self, report: BulkReport, finished: bool = False) -> str:
        interval = self.LARGE_RUN_INTERVAL_S if len(report.results) > self.LARGE_RUN else 0.0
        if not finished and time.monotonic() - self._last < interval:
            self.dirty = True
            return self.uri
        payload = summary_payload(self.options, report, finished)
        storage.write_json_atomic(self.uri, payload)
        if self._mirror:
            self._publish(payload)
        self._last, self.dirty = time.monotonic(), False
        return self.uri

    def _publish(self, payload: dict) -> None:
        from dreambooth import kube
        from dreambooth.kube import layouts as kube_layouts

        try:
            if self._api is None:
                self._api = kube.load_api_client()
            namespace = self.options.summary_namespace or kube_layouts.pod_namespace()
            kube_layouts.publish_summary(self._api, namespace, self.options.summary_configmap, payload)
        except Exception as exc:  # never let reporting stop training
            log.warning("cannot publish the bulk summary to ConfigMap %s (%s); %s still has it",
                        self.options.summary_configmap, exc, self.uri)
            self._mirror = False


def write_summary(options: BulkOptions, report: BulkReport) -> str:
    """The final summary (``finished: true``)."""
    return SummaryWriter(options).write(report, finished=True)


def format_table(report: BulkReport) -> str:
    rows = [("SUBJECT", "STATUS", "ATTEMPTS", "RESTARTS", "IDENTIFIER", "SECONDS", "OUTPUT / ERROR")]
    for r in report.results:
        restarts = f"{r.restarts} (from step {r.resumed_from})" if r.restarts and r.resumed_from else str(r.restarts)
        rows.append((r.name, r.status, str(r.attempts), restarts, r.identifier or "-", f"{r.seconds:.0f}",
                     r.error or r.output))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
    counts = {s: sum(r.status == s for r in report.results) for s in ("succeeded", "skipped", "failed")}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n) + f" in {report.seconds:.0f} s")
    return "\n".join(lines)


def resolve_identifiers(planned: list[tuple[str, RunConfig]], distinct: bool = True) -> list[tuple[str, RunConfig]]:
    """``planned`` with every ``auto`` identifier drawn, from the CLIP vocabulary every Stable Diffusion
    1.x/2.x model and both SDXL tokenizers share, unique across the manifest when ``distinct`` (before
    any job starts, on any cluster, without loading the models). The given configs are not written."""
    from dreambooth.identifier import drawer_for
    from dreambooth.models import load_clip_tokenizer
    from dreambooth.pipeline import with_identifier

    taken = {cfg.subject.identifier for _, cfg in planned if cfg.subject.identifier != "auto"} if distinct else set()
    drawer = None
    resolved = []
    for name, cfg in planned:
        if cfg.subject.identifier == "auto":
            drawer = drawer or drawer_for(load_clip_tokenizer())
            cfg = with_identifier(cfg, drawer.draw(cfg.subject.identifier_seed, taken))
            if distinct:
                taken.add(cfg.subject.identifier)
        resolved.append((name, cfg))
    return resolved


def flat_config(cfg: RunConfig) -> dict[str, Any]:
    """Every field of a resolved config by name (None left out): what a job needs to mean the same
    thing whatever version of the image runs it."""
    from dreambooth.config import all_fields

    values = {}
    for info in all_fields().values():
        holder = cfg if info.section is None else getattr(cfg, info.section)
        value = getattr(holder, info.name)
        if value is not None:
            values[info.name] = value
    return values


def cluster_config(cfg: RunConfig) -> dict[str, Any]:
    """``flat_config`` for a job planned away from its photos (``submit``): less the settings the model's recipe
    gives by whether the photos have captions, which the job's own preflight decides where the photos are (so the
    cluster's image must know the recipe's ``without_captions`` section, as every image since it shipped does)."""
    left_to_the_photos = models.settings_for_photos(cfg)
    return {key: value for key, value in flat_config(cfg).items() if key not in left_to_the_photos}


def subject_jobs(planned: list[tuple[str, RunConfig]], distinct: bool = True) -> list["SubjectJob"]:
    """One RayJob description per subject: every `run` flag of its whole resolved config (``cluster_config``).

    Sample prompts travel with the identifier and class noun filled in: the braces of a template
    would not survive the shells on the way to the Ray head.
    """
    from dreambooth.kube import SubjectJob

    jobs = []
    for name, cfg in resolve_identifiers(planned, distinct):
        args: dict[str, Any] = {}
        for key, value in cluster_config(cfg).items():
            if key == "sample_prompts":
                value = cfg.sample_prompts()
            args[key.replace("_", "-")] = [str(v) for v in value] if isinstance(value, list) else (
                str(value).lower() if isinstance(value, bool) else str(value))
        jobs.append(SubjectJob(name=name, args=args))
    return jobs


def manifest_for_cluster(planned: list[tuple[str, RunConfig]], distinct: bool = True) -> dict[str, Any]:
    """The manifest the in-cluster bulk driver runs: each subject's whole resolved config, identifiers drawn."""
    from dreambooth.kube.layouts import manifest_document

    return manifest_document([(name, {k: v for k, v in cluster_config(cfg).items() if k != "output"})
                              for name, cfg in resolve_identifiers(planned, distinct)])
