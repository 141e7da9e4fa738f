"""Export: the personalized diffusers pipeline, its sample grid, and the run record (last).

Output layout (``<output>/``)::

    model_index.json, unet/, text_encoder/, vae/, tokenizer/, scheduler/    the pipeline (safetensors;
                      SDXL adds text_encoder_2/ and tokenizer_2/)
    config.yaml       the exact, resolved config of the run
    samples.png       grid: rows = sample prompts (subject in context, subject, bare class for drift),
                      each row under its prompt; small images enlarged (nearest neighbour)
    before_after.png  the same prompts and seeds under "base" (left) and "personalized" (right)
    validation/       step-<N>.png: the sample prompts every --validation-steps steps (fixed seeds)
    loss.png          instance and prior loss and the learning rate per step
    run.json          identifier, class, prompts, config, metrics, timings — written last

``run.json`` is the completion marker: an output without it is unfinished, whatever else it holds.
The folder loads with its family's plain pipeline class and no project code:
``StableDiffusionPipeline.from_pretrained(output)`` or ``StableDiffusionXLPipeline.from_pretrained(output)``.

A run owns only the entries it writes (``owned_entries``); ``--overwrite`` removes those and
nothing else, so files a user keeps in the output folder survive a re-run.
"""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from dreambooth import storage
from dreambooth.config import RunConfig

RUN_RECORD = "run.json"
GRID = "samples.png"
BEFORE_AFTER = "before_after.png"
CONFIG = "config.yaml"
VALIDATION = "validation"
LOSS_PLOT = "loss.png"
LOGS = "logs"


EVAL_RECORD = "eval.json"
CHECKPOINTS = "checkpoints"
PIPELINE_INDEX = "model_index.json"
TRAINER_STORAGE = ".ray-train"
"""Ray Train's own run folder during training (the worker groups' state; removed at the end)."""
RUN_FILES = (RUN_RECORD, EVAL_RECORD, GRID, BEFORE_AFTER, CONFIG, PIPELINE_INDEX, CHECKPOINTS, TRAINER_STORAGE,
             VALIDATION, LOSS_PLOT, LOGS)
"""Entries every run may write at the top of its output (pipeline components are read from the index)."""

PIPELINE_COMPONENTS = frozenset({
    "unet", "text_encoder", "text_encoder_2", "vae", "tokenizer", "tokenizer_2", "scheduler",
    "safety_checker", "feature_extractor", "image_encoder",
})
"""Component folders a saved diffusers pipeline may have; only these are ever removed."""


SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def folder_bytes(folder: Path) -> dict[str, int]:
    """Bytes of a saved pipeline: ``total`` and per component folder."""
    sizes = {"total": 0}
    for path in Path(folder).rglob("*"):
        if path.is_file():
            size = path.stat().st_size
            sizes["total"] += size
            top = path.relative_to(folder).parts[0]
            if path.parent != Path(folder):
                sizes[top] = sizes.get(top, 0) + size
    return sizes


def is_complete(output: str) -> bool:
    return storage.exists(storage.join(output, RUN_RECORD))


def read_run_record(output: str) -> dict:
    """The run record of a complete output; a damaged one is an error that says how to redo the run."""
    from dreambooth.config import ConfigError

    uri = storage.join(output, RUN_RECORD)
    try:
        record = storage.read_json(uri)
    except ValueError as exc:
        raise ConfigError(f"{uri} is damaged ({exc}); pass --overwrite to train this subject again") from None
    if not isinstance(record, dict):
        raise ConfigError(f"{uri} is not a run record; pass --overwrite to train this subject again")
    return record


def owned_entries(output: str) -> list[str]:
    """Names in ``output`` that a run wrote: ``RUN_FILES`` plus the component folders its
    ``model_index.json`` lists (unet, text_encoder, vae, tokenizer, scheduler, ...)."""
    names = list(RUN_FILES)
    index = storage.join(output, PIPELINE_INDEX)
    if storage.exists(index):
        try:
            components = storage.read_json(index)
        except ValueError:  # a damaged index: its components are still ours to replace
            components = dict.fromkeys(PIPELINE_COMPONENTS)
        names += sorted(PIPELINE_COMPONENTS & set(components if isinstance(components, dict) else {}))
    return names


def remove_run_outputs(output: str) -> list[str]:
    """Delete what an earlier run wrote in ``output`` (the completion marker first), and nothing else.

    Returns the names removed. Anything else in the folder (the user's files) is left as it is.
    """
    removed = []
    for name in owned_entries(output):  # RUN_RECORD first: a half-removed output never looks complete
        uri = storage.join(output, name)
        if storage.exists(uri):
            storage.remove(uri)
            removed.append(name)
    return removed


def export_trained(cfg: RunConfig, base, sampling_scheduler, trained_state: dict[str, torch.Tensor], device) -> dict:
    """Save the base VAE/tokenizers/scheduler + the trained UNet/text encoders to ``cfg.output`` and render the grids.

    Runs on the training worker that holds the weights (rank 0), so nothing is loaded again:
    ``base`` is a ``models.Components`` with the untouched base weights (for the "before" half of
    ``before_after.png``), ``trained_state`` the full state dict of the ``DreamBoothModule``
    (``unet.*``, ``text_encoder.*``[, ``text_encoder_2.*``] keys, fp32). The model family saves the
    pipeline (``ModelFamily.save_pretrained``). Returns {"grid", "seconds", "output_bytes"}.
    """
    from dreambooth.sample import labelled_grid, png_bytes, render_rows

    start = time.monotonic()
    settings = grid_settings(cfg)
    sampling = cfg.export.num_sample_images > 0
    before = None
    if sampling and cfg.export.before_after:
        base_pipe = base.pipeline(sampling_scheduler).to(device)
        before = render_rows(base_pipe, cfg.sample_prompts(), **settings)
        base_pipe.to("cpu")
    pipe = base.pipeline(sampling_scheduler, **trained_modules(base, trained_state, "cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "pipeline"
        base.family.save_pretrained(pipe, staged, SAVE_DTYPES[cfg.export.save_dtype])  # the grid shows the saved weights
        output_bytes = folder_bytes(staged)
        storage.upload_dir(staged, cfg.output)
    after = render_rows(pipe.to(device), cfg.sample_prompts(), **settings) if sampling else None
    pipe.to("cpu")  # the VAE is shared with the base components, which live on the CPU
    grid_uri = storage.join(cfg.output, GRID)
    if after is not None:
        storage.write_bytes_atomic(grid_uri, png_bytes(labelled_grid(cfg.sample_prompts(), [("", after)])[0]))
    if before is not None:
        pair = labelled_grid(cfg.sample_prompts(), [("base", before), ("personalized", after)])[0]
        storage.write_bytes_atomic(storage.join(cfg.output, BEFORE_AFTER), png_bytes(pair))
    storage.write_bytes_atomic(storage.join(cfg.output, CONFIG), cfg.to_yaml().encode())
    return {"grid": grid_uri if after is not None else None, "seconds": time.monotonic() - start,
            "output_bytes": output_bytes}


def trained_modules(base, trained_state: dict[str, torch.Tensor], device) -> dict[str, torch.nn.Module]:
    """Copies of the base trainable modules (``unet``, text encoders) on ``device``, by component
    name, holding a ``DreamBoothModule`` state dict."""
    import copy

    modules = {}
    for name, base_module in base.trainable().items():
        module = copy.deepcopy(base_module).to(device)
        prefix = name + "."
        module.load_state_dict({k.removeprefix(prefix): v for k, v in trained_state.items() if k.startswith(prefix)})
        modules[name] = module
    return modules


def grid_settings(cfg: RunConfig) -> dict:
    """How every grid of a run samples: its seed, the prior sampler's steps, the run's sample guidance, its
    resolution."""
    return dict(num_images=max(1, cfg.export.num_sample_images), seed=cfg.train.seed,
                num_inference_steps=cfg.prior.num_inference_steps, guidance_scale=cfg.sample_guidance_scale,
                resolution=cfg.train.resolution)


def write_validation_grid(cfg: RunConfig, base, sampling_scheduler, trained: dict[str, torch.nn.Module], step: int,
                          device):
    """``validation/step-<step>.png`` from the modules being trained (``trained``: by component name,
    left in the mode they had); returns the grid image (for experiment tracking)."""
    from dreambooth.sample import labelled_grid, png_bytes, render_rows

    modes = {name: module.training for name, module in trained.items()}
    for module in trained.values():
        module.eval()
    try:
        rows = render_rows(base.pipeline(sampling_scheduler, **trained), cfg.sample_prompts(), **grid_settings(cfg))
    finally:
        for name, module in trained.items():
            module.train(modes[name])
    grid, _ = labelled_grid([f"step {step}: {p}" for p in cfg.sample_prompts()], [("", rows)])
    storage.write_bytes_atomic(storage.join(cfg.output, VALIDATION, f"step-{step}.png"), png_bytes(grid))
    return grid


def write_loss_plot(output: str, curve: dict[str, list]) -> Optional[str]:
    """``loss.png``: total, instance and prior loss per step above the learning rate (None without steps)."""
    if not curve.get("step"):
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display: render to a file
    from matplotlib import pyplot as plt

    figure, (losses, rates) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, height_ratios=(3, 1))
    for key, label in (("loss", "total"), ("instance_loss", "instance (subject)"), ("prior_loss", "prior (class)")):
        losses.plot(curve["step"], curve[key], label=label, linewidth=1)
    losses.set_ylabel("loss")
    losses.legend()
    losses.set_title(f"steps {curve['step'][0]}-{curve['step'][-1]} of this attempt")
    rates.plot(curve["step"], curve["lr"], color="grey", linewidth=1)
    rates.set_ylabel("learning rate")
    rates.set_xlabel("optimizer step")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    uri = storage.join(output, LOSS_PLOT)
    storage.write_bytes_atomic(uri, buffer.getvalue())
    return uri


def write_run_record(output: str, record: dict) -> str:
    """The completion marker; call it last."""
    uri = storage.join(output, RUN_RECORD)
    storage.write_json_atomic(uri, record)
    return uri
