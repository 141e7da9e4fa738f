"""The ``shapes`` base model: its architecture, and how it is saved as a diffusers pipeline.

Owns the shapes-world Stable-Diffusion layout (sizes chosen so that pretraining fits a 2-core CPU
and the weights fit the package), building it untrained, and writing it in fp16 safetensors.
Training it is ``pretrain``'s job; loading it is ``dreambooth.models``' (built-in name ``shapes``).

Layout, for 32 px RGB images::

    VAE            32x32x3 <-> 8x8x4 latents (3 blocks of 16, 32, 64 channels)
    UNet           on 8x8x4 latents: CrossAttnDown(64) @8x8, Down(96) @4x4, cross-attention mid
                   block, heads of 8 channels; v-prediction. Width at 8x8 is what draws corners
                   and points: a (32, 64, 96) UNet drew squares and stars as blobs (shape 43 %)
    text encoder   CLIP (real tokenizer, 49,408 tokens) of width 32, 2 layers, 32 positions: the
                   vocabulary's embedding rows are most of its size, so the width stays small
    schedulers     DDPM cosine schedule for training; DDIM with "trailing" spacing for sampling,
                   so the first sampling step starts from pure noise (t = 999) as training saw

Weights are stored in fp16 (``diffusers``/``transformers`` load them as fp32 when asked, which
``dreambooth.models`` does): about 10 MiB in all, no file over 5 MiB.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

#: Where the trained model ships inside the package (``dreambooth/data/shapes``).
PACKAGE_DIR = Path(__file__).resolve().parent.parent / "data" / "shapes"
#: Size limits the shipped model is held to (package data must stay small).
MAX_TOTAL_BYTES = 12 * 2**20
MAX_FILE_BYTES = 5 * 2**20


@dataclass(frozen=True)
class ShapesArchitecture:
    """Sizes of the shapes-world pipeline. The defaults are what ships."""

    resolution: int = 32
    """Image side in pixels."""
    latent_channels: int = 4
    """VAE latent channels (as Stable Diffusion)."""
    vae_channels: tuple[int, ...] = (16, 32, 64)
    """VAE block widths; each block after the first halves the side (32 px -> 8x8 latents)."""
    unet_channels: tuple[int, ...] = (64, 96)
    """UNet block widths; all blocks but the last (convolution only) have cross-attention."""
    attention_head_dim: int = 8
    """Channels per attention head in the UNet."""
    text_width: int = 32
    """CLIP text encoder hidden size (= UNet cross-attention dim). 49,408 rows x width dominate."""
    text_layers: int = 2
    """CLIP text encoder transformer layers."""
    text_positions: int = 32
    """Tokenizer max length and position embeddings: the longest shapes caption is 16 tokens."""
    prediction_type: str = "v_prediction"
    """UNet target: v-prediction makes the high-noise steps, where colour and layout are decided
    from the prompt alone, carry most of the loss (ε-prediction barely rewards conditioning)."""

    @property
    def latent_side(self) -> int:
        return self.resolution // 2 ** (len(self.vae_channels) - 1)


def build_untrained(arch: ShapesArchitecture = ShapesArchitecture(), seed: int = 0) -> dict:
    """Fresh modules: ``{"vae", "unet", "text_encoder", "tokenizer", "noise_scheduler", "scheduler"}``."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreambooth.models import CLIP_VOCAB_SIZE, load_clip_tokenizer

    torch.manual_seed(seed)
    blocks = len(arch.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=arch.latent_channels,
        block_out_channels=arch.vae_channels, layers_per_block=1, norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        sample_size=arch.resolution,
    )
    levels = len(arch.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=arch.latent_side, in_channels=arch.latent_channels, out_channels=arch.latent_channels,
        block_out_channels=arch.unet_channels, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=arch.text_width, attention_head_dim=arch.attention_head_dim,
        norm_num_groups=16,
    )
    tokenizer = load_clip_tokenizer()
    tokenizer.model_max_length = arch.text_positions
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=arch.text_width, intermediate_size=2 * arch.text_width,
        num_attention_heads=4, num_hidden_layers=arch.text_layers,
        max_position_embeddings=arch.text_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    schedule = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                    prediction_type=arch.prediction_type, clip_sample=False)
    return {
        "vae": vae, "unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer,
        "noise_scheduler": DDPMScheduler(**schedule),
        "scheduler": DDIMScheduler(**schedule, timestep_spacing="trailing", set_alpha_to_one=True),
    }


def save_pipeline(parts: dict, target: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write a StableDiffusionPipeline folder (safetensors in ``dtype``) and check its size limits."""
    import copy

    from diffusers import StableDiffusionPipeline

    modules = {k: copy.deepcopy(parts[k]).to(dtype) for k in ("vae", "unet", "text_encoder")}
    pipe = StableDiffusionPipeline(
        **modules, tokenizer=parts["tokenizer"], scheduler=parts["scheduler"],
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    target = Path(target)
    pipe.save_pretrained(str(target), safe_serialization=True)
    check_size(target)
    return target


def check_size(folder: str | Path) -> int:
    """Total safetensors bytes; raises ValueError past ``MAX_TOTAL_BYTES`` or ``MAX_FILE_BYTES``."""
    files = list(Path(folder).rglob("*.safetensors"))
    too_big = [f"{f} ({f.stat().st_size} B)" for f in files if f.stat().st_size > MAX_FILE_BYTES]
    total = sum(f.stat().st_size for f in files)
    if too_big or total > MAX_TOTAL_BYTES:
        raise ValueError(f"shapes model too large: {total} B in all (limit {MAX_TOTAL_BYTES}); "
                         f"files over {MAX_FILE_BYTES} B: {too_big or 'none'}")
    return total
