"""Which fine-tuning recipe personalizes a shapes subject without breaking the rest of the model?

    python benchmarks/recipe_search.py                     # every lever, on the 2 tuning subjects (~40 min)
    python benchmarks/recipe_search.py --variants chosen --subjects held-out scripted
                                                           # the chosen recipe, unchanged, elsewhere
    python benchmarks/recipe_search.py --variants chosen --photo-backgrounds 2
                                                           # photos on 2 backgrounds: most background asks new
    python benchmarks/recipe_search.py --quick             # CI: proves it runs

Each variant (``recipe_levers.VARIANTS``) is the starting recipe (``start``: the demo's settings before issue #13)
with one or more levers moved: the learning rate and steps, a lower learning rate or a step limit for the text
encoder, λ, the number of class priors and the guidance they were generated with. Every fine-tune
starts from the base ``shapes`` model and runs in one process (``training.inprocess``: the cluster
loop's batches and loss), then is scored on fixed seeds by ``dreambooth.evaluation.shapes``:

    subject_fidelity         "a [V] [class]" images vs the subject photos (1.0: the photos)
    subject_match            share of those images the analyzers call the subject
    recontext_shown          share of "a [V] [class] on a green background" / "... in the top left"
                             images that show the subject (should be >= subject_match)
    class_fidelity           "a [class]" still drawn as the class, as a ratio to the base model
    clean_class_fidelity     "a [class]" drawn as the class with a clean outline, ratio to base
    other_prompt_fidelity    captions of the other shapes, colours and backgrounds, ratio to base

A recipe passes when class, clean class and other-prompt fidelity stay within 0.1 of the base
(>= 0.9), subject fidelity >= 0.7 and recontext_shown >= subject_match. The ``vae ceiling`` row is the
subject fidelity of the photos passed through the VAE alone: what no UNet or text-encoder
fine-tune can exceed. Subjects: ``tuning`` (two_tone_triangle, striped_circle) choose the recipe;
``held-out`` (checker_square, dotted_star) and ``scripted`` (new subjects from
``dreambooth.shapes.new_subjects``) check it unchanged.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append_results, environment  # noqa: E402
from benchmarks.paper_claims import prior_latents  # noqa: E402
from benchmarks.recipe_levers import CHOSEN, VARIANTS, Recipe  # noqa: E402
from dreambooth.evaluation.runner import SHAPES_DRIFT, drift_ratios  # noqa: E402
from dreambooth.evaluation.shapes import (class_caption_templates, evaluate_drift, evaluate_subject,  # noqa: E402
                                         extra_prior_captions, rate_stderr, vae_carry, vae_ceiling)
from dreambooth.config import fill_prior_prompt  # noqa: E402
from dreambooth.identifier import pick_identifiers  # noqa: E402
from dreambooth.priors import prompt_at  # noqa: E402
from dreambooth.models import load_components, load_pipeline, quiet_libraries, resolve_model  # noqa: E402
from dreambooth.shapes import SIZES, SUBJECTS, new_subjects, write_subject_images  # noqa: E402
from dreambooth.subjects import instance_prompts, load_subject_images, training_examples  # noqa: E402
from dreambooth.training.inprocess import FinetuneSettings, finetune  # noqa: E402

SUBJECT_SETS = {
    "tuning": ("two_tone_triangle", "striped_circle"),
    "held-out": ("checker_square", "dotted_star"),
}
SCRIPTED_SEED = 2026


EVAL_GUIDANCE = 4.0
"""Classifier-free guidance of the evaluation images unless ``--guidance`` says otherwise: the priors' guidance,
which every lever round scored at. The shipped recipe samples at 2 (its ``export.sample_guidance_scale``, from
round 24); ``--guidance 4 2`` scores a fine-tune at both, and rows at 2 are labelled so."""

MEASURES = ("subject_fidelity", "subject_match", "recontext_shown", "class_fidelity", "clean_class_fidelity",
            "other_prompt_fidelity")


def passes(row: dict) -> bool:
    clean = row.get("clean_class_fidelity", row["class_fidelity"])  # rows of rounds 1-5 predate the clean measure
    return (row["class_fidelity"] >= 0.9 and clean >= 0.9 and row["other_prompt_fidelity"] >= 0.9
            and row["subject_fidelity"] >= 0.7 and row["recontext_shown"] >= row["subject_match"])


class Study:
    """The base model, its scores and its class priors, computed once and shared by every variant."""

    def __init__(self, args) -> None:
        self.args = args
        self.base = load_components(resolve_model(args.model))
        self.sampler_scheduler = load_pipeline(resolve_model(args.model)).scheduler
        self._priors: dict[tuple, torch.Tensor] = {}
        self._drift: dict[tuple[str, float], dict] = {}
        self._carry: dict[str, dict[str, float]] = {}

    def sample(self, guidance: float) -> dict:
        return dict(images_per_prompt=self.args.images_per_prompt, steps=self.args.sampling_steps,
                    guidance_scale=guidance, seed=self.args.eval_seed)

    def pipe(self, parts):
        return parts.pipeline(self.sampler_scheduler)

    def priors(self, class_noun: str, recipe: Recipe) -> tuple[torch.Tensor, list[str]]:
        """Prior latents (``paper_claims.prior_latents``) and their prompts, once per recipe's prior levers."""
        key = (class_noun, recipe.num_priors, recipe.prior_guidance, recipe.caption_priors, recipe.in_class_captions,
               recipe.unconditional_priors)
        if key not in self._priors:
            count = recipe.num_priors + recipe.caption_priors + recipe.unconditional_priors
            others = recipe.caption_priors - recipe.in_class_captions
            captions = [fill_prior_prompt(t, class_noun) for t in class_caption_templates(recipe.in_class_captions)]
            captions += extra_prior_captions(others)
            # As --extra-prior-share and --unconditional-prior-share lay them out (rounds 8-10 spread the
            # empty prompts through the captions' cycle instead: the same counts, other seeds).
            prompts = [prompt_at(i, f"a {class_noun}", captions, recipe.caption_priors / count,
                                 recipe.unconditional_priors / count) for i in range(count)]
            self._priors[key] = (prior_latents(self.pipe(self.base), prompts, count,
                                               self.args.sampling_steps, recipe.prior_guidance), prompts)
        return self._priors[key]

    def base_drift(self, class_noun: str, guidance: float) -> dict:
        if (class_noun, guidance) not in self._drift:
            self._drift[class_noun, guidance] = evaluate_drift(self.pipe(self.base), class_noun,
                                                               **self.sample(guidance)).as_dict()
        return self._drift[class_noun, guidance]

    def carry(self, subject) -> dict[str, float]:
        """``vae_carry`` of the subject (the VAE is frozen: once per subject)."""
        if subject.name not in self._carry:
            self._carry[subject.name] = vae_carry(self.base.vae, subject, self.args.resolution)
        return self._carry[subject.name]

    def score(self, parts, subject, references, identifier: str, guidance: float) -> dict:
        """The measures of one fine-tune, sampled at ``guidance`` (the base's drift ratios at the same)."""
        pipe, sample = self.pipe(parts), self.sample(guidance)
        report = evaluate_subject(pipe, subject, references, identifier, carry=self.carry(subject), **sample).as_dict()
        scores = {"base": self.base_drift(subject.class_noun, guidance),
                  "personalized": report | evaluate_drift(pipe, subject.class_noun, **sample).as_dict()}
        drift_ratios(scores, SHAPES_DRIFT)
        return scores["personalized"]

    def run(self, subject, folder: Path, recipe: Recipe, seed: int) -> dict[float, dict]:
        """Fine-tune once; the measures at each ``--guidance``."""
        images = load_subject_images(str(folder), self.args.resolution)
        references = [image.to_pil() for image in images]
        identifier = pick_identifiers(self.base.tokenizer, 1, seed)[0]
        instance_prompt = bare_prompt = f"a {identifier} {subject.class_noun}"
        if not recipe.captions_name_size:  # subjects_of writes a caption beside every photo
            images = [dataclasses.replace(image, caption=without_size(image.caption)) for image in images]
        if recipe.captioned:
            instance_prompt = instance_prompts(images, instance_prompt, identifier, subject.class_noun)
        elif recipe.captioned_and_bare:  # every photo here has a caption: each twice, as --bare-prompt-with-captions
            images, instance_prompt = training_examples(images, instance_prompt, identifier, subject.class_noun,
                                                        bare_prompt_with_captions=True)
        parts = copy.copy(self.base)
        parts.unet, parts.text_encoder = copy.deepcopy(self.base.unet), copy.deepcopy(self.base.text_encoder)
        priors, prior_prompts = self.priors(subject.class_noun, recipe)
        settings = FinetuneSettings(
            instance_prompt=instance_prompt, class_prompt=f"a {subject.class_noun}",
            max_train_steps=self.args.steps_override or recipe.steps, learning_rate=recipe.learning_rate,
            text_encoder_learning_rate=recipe.text_encoder_learning_rate,
            text_encoder_steps=recipe.text_encoder_steps, prior_loss_weight=recipe.prior_loss_weight,
            lr_scheduler=recipe.lr_scheduler,
            prior_examples_per_subject_example=recipe.prior_examples_per_subject_example,
            snr_gamma=recipe.snr_gamma, background_swap=recipe.background_swap, bare_prompt=bare_prompt,
            resolution=self.args.resolution, seed=seed)
        if recipe.identifier_warmup_steps:
            warmup = min(recipe.identifier_warmup_steps, self.args.steps_override or recipe.identifier_warmup_steps)
            warm_identifier(parts, images, identifier, settings, warmup, recipe.identifier_warmup_learning_rate)
        finetune(parts, images, settings, priors, prior_prompts)
        return {g: self.score(parts, subject, references, identifier, g) for g in self.args.guidance}


def warm_identifier(parts, images, identifier: str, settings: FinetuneSettings, steps: int,
                    learning_rate: float) -> None:
    """Textual inversion of ``identifier`` on the photos (``Recipe.identifier_warmup_steps``): the same
    loop as the fine-tune with the UNet's rate at 0, no priors, and every text-encoder gradient but the
    identifier's embedding rows zeroed (AdamW without weight decay leaves a parameter whose gradients are all
    zero where it is). The UNet's backward pass still runs, for nothing: the fine-tune's own loop, reused."""
    embedding = parts.text_encoder.get_input_embeddings().weight
    rows = torch.zeros_like(embedding)
    rows[parts.tokenizer(identifier, add_special_tokens=False).input_ids] = 1.0
    parts.text_encoder.requires_grad_(True)  # a hook needs a tensor that requires grad
    hooks = [p.register_hook((lambda grad: grad * rows) if p is embedding else torch.zeros_like)
             for p in parts.text_encoder.parameters()]
    try:
        finetune(parts, images, dataclasses.replace(settings, learning_rate=0.0, text_encoder_learning_rate=learning_rate,
                                                    max_train_steps=steps, prior_loss_weight=0.0,
                                                    text_encoder_steps=None, adam_weight_decay=0.0))
    finally:
        for hook in hooks:
            hook.remove()


def without_size(caption: str) -> str:
    """A caption with its size word dropped ("a large {identifier} {class_noun} ..." -> "a {identifier}
    {class_noun} ...": ``shapes.subject_caption`` without a size)."""
    return " ".join(word for word in caption.split() if word not in SIZES)


def subjects_of(sets: list[str], scripted: int, root: Path, scripted_seed: int = SCRIPTED_SEED,
                photo_backgrounds: int | None = None):
    """(subject, photo folder) pairs, written under ``root`` with captions beside the photos naming size, place
    and background (read only by ``captioned`` recipes, which drop the size unless ``captions_name_size``); the
    shipped subjects' photos are the committed ones (seed 0) unless ``photo_backgrounds`` redraws them on that
    many of their backgrounds (``write_subject_images``)."""
    chosen = []
    shared = dict(captions=True, caption_size=True, photo_backgrounds=photo_backgrounds)
    scripted_names = {subject.name: subject for subject in new_subjects(scripted, scripted_seed)}
    for name in sets:
        if name == "scripted":
            for subject in new_subjects(scripted, scripted_seed):
                folder = root / subject.name
                write_subject_images(subject, folder, seed=scripted_seed, sizes=("small", "medium", "large"), **shared)
                chosen.append((subject, folder))
        elif name in scripted_names:  # one scripted subject, by its name
            subject = scripted_names[name]
            write_subject_images(subject, root / name, seed=scripted_seed, sizes=("small", "medium", "large"), **shared)
            chosen.append((subject, root / name))
        else:
            for shipped in SUBJECT_SETS.get(name, (name,)):
                write_subject_images(SUBJECTS[shipped], root / shipped, seed=0, **shared)
                chosen.append((SUBJECTS[shipped], root / shipped))
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--subjects", nargs="+", default=["tuning"],
                        help="sets (tuning, held-out, scripted) or subject names (shipped or scripted)")
    parser.add_argument("--scripted", type=int, default=4, help="new subjects in the scripted set")
    parser.add_argument("--scripted-seed", type=int, default=SCRIPTED_SEED,
                        help="seed of the scripted subjects (another seed: subjects no recipe was compared on)")
    parser.add_argument("--photo-backgrounds", type=int,
                        help="photograph every subject on only this many of its backgrounds (the eval's other "
                             "background asks are then contexts no photo shows)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=[*VARIANTS, "chosen"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--sampling-steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, nargs="+", default=[EVAL_GUIDANCE],
                        help="guidance of the evaluation images (several: each fine-tune is scored at each)")
    parser.add_argument("--eval-seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps-override", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="CI: 1 subject, 2 variants, 4 steps, 2 images")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 per process when running several)")
    parser.add_argument("--json", help="also write the rows to this JSON file (updated after each run)")
    parser.add_argument("--report", nargs="+", help="only print (and append) the table of these --json files")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    variants = [CHOSEN if v == "chosen" else v for v in args.variants]
    if args.quick:
        args.subjects, variants, args.steps_override = ["two_tone_triangle"], ["start", CHOSEN], 4
        args.images_per_prompt, args.sampling_steps = 2, 4
    torch.set_num_threads(args.threads)
    quiet_libraries()
    if args.report:
        rows = [row for path in args.report for row in json.loads(Path(path).read_text())]
        text = table(rows)
        print(text)
        if not args.no_write:
            append_results("Recipe levers on the shapes model (recipe_search.py)", text, environment(),
                           "benchmarks/recipe_search.py " + " ".join(sys.argv[1:]))
        return
    started = time.time()
    study = Study(args)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        subjects = subjects_of(args.subjects, args.scripted, Path(scratch), args.scripted_seed,
                               args.photo_backgrounds)
        ceilings = {}
        for subject, folder in subjects:
            images = load_subject_images(str(folder), args.resolution)
            ceilings[subject.name] = vae_ceiling(study.base.vae, [image.to_pil() for image in images], args.resolution)
            print(f"{subject.name} ({subject.class_noun}, {subject.color}/{subject.secondary} {subject.pattern}): "
                  f"vae ceiling {ceilings[subject.name]:.3f}", flush=True)
        for variant in variants:  # variant-major: a cut-short study still compares every subject
            for subject, folder in subjects:
                for seed in args.seeds:
                    t0 = time.time()
                    for guidance, scores in study.run(subject, folder, VARIANTS[variant], seed).items():
                        label = variant + guidance_label(guidance) + photos_label(args.photo_backgrounds)
                        row = {"variant": label, "subject": subject.name, "seed": seed,
                               "photo_backgrounds": args.photo_backgrounds,
                               "vae_ceiling": ceilings[subject.name], **scores, "seconds": time.time() - t0}
                        rows.append(row)
                        print(f"{row['variant']:<20} {subject.name:<28} "
                              + " ".join(f"{m} {row[m]:.2f}" for m in MEASURES)
                              + f"  {'PASS' if passes(row) else 'fail'} ({row['seconds']:.0f} s)", flush=True)
                    if args.json:
                        Path(args.json).write_text(json.dumps(rows, indent=1))
    text = table(rows)
    print(f"\n{text}\n\n{time.time() - started:.0f} s in all")
    if not args.no_write and not args.quick:
        append_results("Recipe levers on the shapes model (recipe_search.py)", text, environment(),
                       "benchmarks/recipe_search.py " + " ".join(sys.argv[1:]))


def guidance_label(guidance: float) -> str:
    """What a row's variant name gains when its images were sampled at another than the usual guidance."""
    return "" if guidance == EVAL_GUIDANCE else f", sampled at guidance {guidance:g}"


def photos_label(photo_backgrounds: int | None) -> str:
    """What a row's variant name gains when its subjects were photographed on fewer backgrounds than usual, so
    ``--report`` never pools those runs with the usual ones."""
    return "" if photo_backgrounds is None else f", photos on {photo_backgrounds} backgrounds"


def _cell(rows: list[dict], measure: str, spread: bool = False) -> str:
    """The mean of ``measure`` over rows, or "-" where they predate it; with ``spread``, "± its standard
    error over the rows" (how far another set of runs could move it: one subject's measures move 0.1-0.3
    between seeds)."""
    values = [r[measure] for r in rows if measure in r]
    if not values:
        return "-"
    error = f" ± {rate_stderr(values):.2f}" if spread and len(values) > 1 else ""
    return f"{np.mean(values):.2f}{error}"


def recontext_gap(rows: list[dict], measure: str = "recontext_shown") -> str:
    """Mean ± standard error over runs of ``measure`` − subject_match, each run against itself: #13's
    "recontextualized prompts show the subject at least as often as the bare prompt" as one paired
    figure (the two means' own errors overlap too much to tell a 0.02 gap from none). ``measure`` may be
    one of its splits (``recontext_shown_unseen``: contexts no photo shows; ``..._at_subject_sizes``);
    runs that predate it, or have no ask on its side, are left out ("-" if none is left)."""
    gaps = [r[measure] - r["subject_match"] for r in rows if r.get(measure) is not None]
    if not gaps:
        return "-"
    error = f" ± {rate_stderr(gaps):.2f}" if len(gaps) > 1 else ""
    return f"{np.mean(gaps):+.2f}{error}"


PAIRED_GAPS = {"recontext − match, paired": "recontext_shown",
               "asked backgrounds − match": "recontext_shown_backgrounds",
               "backgrounds no photo shows − match": "recontext_shown_unseen_backgrounds",
               "unseen contexts − match": "recontext_shown_unseen",
               "at the bare prompt's sizes − match": "recontext_shown_at_subject_sizes"}
"""The pooled table's paired gaps: every new context, the background asks alone (the shapes model ignores place
words), the backgrounds no photo shows (round 19: with photos on 2 backgrounds, the paper's recontextualization),
every context no photo shows, and counted at the bare prompt's sizes."""


def _label(row: dict) -> str:
    """The variant, and its training seed where that is not the first (0)."""
    return row["variant"] + (f", seed {row['seed']}" if row.get("seed", 0) else "")


def table(rows: list[dict]) -> str:
    """One line per (variant, seed, subject), then the mean of each variant and seed over its subjects, and,
    where a variant ran on several seeds, its mean ± standard error over all of its runs."""
    head = "| variant | subject | " + " | ".join(MEASURES) + " | vae ceiling | passes |"
    lines = [head, "|" + "---|" * (len(MEASURES) + 4)]
    for row in rows:
        lines.append(f"| {_label(row)} | {row['subject']} | " + " | ".join(_cell([row], m) for m in MEASURES)
                     + f" | {row['vae_ceiling']:.2f} | {'yes' if passes(row) else 'no'} |")
    variants = list(dict.fromkeys(_label(r) for r in rows))
    lines += ["", "| variant (mean) | " + " | ".join(MEASURES) + " | passes |", "|" + "---|" * (len(MEASURES) + 2)]
    for variant in variants:
        mine = [r for r in rows if _label(r) == variant]
        lines.append(f"| {variant} | " + " | ".join(_cell(mine, m) for m in MEASURES)
                     + f" | {sum(passes(r) for r in mine)}/{len(mine)} |")
    pooled = {v: [r for r in rows if r["variant"] == v] for v in dict.fromkeys(r["variant"] for r in rows)}
    if any(len({r.get("seed", 0) for r in mine}) > 1 for mine in pooled.values()):
        lines += ["", "| variant (every seed and subject) | runs | " + " | ".join([*MEASURES, *PAIRED_GAPS])
                  + " | passes |", "|" + "---|" * (len(MEASURES) + len(PAIRED_GAPS) + 3)]
        for variant, mine in pooled.items():
            gaps = [recontext_gap(mine, measure) for measure in PAIRED_GAPS.values()]
            lines.append(f"| {variant} | {len(mine)} | " + " | ".join(_cell(mine, m, spread=True) for m in MEASURES)
                         + " | " + " | ".join(gaps) + f" | {sum(passes(r) for r in mine)}/{len(mine)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
