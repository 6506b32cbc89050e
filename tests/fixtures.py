"""Tiny model folders and data sets shared by the training, eval and fault tests (written by transformers)."""

import json
import os

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from miniproclip.tokenizer import save_clip_tokenizer_json

WORDS = ("a photo of the cat dog red blue green small large on in grass table two three and with circle square "
         "triangle left right top bottom striped dotted plain background dark light one").split()
COLOURS = ["red", "blue", "green"]
SHAPES = ["circle", "square", "triangle"]


def write_tiny_llm(folder, seed=0):
    """A tiny random Llama with a word-level tokenizer.json that adds BOS (id 1), as Llama tokenizers do."""
    import transformers
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}, "retrieve": 60}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    return str(folder)


def write_tiny_clip(folder, seed=0, image_size=32, eos_token_id=49407):
    """A tiny random HF CLIP folder: config, weights, the real CLIP tokenizer.json, a 32px preprocessor config."""
    import transformers
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         eos_token_id=eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=8),
        projection_dim=16)
    model = transformers.CLIPModel(config)
    with torch.no_grad():
        model.vision_model.embeddings.class_embedding.normal_()
    model.save_pretrained(folder)
    save_clip_tokenizer_json(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": image_size},
                   "crop_size": {"height": image_size, "width": image_size}, "do_resize": True,
                   "do_center_crop": True, "do_normalize": True, "resample": 3,
                   "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711]}, f)
    return str(folder)


def write_tiny_pairs(folder, n=24, seed=0, long_every=2, name="train.jsonl"):
    """n coloured-shape PNGs with short captions (and a long one on every `long_every`-th row) as JSONL."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    rows = []
    for i in range(n):
        colour, shape = COLOURS[i % 3], SHAPES[(i // 3) % 3]
        pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        pixels[10:30, 12:36, ["red", "green", "blue"].index(colour)] = 255
        path = os.path.join("images", f"{i:04d}.png")
        Image.fromarray(pixels).save(os.path.join(folder, path))
        row = {"image": path, "caption": f"a {['small', 'large'][i % 2]} {colour} {shape} on {['grass', 'table'][i % 2]}"}
        if long_every and i % long_every == 0:
            row["long_caption"] = " ".join(["a photo of the background in dark light"] * 12) + f" with a {colour} {shape}"
        rows.append(row)
    with open(os.path.join(folder, name), "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return os.path.join(folder, name)
