"""CLIP: the ViT image encoder and the 77-token text encoder, loadable from a Hugging Face `CLIPModel` folder.

Mirrors transformers `models/clip/modeling_clip.py` (key names and numerics) and openai/CLIP `clip/model.py`
(the architecture): parameter names are HF's, so an HF checkpoint loads with a strict `load_state_dict`.
In ProCLIP (paper section 3) the image encoder is what stage 2 tunes and the text encoder is the frozen
teacher that stage 1 distils into the LLM embedder + head.

This file depends on torch only and can be copied into another codebase alone.
"""

import json
import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class TowerConfig:
    """The fields HF's `CLIPVisionConfig` and `CLIPTextConfig` share, with the text tower's defaults; each tower's
    config adds its own fields and defaults."""
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    hidden_act: str = "quick_gelu"  # OpenAI checkpoints use QuickGELU; some retrained ones use "gelu"
    layer_norm_eps: float = 1e-5
    layer_scale: bool = False  # not in HF: open_clip's per-channel residual scales (ls_1/ls_2.gamma)

    @classmethod
    def from_hf(cls, config: dict):
        """The config of an HF config dict's fields, keeping the dataclass defaults for absent keys."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})


@dataclass
class CLIPVisionConfig(TowerConfig):
    """The image tower's shape; field names and defaults are HF's `CLIPVisionConfig` (ViT-B/32)."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    projection_bias: bool = False  # not in HF: a biased visual projection (EVA02's head, eva.py)


@dataclass
class CLIPTextConfig(TowerConfig):
    """The text tower's shape; field names and defaults are HF's `CLIPTextConfig`."""
    vocab_size: int = 49408
    max_position_embeddings: int = 77  # the 77-token window
    # Where the sentence is pooled. Configs written before transformers PR #24773 say 2, and then HF pools at
    # argmax(input_ids) (the EOS has the largest id in CLIP's vocabulary); newer ones give the real EOS id and
    # HF pools at its first occurrence. Both are reproduced.
    eos_token_id: int = 49407


@dataclass
class CLIPConfig:
    """Both towers plus the joint space: HF `CLIPConfig` with `text_config` and `vision_config` sub-dicts."""
    vision: CLIPVisionConfig
    text: CLIPTextConfig
    projection_dim: int = 512  # D, the joint embedding width
    logit_scale_init_value: float = 2.6592  # ln(1/0.07), CLIP's initial temperature

    @classmethod
    def from_hf(cls, config: dict) -> "CLIPConfig":
        return cls(vision=CLIPVisionConfig.from_hf(config.get("vision_config") or {}),
                   text=CLIPTextConfig.from_hf(config.get("text_config") or {}),
                   projection_dim=config.get("projection_dim", 512),
                   logit_scale_init_value=config.get("logit_scale_init_value", 2.6592))


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI's sigmoid approximation of GELU, which the original CLIP checkpoints were trained with."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class CLIPAttention(nn.Module):
    """Multi-head self-attention with separate biased q/k/v/out projections (HF naming), run by SDPA."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, C) -> (B, nh, T, hs) for each of q, k, v
        q, k, v = (proj(x).view(B, T, self.num_heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        # softmax(q kᵀ / sqrt(hs)) v; the text tower is causal, the image tower is not
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, nh, T, hs)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class CLIPMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        if hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported CLIP hidden_act {hidden_act!r}; known: {sorted(ACTIVATIONS)}")
        self.act = ACTIVATIONS[hidden_act]
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x)); with layer scale (open_clip's
    `ls_1`/`ls_2`), each branch is first multiplied by a learned per-channel vector."""

    def __init__(self, config: CLIPVisionConfig | CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config.hidden_size, config.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        if config.layer_scale:
            self.layer_scale1 = nn.Parameter(torch.ones(config.hidden_size))  # (C,)
            self.layer_scale2 = nn.Parameter(torch.ones(config.hidden_size))

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        if not hasattr(self, "layer_scale1"):
            x = x + self.self_attn(self.layer_norm1(x), causal)
            return x + self.mlp(self.layer_norm2(x))
        x = x + self.layer_scale1 * self.self_attn(self.layer_norm1(x), causal)
        return x + self.layer_scale2 * self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """The stack of layers, with optional per-layer activation checkpointing (recompute in backward). `layer`
    builds one block from the config (CLIP's here; eva.py passes its EVA02 block), and the forward's extra
    arguments go to every block (CLIP: causal; EVA02: the rotary tables)."""

    def __init__(self, config: CLIPVisionConfig | CLIPTextConfig, layer=CLIPEncoderLayer):
        super().__init__()
        self.layers = nn.ModuleList(layer(config) for _ in range(config.num_hidden_layers))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        for layer in self.layers:
            if self.grad_checkpointing and self.training:
                x = checkpoint(layer, x, *args, use_reentrant=False, **kwargs)
            else:
                x = layer(x, *args, **kwargs)
        return x


class CLIPVisionEmbeddings(nn.Module):
    """Patchify with a stride-p convolution, prepend the class token, add learned positions."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=False)
        num_positions = (config.image_size // config.patch_size) ** 2 + 1  # patches + class token
        self.position_embedding = nn.Embedding(num_positions, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B = pixel_values.shape[0]
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype))  # (B, C, H/p, W/p)
        patches = patches.flatten(2).transpose(1, 2)  # (B, N, C) with N = (H/p)(W/p), row-major
        class_token = self.class_embedding.to(patches.dtype).expand(B, 1, -1)  # (B, 1, C)
        x = torch.cat([class_token, patches], dim=1)  # (B, N+1, C)
        if x.shape[1] != self.position_embedding.num_embeddings:
            side = math.isqrt(self.position_embedding.num_embeddings - 1) * weight.shape[-1]
            raise ValueError(f"image size {tuple(pixel_values.shape[-2:])} does not match the model's {side}x{side}")
        return x + self.position_embedding.weight  # (N+1, C) broadcast over the batch


class CLIPVisionTransformer(nn.Module):
    """HF `CLIPVisionTransformer`: embeddings, `pre_layrnorm` [sic, HF's name], encoder, `post_layernorm`."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.pre_layrnorm(self.embeddings(pixel_values))  # (B, N+1, C)
        x = self.encoder(x, causal=False)
        return self.post_layernorm(x[:, 0])  # the class token only: (B, C)


def vision_tower(config) -> nn.Module:
    """The image tower a vision config describes: HF's ViT here; a config of another file (eva.py's EVA02)
    builds its own tower with `build_tower()`, so this file needs no import of it."""
    return config.build_tower() if hasattr(config, "build_tower") else CLIPVisionTransformer(config)


def vision_projection(config) -> nn.Module:
    """The image features' map into the joint space: HF's Linear, or what the vision config's
    `build_projection(projection_dim)` gives (siglip.py: none, its pooled output is the embedding)."""
    vision = config.vision
    if hasattr(vision, "build_projection"):
        return vision.build_projection(config.projection_dim)
    return nn.Linear(vision.hidden_size, config.projection_dim, bias=vision.projection_bias)


class CLIPTextTransformer(nn.Module):
    """HF `CLIPTextTransformer`: token + position embeddings, causal encoder, `final_layer_norm`, EOS pooling."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.eos_token_id = config.eos_token_id
        self.embeddings = nn.Module()  # HF nests the two tables under `embeddings.`
        self.embeddings.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embeddings.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        x = self.embeddings.token_embedding(input_ids) + self.embeddings.position_embedding.weight[:T]  # (B, T, C)
        # Causal attention and no padding mask: padding sits after the EOS, so the EOS never sees it.
        x = self.final_layer_norm(self.encoder(x, causal=True))
        if self.eos_token_id == 2:  # legacy configs: the EOS is the largest id of each row
            eos_index = input_ids.argmax(dim=-1)
        else:  # the first EOS of each row (the pad id may equal the EOS id)
            eos_index = (input_ids == self.eos_token_id).int().argmax(dim=-1)
        return x[torch.arange(B, device=x.device), eos_index]  # (B, C)


class CLIP(nn.Module):
    """HF `CLIPModel`: both towers, their bias-free projections into the joint space, and `logit_scale`."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config.text)
        self.vision_model = vision_tower(config.vision)
        self.visual_projection = vision_projection(config)
        self.text_projection = nn.Linear(config.text.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))  # log of 1/temperature

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, 3, H, W) preprocessed pixels -> (B, D) image features (HF `get_image_features`)."""
        features = self.visual_projection(self.vision_model(pixel_values))
        return F.normalize(features.float(), dim=-1) if normalize else features

    def encode_text(self, input_ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, T) token ids, T within the window (CLIP 77; SigLIP 64, padded in full) -> (B, D) text features (HF
        `get_text_features`)."""
        features = self.text_projection(self.text_model(input_ids))
        return F.normalize(features.float(), dim=-1) if normalize else features

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vision_model.encoder.grad_checkpointing = enable
        self.text_model.encoder.grad_checkpointing = enable

    @classmethod
    def from_pretrained(cls, folder: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> "CLIP":
        """Load an HF CLIP folder (`config.json` + safetensors); built on the meta device, so never held twice.
        (backbones.load_clip also reads open_clip folders.)"""
        from .weights import ModelFolderError, load_safetensors_folder, load_state_dict_strict, read_config
        config = read_config(folder)
        if config.get("model_type") != "clip":
            kind = "an LLM folder: pass it as the LLM (llm, --llm)" if "num_key_value_heads" in config else "not a CLIP model"
            raise ModelFolderError(f"{folder}: model_type {config.get('model_type')!r} is {kind}; "
                                   "expected a Hugging Face CLIPModel folder (model_type 'clip')")
        with torch.device("meta"):
            model = cls(CLIPConfig.from_hf(config))
        # Checkpoints saved by older transformers also hold the `position_ids` index buffers: we recompute them.
        state_dict = load_safetensors_folder(folder, dtype=dtype, device=device, ignore=("position_ids",))
        load_state_dict_strict(model, state_dict, folder, assign=True)
        return model.eval()


def save_hf_config(config: CLIPConfig, folder: str) -> None:
    """Write `config.json` in HF's `CLIPModel` layout, so the folder loads in miniproclip and transformers."""
    hf_only = lambda tower: {k: v for k, v in tower.__dict__.items() if k not in ("layer_scale", "projection_bias")}
    text = {**hf_only(config.text), "model_type": "clip_text_model", "projection_dim": config.projection_dim}
    vision = {**hf_only(config.vision), "model_type": "clip_vision_model", "projection_dim": config.projection_dim}
    hf = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": config.projection_dim,
          "logit_scale_init_value": config.logit_scale_init_value, "text_config": text, "vision_config": vision}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
