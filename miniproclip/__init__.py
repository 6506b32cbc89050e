"""miniproclip: a small, readable PyTorch implementation of ProCLIP (arXiv 2510.18795).

A frozen decoder LLM plus a trainable head becomes CLIP's text encoder in two stages: stage 1 distils the CLIP
text encoder into LLM+head, stage 2 tunes the image encoder contrastively with a self-distillation regulariser.

    model = miniproclip.load_model("runs/stage2")  # a run folder, a checkpoint or an exported folder (api.py)
"""

__version__ = "0.1.0"


def __getattr__(name):
    """`miniproclip.load_model` without importing api.py (and all it needs) on `import miniproclip.clip`."""
    if name == "load_model":
        from .api import load_model
        return load_model
    raise AttributeError(f"module 'miniproclip' has no attribute {name!r}")
