"""Stable Diffusion XL: two text encoders and size conditioning (Podell et al. 2023, §2.2).

The UNet attends to the concatenation of both encoders' penultimate hidden states
(CLIP ViT-L [N, 77, 768] ⊕ OpenCLIP ViT-bigG [N, 77, 1280] = [N, 77, 2048] for SDXL base) and adds
to its timestep embedding the second encoder's pooled projection (``text_embeds`` [N, 1280]) and the
Fourier features of six size numbers per example (``time_ids`` [N, 6]): the photo's original
(height, width), the crop's (top, left) offset and the target (height, width). This is what
``StableDiffusionXLPipeline.encode_prompt`` and ``_get_add_time_ids`` compute at inference.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from dreambooth.families.base import Conditions, ModelFamily


class StableDiffusionXL(ModelFamily):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    text_encoder_classes = ("CLIPTextModel", "CLIPTextModelWithProjection")
    tokenizer_names = ("tokenizer", "tokenizer_2")

    def pipeline_options(self) -> dict:
        # No invisible watermark (a decoding-time post-process that needs an extra package).
        return {"add_watermarker": False}

    def size_conditions(self, original_size: tuple[int, int], crop_top_left: tuple[int, int],
                        target_size: tuple[int, int]) -> Conditions:
        """``time_ids`` float32 [1, 6] = (orig h, orig w, crop top, crop left, target h, target w)."""
        return {"time_ids": torch.tensor([[*original_size, *crop_top_left, *target_size]], dtype=torch.float32)}

    def condition(self, module: nn.Module, conditions: Conditions) -> tuple[torch.Tensor, Optional[dict]]:
        """Penultimate hidden states of both encoders concatenated, float [N, L, D1 + D2]; added
        conditions ``text_embeds`` [N, P] (the second encoder's pooled projection) and ``time_ids`` [N, 6]."""
        first = module.text_encoder(conditions["input_ids"], output_hidden_states=True)
        second = module.text_encoder_2(conditions["input_ids_2"], output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        added = {"text_embeds": second.text_embeds, "time_ids": conditions["time_ids"].to(hidden.dtype)}
        return hidden, added


SDXL = StableDiffusionXL()
