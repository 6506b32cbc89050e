"""EVA02-CLIP's image tower: a ViT with 2D rotary embeddings, SwiGLU MLPs and sub-LayerNorms.

Mirrors timm `models/eva.py` (`Eva` built with the `eva02_*_clip_*` arguments: `EvaAttention`, `EvaBlock`,
`layers/mlp.py` SwiGLU) and `layers/pos_embed_sincos.py` (`RotaryEmbeddingCat`, in_pixels=False), which is
baaivision/EVA `EVA-CLIP/rei/eva_clip/eva_vit_model.py` + `rope.py` (VisionRotaryEmbeddingFast) under other
names (EVA-02, arXiv 2303.11331; EVA-CLIP, arXiv 2303.15389). What differs from CLIP's ViT (clip.py):

- the patch embedding has a bias and there is no LayerNorm before the blocks; LayerNorms use eps 1e-6;
- attention: q and v projections have biases, k has none; q and k of the patch tokens (not the class token)
  are rotated by 2D RoPE; the attention output is LayerNorm-ed (sub-LN) before the output projection;
- MLP: SwiGLU, down(LN(silu(gate(x)) * up(x))), hidden width 4·C·2/3;
- the pooled class token is projected by a biased Linear (timm's `head`), CLIP's `visual_projection` here.

RoPE: head dims come in interleaved pairs (2i, 2i+1), each pair rotated by one angle; the first half of the
pairs follows the patch row, the second half the column, with frequencies θ^(-j/(hs/4)). Positions are scaled
onto the pretraining grid (16 for all EVA02-CLIPs): row r of an n-row grid sits at r·16/n, so the 336px L/14
(24x24 patches) rotates as if interpolated onto 16x16.

Module names follow clip.py's ViT (`embeddings`, `encoder.layers.N.self_attn`, `post_layernorm`), so train.py's
layer locking and checkpointing reach both towers alike; openclip.py and released.py map timm's and eva_clip's
names onto them. The stack of blocks (with its activation checkpointing) is clip.py's `CLIPEncoder` over EVA02
blocks, so this file is copied together with clip.py.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .clip import CLIPEncoder

HEAD_WIDTH = 64  # every EVA02-CLIP tower uses 64-dim heads (B/16: 768/12, L/14: 1024/16)


@dataclass
class EvaVisionConfig:
    """The EVA02 image tower's shape (defaults: EVA02-CLIP-B/16)."""
    hidden_size: int = 768
    intermediate_size: int = 2048  # SwiGLU width, int(768 * 4 * 2 / 3)
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    layer_norm_eps: float = 1e-6
    rope_reference_grid: int = 16  # the grid RoPE positions are scaled onto (timm's ref_feat_shape)
    rope_theta: float = 10000.0
    projection_bias: bool = True  # the visual projection is timm's biased `head`

    def build_tower(self) -> nn.Module:
        """clip.vision_tower's hook: the tower this config describes."""
        return EvaVisionTransformer(self)

    @classmethod
    def from_state_dict(cls, weights: dict, reference_grid: int = 16) -> "EvaVisionConfig":
        """Sizes read from a state dict in this file's names (`vision_model.*`); heads are 64 wide."""
        patch = weights["vision_model.embeddings.patch_embedding.weight"]  # (C, 3, p, p)
        positions = weights["vision_model.embeddings.position_embedding.weight"].shape[0]  # grid² + 1
        hidden, layers = patch.shape[0], 1 + max(int(k.split(".")[3]) for k in weights if ".encoder.layers." in k)
        if hidden % HEAD_WIDTH or math.isqrt(positions - 1) ** 2 != positions - 1:
            raise ValueError(f"width {hidden} or {positions} positions fit no EVA02 tower (64-wide heads, a square "
                             f"grid plus the class token)")
        return cls(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // HEAD_WIDTH,
                   intermediate_size=weights["vision_model.encoder.layers.0.mlp.gate_proj.weight"].shape[0],
                   num_channels=patch.shape[1], patch_size=patch.shape[-1],
                   image_size=math.isqrt(positions - 1) * patch.shape[-1], rope_reference_grid=reference_grid)


def rotary_tables(grid: int, reference_grid: int, head_dim: int, theta: float, device=None):
    """(sin, cos), each (grid², head_dim) float32, for the patch tokens in row-major order."""
    bands = theta ** -(torch.arange(head_dim // 4, device=device, dtype=torch.float32) / (head_dim // 4))  # (hs/4,)
    t = torch.arange(grid, device=device, dtype=torch.float32) / grid * reference_grid  # scaled positions
    rows, cols = torch.meshgrid(t, t, indexing="ij")  # (g, g) each
    angles = torch.cat([rows[..., None] * bands, cols[..., None] * bands], dim=-1)  # (g, g, hs/2)
    angles = angles.reshape(grid * grid, head_dim // 2).repeat_interleave(2, dim=-1)  # (N, hs): a pair per angle
    return angles.sin(), angles.cos()


def rotate(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved pairs: (x0, x1) -> (x0·cos - x1·sin, x1·cos + x0·sin) in fp32, cast back to x's dtype."""
    pairs = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape(x.shape)  # (-x1, x0, -x3, x2, ...)
    return (x * cos + pairs * sin).to(x.dtype)


class EvaAttention(nn.Module):
    def __init__(self, config: EvaVisionConfig):
        super().__init__()
        C = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_proj = nn.Linear(C, C)
        self.k_proj = nn.Linear(C, C, bias=False)  # EVA: no key bias
        self.v_proj = nn.Linear(C, C)
        self.sub_norm = nn.LayerNorm(C, eps=config.layer_norm_eps)  # timm's attn.norm, eva_clip's inner_attn_ln
        self.out_proj = nn.Linear(C, C)

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, C) -> (B, nh, T, hs) for each of q, k, v
        q, k, v = (proj(x).view(B, T, self.num_heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        # the patch tokens' q and k are rotated by their 2D position; the class token (index 0) is not
        q = torch.cat([q[:, :, :1], rotate(q[:, :, 1:], sin, cos)], dim=2)
        k = torch.cat([k[:, :, :1], rotate(k[:, :, 1:], sin, cos)], dim=2)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hs), bidirectional
        return self.out_proj(self.sub_norm(y.transpose(1, 2).reshape(B, T, C)))


class SwiGLU(nn.Module):
    """down(LN(silu(gate(x)) * up(x))): timm's fc1_g, fc1_x, norm, fc2; eva_clip's w1, w2, ffn_ln, w3."""

    def __init__(self, config: EvaVisionConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.norm = nn.LayerNorm(config.intermediate_size, eps=config.layer_norm_eps)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.norm(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class EvaLayer(nn.Module):
    """Pre-norm block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, config: EvaVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = EvaAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), sin, cos)
        return x + self.mlp(self.layer_norm2(x))


class EvaVisionTransformer(nn.Module):
    """Patchify (biased conv), class token, learned positions, blocks with RoPE, LN, the class token out."""

    def __init__(self, config: EvaVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = nn.Module()  # the same layout as clip.py's CLIPVisionEmbeddings
        self.embeddings.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size,
                                                    stride=config.patch_size)
        self.embeddings.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.grid = config.image_size // config.patch_size
        self.embeddings.position_embedding = nn.Embedding(self.grid ** 2 + 1, config.hidden_size)
        self.pre_layrnorm = nn.Identity()  # EVA02 has no pre-norm; kept so the layout matches CLIP's ViT
        self.encoder = CLIPEncoder(config, EvaLayer)  # clip.py's loop over EVA02 blocks
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # timm's `norm`

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.embeddings.patch_embedding.weight
        if pixel_values.shape[-2:] != (self.grid * weight.shape[-1],) * 2:
            side = self.grid * weight.shape[-1]
            raise ValueError(f"image size {tuple(pixel_values.shape[-2:])} does not match the model's {side}x{side}")
        patches = self.embeddings.patch_embedding(pixel_values.to(weight.dtype))  # (B, C, g, g)
        patches = patches.flatten(2).transpose(1, 2)  # (B, N, C), row-major
        class_token = self.embeddings.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)  # (B, 1, C)
        x = torch.cat([class_token, patches], dim=1) + self.embeddings.position_embedding.weight  # (B, N+1, C)
        # RoPE tables, recomputed each call (a few KB; no buffer to go stale on the meta device or in a cast)
        config = self.config
        head_dim = config.hidden_size // config.num_attention_heads
        sin, cos = rotary_tables(self.grid, config.rope_reference_grid, head_dim, config.rope_theta, device=x.device)
        x = self.encoder(self.pre_layrnorm(x), sin, cos)
        return self.post_layernorm(x[:, 0])  # the class token: (B, C)
