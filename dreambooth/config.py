"""The one typed configuration of a DreamBooth run.

Owns: the dataclasses (one docstring per field), reading them from YAML and CLI flags (flags win),
and validating them once, before Ray starts anything. Every later stage receives a validated
``RunConfig`` and never parses flags or dicts again.

YAML files may nest keys by section (``train: {learning_rate: 1e-6}``) or give them flat
(``learning_rate: 1e-6``): field names are unique across sections, so a flat key has one home.
CLI flags are the field names with dashes (``--learning-rate``), named as in diffusers'
``train_dreambooth.py`` where the meaning is the same.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import re
import string
import textwrap
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from dreambooth.inputs import MAX_CONFIG_BYTES, MAX_PROMPT_CHARS, MAX_TEXT_FIELD, InputError, load_yaml_file, shorten


class ConfigError(ValueError):
    """A configuration value a user must fix; the message names the field and the fix."""


LrScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine", "polynomial"]
Precision = Literal["no", "fp16", "bf16"]
Launcher = Literal["auto", "ray-train", "in-process"]
UseGpu = Literal["auto", "true", "false"]
SaveDtype = Literal["fp16", "bf16", "fp32"]
ReportTo = Literal["none", "tensorboard", "mlflow", "wandb"]
OptimizerName = Literal["adamw", "adafactor", "adamw8bit"]
"""The string options' choices: read as text, checked by ``validate`` against ``typing.get_args``."""


@dataclass
class SubjectConfig:
    """The subject to personalize: its photos and the words that will name it."""

    instance_dir: str = ""
    """Folder (local path or fsspec URI) holding 1-50 photos of the subject (JPEG, PNG, WebP, ...); a
    ``.txt`` named like a photo is its own prompt, e.g. ``a {identifier} {class_noun} on a sofa``."""

    class_noun: str = ""
    """Coarse class of the subject, e.g. ``dog`` or ``backpack``; anchors it to the model's prior."""

    identifier: str = "auto"
    """Rare-token identifier [V] bound to the subject; ``auto`` draws one from the tokenizer's vocabulary."""

    identifier_seed: int = 0
    """Seed of the deterministic draw when ``identifier`` is ``auto``."""

    @property
    def instance_prompt(self) -> str:
        """``a [V] [class noun]``: the caption of every subject photo."""
        return f"a {self.identifier} {self.class_noun}"

    @property
    def class_prompt(self) -> str:
        """``a [class noun]``: the caption of every class-prior image."""
        return f"a {self.class_noun}"


@dataclass
class PriorConfig:
    """Class-prior generation: images the frozen model makes for ``a [class noun]``."""

    num_class_images: int = 100
    """How many class-prior images to generate (the paper uses ~200-1000; fewer also work)."""

    prior_output: str = ""
    """Root URI of the prior cache; empty means ``<parent of --output>/priors``. Shared by subjects."""

    prior_actors: int = 0
    """Generation actors in the Ray Data pool; 0 sizes the pool from the cluster's GPUs (or CPUs)."""

    prior_batch_size: int = 4
    """Images each actor generates per call (and per Parquet shard)."""

    num_inference_steps: int = 50
    """Denoising steps of the sampler when generating priors and sample grids."""

    guidance_scale: float = 7.5
    """Classifier-free guidance scale for prior generation and sample grids."""

    prior_seed: int = 0
    """First seed; prior image i uses seed ``prior_seed + i``, so a cache can be extended or resumed."""

    extra_prior_prompts: list[str] = field(default_factory=list)
    """Prompts besides the class prompt whose frozen-model images join the priors, each trained on its
    own prompt (e.g. captions of other things the model draws). ``{class_noun}`` is filled in, so a
    model recipe can list the class in other contexts ("a {class_noun} in the snow"); ``{identifier}``
    is refused (the frozen model does not know it). The class prompt alone keeps only "a [class]";
    these keep what the model's other prompts mean (shapes: other-prompt fidelity 0.57 → 0.89 of the
    base over 8 subjects, benchmarks/recipe_search.py). Empty: class priors only, as in the paper."""

    extra_prior_share: float = 0.5
    """Share of the ``num_class_images`` priors made from ``extra_prior_prompts`` (cycled through,
    spread evenly over the seeds); the rest use the class prompt. Unused without extra prompts."""

    unconditional_prior_share: float = 0.0
    """Share of the ``num_class_images`` priors the frozen model draws for the empty prompt, each trained
    on it (spread evenly over the seeds, beside the extra prompts' share). Guidance g samples with g ×
    conditional − (g − 1) × unconditional prediction, and a fine-tune that never trains the empty prompt
    lets that prediction drift with the subject (shapes: class fidelity 0.83 → 0.98 of the base over
    8 subjects with 16 of 144 priors unconditional, benchmarks/recipe_search.py). SDXL pipelines sample
    with zeroed embeddings for an empty negative prompt (``force_zeros_for_empty_prompt``), so there these
    priors train the encoded empty prompt, a neighbour of what guidance subtracts. 0: none, as in the paper."""

    @property
    def extra_share_used(self) -> float:
        """``extra_prior_share`` where there are extra prompts to use it, else 0."""
        return self.extra_prior_share if self.extra_prior_prompts else 0.0


@dataclass
class TrainConfig:
    """Fine-tuning all layers on Ray Train + DeepSpeed ZeRO."""

    resolution: Optional[int] = None
    """Training (and prior) image side in pixels; subject photos are resized and cropped to it. Unset:
    the model's native size, UNet ``sample_size`` × VAE scale factor from its configs (512 for SD 1.5,
    768 for SD 2.1 768-v, 1024 for SDXL), filled in before anything runs."""

    max_train_steps: int = 400
    """Optimizer steps to train for (each may accumulate several micro-batches)."""

    train_batch_size: int = 1
    """Subject examples per micro-batch per worker; as many prior examples are added (1:1 mix)."""

    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated before each optimizer step."""

    learning_rate: float = 5e-6
    """Peak learning rate of every optimizer (the paper uses 5e-6 for Stable Diffusion)."""

    text_encoder_learning_rate: Optional[float] = None
    """Peak learning rate of the text encoder(s); unset: ``learning_rate``. A lower one keeps what
    the base model's other prompts mean (benchmarks/recipe_search.py); 0 freezes the encoder."""

    lr_scheduler: LrScheduler = "constant"
    """Learning-rate schedule: constant, constant_with_warmup, linear, cosine, polynomial."""

    lr_warmup_steps: int = 0
    """Linear warm-up steps at the start of the schedule."""

    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 disables clipping."""

    adam_weight_decay: float = 1e-2
    """Decoupled weight decay of the optimizer (AdamW's, also applied by adafactor and adamw8bit)."""

    optimizer: OptimizerName = "adamw"
    """adamw (torch AdamW, two fp32 moments per parameter), adafactor (transformers' Adafactor at
    ``learning_rate``, no first moment: at most half of AdamW's optimizer memory, less at ZeRO-0 where it
    factors each matrix's second moment) or adamw8bit (bitsandbytes' 8-bit AdamW, a quarter of AdamW's
    optimizer memory; CUDA GPUs only, needs ``pip install bitsandbytes``)."""

    prior_loss_weight: float = 1.0
    """λ: weight of the prior-preservation term; 0 trains on the subject alone (no priors needed)."""

    train_text_encoder: bool = True
    """Fine-tune the text encoder too (the paper's all-layers setting); false freezes it."""

    train_text_encoder_2: bool = True
    """Fine-tune SDXL's second text encoder (OpenCLIP ViT-bigG) too; false freezes it. Models with one
    text encoder (Stable Diffusion 1.x/2.x) ignore it."""

    mixed_precision: Precision = "no"
    """Training precision: no (fp32), fp16 or bf16 (bf16 recommended on GPUs that have it)."""

    workers: int = 1
    """Ray Train workers (data-parallel ranks), one GPU each where GPUs exist."""

    launcher: Launcher = "auto"
    """Where training runs: ray-train (a Ray Train worker group, restarted on a lost worker),
    in-process (this command's own process: one local worker, no worker group to start), or auto:
    in-process for one worker when no cluster is joined (no RAY_ADDRESS), ray-train otherwise."""

    use_gpu: UseGpu = "auto"
    """Give each worker and prior actor a GPU: auto (if the cluster has GPUs), true or false."""

    cpus_per_worker: float = 1.0
    """CPUs each training worker requests (data loading and, without GPUs, the compute itself)."""

    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3 (0 = plain data parallel; 3 also shards the parameters)."""

    offload_optimizer: bool = False
    """Keep optimizer state in CPU memory (DeepSpeed CPU Adam; builds its extension once)."""

    offload_params: bool = False
    """Keep the parameters in CPU memory between uses (ZeRO-3 parameter offload; needs --zero-stage 3):
    each layer's weights are fetched to the GPU for its forward and backward. Slower steps, for models
    whose weights do not fit even sharded."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (UNet blocks and trained text encoder layers)
    instead of keeping them: much less activation memory, paid for with a second forward pass of each
    block in every backward pass (slower steps)."""

    checkpointing_steps: int = 100
    """Save a resumable checkpoint every this many optimizer steps; 0: none (a lost worker restarts the subject)."""

    max_failures: int = 2
    """Times the worker group is restarted (a lost worker) during one subject's training; each restart
    resumes the subject from its last checkpoint."""

    center_crop: bool = False
    """Crop subject photos at the centre instead of at random positions."""

    random_flip: bool = True
    """Flip subject photos horizontally at random (augmentation)."""

    seed: int = 0
    """Seed of noise, timesteps and augmentation (each rank adds its rank)."""

    log_every: int = 10
    """Log a loss/step-time line every this many optimizer steps."""


@dataclass
class ExportConfig:
    """The finished model: diffusers folder, sample grid and run record."""

    sample_prompts: list[str] = field(
        default_factory=lambda: [
            "a {identifier} {class_noun} on the beach",
            "a {identifier} {class_noun}",
            "a {class_noun}",
        ]
    )
    """Prompts of the sample grid; ``{identifier}`` and ``{class_noun}`` are filled in."""

    num_sample_images: int = 2
    """Images per prompt in the sample grid."""

    keep_checkpoints: bool = False
    """Keep ``<output>/checkpoints`` after a successful export (they hold optimizer state)."""

    before_after: bool = True
    """Also write ``before_after.png``: each sample prompt by the base model (left half) and the
    personalized model (right half), same seeds."""

    save_dtype: SaveDtype = "fp16"
    """Precision of the exported UNet and text encoder weights: fp16 (half the bytes of fp32), bf16
    or fp32. Training precision is unchanged; the VAE is kept as the base model has it."""

    validation_steps: int = 0
    """Render the sample prompts every this many steps into ``validation/step-<N>.png`` (the same
    seeds each time, so grids compare across steps); 0: never."""

    report_to: ReportTo = "none"
    """Experiment tracking of losses, learning rate, step time, validation grids, the config and
    later ``eval`` measures: none, tensorboard (``<output>/logs/tensorboard``), mlflow
    (MLFLOW_TRACKING_URI, else a file store in ``<output>/logs/mlruns``) or wandb (installed and logged in)."""


@dataclass
class RunConfig:
    """Everything one personalization run needs, validated once."""

    model: str = ""
    """Base model (required): a local diffusers folder, a hub id such as
    ``stable-diffusion-v1-5/stable-diffusion-v1-5``, or a built-in name, used only when named
    (``shapes``: pretrained on the shapes world; ``tiny``: random weights, for pipeline tests)."""

    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) of ``model``; ignored for local folders."""

    output: str = ""
    """Where the personalized pipeline, grid and run record go (local path or fsspec URI)."""

    overwrite: bool = False
    """Redo a run whose output is already complete: what that run wrote is removed first (other files stay)."""

    subject: SubjectConfig = field(default_factory=SubjectConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    sources: dict[str, str] = field(default_factory=dict, compare=False, metadata={"settable": False})
    """Where each field set by a layer came from (model recipe, config file, flags...); the rest are defaults."""

    @property
    def prior_root(self) -> str:
        """The prior cache root: ``prior_output``, or ``<parent of output>/priors``."""
        if self.prior.prior_output:
            return self.prior.prior_output.rstrip("/")
        parent = self.output.rstrip("/").rsplit("/", 1)[0] if "/" in self.output.rstrip("/") else "."
        return f"{parent}/priors"

    def sample_prompts(self) -> list[str]:
        return [
            p.format(identifier=self.subject.identifier, class_noun=self.subject.class_noun)
            for p in self.export.sample_prompts
        ]

    def to_dict(self) -> dict[str, Any]:
        """The settings (what ``--config`` reads back), without their provenance."""
        settings = dataclasses.asdict(self)
        settings.pop("sources")
        return settings

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS: dict[str, type] = {
    "subject": SubjectConfig,
    "prior": PriorConfig,
    "train": TrainConfig,
    "export": ExportConfig,
}


# --------------------------------------------------------------------------- field catalogue


@dataclass(frozen=True)
class FieldInfo:
    """One settable field: where it lives, its type and its docstring."""

    section: Optional[str]  # None for top-level RunConfig fields
    name: str
    type: Any
    default: Any
    doc: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal under each field), read from the class source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(getattr(nxt, "value", None), ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _fields_of(cls: type, section: Optional[str]) -> list[FieldInfo]:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in SECTIONS or not f.metadata.get("settable", True):
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out.append(FieldInfo(section, f.name, hints[f.name], default, docs.get(f.name, "")))
    return out


@cache
def all_fields() -> dict[str, FieldInfo]:
    """Every settable field by name (names are unique across sections)."""
    fields = _fields_of(RunConfig, None)
    for section, cls in SECTIONS.items():
        fields += _fields_of(cls, section)
    by_name = {f.name: f for f in fields}
    assert len(by_name) == len(fields), "config field names must be unique across sections"
    return by_name


# --------------------------------------------------------------------------- building


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_LIST_ITEMS = 64
"""Entries a list setting accepts (each sample prompt renders a row of the grid)..."""
MAX_LIST_ITEMS_OF = {"extra_prior_prompts": 4096}
"""... except these, whose entries only name what some prior images show."""


def _coerce(info: FieldInfo, value: Any, source: str) -> Any:
    """Check/convert one value to its field's type; errors name the field and the source."""
    tp = info.type
    optional = typing.get_origin(tp) is typing.Union and type(None) in typing.get_args(tp)
    if optional:
        if value is None:
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    where = f"'{info.name}' ({source})"
    shown = shorten(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "yes", "no", "1", "0"}:
            return value.lower() in {"true", "yes", "1"}
        raise ConfigError(f"{where} must be true or false, got {shown}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and len(value) > 20):
            raise ConfigError(f"{where} must be an integer, got {shown}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where} must be an integer, got {shown}") from None
    if tp is float:
        if isinstance(value, bool) or (isinstance(value, str) and len(value) > 40):
            raise ConfigError(f"{where} must be a number, got {shown}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {shown}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{where} must be a finite number, got {shown}")
        return number
    if tp is str or typing.get_origin(tp) is Literal:  # a Literal's choice is checked by ``validate``
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{where} must be a string, got {shown}")
        return _checked_text(str(value), where)
    if typing.get_origin(tp) is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of strings, got {shown}")
        limit = MAX_LIST_ITEMS_OF.get(info.name, MAX_LIST_ITEMS)
        if len(value) > limit:
            raise ConfigError(f"{where} has {len(value)} entries; at most {limit} are accepted")
        return [_checked_text(v, where) for v in value]
    raise TypeError(f"unsupported config type {tp} for {info.name}")  # a bug, not user input


def _checked_text(text: str, where: str) -> str:
    if len(text) > MAX_TEXT_FIELD:
        raise ConfigError(f"{where} is {len(text):,} characters long; at most {MAX_TEXT_FIELD} are accepted")
    bad = _CONTROL.search(text)
    if bad:
        raise ConfigError(f"{where} contains a control character ({bad.group()!r}) in {shorten(text)}; "
                          "remove line breaks, tabs and other control characters")
    return text


def _unknown_key(key: str, source: str) -> ConfigError:
    names = list(all_fields()) + list(SECTIONS)
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(sorted(names))}"
    return ConfigError(f"unknown config key '{key}' in {source}{hint}")


def flatten(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Turn nested-or-flat YAML data into ``{field_name: value}``, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping of config keys, got {type(data).__name__}")
    flat: dict[str, Any] = {}
    fields = all_fields()
    for key, value in data.items():
        key = str(key).replace("-", "_")
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"section '{key}' in {source} must be a mapping")
            for sub_key, sub_value in value.items():
                sub_key = str(sub_key).replace("-", "_")
                info = fields.get(sub_key)
                if info is None or info.section != key:
                    raise _unknown_key(f"{key}.{sub_key}" if info is None else sub_key, source)
                flat[sub_key] = sub_value
        elif key in fields:
            flat[key] = value
        else:
            raise _unknown_key(key, source)
    return flat


def build_config(*layers: tuple[dict[str, Any], str]) -> RunConfig:
    """Build a RunConfig from flat ``{field: value}`` layers, later layers winning.

    Each layer comes with a source name for error messages (a file path, "flags", ...).
    """
    cfg = RunConfig()
    fields = all_fields()
    for values, source in layers:
        for name, value in values.items():
            info = fields.get(name)
            if info is None:
                raise _unknown_key(name, source)
            target = cfg if info.section is None else getattr(cfg, info.section)
            setattr(target, name, _coerce(info, value, source))
            cfg.sources[name] = source
    return cfg


CONFIG_YAML_NODES = 100_000
"""Largest config file in YAML nodes after alias expansion (a config has a few dozen keys)."""


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML config file (``--config``) into flat ``{field: value}``."""
    try:
        data = load_yaml_file(path, "config file", MAX_CONFIG_BYTES, CONFIG_YAML_NODES) if Path(path).is_file() else None
    except InputError as exc:
        raise ConfigError(str(exc)) from None
    if data is None and not Path(path).is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
    return flatten(data or {}, path)


# --------------------------------------------------------------------------- validation

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
    check_range(t.checkpointing_steps, 0, 10_000_000, "--checkpointing-steps", " (0 = no checkpoints)")
    check_range(t.max_failures, 0, 1000, "--max-failures")
    check_range(t.seed, 0, MAX_SEED, "--seed")
    check_range(t.log_every, 1, 10_000_000, "--log-every")
    _check(
        t.prior_loss_weight == 0 or cfg.prior.num_class_images >= 1,
        "--num-class-images must be >= 1 when --prior-loss-weight > 0 (prior preservation needs class images)",
    )
    check_range(cfg.export.num_sample_images, 0, 64, "--num-sample-images")
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


def reference_markdown() -> str:
    """The config reference table of the README, generated from the dataclasses' docstrings."""
    lines = ["| YAML key (section) | flag | default | meaning |", "|---|---|---|---|"]
    for info in all_fields().values():
        key = info.name if info.section is None else f"{info.section}.{info.name}"
        default = "; ".join(info.default) if isinstance(info.default, list) else info.default
        shown = f"`{default}`" if default not in ("", None) else "(empty)" if default == "" else "(none)"
        lines.append(f"| `{key}` | `{info.flag}` | {shown} | {info.doc.replace('|', '/')} |")
    return "\n".join(lines)
