"""The released LLM2CLIP and ProCLIP models, read into model.py's ProCLIP (image tower + text head + temperature).

Two formats, no remote code run:
- eva_clip `CustomCLIP` state dicts (`.pt`/`.pth`/`.bin`, read with `torch.load(weights_only=True)`): `visual.*` an
  EVA02 tower in eva_clip's spellings (baaivision/EVA `EVA-CLIP/rei/eva_clip/eva_vit_model.py`: `attn.q_bias`/
  `v_bias`, `attn.inner_attn_ln`, SwiGLU `mlp.w1/w2/w3` + `mlp.ffn_ln`, rope buffers, which are dropped) or an
  OpenAI ViT in open_clip's names, or a timm SigLIP trunk under `visual.trunk.` (the layout LLM2CLIP's SigLIP2
  release declares: timm vit_so400m_patch14_siglip_224, timm_pool map, 1152 wide; its files are not public here,
  so that layout is read as its config names it, openclip.siglip_to_ours); `text.text_adaptor.*` the adapter;
  `logit_scale` (a SigLIP's `logit_bias` is dropped). A `state_dict` wrapper and DDP's `module.` are removed.
- LLM2CLIP's Hugging Face folders (`LLM2CLIPModel`: `vision_model.*`, `visual_projection`, HF CLIP names, and
  `text_adapter.adaptor.*`), with config.json and preprocessor_config.json.

The adapter (microsoft/LLM2CLIP `llm2clip/eva_clip/model.py` and VisionXLab/ProCLIP `openclip/model.py`, TextProj)
is a Sequential of N LinearBlocks (`ln`, `fn.0` = Linear(d, r·d), GELU, dropout, `fn.3` = Linear(r·d, d)), then
LayerNorm and a biased Linear to the joint space: head.py's TextHead, key for key. N and r are read from the keys
(ProCLIP: 1 block × 8, LLM2CLIP: 4 blocks × 2, the same parameter count). ProCLIP's TextProj L2-normalises the
LLM embedding first; LLM2CLIP's adapter takes it as it is: a 1 × 8 adapter is taken for ProCLIP's, any other for
LLM2CLIP's. Both were trained on llm2vec-llama3 embeddings of their LLM2CLIP Llama-3 LLM (embedder.py's preset).
"""

import math
import os

import torch

from .backbones import load_transform
from .clip import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from .eva import EvaVisionConfig
from .head import HeadConfig
from .image import ImageTransform
from .model import ProCLIP
from .openclip import EVA02_ROPE_GRID, read_tensors, to_ours
from .siglip import SiglipVisionConfig, SiglipVisionTransformer
from .weights import ModelFolderError, load_safetensors_folder, load_state_dict_strict, read_config

EVA_CLIP_SPELLINGS = {"attn.q_bias": "attn.q_proj.bias", "attn.v_bias": "attn.v_proj.bias",
                      "attn.inner_attn_ln.": "attn.norm.", "mlp.w1.": "mlp.fc1_g.", "mlp.w2.": "mlp.fc1_x.",
                      "mlp.w3.": "mlp.fc2.", "mlp.ffn_ln.": "mlp.norm."}  # eva_clip -> timm, inside a block
ADAPTERS = {"text.text_adaptor.": "eva_clip .pt", "text_adapter.adaptor.": "LLM2CLIP Hugging Face folder"}
OPENAI_HEAD_WIDTH = 64  # the OpenAI ViTs' attention heads
SIGLIP_HEAD_WIDTHS = {768: 64, 1024: 64, 1152: 72, 1536: 96}  # timm's SigLIP base, large, so400m, giant-opt; else 64


def is_released(path: str) -> bool:
    """A released checkpoint file (not train.py's `.state.pt`), or an LLM2CLIP Hugging Face folder."""
    if os.path.isfile(path):
        return path.endswith((".pt", ".pth", ".bin")) and not path.endswith(".state.pt")
    config = os.path.join(path, "config.json")
    return os.path.isfile(config) and "LLM2CLIPModel" in (read_config(path).get("architectures") or [])


def eva_clip_to_timm(weights: dict) -> dict:
    """eva_clip's EVA02 (`visual.*`) -> open_clip's timm layout (`visual.trunk.*`), its rope tables dropped (eva.py
    recomputes them); a state dict without an EVA02 tower (no `visual.cls_token`) is returned as it is."""
    if "visual.cls_token" not in weights:
        return weights
    out = {}
    for key, value in weights.items():
        if key.endswith(("rope.freqs_cos", "rope.freqs_sin")):
            continue
        if key.startswith("visual."):
            for theirs, timm_name in EVA_CLIP_SPELLINGS.items():
                key = key.replace(f".{theirs}", f".{timm_name}")
            key = "visual.trunk." + key.removeprefix("visual.")
        out[key] = value
    return out


def adapter_to_head(weights: dict, prefix: str) -> tuple[dict, HeadConfig]:
    """The adapter's keys under `prefix` -> TextHead's (`text_head.*`), and its shape read from them."""
    blocks = sorted({int(k[len(prefix):].split(".")[0]) for k in weights if k.startswith(prefix) and ".fn.0." in k})
    if blocks != list(range(len(blocks))) or not blocks:
        raise KeyError(f"{prefix}N.fn.0.weight for blocks 0..N-1")
    n = len(blocks)
    names = {f"{prefix}{n}.": "text_head.norm.", f"{prefix}{n + 1}.": "text_head.proj."}  # LayerNorm, Linear
    for i in blocks:
        names.update({f"{prefix}{i}.ln.": f"text_head.blocks.{i}.norm.",
                      f"{prefix}{i}.fn.0.": f"text_head.blocks.{i}.fc1.",  # fn.1: GELU, fn.2: dropout
                      f"{prefix}{i}.fn.3.": f"text_head.blocks.{i}.fc2."})
    out = {}
    for key, value in weights.items():
        match = next((p for p in names if key.startswith(p)), None)
        out[names[match] + key[len(match):] if match else key] = value
    fc1, proj = out["text_head.blocks.0.fc1.weight"], out["text_head.proj.weight"]  # (r·d, d), (D, d)
    ratio = fc1.shape[0] // fc1.shape[1]
    return out, HeadConfig(input_dim=fc1.shape[1], output_dim=proj.shape[0], num_blocks=n, mlp_ratio=ratio,
                           normalize_input=(n, ratio) == (1, 8))


def vit_vision_config(weights: dict) -> CLIPVisionConfig:
    """An OpenAI ViT's shape from its weights (clip.py's names): QuickGELU, 64-wide heads."""
    patch = weights["vision_model.embeddings.patch_embedding.weight"]  # (C, 3, p, p)
    grid = round((weights["vision_model.embeddings.position_embedding.weight"].shape[0] - 1) ** 0.5)
    layers = 1 + max(int(k.split(".")[3]) for k in weights if k.startswith("vision_model.encoder.layers."))
    return CLIPVisionConfig(hidden_size=patch.shape[0], num_hidden_layers=layers,
                            intermediate_size=weights["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                            num_attention_heads=patch.shape[0] // OPENAI_HEAD_WIDTH, image_size=grid * patch.shape[-1],
                            patch_size=patch.shape[-1], hidden_act="quick_gelu")


def _read(path: str) -> tuple[dict, str, dict | None]:
    """(weights in clip.py's names and the adapter's own, adapter prefix, HF vision config or None)."""
    if os.path.isdir(path):  # LLM2CLIP's HF folder: HF CLIP names already, its vision config in config.json
        weights = load_safetensors_folder(path, dtype=torch.float32, ignore=("position_ids",))
        return weights, "text_adapter.adaptor.", read_config(path).get("vision_config") or {}
    return to_ours(eva_clip_to_timm(read_tensors(path))), "text.text_adaptor.", None


def load_released(path: str) -> ProCLIP:
    """A released LLM2CLIP/ProCLIP model as ProCLIP (fp32, eval mode), strictly loaded; one-line errors."""
    remedy = ("pass a released LLM2CLIP/ProCLIP checkpoint (an eva_clip CustomCLIP state dict with visual.* and "
              "text.text_adaptor.*) or an LLM2CLIP Hugging Face folder")
    weights, prefix, hf_vision = _read(path)
    try:
        weights, head = adapter_to_head(weights, prefix)
        if hf_vision is not None:
            vision = CLIPVisionConfig.from_hf(hf_vision)
        elif "vision_model.encoder.layers.0.mlp.gate_proj.weight" in weights:  # EVA02's SwiGLU
            vision = EvaVisionConfig.from_state_dict(weights, EVA02_ROPE_GRID)
        elif "vision_model.head.probe" in weights:  # a timm SigLIP trunk's MAP pool (LLM2CLIP's SigLIP2)
            width = weights["vision_model.head.probe"].shape[-1]
            vision = SiglipVisionConfig.from_state_dict(weights, SIGLIP_HEAD_WIDTHS.get(width, 64))
        else:
            vision = vit_vision_config(weights)
    except (KeyError, ValueError) as err:
        raise ModelFolderError(f"{path}: no image tower and text adapter found ({type(err).__name__}: {err}); "
                               f"{remedy}") from None
    config = CLIPConfig(vision=vision, text=CLIPTextConfig(), projection_dim=head.output_dim)
    weights.setdefault("logit_scale", torch.tensor(config.logit_scale_init_value))  # HF folders may lack it
    weights["logit_scale"] = weights["logit_scale"].reshape(())  # a SigLIP's is (1,)
    weights.pop("logit_bias", None)  # a SigLIP's sigmoid-loss bias: ProCLIP has none
    with torch.device("meta"):
        model = ProCLIP(config, head)
    load_state_dict_strict(model, {k: v.float() for k, v in weights.items()}, path, assign=True, remedy=remedy)
    return model.eval()


def released_transform(path: str, model: ProCLIP) -> ImageTransform:
    """The preprocessing: an HF folder's preprocessor_config.json, else eva_clip's eval transform (bicubic
    short-side resize to the tower's input size, centre crop, OpenAI mean/std)."""
    if os.path.isdir(path):
        return load_transform(path)
    embeddings = model.vision_model.embeddings
    if isinstance(model.vision_model, SiglipVisionTransformer):  # big_vision's resize(size)|value_range(-1, 1)
        size = embeddings.patch_embedding.weight.shape[-1] * math.isqrt(embeddings.position_embedding.weight.shape[0])
        return ImageTransform(size=(size, size), crop_size=None, mean=(0.5,) * 3, std=(0.5,) * 3)
    size = embeddings.patch_embedding.weight.shape[-1] * math.isqrt(embeddings.position_embedding.weight.shape[0] - 1)
    return ImageTransform(size=size, crop_size=(size, size))
