"""Checks of a built ``RunConfig``, run once before Ray starts anything: each error names the flag and the fix.
Also the per-value checks that other inputs (captions, bulk manifests, model recipes) reuse."""

from __future__ import annotations

import math
import re
import string
import typing

from dreambooth.config.schema import (
    ConfigError, Launcher, LrScheduler, OptimizerName, Precision, ReportTo, RunConfig, SaveDtype, UseGpu,
)
from dreambooth.inputs import MAX_PROMPT_CHARS, shorten


_CLASS_NOUN = re.compile(r"^[a-z][a-z0-9 '\-]{0,39}$")
MAX_INSTANCE_IMAGES = 50
LR_SCHEDULERS = typing.get_args(LrScheduler)
PRECISIONS = typing.get_args(Precision)
SAVE_DTYPES = typing.get_args(SaveDtype)
LAUNCHERS = typing.get_args(Launcher)
REPORT_TO = typing.get_args(ReportTo)
USE_GPU = typing.get_args(UseGpu)
OPTIMIZERS = typing.get_args(OptimizerName)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate_class_noun(noun: str) -> str:
    """Normalize and check a class noun ('Dog ' -> 'dog')."""
    noun = " ".join(noun.split()).lower()
    _check(bool(noun), "--class-noun is empty; give the subject's class, e.g. --class-noun dog")
    _check(
        bool(_CLASS_NOUN.match(noun)),
        f"--class-noun {noun!r} is not a plain noun; use 1-3 lowercase words such as 'dog' or "
        "'stuffed animal' (letters, digits, spaces, hyphens)",
    )
    _check(len(noun.split()) <= 3, f"--class-noun {noun!r} has more than 3 words; use a coarse class like 'dog'")
    return noun


MAX_RESOLUTION = 2048
"""Largest training/prior image side accepted (SDXL trains at 1024)."""

MAX_SEED = 2**31 - 1
MAX_IDENTIFIER_WORDS = 3
"""The paper's [V] is a sequence of 1-3 rare tokens."""

_IDENTIFIER_WORD = re.compile(r"^[\w\-]{1,32}$")
_TEMPLATE_FIELDS = ("identifier", "class_noun")


def check_range(value: float, lo: float, hi: float, flag: str, why: str = "") -> None:
    """``lo <= value <= hi`` and finite, or a ConfigError naming ``flag`` and the range."""
    _check(math.isfinite(value) and lo <= value <= hi, f"{flag} must be between {lo:g} and {hi:g}{why}, got {value:g}")


def validate_resolution(resolution: int, flag: str = "--resolution") -> None:
    _check(
        8 <= resolution <= MAX_RESOLUTION and resolution % 8 == 0,
        f"{flag} must be a multiple of 8 between 8 and {MAX_RESOLUTION}, got {resolution}",
    )


def validate_identifier(identifier: str, flag: str = "--identifier") -> str:
    """``auto`` or 1-3 words of letters, digits, ``_`` or ``-`` (each rare token is one word)."""
    ident = " ".join(identifier.split())
    _check(bool(ident), f"{flag} is empty; pass a rare token such as 'sks', or 'auto'")
    words = ident.split(" ")
    _check(
        len(words) <= MAX_IDENTIFIER_WORDS,
        f"{flag} {shorten(ident)} has {len(words)} words; use 1-{MAX_IDENTIFIER_WORDS} rare tokens such as 'sks' or 'auto'",
    )
    bad = [w for w in words if not _IDENTIFIER_WORD.match(w)]
    _check(
        not bad,
        f"{flag} {shorten(ident)}: {shorten(bad[0]) if bad else ''} is not a word of at most 32 letters, digits, '_' or '-'; "
        "pick a rare token such as 'sks' (or 'auto')",
    )
    return ident


def validate_prompt_template(template: str, flag: str = "--sample-prompts") -> None:
    """Only ``{identifier}`` and ``{class_noun}``, plain: a format spec like ``{identifier:>9999999}`` can
    expand a few bytes into gigabytes."""
    _check(
        len(template) <= MAX_PROMPT_CHARS,
        f"{flag} entry {shorten(template)} is {len(template)} characters; at most {MAX_PROMPT_CHARS}",
    )
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"{flag} entry {shorten(template)} is not a valid template ({exc}); "
                          "use {identifier} and {class_noun}, or write '{{' for a brace") from None
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        _check(
            name in _TEMPLATE_FIELDS and not spec and not conversion,
            f"{flag} entry {shorten(template)} may only use {{identifier}} and {{class_noun}} "
            f"(no format specs or conversions), found {{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}",
        )


def _template_fields(template: str) -> set[str]:
    """The ``{fields}`` a template (already checked by ``validate_prompt_template``) names."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def fill_prior_prompt(template: str, class_noun: str) -> str:
    """An ``extra_prior_prompts`` entry with ``{class_noun}`` filled in (``{{``/``}}`` become braces)."""
    return template.format(class_noun=class_noun)


def validate_generation(cfg: RunConfig) -> None:
    """Checks shared by `prior` and `run`: model, class noun, resolution, generation settings."""
    _check(
        bool(cfg.model.strip()),
        "--model is required: pass a local diffusers folder, a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5, "
        "or a built-in name ('shapes', or 'tiny' for random weights)",
    )
    cfg.subject.class_noun = validate_class_noun(cfg.subject.class_noun)
    t, p = cfg.train, cfg.prior
    if t.resolution is not None:  # None: the model's native size, filled in once the model resolves
        validate_resolution(t.resolution)
    check_range(p.num_class_images, 0, 100_000, "--num-class-images")
    check_range(p.prior_actors, 0, 4096, "--prior-actors", " (0 = auto)")
    check_range(p.prior_batch_size, 1, 1024, "--prior-batch-size")
    check_range(p.num_inference_steps, 1, 1000, "--num-inference-steps")
    check_range(p.guidance_scale, 0, 100, "--guidance-scale")
    check_range(p.prior_seed, 0, MAX_SEED, "--prior-seed")
    if p.extra_prior_prompts:
        _check(all(prompt.strip() for prompt in p.extra_prior_prompts),
               "--extra-prior-prompts has an empty prompt; remove it or write the caption")
        for prompt in p.extra_prior_prompts:
            validate_prompt_template(prompt, flag="--extra-prior-prompts")
            _check("identifier" not in _template_fields(prompt),
                   f"--extra-prior-prompts entry {shorten(prompt)} names {{identifier}}: priors are drawn by the "
                   "frozen model, which does not know the subject; use {class_noun} or plain words")
        _check(0 < p.extra_prior_share < 1, f"--extra-prior-share must be in (0, 1) with --extra-prior-prompts "
               f"(the rest of the priors keep the class prompt), got {p.extra_prior_share:g}")
    _check(0 <= p.unconditional_prior_share < 1, "--unconditional-prior-share must be in [0, 1) (the rest of the "
           f"priors keep the class prompt), got {p.unconditional_prior_share:g}")
    _check(p.extra_share_used + p.unconditional_prior_share < 1,
           f"--extra-prior-share {p.extra_share_used:g} + --unconditional-prior-share {p.unconditional_prior_share:g} "
           "leave no priors of the class prompt; keep their sum below 1")
    _check(t.use_gpu in USE_GPU, f"--use-gpu must be {', '.join(USE_GPU[:-1])} or {USE_GPU[-1]}, got {shorten(t.use_gpu)}")


def validate(cfg: RunConfig) -> RunConfig:
    """Validate a full `run` config in place and return it. Raises ConfigError naming the fix."""
    validate_generation(cfg)
    _check(bool(cfg.output.strip()), "--output is empty; pass where the personalized model should go")
    _check(
        bool(cfg.subject.instance_dir.strip()),
        "--instance-dir is empty; pass the folder with 3-5 photos of your subject",
    )
    cfg.subject.identifier = validate_identifier(cfg.subject.identifier)
    check_range(cfg.subject.identifier_seed, 0, MAX_SEED, "--identifier-seed")
    t = cfg.train
    check_range(t.max_train_steps, 1, 10_000_000, "--max-train-steps")
    check_range(t.train_batch_size, 1, 1024, "--train-batch-size")
    check_range(t.gradient_accumulation_steps, 1, 4096, "--gradient-accumulation-steps")
    _check(0 < t.learning_rate < 1, f"--learning-rate must be in (0, 1), got {t.learning_rate:g}")
    _check(t.text_encoder_learning_rate is None or 0 <= t.text_encoder_learning_rate < 1,
           f"--text-encoder-learning-rate must be in [0, 1), got {t.text_encoder_learning_rate}")
    _check(t.lr_scheduler in LR_SCHEDULERS, f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {shorten(t.lr_scheduler)}")
    check_range(t.lr_warmup_steps, 0, 10_000_000, "--lr-warmup-steps")
    check_range(t.max_grad_norm, 0, 1e6, "--max-grad-norm", " (0 disables clipping)")
    check_range(t.adam_weight_decay, 0, 1, "--adam-weight-decay")
    check_range(t.prior_loss_weight, 0, 1000, "--prior-loss-weight")
    _check(t.snr_gamma is None or 0 < t.snr_gamma <= 1000,
           f"--snr-gamma must be in (0, 1000] (5 is the paper's), got {t.snr_gamma}; leave it unset for plain MSE")
    _check(t.mixed_precision in PRECISIONS, f"--mixed-precision must be one of {', '.join(PRECISIONS)}, got {shorten(t.mixed_precision)}")
    check_range(t.workers, 1, 4096, "--workers")
    _check(t.launcher in LAUNCHERS, f"--launcher must be one of {', '.join(LAUNCHERS)}, got {shorten(t.launcher)}")
    _check(t.launcher != "in-process" or t.workers == 1,
           f"--launcher in-process trains one worker, got --workers {t.workers}; use --launcher ray-train (or auto)")
    _check(0 < t.cpus_per_worker <= 1024, f"--cpus-per-worker must be > 0 and at most 1024, got {t.cpus_per_worker:g}")
    _check(t.zero_stage in (0, 1, 2, 3), f"--zero-stage must be 0, 1, 2 or 3, got {t.zero_stage}")
    _check(
        not (t.offload_optimizer and t.zero_stage == 0),
        "--offload-optimizer needs --zero-stage 1, 2 or 3 (ZeRO owns the optimizer state it offloads)",
    )
    _check(t.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {shorten(t.optimizer)}")
    _check(
        not (t.offload_optimizer and t.optimizer != "adamw"),
        f"--offload-optimizer runs DeepSpeed's CPU AdamW, so it works with --optimizer adamw only, got --optimizer "
        f"{t.optimizer}; drop --offload-optimizer (--optimizer {t.optimizer} already needs less optimizer memory) "
        "or use --optimizer adamw",
    )
    _check(
        not (t.optimizer == "adamw8bit" and t.use_gpu == "false"),
        "--optimizer adamw8bit runs on CUDA GPUs only (bitsandbytes), got --use-gpu false; "
        "use --optimizer adafactor to save optimizer memory on CPUs",
    )
    _check(
        not (t.offload_params and t.zero_stage != 3),
        f"--offload-params needs --zero-stage 3 (only ZeRO-3 partitions the parameters it offloads), got "
        f"--zero-stage {t.zero_stage}; add --zero-stage 3, or drop --offload-params",
    )
    _check(0 <= t.background_swap < 1, f"--background-swap must be at least 0 and below 1 (the share of subject "
           f"examples drawn repainted: 0 = off, and the photos themselves must train too), got {t.background_swap:g}")
    check_range(t.checkpointing_steps, 0, 10_000_000, "--checkpointing-steps", " (0 = no checkpoints)")
    check_range(t.max_failures, 0, 1000, "--max-failures")
    check_range(t.seed, 0, MAX_SEED, "--seed")
    check_range(t.log_every, 1, 10_000_000, "--log-every")
    _check(
        t.prior_loss_weight == 0 or cfg.prior.num_class_images >= 1,
        "--num-class-images must be >= 1 when --prior-loss-weight > 0 (prior preservation needs class images)",
    )
    check_range(cfg.export.num_sample_images, 0, 64, "--num-sample-images")
    if cfg.export.sample_guidance_scale is not None:
        check_range(cfg.export.sample_guidance_scale, 0, 100, "--sample-guidance-scale")
    check_range(cfg.export.validation_steps, 0, 10_000_000, "--validation-steps", " (0 = none)")
    _check(cfg.export.report_to in REPORT_TO,
           f"--report-to must be one of {', '.join(REPORT_TO)}, got {shorten(cfg.export.report_to)}")
    _check(cfg.export.save_dtype in SAVE_DTYPES, f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}, "
           f"got {shorten(cfg.export.save_dtype)}")
    _check(bool(cfg.export.sample_prompts), "sample_prompts is empty; give at least one prompt, or set "
           "--num-sample-images 0 to skip the sample grid")
    for prompt in cfg.export.sample_prompts:
        validate_prompt_template(prompt)
    return cfg
