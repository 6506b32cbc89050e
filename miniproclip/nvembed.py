"""NV-Embed's latent-attention pooling: the token states attend to a learned latent array, then a masked mean.

Mirrors nvidia/NV-Embed-v2 `modeling_nvembed.py` (`LatentAttentionModel`, `PreNorm`, `Attention`, `FeedForward`,
`GEGLU`) and `configuration_nvembed.py` (`LatentAttentionConfig`), with its parameter names, so the folder's
`latent_attention_model.*` tensors load as they are. Per caption (NV-Embed paper, arXiv 2405.17428, sec. 3.2):

    h = h + W_o · MHA(q = W_q·LN(h), k, v = W_kv·LN(latents))   # cross-attention, tokens -> 512 latents, 8 heads
    h = h + W_2 · GEGLU(W_1 · LN(h))                              # feed-forward, 4x wide
    e = mean of h over the pooled tokens, L2-normalised (`output_normalize`)

The queries are the decoder's token states and the keys/values the latents (not the other way round), so the
output keeps one vector per token and the mean pools them. The decoder itself is a bidirectional Mistral, loaded
by `llm.DecoderLM` (config `text_config`, weights `embedding_model.*`, see `llm.decoder_key`).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .llm import mean_pool
from .weights import ModelFolderError, load_safetensors_folder, load_state_dict_strict, read_config

PREFIX = "latent_attention_model."


@dataclass
class LatentAttentionConfig:
    """The pooler's shape: `latent_attention_config` of an NV-Embed config.json (defaults: NV-Embed-v2's)."""
    num_latents_value: int = 512  # rows of the learned latent array
    num_cross_heads: int = 8
    cross_dim_head: int = 4096  # per head: the attention is 8 × 4096 = 32768 wide
    hidden_dim: int = 4096  # the decoder's width (the latents' width too)
    latent_dim: int = 4096  # the token states' width
    output_normalize: bool = True  # L2-normalise the pooled vector

    @classmethod
    def from_hf(cls, config: dict) -> "LatentAttentionConfig":
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in config.get("latent_attention_config", {}).items() if k in fields})


class CrossAttention(nn.Module):
    """`Attention` of modeling_nvembed.py: queries from x, keys and values from the context, no biases."""

    def __init__(self, config: LatentAttentionConfig):
        super().__init__()
        self.heads = config.num_cross_heads
        inner = config.num_cross_heads * config.cross_dim_head
        self.to_q = nn.Linear(config.latent_dim, inner, bias=False)
        self.to_kv = nn.Linear(config.hidden_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, config.latent_dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.to_q(x).view(B, T, self.heads, -1).transpose(1, 2)  # (B, nh, T, hs)
        k, v = self.to_kv(context).chunk(2, dim=-1)  # (B, L, nh·hs) each
        k, v = (t.view(B, context.shape[1], self.heads, -1).transpose(1, 2) for t in (k, v))  # (B, nh, L, hs)
        y = F.scaled_dot_product_attention(q, k, v)  # every token sees every latent: no mask
        return self.to_out(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, latent_dim)


class CrossAttentionBlock(nn.Module):
    """`PreNorm(latent_dim, Attention, context_dim)`: LayerNorm of the tokens and of the latents, then attention."""

    def __init__(self, config: LatentAttentionConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.latent_dim)
        self.norm_context = nn.LayerNorm(config.hidden_dim)
        self.fn = CrossAttention(config)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x), self.norm_context(context))


class GEGLU(nn.Module):
    """x, gate = halves of the last dimension; x · GELU(gate) (exact, erf GELU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForwardBlock(nn.Module):
    """`PreNorm(latent_dim, FeedForward(latent_dim))`: LayerNorm, Linear to 2·4·d, GEGLU, Linear back to d."""

    def __init__(self, config: LatentAttentionConfig, mult: int = 4):
        super().__init__()
        dim = config.latent_dim
        self.norm = nn.LayerNorm(dim)
        self.fn = nn.Module()
        self.fn.net = nn.Sequential(nn.Linear(dim, 2 * mult * dim), GEGLU(), nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn.net(self.norm(x))


class LatentAttention(nn.Module):
    """`LatentAttentionModel`: (B, T, C) decoder states and (B, T) pool mask -> (B, C) fp32 caption embeddings."""

    def __init__(self, config: LatentAttentionConfig):
        super().__init__()
        self.config = config
        self.cross_attend_blocks = nn.ModuleList([CrossAttentionBlock(config), FeedForwardBlock(config)])
        self.latents = nn.Parameter(torch.randn(config.num_latents_value, config.latent_dim))

    def forward(self, hidden: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        cross_attention, feed_forward = self.cross_attend_blocks
        latents = self.latents.to(hidden.dtype).expand(len(hidden), -1, -1)  # (B, L, C), shared by every caption
        hidden = hidden + cross_attention(hidden, latents)
        hidden = hidden + feed_forward(hidden)
        pooled = mean_pool(hidden, pool_mask)  # (B, C) fp32: the instruction prefix and padding left out
        return F.normalize(pooled, dim=-1) if self.config.output_normalize else pooled

    @classmethod
    def from_pretrained(cls, folder: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> "LatentAttention":
        """The `latent_attention_model.*` tensors of an NV-Embed folder (only those are read)."""
        config = read_config(folder)
        if config.get("model_type") != "nvembed":
            raise ModelFolderError(f"{folder}: model_type {config.get('model_type')!r}, but latent-attention pooling "
                                   "needs an NV-Embed folder (model_type 'nvembed'); pick another embedder preset "
                                   "(--embed-preset)")
        with torch.device("meta"):
            model = cls(LatentAttentionConfig.from_hf(config))
        state_dict = load_safetensors_folder(folder, dtype=dtype, device=device, rename=latent_key)
        load_state_dict_strict(model, state_dict, folder, assign=True)
        return model.eval()


def latent_key(key: str) -> str | None:
    """Our name for an NV-Embed checkpoint tensor of the pooler (its own name without the prefix), None otherwise."""
    return key.removeprefix(PREFIX) if key.startswith(PREFIX) else None
