"""Probes of recipe levers the product does not carry, run through ``recipe_search`` (#13, rounds 18-22).

Each probe changes one thing inside round 22's shipped recipe (``CHOSEN_WITHOUT_CAPTIONS``, the one the probes were
measured against; the captioned recipe shipped since round 23 trains twice the steps) for the length of one study, so a lever can be
measured before (or instead of) becoming a flag; ``--per-ask`` records, for every recontextualization ask of every
run, which of its images show the subject, as the per-ask tables of benchmarks/RESULTS.md need.

- ``--near-fills``: ``--background-swap 0.25`` with the repainted backdrops drawn near the subject's own colours
  (each colour covering 15 % or more of the subject, moved by ``NEAR_OFFSET`` in one or more channels, kept
  ``NEAR_MIN_FROM_PALETTE`` from every colour the ``shapes`` model was trained on, so no evaluation background is
  shown), instead of ``backgrounds.BACKGROUND_FILLS``: the subject shown on backdrops it contrasts weakly with, where
  new contexts lose it (round 18).
- ``--subject-timestep-gamma G``: the subject rows' timesteps drawn as ``T * u**G`` (u uniform; G > 1 leans towards
  low noise), the prior rows' uniform as before: the subject's look learned where detail is decided, its layout and
  background left more to the base model.

Usage::

    python benchmarks/lever_probes.py --near-fills --per-ask asks.json --subjects tuning held-out scripted \\
        --seeds 0 --images-per-prompt 16 --threads 1 --no-write --json rows.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks.recipe_search as search  # noqa: E402
from benchmarks.recipe_levers import CHOSEN_WITHOUT_CAPTIONS  # noqa: E402
from dreambooth.evaluation import shapes as shapes_eval  # noqa: E402
from dreambooth.shapes import analyze, is_subject  # noqa: E402
from dreambooth.shapes.world import PALETTE  # noqa: E402
from dreambooth.training import backgrounds, inprocess  # noqa: E402
from dreambooth.training import module as training_module  # noqa: E402

NEAR_OFFSET = 45
"""How far (per channel moved) a near fill is from the subject colour it is drawn from."""
NEAR_MIN_FROM_PALETTE = 40
"""Least largest-channel distance of a near fill from every ``shapes`` palette colour (no eval background shown)."""
NEAR_FILLS_PER_PHOTO = 12
"""Near fills kept per photo (as many as ``BACKGROUND_FILLS``), a fixed draw from the candidates."""


def subject_colours(image, alpha: np.ndarray, share: float = 0.15) -> list[tuple[int, int, int]]:
    """Colours (to 8 levels a channel) covering at least ``share`` of the subject's pixels (``alpha`` 1)."""
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)[alpha.reshape(-1) >= 1]
    if len(pixels) == 0:
        return []
    colours, counts = np.unique((pixels // 8) * 8 + 4, axis=0, return_counts=True)
    return [tuple(int(v) for v in c) for c, n in zip(colours, counts) if n >= share * len(pixels)]


def near_fills(colours, backdrop) -> list[tuple[int, int, int]]:
    """Fills ``NEAR_OFFSET`` from each subject colour, off the palette and off the photo's own backdrop."""
    palette = np.array(list(PALETTE.values()))
    moves = np.array(np.meshgrid(*[[-NEAR_OFFSET, 0, NEAR_OFFSET]] * 3)).reshape(3, -1).T
    fills = []
    for colour in colours:
        for move in moves[np.abs(moves).sum(1) > 0]:
            fill = np.clip(np.add(colour, move), 0, 255)
            if (np.abs(palette - fill).max(-1).min() >= NEAR_MIN_FROM_PALETTE
                    and np.abs(fill - np.array(backdrop)).max() > backgrounds.MIN_FILL_DISTANCE):
                fills.append(tuple(int(x) for x in fill))
    if len(fills) > NEAR_FILLS_PER_PHOTO:
        keep = np.random.default_rng(0).choice(len(fills), NEAR_FILLS_PER_PHOTO, replace=False)
        fills = [fills[i] for i in sorted(keep)]
    return fills


def use_near_fills() -> None:
    plain_of = backgrounds.Repaintable.of.__func__

    def near_of(cls, image):
        photo = plain_of(cls, image)
        near = near_fills(subject_colours(photo.image, photo.alpha), photo.backdrop)
        return dataclasses.replace(photo, fills=tuple(near) or photo.fills)

    backgrounds.Repaintable.of = classmethod(near_of)


def subject_timesteps_loss(gamma: float):
    """``mixed_batch_loss`` with the subject rows' timesteps drawn as ``T * u**gamma``."""

    def loss(model, noise_scheduler, latents, conditions, num_instance, prior_loss_weight, generator, snr_gamma=None):
        if snr_gamma is not None:
            raise ValueError("--subject-timestep-gamma does not weigh the loss by Min-SNR-γ: run it on a recipe "
                             "without snr_gamma")
        steps = noise_scheduler.config.num_train_timesteps
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        u = torch.rand((latents.shape[0],), generator=generator)
        u[:num_instance] = u[:num_instance] ** gamma
        timesteps = (u * steps).long().clamp(max=steps - 1).to(latents.device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = model(noisy.to(next(model.parameters()).dtype), timesteps, conditions)
        target = training_module.diffusion_target(noise_scheduler, latents, noise, timesteps)
        return training_module.dreambooth_loss(prediction, target, num_instance, prior_loss_weight, None)

    return loss


def record_per_ask(path: str, variant: str) -> None:
    """Wrap ``recipe_search``'s scoring so every recontext ask's images are kept: which show the subject, their
    sizes, and whether a photo shows the asked context (with the run's variant, seed and sampling guidance);
    written to ``path`` after each run."""
    records, current, last = [], {}, {}
    generate, evaluate, run = shapes_eval.generate, search.evaluate_subject, search.Study.run

    def recording_generate(pipe, prompts, seeds, **kw):
        images = generate(pipe, prompts, seeds, **kw)
        last["prompts"], last["images"] = list(prompts), images
        return images

    def recording_evaluate(pipe, subject, references, identifier, **kw):
        report = evaluate(pipe, subject, references, identifier, **kw)
        if identifier:
            photographed = shapes_eval.photographed_contexts(references)
            noun = f"a {identifier} {subject.class_noun}"
            labels = {noun: ("bare", "", False)} | {
                f"{noun}{suffix}": (field, value, (field, value) in photographed)
                for suffix, field, value in shapes_eval.recontext_asks(subject)}
            groups: dict[str, list] = {}
            for prompt, image in zip(last["prompts"], last["images"]):
                if prompt in labels:
                    groups.setdefault(prompt, []).append(image)
            for prompt, group in groups.items():
                field, value, seen = labels[prompt]
                readings = [analyze(image) for image in group]
                records.append({"variant": variant, "guidance": kw.get("guidance_scale"),
                                "subject": subject.name, "seed": current["seed"], "field": field, "value": value,
                                "seen": seen, "shown": [bool(is_subject(image, subject)) for image in group],
                                "sizes": [r.size for r in readings],
                                "asked_ok": [field == "bare" or getattr(r, field) == value for r in readings]})
            Path(path).write_text(json.dumps(records))
        return report

    def seeded_run(self, subject, folder, recipe, seed):
        current["seed"] = seed
        return run(self, subject, folder, recipe, seed)

    shapes_eval.generate, search.evaluate_subject, search.Study.run = recording_generate, recording_evaluate, seeded_run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--near-fills", action="store_true", help="swap 0.25 on fills near the subject's colours")
    parser.add_argument("--subject-timestep-gamma", type=float, help="subject rows' timesteps T * u**G")
    parser.add_argument("--per-ask", help="write every recontext ask's per-image readings to this JSON file")
    probes, rest = parser.parse_known_args(argv)
    recipe, label = search.VARIANTS[CHOSEN_WITHOUT_CAPTIONS], CHOSEN_WITHOUT_CAPTIONS
    if probes.near_fills:
        use_near_fills()
        recipe, label = dataclasses.replace(recipe, background_swap=0.25), label + ", swap 0.25 on near-subject fills"
    if probes.subject_timestep_gamma is not None:
        inprocess.mixed_batch_loss = subject_timesteps_loss(probes.subject_timestep_gamma)
        label += f", subject timesteps T·u^{probes.subject_timestep_gamma:g}"
    if probes.per_ask:
        record_per_ask(probes.per_ask, label)
    search.VARIANTS[label] = recipe
    sys.argv = [sys.argv[0], *rest, "--variants", label]
    search.main()


if __name__ == "__main__":
    main()
