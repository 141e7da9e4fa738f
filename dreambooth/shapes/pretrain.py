"""Pretrain the ``shapes`` base model on a 2-core CPU, resumably, in two stages.

Owns the pretraining recipe: the training set (scenes from the world, with 20 % of the
(shape, colour, background) triples held out for measuring), caption variants, the VAE stage, the
text-to-image stage (UNet + CLIP text encoder trained together through ``DreamBoothModule`` and
``mixed_batch_loss``, the same code personalization uses), EMA, periodic accuracy on held-out
captions, checkpoints every few minutes, and the export of the EMA weights as a pipeline.

Stages, each resumed from ``<output>/checkpoint.pt`` where a previous run stopped::

    1 vae    images [B, 3, 32, 32] in [-1, 1], half plain scenes, half patterned objects
             -> reconstruction MSE + kl_weight * KL
    2 text-to-image
             cached VAE posteriors of every training image (mean, std: [N, 4, 8, 8]); each step
             samples latents, a caption variant per image (10 % empty, for classifier-free
             guidance), noise and timesteps, and regresses the scheduler's target (v)

Everything random is drawn from generators seeded by (seed, stage, step), so a resumed run follows
the same path as an uninterrupted one.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dreambooth.shapes import world
from dreambooth.shapes.basemodel import ShapesArchitecture, build_untrained, save_pipeline


@dataclass
class PretrainConfig:
    """One pretraining run. Defaults are the recipe of the shipped model."""

    output: str = "runs/shapes-pretrain"
    """Work folder: checkpoint, logs, and the finished pipeline in ``<output>/pipeline``."""
    seed: int = 0
    """Seeds the data, the held-out split, initial weights and every step's randomness."""
    dataset_size: int = 24000
    """Rendered training images (fixed set; its VAE latents are cached for stage 2)."""
    held_out_fraction: float = 0.2
    """Share of (shape, colour, background) triples never shown in training."""
    vae_steps: int = 5000
    """Stage 1 optimizer steps."""
    vae_batch_size: int = 16
    """Stage 1 images per step: small batches, many steps learn edges fastest per CPU second."""
    vae_learning_rate: float = 3e-3
    """Stage 1 AdamW peak learning rate (cosine decay after warm-up)."""
    vae_patterned_fraction: float = 0.5
    """Share of stage-1 images that show two-colour patterned objects (never the shipped subjects):
    the VAE is the model's image codec and must reproduce objects the captions cannot name, as
    Stable Diffusion's VAE reproduces any photo; trained on plain shapes only, it turned subjects'
    checks and stripes into mush and no fine-tune could learn them."""
    kl_weight: float = 1e-6
    """Weight of the KL term against per-pixel MSE: small, so latents keep detail but stay bounded."""
    steps: int = 8000
    """Stage 2 optimizer steps."""
    batch_size: int = 32
    """Stage 2 images per optimizer step."""
    learning_rate: float = 1e-3
    """Stage 2 AdamW peak learning rate for UNet and text encoder."""
    warmup_steps: int = 200
    """Linear learning-rate warm-up steps of each stage."""
    caption_dropout: float = 0.1
    """Share of empty captions, which classifier-free guidance needs."""
    ema_decay: float = 0.999
    """EMA of UNet + text encoder weights; the EMA weights are what ships."""
    checkpoint_every: int = 500
    """Steps between checkpoints (a minute or two of CPU time)."""
    eval_every: int = 1000
    """Stage 2 steps between accuracy measurements on held-out captions."""
    eval_images: int = 96
    """Images per accuracy measurement."""
    threads: int = 2
    """torch intra-op threads."""
    architecture: ShapesArchitecture = field(default_factory=ShapesArchitecture)
    """Model sizes (see ``basemodel``)."""


def training_caption(scene: world.Scene, rng: np.random.Generator) -> str:
    """A caption that names the shape and, independently, maybe colour, size, place, background.

    Personalization prompts are partial ("a [V] square", prior prompt "a square", "a [V] square on
    a green background"), so the base model must read every partial form, not only full captions.
    """
    color = scene.color if rng.random() < 0.8 else ""
    size = scene.size if rng.random() < 0.3 else ""
    words = " ".join(w for w in (size, color, scene.shape) if w)
    text = f"{world.article(words)} {words}"
    if rng.random() < 0.4:
        text += " " + world.PLACE_PHRASES[scene.position]
    if rng.random() < 0.8:
        text += f" on {world.article(scene.background)} {scene.background} background"
    return text


def split(config: PretrainConfig) -> tuple[frozenset, frozenset]:
    """(train, held-out) (shape, colour, background) triples."""
    return world.held_out_combinations(config.seed, config.held_out_fraction)


def _images(scenes: list[world.Scene], seed: int, resolution: int) -> torch.Tensor:
    """uint8 [N, 3, R, R]; image i rendered with the seed [seed, i]."""
    arrays = [np.asarray(world.render(s, resolution, np.random.default_rng([seed, i])))
              for i, s in enumerate(scenes)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def patterned_images(n: int, seed: int, resolution: int) -> torch.Tensor:
    """uint8 [n, 3, R, R] of random two-colour patterned objects, none equal to a shipped subject."""
    rng = np.random.default_rng([seed, 7])
    shipped = {(s.class_noun, s.color, s.secondary, s.pattern) for s in world.SUBJECTS.values()}
    arrays = []
    while len(arrays) < n:
        shape, pattern = world.SHAPES[rng.integers(4)], world.PATTERNS[rng.integers(len(world.PATTERNS))]
        color, secondary, background = (world.COLORS[i] for i in rng.choice(len(world.COLORS), 3, replace=False))
        if (shape, color, secondary, pattern) in shipped:
            continue
        subject = world.Subject("vae", shape, color, secondary, pattern)
        position = list(world.POSITIONS)[rng.integers(len(world.POSITIONS))]
        size = list(world.SIZES)[rng.integers(len(world.SIZES))]
        image = world.render_subject(subject, background, position, size, resolution, rng)
        arrays.append(np.asarray(image))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _to_unit(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float() / 127.5 - 1.0


def _generator(seed: int, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.default_rng([seed, stage, step]).integers(2**62)))


def _optimizer_step(loss: torch.Tensor, model: torch.nn.Module, opt, sched) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()


def _lr_lambda(warmup: int, total: int):
    def at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return at


class Pretrainer:
    """Runs the stages; every public method is safe to call again after an interruption."""

    def __init__(self, config: PretrainConfig, log=functools.partial(print, flush=True)):
        self.config = config
        self.out = Path(config.output)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = log
        torch.set_num_threads(config.threads)
        arch = config.architecture
        self.parts = build_untrained(arch, seed=config.seed)
        self.train_triples, self.test_triples = split(config)
        self.scenes = world.sample_scenes(config.dataset_size, config.seed, only=self.train_triples)
        self.images = _images(self.scenes, config.seed, arch.resolution)
        patterned = round(config.vae_patterned_fraction * config.dataset_size)
        self.vae_images = torch.cat([self.images[:config.dataset_size - patterned],
                                     patterned_images(patterned, config.seed, arch.resolution)])
        self.checkpoint_path = self.out / "checkpoint.pt"
        self.started = time.time()

    # -- checkpoints --------------------------------------------------------------------------

    def _save(self, state: dict) -> None:
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_path)

    def _load(self) -> dict | None:
        if not self.checkpoint_path.exists():
            return None
        return torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)

    def _record(self, **row) -> None:
        row["wall_s"] = round(time.time() - self.started, 1)
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    # -- stage 1 -------------------------------------------------------------------------------

    def train_vae(self) -> None:
        c, vae = self.config, self.parts["vae"]
        state = self._load()
        if state and state["stage"] == "text_to_image":
            vae.load_state_dict(state["vae"])
            return
        opt = torch.optim.AdamW(vae.parameters(), lr=c.vae_learning_rate, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(c.warmup_steps, c.vae_steps))
        step = 0
        if state and state["stage"] == "vae":
            vae.load_state_dict(state["vae"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["lr"])
            step = state["step"]
            self.log(f"vae: resuming at step {step}")
        vae.train()
        while step < c.vae_steps:
            g = _generator(c.seed, 1, step)
            x = _to_unit(self.vae_images[torch.randint(len(self.vae_images), (c.vae_batch_size,), generator=g)])
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
            recon = vae.decode(z).sample
            mse = F.mse_loss(recon, x)
            _optimizer_step(mse + c.kl_weight * posterior.kl().mean(), vae, opt, sched)
            step += 1
            if step % 200 == 0 or step == c.vae_steps:
                self.log(f"vae step {step}/{c.vae_steps} mse {mse.item():.5f}")
                self._record(stage="vae", step=step, mse=mse.item())
            if step % c.checkpoint_every == 0 or step == c.vae_steps:
                self._save({"stage": "vae", "step": step, "vae": vae.state_dict(),
                            "optimizer": opt.state_dict(), "lr": sched.state_dict()})
        vae.eval()
        vae.requires_grad_(False)

    def encode_dataset(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mean, std) of every training image, and the VAE's scaling factor set so that
        scaled latents have unit variance (as ``vae.config.scaling_factor`` in Stable Diffusion)."""
        vae = self.parts["vae"].eval()
        means, stds = [], []
        with torch.no_grad():
            for start in range(0, len(self.images), 256):
                posterior = vae.encode(_to_unit(self.images[start:start + 256])).latent_dist
                means.append(posterior.mean)
                stds.append(posterior.std)
        mean, std = torch.cat(means), torch.cat(stds)
        vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
        return mean, std

    # -- stage 2 -------------------------------------------------------------------------------

    def train_text_to_image(self) -> None:
        from dreambooth.training.batches import tokenize
        from dreambooth.training.module import DreamBoothModule, mixed_batch_loss

        c, p = self.config, self.parts
        mean, std = self.encode_dataset()
        scaling = p["vae"].config.scaling_factor
        module = DreamBoothModule(p["unet"], p["text_encoder"])
        ema = [t.detach().clone() for t in module.parameters()]
        opt = torch.optim.AdamW(module.parameters(), lr=c.learning_rate, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(c.warmup_steps, c.steps))
        step = 0
        state = self._load()
        if state and state["stage"] == "text_to_image":
            module.load_state_dict(state["module"])
            ema = state["ema"]
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["lr"])
            step = state["step"]
            self.log(f"text-to-image: resuming at step {step}")
        tokenizer, noise_scheduler = p["tokenizer"], p["noise_scheduler"]
        empty_ids = tokenize(tokenizer, "")
        module.train()
        while step < c.steps:
            g = _generator(c.seed, 2, step)
            rng = np.random.default_rng([c.seed, 2, step])
            idx = torch.randint(len(mean), (c.batch_size,), generator=g)
            latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scaling
            captions = [training_caption(self.scenes[i], rng) for i in idx.tolist()]
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            dropped = torch.from_numpy(rng.random(c.batch_size) < c.caption_dropout)
            ids[dropped] = empty_ids
            # Every row is an "instance" row: the DreamBooth loss without a prior term.
            loss = mixed_batch_loss(module, noise_scheduler, latents, {"input_ids": ids}, c.batch_size, 0.0, g).total
            _optimizer_step(loss, module, opt, sched)
            step += 1
            decay = min(c.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, q in zip(ema, module.parameters()):
                    e.lerp_(q.detach(), 1 - decay)
            if step % 50 == 0:
                self.log(f"text-to-image step {step}/{c.steps} loss {loss.item():.4f} "
                         f"lr {sched.get_last_lr()[0]:.2e} ({time.time() - self.started:.0f} s)")
                self._record(stage="text_to_image", step=step, loss=loss.item())
            if step % c.checkpoint_every == 0 or step == c.steps:
                self._save({"stage": "text_to_image", "step": step, "vae": p["vae"].state_dict(),
                            "scaling_factor": scaling, "module": module.state_dict(), "ema": ema, "optimizer": opt.state_dict(),
                            "lr": sched.state_dict()})
            if step % c.eval_every == 0 or step == c.steps:
                self.evaluate(ema, step)
        self._ema = ema

    def _with_weights(self, ema: list[torch.Tensor]) -> dict:
        """A copy of the parts with the EMA weights in UNet and text encoder."""
        import copy

        from dreambooth.training.module import DreamBoothModule

        parts = dict(self.parts)
        module = copy.deepcopy(DreamBoothModule(self.parts["unet"], self.parts["text_encoder"]))
        with torch.no_grad():
            for q, e in zip(module.parameters(), ema):
                q.copy_(e)
        parts["unet"], parts["text_encoder"] = module.unet.eval(), module.text_encoder.eval()
        return parts

    @staticmethod
    def pipeline(parts: dict):
        from dreambooth.families import SD

        return SD.assemble(parts, parts["scheduler"])

    def evaluate(self, ema: list[torch.Tensor], step: int) -> dict:
        from dreambooth.evaluation.shapes import evaluation_scenes, prompt_accuracy

        pipe = self.pipeline(self._with_weights(ema))
        scenes = evaluation_scenes(self.test_triples, self.config.eval_images)
        held_out = prompt_accuracy(pipe, scenes).as_dict()
        self.log(f"eval step {step}: held-out captions {held_out}")
        self._record(stage="eval", step=step, held_out=held_out)
        return held_out

    def export(self, target: str | Path | None = None) -> Path:
        """Write the EMA pipeline (fp16 safetensors) to ``target`` (default ``<output>/pipeline``)."""
        state = self._load()
        if not state or state["stage"] != "text_to_image" or state["step"] < self.config.steps:
            raise RuntimeError(f"pretraining in {self.out} has not finished; run it (it resumes) first")
        self.parts["vae"].load_state_dict(state["vae"])
        self.parts["vae"].register_to_config(scaling_factor=state["scaling_factor"])
        return save_pipeline(self._with_weights(state["ema"]), target or self.out / "pipeline")

    def run(self) -> Path:
        (self.out / "config.json").write_text(json.dumps(asdict(self.config), indent=2, default=str))
        self.train_vae()
        self.train_text_to_image()
        return self.export()


def model_card(config: PretrainConfig) -> str:
    """README of the shipped model: recipe, command, steps, wall time and held-out accuracy, read
    from ``<output>/log.jsonl`` (wall times are per process: a resumed run restarts its clock)."""
    rows = [json.loads(line) for line in (Path(config.output) / "log.jsonl").read_text().splitlines()]
    last = {stage: max((r for r in rows if r["stage"] == stage), key=lambda r: r["step"])
            for stage in ("vae", "text_to_image", "eval")}
    evals = "\n".join(f"| {r['step']} | " + " | ".join(f"{r['held_out'][k]:.2f}" for k in ("background", "color", "shape"))
                      + " |" for r in rows if r["stage"] == "eval")
    arch = config.architecture
    return f"""# `shapes`: a Stable-Diffusion-layout model of the shapes world

Built-in model of the `dreambooth` package (`--model shapes`), pretrained on CPU by

    python -m ray_jobs.pretrain_shapes --ship

(resumable: re-running the command continues from `<output>/checkpoint.pt`). Layout: see
`dreambooth/shapes/basemodel.py`; recipe: `dreambooth/shapes/pretrain.py`. Weights are fp16
safetensors; `dreambooth` loads them as fp32.

- VAE: {arch.vae_channels} channels, 32 px <-> {arch.latent_side}x{arch.latent_side}x{arch.latent_channels} latents,
  {config.vae_steps} steps of {config.vae_batch_size} images (half of them patterned objects), final MSE
  {last["vae"]["mse"]:.4f}, {last["vae"]["wall_s"]:.0f} s.
- UNet {arch.unet_channels} + CLIP text encoder (width {arch.text_width}, {arch.text_layers} layers, real CLIP
  tokenizer, {arch.text_positions} positions), {arch.prediction_type}: {config.steps} steps of {config.batch_size}
  captioned images ({config.dataset_size} rendered scenes; {config.held_out_fraction:.0%} of the
  (shape, colour, background) triples held out), AdamW {config.learning_rate}, EMA {config.ema_decay};
  stage 2 ended at {last["text_to_image"]["wall_s"]:.0f} s after the process started.

Held-out captions (never-seen triples, short captions, {config.eval_images} images, DDIM 25 steps,
guidance 4), share the analyzers read back as asked:

| step | background | colour | shape |
|---|---|---|---|
{evals}
"""

