"""AdamW parameter groups and the learning-rate schedule, shared by train.py and the toy teacher.

As in CLIP and open_clip: no weight decay on biases, norms, embeddings and the temperature; linear warmup,
then cosine decay to zero (open_clip's `cosine_lr`).
"""

import math

import torch


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay applies to weight matrices only: not biases, norms, embeddings or logit_scale."""
    return param.ndim >= 2 and "embedding" not in name and "logit_scale" not in name


def param_groups(model: torch.nn.Module, weight_decay: float, lr_of=lambda name: ("all", None)) -> list[dict]:
    """AdamW groups of the trainable parameters, split by decay and by `lr_of(name)` = (part, lr).

    Each part's peak lr is stored as the group's `base_lr` (the schedule scales it every step); parts with equal
    rates stay separate groups, so the optimizer state's layout never depends on the values of the flags.
    """
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay, (part, lr) = decays(name, param), lr_of(name)
        group = groups.setdefault((part, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0})
        if lr is not None:
            group["base_lr"] = lr
        group["params"].append(param)
    return list(groups.values())


def cosine_lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine decay to 0 at `total` (open_clip's cosine_lr)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
