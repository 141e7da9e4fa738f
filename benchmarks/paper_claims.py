"""The DreamBooth paper's claims, reproduced on the ``shapes`` base model.

    python benchmarks/paper_claims.py             # 2 subjects x 2 seeds, 5 conditions, the shapes recipe (~30 min, 2 cores)
    python benchmarks/paper_claims.py --quick     # CI: 1 subject, 1 seed, a few steps (proves it runs)

For each shapes-world subject and seed, the base model is fine-tuned from scratch under each
condition, then scored by ``dreambooth.evaluation.shapes.evaluate_subject`` on the same sampling
seeds (the base model is scored on class prompts, identifier left out):

    base           no fine-tuning
    dreambooth     rare-token identifier (``dreambooth.identifier``), prior preservation λ = 1
    no_prior       rare-token identifier, λ = 0
    common_word    a word the base model already reads (a palette colour the subject lacks), λ = 1
    random_string  "xxy5syt00" (the paper's example: several tokens of letters and digits), λ = 1

Claims checked: (a) subject fidelity of dreambooth far above base; (b) prompt fidelity of
dreambooth close to base's; (c) with prior preservation, PRES lower and DIV higher than without, at
similar fidelity; (d) the rare token beats a common word and a random string on fidelity; (e) class
and other-prompt fidelity (collateral drift, ratios to the base) stay within 0.1 of the base.
Fine-tunes run in one process (``dreambooth.training.inprocess``: the cluster loop's batches and
loss without Ray/DeepSpeed), because the question is the method, not the distribution layer.
Writes a markdown table (stdout and ``RESULTS.md``) and ``benchmarks/paper_claims.png``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append_results, environment  # noqa: E402
from dreambooth.evaluation.runner import SHAPES_DRIFT, drift_ratios  # noqa: E402
from dreambooth.evaluation.shapes import evaluate_drift, evaluate_subject  # noqa: E402
from dreambooth.identifier import pick_identifiers  # noqa: E402
from dreambooth.config import fill_prior_prompt  # noqa: E402
from dreambooth.priors import prompt_at  # noqa: E402
from dreambooth.models import load_components, load_pipeline, quiet_libraries, read_recipe, resolve_model  # noqa: E402
from dreambooth.shapes import COLORS, SUBJECTS  # noqa: E402
from dreambooth.subjects import load_subject_images, training_examples  # noqa: E402
from dreambooth.training.inprocess import FinetuneSettings, finetune  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIGURE = Path(__file__).resolve().parent / "paper_claims.png"
MEASURES = ("subject_fidelity", "subject_match", "prompt_fidelity", "recontext_shown", "pres", "div",
            "class_fidelity", "other_prompt_fidelity")
RANDOM_STRING = "xxy5syt00"
CONDITIONS = ("base", "dreambooth", "no_prior", "common_word", "random_string")


def identifier_for(condition: str, subject, tokenizer, seed: int) -> str:
    if condition in ("dreambooth", "no_prior"):
        return pick_identifiers(tokenizer, 1, seed)[0]
    if condition == "common_word":
        return next(c for c in reversed(COLORS) if c not in (subject.color, subject.secondary))
    if condition == "random_string":
        return RANDOM_STRING
    return ""


def prior_latents(pipe, prompt: str | list[str], count: int, steps: int, guidance: float) -> torch.Tensor:
    """Class-prior latents as the prior cache holds them (scaled, sampler output), seeds 0..count-1.

    ``prompt``: the class prompt, or one prompt per prior (``count`` of them)."""
    prompts = [prompt] * count if isinstance(prompt, str) else list(prompt)
    generators = [torch.Generator().manual_seed(s) for s in range(count)]
    with torch.no_grad():
        return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance,
                    generator=generators, output_type="latent").images


def run(args) -> dict:
    model_path = resolve_model(args.model)
    base = load_components(model_path)
    sampler_scheduler = load_pipeline(model_path).scheduler
    results: dict[str, list[dict]] = {c: [] for c in CONDITIONS}
    sample = dict(images_per_prompt=args.images_per_prompt, steps=args.sampling_steps, guidance_scale=args.sample_guidance)
    for name in args.subjects:
        subject = SUBJECTS[name]
        folder = REPO / "examples" / "subjects" / name
        images = load_subject_images(str(folder), args.resolution)
        references = [image.to_pil() for image in images]
        base_pipe = base.pipeline(sampler_scheduler)
        extra_prompts = [fill_prior_prompt(p, subject.class_noun) for p in args.extra_prior_prompts]
        prior_prompts = [prompt_at(i, f"a {subject.class_noun}", extra_prompts, args.extra_prior_share,
                                   args.unconditional_prior_share) for i in range(args.num_priors)]
        priors = prior_latents(base_pipe, prior_prompts, args.num_priors, args.sampling_steps, args.guidance)
        for seed in args.seeds:
            for condition in CONDITIONS:
                started = time.time()
                identifier = identifier_for(condition, subject, base.tokenizer, seed)
                parts = base
                if condition != "base":
                    parts = copy.copy(base)
                    parts.unet, parts.text_encoder = copy.deepcopy(base.unet), copy.deepcopy(base.text_encoder)
                    # As `run` trains the photos: each on its caption, and on the bare prompt too where the
                    # recipe says --bare-prompt-with-captions.
                    bare_prompt = f"a {identifier} {subject.class_noun}"
                    examples, prompts = training_examples(images, bare_prompt, identifier, subject.class_noun,
                                                          bare_prompt_with_captions=args.bare_prompt_with_captions)
                    finetune(parts, examples, FinetuneSettings(
                        instance_prompt=prompts,
                        class_prompt=f"a {subject.class_noun}",
                        max_train_steps=args.steps, learning_rate=args.learning_rate,
                        text_encoder_learning_rate=args.text_encoder_learning_rate,
                        prior_loss_weight=0.0 if condition == "no_prior" else 1.0,
                        background_swap=args.background_swap, bare_prompt=bare_prompt,
                        resolution=args.resolution, seed=seed,
                    ), priors, prior_prompts)
                pipe = parts.pipeline(sampler_scheduler)
                report = evaluate_subject(pipe, subject, references, identifier, seed=1000 * seed, **sample).as_dict()
                report |= evaluate_drift(pipe, subject.class_noun, seed=1000 * seed, **sample).as_dict()
                scores = {"base": results["base"][-1] if condition != "base" else dict(report), "personalized": report}
                drift_ratios(scores, SHAPES_DRIFT)  # as `dreambooth eval` reports them
                results[condition].append(report)
                print(f"{name} seed {seed} {condition:<14} identifier {identifier!r:<12} "
                      + " ".join(f"{k} {v:.3f}" for k, v in report.items()) + f" ({time.time() - started:.0f} s)",
                      flush=True)
    return results


def summarize(results: dict) -> dict:
    return {c: {m: (float(np.mean([r[m] for r in rows])), float(np.std([r[m] for r in rows])))
                for m in MEASURES} for c, rows in results.items() if rows}


def claims(s: dict) -> list[tuple[str, bool, str]]:
    """(claim, reproduced?, the numbers behind it)."""
    def mean(c, m):
        return s[c][m][0]

    db, base, np_ = "dreambooth", "base", "no_prior"
    return [
        ("(a) personalization: subject fidelity far above the base model",
         mean(db, "subject_match") >= mean(base, "subject_match") + 0.3
         and mean(db, "subject_fidelity") > mean(base, "subject_fidelity"),
         f"subject match {mean(base, 'subject_match'):.2f} → {mean(db, 'subject_match'):.2f}, "
         f"fidelity {mean(base, 'subject_fidelity'):.3f} → {mean(db, 'subject_fidelity'):.3f}"),
        ("(b) recontextualization: prompt fidelity close to the base model's (within 0.15)",
         mean(db, "prompt_fidelity") >= mean(base, "prompt_fidelity") - 0.15,
         f"prompt fidelity base {mean(base, 'prompt_fidelity'):.2f}, dreambooth {mean(db, 'prompt_fidelity'):.2f}"),
        ("(c) prior preservation: PRES lower and DIV higher than without, fidelity within 0.1",
         mean(db, "pres") < mean(np_, "pres") and mean(db, "div") > mean(np_, "div")
         and abs(mean(db, "subject_fidelity") - mean(np_, "subject_fidelity")) <= 0.1,
         f"PRES {mean(np_, 'pres'):.2f} → {mean(db, 'pres'):.2f}, DIV {mean(np_, 'div'):.3f} → "
         f"{mean(db, 'div'):.3f}, fidelity {mean(np_, 'subject_fidelity'):.3f} vs {mean(db, 'subject_fidelity'):.3f}"),
        ("(d) identifier: the rare token beats a common word and a random string on subject match",
         mean(db, "subject_match") >= max(mean("common_word", "subject_match"), mean("random_string", "subject_match")),
         f"subject match rare {mean(db, 'subject_match'):.2f}, common word {mean('common_word', 'subject_match'):.2f}, "
         f"random string {mean('random_string', 'subject_match'):.2f}"),
        ("(e) little collateral drift: class and other-prompt fidelity of dreambooth within 0.1 of the base",
         mean(db, "class_fidelity") >= 0.9 and mean(db, "other_prompt_fidelity") >= 0.9,
         f"class fidelity {mean(db, 'class_fidelity'):.2f}, other-prompt fidelity {mean(db, 'other_prompt_fidelity'):.2f} "
         f"(no prior: {mean(np_, 'class_fidelity'):.2f}, {mean(np_, 'other_prompt_fidelity'):.2f})"),
    ]


def table(s: dict, runs: int) -> str:
    head = "| condition | " + " | ".join(MEASURES) + " |"
    rows = [head, "|" + "---|" * (len(MEASURES) + 1)]
    for c, measures in s.items():
        rows.append(f"| {c} | " + " | ".join(f"{mu:.3f} ± {sd:.3f}" for mu, sd in measures.values()) + " |")
    verdicts = "\n".join(f"- {'reproduced' if ok else 'NOT reproduced'}: {text} ({numbers})"
                         for text, ok, numbers in claims(s))
    return "\n".join(rows) + f"\n\nMean ± sd over {runs} (subject, seed) runs per condition.\n\n" + verdicts


def figure(s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MEASURES), figsize=(3 * len(MEASURES), 3.2))
    for ax, measure in zip(axes, MEASURES):
        means = [s[c][measure][0] for c in s]
        sds = [s[c][measure][1] for c in s]
        ax.bar(range(len(s)), means, yerr=sds, color=[f"C{i}" for i in range(len(s))], capsize=3)
        ax.set_xticks(range(len(s)), list(s), rotation=45, ha="right", fontsize=8)
        ax.set_title(measure + (" (lower better)" if measure == "pres" else ""), fontsize=9)
    fig.suptitle("DreamBooth on the shapes model: conditions vs measures (mean ± sd)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--subjects", nargs="+", default=["two_tone_triangle", "striped_circle"], choices=list(SUBJECTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    # Unset: the model's recipe (dreambooth.yaml), what `dreambooth run --model shapes` trains with.
    parser.add_argument("--steps", type=int, help="fine-tuning steps per run (default: the recipe's)")
    parser.add_argument("--learning-rate", type=float, help="default: the recipe's")
    parser.add_argument("--text-encoder-learning-rate", type=float, help="default: the recipe's")
    parser.add_argument("--num-priors", type=int, help="class-prior images per subject (default: the recipe's)")
    parser.add_argument("--images-per-prompt", type=int, default=8)
    parser.add_argument("--sampling-steps", type=int, help="default: the recipe's")
    parser.add_argument("--guidance", type=float, help="of the priors (default: the recipe's)")
    parser.add_argument("--sample-guidance", type=float,
                        help="of the evaluation images (default: the recipe's sample guidance, else --guidance)")
    parser.add_argument("--resolution", type=int, help="default: the recipe's")
    parser.add_argument("--quick", action="store_true", help="CI: 1 subject, 1 seed, 4 steps, 2 images per prompt")
    parser.add_argument("--figure", help=f"PNG to write (default: {FIGURE.relative_to(REPO)}; with --quick or "
                                         "--no-write, none unless given)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md and the figure alone")
    args = parser.parse_args()
    if args.figure is None and not (args.quick or args.no_write):
        args.figure = str(FIGURE)  # a CI or trial run never overwrites the committed figure
    recipe = read_recipe(resolve_model(args.model))
    for arg, key in (("steps", "max_train_steps"), ("learning_rate", "learning_rate"), ("sampling_steps", "num_inference_steps"),
                     ("text_encoder_learning_rate", "text_encoder_learning_rate"), ("guidance", "guidance_scale"),
                     ("num_priors", "num_class_images"), ("resolution", "resolution")):
        if getattr(args, arg) is None:
            setattr(args, arg, recipe.get(key))
    if args.sample_guidance is None:
        args.sample_guidance = recipe.get("sample_guidance_scale")
        if args.sample_guidance is None:
            args.sample_guidance = args.guidance
    args.extra_prior_prompts = recipe.get("extra_prior_prompts", [])  # priors of other captions, as the recipe makes them
    args.extra_prior_share = recipe.get("extra_prior_share", 0.0)
    args.unconditional_prior_share = recipe.get("unconditional_prior_share", 0.0)
    args.bare_prompt_with_captions = recipe.get("bare_prompt_with_captions", False)
    args.background_swap = recipe.get("background_swap", 0.0)
    print("recipe: " + ", ".join(f"{k} {v}" for k, v in vars(args).items() if k in (
        "steps", "learning_rate", "text_encoder_learning_rate", "num_priors", "guidance", "sample_guidance",
        "sampling_steps", "resolution",
        "extra_prior_share", "unconditional_prior_share", "bare_prompt_with_captions", "background_swap"))
          + f", {len(args.extra_prior_prompts)} extra prior prompts")
    if args.quick:
        args.subjects, args.seeds, args.steps, args.num_priors, args.images_per_prompt = \
            args.subjects[:1], args.seeds[:1], 4, 4, 2
        args.sampling_steps = 5
    torch.set_num_threads(2)
    quiet_libraries()
    started = time.time()
    results = run(args)
    summary = summarize(results)
    runs = len(args.subjects) * len(args.seeds)
    text = table(summary, runs)
    print(f"\n{text}\n\n{time.time() - started:.0f} s in all")
    if args.figure:
        figure(summary, Path(args.figure))
        print(f"figure: {args.figure}")
    if not args.no_write:
        append_results("Paper claims on the shapes model (paper_claims.py)", text, environment(), " ".join(sys.argv))


if __name__ == "__main__":
    main()
