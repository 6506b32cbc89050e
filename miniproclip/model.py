"""ProCLIP's trainable model: CLIP's image tower, the LLM text head, and the contrastive temperature.

The LLM itself is not part of it: its caption embeddings come from the cache (`embed.py`), as in the official
code. Parameter names of the image tower are HF `CLIPModel`'s (`vision_model.*`, `visual_projection.weight`),
so a checkpoint's image tower can be put back into an HF CLIP folder key for key; the head lives under
`text_head.*` and the temperature is `logit_scale` (its log, as in CLIP); a run with the sigmoid loss adds
`logit_bias` (SigLIP's b).

Stage 1 trains `text_head` only; stage 2 trains everything here (paper section 3.2, 3.3).
"""

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .clip import CLIP, CLIPConfig, vision_projection, vision_tower
from .head import HeadConfig, TextHead


SIGMOID_INIT = (math.log(10), -10.0)  # (log t, b) where the CLIP folder has no bias: open_clip's SigLIP init


class ProCLIP(nn.Module):
    def __init__(self, clip_config: CLIPConfig, head_config: HeadConfig, logit_bias: bool = False):
        super().__init__()
        if head_config.output_dim != clip_config.projection_dim:
            raise ValueError(f"the head maps to {head_config.output_dim} dims but CLIP's joint space has "
                             f"{clip_config.projection_dim}; they must match")
        self.vision_model = vision_tower(clip_config.vision)  # HF's ViT, EVA02's (eva.py) or SigLIP's (siglip.py)
        self.visual_projection = vision_projection(clip_config)  # siglip.py: none
        self.text_head = TextHead(head_config)
        self.logit_scale = nn.Parameter(torch.tensor(clip_config.logit_scale_init_value))
        if logit_bias:  # stage 2's sigmoid loss (--loss sigmoid): σ(t·cos + b) needs the bias b
            self.logit_bias = nn.Parameter(torch.tensor(SIGMOID_INIT[1]))

    @classmethod
    def from_clip(cls, clip: CLIP, head_config: HeadConfig, logit_bias: bool = False) -> "ProCLIP":
        """Take the image tower and temperature of a loaded CLIP (copied), with a freshly initialised head. With
        `logit_bias` (the sigmoid loss): a SigLIP's own t and b, else log 10 and -10 for both (a CLIP's t was
        trained for the softmax, where only differences of logits count)."""
        model = cls(clip.config, head_config, logit_bias)
        model.vision_model.load_state_dict(clip.vision_model.state_dict())
        model.visual_projection.load_state_dict(clip.visual_projection.state_dict())
        model.logit_scale.data.copy_(clip.logit_scale.data.reshape(()))  # SigLIP's is (1,)
        if logit_bias and hasattr(clip, "logit_bias"):
            model.logit_bias.data.copy_(clip.logit_bias.data.reshape(()))
        elif logit_bias:
            model.logit_scale.data.fill_(SIGMOID_INIT[0])
        return model

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) L2-normalised image features (normalised in fp32)."""
        return F.normalize(self.visual_projection(self.vision_model(pixel_values)).float(), dim=-1)

    def encode_text(self, llm_embeddings: torch.Tensor) -> torch.Tensor:
        """(B, d) cached LLM embeddings -> (B, D) L2-normalised text features."""
        return F.normalize(self.text_head(llm_embeddings).float(), dim=-1)

    def forward(self, pixel_values: torch.Tensor | None = None, llm_embeddings: torch.Tensor | None = None):
        """Both encoders in one call, which is what DDP wraps: (image features or None, text features or None)."""
        image = self.encode_image(pixel_values) if pixel_values is not None else None
        text = self.encode_text(llm_embeddings) if llm_embeddings is not None else None
        return image, text

    def image_teacher(self) -> nn.Module:
        """A frozen copy of the image tower (for L_reg): same names as here, without head or temperature."""
        teacher = copy.deepcopy(self)
        del teacher.text_head, teacher.logit_scale
        if hasattr(teacher, "logit_bias"):
            del teacher.logit_bias
        return teacher.requires_grad_(False).eval()
