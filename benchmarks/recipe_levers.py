"""The recipe levers of the shapes study: one ``Recipe`` per variant ``recipe_search.py`` can run.

``VARIANTS`` is the lever table of benchmarks/RESULTS.md by name, rounds 1-23: each variant is ``START`` (the demo's
settings before issue #13) with one or more levers moved. ``CHOSEN`` names the one the ``shapes`` model ships
(``dreambooth/data/shapes/dreambooth.yaml``) for captioned photos, ``CHOSEN_WITHOUT_CAPTIONS`` the one for photos
without captions. Levers the product has no setting for are probed by
``lever_probes.py`` instead.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The levers this study moves (the rest of ``FinetuneSettings`` stays at the demo's values)."""

    learning_rate: float = 5e-4
    """UNet learning rate."""
    text_encoder_learning_rate: float | None = None
    """Text encoder learning rate; None: the UNet's."""
    text_encoder_steps: int | None = None
    """The text encoder trains for the first this many steps only."""
    steps: int = 400
    """Optimizer steps (batch 2 subject + 2 prior examples)."""
    prior_loss_weight: float = 1.0
    """λ."""
    num_priors: int = 32
    """Class-prior images."""
    prior_guidance: float = 4.0
    """Guidance scale the priors were generated with."""
    captioned: bool = False
    """Each subject photo trains on its own caption (size, place, background: ``shapes.subject_caption``
    beside the photo, as ``dreambooth.subjects`` reads it; the size dropped unless ``captions_name_size``)
    instead of "a [V] [class]"."""
    captioned_and_bare: bool = False
    """Each photo trains twice as often: once on its caption, once on "a [V] [class]" (the bare prompt
    stays the identifier's anchor while the captions say what else a photo shows)."""
    captions_name_size: bool = True
    """Whether a captioned photo's caption keeps its size word ("a large [V] star in the top left on a blue
    background"). Round 17 left it out to bind the photos' size to "[V] [class]" (recontextualization
    prompts name no size, and new contexts drew the subject small more often); they still did."""
    in_class_captions: int = 0
    """How many of the ``caption_priors`` are captions of the class itself in every colour, size, place
    and background ("a small green triangle in the top left on a red background"; the rest are of any
    shape): they keep how the class word composes with the rest of a caption, which "a [V] [class] on
    a green background" needs."""
    unconditional_priors: int = 0
    """Priors the frozen model draws for the empty prompt, trained on it: the base model learned the
    empty prompt from its 10 % dropped captions, and classifier-free guidance subtracts its
    prediction (guidance 4: 4 × conditional − 3 × unconditional), so a fine-tune that never trains it
    lets every prompt's images drift through it."""
    lr_scheduler: str = "constant"
    """How both learning rates move over the steps (``--lr-scheduler``): "cosine" ends at 0, so the last steps
    no longer add noise to the weights they leave behind."""
    prior_examples_per_subject_example: int = 1
    """Prior examples beside each subject example in a step: more average the prior term over more of the
    class's images per step (a less noisy pull towards the base), at the cost of a longer step."""
    snr_gamma: float | None = None
    """Min-SNR-γ loss weighting (``--snr-gamma``): nearly noise-free timesteps weigh less; None: plain MSE."""
    identifier_warmup_steps: int = 0
    """Steps of textual inversion before the fine-tune: the identifier's token embedding alone trains on the
    photos (no priors, the rest frozen), so the subject starts in the word every prompt carries ("pivotal
    tuning"). Round 18: a subject held in that one word might follow it into new contexts; it did not."""
    identifier_warmup_learning_rate: float = 5e-4
    """Learning rate of the identifier's embedding during ``identifier_warmup_steps``."""
    background_swap: float = 0.0
    """Share of subject examples drawn with the photo's backdrop repainted in a colour the base model never drew
    (``--background-swap``, on the bare prompt): photos that share backdrops stop teaching them with the subject."""
    caption_priors: int = 0
    """Priors generated from base-grammar captions of any shape, colour and background
    (``extra_prior_captions``: none of them is scored by the drift measure), added to the ``num_priors`` class priors, each trained on its
    caption: ``--extra-prior-prompts`` with ``--extra-prior-share`` caption_priors / all priors."""


START = Recipe()
CAPTIONED_AND_SWAPPED = dataclasses.replace(
    START, num_priors=96, caption_priors=32, unconditional_priors=32, learning_rate=3e-4,
    text_encoder_learning_rate=1e-4, steps=600, captioned_and_bare=True, captions_name_size=False, background_swap=0.25)
"""Rounds 20-21's candidate: round 14's recipe with size-free captions beside the bare prompt and a quarter of the
subject rows on repainted backdrops (round 21 varies its steps and share)."""
VARIANTS: dict[str, Recipe] = {
    "start": START,
    "te lr 5e-5": dataclasses.replace(START, text_encoder_learning_rate=5e-5),
    "te lr 0 (frozen)": dataclasses.replace(START, text_encoder_learning_rate=0.0),
    "lr 2e-4": dataclasses.replace(START, learning_rate=2e-4),
    "λ 2": dataclasses.replace(START, prior_loss_weight=2.0),
    "te 100 steps": dataclasses.replace(START, text_encoder_steps=100),
    "steps 200": dataclasses.replace(START, steps=200),
    "priors 128": dataclasses.replace(START, num_priors=128),
    "prior guidance 1.5": dataclasses.replace(START, prior_guidance=1.5),
    "λ 0": dataclasses.replace(START, prior_loss_weight=0.0),
    # Second round: the levers that helped one measure each, together.
    "te 0 + priors 128": dataclasses.replace(START, text_encoder_learning_rate=0.0, num_priors=128),
    "lr 3e-4 + te 0 + priors 128": dataclasses.replace(START, learning_rate=3e-4, text_encoder_learning_rate=0.0,
                                                       num_priors=128),
    "lr 2e-4 + te 0 + priors 128, 800 steps": dataclasses.replace(START, learning_rate=2e-4, steps=800,
                                                                  text_encoder_learning_rate=0.0, num_priors=128),
    "lr 2e-4 + te 5e-5 + priors 128, 800 steps": dataclasses.replace(START, learning_rate=2e-4, steps=800,
                                                                     text_encoder_learning_rate=5e-5, num_priors=128),
    # Third round: priors of other captions (the class prior alone only regularizes "a [class]").
    "caption priors 96": dataclasses.replace(START, caption_priors=96),
    "te 0 + priors 128 + caption priors 128": dataclasses.replace(START, text_encoder_learning_rate=0.0,
                                                                   num_priors=128, caption_priors=128),
    "te 5e-5 + priors 64 + caption priors 64": dataclasses.replace(START, text_encoder_learning_rate=5e-5,
                                                                    num_priors=64, caption_priors=64),
    # Fourth round: with caption priors holding the other prompts, push the subject harder; then the split
    # between class and caption priors (compared on all 8 subjects).
    "caption priors 96, 800 steps": dataclasses.replace(START, caption_priors=96, steps=800),
    "te 5e-5 + priors 64 + caption priors 64, 800 steps": dataclasses.replace(
        START, text_encoder_learning_rate=5e-5, num_priors=64, caption_priors=64, steps=800),
    "priors 64 + caption priors 64": dataclasses.replace(START, num_priors=64, caption_priors=64),
    "priors 128 + caption priors 128": dataclasses.replace(START, num_priors=128, caption_priors=128),
    "priors 96 + caption priors 32": dataclasses.replace(START, num_priors=96, caption_priors=32),
    # Fifth round: photos captioned with what else they show, so the identifier need not carry it.
    "priors 96 + caption priors 32 + captioned photos": dataclasses.replace(
        START, num_priors=96, caption_priors=32, captioned=True),
    # Sixth round, scored with clean_class_fidelity and 8 images per prompt (4 made one image a 0.25 step):
    # the shipped split with λ, steps, the text encoder's rate, and captioned photos beside bare ones.
    "96 + 32, λ 0.5": dataclasses.replace(START, num_priors=96, caption_priors=32, prior_loss_weight=0.5),
    "96 + 32, 600 steps": dataclasses.replace(START, num_priors=96, caption_priors=32, steps=600),
    "96 + 32, te lr 1e-4": dataclasses.replace(START, num_priors=96, caption_priors=32,
                                               text_encoder_learning_rate=1e-4),
    "96 + 32, captioned and bare photos": dataclasses.replace(START, num_priors=96, caption_priors=32,
                                                              captioned_and_bare=True),
    # Seventh round: caption priors of the class itself in new contexts.
    "96 + 32 in-class captions": dataclasses.replace(START, num_priors=96, caption_priors=32, in_class_captions=32),
    "64 + 64 in-class captions": dataclasses.replace(START, num_priors=64, caption_priors=64, in_class_captions=64),
    "96 + 16 + 16 in-class captions": dataclasses.replace(START, num_priors=96, caption_priors=32,
                                                          in_class_captions=16),
    # Eighth round: keep the unconditional prediction that guidance subtracts.
    "96 + 32 + 16 unconditional": dataclasses.replace(START, num_priors=96, caption_priors=32, unconditional_priors=16),
    "96 + 32 + 16 unconditional, 600 steps": dataclasses.replace(START, num_priors=96, caption_priors=32,
                                                                 unconditional_priors=16, steps=600),
    "96 + 32 + 16 unconditional, te lr 1e-4": dataclasses.replace(START, num_priors=96, caption_priors=32,
                                                                  unconditional_priors=16,
                                                                  text_encoder_learning_rate=1e-4),
    # Ninth round: from the best of round 8, win back subject fidelity (more steps) or keep other prompts (a
    # slower or frozen encoder, more unconditional priors).
    "96 + 32 + 16 unconditional, te lr 1e-4, 600 steps": dataclasses.replace(
        START, num_priors=96, caption_priors=32, unconditional_priors=16, text_encoder_learning_rate=1e-4, steps=600),
    "96 + 32 + 32 unconditional, te lr 1e-4": dataclasses.replace(
        START, num_priors=96, caption_priors=32, unconditional_priors=32, text_encoder_learning_rate=1e-4),
    "96 + 32 + 16 unconditional, te lr 5e-5, 600 steps": dataclasses.replace(
        START, num_priors=96, caption_priors=32, unconditional_priors=16, text_encoder_learning_rate=5e-5, steps=600),
    "96 + 32 + 16 unconditional, te frozen": dataclasses.replace(
        START, num_priors=96, caption_priors=32, unconditional_priors=16, text_encoder_learning_rate=0.0),
    # Twelfth round: levers that cut the noise of a run rather than move its mean (rounds 9-11: one subject's
    # measures move 0.1-0.3 between seeds).
    "96 + 32 + 32 unconditional, te lr 1e-4, cosine": dataclasses.replace(
        START, num_priors=96, caption_priors=32, unconditional_priors=32, text_encoder_learning_rate=1e-4,
        lr_scheduler="cosine"),
    "96 + 32 + 32 unconditional, lr 1e-3, te lr 2e-4, cosine": dataclasses.replace(
        START, num_priors=96, caption_priors=32, unconditional_priors=32, learning_rate=1e-3,
        text_encoder_learning_rate=2e-4, lr_scheduler="cosine"),
    "96 + 32 + 32 unconditional, te lr 1e-4, 2 priors per photo": dataclasses.replace(
        START, num_priors=96, caption_priors=32, unconditional_priors=32, text_encoder_learning_rate=1e-4,
        prior_examples_per_subject_example=2),
    # Thirteenth round, on the star subjects whose "a star" breaks (round 12; the frozen encoder did not keep it,
    # so the UNet moves it): pull harder towards the priors, or move the UNet in smaller steps.
    "96 + 32 + 32 unconditional, te lr 1e-4, λ 2": dataclasses.replace(
        START, num_priors=96, caption_priors=32, unconditional_priors=32, text_encoder_learning_rate=1e-4,
        prior_loss_weight=2.0),
    "96 + 32 + 32 unconditional, lr 3e-4, te lr 1e-4, 600 steps": dataclasses.replace(
        START, num_priors=96, caption_priors=32, unconditional_priors=32, learning_rate=3e-4,
        text_encoder_learning_rate=1e-4, steps=600),
    # Fourteenth round: the slower UNet with photos also trained on their captions (round 6: captioned and bare
    # photos showed the subject more often in new contexts than on the bare prompt).
    "96 + 32 + 32 unconditional, lr 3e-4, te lr 1e-4, 600 steps, captioned and bare photos": dataclasses.replace(
        START, num_priors=96, caption_priors=32, unconditional_priors=32, learning_rate=3e-4,
        text_encoder_learning_rate=1e-4, steps=600, captioned_and_bare=True),
    "96 + 32 + 32 unconditional, lr 3e-4, te lr 1e-4, 800 steps": dataclasses.replace(
        START, num_priors=96, caption_priors=32, unconditional_priors=32, learning_rate=3e-4,
        text_encoder_learning_rate=1e-4, steps=800),
    # Round 15: the text encoder slower still under the round-14 UNet (a frozen one kept new contexts level
    # with the bare prompt in round 12, at a cost in class fidelity).
    "96 + 32 + 32 unconditional, lr 3e-4, te lr 5e-5, 600 steps": dataclasses.replace(
        START, num_priors=96, caption_priors=32, unconditional_priors=32, learning_rate=3e-4,
        text_encoder_learning_rate=5e-5, steps=600),
    # Round 16: Min-SNR-γ weighting (diffusers' --snr_gamma 5) on the shipped recipe: the nearly noise-free
    # timesteps, where a few photos' fine detail is fitted, pull the weights less than the noisy ones that lay
    # out a scene (background, place).
    "96 + 32 + 32 unconditional, lr 3e-4, te lr 1e-4, 600 steps, min-SNR 5": dataclasses.replace(
        START, num_priors=96, caption_priors=32, unconditional_priors=32, learning_rate=3e-4,
        text_encoder_learning_rate=1e-4, steps=600, snr_gamma=5.0),
    # Round 17: on the seed-0 cell the recontextualization gap was the subject drawn smaller, so photos trained
    # on captions that name place and background but not size.
    "96 + 32 + 32 unconditional, lr 3e-4, te lr 1e-4, 600 steps, size-free captions": dataclasses.replace(
        START, num_priors=96, caption_priors=32, unconditional_priors=32, learning_rate=3e-4,
        text_encoder_learning_rate=1e-4, steps=600, captioned=True, captions_name_size=False),
    "96 + 32 + 32 unconditional, lr 3e-4, te lr 1e-4, 600 steps, size-free captioned and bare photos":
        dataclasses.replace(START, num_priors=96, caption_priors=32, unconditional_priors=32, learning_rate=3e-4,
                            text_encoder_learning_rate=1e-4, steps=600, captioned_and_bare=True,
                            captions_name_size=False),
    # Round 18: the identifier's embedding learned first (textual inversion), then the shipped recipe.
    "96 + 32 + 32 unconditional, lr 3e-4, te lr 1e-4, 600 steps, identifier warmed 200 steps at 5e-4":
        dataclasses.replace(START, num_priors=96, caption_priors=32, unconditional_priors=32, learning_rate=3e-4,
                            text_encoder_learning_rate=1e-4, steps=600, identifier_warmup_steps=200),
    # Round 19, on photos that share 2 backgrounds (--photo-backgrounds 2): the subject in the UNet alone.
    "96 + 32 + 32 unconditional, lr 3e-4, te frozen, 600 steps": dataclasses.replace(
        START, num_priors=96, caption_priors=32, unconditional_priors=32, learning_rate=3e-4,
        text_encoder_learning_rate=0.0, steps=600),
    # ... and its 32 caption priors all of the class on other backgrounds (round 7's lever on the shipped recipe).
    "96 + 32 in-class + 32 unconditional, lr 3e-4, te lr 1e-4, 600 steps": dataclasses.replace(
        START, num_priors=96, caption_priors=32, in_class_captions=32, unconditional_priors=32, learning_rate=3e-4,
        text_encoder_learning_rate=1e-4, steps=600),
    "96 + 32 + 32 in-class + 32 unconditional, lr 3e-4, te lr 1e-4, 600 steps": dataclasses.replace(
        START, num_priors=96, caption_priors=64, in_class_captions=32, unconditional_priors=32, learning_rate=3e-4,
        text_encoder_learning_rate=1e-4, steps=600),
    "96 + 32 + 32 unconditional, lr 3e-4, te lr 1e-4, 600 steps, backdrops swapped half the time": dataclasses.replace(
        START, num_priors=96, caption_priors=32, unconditional_priors=32, learning_rate=3e-4,
        text_encoder_learning_rate=1e-4, steps=600, background_swap=0.5),
    "96 + 32 + 32 unconditional, lr 3e-4, te lr 1e-4, 600 steps, backdrops swapped a quarter of the time":
        dataclasses.replace(START, num_priors=96, caption_priors=32, unconditional_priors=32, learning_rate=3e-4,
                            text_encoder_learning_rate=1e-4, steps=600, background_swap=0.25),
    "96 + 32 + 32 unconditional, lr 3e-4, te lr 1e-4, 600 steps, size-free captioned and bare photos, backdrops "
    "swapped a quarter of the time": CAPTIONED_AND_SWAPPED,
    "96 + 32 + 32 unconditional, lr 3e-4, te lr 1e-4, 800 steps, size-free captioned and bare photos, backdrops "
    "swapped a quarter of the time": dataclasses.replace(CAPTIONED_AND_SWAPPED, steps=800),
    "96 + 32 + 32 unconditional, lr 3e-4, te lr 1e-4, 600 steps, size-free captioned and bare photos, backdrops "
    "swapped a tenth of the time": dataclasses.replace(CAPTIONED_AND_SWAPPED, background_swap=0.1),
    # Rounds 22-23: the captions beside the bare prompt halve the steps the bare prompt trains on; twice the steps
    # give it the shipped recipe's back. Round 23 slows the text encoder to hold the class (round 16: +0.05).
    "96 + 32 + 32 unconditional, lr 3e-4, te lr 1e-4, 1200 steps, size-free captioned and bare photos":
        dataclasses.replace(CAPTIONED_AND_SWAPPED, background_swap=0.0, steps=1200),
    "96 + 32 + 32 unconditional, lr 3e-4, te lr 5e-5, 1200 steps, size-free captioned and bare photos":
        dataclasses.replace(CAPTIONED_AND_SWAPPED, background_swap=0.0, steps=1200, text_encoder_learning_rate=5e-5),
    # Round 25: at 1200 steps (2 priors a step) each of the 160 priors is trained on 15 times; twice as many, half as often,
    # for the class a user check saw drift on new square subjects (`--num-class-images 320`: 0.50 → 0.93, one run).
    "192 + 64 + 64 unconditional, lr 3e-4, te lr 5e-5, 1200 steps, size-free captioned and bare photos":
        dataclasses.replace(CAPTIONED_AND_SWAPPED, background_swap=0.0, steps=1200, text_encoder_learning_rate=5e-5,
                            num_priors=192, caption_priors=64, unconditional_priors=64),
}
CHOSEN = "192 + 64 + 64 unconditional, lr 3e-4, te lr 5e-5, 1200 steps, size-free captioned and bare photos"
"""The shapes model's shipped recipe (``dreambooth/data/shapes/dreambooth.yaml``) for captioned photos, from round 26:
round 23's (round 14's with each photo on its caption beside the bare prompt, for twice the steps, and the text
encoder at half the rate) with twice its 160 priors, so that 1200 steps train on each 7.5 times, as round 14's 600
did. Round 23 on 36 runs at guidance 4: new contexts − bare prompt −0.004 ± 0.021 (round 14's −0.032 ± 0.023),
subject fidelity 0.77, class 0.92, other prompts 0.92 (0.96, 0.95). Twice the priors against it on 24 runs at
guidance 2 (rounds 25-26, 4 of them on new subjects): class 0.9 of the base or more on 23 runs against 17, other
prompts +0.015 ± 0.007, subject fidelity −0.006 ± 0.013 (0.7 or more on 21 runs against 23). See RESULTS.md, rounds
23-26, and ``CHOSEN_WITHOUT_CAPTIONS`` for how it came to be."""
CHOSEN_WITHOUT_CAPTIONS = "96 + 32 + 32 unconditional, lr 3e-4, te lr 1e-4, 600 steps"
"""The shapes model's recipe for photos without captions (the recipe file's ``without_captions`` section), shipped for
all photos in rounds 14-22. Rounds 1-3 were chosen on the
tuning subjects; from round 4 candidates were compared on all 8 subjects of the tuning, held-out and scripted sets
(single seeds move one subject's measures by 0.1-0.3, so 2 subjects could not tell them apart), and checked
unchanged on new scripted subjects (``--subjects scripted --scripted-seed 2027``). Rounds 9-12 shipped "96 + 32 +
32 unconditional, te lr 1e-4" (the UNet at 5e-4 for 400 steps): over 36 runs (8 subjects on 4 seeds and the 4
seed-2027 subjects) class fidelity 0.88 ± 0.04, 0.70 on star subjects. Round 13 found that the UNet at 3e-4 for
600 steps held the star; round 14 ran it on the same 36 runs: subject fidelity 0.76 (0.74), subject match 0.56
(0.46), recontext_shown 0.53 (0.44), class fidelity 0.94 (0.88), clean class 0.77 (0.65), other prompts 0.95
(0.90). Recontextualized prompts still show the subject 0.03 ± 0.03 less often than the bare prompt (paired
over runs), the one part of #13's bound its means do not meet. Round 17's size-free captions beside the bare
prompt moved that to +0.02 ± 0.03, but only on the contexts the captions name (on the others it was no better);
not shipped. Round 18 (16 images per prompt): the model follows background words but not place words, and on new
backgrounds asked by name the shipped recipe shows the subject 0.07 ± 0.03 less often than on the bare prompt, on
the backgrounds it contrasts weakly with; learning the identifier's embedding first did not help. Round 19 drew the
photos on 2 backgrounds (``--photo-backgrounds 2``): backgrounds no photo shows kept the subject 0.26 of the time
against 0.61 on the bare prompt; captions, a masked subject loss (probe), a frozen text encoder and priors of the
class on other backgrounds beside the caption priors did not move it, and those priors in place of the caption
priors raised it by 0.14, still 0.26 below the bare prompt, at other prompts 0.88. Round 20 repainted a share of the
photos' backdrops (``--background-swap``): with the photos' captions beside the bare prompt, it also lifted the
backgrounds no photo shows (round 17's captions alone lifted only the contexts the captions name). Round 21 ran it
on the same 36 runs: new contexts − bare prompt +0.03 ± 0.02, subject fidelity 0.70, class 0.95, other prompts 0.93
— the bound on the means, but by a bare prompt showing the subject 0.10 ± 0.04 less often (paired), new contexts
0.03 ± 0.02 less often, and paper claim (a) no longer reproduced on it: not shipped. Round 22 (``lever_probes.py``):
backdrops repainted near the subject's colours, and the subject's examples trained towards low noise, narrowed the
gap only as far as the bare prompt lost the subject; the misses sit on the backgrounds the VAE alone loses the subject
on (``vae_carry``). See RESULTS.md."""
