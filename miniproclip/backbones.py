"""Any CLIP folder the project reads, as clip.py's CLIP and its eval transform: a Hugging Face CLIPModel folder
(`config.json`; clip.py and image.py) or an open_clip hub folder (`open_clip_config.json`, ViT or EVA02-CLIP;
openclip.py maps it onto the same HF names). Everything that takes `--clip` loads it through here.
"""

import os

import torch

from .clip import CLIP
from .image import ImageTransform
from .openclip import image_transform, load_clip as load_open_clip
from .weights import is_open_clip_folder, read_model_config


def load_clip(folder: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> CLIP:
    """The CLIP of `folder`, an HF or open_clip folder (strict load, built on the meta device)."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return load_open_clip(folder, dtype=dtype, device=device)  # its errors name both kinds of folder
    return CLIP.from_pretrained(folder, dtype=dtype, device=device)


def load_transform(folder: str) -> ImageTransform:
    """The eval preprocessing of `folder`: HF's preprocessor_config.json, an open_clip folder's preprocess_cfg, or
    CLIP's defaults when neither is there."""
    return image_transform(folder) if is_open_clip_folder(folder) else ImageTransform.from_folder(folder)



def joint_width(folder: str) -> int:
    """D, the width of `folder`'s joint embedding space, from its config alone (HF `projection_dim`, open_clip
    `embed_dim`): what a text head maps to, known before the weights are read."""
    config = read_model_config(folder)
    return config["model_cfg"]["embed_dim"] if is_open_clip_folder(folder) else config.get("projection_dim", 512)
