"""The text-embedding cache: a frozen LLM embeds every caption once, training reads the vectors back.

This is what makes an 8B embedder affordable and what the official ProCLIP/LLM2CLIP code does (it trains only
on precomputed LLM features). Captions are sorted by token count and packed into batches under a token budget,
so short captions are not padded to the length of long ones.

    python -m miniproclip.embed --llm DIR --texts captions.txt --output cache.safetensors
    torchrun --nproc_per_node 8 -m miniproclip.embed --llm DIR --texts rows.jsonl --text-key caption --output cache.safetensors

The output holds `embeddings` (N, hidden) float32 in input order and `text_hashes` (N, 16) uint8 (a BLAKE2b
digest of each text, so training can look captions up), plus metadata naming the LLM and its fingerprint.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from .distributed import init_distributed, rank_and_world
from .embedder import DTYPES, EmbedSettings, LLMEmbedder, default_batch_tokens, llm_fingerprint, text_hash
from .files import atomic_path
from .weights import ModelFolderError


def read_texts(path: str, text_key: str | None = None) -> list[str]:
    """`.txt`: one text per line; `.jsonl`: one JSON object per line, text under `text_key`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; --texts expects a .txt (one text per line) or .jsonl file")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if not path.endswith(".jsonl"):
        return lines
    if text_key is None:
        raise ValueError(f"{path}: a .jsonl file needs --text-key naming the text field")
    texts = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                texts.append(str(json.loads(line)[text_key]))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{number}: no text under key {text_key!r} ({type(err).__name__})") from None
    return texts


def save_cache(path: str, embeddings: torch.Tensor, texts: list[str], metadata: dict[str, str]) -> None:
    """Write embeddings + text hashes atomically (temp file, then rename): a crash never leaves a torn cache."""
    hashes = torch.frombuffer(bytearray(b"".join(text_hash(t) for t in texts)), dtype=torch.uint8)
    with atomic_path(path) as tmp:
        save_file({"embeddings": embeddings.float().contiguous(), "text_hashes": hashes.view(len(texts), 16).clone()},
                  tmp, metadata=metadata)


def load_cache(path: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    """(embeddings (N, hidden), text_hashes (N, 16), metadata) of a cache written by `save_cache`."""
    with safe_open(path, framework="pt") as f:
        return f.get_tensor("embeddings"), f.get_tensor("text_hashes"), f.metadata() or {}


class TextEmbeddingCache:
    """Caption -> cached LLM embedding, read from a cache file without loading it whole (numpy memmap).

    A safetensors file is an 8-byte header length, a JSON header with each tensor's byte offsets, then the raw
    data; mapping the `embeddings` block lets a multi-GB cache serve random rows from the page cache.
    """

    def __init__(self, path: str):
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        entry = header["embeddings"]
        assert entry["dtype"] == "F32", f"{path}: embeddings must be float32"
        self.embeddings = np.memmap(path, dtype=np.float32, mode="r", offset=8 + header_len + entry["data_offsets"][0],
                                    shape=tuple(entry["shape"]))
        _, hashes, self.metadata = load_cache(path)
        self.row_of = {bytes(h): i for i, h in enumerate(hashes.numpy())}
        self.path, self.dim = path, entry["shape"][1]

    def missing(self, texts: list[str]) -> list[str]:
        return [t for t in dict.fromkeys(texts) if text_hash(t) not in self.row_of]

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """(B, hidden) float32 embeddings of `texts`; every text must be in the cache."""
        rows = [self.row_of[text_hash(t)] for t in texts]
        return torch.from_numpy(np.ascontiguousarray(self.embeddings[rows]))


def ensure_text_cache(path: str, llm_dir: str, texts: list[str], settings: EmbedSettings, dtype=torch.float32,
                      device: str = "cpu", batch_tokens: int = 8192, log=print) -> TextEmbeddingCache:
    """Open the cache at `path`, embedding (and appending) whichever of `texts` it lacks; all ranks call this.

    A cache made by another LLM or with other embedding settings is refused (its vectors would silently mean
    something else), which is checked by the LLM's fingerprint and the settings stored in its metadata.
    """
    expected = {"llm_fingerprint": llm_fingerprint(llm_dir), **{k: json.dumps(v) for k, v in settings.__dict__.items()}}
    known = None
    if os.path.isfile(path):
        known = TextEmbeddingCache(path)
        differing = [k for k, v in expected.items() if known.metadata.get(k) != v]
        if differing:
            raise ValueError(f"{path}: text cache was built with another {differing[0].replace('_', ' ')} "
                             f"({known.metadata.get('llm', '?')}); pass a new --text-cache or delete this file")
        todo = known.missing(texts)
        if not todo:
            return known
    else:
        todo = list(dict.fromkeys(texts))
    log(f"text cache: embedding {len(todo)} captions with {llm_dir} into {path}")
    embedder = LLMEmbedder(llm_dir, settings, dtype, device)
    fresh = f"{path}.new"
    embed_to_file(embedder, todo, fresh, batch_tokens)
    del embedder
    if not dist.is_initialized() or dist.get_rank() == 0:
        new_embeddings, new_hashes, metadata = load_cache(fresh)
        if known is not None:  # append the new rows after the old ones
            old = torch.from_numpy(np.array(known.embeddings))
            _, old_hashes, _ = load_cache(path)
            new_embeddings, new_hashes = torch.cat([old, new_embeddings]), torch.cat([old_hashes, new_hashes])
        with atomic_path(path) as tmp:
            save_file({"embeddings": new_embeddings.contiguous(), "text_hashes": new_hashes.contiguous()}, tmp,
                      metadata=metadata)
        os.remove(fresh)
    if dist.is_initialized():
        dist.barrier()
    return TextEmbeddingCache(path)


def embed_to_file(embedder: LLMEmbedder, texts: list[str], output: str, batch_tokens: int) -> dict[str, str]:
    """Embed `texts` into `output`; under torchrun each rank embeds every world_size-th text, rank 0 merges."""
    rank, world = rank_and_world()
    mine = list(range(rank, len(texts), world))
    embeddings, truncated = embedder.embed([texts[i] for i in mine], batch_tokens, progress=rank == 0)
    if truncated:
        print(f"rank {rank}: {truncated} of {len(mine)} texts were cut to {embedder.settings.max_length} tokens")
    metadata = {"llm": os.path.abspath(embedder.folder), "llm_fingerprint": llm_fingerprint(embedder.folder),
                **{k: json.dumps(v) for k, v in embedder.settings.__dict__.items()}}
    if world == 1:
        save_cache(output, embeddings, texts, metadata)
        return metadata
    shard = f"{output}.rank{rank}"
    save_file({"embeddings": embeddings.contiguous()}, shard)
    dist.barrier()
    if rank == 0:  # interleave the shards back into input order
        merged = torch.empty(len(texts), embeddings.shape[1])
        for r in range(world):
            with safe_open(f"{output}.rank{r}", framework="pt") as f:
                merged[r::world] = f.get_tensor("embeddings")
            os.remove(f"{output}.rank{r}")
        save_cache(output, merged, texts, metadata)
    dist.barrier()
    return metadata


def main(argv=None):
    parser = argparse.ArgumentParser(description="Embed captions with a frozen LLM into a safetensors cache.")
    parser.add_argument("--llm", required=True, help="Hugging Face LLM folder (Llama, Mistral, Qwen2, Qwen3)")
    parser.add_argument("--texts", required=True, help=".txt (one text per line) or .jsonl file")
    parser.add_argument("--text-key", default=None, help="field holding the text in a .jsonl file")
    parser.add_argument("--output", required=True, help="output .safetensors file")
    parser.add_argument("--batch-tokens", type=int, default=None,
                        help="padded tokens per batch (count × longest; default: 8192 on CUDA, 1024 on CPU)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per text, longer ones are cut")
    parser.add_argument("--instruction", default="", help="prefix prepended to every text, excluded from the pool")
    parser.add_argument("--append-eos", action="store_true", help="end every text with the EOS token")
    parser.add_argument("--bidirectional", action="store_true", help="non-causal attention (LLM2Vec-style LLMs)")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16", help="weight and compute dtype")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    _, _, args.device = init_distributed(args.device)  # under torchrun: one GPU per rank
    try:
        texts = read_texts(args.texts, args.text_key)
        settings = EmbedSettings(args.max_length, args.instruction, args.append_eos, not args.bidirectional)
        embedder = LLMEmbedder(args.llm, settings, DTYPES[args.dtype], args.device)
    except (ModelFolderError, FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    start = time.time()
    embed_to_file(embedder, texts, args.output, args.batch_tokens or default_batch_tokens(args.device))
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"embedded {len(texts)} texts with {args.llm} in {time.time() - start:.1f}s -> {args.output}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
