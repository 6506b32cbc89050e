"""SigLIP (and SigLIP2 at a fixed resolution): the ViT with a MAP head and the 64-token text tower, loadable from
a Hugging Face `SiglipModel` folder (model_type "siglip").

Mirrors transformers `models/siglip/modeling_siglip.py` (key names and numerics; SigLIP, arXiv 2303.15343). The
fixed-resolution SigLIP2 checkpoints (google/siglip2-*-patch16-224, -so400m-patch14-384, ...) are saved in this
same layout (model_type "siglip", a Gemma tokenizer); only the NaFlex ones use `modeling_siglip2.py` (model_type
"siglip2", patches as a flat sequence with per-image grids), which is refused. What differs from CLIP (clip.py):

- image tower: a biased patch convolution, no class token, no LayerNorm before the blocks; positions are
  bicubically interpolated to another grid (HF's `interpolate_pos_encoding`); after `post_layernorm` the MAP head
  (`SiglipMultiheadAttentionPoolingHead`) pools: one learned probe attends over the patches (packed `in_proj`
  q/k/v, as nn.MultiheadAttention stores them), then x + mlp(LN(x)). Its output is the image embedding: there is
  no visual projection (`visual_projection` is an identity here, so model.py's ProCLIP trains the same parts);
- text tower: bidirectional (not causal) attention and no padding mask, pooled at the last position (captions
  are padded to the full 64 tokens, so this is a pad or the EOS), then the biased Linear `head`;
- GELU (tanh approximation) and LayerNorm eps 1e-6 in both towers; `logit_scale` and `logit_bias`, each (1,),
  for the sigmoid loss.

The transformer blocks are clip.py's (`CLIPEncoder`: HF's q/k/v/out_proj, fc1/fc2, layer_norm1/2 names hold for
SigLIP too); the activation and eps come from the config. Attention runs through SDPA; LayerNorms run in fp32
under autocast, as in clip.py. This file depends on torch and clip.py only.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .clip import CLIP, CLIPEncoder, CLIPMLP, CLIPTextConfig, CLIPVisionConfig, vision_projection


@dataclass
class SiglipVisionConfig(CLIPVisionConfig):
    """The image tower's shape: HF `SiglipVisionConfig`, CLIP's fields with SigLIP's defaults (B/16 at 224)."""
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    vision_use_head: bool = True  # the MAP head; a tower without it has no image embedding

    @classmethod
    def from_state_dict(cls, weights: dict, head_width: int) -> "SiglipVisionConfig":
        """A timm SigLIP trunk's shape from its weights in this file's names (openclip.siglip_to_ours); heads are
        `head_width` wide. timm's GELU is the exact one (HF's checkpoints of the same towers say tanh)."""
        patch = weights["vision_model.embeddings.patch_embedding.weight"]  # (C, 3, p, p)
        grid = math.isqrt(weights["vision_model.embeddings.position_embedding.weight"].shape[0])  # no class token
        layers = 1 + max(int(k.split(".")[3]) for k in weights if k.startswith("vision_model.encoder.layers."))
        return cls(hidden_size=patch.shape[0], num_hidden_layers=layers, num_channels=patch.shape[1],
                   intermediate_size=weights["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                   num_attention_heads=patch.shape[0] // head_width, image_size=grid * patch.shape[-1],
                   patch_size=patch.shape[-1], hidden_act="gelu")

    def build_tower(self) -> nn.Module:
        """clip.vision_tower's hook: the tower this config describes."""
        return SiglipVisionTransformer(self)

    def build_projection(self, projection_dim: int) -> nn.Module:
        """clip.vision_projection's hook: none, the MAP head's output is already the embedding."""
        return NoProjection(projection_dim)


@dataclass
class SiglipTextConfig(CLIPTextConfig):
    """The text tower's shape: HF `SiglipTextConfig`, CLIP's fields with SigLIP's defaults (no EOS pooling)."""
    vocab_size: int = 32000
    max_position_embeddings: int = 64  # the 64-token window SigLIP was trained with
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    projection_size: int | None = None  # the head's output width; HF's default: hidden_size

    def __post_init__(self):
        self.projection_size = self.projection_size or self.hidden_size


@dataclass
class SiglipConfig:
    """Both towers: HF `SiglipConfig`; the joint width is the image tower's (the MAP head keeps it)."""
    vision: SiglipVisionConfig
    text: SiglipTextConfig
    logit_scale_init_value: float = math.log(10)  # SigLIP's initial t' (paper section 3); a checkpoint has its own
    logit_bias_init_value: float = -10.0

    @property
    def projection_dim(self) -> int:
        return self.vision.hidden_size

    @classmethod
    def from_hf(cls, config: dict) -> "SiglipConfig":
        return cls(vision=SiglipVisionConfig.from_hf(config.get("vision_config") or {}),
                   text=SiglipTextConfig.from_hf(config.get("text_config") or {}))


class NoProjection(nn.Identity):
    """In the place of CLIP's visual_projection: no weights; `out_features` as an nn.Linear has it."""

    def __init__(self, width: int):
        super().__init__()
        self.out_features = width


class SiglipVisionEmbeddings(nn.Module):
    """Patchify with a biased stride-p convolution and add learned positions (no class token)."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                                         stride=config.patch_size)
        self.position_embedding = nn.Embedding((config.image_size // config.patch_size) ** 2, config.hidden_size)

    def positions(self, height: int, width: int) -> torch.Tensor:
        """(h·w, C) position embeddings of an (h, w) patch grid: the trained table, or its bicubic resize to
        another grid (HF `SiglipVisionEmbeddings.interpolate_pos_encoding`)."""
        table = self.position_embedding.weight  # (g², C)
        if table.shape[0] == height * width and height == width:
            return table
        grid = math.isqrt(table.shape[0])
        square = table.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)  # (1, C, g, g)
        resized = F.interpolate(square, size=(height, width), mode="bicubic", align_corners=False)  # (1, C, h, w)
        return resized.permute(0, 2, 3, 1).reshape(height * width, -1)  # (h·w, C), row-major

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype))  # (B, C, H/p, W/p)
        height, width = patches.shape[-2:]
        patches = patches.flatten(2).transpose(1, 2)  # (B, N, C) with N = (H/p)(W/p), row-major
        return patches + self.positions(height, width).to(patches.dtype)


class SiglipAttentionPool(nn.Module):
    """HF `SiglipMultiheadAttentionPoolingHead` (big_vision's MAPHead): a learned probe attends over the tokens,
    then x + mlp(LN(x)). The attention keeps nn.MultiheadAttention's packed names (`attention.in_proj_weight`,
    rows [q; k; v], `attention.out_proj`) and runs through SDPA."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        C = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.probe = nn.Parameter(torch.zeros(1, 1, C))
        self.attention = nn.Module()
        self.attention.in_proj_weight = nn.Parameter(torch.zeros(3 * C, C))
        self.attention.in_proj_bias = nn.Parameter(torch.zeros(3 * C))
        self.attention.out_proj = nn.Linear(C, C)
        self.layernorm = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(C, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        w_q, w_kv = self.attention.in_proj_weight.split([C, 2 * C])  # (C, C), (2C, C)
        b_q, b_kv = self.attention.in_proj_bias.split([C, 2 * C])
        q = F.linear(self.probe.to(x.dtype), w_q, b_q).expand(B, 1, C)  # the probe's query, shared by the batch
        k, v = F.linear(x, w_kv, b_kv).chunk(2, dim=-1)  # (B, N, C) each
        # (B, T, C) -> (B, nh, T, hs); softmax(q kᵀ / sqrt(hs)) v over all N tokens
        q, k, v = (t.reshape(B, t.shape[1], self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, 1, hs)
        y = self.attention.out_proj(y.transpose(1, 2).reshape(B, 1, C))  # (B, 1, C)
        y = y + self.mlp(self.layernorm(y))
        return y[:, 0]  # (B, C)


class SiglipVisionTransformer(nn.Module):
    """HF `SiglipVisionTransformer`: embeddings, encoder, `post_layernorm`, MAP `head`."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        if not config.vision_use_head:
            raise ValueError("a SigLIP image tower without its MAP head (vision_use_head false) has no image embedding")
        self.embeddings = SiglipVisionEmbeddings(config)
        self.pre_layrnorm = nn.Identity()  # SigLIP has no pre-norm; kept so the layout matches CLIP's ViT (train.py)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = SiglipAttentionPool(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.encoder(self.embeddings(pixel_values), causal=False)  # (B, N, C)
        return self.head(self.post_layernorm(x))  # (B, C)


class SiglipTextTransformer(nn.Module):
    """HF `SiglipTextTransformer`: token + position embeddings, bidirectional encoder, `final_layer_norm`, the
    last position, `head`."""

    def __init__(self, config: SiglipTextConfig):
        super().__init__()
        self.embeddings = nn.Module()  # HF nests the two tables under `embeddings.`
        self.embeddings.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embeddings.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.projection_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        x = self.embeddings.token_embedding(input_ids) + self.embeddings.position_embedding.weight[:T]  # (B, T, C)
        # no causal and no padding mask, as SigLIP was trained: every position sees the whole padded row
        x = self.final_layer_norm(self.encoder(x, causal=False))
        return self.head(x[:, -1])  # the last position: (B, D)


class SigLIP(CLIP):
    """HF `SiglipModel` as clip.py's CLIP (its encode_image, encode_text and grad checkpointing): the MAP head's
    output is the image embedding and the text `head` the text one, so both projections are identities; the
    (B, 64) token ids are padded to the full window. `logit_bias` is the sigmoid loss's b."""

    def __init__(self, config: SiglipConfig):
        nn.Module.__init__(self)  # CLIP's towers are not built: SigLIP's own are
        if config.text.projection_size != config.vision.hidden_size:
            raise ValueError(f"text head width {config.text.projection_size} != image width "
                             f"{config.vision.hidden_size}")
        self.config = config
        self.text_model = SiglipTextTransformer(config.text)
        self.vision_model = SiglipVisionTransformer(config.vision)
        self.visual_projection = vision_projection(config)  # none: NoProjection
        self.text_projection = nn.Identity()  # the text tower's `head` already maps into the joint space
        self.logit_scale = nn.Parameter(torch.full((1,), config.logit_scale_init_value))  # log of t
        self.logit_bias = nn.Parameter(torch.full((1,), config.logit_bias_init_value))  # b: sigmoid(t·cos + b)

    @classmethod
    def from_pretrained(cls, folder: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> "SigLIP":
        """Load an HF SigLIP folder (`config.json` + safetensors) strictly, built on the meta device."""
        from .weights import ModelFolderError, load_safetensors_folder, load_state_dict_strict, read_config
        config = read_config(folder)
        if config.get("model_type") != "siglip":
            raise ModelFolderError(f"{folder}: model_type {config.get('model_type')!r}; expected a Hugging Face "
                                   f"SiglipModel folder (model_type 'siglip'; SigLIP2 NaFlex is not supported)")
        if not (config.get("vision_config") or {}).get("vision_use_head", True):
            raise ModelFolderError(f"{folder}/config.json: vision_use_head is false, so the image tower has no "
                                   f"embedding; use a full SiglipModel checkpoint")
        with torch.device("meta"):
            model = cls(SiglipConfig.from_hf(config))
        state_dict = load_safetensors_folder(folder, dtype=dtype, device=device, ignore=("position_ids",))
        load_state_dict_strict(model, state_dict, folder, assign=True,
                               remedy="download the whole SiglipModel folder again")
        return model.eval()
