"""Linear probes of the toy world's cached LLM embeddings: is a caption's content there, and does it transfer?

A multinomial logistic regression (L-BFGS, L2 1e-3, standardised features) predicts an attribute of the picture
(colour, shape, position, count) from the mean-pooled LLM embedding of a caption. Two questions, for RESULTS.md:
- trained on long captions, tested on long ones: is the late detail linearly readable despite the filler?
- trained on short English captions, tested on long captions and on the translations: does what a head learns from
  English short captions carry over (the premise of ProCLIP's long-caption and multilingual claims)?

    python scripts/probe_toy_llm.py [--toy-dir toyworld] [--llm toyworld/smollm2]   # default: the stage-0 embedder
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from miniproclip.embed import ensure_text_cache  # noqa: E402
from miniproclip.embedder import EmbedSettings  # noqa: E402
from miniproclip.toy.teacher import read_jsonl  # noqa: E402
from miniproclip.toy.defaults import toy_models  # noqa: E402
from miniproclip.toy.world import LANGUAGES  # noqa: E402

ATTRIBUTES = ("colour", "shape", "position", "count")


def probe_accuracy(train_x, train_y, test_x, test_y, classes: int) -> float:
    """Fit softmax regression on (train_x, train_y); accuracy on (test_x, test_y)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6  # standardise with the training statistics
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    weight = torch.zeros(train_x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(train_x @ weight + bias, train_y) + 1e-3 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return ((test_x @ weight + bias).argmax(1) == test_y).float().mean().item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy-dir", default="toyworld")
    parser.add_argument("--llm", default=None, help="LLM folder (default: the toy world's stage-0 embedder; the raw "
                        "SmolLM2 is TOY_DIR/smollm2)")
    args = parser.parse_args(argv)
    train = read_jsonl(os.path.join(args.toy_dir, "train.jsonl"))
    test = read_jsonl(os.path.join(args.toy_dir, "test.jsonl"))
    test_sets = {"short": [r["caption"] for r in test], "long": [r["long_caption"] for r in test],
                 **{lang: [r["translations"][lang] for r in test] for lang in LANGUAGES}}
    texts = [r["caption"] for r in train] + [r["long_caption"] for r in train] + sum(test_sets.values(), [])
    # the cache train.py/eval.py fill for this LLM (bf16, default settings); whatever is missing is embedded now
    llm_dir, cache_path = toy_models(args.toy_dir, args.llm, None, log=lambda *a: None)
    cache = ensure_text_cache(cache_path, llm_dir, texts, EmbedSettings(), torch.bfloat16, "cpu", 1024)
    embed = lambda items: cache(items).float()  # (N, hidden)
    print("| attribute (chance) | long → long | " + " | ".join(f"short → {name}" for name in test_sets) + " |")
    print("|---|---|" + "---|" * len(test_sets))
    for attribute in ATTRIBUTES:
        values = sorted({r["attributes"][attribute] for r in train})
        label = lambda rows: torch.tensor([values.index(r["attributes"][attribute]) for r in rows])
        long_to_long = probe_accuracy(embed([r["long_caption"] for r in train]), label(train),
                                      embed(test_sets["long"]), label(test), len(values))
        short_x, short_y = embed([r["caption"] for r in train]), label(train)
        cells = [probe_accuracy(short_x, short_y, embed(items), label(test), len(values))
                 for items in test_sets.values()]
        print(f"| {attribute} ({1 / len(values):.2f}) | {long_to_long:.2f} | " + " | ".join(f"{c:.2f}" for c in cells)
              + " |")
    print(f"{llm_dir}. long → long: trained on the {len(train)} training long captions; short → X: trained on the "
          f"{len(train)} short English training captions (which name each optional attribute with probability 0.4, "
          f"so position labels are noisy there); tested on the {len(test)} test pictures' captions of that kind.")


if __name__ == "__main__":
    main()
