"""``dreambooth eval``: score a finished personalized run against its subject (and its base model).

Owns reading a run's record (identifier, class noun, subject photos, base model), choosing the
suite, and writing ``<output>/eval.json``. Two suites:

``shapes``      for runs on the built-in ``shapes`` model with a shapes-world subject (the photo
                folder is named after one of ``dreambooth.shapes.SUBJECTS``, holds a ``subject.json``
                of a scripted one, or ``--shapes-subject`` names it): subject fidelity, prompt
                fidelity, PRES and DIV from the world's analyzers (``evaluation.shapes``), collateral
                drift (class and other-prompt fidelity, ratios to the base), the VAE ceiling,
                ``vae_carry`` (how much of the subject the VAE alone keeps on each asked background), and
                the bare prompt at a lower guidance (``..._at_lower_guidance``: a subject the guidance
                distorts, not one training missed; ``lower_guidance``).
``dreambench``  for real models: the paper's DINO, CLIP-I and CLIP-T on the DreamBench prompt list of
                the class (25 prompts), plus PRES as the DINO similarity of "a [class]" images to
                the subject photos, and DINO of the bare prompt at the eval's and at a lower guidance
                (``dino_bare``, ``dino_bare_at_lower_guidance``). Embedding models are hub ids or local
                folders.

With ``compare_base`` the base model is scored the same way on the same seeds, with the identifier
left out of every prompt: what the model could do before personalization. The report's ``verdict``
(``evaluation.verdict``) says which bounds the run meets and what to change where it misses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import PurePosixPath

from dreambooth import storage, tracking
from dreambooth.evaluation import verdict
from dreambooth.config import ConfigError
from dreambooth.export import EVAL_RECORD, RUN_RECORD, read_run_record
from dreambooth.inputs import shorten
from dreambooth.subjects import SUBJECT_SPEC

log = logging.getLogger(__name__)

SUITES = ("auto", "shapes", "dreambench")


@dataclass
class EvalOptions:
    """What ``dreambooth eval`` scores and how."""

    output: str
    """A finished personalized run (folder or URI holding run.json)."""
    suite: str = "auto"
    """``shapes``, ``dreambench``, or ``auto``: shapes for runs on the ``shapes`` model."""
    shapes_subject: str | None = None
    """Shapes-world subject name (default: the subject photo folder's name)."""
    images_per_prompt: int = 8
    """Images per prompt; image j of every prompt uses seed ``seed + j``."""
    seed: int = 0
    """First sampling seed."""
    num_inference_steps: int | None = None
    """Denoising steps per image; None: what the run sampled with (its ``num_inference_steps``, from
    its config or its model's recipe), else ``sample.SAMPLER_DEFAULTS``."""
    guidance_scale: float | None = None
    """Classifier-free guidance scale; None: the run's, as for the steps."""
    compare_base: bool = True
    """Also score the base model (identifier left out) on the same seeds."""
    dino_model: str = "facebook/dino-vits16"
    """DreamBench suite: DINO ViT-S/16 (hub id or local folder)."""
    clip_model: str = "openai/clip-vit-base-patch32"
    """DreamBench suite: CLIP model for CLIP-I and CLIP-T (hub id or local folder)."""
    report: str | None = None
    """Where to write the JSON report (default ``<output>/eval.json``)."""

    def check(self) -> None:
        if self.suite not in SUITES:
            raise ConfigError(f"--suite {self.suite!r}: expected one of {', '.join(SUITES)}")
        if self.images_per_prompt < 2:
            raise ConfigError("--images-per-prompt must be at least 2 (diversity needs pairs)")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise ConfigError("--steps must be at least 1")


@dataclass(frozen=True)
class RunInfo:
    """What evaluation needs from a run record."""

    output: str
    model: str
    revision: str | None
    identifier: str
    class_noun: str
    instance_dir: str


MAX_RUN_RECORD_BYTES = 16 << 20


def read_run(output: str) -> RunInfo:
    uri = storage.join(output, RUN_RECORD)
    if not storage.exists(uri):
        raise ConfigError(f"{output} has no {RUN_RECORD}: it is not a finished `dreambooth run` output "
                          "(run or resume it first)")
    fs, path = storage.filesystem(uri)
    size = fs.size(path)
    if size > MAX_RUN_RECORD_BYTES:
        raise ConfigError(f"{uri} is {size:,} bytes, more than a run record can be ({MAX_RUN_RECORD_BYTES:,}); "
                          "is it the run's own run.json?")
    try:
        record = storage.read_json(uri)
        config, subject = record["config"], record["config"]["subject"]
        return RunInfo(output=output, model=str(config["model"]), revision=config.get("revision"),
                       identifier=str(record.get("identifier", subject["identifier"])),
                       class_noun=str(subject["class_noun"]), instance_dir=str(subject["instance_dir"]))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        what = "is empty" if size == 0 else f"is not a run record ({type(exc).__name__}: {shorten(str(exc))})"
        raise ConfigError(f"{uri} {what}; re-run `dreambooth run` with --overwrite to write it again") from None


def resolve_suite(options: EvalOptions, run: RunInfo) -> str:
    if options.suite != "auto":
        return options.suite
    return "shapes" if run.model == "shapes" else "dreambench"




def shapes_subject(options: EvalOptions, run: RunInfo):
    """The shapes-world subject of the run: ``--shapes-subject``, else the photo folder's
    ``subject.json``, else the shipped subject the folder is named after."""
    from dreambooth.shapes import SUBJECTS, Subject

    spec = storage.join(run.instance_dir, SUBJECT_SPEC)
    if not options.shapes_subject and storage.exists(spec):
        try:
            subject = Subject(**storage.read_json(spec))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{spec} is not a shapes subject ({shorten(str(exc))}); write it with "
                              "scripts/make-shapes-subjects.py --new, or pass --shapes-subject NAME") from None
    else:
        name = options.shapes_subject or PurePosixPath(run.instance_dir.rstrip("/")).name
        if name not in SUBJECTS:
            raise ConfigError(
                f"the shapes suite needs a shapes-world subject, and {name!r} is not one "
                f"({', '.join(SUBJECTS)}) nor has its photo folder a {SUBJECT_SPEC}; pass --shapes-subject NAME, "
                "or --suite dreambench for real photos")
        subject = SUBJECTS[name]
    if subject.class_noun != run.class_noun:
        raise ConfigError(f"subject {subject.name!r} is a {subject.class_noun}, but the run's class noun is "
                          f"{run.class_noun!r}; pass the right --shapes-subject")
    return subject


def _references(run: RunInfo):
    from dreambooth.subjects import load_subject_images

    return [image.to_pil() for image in load_subject_images(run.instance_dir, resolution=1)]


STDERR = "_stderr"
"""Suffix of a measure's standard error over the sampling seeds (``evaluation.shapes.rate_stderr``)."""


def drift_ratios(scores: dict, pairs: dict[str, str]) -> None:
    """Add each ``ratio: measure`` pair as personalized / base to every model's scores (the base's
    own ratio is 1 by definition); without a base model there is nothing to divide by.

    Where both models carry the measure's standard error, the ratio gets one too (first-order, the
    two models' errors taken as independent: an upper bound, since both are sampled on the same seeds)."""
    if "base" not in scores:
        return
    for ratio, measure in pairs.items():
        base = scores["base"][measure]
        tuned = scores["personalized"][measure]
        scores["personalized"][ratio] = tuned / base if base > 0 else float(tuned == base)
        scores["base"][ratio] = 1.0
        errors = scores["personalized"].get(measure + STDERR), scores["base"].get(measure + STDERR)
        if None not in errors and base > 0:
            ratio_value = scores["personalized"][ratio]
            scores["personalized"][ratio + STDERR] = math.hypot(errors[0], ratio_value * errors[1]) / base


LOWER_GUIDANCE_FACTOR = 0.5
"""The bare prompt is scored again at this fraction of the eval's guidance (1, no guidance, for the shapes recipe's
sampling guidance of 2; 2 for its priors' 4). A strong
guidance can push a learned two-colour pattern's colours apart: the seed-2031 green triangle with purple stripes, a
MISS at guidance 4 (subject fidelity 0.40, VAE ceiling 0.84) after 1800 steps and after twice the learning rate, is
drawn there with its green stripes near black and its purple ones near white, and as in its photos at 2 (14 of 16
images show it, against 2 at 4; benchmarks/RESULTS.md, round 24)."""


def lower_guidance(guidance_scale: float) -> float | None:
    """The guidance the bare prompt is scored again at, for an eval at ``guidance_scale``: ``LOWER_GUIDANCE_FACTOR``
    of it, but not below 1 (where classifier-free guidance is off); None where there is none lower (at 1 or below)."""
    lower = max(1.0, guidance_scale * LOWER_GUIDANCE_FACTOR)
    return lower if lower < guidance_scale else None


SHAPES_DRIFT = {"class_fidelity": "class_accuracy", "other_prompt_fidelity": "other_prompt_accuracy",
                "clean_class_fidelity": "clean_class_accuracy"}
"""Collateral drift as a ratio to the base model (1.0: nothing else broke)."""
DREAMBENCH_DRIFT = {"other_prompt_fidelity": "other_class_clip_t"}


def _shapes_suite(options: EvalOptions, run: RunInfo, pipes: dict, lower: float | None) -> dict:
    from dreambooth.evaluation.shapes import (evaluate_drift, evaluate_subject, subject_at_lower_guidance, vae_carry,
                                              vae_ceiling)

    subject, refs = shapes_subject(options, run), _references(run)
    sampler = dict(images_per_prompt=options.images_per_prompt, seed=options.seed,
                   steps=options.num_inference_steps, guidance_scale=options.guidance_scale)
    # The VAE is not fine-tuned: one ceiling (and one per asked background) for both models.
    vae = pipes["personalized"].vae
    resolution = pipes["personalized"].unet.config.sample_size * pipes["personalized"].vae_scale_factor
    carry = vae_carry(vae, subject, resolution)
    identifiers = {name: run.identifier if name == "personalized" else "" for name in pipes}
    scores = {name: evaluate_subject(pipe, subject, refs, identifiers[name], carry=carry, **sampler).as_dict()
              | evaluate_drift(pipe, run.class_noun, **sampler).as_dict()
              | (subject_at_lower_guidance(pipe, subject, refs, identifiers[name], **(sampler | {"guidance_scale": lower}))
                 if lower is not None else {})
              for name, pipe in pipes.items()}
    drift_ratios(scores, SHAPES_DRIFT)
    ceiling = vae_ceiling(vae, refs, resolution)
    for measures in scores.values():
        measures["vae_ceiling"] = ceiling
    return {"scores": scores, "vae_carry": carry}


def _dreambench_suite(options: EvalOptions, run: RunInfo, pipes: dict, lower: float | None) -> dict:
    from dreambooth.evaluation.dreambench import dreambench_prompts, other_class_prompts
    from dreambooth.evaluation.embedding import EmbeddingScorer, strip_identifier
    from dreambooth.evaluation.shapes import bare_prompt, generate

    scorer = EmbeddingScorer(options.dino_model, options.clip_model)
    refs = _references(run)
    seeds = [options.seed + j for j in range(options.images_per_prompt)]
    results = {}
    for name, pipe in pipes.items():
        identifier = run.identifier if name == "personalized" else ""
        prompts = [strip_identifier(p, run.identifier) if not identifier else p
                   for p in dreambench_prompts(run.identifier, run.class_noun)]
        repeated = [p for p in prompts for _ in seeds]
        sampler = dict(steps=options.num_inference_steps, guidance_scale=options.guidance_scale)
        images = generate(pipe, repeated, seeds * len(prompts), **sampler)
        scores = scorer.score(images, refs, repeated, identifier=run.identifier).as_dict()
        class_images = generate(pipe, [f"a {run.class_noun}"] * len(seeds), seeds, **sampler)
        scores["pres_dino"] = scorer.dino(class_images, refs)
        others = [p for p in other_class_prompts(run.class_noun) for _ in seeds]
        scores["other_class_clip_t"] = scorer.clip_t(generate(pipe, others, seeds * (len(others) // len(seeds)),
                                                              **sampler), others)
        if lower is not None:  # the bare prompt at both guidances: a subject the guidance distorts (verdict)
            bare = [bare_prompt(identifier, run.class_noun)] * len(seeds)
            scores["dino_bare"] = scorer.dino(generate(pipe, bare, seeds, **sampler), refs)
            scores["dino_bare_at_lower_guidance"] = scorer.dino(
                generate(pipe, bare, seeds, **(sampler | {"guidance_scale": lower})), refs)
        results[name] = scores
    drift_ratios(results, DREAMBENCH_DRIFT)
    return {"scores": results}


def _tracked_with(output: str) -> str:
    """The run's --report-to, when its tracker still works here (else a warning: eval goes on untracked)."""
    report_to = read_run_record(output).get("config", {}).get("export", {}).get("report_to", "none")
    if report_to == "none":
        return report_to
    try:
        tracking.check_report_to(report_to)
    except ConfigError as exc:
        log.warning("the run was tracked with --report-to %s, but: %s; the eval is not added there", report_to, exc)
        return "none"
    return report_to


def evaluate(options: EvalOptions) -> dict:
    """Score the run (and its base model), write the report, return it."""
    from dreambooth.sample import load_any_pipeline, sampler_settings

    options.check()
    run = read_run(options.output)
    sampler = sampler_settings(run.output, num_inference_steps=options.num_inference_steps,
                               guidance_scale=options.guidance_scale)
    options = dataclasses.replace(options, num_inference_steps=sampler.num_inference_steps,
                                  guidance_scale=sampler.guidance_scale)
    suite = resolve_suite(options, run)
    lower = lower_guidance(options.guidance_scale)
    report_to = _tracked_with(run.output)
    if suite == "shapes":
        shapes_subject(options, run)  # fail on a wrong subject before loading any model
    pipes = {"personalized": load_any_pipeline(run.output)}
    if options.compare_base:
        pipes["base"] = load_any_pipeline(run.model, run.revision)
    scored = (_shapes_suite if suite == "shapes" else _dreambench_suite)(options, run, pipes, lower)
    scores = scored["scores"]
    report = {"output": run.output, "suite": suite, "identifier": run.identifier,
              "class_noun": run.class_noun, "model": run.model,
              "settings": {k: v for k, v in vars(options).items() if k not in ("output", "report")}
              | {"lower_guidance_scale": lower},
              "settings_sources": {k: v for k, v in sampler.sources.items() if k != "resolution"},
              "scores": scores}
    if scored.get("vae_carry") is not None:
        report["vae_carry"] = scored["vae_carry"]
    report["verdict"] = [finding.as_dict() for finding in verdict.findings(report)]
    storage.write_bytes_atomic(options.report or storage.join(run.output, EVAL_RECORD),
                               json.dumps(report, indent=2).encode())
    if report_to != "none":
        tracking.log_eval(run.output, report_to, {k: v for k, v in scores["personalized"].items()
                                                  if isinstance(v, (int, float))})
    return report


def format_table(report: dict) -> str:
    """Scores as a text table: one row per measure, one column per model; a measure with a standard
    error reads "value ± error"."""
    models = list(report["scores"])
    measures = [m for m in report["scores"][models[0]] if not m.endswith(STDERR)]

    def cell(scores: dict, measure: str) -> str:
        error = scores.get(measure + STDERR)
        return f"{scores[measure]:.3f}" + ("" if error is None else f" ± {error:.3f}")

    width = max([26, *(len(m) + 2 for m in measures)])
    lines = [f"{'measure':<{width}}" + "".join(f"{m:>18}" for m in models)]
    for measure in measures:
        lines.append(f"{measure:<{width}}" + "".join(f"{cell(report['scores'][m], measure):>18}" for m in models))
    if any(key.endswith(STDERR) for scores in report["scores"].values() for key in scores):
        per_prompt = report.get("settings", {}).get("images_per_prompt")
        lines.append(f"± one standard error over the sampling seeds ({per_prompt} images per prompt); "
                     "4x --images-per-prompt halves it")
    if report.get("vae_carry"):
        from dreambooth.evaluation.shapes import VAE_CARRIED, format_carry

        lines.append(f"vae_carry, the share of the subject's renders the VAE alone keeps on each asked background "
                     f"(carried: {VAE_CARRIED:g} or more): {format_carry(report['vae_carry'])}")
    return "\n".join(lines)
