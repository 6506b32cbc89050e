"""LoRA (low-rank adaptation, arXiv 2106.09685) on the `nn.Linear` layers of a frozen model, and merging it back.

A wrapped layer computes `y = W x + b + (alpha / r) · B A dropout(x)` with `A: (r, in)` and `B: (out, r)`; the base
`W`, `b` stay frozen and only `A`, `B` train. As in peft's `LoraLayer` (`peft/tuners/lora/layer.py`, the math only):
`A` starts Kaiming-uniform (a=√5, nn.Linear's own init), `B` starts at zero, so a fresh adapter changes nothing;
dropout applies to the adapter's input only. Merging folds the adapter into the weight, `W' = W + (alpha / r) B A`,
and turns the wrapper back into the plain `nn.Linear`, so the merged model has the original parameter names and
loads into the unmodified architecture.

LLM2CLIP's caption-contrastive stage (its `run_supervised.py`, LLM2Vec's recipe) uses r=16, alpha=2r, dropout 0.05
on q, k, v, o, gate, up and down projections. The adapter's parameters are fp32 whatever the base dtype (a bf16
frozen base with fp32 trainable weights, as mixed precision wants); the adapter's output is cast to the base's.

This file depends on torch only and can be copied into another codebase alone.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRASettings:
    """An adapter configuration: LLM2CLIP/LLM2Vec's by default (r 16, alpha 2r, dropout 0.05, every projection)."""
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` (`self.base`) plus a trainable low-rank update of rank `rank`."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's init; B = 0 makes the update start at 0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        x = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):  # fp32 weights: without autocast the update runs in fp32
            x = x.to(self.lora_A.dtype)  # (under autocast F.linear casts to bf16 itself: an fp32 copy is waste)
        # (..., in) -> (..., r) -> (..., out); the scaling multiplies the rank-r middle, not the wide output
        update = F.linear(F.linear(x, self.lora_A) * self.scaling, self.lora_B)
        return y + update.to(y.dtype)

    @torch.no_grad()
    def delta(self) -> torch.Tensor:
        """(out, in) fp32: the update (alpha/r) B A that merging adds to the base weight."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    @torch.no_grad()
    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` + (alpha/r) B A, summed in fp32 and returned in `weight`'s dtype and device: the one merge
        rule, for the layer's own base weight (`merged`) and for the same weight read from the base's files
        (merge.py)."""
        return (weight.float() + self.delta().to(weight.device)).to(weight.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base layer with W += (alpha/r) B A (`merged_weight`), in place."""
        self.base.weight.copy_(self.merged_weight(self.base.weight))
        return self.base

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def apply_lora(model: nn.Module, rank: int = 16, alpha: float = 32.0, dropout: float = 0.05,
               targets: tuple[str, ...] = DEFAULT_TARGETS) -> list[str]:
    """Freeze every parameter of `model` and wrap each `nn.Linear` whose attribute name is in `targets`.

    Returns the wrapped layers' qualified names; raises if none matched (a typo in `targets` would otherwise
    train nothing).
    """
    model.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                # the new dropout follows the model's train/eval mode (a fresh module would be in train mode)
                setattr(module, child_name, LoRALinear(child, rank, alpha, dropout).train(model.training))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(f"no nn.Linear named {', '.join(targets)} in the model: check the LoRA target modules")
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain `nn.Linear` back (in place); returns `model`."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights only (`...q_proj.lora_A`, `...q_proj.lora_B`), detached: what a checkpoint holds."""
    return {name: param.detach() for name, param in model.named_parameters() if name.endswith((".lora_A", ".lora_B"))}


def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy adapter weights into a model that `apply_lora` wrapped the same way; every key must match."""
    own = lora_state_dict(model)
    missing, unexpected = sorted(own.keys() - state_dict.keys()), sorted(state_dict.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"LoRA weights do not match the model's adapters: {len(missing)} missing "
                         f"({', '.join(missing[:3])}), {len(unexpected)} unexpected ({', '.join(unexpected[:3])}); "
                         "were rank and target modules the same?")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in state_dict:
                if state_dict[name].shape != param.shape:
                    raise ValueError(f"LoRA weight {name}: shape {tuple(state_dict[name].shape)}, the model's "
                                     f"{tuple(param.shape)}; was the rank the same?")
                param.copy_(state_dict[name])
