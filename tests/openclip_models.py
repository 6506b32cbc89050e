"""Tiny random open_clip models written as the hub serves them (open_clip_config.json + weights), by open_clip and
timm themselves: the references of the parity tests (test-only packages, requirements-dev.txt).

timm and open_clip import torchvision, whose PyPI wheel does not load its C ops on a CPU-only torch:
conftest.py's `declare_missing_torchvision_ops` lets it import.
"""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}
EVA_TINY = {"embed_dim": 128, "depth": 2, "num_heads": 2}  # 64-wide heads, as every EVA02-CLIP


def import_references():
    """(open_clip, timm), or a skip when either is not installed (conftest.py makes torchvision importable)."""
    return pytest.importorskip("open_clip"), pytest.importorskip("timm")


def vit_config(quick_gelu=True, layer_scale=True, custom_text=False, image_size=32):
    vision = {"image_size": image_size, "layers": 2, "width": 48, "head_width": 12, "patch_size": 8}
    text = dict(TEXT)
    if layer_scale:
        vision["ls_init_value"] = text["ls_init_value"] = 0.5
    config = {"embed_dim": 24, "quick_gelu": quick_gelu, "vision_cfg": vision, "text_cfg": text}
    return {**config, "custom_text": True} if custom_text else config


def eva_config(timm_name):
    size = 336 if timm_name.endswith("336") else 224
    return {"embed_dim": 24, "vision_cfg": {"image_size": size, "timm_model_name": timm_name,
                                            "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": None},
            "text_cfg": dict(TEXT), "custom_text": True}


def tiny_timm(monkeypatch):
    """Make open_clip's timm towers tiny (its TimmModel passes no size arguments to timm.create_model)."""
    _, timm = import_references()
    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, **kwargs: create(name, **{**kwargs, **EVA_TINY}))


def randomise(model, seed):
    """Perturb every parameter (init leaves layer scales, biases and norms constant, which would hide mix-ups)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def write_open_clip(folder, model_cfg, preprocess_cfg=None, seed=0, weights="safetensors"):
    """Build open_clip's model from `model_cfg`, randomise it, write the folder; returns open_clip's own reading
    of the folder (create_model('local-dir:...')), eval mode."""
    open_clip, _ = import_references()
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(seed)
    cls = open_clip.CustomTextCLIP if model_cfg.get("custom_text") else open_clip.CLIP
    model = cls(**{k: v for k, v in model_cfg.items() if k != "custom_text"})
    randomise(model, seed)
    state = model.state_dict()
    if weights == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, "open_clip_model.safetensors"))
    else:
        torch.save(state, os.path.join(folder, "open_clip_pytorch_model.bin"))
    with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}, f)
    return open_clip.create_model(f"local-dir:{folder}").eval()
