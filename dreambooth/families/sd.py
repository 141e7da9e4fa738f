"""Stable Diffusion 1.x/2.x: one CLIP text encoder, conditioning = its last hidden state.

``StableDiffusionPipeline`` folders (ε- or v-prediction, any resolution); the UNet attends to the
text encoder's final hidden states [N, 77, D] (D = 768 for SD 1.x, 1024 for SD 2.x) and takes no
added conditions.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from dreambooth.families.base import Conditions, ModelFamily


class StableDiffusion(ModelFamily):
    name = "sd"
    pipeline_class = "StableDiffusionPipeline"
    text_encoder_names = ("text_encoder",)
    text_encoder_classes = ("CLIPTextModel",)
    tokenizer_names = ("tokenizer",)

    def pipeline_options(self) -> dict:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def condition(self, module: nn.Module, conditions: Conditions) -> tuple[torch.Tensor, Optional[dict]]:
        """``text_encoder(input_ids)``'s last hidden state, float [N, L, D]; no added conditions."""
        return module.text_encoder(conditions["input_ids"], return_dict=False)[0], None


SD = StableDiffusion()
