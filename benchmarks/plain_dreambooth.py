"""The baseline: DreamBooth the way diffusers' ``examples/dreambooth/train_dreambooth.py`` does it,
in one plain PyTorch process — no Ray, no DeepSpeed, no project code in the step.

Per step, as the example does: draw ``B`` subject photos and ``B`` class images (resize, random
crop, flip, normalize), VAE-encode all ``2B`` of them, noise at random timesteps, encode the
prompts with the text encoder, predict with the UNet, MSE on the subject half + λ × MSE on the
class half, backward, clip the gradient norm, AdamW, LR scheduler, zero the gradients. The text
encoder trains. At the end the pipeline is saved (``--output``).

Used by ``train_step.py`` as the step-time baseline (``PlainDreamBooth.step``) and, run as a
script, as the end-to-end wall-time baseline of a whole command:

    python benchmarks/plain_dreambooth.py --model shapes --instance-dir examples/subjects/two_tone_triangle \\
        --class-dir /tmp/class-images --class-prompt "a triangle" --instance-prompt "a sks triangle" \\
        --resolution 32 --steps 120 --output /tmp/plain-out
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def _pixels(image: Image.Image, resolution: int, rng: random.Random) -> torch.Tensor:
    """The example's transforms: Resize(short side), RandomCrop, RandomHorizontalFlip, Normalize([0.5], [0.5])."""
    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BILINEAR)
    left, top = rng.randint(0, image.width - resolution), rng.randint(0, image.height - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def _images(folder: str) -> list[Image.Image]:
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    return [Image.open(p).convert("RGB") for p in paths]


class PlainDreamBooth:
    """Model, optimizer and data of one plain fine-tune; ``step()`` is one optimizer step."""

    def __init__(self, model: str, instance_images: list[Image.Image], class_images: list[Image.Image],
                 instance_prompt: str, class_prompt: str, *, resolution: int, batch_size: int = 2,
                 learning_rate: float = 5e-6, prior_loss_weight: float = 1.0, max_grad_norm: float = 1.0, seed: int = 0):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from diffusers.optimization import get_scheduler
        from transformers import CLIPTextModel, CLIPTokenizer

        torch.manual_seed(seed)
        self.model = model
        self.tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=torch.float32)
        self.vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=torch.float32)
        self.unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=torch.float32)
        self.noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
        self.vae.requires_grad_(False)
        self.params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=learning_rate, weight_decay=1e-2)
        self.lr_scheduler = get_scheduler("constant", optimizer=self.optimizer)
        self.unet.train(), self.text_encoder.train()
        ids = lambda prompt: self.tokenizer(prompt, padding="max_length", truncation=True,  # noqa: E731
                                            max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
        self.input_ids = torch.cat([ids(instance_prompt).repeat(batch_size, 1), ids(class_prompt).repeat(batch_size, 1)])
        self.instance_images, self.class_images = instance_images, class_images
        self.resolution, self.batch_size = resolution, batch_size
        self.prior_loss_weight, self.max_grad_norm = prior_loss_weight, max_grad_norm
        self.rng = random.Random(seed)
        self.phase_seconds: dict[str, list[float]] = {}
        """Seconds of each step's phases (batch, forward, backward, optimizer), as the project's loop splits them."""

    def _lap(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        self.phase_seconds.setdefault(phase, []).append(now - since)
        return now

    def step(self) -> float:
        started = time.perf_counter()
        pick = lambda images: [_pixels(self.rng.choice(images), self.resolution, self.rng)  # noqa: E731
                               for _ in range(self.batch_size)]
        pixel_values = torch.stack(pick(self.instance_images) + pick(self.class_images))
        with torch.no_grad():
            latents = self.vae.encode(pixel_values).latent_dist.sample() * self.vae.config.scaling_factor
        started = self._lap("batch", started)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = self.text_encoder(self.input_ids, return_dict=False)[0]
        model_pred = self.unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
        target, target_prior = torch.chunk(noise, 2, dim=0)
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        loss = loss + self.prior_loss_weight * F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
        started = self._lap("forward", started)
        loss.backward()
        started = self._lap("backward", started)
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        self._lap("optimizer", started)
        return value

    def save(self, output: str) -> None:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(self.model, unet=self.unet, text_encoder=self.text_encoder,
                                                 safety_checker=None, requires_safety_checker=False)
        pipe.save_pretrained(output, safe_serialization=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a diffusers folder")
    parser.add_argument("--instance-dir", required=True)
    parser.add_argument("--class-dir", required=True, help="class images (PNG/JPEG), already generated")
    parser.add_argument("--instance-prompt", required=True)
    parser.add_argument("--class-prompt", required=True)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dreambooth.models import resolve_model

    run = PlainDreamBooth(resolve_model(args.model), _images(args.instance_dir), _images(args.class_dir),
                          args.instance_prompt, args.class_prompt, resolution=args.resolution, batch_size=args.batch_size)
    seconds = []
    for _ in range(args.steps):
        started = time.perf_counter()
        run.step()
        seconds.append(time.perf_counter() - started)
    run.save(args.output)
    print(f"median step {statistics.median(seconds):.4f} s")


if __name__ == "__main__":
    main()
