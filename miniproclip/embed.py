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
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tqdm import tqdm

from .llm import DecoderLM, mean_pool
from .weights import ModelFolderError, read_config, weight_files

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def text_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def llm_fingerprint(folder: str) -> str:
    """Identifies an LLM by its config and weight file sizes, so a cache from another LLM is detected."""
    digest = hashlib.sha256(json.dumps(read_config(folder), sort_keys=True).encode())
    for path in weight_files(folder):
        digest.update(f"{os.path.basename(path)}:{os.path.getsize(path)}".encode())
    return digest.hexdigest()[:16]


@dataclass
class EmbedSettings:
    """How a caption becomes a vector; part of the cache's identity (a cache made otherwise is not reused)."""
    max_length: int = 512  # tokens per caption, instruction prefix included (LLM2CLIP uses 512)
    instruction: str = ""  # e.g. "Given a caption, retrieve a matching image: "; excluded from the mean pool
    append_eos: bool = False  # end each caption with the EOS token (some LLM2Vec-style embedders expect it)
    causal: bool = True  # False for bidirectional embedders (LLM2Vec / LLM2CLIP's Llama-3 embedder)


class CaptionTokenizer:
    """An LLM folder's tokenizer.json with the embedding settings: prefix + caption [+ EOS], cut to max_length."""

    def __init__(self, folder: str, settings: EmbedSettings = EmbedSettings()):
        tokenizer_path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(tokenizer_path):
            raise ModelFolderError(f"{folder}: no tokenizer.json; expected a Hugging Face LLM folder with its tokenizer")
        self.tokenizer = Tokenizer.from_file(tokenizer_path)
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.settings = settings
        eos = read_config(folder).get("eos_token_id")
        self.eos_id = eos[0] if isinstance(eos, list) else eos
        if settings.append_eos and self.eos_id is None:
            raise ModelFolderError(f"{folder}: config.json has no eos_token_id, needed by --append-eos")
        # The prefix keeps the tokenizer's special tokens (e.g. Llama's BOS); captions are then encoded bare.
        self.prefix = self.tokenizer.encode(settings.instruction).ids if settings.instruction else []

    def __call__(self, texts: list[str]) -> tuple[list[list[int]], int]:
        """Token ids per text and how many texts were cut to max_length."""
        add_special = not self.prefix  # with a prefix, BOS etc. come from the prefix
        room = self.settings.max_length - len(self.prefix) - int(self.settings.append_eos)
        if room <= 0:
            raise ValueError(f"--max-length {self.settings.max_length} leaves no room after the instruction prefix")
        ids, truncated = [], 0
        for encoding in self.tokenizer.encode_batch(texts, add_special_tokens=add_special):
            truncated += len(encoding.ids) > room
            ids.append(self.prefix + encoding.ids[:room] + ([self.eos_id] if self.settings.append_eos else []))
        return ids, truncated


class LLMEmbedder:
    """Tokenizer + frozen `DecoderLM` + mean pooling: list of captions -> (N, hidden) float32 embeddings."""

    def __init__(self, folder: str, settings: EmbedSettings = EmbedSettings(), dtype: torch.dtype = torch.float32,
                 device: str = "cpu"):
        self.tokenize = CaptionTokenizer(folder, settings)
        self.tokenizer, self.prefix = self.tokenize.tokenizer, self.tokenize.prefix
        self.model = DecoderLM.from_pretrained(folder, dtype=dtype, device=device, causal=settings.causal)
        self.model.requires_grad_(False)
        self.settings, self.device, self.folder = settings, device, folder

    @torch.no_grad()
    def embed_ids(self, ids: list[list[int]]) -> torch.Tensor:
        """One padded batch: right padding, positions from the mask, pool over caption tokens only."""
        T = max(len(row) for row in ids)
        input_ids = torch.zeros(len(ids), T, dtype=torch.long)
        attention = torch.zeros(len(ids), T, dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, :len(row)] = torch.tensor(row)
            attention[i, :len(row)] = 1
        pool = attention.clone()
        pool[:, :len(self.prefix)] = 0  # the instruction prefix is not part of the caption's meaning
        input_ids, attention, pool = input_ids.to(self.device), attention.to(self.device), pool.to(self.device)
        return mean_pool(self.model(input_ids, attention), pool).cpu()  # (B, hidden) fp32

    def embed(self, texts: list[str], batch_tokens: int = 8192, progress: bool = False) -> tuple[torch.Tensor, int]:
        """(N, hidden) float32 embeddings in input order, computed in length-sorted token-budget batches,
        and the number of texts cut to max_length."""
        ids, truncated = self.tokenize(texts)
        out = torch.empty(len(texts), self.model.config.hidden_size)
        bar = tqdm(total=sum(map(len, ids)), unit="tok", desc="embed", disable=not progress, dynamic_ncols=True)
        for batch in token_budget_batches([len(row) for row in ids], batch_tokens):
            out[batch] = self.embed_ids([ids[i] for i in batch])
            bar.update(sum(len(ids[i]) for i in batch))
        bar.close()
        return out, truncated


def token_budget_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped longest-first so each batch's padded size (count × longest) stays within the budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1) * longest > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    return batches + [current] if current else batches


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
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({"embeddings": embeddings.float().contiguous(), "text_hashes": hashes.view(len(texts), 16).clone()},
              tmp, metadata=metadata)
    os.replace(tmp, path)


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
        tmp = f"{path}.tmp{os.getpid()}"
        save_file({"embeddings": new_embeddings.contiguous(), "text_hashes": new_hashes.contiguous()}, tmp,
                  metadata=metadata)
        os.replace(tmp, path)
        os.remove(fresh)
    if dist.is_initialized():
        dist.barrier()
    return TextEmbeddingCache(path)


def default_batch_tokens(device: str) -> int:
    """Padded tokens per LLM batch: large on a GPU; on a CPU ~1k, so a batch's activations stay in cache
    (SmolLM2-135M on 2 cores, bf16: 1186 tokens/s at 1024 vs 703 at 8192; fp32: 514 vs 394)."""
    return 8192 if str(device).startswith("cuda") else 1024


def embed_to_file(embedder: LLMEmbedder, texts: list[str], output: str, batch_tokens: int) -> dict[str, str]:
    """Embed `texts` into `output`; under torchrun each rank embeds every world_size-th text, rank 0 merges."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
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
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        if args.device == "cuda":
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
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
