"""The trainable text head H that maps a frozen LLM embedding into CLIP's joint space.

Mirrors `TextProj` of the official ProCLIP code (VisionXLab/ProCLIP) and LLM2CLIP's adapter (paper section 3.1):

    x = normalize(e)                              e: mean-pooled LLM embedding, (B, d)
    x = x + fc2(GELU(fc1(LN(x))))                 N pre-norm residual blocks, fc1: d -> r·d, fc2: r·d -> d
    y = proj(LN(x))                               proj: d -> D (CLIP's projection_dim), with bias

ProCLIP uses N=1, r=8; LLM2CLIP N=4, r=2. This file depends on torch only.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class HeadConfig:
    input_dim: int  # d, the LLM's hidden size
    output_dim: int  # D, CLIP's joint embedding width (projection_dim)
    num_blocks: int = 1  # N residual MLP blocks
    mlp_ratio: int = 8  # r, width of each block's hidden layer relative to d
    dropout: float = 0.0
    normalize_input: bool = True  # ProCLIP's TextProj L2-normalises e; LLM2CLIP's adapter does not (released.py)


class ResidualMLPBlock(nn.Module):
    """x + fc2(dropout(GELU(fc1(LN(x)))))."""

    def __init__(self, dim: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.dropout(F.gelu(self.fc1(self.norm(x)))))


class TextHead(nn.Module):
    """(B, d) LLM embeddings -> (B, D) text features in CLIP's joint space (unnormalised, like CLIP's)."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(ResidualMLPBlock(config.input_dim, config.mlp_ratio, config.dropout)
                                    for _ in range(config.num_blocks))
        self.norm = nn.LayerNorm(config.input_dim)
        self.proj = nn.Linear(config.input_dim, config.output_dim)

    def forward(self, llm_embedding: torch.Tensor) -> torch.Tensor:
        # The cached embeddings are fp32 means of hidden states whose norm varies with the LLM; the official
        # code L2-normalises them first so the head sees unit vectors.
        x = llm_embedding.float()  # (B, d)
        x = F.normalize(x, dim=-1) if self.config.normalize_input else x
        for block in self.blocks:
            x = block(x)
        return self.proj(self.norm(x))  # (B, D)
