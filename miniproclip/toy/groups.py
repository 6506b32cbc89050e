"""Paraphrase groups of the toy world for stage 0, and a short stage-0 run that measures what it buys.

A group is one random scene (all seven attributes of `world.py`: count, size, texture, colour, shape, position,
background) described by several of the world's English templates, plus optionally its translations: texts that
mean exactly the same thing. Training and held-out groups show different scenes; held-out groups can also use
templates the training never saw, so the accuracy measures meaning, not memorised phrasings.

`run_paraphrase_demo` is the run the README reports: nearest-neighbour paraphrase accuracy of the raw LLM, a short
stage 0 (LoRA, CaptionContrastive, AdamW with warmup + cosine), the merged HF folder, and its accuracy.

    python -m miniproclip.toy.groups --llm SMOLLM2_DIR --output runs/stage0_toy
    python -m miniproclip.toy.groups --llm SMOLLM2_DIR --evaluate RUN/llm  # after `train.py --stage 0`
"""

import argparse
import json
import os
import time

import numpy as np
import torch

from ..loader import epoch_batches
from ..embedder import CaptionTokenizer, EmbedSettings, LLMEmbedder
from ..optim import cosine_lr_factor, param_groups
from ..stage0 import (LLM2CLIP_LR, TOY_TEMPERATURE, CaptionContrastive, LoRASettings, load_stage0_llm,
                      nearest_neighbour_accuracy, pick_pairs, write_merged_llm)
from ..stages import accumulated_backward
from .translate import TRANSLATE
from .world import BACKGROUNDS, COLOURS, EN_TEMPLATES, OPTIONAL, POSITIONS, SHAPES, SIZES, TEXTURES, english_caption

TRAIN_TEMPLATES = tuple(range(8))  # the held-out groups use templates 8-11, never seen in training
# The toy embedder trains at LLM2CLIP's lr. The world's groups pair texts of different kinds (short with long,
# English with other languages), which raw SmolLM2 places far apart. Measured on 2 CPU cores, 24 steps of 16
# groups (about 4 minutes): at lr 2e-3 (the paraphrase demo's rate) or 5e-4 the loss falls to ln(16) and stays
# (the embeddings collapse); at 2e-4 it falls more slowly; in every case a validation long caption or
# translation finds its own short caption among 144 no more often than chance (RESULTS.md).


def random_scene(rng: np.random.Generator) -> dict:
    return {"colour": str(rng.choice(list(COLOURS))), "shape": str(rng.choice(SHAPES)),
            "size": str(rng.choice(list(SIZES))), "texture": str(rng.choice(TEXTURES)),
            "position": str(rng.choice(list(POSITIONS))), "count": int(rng.integers(1, 4)),
            "background": str(rng.choice(list(BACKGROUNDS)))}


def paraphrase_groups(count: int, seed: int, templates, languages=(), exclude=frozenset()) -> list[dict]:
    """`count` distinct scenes not in `exclude`, each as {"texts": [...], "scene": key}: one text per template
    (all attributes named) and one per language in `languages`."""
    rng, groups, seen = np.random.default_rng(seed), [], set(exclude)
    while len(groups) < count:
        scene = random_scene(rng)
        key = json.dumps(scene, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        texts = [english_caption(scene, set(OPTIONAL), t) for t in templates]
        groups.append({"texts": texts + [TRANSLATE[lang](scene) for lang in languages], "scene": key})
    return groups


def toy_groups(train_groups: int = 512, test_groups: int = 100) -> tuple[list, list]:
    """The demo's training groups (templates 0-7) and held-out groups (other scenes, templates 8-11)."""
    train = paraphrase_groups(train_groups, seed=0, templates=TRAIN_TEMPLATES)
    return train, paraphrase_groups(test_groups, seed=1, templates=range(8, len(EN_TEMPLATES)),
                                    exclude={g["scene"] for g in train})


def write_toy_groups(output: str, train_groups: int = 512, test_groups: int = 100) -> tuple[list, list]:
    """`toy_groups` written to `output`/{train,test}_groups.jsonl as stage-0 data rows; returns both lists."""
    os.makedirs(output, exist_ok=True)
    train, test = toy_groups(train_groups, test_groups)
    for name, rows in (("train", train), ("test", test)):
        with open(os.path.join(output, f"{name}_groups.jsonl"), "w") as f:
            f.writelines(json.dumps({"texts": g["texts"]}) + "\n" for g in rows)
    return train, test


def toy_stage0_data(toy_dir: str, llm: str | None, log=print) -> tuple[str, str]:
    """`train.py --stage 0` without --train-data: the toy world's groups (TOY_DIR/stage0_groups.jsonl: each
    training picture's short caption with its long caption, and with its translations) and the LLM folder,
    `llm` or the toy world's SmolLM2. Builds the world up to its teacher first, not its own stage-0 embedder."""
    from .world import build_toyworld

    manifest = build_toyworld(toy_dir, llm_dir=llm, stage0=False, log=log)
    return os.path.join(toy_dir, "stage0_groups.jsonl"), manifest["llm_dir"]


def build_toy_embedder(toy_dir, llm_dir, steps: int, batch_size: int, log=print) -> dict:
    """The toy world's stage-0 embedder: `steps` steps of LLM2CLIP's caption contrastive LoRA fine-tuning of
    `llm_dir` on TOY_DIR/stage0_groups.jsonl, merged into TOY_DIR/stage0/llm (what `train.py --stage 0` trains,
    at LLM2CLIP's lr and the toy temperature). Returns the manifest entry."""
    from ..stage0 import read_groups

    start, groups = time.time(), read_groups(os.path.join(toy_dir, "stage0_groups.jsonl"), log=log)
    train_stage0(str(llm_dir), os.path.join(toy_dir, "stage0"), groups, EmbedSettings(), LoRASettings(), steps,
                 batch_size, lr=LLM2CLIP_LR, temperature=TOY_TEMPERATURE, log=log)
    return {"steps": steps, "batch_size": batch_size, "groups": len(groups), "base_llm": str(llm_dir),
            "seconds": round(time.time() - start, 1)}


def held_out_accuracy(folder: str, settings: EmbedSettings, groups: list[dict], dtype=torch.float32) -> float:
    texts = [t for g in groups for t in g["texts"]]
    group_ids = [i for i, g in enumerate(groups) for _ in g["texts"]]
    embeddings, _ = LLMEmbedder(folder, settings, dtype).embed(texts)
    return nearest_neighbour_accuracy(embeddings, group_ids)


def train_stage0(llm: str, output: str, groups: list[list[str]], settings: EmbedSettings, lora: LoRASettings,
                 steps: int, batch_size: int, lr: float, temperature: float, seed: int = 0, log=print) -> str:
    """A short single-process stage 0 (what `train.py --stage 0` runs, without its checkpoints and DDP)."""
    torch.manual_seed(seed)
    model = load_stage0_llm(llm, settings, lora)
    stage = CaptionContrastive(model, CaptionTokenizer(llm, settings), temperature)
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=0.0), lr=lr)
    per_epoch = len(groups) // batch_size
    start = time.time()
    for step in range(steps):
        epoch = step // per_epoch
        batch = epoch_batches(len(groups), batch_size, seed=seed, epoch=epoch)[step % per_epoch]
        for group in optimizer.param_groups:
            group["lr"] = lr * cosine_lr_factor(step, max(1, steps // 10), steps)
        # fp32: on 2 CPU cores a bf16-autocast step measured 190 s against 50 s in fp32 (16 pairs, SmolLM2)
        loss, _ = accumulated_backward([pick_pairs(groups, batch, seed, epoch)], stage.features, stage.loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps - 1:
            log(f"step {step:4d}/{steps}  loss {loss.item():.4f}  {time.time() - start:.0f}s")
    return write_merged_llm(model, llm, os.path.join(output, "llm"), lora)


def run_paraphrase_demo(llm: str, output: str, steps: int = 60, batch_size: int = 16, lr: float = 2e-3,
                        temperature: float = TOY_TEMPERATURE, train_groups: int = 512, test_groups: int = 100,
                        causal: bool = True, log=print) -> dict:
    """Raw vs stage-0 held-out nearest-neighbour paraphrase accuracy; writes groups, the merged LLM and
    results.json under `output`."""
    train, test = write_toy_groups(output, train_groups, test_groups)
    settings = EmbedSettings(causal=causal)
    results = {"raw": held_out_accuracy(llm, settings, test)}
    log(f"raw LLM: held-out paraphrase nearest-neighbour accuracy {results['raw']:.3f}")
    merged = train_stage0(llm, output, [g["texts"] for g in train], settings, LoRASettings(), steps, batch_size,
                          lr, temperature, log=log)
    results["stage0"] = held_out_accuracy(merged, settings, test)
    log(f"after stage 0 ({steps} steps): held-out accuracy {results['stage0']:.3f}")
    with open(os.path.join(output, "results.json"), "w") as f:
        json.dump({**results, "steps": steps, "batch_size": batch_size, "lr": lr, "temperature": temperature,
                   "train_groups": train_groups, "test_groups": test_groups, "causal": causal}, f, indent=1)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm", required=True, help="HF LLM folder (e.g. SmolLM2 from scripts/convert_smollm2.py)")
    parser.add_argument("--output", help="folder for the groups, the merged llm/ and results.json")
    parser.add_argument("--evaluate", nargs="+", metavar="LLM_DIR",
                        help="no training: held-out accuracy of --llm and these folders (e.g. RUN/llm of `train.py "
                             "--stage 0`) on the held-out groups")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16, help="groups per step")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--temperature", type=float, default=TOY_TEMPERATURE)
    parser.add_argument("--bidirectional", action="store_true", help="train and embed with bidirectional attention")
    args = parser.parse_args(argv)
    if args.evaluate:
        test = toy_groups()[1]
        for folder in [args.llm, *args.evaluate]:
            accuracy = held_out_accuracy(folder, EmbedSettings(causal=not args.bidirectional), test)
            print(f"{folder}: held-out paraphrase nearest-neighbour accuracy {accuracy:.3f}")
        return
    if not args.output:
        parser.error("--output is needed unless --evaluate is given")
    run_paraphrase_demo(args.llm, args.output, args.steps, args.batch_size, args.lr, args.temperature,
                        causal=not args.bidirectional)


if __name__ == "__main__":
    main()
