"""Base models: resolve a ``--model`` value, load its components, build the built-in ``tiny``/``tiny-sdxl``.

Owns: what counts as a model (a local diffusers folder, a hub id, or a built-in name), the check
that a model exists (run before any Ray work), and loading the components training and generation
need through the model's family (``dreambooth.families``). Knows nothing of Ray or DeepSpeed.

Built-in models: ``tiny`` and ``tiny-sdxl`` (random weights, SD and SDXL layouts) are materialized once per machine into
``$DREAMBOOTH_CACHE/models/<name>`` (default ``~/.cache/dreambooth``) from a fixed seed, so every
process and node sees identical weights; ``shapes`` (pretrained on the shapes world) ships as
package data in ``dreambooth/data/shapes``.
"""

from __future__ import annotations

import dataclasses

import os
import shutil
import tempfile
from importlib import resources
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import torch

from dreambooth.config import ConfigError
from dreambooth.families import Components, ModelFamily, family_of  # noqa: F401  (Components: re-exported)

TOKENIZER_DIR = Path(str(resources.files("dreambooth") / "data" / "clip_tokenizer"))
CLIP_VOCAB_SIZE = 49408


def quiet_libraries() -> None:
    """Silence per-file progress bars and advisory warnings of diffusers/transformers/hub.

    Called in every process that loads models (CLI, training workers, generation actors): their
    "Loading weights" bars would otherwise drown the run's own progress lines.
    """
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import diffusers
    import huggingface_hub
    import transformers

    huggingface_hub.utils.disable_progress_bars()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("diffusers", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def cache_root() -> Path:
    return Path(os.environ.get("DREAMBOOTH_CACHE", Path.home() / ".cache" / "dreambooth"))


def load_clip_tokenizer(path: str | Path = TOKENIZER_DIR):
    """The real CLIP tokenizer from a folder with vocab.json + merges.txt.

    Loaded with ``from_pretrained(folder)``: passing the two files as keyword arguments
    (``vocab_file``/``merges_file``) is silently ignored by transformers 5.24, which then yields a
    2-token vocabulary and identical ids for every caption.
    """
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(path), model_max_length=77)
    if len(tokenizer) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"CLIP tokenizer at {path} has {len(tokenizer)} tokens, expected {CLIP_VOCAB_SIZE}")
    return tokenizer


def _tiny_vae():
    """VAE (32, 64 channels; 4 latent channels, downsamples 2x) shared by the tiny built-ins."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=32,
    )


def _tiny_scheduler():
    """Stable Diffusion's DDPM training schedule (scaled-linear betas, 1000 steps)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, clip_sample=False, steps_offset=1)


def _tiny_clip_config(hidden_size: int, **extra):
    """A 2-layer CLIP text config over the real CLIP vocabulary and 77 positions."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=37,
                          num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, **extra)


TINY_UNET_LAYOUT = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=32,
    norm_num_groups=32,
)
"""The UNet blocks of ``tiny`` and ``tiny-sdxl`` (their conditioning differs)."""


def build_tiny(target: Path) -> None:
    """A tiny Stable-Diffusion-layout pipeline with random weights, fast on 2 CPU cores.

    UNet 2 blocks (32, 64 channels, 2 heads of 32), VAE (32, 64; 4 latent channels, downsamples 2x),
    CLIP text encoder (hidden 32, 2 layers, 77 positions) with the real CLIP tokenizer, DDPM schedule.
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET_LAYOUT, cross_attention_dim=32)
    vae = _tiny_vae()
    text_encoder = CLIPTextModel(_tiny_clip_config(32))
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_clip_tokenizer(),
        scheduler=_tiny_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(target), safe_serialization=True)


TINY_SDXL_TIME_EMBED_DIM = 8
"""Fourier features per size number of ``tiny-sdxl``'s ``time_ids`` (SDXL base: 256)."""


def build_tiny_sdxl(target: Path) -> None:
    """A tiny SDXL-layout pipeline with random weights, fast on 2 CPU cores.

    As SDXL base, scaled down: UNet 2 blocks (32, 64 channels, linear projections, 2 heads of 32)
    with ``text_time`` added conditioning; ``text_encoder`` a CLIPTextModel of hidden 32 and
    ``text_encoder_2`` a CLIPTextModelWithProjection of hidden 64 (projection 32), both 2 layers over
    77 positions and the real CLIP tokenizer, so cross-attention sees 32 + 64 = 96 channels and the
    added embedding 6 x 8 Fourier features + 32 pooled; the tiny SD VAE and DDPM schedule.
    """
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    encoder_1, encoder_2 = _tiny_clip_config(32), _tiny_clip_config(64, projection_dim=32)
    unet = UNet2DConditionModel(
        **TINY_UNET_LAYOUT,
        cross_attention_dim=encoder_1.hidden_size + encoder_2.hidden_size,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TINY_SDXL_TIME_EMBED_DIM + encoder_2.projection_dim,
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(encoder_1),
        text_encoder_2=CLIPTextModelWithProjection(encoder_2),
        tokenizer=load_clip_tokenizer(),
        tokenizer_2=load_clip_tokenizer(),
        scheduler=_tiny_scheduler(),
        add_watermarker=False,
    )
    pipe.save_pretrained(str(target), safe_serialization=True)


BUILTIN_MODELS: dict[str, Callable[[Path], None]] = {"tiny": build_tiny, "tiny-sdxl": build_tiny_sdxl}
# Bump when a builder changes, so stale caches are rebuilt rather than reused.
BUILTIN_VERSION = "1"
#: Built-in models shipped as trained weights inside the package (see ``dreambooth.shapes.basemodel``).
SHIPPED_MODELS: dict[str, Path] = {"shapes": Path(str(resources.files("dreambooth") / "data" / "shapes"))}
BUILTIN_NAMES = (*BUILTIN_MODELS, *SHIPPED_MODELS)


def _materialize_builtin(name: str) -> Path:
    target = cache_root() / "models" / f"{name}-v{BUILTIN_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        BUILTIN_MODELS[name](staging)
        try:
            staging.rename(target)
        except OSError:  # another process won the race; its copy is identical
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def local_model_folder(model: str) -> Optional[Path]:
    """``model`` as the local folder ``resolve_model`` would load (not made absolute), or None for a built-in
    name or a hub id."""
    if not model or model in BUILTIN_NAMES:
        return None
    local = Path(model).expanduser()
    return local if local.exists() else None


def resolve_model(model: str, revision: Optional[str] = None) -> str:
    """Return a path or hub id that ``from_pretrained`` accepts, or raise ConfigError.

    Order: built-in name, local folder with ``model_index.json``, hub id (checked by fetching
    ``model_index.json``, which also works offline when the hub cache has it).
    """
    if model in BUILTIN_MODELS:
        return str(_materialize_builtin(model))
    if model in SHIPPED_MODELS:
        folder = SHIPPED_MODELS[model]
        if not (folder / "model_index.json").is_file():
            raise ConfigError(
                f"--model {model}: this installation lacks the shipped weights in {folder}; "
                "reinstall the package, or rebuild them with `python -m ray_jobs.pretrain_shapes --ship`"
            )
        return str(folder)
    local = local_model_folder(model)
    if local is not None:
        if not (local / "model_index.json").is_file():
            raise ConfigError(
                f"--model {model}: the folder has no model_index.json; pass a diffusers pipeline folder "
                "(saved with save_pretrained) or a built-in name: " + ", ".join(BUILTIN_NAMES)
            )
        return str(local.absolute())  # the training workers load it from another working directory
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise ConfigError(
            f"--model {model!r} is not a built-in name ({', '.join(BUILTIN_NAMES)}), not an existing "
            "folder, and not a hub id of the form 'org/name'"
        )
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(model, "model_index.json", revision=revision)
    except Exception as exc:  # offline, unknown repo, gated, ...: all mean "cannot use it"
        raise ConfigError(
            f"--model {model!r}: cannot read model_index.json from the hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Check the id and revision, log in for gated "
            "models, or download the pipeline and pass its local folder"
        ) from None
    return model


RECIPE_FILE = "dreambooth.yaml"
"""A model's recommended run settings, beside its ``model_index.json`` (keys as in a ``--config`` file)."""
RECIPE_SECTIONS = ("train", "prior", "export")
"""What a recipe may set: how to train, generate priors and sample — never a subject or an output."""
WITHOUT_CAPTIONS = "without_captions"
"""A recipe's section of settings (``train``/``prior``/``export`` keys) that replace its own when none of a
subject's photos has a caption: a recipe measured on captioned photos says what it was measured with on bare
ones (the ``shapes`` recipe trains each photo on its caption and on the bare prompt, for twice the steps)."""


def recipe_source(model: str, without_captions: bool = False) -> str:
    """How ``config_sources`` names a setting that ``model``'s recipe gave."""
    section = f", {WITHOUT_CAPTIONS}: no photo has a caption" if without_captions else ""
    return f"the {model} model's recipe ({RECIPE_FILE}{section})"


def read_recipe(model_path: str, revision: Optional[str] = None, *, captioned: bool = True) -> dict:
    """The flat settings of ``model_path``'s recipe file; {} when it has none (or the hub cannot say).
    ``captioned=False``: with its ``without_captions`` section over them, for photos that have no caption."""
    from dreambooth.config import all_fields, flatten, load_yaml_document

    local = Path(model_path)
    if local.is_dir():
        path = local / RECIPE_FILE
        if not path.is_file():
            return {}
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(model_path, RECIPE_FILE, revision=revision))
        except Exception:  # most hub models have no recipe; offline without it cached is the same answer
            return {}
    document = load_yaml_document(str(path))
    if not isinstance(document, dict):
        raise ConfigError(f"{path} must be a mapping of config keys, got {type(document).__name__}")
    document = {str(key).replace("-", "_"): value for key, value in document.items()}
    uncaptioned = document.pop(WITHOUT_CAPTIONS, None)
    where = f"{path}, section {WITHOUT_CAPTIONS}"
    recipe, overrides = flatten(document, str(path)), flatten({} if uncaptioned is None else uncaptioned, where)
    fields = all_fields()
    for settings, source in ((recipe, str(path)), (overrides, where)):
        outside = sorted(key for key in settings if fields[key].section not in RECIPE_SECTIONS)
        if outside:
            raise ConfigError(f"{source}: a model recipe sets only {', '.join(RECIPE_SECTIONS)} settings; "
                              f"remove {', '.join(outside)}")
    # Only what the recipe itself sets can give way (anything else may have come from a config file or a
    # flag), and the photos are read at the resolution before the section is known.
    unanchored = sorted(key for key in overrides if key not in recipe or key == "resolution")
    if unanchored:
        raise ConfigError(f"{where} may only replace settings the recipe sets above it (not the resolution the "
                          f"photos are read at); set {', '.join(unanchored)} in the recipe too, or remove it here")
    return recipe if captioned else {**recipe, **overrides}


@lru_cache(maxsize=16)
def _recipe_of(model: str, revision: Optional[str], captioned: bool = True) -> dict:
    """``read_recipe`` of a ``--model`` value, once per process (bulk plans thousands of subjects)."""
    return read_recipe(resolve_model(model, revision), revision, captioned=captioned)


def with_recipe_for_photos(cfg, images):
    """``cfg`` (a ``RunConfig`` whose model resolves), or a copy whose recipe-given settings are the
    recipe's ``without_captions`` ones when none of ``images`` (``SubjectImage``) has a caption, each
    recorded in ``sources``; settings a config file or flag gave stay. ``cfg`` is not written."""
    from dreambooth.config import with_layer

    if not cfg.model or any(image.caption is not None for image in images):
        return cfg
    left_to_the_photos = settings_for_photos(cfg)
    if not left_to_the_photos:
        return cfg
    uncaptioned = _recipe_of(cfg.model, cfg.revision, captioned=False)
    changed = {key: uncaptioned[key] for key in left_to_the_photos}
    return with_layer(cfg, changed, recipe_source(cfg.model, without_captions=True))


NATIVE_RESOLUTION_SOURCE = "the {model} model's native size (UNet sample_size x VAE scale factor)"
"""``config_sources`` entry of a resolution that no layer set."""


def native_resolution_layer(model: str) -> tuple[dict, str]:
    """``({"resolution": native}, source)``: the image side ``model`` was trained at, read from its UNet
    and VAE ``config.json`` without loading weights (``planning.architectures``)."""
    from dreambooth.config import validate_resolution
    from dreambooth.planning.architectures import load_architecture

    resolution = load_architecture(model).native_resolution
    validate_resolution(resolution, f"the native size of {model}")
    return {"resolution": resolution}, NATIVE_RESOLUTION_SOURCE.format(model=model)


def with_native_resolution(cfg):
    """``cfg`` (a ``RunConfig`` whose model resolves), or a copy whose unset ``--resolution`` is the
    model's native size, with where it came from in ``sources``; ``cfg`` is not written."""
    if cfg.train.resolution is not None:
        return cfg
    values, source = native_resolution_layer(cfg.model)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resolution=values["resolution"]),
                               sources={**cfg.sources, "resolution": source})


def settings_for_photos(cfg) -> set[str]:
    """The settings of ``cfg`` its model's recipe gave that ``with_recipe_for_photos`` may still change once the
    photos are read: a job planned where the photos are not (``submit``) leaves them to the cluster."""
    given_by_recipe = recipe_source(cfg.model)
    if not cfg.model or given_by_recipe not in cfg.sources.values():  # built without the recipe layer
        return set()
    try:
        uncaptioned = _recipe_of(cfg.model, cfg.revision, captioned=False)
        captioned = _recipe_of(cfg.model, cfg.revision)
    except ConfigError:
        return set()
    return {key for key, value in uncaptioned.items()
            if captioned.get(key) != value and cfg.sources.get(key) == given_by_recipe}


def with_recipe(*layers: tuple[dict, str]) -> list[tuple[dict, str]]:
    """``layers`` with the model's recipe under them (native resolution < recipe < config file < flags),
    when the model they name has one. A model that cannot be resolved adds nothing here: preflight reports it."""
    from dreambooth.config import build_config

    probe = build_config(*layers)
    if not probe.model:
        return list(layers)
    try:
        recipe = _recipe_of(probe.model, probe.revision)
    except ConfigError as exc:
        if RECIPE_FILE in str(exc):
            raise
        return list(layers)
    try:
        native = [native_resolution_layer(probe.model)]
    except ConfigError:  # configs unreadable here (preflight tries again, once the model resolves)
        native = []
    return native + ([(recipe, recipe_source(probe.model))] if recipe else []) + list(layers)


def scheduler_class_name(model_path: str) -> str:
    """The sampler a pipeline ships with (part of the prior cache key)."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.load_config(model_path)["scheduler"][1]


def load_sampling_scheduler(model_path: str, revision: Optional[str] = None):
    """The sampler the pipeline ships with (what ``from_pretrained`` of the pipeline would build)."""
    import diffusers

    kw = {"revision": revision} if revision else {}
    return getattr(diffusers, scheduler_class_name(model_path)).from_pretrained(model_path, subfolder="scheduler", **kw)


def model_family(model_path: str, revision: Optional[str] = None) -> ModelFamily:
    """The family (SD 1.x/2.x or SDXL) of a resolved model, from its ``model_index.json``."""
    return family_of(model_path, revision)


def load_components(model_path: str, revision: Optional[str] = None) -> Components:
    """Load the model's tokenizers, text encoders, UNet, VAE (all fp32) and DDPM training scheduler."""
    return family_of(model_path, revision).load_components(model_path, revision)


def load_pipeline(model_path: str, revision: Optional[str] = None, device: str = "cpu", dtype=torch.float32):
    """A ready-to-sample pipeline of the model's family (safety checker off: research use, tiny models)."""
    return family_of(model_path, revision).load_pipeline(model_path, revision, device, dtype)
