"""Stage 0 on the toy world: its measure, and a paraphrase demo.

The world's stage-0 data (`world.write_stage0_data`) is its own text: random scenes, each an English anchor paired with
a long description and with each translation, in a word order no caption uses, one file per kind; `train.py --stage
0` without --train-data trains on them
with the toy recipe (defaults.py), and the world's build runs exactly that command to make its embedder
(embedder.py, TOY_DIR/stage0/llm), the LLM stages 1-2 use by default. The measure (`groups.anchor_recall` on the
first 144 validation pictures, in the captions' word order): is a long caption's or a translation's own short caption
its nearest of the 144 short captions? Chance is 0.7%.

    python -m miniproclip.toy.groups [--toy-dir toyworld] [--llm DIR ...]  # the measure: raw SmolLM2, embedder, ...
    python -m miniproclip.toy.groups --paraphrase-demo runs/paraphrase --llm toyworld/smollm2

The paraphrase demo: groups of one random scene described by several English templates (held-out groups show other
scenes in templates training never saw), a short stage 0 on them, and held-out nearest-neighbour accuracy before
and after (README, "Stage 0").
"""

import argparse
import json
import os
import shutil
import sys

import numpy as np
import torch

from ..embedder import EmbedSettings, LLMEmbedder
from ..groups import anchor_recall, nearest_neighbour_accuracy, read_groups
from ..precision import cpu_has_bf16
from .embedder import run_train_stage0
from .translate import TRANSLATE
from .world import BACKGROUNDS, COLOURS, EN_TEMPLATES, OPTIONAL, POSITIONS, SHAPES, SIZES, TEXTURES, english_caption

TRAIN_TEMPLATES = tuple(range(8))  # the held-out paraphrase groups use templates 8-11, never seen in training


def embedder_recall(folder: str, val_data: str, log=print) -> dict[str, float]:
    """The toy measure (anchor recall on the world's validation groups) of the LLM in `folder`."""
    groups = read_groups(val_data, log=log)
    dtype = torch.bfloat16 if cpu_has_bf16() else torch.float32
    embedder = LLMEmbedder(folder, EmbedSettings(), dtype)
    return anchor_recall(lambda texts: embedder.embed(texts)[0], groups.texts, groups.kinds)


# -----------------------------------------------------------------------------
# the paraphrase demo

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


def held_out_accuracy(folder: str, settings: EmbedSettings, groups: list[dict], dtype=torch.float32) -> float:
    texts = [t for g in groups for t in g["texts"]]
    group_ids = [i for i, g in enumerate(groups) for _ in g["texts"]]
    embeddings, _ = LLMEmbedder(folder, settings, dtype).embed(texts)
    return nearest_neighbour_accuracy(embeddings, group_ids)


def run_paraphrase_demo(llm: str, output: str, steps: int = 60, batch_size: int = 16, lr: float = 2e-3,
                        log=print) -> dict:
    """Raw vs stage-0 held-out nearest-neighbour paraphrase accuracy: the groups, `train.py --stage 0` on them
    (OUTPUT/run, its merged LLM OUTPUT/run/llm) and results.json under `output`."""
    os.makedirs(output, exist_ok=True)
    train, test = toy_groups()
    with open(os.path.join(output, "train_groups.jsonl"), "w") as f:
        f.writelines(json.dumps({"texts": g["texts"]}) + "\n" for g in train)
    results = {"raw": held_out_accuracy(llm, EmbedSettings(), test)}
    log(f"raw LLM: held-out paraphrase nearest-neighbour accuracy {results['raw']:.3f}")
    run = os.path.join(output, "run")
    shutil.rmtree(run, ignore_errors=True)
    run_train_stage0(["--train-data", os.path.join(output, "train_groups.jsonl"), "--llm", llm, "--output", run,
                      "--max-steps", str(steps), "--batch-size", str(batch_size), "--lr", str(lr),
                      "--lora-dropout", "0"], log)
    results["stage0"] = held_out_accuracy(os.path.join(run, "llm"), EmbedSettings(), test)
    log(f"after stage 0 ({steps} steps): held-out accuracy {results['stage0']:.3f}")
    with open(os.path.join(output, "results.json"), "w") as f:
        json.dump({**results, "steps": steps, "batch_size": batch_size, "lr": lr}, f, indent=1)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy-dir", default="toyworld", help="the toy world (built with `train.py`)")
    parser.add_argument("--llm", nargs="+", default=None,
                        help="LLM folders to measure (default: the world's SmolLM2 and its stage-0 embedder); with "
                             "--paraphrase-demo, the LLM to fine-tune")
    parser.add_argument("--paraphrase-demo", metavar="OUTPUT", help="run the paraphrase demo into OUTPUT")
    parser.add_argument("--steps", type=int, default=60, help="the demo's stage-0 steps")
    args = parser.parse_args(argv)
    if args.paraphrase_demo:
        if not args.llm:
            parser.error("--paraphrase-demo needs --llm LLM_DIR")
        run_paraphrase_demo(args.llm[0], args.paraphrase_demo, args.steps)
        return
    from .world import stage0_sources

    val_data = stage0_sources(args.toy_dir)[1]
    if not os.path.isfile(val_data):
        sys.exit(f"error: {val_data} not found: build the toy world first (python train.py --stage 1)")
    for folder in args.llm or [os.path.join(args.toy_dir, "smollm2"), os.path.join(args.toy_dir, "stage0", "llm")]:
        recall = embedder_recall(folder, val_data, log=lambda *a: None)
        print(f"{folder}: own short caption nearest of the anchors: " +
              ", ".join(f"{kind} {100 * share:.1f}%" for kind, share in recall.items()))


if __name__ == "__main__":
    main()
