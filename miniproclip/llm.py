"""A decoder LLM used as a frozen text embedder: Llama, Mistral, Qwen2 and Qwen3 layouts from an HF folder.

Mirrors transformers `models/llama/modeling_llama.py`, `models/mistral`, `models/qwen2`, `models/qwen3` (key names
and numerics: RMSNorm in fp32, rotate-half RoPE with cos/sin in fp32, GQA, SwiGLU MLP), without the generation
cache. In ProCLIP (paper section 3.1, following LLM2CLIP) a caption's embedding is the mean of the final-norm
hidden states over its real tokens; `mean_pool` does that, and `DecoderLM.forward` returns those states.

Differences between the four layouts, all read from `config.json`:
- Qwen2 has biases on q/k/v (not o); Llama/Qwen3 have biases on all four when `attention_bias` is set.
- Qwen3 RMS-normalises q and k per head (`q_norm`, `k_norm`) before RoPE, and gives `head_dim` explicitly.
- Llama 3.1+ rescales the RoPE frequencies (`rope_scaling` of type `llama3`).
- `rope_theta` sits at the top level in older configs and in `rope_parameters` in transformers ≥5 ones.
- `is_causal: false` (gte-Qwen2-7B-instruct) runs bidirectional attention, as transformers ≥5.2 (`masking_utils.
  create_causal_mask`) and vLLM do; NV-Embed's folder (`model_type` "nvembed") holds a bidirectional Mistral as
  `text_config`, its weights under `embedding_model.` (`decoder_key`).

Poolings: `mean_pool` (ProCLIP/LLM2CLIP, LLM2Vec) and `last_token_pool` (e5-mistral, gte-Qwen2, Qwen3-Embedding);
NV-Embed's latent-attention pooling is in nvembed.py.

This file depends on torch only and can be copied into another codebase alone.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class LLMConfig:
    """A decoder's shape, from an HF causal-LM `config.json` (field names are HF's)."""
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32  # < num_attention_heads: grouped-query attention
    head_dim: int = 128  # Qwen3 sets it explicitly; otherwise hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    qkv_bias: bool = False  # biases on q/k/v projections (always for Qwen2)
    o_bias: bool = False  # bias on the output projection (Llama/Qwen3 `attention_bias`)
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3's per-head RMSNorm of q and k
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # {"rope_type": "llama3", "factor": 8.0, ...} or empty
    sliding_window: int | None = None  # Mistral v0.1 limits attention to the last `sliding_window` keys
    is_causal: bool = True  # False: the checkpoint was trained with bidirectional attention (config.json `is_causal`)

    @classmethod
    def from_hf(cls, config: dict) -> "LLMConfig":
        if config.get("model_type") == "nvembed":  # NV-Embed: a bidirectional Mistral (configuration_nvembed.py)
            return cls.from_hf({**config["text_config"], "model_type": "mistral", "is_causal": False})
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported LLM model_type {model_type!r}; "
                             f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        # transformers ≥5 writes `rope_parameters` (theta + scaling together); older configs split them.
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"unsupported rope type {rope_type!r}; supported: default, linear, llama3")
        attention_bias = bool(config.get("attention_bias", False))
        # Qwen2/Qwen3 only apply their sliding window when `use_sliding_window` is set; Mistral always does.
        window = config.get("sliding_window") if config.get("use_sliding_window", model_type == "mistral") else None
        return cls(
            model_type=model_type, vocab_size=config["vocab_size"], hidden_size=hidden,
            intermediate_size=config["intermediate_size"], num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads, rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            hidden_act=config.get("hidden_act", "silu"), qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias and model_type != "qwen2", mlp_bias=bool(config.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3", rope_theta=float(rope_theta),
            rope_scaling=rope if rope_type != "default" else {}, sliding_window=window,
            is_causal=bool(config.get("is_causal", True)))

    @classmethod
    def from_folder(cls, folder: str) -> "LLMConfig":
        """`from_hf` of a folder's config.json, with one-line errors naming the folder."""
        from .weights import ModelFolderError, read_config
        config = read_config(folder)
        if config.get("model_type") == "clip":
            raise ModelFolderError(f"{folder}: this is a CLIP folder (model_type 'clip'): pass it as the CLIP "
                                   f"(clip, --clip); the LLM (llm, --llm) must be a decoder LLM ({', '.join(SUPPORTED_MODEL_TYPES)})")
        try:
            return cls.from_hf(config)
        except KeyError as err:
            raise ModelFolderError(f"{folder}: config.json has no {err} field; is this a decoder LLM folder?") from None
        except ValueError as err:
            raise ModelFolderError(f"{folder}: {err}") from None


def rope_inverse_frequencies(config: LLMConfig, device=None) -> torch.Tensor:
    """θ_i = theta^(-2i/d) for i < d/2, with Llama-3's or linear rescaling (HF `modeling_rope_utils.py`)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    scaling = config.rope_scaling
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":  # positions divided by `factor`
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        # Llama 3.1: wavelengths longer than the original context / low_freq_factor are slowed by `factor`,
        # shorter than original / high_freq_factor are kept, and the band between is interpolated smoothly.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension (HF's RoPE layout, not interleaved)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) * weight, computed in fp32 and cast back before the weight, as HF does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE (HF `LlamaAttention` names), run by SDPA."""

    def __init__(self, config: LLMConfig, causal: bool = True):
        super().__init__()
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.causal = causal  # with no mask: SDPA's own causal masking (True) or none at all (False)
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=config.o_bias)
        if config.qk_norm:  # Qwen3
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, nh, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, nkv, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hs)
        # RoPE: rotate each (q, k) pair by its position's angles; cos/sin are (B, 1, T, hs)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # GQA: each kv head serves n_heads / n_kv_heads consecutive query heads. SDPA's `enable_gqa` is taken by
        # the flash kernel (no mask) and by the CPU kernel, but a mask plus enable_gqa sends a GPU to the slow
        # math kernel; there the kv heads are repeated instead (HF's `repeat_kv`), which the efficient kernel takes
        grouped = self.n_kv_heads != self.n_heads
        if grouped and mask is not None and x.device.type != "cpu":
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # (B, nh, T, hs)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            grouped = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None,
                                           enable_gqa=grouped)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, hidden)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x))."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"unsupported LLM hidden_act {config.hidden_act!r}; only silu (SwiGLU) is implemented")
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LLMConfig, causal: bool = True):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, causal)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderLM(nn.Module):
    """HF `LlamaModel` (and the Mistral/Qwen2/Qwen3 twins): token embeddings, layers, final norm; no LM head."""

    def __init__(self, config: LLMConfig, causal: bool = True):
        super().__init__()
        self.config = config
        self.causal = causal  # False: bidirectional attention over real tokens (LLM2Vec-style embedders)
        self.grad_checkpointing = False  # True: keep only layer inputs, recompute each layer in backward
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, causal) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def attention_mask(self, attention_mask: torch.Tensor | None, T: int, device) -> torch.Tensor | None:
        """Boolean mask of allowed (query, key) pairs, or None when SDPA needs none (its fast kernels take none).

        - None: no padding, or causal with right padding only (the embedder's): a real token's keys all precede
          it, so no real token can see a pad; the pads' own outputs are never pooled.
        - (B, 1, 1, T), bidirectional with padding: real keys only, the same for every query.
        - (B, 1, T, T), causal with left or inner padding, or a sliding window shorter than T.
        """
        window = self.config.sliding_window if self.causal else None
        windowed = window is not None and T > window
        if attention_mask is None or bool(attention_mask.all()):
            attention_mask = None  # nothing is padded
        elif self.causal and not windowed and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
            attention_mask = None  # right padding: 1…1 0…0 in every row
        if attention_mask is None and not windowed:
            return None
        if not self.causal:  # a row without real tokens sees every key rather than none (softmax of nothing = NaN)
            real = attention_mask.bool()
            return (real | ~real.any(-1, keepdim=True))[:, None, None, :]  # (B, 1, 1, T)
        i = torch.arange(T, device=device)
        allowed = i[:, None] >= i[None, :]  # key j ≤ query i
        if windowed:
            allowed &= i[:, None] - i[None, :] < window
        allowed = allowed[None, None]  # (1, 1, T, T)
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]  # no real token attends to padding
            # a padding query then has no key at all (softmax of nothing = NaN): let it see itself; unused anyway
            allowed = allowed | torch.eye(T, dtype=torch.bool, device=device)
        return allowed

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids and 1/0 mask of real tokens -> (B, T, hidden) final-norm hidden states.

        Positions count real tokens only (cumsum of the mask), so left- and right-padded batches give the
        same states for the same text.
        """
        B, T = input_ids.shape
        if attention_mask is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        else:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        inv_freq = rope_inverse_frequencies(self.config, device=input_ids.device)  # (hs/2,)
        angles = positions[..., None].float() * inv_freq  # (B, T, hs/2), in fp32 as HF does
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, hs)
        x = self.embed_tokens(input_ids)  # (B, T, hidden)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        mask = self.attention_mask(attention_mask, T, input_ids.device)
        for layer in self.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        return self.norm(x)

    @classmethod
    def from_pretrained(cls, folder: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
                        causal: bool = True) -> "DecoderLM":
        """Load an HF causal-LM or base-model folder (or NV-Embed's decoder); built on the meta device, so an 8B model
        exists once. Attention is bidirectional where `causal` is False or config.json says `is_causal: false`."""
        from .weights import load_safetensors_folder, load_state_dict_strict
        llm_config = LLMConfig.from_folder(folder)
        with torch.device("meta"):
            model = cls(llm_config, causal=causal and llm_config.is_causal)
        state_dict = load_safetensors_folder(folder, dtype=dtype, device=device, rename=decoder_key)
        load_state_dict_strict(model, state_dict, folder, assign=True)
        return model.eval()


def decoder_key(key: str) -> str | None:
    """Our name for a checkpoint tensor of the decoder, None for one it does not hold: `*ForCausalLM` folders prefix
    the body with `model.` (their `lm_head` is not needed for embeddings), NV-Embed's with `embedding_model.` (beside
    its `latent_attention_model.` pooler, modeling_nvembed.py `NVEmbedModel`)."""
    if key == "lm_head.weight" or key.startswith("latent_attention_model."):
        return None
    return key.removeprefix("model.").removeprefix("embedding_model.")


def mean_pool(hidden: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, C) states, (B, T) 1/0 mask -> (B, C) fp32 mean over the masked tokens (LLM2CLIP's pooling)."""
    weights = pool_mask.to(torch.float32)[..., None]  # (B, T, 1)
    return (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, C) states, (B, T) 1/0 mask of real tokens -> (B, C) fp32 state of each row's last real token, whether
    the batch is padded on the left or the right (the model cards' `last_token_pool` of e5-mistral, gte-Qwen2 and
    Qwen3-Embedding, which branch on the padding side)."""
    positions = torch.arange(1, attention_mask.shape[1] + 1, device=attention_mask.device)  # (T,)
    last = (attention_mask.long() * positions).argmax(-1)  # (B,) the last 1 of each row: its largest, unique value
    return hidden[torch.arange(len(hidden), device=hidden.device), last].float()
