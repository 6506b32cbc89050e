"""open_clip folders (`open_clip_config.json` + `open_clip_model.safetensors`): read into clip.py's HF-named CLIP.

Mirrors open_clip `factory.py` (a local/hub folder: its config's `model_cfg` and `preprocess_cfg`, the weights,
`load_checkpoint`), `model.py` (CLIPVisionCfg/CLIPTextCfg, CLIP and CustomTextCLIP key layouts),
`transformer.py` (VisionTransformer, TextTransformer, ResidualAttentionBlock: nn.MultiheadAttention's fused
`in_proj`, LayerScale `ls_1/ls_2.gamma`, x @ proj matrices), `timm_model.py` (TimmModel: a timm trunk under
`visual.trunk.` whose classifier `head` is the projection) and `transform.py` (PreprocessCfg, image_transform).

Towers read: open_clip's ViT (OpenAI, LAION, DataComp, DFN, MetaCLIP checkpoints; QuickGELU when the config
says `quick_gelu`, layer scale where the weights have it) and timm's EVA02-CLIP towers (eva.py), each with
open_clip's text transformer, pooled at argmax(ids) (its EOS has the largest id). The key mapping is one
function per format, each with its inverse for export: `vit_to_ours` / `vit_from_ours` and `eva_to_ours` /
`eva_from_ours`; clip.py's HF names stay the canonical ones. Weights: safetensors, or open_clip's `.bin`/`.pth`
through `torch.load(weights_only=True)` (tensors only; a pickle needing more is refused, never run).
"""

import json
import os

import torch
from safetensors.torch import load_file, save_file

from .clip import CLIP, CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from .eva import EvaVisionConfig
from .image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTransform
from .siglip import SigLIP, SiglipConfig, SiglipTextConfig, SiglipVisionConfig
from .weights import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, ModelFolderError, load_state_dict_strict, \
    open_clip_weight_file, read_open_clip_config

# timm towers known by name -> (patch, image size); all EVA02-CLIPs scale RoPE onto a 16x16 grid. The other sizes
# (width, depth, MLP width) come from the weights' shapes; heads are 64 wide.
EVA02_TIMM = {"eva02_base_patch16_clip_224": (16, 224), "eva02_large_patch14_clip_224": (14, 224),
              "eva02_large_patch14_clip_336": (14, 336)}
EVA02_ROPE_GRID = 16
# open_clip options that change the architecture, and the values read here (others are training-only)
SUPPORTED = {
    "vision_cfg": {"pool_type": ("tok",), "attentional_pool": (False,), "no_ln_pre": (False,),
                   "pos_embed_type": ("learnable",), "act_kwargs": (None,), "norm_kwargs": (None,)},
    "text_cfg": {"pool_type": ("argmax",), "embed_cls": (False,), "no_causal_mask": (False,), "proj_bias": (False,),
                 "proj_type": ("linear",), "hf_model_name": (None,), "hf_tokenizer_name": (None,),
                 "act_kwargs": (None,), "norm_kwargs": (None,)},
    "timm": {"timm_pool": ("token",), "timm_proj": (None, "", "none"), "timm_proj_bias": (False,)},
}
SIGLIP_SUPPORTED = {  # open_clip's SigLIP configs: a MAP-pooled timm trunk; a bidirectional, last-token text tower
    "vision": {"timm_pool": ("map",), "timm_proj": ("none", None, "")},
    "text": {"pool_type": ("last",), "no_causal_mask": (True,), "proj_bias": (True,), "proj_type": ("linear", None),
             "embed_cls": (False, None), "use_pad_mask": (False, None)},
}
SIGLIP_HEAD_WIDTH = {"base": 64, "large": 64, "so400m": 72, "giantopt": 96}  # timm's vit_<family>_*_siglip_*
ATTENTION_VARIANTS = ("block_type", "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn",
                      "scale_fc")  # open_clip's "custom" attention block: not read

# ----------------------------------------------------------------------------- key mapping, one pair per format

_pairs = lambda pairs: {f"{a}.{leaf}": f"{b}.{leaf}" for a, b in pairs for leaf in ("weight", "bias")}
VIT_OUTER = {  # open_clip -> ours, outside the blocks; the text tower sits at the top (CLIP) or under `text.`
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    **_pairs([("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
              ("ln_final", "text_model.final_layer_norm")]),
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "logit_scale": "logit_scale"}
VIT_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}  # x @ P
VIT_TOWERS = {"visual.transformer.resblocks.": "vision_model.encoder.layers.",
              "transformer.resblocks.": "text_model.encoder.layers."}
VIT_BLOCK = {**_pairs([("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                       ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]),
             "ls_1.gamma": "layer_scale1", "ls_2.gamma": "layer_scale2"}
EVA_OUTER = {**_pairs([("patch_embed.proj", "vision_model.embeddings.patch_embedding"),
                       ("norm", "vision_model.post_layernorm"), ("head", "visual_projection")])}
EVA_RESHAPED = {"cls_token": "vision_model.embeddings.class_embedding",  # (1, 1, C) -> (C,)
                "pos_embed": "vision_model.embeddings.position_embedding.weight"}  # (1, N+1, C) -> (N+1, C)
EVA_BLOCK = _pairs([("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.q_proj", "self_attn.q_proj"),
                    ("attn.k_proj", "self_attn.k_proj"), ("attn.v_proj", "self_attn.v_proj"),
                    ("attn.norm", "self_attn.sub_norm"), ("attn.proj", "self_attn.out_proj"),
                    ("mlp.fc1_g", "mlp.gate_proj"), ("mlp.fc1_x", "mlp.up_proj"), ("mlp.norm", "mlp.norm"),
                    ("mlp.fc2", "mlp.down_proj")])
SIGLIP_OUTER = _pairs([("visual.trunk.patch_embed.proj", "vision_model.embeddings.patch_embedding"),
                       ("visual.trunk.norm", "vision_model.post_layernorm"),
                       ("visual.trunk.attn_pool.proj", "vision_model.head.attention.out_proj"),
                       ("visual.trunk.attn_pool.norm", "vision_model.head.layernorm"),
                       ("visual.trunk.attn_pool.mlp.fc1", "vision_model.head.mlp.fc1"),
                       ("visual.trunk.attn_pool.mlp.fc2", "vision_model.head.mlp.fc2"),
                       ("text.text_projection", "text_model.head")])
SIGLIP_RESHAPED = {"visual.trunk.pos_embed": ("vision_model.embeddings.position_embedding.weight", None),
                   "visual.trunk.attn_pool.latent": ("vision_model.head.probe", (1, 1, -1)),
                   "logit_scale": ("logit_scale", (1,)), "logit_bias": ("logit_bias", (1,))}
SIGLIP_BLOCK = _pairs([("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.proj", "self_attn.out_proj"),
                       ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")])
invert = lambda table: {ours: theirs for theirs, ours in table.items()}


def _block_key(key: str, towers: dict) -> tuple[str, str, str] | None:
    """(our layer prefix, index, the name inside the block) of a block key, else None."""
    for theirs, ours in towers.items():
        if key.startswith(theirs):
            index, inner = key[len(theirs):].split(".", 1)
            return ours, index, inner
    return None


def vit_to_ours(weights: dict) -> dict:
    """open_clip ViT + text transformer names -> clip.py's; the fused in_proj (3C, C) splits into q, k, v."""
    out = {}
    for key, value in weights.items():
        inner = key.removeprefix("text.")  # CustomTextCLIP nests the text tower (other `text.*`: not ours)
        key = inner if inner in VIT_OUTER or inner in VIT_TRANSPOSED or inner.startswith("transformer.") else key
        if key in VIT_OUTER:
            out[VIT_OUTER[key]] = value
        elif key in VIT_TRANSPOSED:  # open_clip applies x @ P with P (in, out); nn.Linear holds (out, in)
            out[VIT_TRANSPOSED[key]] = value.T.contiguous()
        elif (block := _block_key(key, VIT_TOWERS)) and block[2].startswith("attn.in_proj_"):
            prefix, index, inner = block
            for name, part in zip("qkv", value.chunk(3)):  # rows [q; k; v]
                out[f"{prefix}{index}.self_attn.{name}_proj.{inner.rsplit('_', 1)[1]}"] = part.contiguous()
        elif block and block[2] in VIT_BLOCK:
            out[f"{block[0]}{block[1]}.{VIT_BLOCK[block[2]]}"] = value
        elif key != "attn_mask":  # a buffer older checkpoints saved; anything else goes to the strict load as is
            out[key] = value
    return out


def vit_from_ours(weights: dict, text_prefix: str = "") -> dict:
    """The inverse of vit_to_ours (q, k, v fused back); `text_prefix` "text." for a CustomTextCLIP layout."""
    outer, transposed = invert(VIT_OUTER), invert(VIT_TRANSPOSED)
    towers, block_names = invert(VIT_TOWERS), invert(VIT_BLOCK)
    out = {}
    for key, value in weights.items():
        text = key.startswith("text_")
        name = key
        if key in outer:
            name = outer[key]
        elif key in transposed:
            name, value = transposed[key], value.T.contiguous()
        elif (block := _block_key(key, towers)) and block[2].startswith("self_attn.q_proj"):
            prefix, index, inner = block
            leaf = inner.rsplit(".", 1)[1]
            parts = [weights[f"{key.split('.layers.')[0]}.layers.{index}.self_attn.{n}_proj.{leaf}"] for n in "qkv"]
            name, value = f"{prefix}{index}.attn.in_proj_{leaf}", torch.cat(parts)
        elif block and block[2] in block_names:
            name = f"{block[0]}{block[1]}.{block_names[block[2]]}"
        elif block:  # k_proj and v_proj went into the fused in_proj with q_proj
            continue
        out[text_prefix + name if text and name != "logit_scale" else name] = value
    return out


def _rename_eva(weights: dict, names: tuple[dict, dict, dict], towers: dict, strip: str, add: str, reshape) -> dict:
    """Both directions of the EVA02 mapping: keys under `strip` renamed by `names` (outer, reshaped, in-block) and
    put under `add`, the reshaped ones through `reshape`; other keys are left as they are."""
    outer, reshaped, block_names = names
    out = {}
    for key, value in weights.items():
        inner = key.removeprefix(strip)
        if strip and inner == key:  # not under `strip`: not the trunk's
            out[key] = value
        elif inner in outer:
            out[add + outer[inner]] = value
        elif inner in reshaped:
            out[add + reshaped[inner]] = reshape(value)
        elif (block := _block_key(inner, towers)) and block[2] in block_names:
            out[f"{add}{block[0]}{block[1]}.{block_names[block[2]]}"] = value
        else:
            out[key] = value
    return out


def eva_to_ours(weights: dict) -> dict:
    """timm EVA02 names (open_clip: under `visual.trunk.`) -> eva.py's; other keys are left as they are."""
    return _rename_eva(weights, (EVA_OUTER, EVA_RESHAPED, EVA_BLOCK), {"blocks.": "vision_model.encoder.layers."},
                       "visual.trunk.", "", lambda v: v.reshape(-1, v.shape[-1]).squeeze(0))  # drop the batch dims


def eva_from_ours(weights: dict) -> dict:
    """The inverse of eva_to_ours, for the vision tower and projection (`visual.trunk.*`)."""
    return _rename_eva(weights, (invert(EVA_OUTER), invert(EVA_RESHAPED), invert(EVA_BLOCK)),
                       {"vision_model.encoder.layers.": "blocks."}, "", "visual.trunk.",
                       lambda v: v.reshape(1, -1, v.shape[-1]))  # (C,) -> (1, 1, C), (N+1, C) -> (1, N+1, C)


def siglip_to_ours(weights: dict) -> dict:
    """open_clip's SigLIP (a timm ViT trunk with timm_pool "map", timm `vision_transformer.py` VisionTransformer and
    `layers/attention_pool.py` AttentionPoolLatent) -> siglip.py's names: fused `attn.qkv` split into q, k, v; the
    pool's `q` and `kv` packed into `in_proj` rows [q; k; v]; its `latent` is the probe; the text tower's biased
    `text_projection` Linear is the text `head`. Other keys (the rest of the text tower) are left to vit_to_ours;
    a state dict without a MAP pool is returned as it is."""
    if "visual.trunk.attn_pool.latent" not in weights:
        return weights
    out = {}
    for key, value in weights.items():
        inner = key.removeprefix("visual.trunk.")
        block = _block_key(inner, {"blocks.": "vision_model.encoder.layers."}) if inner != key else None
        if key in SIGLIP_OUTER:
            out[SIGLIP_OUTER[key]] = value
        elif key in SIGLIP_RESHAPED:  # (1, N, C) -> (N, C); scalars -> (1,), as HF stores them
            name, shape = SIGLIP_RESHAPED[key]
            out[name] = value.reshape(shape if shape else (-1, value.shape[-1]))
        elif block and block[2].startswith("attn.qkv."):
            for name, part in zip("qkv", value.chunk(3)):  # rows [q; k; v]
                out[f"{block[0]}{block[1]}.self_attn.{name}_proj.{block[2].rsplit('.', 1)[1]}"] = part.contiguous()
        elif block and block[2] in SIGLIP_BLOCK:
            out[f"{block[0]}{block[1]}.{SIGLIP_BLOCK[block[2]]}"] = value
        elif inner.startswith("attn_pool.q."):  # the probe's query projection, then the packed key/value rows
            leaf = inner.rsplit(".", 1)[1]
            packed = torch.cat([value, weights[f"visual.trunk.attn_pool.kv.{leaf}"]])  # (3C, C) or (3C,)
            out[f"vision_model.head.attention.in_proj_{leaf}"] = packed
        elif not inner.startswith("attn_pool.kv."):
            out[key] = value
    return out


def to_ours(weights: dict) -> dict:
    """Any open_clip state dict (ViT, EVA02 or SigLIP image tower, top-level or `text.` text tower) in our names."""
    return vit_to_ours(eva_to_ours(siglip_to_ours(weights)))


def from_ours(weights: dict, eva: bool, text_prefix: str) -> dict:
    """clip.py's names -> open_clip's (the inverse of to_ours), for export."""
    return vit_from_ours(eva_from_ours(weights) if eva else weights, text_prefix)


# ----------------------------------------------------------------------------- config, weights, preprocessing

def read_tensors(path: str) -> dict[str, torch.Tensor]:
    """A safetensors file, or a torch pickle holding only tensors and plain data (`state_dict` unwrapped,
    DDP's `module.` stripped); a pickle that needs more is refused without running it."""
    if path.endswith(".safetensors"):
        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for a refused global; RuntimeError/EOFError for a damaged file
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ModelFolderError(f"{path}: cannot be read as tensors only ({detail}); miniproclip never runs pickled "
                               f"code: save the state dict alone (torch.save(model.state_dict(), path)) or as "
                               f"safetensors") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFolderError(f"{path}: holds no state dict of tensors; pass the model's weights file")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _check_supported(model_cfg: dict, source: str) -> None:
    """One line naming the first open_clip option this loader does not reproduce."""
    vision, text = model_cfg.get("vision_cfg") or {}, model_cfg.get("text_cfg") or {}
    checks = [("vision_cfg", vision, SUPPORTED["vision_cfg"]), ("text_cfg", text, SUPPORTED["text_cfg"])]
    if vision.get("timm_model_name"):
        checks.append(("vision_cfg", vision, SUPPORTED["timm"]))
    for section, cfg, allowed in checks:
        bad = [(k, cfg[k]) for k in allowed if k in cfg and cfg[k] not in allowed[k]]
        bad += [(k, cfg[k]) for k in ATTENTION_VARIANTS if cfg.get(k) not in (None, False, "default")]
        if section == "vision_cfg" and isinstance(vision.get("layers"), (list, tuple)):
            bad.append(("layers", vision["layers"]))  # a ModifiedResNet
        if bad:
            raise ModelFolderError(f"{source}: open_clip option {section}.{bad[0][0]}={bad[0][1]!r} is not supported "
                                   f"(miniproclip reads ViT and EVA02-CLIP towers with open_clip's text transformer)")
    for key in ("multimodal_cfg", "init_logit_bias"):  # CoCa, SigLIP
        if key in model_cfg:
            raise ModelFolderError(f"{source}: open_clip models with {key} (CoCa/SigLIP) are not supported")


def eva_config(name: str, weights: dict, source: str) -> EvaVisionConfig:
    """An EVA02 tower named by timm: sizes from the weights' shapes, checked against the name's patch and size."""
    try:
        config = EvaVisionConfig.from_state_dict(weights, EVA02_ROPE_GRID)
        shapes = f"weights of a {config.hidden_size}-wide, {config.num_hidden_layers}-layer EVA02 tower"
    except (KeyError, ValueError) as err:  # no EVA02 layout in the weights
        config, shapes = None, f"weights that fit no EVA02 tower ({type(err).__name__}: {err})"
    if name not in EVA02_TIMM or config is None:
        raise ModelFolderError(f"{source}: timm tower {name!r} with {shapes}; miniproclip reads the timm towers "
                               f"{', '.join(EVA02_TIMM)} (open_clip's EVA02-B-16, EVA02-L-14, EVA02-L-14-336)")
    if (config.patch_size, config.image_size) != EVA02_TIMM[name]:
        raise ModelFolderError(f"{source}: timm tower {name!r} has patch {EVA02_TIMM[name][0]} at "
                               f"{EVA02_TIMM[name][1]}px, its weights patch {config.patch_size} at "
                               f"{config.image_size}px; the config and the weights are of different models")
    return config


def clip_config(model_cfg: dict, weights: dict, source: str) -> CLIPConfig:
    """clip.py's config of an open_clip `model_cfg`; layer scale is read from the weights (ls_*.gamma present)."""
    _check_supported(model_cfg, source)
    vision_cfg, text_cfg = model_cfg.get("vision_cfg") or {}, model_cfg.get("text_cfg") or {}
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    if vision_cfg.get("timm_model_name"):
        vision = eva_config(vision_cfg["timm_model_name"], weights, source)
    else:
        width, size = vision_cfg.get("width", 768), vision_cfg.get("image_size", 224)
        size = size[0] if isinstance(size, (list, tuple)) and size[0] == size[-1] else size
        vision = CLIPVisionConfig(
            hidden_size=width, intermediate_size=int(width * vision_cfg.get("mlp_ratio", 4.0)),
            num_hidden_layers=vision_cfg.get("layers", 12),
            num_attention_heads=width // vision_cfg.get("head_width", 64),
            image_size=size, patch_size=vision_cfg.get("patch_size", 16), hidden_act=act,
            layer_scale="vision_model.encoder.layers.0.layer_scale1" in weights)
    width = text_cfg.get("width", 512)
    # eos_token_id 2: pool at argmax(ids), open_clip's "argmax" (clip.py's reading of old HF configs)
    text = CLIPTextConfig(
        vocab_size=text_cfg.get("vocab_size", 49408), hidden_size=width,
        intermediate_size=int(width * text_cfg.get("mlp_ratio", 4.0)), num_hidden_layers=text_cfg.get("layers", 12),
        num_attention_heads=text_cfg.get("heads", 8), max_position_embeddings=text_cfg.get("context_length", 77),
        hidden_act=act, eos_token_id=2, layer_scale="text_model.encoder.layers.0.layer_scale1" in weights)
    return CLIPConfig(vision=vision, text=text, projection_dim=model_cfg["embed_dim"])


def is_siglip(model_cfg: dict) -> bool:
    """An open_clip SigLIP config: a timm `vit_*_siglip_*` trunk (open_clip's ViT-*-SigLIP*, LLM2CLIP's SigLIP2)."""
    return "_siglip_" in str((model_cfg.get("vision_cfg") or {}).get("timm_model_name") or "")


def siglip_config(model_cfg: dict, weights: dict, source: str) -> SiglipConfig:
    """siglip.py's config of an open_clip SigLIP `model_cfg`: tower sizes from the weights (siglip_to_ours names),
    head counts from the timm name's family (SIGLIP_HEAD_WIDTH), activations and eps as open_clip builds them."""
    vision_cfg, text_cfg = model_cfg.get("vision_cfg") or {}, model_cfg.get("text_cfg") or {}
    remedy = "use the open_clip_config.json that came with these weights"
    for section, cfg, allowed in (("vision_cfg", vision_cfg, SIGLIP_SUPPORTED["vision"]),
                                  ("text_cfg", text_cfg, SIGLIP_SUPPORTED["text"])):
        bad = [(k, cfg.get(k)) for k in allowed if cfg.get(k) not in allowed[k]]
        if bad:
            raise ModelFolderError(f"{source}: open_clip option {section}.{bad[0][0]}={bad[0][1]!r} is not supported "
                                   f"for a SigLIP tower (miniproclip reads {section}.{bad[0][0]} in "
                                   f"{allowed[bad[0][0]]}); {remedy}")
    family = str(vision_cfg["timm_model_name"]).split("_")[1]  # vit_<family>_patch<p>_siglip_<size>[.tag]
    patch = weights.get("vision_model.embeddings.patch_embedding.weight")  # (C, 3, p, p)
    if family not in SIGLIP_HEAD_WIDTH or patch is None or "vision_model.head.probe" not in weights:
        families = ", ".join(SIGLIP_HEAD_WIDTH)
        raise ModelFolderError(f"{source}: timm tower {vision_cfg['timm_model_name']!r} is not a SigLIP ViT with a "
                               f"MAP pool that miniproclip reads (vit_{{{families}}}_patch*_siglip_*); {remedy}")
    vision = SiglipVisionConfig.from_state_dict(weights, SIGLIP_HEAD_WIDTH[family])
    width = text_cfg.get("width", 512)
    tanh = (text_cfg.get("act_kwargs") or {}).get("approximate") == "tanh"  # SigLIP2's configs
    text = SiglipTextConfig(
        vocab_size=text_cfg.get("vocab_size", 49408), hidden_size=width, num_hidden_layers=text_cfg.get("layers", 12),
        intermediate_size=int(width * text_cfg.get("mlp_ratio", 4.0)), num_attention_heads=text_cfg.get("heads", 8),
        max_position_embeddings=text_cfg.get("context_length", 77), hidden_act="gelu_pytorch_tanh" if tanh else "gelu",
        layer_norm_eps=(text_cfg.get("norm_kwargs") or {}).get("eps", 1e-5), projection_size=model_cfg["embed_dim"])
    return SiglipConfig(vision=vision, text=text)


def load_clip(folder: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> CLIP | SigLIP:
    """An open_clip folder as clip.py's CLIP (strict load; built on the meta device)."""
    if os.path.isfile(folder):
        raise ModelFolderError(f"{folder}: a single weights file has no CLIP text tower; a released LLM2CLIP/ProCLIP "
                               f"checkpoint is evaluated with --model {folder} --llm LLM_DIR (load_model(path, llm=))")
    config = read_open_clip_config(folder)
    path = open_clip_weight_file(folder)
    weights = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
               for k, v in to_ours(read_tensors(path)).items()}
    with torch.device("meta"):
        if is_siglip(config["model_cfg"]):
            model = SigLIP(siglip_config(config["model_cfg"], weights, os.path.join(folder, OPEN_CLIP_CONFIG)))
        else:
            model = CLIP(clip_config(config["model_cfg"], weights, path))
    load_state_dict_strict(model, weights, path, assign=True,
                           remedy=f"download the folder again, or use the {OPEN_CLIP_CONFIG} that came with these weights")
    return model.eval()


RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}  # PIL.Image.Resampling values


def image_transform(folder: str) -> ImageTransform:
    """open_clip's eval transform from `preprocess_cfg`: resize (`shortest` side + centre crop, or `squash` to the
    square), mean/std, interpolation; the size is the model's image size, as open_clip sets it."""
    config = read_open_clip_config(folder)
    pre, vision = config["preprocess_cfg"], config["model_cfg"].get("vision_cfg") or {}
    size = vision.get("image_size") or EVA02_TIMM.get(vision.get("timm_model_name"), (0, 224))[1]
    size = size[0] if isinstance(size, (list, tuple)) else size
    mode, interpolation = pre.get("resize_mode", "shortest"), pre.get("interpolation", "bicubic")
    if mode not in ("shortest", "squash") or interpolation not in RESAMPLE:
        raise ModelFolderError(f"{os.path.join(folder, OPEN_CLIP_CONFIG)}: preprocess_cfg resize_mode {mode!r} / "
                               f"interpolation {interpolation!r} is not supported (shortest or squash; "
                               f"{', '.join(RESAMPLE)})")
    return ImageTransform(size=size if mode == "shortest" else (size, size),
                          crop_size=(size, size) if mode == "shortest" else None,
                          mean=tuple(pre.get("mean", OPENAI_CLIP_MEAN)), std=tuple(pre.get("std", OPENAI_CLIP_STD)),
                          resample=RESAMPLE[interpolation])


def write_tuned_folder(source: str, tuned: dict[str, torch.Tensor], out: str) -> None:
    """An open_clip folder in `out`: `source`'s config, its text tower, and the `tuned` tensors (clip.py's names:
    the trained image tower, projection and temperature) in open_clip's layout, as open_clip_model.safetensors.
    `open_clip.create_model('local-dir:OUT')` and `CLIP.from_pretrained(OUT)` both load it."""
    original = read_tensors(open_clip_weight_file(source))
    text_prefix = "text." if any(k.startswith("text.") for k in original) else ""  # CustomTextCLIP or CLIP
    eva = any(k.startswith("visual.trunk.") for k in original)
    weights = {**to_ours(original), **{k: v.detach().float().cpu() for k, v in tuned.items()}}
    weights = from_ours({k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, eva, text_prefix)
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(out, OPEN_CLIP_WEIGHTS[0]))
    config = read_open_clip_config(source)
    with open(os.path.join(out, OPEN_CLIP_CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
