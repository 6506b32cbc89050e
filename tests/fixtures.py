"""What several test modules share (no test module imports another): tiny model folders and data sets written by
transformers, quick train.py runs, a tiny Llama-3 and llm2vec's encoding, a hand-written trained run."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from miniproclip import checkpoint as ckpt
from miniproclip.checkpoint import save_checkpoint
from miniproclip.clip import CLIP
from miniproclip.head import HeadConfig
from miniproclip.model import ProCLIP
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


# ----------------------------------------------------------------------------- a tiny Llama-3 with its byte-level tokenizer, and llm2vec's own encoding as the reference

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


# Llama-3's pre-tokenizer pattern (its tokenizer.json), so words, spaces and "\n\n" split as in the real one
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


TEXTS = ["a photo of the red cat", "two small dogs on the grass, with a blue circle", "Striped!",
         "the large green triangle in the top left, on a dark background and with three dotted squares"]


def write_tiny_llama3(folder, seed=0) -> str:
    """A tiny random Llama with a byte-level BPE tokenizer laid out as Llama-3's: its special tokens, its
    pre-tokenizer pattern, BOS added by the post-processor."""
    import transformers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) + " user\n\n, ! ." for i in range(len(WORDS))]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=LLAMA3_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                            special_tokens=[("<|begin_of_text|>", 0)])
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      bos_token_id=0, eos_token_id=4)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    return str(folder)


def llm2vec_encode(folder: str, texts: list[str], max_length: int = 512) -> tuple[torch.Tensor, list, list]:
    """llm2vec's `LLM2Vec.encode(texts)` as LLM2CLIP calls it (pooling_mode="mean", skip_instruction=True, a
    Llama-3-8B-Instruct `_name_or_path`), ported from McGill-NLP/llm2vec@312adcf llm2vec/llm2vec.py and
    models/bidirectional_llama.py. Returns the embeddings and, per text, its token ids and pooled positions."""
    import transformers
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"),
                                              bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    hf.pad_token, hf.padding_side = hf.eos_token, "left"  # LLM2Vec.from_pretrained
    separator = "!@#$%^&*()"
    # encode(): [""] + [text] -> _convert_to_str("", text) -> separator + text (short texts: no doc_max_length cut)
    # prepare_for_tokenization() for "meta-llama/Meta-Llama-3-8B-Instruct":
    texts = ["<|start_header_id|>user<|end_header_id|>\n\n" + (separator + t).strip() + "<|eot_id|>" for t in texts]
    # tokenize(): the whole string with special tokens; embed_mask = the last len(ids of the part after the
    # separator, tokenized alone without special tokens) positions (left padding)
    parts = [t.split(separator) for t in texts]
    features = hf(["".join(p) for p in parts], return_tensors="pt", padding=True, truncation=True,
                  max_length=max_length)
    embed_mask = torch.zeros_like(features["attention_mask"])
    for i, p in enumerate(parts):
        n = len(hf([p[1]], add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"][0])
        embed_mask[i, -n:] = 1
    # LlamaBiModel._update_causal_mask: no causal triangle, only padded keys get finfo.min
    model = transformers.LlamaModel.from_pretrained(folder, dtype=torch.float32).eval()
    T, min_value = features["input_ids"].shape[1], torch.finfo(torch.float32).min
    mask = torch.zeros(len(texts), 1, T, T).masked_fill(features["attention_mask"][:, None, None, :] == 0, min_value)
    with torch.no_grad():
        hidden = model(input_ids=features["input_ids"], attention_mask=mask).last_hidden_state
    # get_pooling(): skip_instruction replaces attention_mask by embed_mask; mean over the last seq_len positions
    lengths = embed_mask.sum(-1)
    embeddings = torch.stack([hidden[i, -n:].mean(0) for i, n in enumerate(lengths)])
    rows = [ids[mask_row == 1].tolist() for ids, mask_row in zip(features["input_ids"], features["attention_mask"])]
    pooled = [m[a == 1].tolist() for m, a in zip(embed_mask, features["attention_mask"])]
    return embeddings, rows, pooled


# ----------------------------------------------------------------------------- quick train.py runs: their flags, their metrics, the CLI in a subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def common(world, out, *extra):
    return ["--train-data", world["data"], "--clip", world["clip"], "--llm", world["llm"], "--output", str(out),
            "--workers", "0", "--batch-size", "8", "--warmup", "2", *extra]


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def run_cli(args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for_lines(path, n, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if os.path.exists(path) and sum(1 for _ in open(path)) >= n:
            return
        time.sleep(0.05)


def assert_same_runs(one_dir, two_dir, steps, loss_tol, weight_tol=1e-5):
    """Equal logged losses at every step and final weights within `weight_tol`."""
    one, two = losses(one_dir), losses(two_dir)
    for step in range(1, steps + 1):
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], **loss_tol)
    w_one = ckpt.load_weights(ckpt.resolve_checkpoint(str(one_dir)))[0]
    w_two = ckpt.load_weights(ckpt.resolve_checkpoint(str(two_dir)))[0]
    assert w_one.keys() == w_two.keys()
    for name in w_one:
        assert (w_one[name] - w_two[name]).abs().max() < weight_tol, name


# ----------------------------------------------------------------------------- images

REPO = Path(__file__).resolve().parents[1]


def write_image(path, seed, size=(40, 48)):
    """Random noise over a random colour, so every image is far from every other one."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8) // 2 + rng.integers(0, 128, 3, dtype=np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)


# ----------------------------------------------------------------------------- the released models' text adaptor (LLM2CLIP/ProCLIP layouts)

class LinearBlock(nn.Module):
    """LLM2CLIP's and ProCLIP's adapter block: x + fn(ln(x)), fn = Linear, GELU, Dropout, Linear."""

    def __init__(self, dim, ratio):
        super().__init__()
        self.fn = nn.Sequential(nn.Linear(dim, ratio * dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(ratio * dim, dim))
        self.ln = nn.LayerNorm(dim)

    def forward(self, x):
        return x + self.fn(self.ln(x))


def text_adaptor(dim, out, blocks, ratio):
    """TextProj.text_adaptor: the blocks, LayerNorm, a biased Linear into the joint space (random, seeded)."""
    torch.manual_seed(blocks)
    adaptor = nn.Sequential(*[LinearBlock(dim, ratio) for _ in range(blocks)], nn.LayerNorm(dim), nn.Linear(dim, out))
    with torch.no_grad():
        for p in adaptor.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return adaptor.eval()


# ----------------------------------------------------------------------------- a trained run written by hand

N_IMAGES = 7


def build_world(root: Path) -> dict:
    """A tiny CLIP and LLM, 7 noisy images, one caption each (some past the runs' 8-token LLM window)."""
    clip_dir, llm_dir = write_tiny_clip(str(root / "clip")), write_tiny_llm(str(root / "llm"))
    images = []
    for i in range(N_IMAGES):
        rng = np.random.default_rng(i)
        pixels = rng.integers(0, 128, (40, 48, 3), dtype=np.uint8) + rng.integers(0, 128, 3, dtype=np.uint8)
        images.append(str(root / "images" / f"im{i}.png"))
        os.makedirs(os.path.dirname(images[-1]), exist_ok=True)
        Image.fromarray(pixels).save(images[-1])
    texts = [f"a photo of the {WORDS[i]} on the grass with {WORDS[i + 1]}" for i in range(N_IMAGES)]
    texts[2] = "two dogs"
    (root / "set.jsonl").write_text("".join(json.dumps({"image": p, "captions": [t]}) + "\n"
                                            for p, t in zip(images, texts)))
    return {"root": root, "clip": clip_dir, "llm": llm_dir, "images": images, "texts": texts,
            "dataset": str(root / "set.jsonl")}


def write_run(run_dir, clip_dir: str, llm_dir: str, stage: int, seed: int, llm_dtype: str = "fp32") -> ProCLIP:
    """A train.py-style run folder: meta + one checkpoint of a tiny ProCLIP with a random head (and, stage 2, a
    perturbed image tower and temperature). Returns the ProCLIP that load_model should rebuild."""
    torch.manual_seed(seed)
    head = HeadConfig(32, 16, num_blocks=1, mlp_ratio=2)
    model = ProCLIP.from_clip(CLIP.from_pretrained(clip_dir), head)
    if stage == 2:
        with torch.no_grad():
            model.visual_projection.weight.add_(0.5 * torch.randn_like(model.visual_projection.weight))
            model.logit_scale.fill_(3.0)
        weights = model.state_dict()
    else:
        weights = {f"text_head.{k}": v for k, v in model.text_head.state_dict().items()}
    args = {"clip": clip_dir, "llm": llm_dir, "max_length": 8, "instruction": "", "bidirectional": False,
            "text_cache": str(Path(run_dir) / "text_cache.safetensors"), "llm_dtype": llm_dtype, "batch_tokens": 64}
    save_checkpoint(str(run_dir), 7, weights, {}, {"stage": stage, "step": 7, "args": args, "head": head.__dict__})
    return model.eval()
