"""miniproclip: a small, readable PyTorch implementation of ProCLIP (arXiv 2510.18795).

A frozen decoder LLM plus a trainable head becomes CLIP's text encoder in two stages: stage 1 distils the CLIP
text encoder into LLM+head, stage 2 tunes the image encoder contrastively with a self-distillation regulariser.
"""

__version__ = "0.1.0"
