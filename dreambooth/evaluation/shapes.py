"""Shapes-world measures of a pipeline: does it draw what a caption asks?

Owns generating fixed-seed images for a list of prompts and scoring them with the world's analyzers.
The base-model accuracy (``prompt_accuracy``) is what pretraining reports and the shipped model's
test checks; ``dreambooth eval`` builds its subject measures on ``generate``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from dreambooth.shapes import (Subject, analyze, caption, is_subject, matches, pairwise_distance,
                               render_subject, sample_scenes, subject_features, subject_similarity)
from dreambooth.shapes.world import PLACE_PHRASES, SHAPES, article
from dreambooth.shapes.analyzers import CLEAN_SHAPE_FIT, shape_fit

#: Sampler settings every shapes measurement uses unless told otherwise.
INFERENCE_STEPS = 25
GUIDANCE_SCALE = 4.0


def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], *, steps: int = INFERENCE_STEPS,
             guidance_scale: float = GUIDANCE_SCALE, batch_size: int = 64) -> list[Image.Image]:
    """One image per (prompt, seed) pair, in order; image i depends only on prompts[i], seeds[i]."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[chunk]]
        with torch.no_grad():
            images += pipe(list(prompts[chunk]), num_inference_steps=steps, guidance_scale=guidance_scale,
                           generator=generators).images
    return images


def rate_stderr(values: Sequence[float]) -> float:
    """Standard error of a mean of per-image values (``sqrt(p (1 - p) / n)`` for a share of 0/1 hits):
    about how far the same model scored on other seeds could move it. One image of 8 moves a share
    by 0.125, so a run's verdict against a bound 0.1 wide needs it (``dreambooth eval`` reports it)."""
    values = np.asarray(values, dtype=float)
    return float(values.std() / np.sqrt(len(values)))


@dataclass
class PromptAccuracy:
    """Fraction of images whose analyzed field equals the caption's (None: the caption omits it)."""

    background: float
    color: float
    shape: float
    position: float | None
    count: int

    def as_dict(self) -> dict:
        return {k: v for k, v in vars(self).items()}


def score(images: Sequence[Image.Image], asked: Sequence[Mapping[str, str]]) -> PromptAccuracy:
    """Accuracy of each field over images; ``asked[i]`` holds the fields prompt i named."""
    hits: dict[str, list[bool]] = {"background": [], "color": [], "shape": [], "position": []}
    for image, fields in zip(images, asked, strict=True):
        for field, ok in matches(analyze(image), fields).items():
            if field in hits:
                hits[field].append(ok)

    def rate(field: str) -> float | None:
        return sum(hits[field]) / len(hits[field]) if hits[field] else None

    return PromptAccuracy(rate("background"), rate("color"), rate("shape"), rate("position"), len(images))


def evaluation_scenes(triples: Sequence[tuple[str, str, str]] | frozenset, n: int, seed: int = 1234):
    """n scenes drawn from the given (shape, colour, background) triples, fixed by ``seed``."""
    return sample_scenes(n, seed, only=frozenset(triples))


def prompt_accuracy(pipe, scenes, *, seed: int = 0, detail: str = "short", **sampler) -> PromptAccuracy:
    """Generate each scene's caption once (seed ``seed + i``) and score what the analyzers read back.

    ``detail="short"`` asks for shape, colour and background only; ``"full"`` adds size and position.
    """
    prompts = [caption(s, detail) for s in scenes]
    images = generate(pipe, prompts, [seed + i for i in range(len(scenes))], **sampler)
    fields = [{"shape": s.shape, "color": s.color, "background": s.background}
              | ({"position": s.position} if detail == "full" else {}) for s in scenes]
    return score(images, fields)


# -- personalized models --------------------------------------------------------------------------

def recontext_asks(subject: Subject, positions: Sequence[str] = ("top left", "top right", "bottom left",
                                                                   "bottom right")) -> list[tuple[str, str, str]]:
    """Recontextualization asks: (prompt suffix, the field the analyzers check, the value asked)."""
    asks = [(f" on {article(bg)} {bg} background", "background", bg) for bg in subject.backgrounds]
    asks += [(f" {PLACE_PHRASES[p]}", "position", p) for p in positions]
    return asks


@dataclass
class SubjectReport:
    """Shapes-world DreamBooth measures of one model for one subject (all in [0, 1]).

    ``subject_fidelity``: mean ``subject_similarity`` of "a [V] [class]" images to the subject's
    photos (every pair; the analogue of DINO). ``subject_match``: share of those images the
    analyzers call the subject (its two colours, outline and pattern). ``prompt_fidelity``: share of
    recontextualization images ("a [V] [class] on a green background", "... in the top left") with
    the asked background or position; ``recontext_subject_match``: share of them that also show the
    subject; ``recontext_shown``: share of them that show the subject, whatever the background or
    position (a recipe that keeps the subject in new contexts has it >= ``subject_match``).
    ``recontext_shown_at_subject_sizes``: ``recontext_shown`` counted per size the analyzer reads,
    weighted by how often the bare prompt draws each size: a model that only draws the subject
    smaller in new contexts (where the VAE cannot carry a pattern: ``vae_ceiling`` of small renders
    is about half that of large ones) has it >= ``subject_match`` while ``recontext_shown`` is below.
    ``subject_small_share`` / ``recontext_small_share``: share of the bare prompt's / the new
    contexts' images drawn small.
    ``recontext_shown_unseen`` / ``recontext_shown_seen``: ``recontext_shown`` over the asks whose
    background or place none of the subject's photos shows / some photo shows (None when every ask
    is on one side): the unseen share is the paper's question, a subject carried into a context it was
    never photographed in. Like ``recontext_shown`` it counts the subject whether or not the asked
    context was drawn, so read it beside ``prompt_fidelity``.
    ``recontext_shown_backgrounds`` / ``recontext_shown_places``: ``recontext_shown`` over the background
    asks / the place asks. The shipped ``shapes`` model draws every asked background but puts an object in
    the asked corner about as often as chance (0.12 of 256 images, 1/9 by chance; benchmarks/RESULTS.md,
    round 18), so on it place asks sample the bare prompt again and background asks are the ones it follows.
    ``recontext_shown_unseen_backgrounds`` / ``recontext_shown_seen_backgrounds``: ``recontext_shown`` over the
    background asks no photo shows / some photo shows. The unseen one is the closest this world has to the
    paper's "a [V] dog on the beach": a background the model follows that the subject was never photographed on
    (one ask per subject when each photo has a background of its own; most of them when the photos share a few,
    as a real subject's photos share a room; benchmarks/RESULTS.md, round 19).
    ``recontext_shown_carried_backgrounds`` / ``recontext_shown_uncarried_backgrounds``: ``recontext_shown`` over
    the background asks on which the VAE alone carries the subject (``vae_carry`` ≥ ``VAE_CARRIED``) / does not
    (reported when ``evaluate_subject`` is given ``vae_carry``): a miss only on the second is one the model's
    decoder shares.
    ``pres``: share of "a [class]" images that show the subject (lower is better: the
    class prior survived). ``div``: mean pairwise RMS pixel distance between "a [V] [class]" images
    (higher is more varied, the analogue of the paper's LPIPS-based DIV).
    """

    subject_fidelity: float
    subject_match: float
    prompt_fidelity: float
    recontext_subject_match: float
    recontext_shown: float
    pres: float
    div: float
    subject_match_stderr: float = 0.0
    """``rate_stderr`` of ``subject_match`` (and of ``recontext_shown`` below)."""
    recontext_shown_stderr: float = 0.0
    recontext_shown_at_subject_sizes: float = 0.0
    subject_small_share: float = 0.0
    recontext_small_share: float = 0.0
    recontext_shown_unseen: float | None = None
    recontext_shown_unseen_stderr: float | None = None
    recontext_shown_seen: float | None = None
    recontext_shown_seen_stderr: float | None = None
    recontext_shown_backgrounds: float | None = None
    recontext_shown_backgrounds_stderr: float | None = None
    recontext_shown_places: float | None = None
    recontext_shown_places_stderr: float | None = None
    recontext_shown_unseen_backgrounds: float | None = None
    recontext_shown_unseen_backgrounds_stderr: float | None = None
    recontext_shown_seen_backgrounds: float | None = None
    recontext_shown_seen_backgrounds_stderr: float | None = None
    recontext_shown_carried_backgrounds: float | None = None
    recontext_shown_carried_backgrounds_stderr: float | None = None
    recontext_shown_uncarried_backgrounds: float | None = None
    recontext_shown_uncarried_backgrounds_stderr: float | None = None

    def as_dict(self) -> dict:
        """The measures that apply (an unseen/seen share with no ask on its side is left out)."""
        return {k: v for k, v in vars(self).items() if v is not None}


def photographed_contexts(references: Sequence[Image.Image]) -> set[tuple[str, str]]:
    """The (field, value) contexts the subject's photos show, as the analyzers read them:
    ``("background", "green")``, ``("position", "top left")``; read from the pixels, not from any
    caption, so a user's photos need no labels."""
    readings = [analyze(r) for r in references]
    return {("background", a.background) for a in readings} | {("position", a.position) for a in readings}


def _share_where(shown: Sequence[bool], keep: Sequence[bool]) -> tuple[float | None, float | None]:
    """Share of the kept images that show the subject, and its standard error; (None, None) if none is kept."""
    hits = [hit for hit, kept in zip(shown, keep, strict=True) if kept]
    return (float(np.mean(hits)), rate_stderr(hits)) if hits else (None, None)


def shown_at_sizes(shown: Sequence[bool], sizes: Sequence[str], reference_sizes: Sequence[str]) -> float:
    """Share of images that show the subject, per drawn size, averaged with the weights of
    ``reference_sizes`` (the sizes the bare prompt drew); sizes ``shown`` has no image of are left
    out of the weights, and with no size in common it is the plain share."""
    weights = Counter(reference_sizes)
    per_size = {size: [hit for hit, drawn in zip(shown, sizes) if drawn == size] for size in weights}
    covered = {size: hits for size, hits in per_size.items() if hits}
    if not covered:
        return float(np.mean(shown))
    total = sum(weights[size] for size in covered)
    return float(sum(weights[size] * np.mean(hits) for size, hits in covered.items()) / total)


def bare_prompt(identifier: str, class_noun: str) -> str:
    """ "a [V] [class]", or "a [class]" for a base model scored without an identifier (``identifier=""``)."""
    return f"a {identifier} {class_noun}" if identifier else f"a {class_noun}"


def _bare_prompt_scores(images: Sequence[Image.Image], subject: Subject,
                        ref_features: Sequence[np.ndarray]) -> tuple[float, list[bool]]:
    """Subject fidelity of bare-prompt images (mean ``subject_similarity`` over every (image, photo) pair) and, per
    image, whether the analyzers call it the subject."""
    fidelity = float(np.mean([subject_similarity(subject_features(img), ref) for img in images for ref in ref_features]))
    return fidelity, [is_subject(img, subject) for img in images]


def subject_at_lower_guidance(pipe, subject: Subject, references: Sequence[Image.Image], identifier: str, *,
                              guidance_scale: float, images_per_prompt: int = 8, seed: int = 0,
                              steps: int = INFERENCE_STEPS) -> dict[str, float]:
    """The bare prompt ("a [V] [class]") scored as ``evaluate_subject`` scores it, on the same seeds, but sampled at
    ``guidance_scale``, a lower guidance than the eval's (``runner.lower_guidance``): its ``subject_fidelity``,
    ``subject_match`` and that share's standard error, each named ``..._at_lower_guidance``. Tells a subject the
    fine-tune did not learn from one the eval's guidance distorts, which more steps or a higher learning rate cannot
    fix (``verdict``)."""
    seeds = [seed + j for j in range(images_per_prompt)]
    images = generate(pipe, [bare_prompt(identifier, subject.class_noun)] * len(seeds), seeds, steps=steps,
                      guidance_scale=guidance_scale)
    fidelity, matched = _bare_prompt_scores(images, subject, [subject_features(r) for r in references])
    return {"subject_fidelity_at_lower_guidance": fidelity, "subject_match_at_lower_guidance": float(np.mean(matched)),
            "subject_match_at_lower_guidance_stderr": rate_stderr(matched)}


def evaluate_subject(pipe, subject: Subject, references: Sequence[Image.Image], identifier: str, *,
                     images_per_prompt: int = 8, seed: int = 0, carry: Mapping[str, float] | None = None,
                     **sampler) -> SubjectReport:
    """Score ``pipe`` on ``subject``; pass ``identifier=""`` to score a base model on class prompts.
    ``carry``: ``vae_carry`` of the subject, to split the background asks by whether the VAE carries it there.

    Image j of every prompt uses seed ``seed + j``, so two models are compared on the same noise.
    """
    noun = f"{identifier} {subject.class_noun}".strip()
    seeds = [seed + j for j in range(images_per_prompt)]
    asks = recontext_asks(subject)
    prompts = ([bare_prompt(identifier, subject.class_noun), f"a {subject.class_noun}"]
               + [f"a {noun}{suffix}" for suffix, _, _ in asks])
    images = generate(pipe, [p for p in prompts for _ in seeds], seeds * len(prompts), **sampler)
    per_prompt = [images[i * len(seeds):(i + 1) * len(seeds)] for i in range(len(prompts))]
    subject_images, class_images, recontext = per_prompt[0], per_prompt[1], per_prompt[2:]
    ref_features = [subject_features(r) for r in references]
    photographed = photographed_contexts(references)
    asked, shown, recontext_sizes, seen, kinds, values = [], [], [], [], [], []
    for (_, field, value), group in zip(asks, recontext):
        for img in group:
            analysis = analyze(img)
            asked.append(getattr(analysis, field) == value)
            shown.append(is_subject(img, subject))
            recontext_sizes.append(analysis.size)
            seen.append((field, value) in photographed)
            kinds.append(field)
            values.append(value)
    unseen_share, unseen_stderr = _share_where(shown, [not s for s in seen])
    seen_share, seen_stderr = _share_where(shown, seen)
    background_share, background_stderr = _share_where(shown, [k == "background" for k in kinds])
    place_share, place_stderr = _share_where(shown, [k == "position" for k in kinds])
    unseen_background_share, unseen_background_stderr = _share_where(
        shown, [k == "background" and not s for k, s in zip(kinds, seen)])
    seen_background_share, seen_background_stderr = _share_where(
        shown, [k == "background" and s for k, s in zip(kinds, seen)])
    carried_backgrounds = set(vae_carried(carry)[0]) if carry is not None else set()
    carried = [value in carried_backgrounds if carry is not None and kind == "background" else None
               for kind, value in zip(kinds, values)]
    carried_share, carried_stderr = _share_where(shown, [c is True for c in carried])
    uncarried_share, uncarried_stderr = _share_where(shown, [c is False for c in carried])
    fidelity, matched = _bare_prompt_scores(subject_images, subject, ref_features)
    subject_sizes = [analyze(i).size for i in subject_images]
    return SubjectReport(
        subject_fidelity=fidelity,
        subject_match=float(np.mean(matched)),
        prompt_fidelity=float(np.mean(asked)),
        recontext_subject_match=float(np.mean([a and s for a, s in zip(asked, shown)])),
        recontext_shown=float(np.mean(shown)),
        pres=float(np.mean([is_subject(i, subject) for i in class_images])),
        div=pairwise_distance(subject_images),
        subject_match_stderr=rate_stderr(matched),
        recontext_shown_stderr=rate_stderr(shown),
        recontext_shown_at_subject_sizes=shown_at_sizes(shown, recontext_sizes, subject_sizes),
        subject_small_share=float(np.mean([size == "small" for size in subject_sizes])),
        recontext_small_share=float(np.mean([size == "small" for size in recontext_sizes])),
        recontext_shown_unseen=unseen_share, recontext_shown_unseen_stderr=unseen_stderr,
        recontext_shown_seen=seen_share, recontext_shown_seen_stderr=seen_stderr,
        recontext_shown_backgrounds=background_share, recontext_shown_backgrounds_stderr=background_stderr,
        recontext_shown_places=place_share, recontext_shown_places_stderr=place_stderr,
        recontext_shown_unseen_backgrounds=unseen_background_share,
        recontext_shown_unseen_backgrounds_stderr=unseen_background_stderr,
        recontext_shown_seen_backgrounds=seen_background_share,
        recontext_shown_seen_backgrounds_stderr=seen_background_stderr,
        recontext_shown_carried_backgrounds=carried_share, recontext_shown_carried_backgrounds_stderr=carried_stderr,
        recontext_shown_uncarried_backgrounds=uncarried_share,
        recontext_shown_uncarried_backgrounds_stderr=uncarried_stderr,
    )


def _through_vae(vae, images: Sequence[Image.Image]) -> list[Image.Image]:
    """``images`` (all of one size) encoded and decoded (the posterior mean) by ``vae`` alone."""
    pixels = torch.stack([torch.from_numpy(np.array(i.convert("RGB"))).permute(2, 0, 1) for i in images]).float()
    weight = next(vae.parameters())  # where the VAE lives: a loaded pipeline sits on the GPU when there is one
    with torch.no_grad():
        decoded = vae.decode(vae.encode((pixels / 127.5 - 1).to(weight.device, weight.dtype)).latent_dist.mean).sample
    arrays = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def vae_ceiling(vae, references: Sequence[Image.Image], resolution: int) -> float:
    """Subject fidelity of the subject photos passed through the VAE alone (encode, decode the
    posterior mean), scored like ``SubjectReport.subject_fidelity``: no fine-tune of the UNet and
    text encoder can render the subject better than its decoder can. A subject far below 1.0 here
    is one the model's VAE cannot carry, not a training failure."""
    photos = [r.convert("RGB").resize((resolution, resolution), Image.NEAREST) for r in references]
    ref_features = [subject_features(r) for r in references]
    return float(np.mean([subject_similarity(subject_features(decoded), ref)
                          for decoded in _through_vae(vae, photos) for ref in ref_features]))


VAE_CARRIED = 0.85
"""A background on which at least this share of the subject's true renders still shows the subject after the
VAE alone (``vae_carry``) counts as one the VAE carries it on. Over round 18's shipped-recipe runs the background
asks below it showed the subject 0.14 ± 0.06 less often than the bare prompt (31 runs), those above it level with
it or a little above (+0.05 ± 0.04, 32 runs; at a 0.75 line −0.00 ± 0.04): a diagnosis of where the misses are,
with a line drawn from the same data (benchmarks/RESULTS.md, round 22)."""


def vae_carried(carry: Mapping[str, float]) -> tuple[list[str], list[str]]:
    """(the backgrounds ``carry`` reaches ``VAE_CARRIED`` on, those it does not), each from the lowest share up."""
    ordered = sorted(carry, key=carry.get)
    return [bg for bg in ordered if carry[bg] >= VAE_CARRIED], [bg for bg in ordered if carry[bg] < VAE_CARRIED]


def format_carry(carry: Mapping[str, float], backgrounds: Sequence[str] | None = None) -> str:
    """'blue 0.00, black 0.33': each background's share (``backgrounds``, else all, from the lowest up)."""
    return ", ".join(f"{bg} {carry[bg]:.2f}" for bg in (backgrounds or sorted(carry, key=carry.get)))


CARRY_RENDERS_PER_SIZE = 8
"""True renders per size (small, medium, large; centred) ``vae_carry`` passes through the VAE per background."""


def vae_carry(vae, subject: Subject, resolution: int, renders_per_size: int = CARRY_RENDERS_PER_SIZE) -> dict[str, float]:
    """For each background the recontextualization prompts ask for (``subject.backgrounds``): the share of true
    renders of the subject on it (centred, each size ``renders_per_size`` times) that the analyzers still call the
    subject after the VAE alone (the analyzers call every render itself the subject). Like ``vae_ceiling`` a limit
    the decoder sets, but per background and as a share of renders: where the decoder blurs the subject's colours
    into the background's, a fine-tune of the UNet and text encoder rarely shows it (the shipped VAE keeps
    dotted_star on blue in none of 24 renders, on orange in 22; the fine-tunes of round 18 showed it on blue 0.09
    of the time)."""
    sizes = ("small", "medium", "large") * renders_per_size
    carry = {}
    for background in subject.backgrounds:
        renders = [render_subject(subject, background, "center", size, resolution, i) for i, size in enumerate(sizes)]
        carry[background] = float(np.mean([is_subject(decoded, subject) for decoded in _through_vae(vae, renders)]))
    return carry


# -- collateral drift -----------------------------------------------------------------------------

OTHER_PROMPTS = 12
"""Captions in the other-prompt set (each rendered ``images_per_prompt`` times)."""
OTHER_PROMPTS_SEED = 4321
"""Fixes the other-prompt set, so every model and every run is scored on the same captions."""


def other_prompt_scenes(class_noun: str, n: int = OTHER_PROMPTS, seed: int = OTHER_PROMPTS_SEED):
    """A fixed set of scenes of the *other* shapes, in every colour and background (base grammar)."""
    others = [s for s in SHAPES if s != class_noun] or list(SHAPES)
    return sample_scenes(n, seed, shapes=others)


EXTRA_PRIOR_SEED = 77
"""Seeds ``extra_prior_captions`` (the shapes recipe's ``extra_prior_prompts``)."""


def extra_prior_captions(n: int, seed: int = EXTRA_PRIOR_SEED) -> list[str]:
    """``n`` base-grammar captions for ``--extra-prior-prompts`` that the drift measure never scores:
    the (shape, colour, background) of every class's ``other_prompt_scenes`` are left out, so
    other-prompt fidelity stays a measure on captions the fine-tune never saw."""
    scored = {(s.shape, s.color, s.background) for noun in SHAPES for s in other_prompt_scenes(noun)}
    return [caption(scene, "short") for scene in sample_scenes(n, seed, exclude=scored)]


CLASS_CAPTION_SEED = 78
"""Seeds ``class_caption_templates`` (recipe_search's caption priors of the class itself)."""


def class_caption_templates(n: int, seed: int = CLASS_CAPTION_SEED) -> list[str]:
    """``n`` full base-grammar captions with the shape left as ``{class_noun}`` ("a small green
    {class_noun} in the top left on a red background") for ``--extra-prior-prompts``: priors of the
    class itself in other colours, sizes, places and backgrounds keep how the class word composes with
    the rest of a caption, which "a [V] [class] on a green background" needs. None is an eval prompt
    (those name the identifier, or other shapes)."""
    return [caption(scene, "full").replace(scene.shape, "{class_noun}")
            for scene in sample_scenes(n, seed, shapes=SHAPES[:1])]


@dataclass
class DriftReport:
    """Does the model still draw what prompts other than the subject's ask (all in [0, 1])?

    ``class_accuracy``: share of "a [class]" images the analyzers read as that shape (the class
    prior kept; PRES only says the subject did not take it over). ``other_prompt_accuracy``: mean of
    the shape, colour and background accuracies over ``other_prompt_scenes`` captions ("a red
    circle on a blue background"). ``clean_class_accuracy``: share of "a [class]" images that are
    the class *and* drawn cleanly (``shape_fit`` >= ``CLEAN_SHAPE_FIT``): the shape reader names the
    nearest shape for any blob, so smudges count in ``class_accuracy``.
    """

    class_accuracy: float
    other_prompt_accuracy: float
    clean_class_accuracy: float
    class_accuracy_stderr: float = 0.0
    """``rate_stderr`` of each accuracy (other prompts: of each image's share of its three fields right)."""
    other_prompt_accuracy_stderr: float = 0.0
    clean_class_accuracy_stderr: float = 0.0

    def as_dict(self) -> dict:
        return dict(vars(self))


def evaluate_drift(pipe, class_noun: str, *, images_per_prompt: int = 8, seed: int = 0, **sampler) -> DriftReport:
    """Score ``pipe`` on its class prompt and the other-prompt set, image j of each prompt on seed ``seed + j``."""
    seeds = [seed + j for j in range(images_per_prompt)]
    class_images = generate(pipe, [f"a {class_noun}"] * len(seeds), seeds, **sampler)
    is_class = [analyze(img).shape == class_noun for img in class_images]
    clean = [read and shape_fit(img) >= CLEAN_SHAPE_FIT for read, img in zip(is_class, class_images)]
    scenes = other_prompt_scenes(class_noun)
    prompts = [caption(s, "short") for s in scenes for _ in seeds]
    images = generate(pipe, prompts, seeds * len(scenes), **sampler)
    asked = [{"shape": s.shape, "color": s.color, "background": s.background} for s in scenes for _ in seeds]
    # Every caption names all three fields, so the mean of the per-image shares is the mean of the three accuracies.
    per_image = [np.mean(list(matches(analyze(image), fields).values())) for image, fields in zip(images, asked)]
    return DriftReport(
        class_accuracy=float(np.mean(is_class)), other_prompt_accuracy=float(np.mean(per_image)),
        clean_class_accuracy=float(np.mean(clean)), class_accuracy_stderr=rate_stderr(is_class),
        other_prompt_accuracy_stderr=rate_stderr(per_image), clean_class_accuracy_stderr=rate_stderr(clean))
