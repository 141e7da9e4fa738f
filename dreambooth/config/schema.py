"""The run's typed configuration: one dataclass per section (subject, prior, train, export) with a docstring
per field, and the field catalogue (name, section, flag, type, default, doc) that flags, YAML keys and the
README's reference table are built from."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal, Optional

import yaml



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
    """Classifier-free guidance scale for prior generation (and sample grids unless
    ``export.sample_guidance_scale`` sets their own)."""

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

    snr_gamma: Optional[float] = None
    """Min-SNR-γ loss weighting (Hang et al., 2023; diffusers' ``--snr_gamma``, 5.0 recommended): each
    example's MSE is weighted by min(SNR(t), γ) / SNR(t) (ε-prediction; / (SNR(t) + 1) for v-prediction),
    so nearly noise-free timesteps, whose targets are easy, pull the weights less. Unset: plain MSE.
    (On the ``shapes`` model γ = 5 learned less of the subject and kept no more of the rest:
    benchmarks/RESULTS.md, round 16.)"""

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

    bare_prompt_with_captions: bool = False
    """A photo with a caption (``.txt`` beside it) trains on the caption and on the bare instance
    prompt, half the time each, instead of on its caption only: the bare "a [V] [class]" stays the
    identifier's anchor while the captions bind the subject to the places and backgrounds they name.
    Photos without a caption train on the bare prompt as before, each photo drawn as often as the others."""

    background_swap: float = 0.0
    """Share of subject examples drawn as a copy of the photo with its plain backdrop repainted in another
    colour (``training.backgrounds``), on the bare instance prompt: photos that share a backdrop otherwise
    teach it with the subject, and "a [V] [class] on the beach" loses the subject. Needs every photo on a
    plain backdrop (refused before training otherwise). Shapes, photos on 2 backgrounds (benchmarks/RESULTS.md,
    round 20, 8 runs): 0.25 showed the subject on backgrounds no photo shows 0.10 ± 0.05 more often (its gap
    to the bare prompt −0.35 → −0.17), at subject fidelity 0.82 → 0.77 and the bare prompt −0.07 (on one
    new subject no gain: 0.53 vs 0.58, the bare prompt 0.69 vs 1.00); with each photo on a backdrop of
    its own it did not help (−0.06 ± 0.03 on the one background none shows). 0: off, as in the paper."""

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

    sample_guidance_scale: Optional[float] = None
    """Classifier-free guidance of the run's sample grids (``before_after.png``, validation grids) and
    the default of ``dreambooth sample`` and ``dreambooth eval`` on its output (set in a model's recipe:
    also of ``sample`` on that model); None: the priors' ``guidance_scale``, so a recipe that sets it
    keeps it when ``--guidance-scale`` changes the priors'. The priors need a guidance that draws the
    class cleanly; the personalized model may draw its subject truer at a lower one (shapes: 2 against
    the priors' 4)."""

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

    @property
    def sample_guidance_scale(self) -> float:
        """The guidance the run's grids are sampled at: ``export.sample_guidance_scale``, else the priors'."""
        if self.export.sample_guidance_scale is not None:
            return self.export.sample_guidance_scale
        return self.prior.guidance_scale

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
