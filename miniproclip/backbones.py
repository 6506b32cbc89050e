"""Any CLIP folder the project reads, as a model with clip.py's CLIP interface, its tokenizer and its eval transform:
a Hugging Face CLIPModel folder (`config.json`; clip.py and image.py), a Hugging Face SiglipModel folder (model_type
"siglip", SigLIP and fixed-resolution SigLIP2; siglip.py) or an open_clip hub folder (`open_clip_config.json`, ViT
or EVA02-CLIP; openclip.py maps it onto the same HF names). Everything that takes `--clip` loads it through here.
"""

import os

import torch

from .clip import CLIP
from .image import ImageTransform
from .openclip import image_transform, is_siglip, load_clip as load_open_clip
from .siglip import SigLIP, SiglipConfig
from .tokenizer import CLIPTokenizer, siglip_tokenizer
from .weights import is_open_clip_folder, read_config, read_model_config, read_open_clip_config


def is_siglip_folder(folder: str) -> bool:
    """An HF folder whose config.json says model_type "siglip" (or "siglip2", which siglip.py refuses by name)."""
    config = os.path.join(folder, "config.json")
    return os.path.isfile(config) and str(read_config(folder).get("model_type")).startswith("siglip")


def load_clip(folder: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> CLIP | SigLIP:
    """The CLIP (or SigLIP) of `folder`, an HF or open_clip folder (strict load, built on the meta device)."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return load_open_clip(folder, dtype=dtype, device=device)  # its errors name both kinds of folder
    if is_siglip_folder(folder):
        return SigLIP.from_pretrained(folder, dtype=dtype, device=device)
    return CLIP.from_pretrained(folder, dtype=dtype, device=device)


def load_tokenizer(folder: str) -> CLIPTokenizer:
    """Captions -> the text tower's ids: CLIP's 77 tokens, or SigLIP's 64 (its window, padded in full)."""
    if is_siglip_folder(folder):
        window = (read_config(folder).get("text_config") or {}).get("max_position_embeddings", 64)
        return siglip_tokenizer(folder, window)
    if is_open_clip_folder(folder) and is_siglip(model_cfg := read_open_clip_config(folder)["model_cfg"]):
        text_cfg = model_cfg.get("text_cfg") or {}  # open_clip's HFTokenizer: clean "canonicalize" on both SigLIPs
        return siglip_tokenizer(folder, text_cfg.get("context_length", 64),
                                (text_cfg.get("tokenizer_kwargs") or {}).get("clean") == "canonicalize")
    return CLIPTokenizer.from_folder(folder)


def load_transform(folder: str) -> ImageTransform:
    """The eval preprocessing of `folder`: HF's preprocessor_config.json, an open_clip folder's preprocess_cfg, or
    CLIP's defaults when neither is there."""
    return image_transform(folder) if is_open_clip_folder(folder) else ImageTransform.from_folder(folder)


def joint_width(folder: str) -> int:
    """D, the width of `folder`'s joint embedding space, from its config alone (HF CLIP `projection_dim`, HF
    SigLIP's vision width, whose MAP head output is the embedding, open_clip `embed_dim`): what a text head maps to,
    known before the weights are read."""
    config = read_model_config(folder)
    if is_open_clip_folder(folder):
        return config["model_cfg"]["embed_dim"]
    if is_siglip_folder(folder):
        return SiglipConfig.from_hf(config).projection_dim
    return config.get("projection_dim", 512)
