"""The toy world's CLIP teacher: a small CLIP trained from scratch on short English captions, saved as an HF folder.

ProCLIP starts from a pretrained CLIP (paper sec. 3); with no model hub we train one in minutes on two CPU
cores (README gives the time): a ViT-64/8 image tower and a 77-token text tower over OpenAI's real 49,408-token vocabulary, trained
with the symmetric contrastive loss (open_clip's `ClipLoss`), AdamW and a cosine schedule, as CLIP was
(Radford et al. 2021, sec. 2.5). It sees only short English captions, so it is a good teacher on those, a blind one
on other languages and on the corner mark that only long captions name (past token 77); RESULTS.md has its numbers.

The folder it writes is what transformers' `CLIPModel.save_pretrained` + `CLIPProcessor` would write:
config.json, model.safetensors, tokenizer.json, tokenizer_config.json, preprocessor_config.json.
"""

import json
import time
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm

from ..clip import CLIP, CLIPConfig, CLIPTextConfig, CLIPVisionConfig, save_hf_config
from ..data import json_lines
from ..files import atomic_folder
from ..metrics import load_templates
from ..evaluation import clip_encoders, read_caption_jsonl, read_image_folder, run_retrieval, run_zeroshot
from ..image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTransform
from ..losses import ClipLoss, clamp_logit_scale_
from ..training.optim import cosine_lr_factor, param_groups
from ..tokenizer import CLIPTokenizer, save_clip_tokenizer_json

# HF CLIPImageProcessor settings for 64x64 pictures (resize and crop are then no-ops)
PREPROCESSOR = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 64},
                "resample": 3, "do_center_crop": True, "crop_size": {"height": 64, "width": 64}, "do_rescale": True,
                "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(OPENAI_CLIP_MEAN),
                "image_std": list(OPENAI_CLIP_STD), "do_convert_rgb": True}
# what openai/clip-vit-base-patch32 says about its tokenizer: the 77-token window and <|endoftext|> as padding
TOKENIZER_CONFIG = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
                    "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}


def toy_clip_config() -> CLIPConfig:
    """ViT on 64x64 pictures with 8x8 patches (64 patches + class token) and a 77-token text tower over CLIP's
    49,408-token vocabulary; 4 layers of width 64 each, the width at which 1200 steps take minutes on two CPU cores (a
    wider tower costs several times more per step)."""
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                              image_size=64, patch_size=8, hidden_act="quick_gelu")
    text = CLIPTextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                          max_position_embeddings=77, hidden_act="quick_gelu")
    return CLIPConfig(vision=vision, text=text, projection_dim=64)


def init_weights(model: CLIP) -> None:
    """open_clip's init: its `TextTransformer.init_parameters` for the blocks of both towers (branches that write
    into the residual stream scaled by (2 * layers)^-0.5) and its `VisionTransformer`'s width^-0.5 class token,
    positions and projection. A uniformly tiny init (std 0.02 everywhere) stalls at the loss ln(B) for hundreds of
    steps: every picture's class token starts out nearly the same."""
    for tower in (model.vision_model, model.text_model):
        layers = tower.encoder.layers
        width = layers[0].self_attn.q_proj.in_features
        branch_std = width ** -0.5 * (2 * len(layers)) ** -0.5  # the projections that write into the residual stream
        for layer in layers:
            attention, mlp = layer.self_attn, layer.mlp
            for linear, std in ((attention.q_proj, width ** -0.5), (attention.k_proj, width ** -0.5),
                                (attention.v_proj, width ** -0.5), (attention.out_proj, branch_std),
                                (mlp.fc1, (2 * width) ** -0.5), (mlp.fc2, branch_std)):
                nn.init.normal_(linear.weight, std=std)
                nn.init.zeros_(linear.bias)
    vision = model.vision_model.embeddings
    width = vision.class_embedding.shape[0]
    nn.init.normal_(vision.class_embedding, std=width ** -0.5)
    nn.init.normal_(vision.position_embedding.weight, std=width ** -0.5)
    nn.init.normal_(model.text_model.embeddings.token_embedding.weight, std=0.02)
    nn.init.normal_(model.text_model.embeddings.position_embedding.weight, std=0.01)
    for projection in (model.visual_projection, model.text_projection):
        nn.init.normal_(projection.weight, std=projection.in_features ** -0.5)


def load_pixels(paths: list[str], transform: ImageTransform) -> torch.Tensor:
    """(N, 3, 64, 64) preprocessed pixels of the image files."""
    pixels = []
    for path in paths:
        with Image.open(path) as image:
            pixels.append(transform(image))
    return torch.stack(pixels)


def trim(ids: torch.Tensor) -> torch.Tensor:
    """Drop the padding columns after the longest row's EOS: the causal tower's outputs at EOS do not change."""
    eos_id = ids.max()  # <|endoftext|> 49407 is the largest id in CLIP's vocabulary
    return ids[:, : int((ids == eos_id).int().argmax(dim=1).max()) + 1]


def train_toy_clip(pairs: list[tuple[str, str]], out_dir, seed: int = 0, steps: int = 1200, batch_size: int = 64,
                   lr: float = 2e-3, weight_decay: float = 0.1, log=print) -> str:
    """Train a toy CLIP on (image path, short caption) pairs and save it as an HF CLIP folder at `out_dir`.

    The folder is written under a hidden name and renamed at the end, so an interrupted run leaves no half folder.
    A caption repeated within a batch (two pictures with the same description) is dropped from it, so the loss
    never pushes a caption away from a picture it describes exactly; different captions that both fit a picture
    (one leaves out the size, say) remain false negatives, as in real web data.
    """
    with atomic_folder(out_dir) as partial:  # a teacher left by an unfinished build is replaced
        partial = Path(partial)
        save_clip_tokenizer_json(str(partial / "tokenizer.json"))
        (partial / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")
        (partial / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
        tokenizer, transform = CLIPTokenizer.from_folder(str(partial)), ImageTransform.from_folder(str(partial))
        start = time.time()
        pixels = load_pixels([path for path, _ in pairs], transform)  # (N, 3, 64, 64)
        captions = [caption for _, caption in pairs]
        ids = tokenizer(captions).input_ids  # (N, 77)

        torch.manual_seed(seed)
        config = toy_clip_config()
        model = CLIP(config)
        init_weights(model)
        optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
        # linear warmup over the first 10% of the steps, then cosine decay to zero
        warmup = max(1, steps // 10)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_lr_factor(step, warmup, steps))
        loss_fn = ClipLoss()
        generator = torch.Generator().manual_seed(seed)
        order = torch.empty(0, dtype=torch.long)
        model.train()
        for step in (bar := tqdm(range(steps), desc="toy CLIP teacher", leave=False)):
            if len(order) < batch_size:  # a fresh permutation each epoch
                order = torch.cat([order, torch.randperm(len(pairs), generator=generator)])
            batch, order = order[:batch_size], order[batch_size:]
            batch = list({captions[i]: i for i in batch.tolist()}.values())  # one row per distinct caption
            # fp32 and SDPA's fused kernel, faster here than the math kernel (BENCHMARKS.md, "Toy teacher")
            image_features = model.encode_image(pixels[batch], normalize=True)  # (B, D)
            text_features = model.encode_text(trim(ids[batch]), normalize=True)  # (B, D)
            loss = loss_fn(image_features, text_features, model.logit_scale.exp())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            clamp_logit_scale_(model.logit_scale)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        log(f"toy CLIP teacher: {steps} steps of {batch_size} on {len(pairs)} pairs in {time.time() - start:.0f} s, "
            f"final loss {loss.item():.3f}")

        save_hf_config(config, str(partial))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(partial / "model.safetensors"),
                  metadata={"format": "pt"})
    return str(out_dir)


def read_jsonl(path) -> list[dict]:
    """The rows of one of the world's own JSONL files (written by world.py: every line is JSON)."""
    return [row for _, row in json_lines(str(path))]


def evaluate_clip(clip_dir, toy_dir, batch_size: int = 256) -> dict:
    """A CLIP folder's zero-shot acc1/acc5 on the toy test split (a validation split) and its R@1/R@5 on each toy retrieval set, scored
    as `eval.py --clip` scores them (evaluation.py's readers and runners, fp32, in-process)."""
    toy_dir, rounded = Path(toy_dir), lambda metrics: {k: round(v, 4) for k, v in metrics.items()}
    encoders = clip_encoders(str(clip_dir), "cpu", "fp32")
    zeroshot = toy_dir / "zeroshot"
    test = read_image_folder(str(zeroshot / "test"), str(zeroshot / "classnames.txt"))
    report = run_zeroshot(encoders, test, load_templates(str(zeroshot / "templates.json")), batch_size, 0, "cpu")
    metrics = {"zeroshot": rounded(report["metrics"])}
    for name in ["short", "long", "de", "fr", "es", "ja"]:
        gallery = read_caption_jsonl(str(toy_dir / f"retrieval_{name}.jsonl"))
        report, _ = run_retrieval(encoders, gallery, batch_size, 0, "cpu", ks=(1, 5))
        metrics[f"retrieval_{name}"] = rounded(report["metrics"])
    return metrics


def train_teacher(toy_dir, seed: int, steps: int, log=print, out_dir=None) -> dict:
    """Train a teacher on the toy world's short English training captions into `out_dir` (default: the world's own,
    toy_dir/clip) with `seed`; score it on the test split (a validation split)."""
    toy_dir = Path(toy_dir)
    out_dir = Path(out_dir or toy_dir / "clip")
    rows = read_jsonl(toy_dir / "train.jsonl")
    start = time.time()
    train_toy_clip([(str(toy_dir / r["image"]), r["caption"]) for r in rows], out_dir, seed, steps, log=log)
    training = {"steps": steps, "pairs": len(rows), "seed": seed, "seconds": round(time.time() - start, 1)}
    return {"training": training, **evaluate_clip(out_dir, toy_dir)}
