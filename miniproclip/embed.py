"""Vector caches keyed by caption: a frozen LLM embeds every caption once, training reads the vectors back.

This is what makes an 8B embedder affordable and what the official ProCLIP/LLM2CLIP code does (it trains only
on precomputed LLM features). The same code serves any frozen text encoder (`ensure_vector_cache`).

    python -m miniproclip.embed --llm DIR --texts captions.txt --output cache.safetensors
    torchrun --nproc_per_node 8 -m miniproclip.embed --llm DIR --texts rows.jsonl --text-key caption \
        --output cache.safetensors

The output holds `embeddings` (N, hidden) in input order, stored as fp16 by default (`--store-dtype`; read back as
float32), and `text_hashes` (N, 16) uint8 (a BLAKE2b digest of each text, so training can look captions up), plus
metadata naming the LLM, its fingerprint and the embedding settings.

Scale (CC3M + CC12M with long captions is ~26M texts; 4,096-d fp32 would be 400 GB): texts are embedded in chunks
of `--chunk-texts`, and each finished chunk is written to `OUT.parts/` at once (under torchrun, rank r takes chunks
r, r + W, ...). Running the same command again after a crash or `kill -9` skips the chunks already written. The
chunks are then concatenated into OUT by copying bytes, so memory never holds N × hidden. Reading memmaps the file
and finds captions by binary search in a sorted array of hash prefixes (16 bytes per row, not a dict of strings).
"""

import argparse
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tqdm import tqdm

from .data import DataError, json_lines
from .distributed import close_distributed, exit_torchrun_rank, init_distributed, rank_and_world
from .embedder import FIELDS_BEFORE_PRESETS, PRESETS, EmbedSettings, LLMEmbedder, default_batch_tokens, text_hash
from .errors import UserError, exit_with
from .files import atomic_path
from .precision import DTYPES
from .weights import folder_fingerprint, read_safetensors_header

# --store-dtype -> (torch dtype, safetensors dtype code); see BENCHMARKS.md "Storage dtype" for the default
STORE_DTYPES = {"fp32": (torch.float32, "F32"), "fp16": (torch.float16, "F16"), "bf16": (torch.bfloat16, "BF16")}
STORE_CODES = {code: name for name, (_, code) in STORE_DTYPES.items()}
DEFAULT_STORE_DTYPE = "fp16"
CHUNK_TEXTS = 4096  # texts per resumable chunk: 4096 × 4,096-d fp32 = 64 MB in memory, ~10 s of an 8B LLM on a GPU
COPY_BLOCK = 1 << 24  # bytes copied at a time when chunks are concatenated


# ----------------------------------------------------------------------------- texts

def iter_texts(path: str, text_key: str | None = None) -> Iterator[str]:
    """`.txt`: one text per line; `.jsonl`: one JSON object per line, text under `text_key`. Read lazily."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file; --texts expects a .txt (one text per line) or .jsonl file")
    if path.endswith(".jsonl") and text_key is None:
        raise DataError(f"{path}: a .jsonl file needs --text-key naming the text field")
    if path.endswith(".jsonl"):
        for number, row in json_lines(path):
            try:
                yield str(row[text_key])  # a line that is not JSON (a ValueError) has no key either
            except (KeyError, TypeError, IndexError) as err:
                raise DataError(f"{path}:{number}: no text under key {text_key!r} "
                                f"({type(err).__name__})") from None
        return
    with open(path, encoding="utf-8", newline="") as f:
        for line in f:
            yield line.rstrip("\r\n")


def chunked(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    """Consecutive lists of `size` texts (the last one shorter)."""
    chunk = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def hash_texts(texts: list[str]) -> np.ndarray:
    """(N, 16) uint8: the BLAKE2b digest of each text, the key a cache finds it by."""
    return np.frombuffer(b"".join(text_hash(t) for t in texts), dtype=np.uint8).reshape(len(texts), 16)


class CacheError(UserError, ValueError):
    """A cache file that cannot be used as it is (damaged, truncated, or built for other vectors); the message
    names the file and what to do."""


# ----------------------------------------------------------------------------- safetensors by bytes

def tensor_spans(path: str) -> tuple[dict[str, tuple[str, list[int], int, int]], dict[str, str]]:
    """{name: (dtype code, shape, byte offset in the file, byte size)} and the metadata of a safetensors file.
    The format is an 8-byte header length, a JSON header with each tensor's data offsets, then the raw data."""
    with open(path, "rb") as f:
        raw, data_start = read_safetensors_header(f)
    header = json.loads(raw)
    metadata = header.pop("__metadata__", None) or {}
    return {name: (e["dtype"], e["shape"], data_start + e["data_offsets"][0],
                   e["data_offsets"][1] - e["data_offsets"][0]) for name, e in header.items()}, metadata


def concatenate_caches(sources: list[str], output: str, metadata: dict[str, str]) -> None:
    """Write `output` (atomically) holding the rows of `sources` one after the other, by copying their bytes:
    memory holds one block, whatever the size. All sources share one embedding width and storage dtype."""
    spans = [tensor_spans(source)[0] for source in sources]
    (code, (_, width), _, _), rows = spans[0]["embeddings"], sum(s["embeddings"][1][0] for s in spans)
    assert all(s["embeddings"][0] == code and s["embeddings"][1][1] == width for s in spans), sources
    sizes = {name: sum(s[name][3] for s in spans) for name in ("embeddings", "text_hashes")}
    header = {"__metadata__": metadata,
              "embeddings": {"dtype": code, "shape": [rows, width], "data_offsets": [0, sizes["embeddings"]]},
              "text_hashes": {"dtype": "U8", "shape": [rows, 16],
                              "data_offsets": [sizes["embeddings"], sizes["embeddings"] + sizes["text_hashes"]]}}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with atomic_path(output) as tmp, open(tmp, "wb") as out:
        out.write(len(encoded).to_bytes(8, "little") + encoded)
        for name in ("embeddings", "text_hashes"):  # each tensor's rows, source after source
            for source, span in zip(sources, spans):
                with open(source, "rb") as f:
                    f.seek(span[name][2])
                    left = span[name][3]
                    while left:
                        block = f.read(min(left, COPY_BLOCK))
                        out.write(block)
                        left -= len(block)


def save_cache(path: str, embeddings: torch.Tensor, texts: list[str], metadata: dict[str, str]) -> None:
    """Write embeddings (fp32, fp16 or bf16, kept as given) + text hashes atomically."""
    hashes = torch.from_numpy(hash_texts(texts).copy())
    with atomic_path(path) as tmp:
        save_file({"embeddings": embeddings.contiguous(), "text_hashes": hashes}, tmp, metadata=metadata)


def load_cache(path: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    """(embeddings (N, hidden) as stored, text_hashes (N, 16), metadata), read whole: for small caches and tests."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        return f.get_tensor("embeddings"), f.get_tensor("text_hashes"), f.metadata() or {}


# ----------------------------------------------------------------------------- reading

class VectorCache:
    """Text -> cached vector, read from a cache file without loading it (numpy memmap of the embeddings block).

    Lookup: the first 8 bytes of each row's hash, as int64, sorted once (`sorted_keys`, with `order` mapping back
    to rows: 12-16 bytes per row); a text's row is found by `np.searchsorted` and confirmed on the full 16 bytes.
    """

    def __init__(self, path: str):
        try:
            spans, self.metadata = tensor_spans(path)
            end = max(offset + size for _, _, offset, size in spans.values())
            if os.path.getsize(path) < end:
                raise ValueError(f"{os.path.getsize(path)} bytes, its header promises {end}")
            code, (rows, self.dim), offset, _ = spans["embeddings"]
        except (OSError, ValueError, KeyError, TypeError) as err:  # torn header, missing tensor, short file
            raise CacheError(f"{path} is damaged or truncated ({err}): delete it and run the same command again, "
                             "which rebuilds it") from err
        self.store_dtype = STORE_CODES[code]
        # numpy has no bfloat16: bf16 rows are mapped as raw 16-bit words and reinterpreted by torch on read
        element = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[code]
        self.embeddings = np.memmap(path, dtype=element, mode="r", offset=offset, shape=(rows, self.dim))
        _, _, offset, _ = spans["text_hashes"]
        self.hashes = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=(rows, 16))
        keys = np.ascontiguousarray(self.hashes[:, :8]).view(np.int64).ravel()  # (N,) hash prefixes
        order = np.argsort(keys, kind="stable")
        self.sorted_keys = keys[order]
        self.order = order.astype(np.int32) if rows < 2**31 else order
        self.path = path

    def __len__(self) -> int:
        return len(self.embeddings)

    def rows_of(self, texts: list[str]) -> np.ndarray:
        """(B,) row of each text in the file, -1 where it is not cached."""
        return self.rows_of_digests(hash_texts(texts))

    def rows_of_digests(self, digests: np.ndarray) -> np.ndarray:
        """(B,) row of each (B, 16) text digest (`hash_texts`) in the file, -1 where it is not cached."""
        keys = np.ascontiguousarray(digests[:, :8]).view(np.int64).ravel()
        start = np.searchsorted(self.sorted_keys, keys)
        rows = np.full(len(digests), -1, dtype=np.int64)
        step = 0
        while True:  # texts whose 8-byte prefixes collide sit next to each other: almost always one step
            at = start + step
            live = (rows < 0) & (at < len(self.sorted_keys))
            live[live] = self.sorted_keys[at[live]] == keys[live]
            if not live.any():
                return rows
            candidates = self.order[at[live]].astype(np.int64)
            found = (self.hashes[candidates] == digests[live]).all(axis=1)  # the full 16 bytes agree
            rows[np.flatnonzero(live)[found]] = candidates[found]
            step += 1

    def missing(self, texts: list[str]) -> list[str]:
        """The distinct texts (first-appearance order) that the cache lacks."""
        unique = list(dict.fromkeys(texts))
        return [text for text, row in zip(unique, self.rows_of(unique)) if row < 0]

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """(B, hidden) float32 vectors of `texts`; every text must be in the cache."""
        rows = self.rows_of(texts)
        if (rows < 0).any():
            raise KeyError(f"{self.path}: {int((rows < 0).sum())} texts are not in this cache, e.g. "
                           f"{texts[int(np.argmax(rows < 0))]!r}")
        return self.stored(rows).float()

    def stored(self, rows: np.ndarray) -> torch.Tensor:
        """(B, hidden) vectors of file rows `rows`, in the storage dtype (one memmap gather; `.float()` them, e.g.
        after the copy to the GPU, which then moves half the bytes of fp16 or bf16 rows)."""
        vectors = torch.from_numpy(np.ascontiguousarray(self.embeddings[rows]))  # (B, hidden) as stored
        return vectors.view(torch.bfloat16) if self.store_dtype == "bf16" else vectors


# ----------------------------------------------------------------------------- writing

def to_store_dtype(vectors: torch.Tensor, store_dtype: str, where: str) -> torch.Tensor:
    """`vectors` in the storage dtype; fp16 overflow (|x| > 65504) is refused rather than stored as inf."""
    stored = vectors.to(STORE_DTYPES[store_dtype][0])
    if store_dtype == "fp16" and torch.isfinite(vectors).all() and not torch.isfinite(stored).all():
        raise CacheError(f"{where}: vectors up to {vectors.abs().max().item():.3g} exceed fp16's range; "
                         f"pass --store-dtype bf16 or fp32")
    return stored.contiguous()


def _chunk_is_done(part: str, hashes: np.ndarray, metadata: dict[str, str]) -> bool:
    """A chunk file written by a previous run with these settings, for exactly these texts."""
    if not os.path.isfile(part):
        return False
    spans, stored = tensor_spans(part)
    if stored != metadata:
        return False
    with open(part, "rb") as f:
        f.seek(spans["text_hashes"][2])
        return f.read(spans["text_hashes"][3]) == hashes.tobytes()


def embed_to_file(make_encode: Callable[[], Callable[[list[str]], torch.Tensor]], chunks: Iterable[list[str]],
                  output: str, metadata: dict[str, str], store_dtype: str = DEFAULT_STORE_DTYPE,
                  total: int | None = None, log=print) -> None:
    """Encode every chunk of texts into `output` (rows in input order), resumably; all ranks call this.

    `make_encode()` is called once, only when some chunk is not yet done, and returns `encode(texts) -> (B, D)`.
    Rank r encodes chunks r, r + W, ... and writes each to `output.parts/chunk-NNNNNN.safetensors` at once; a
    chunk file whose settings and text hashes match is kept from an earlier run. Rank 0 then concatenates them.
    """
    rank, world = rank_and_world()
    parts = f"{output}.parts"
    os.makedirs(parts, exist_ok=True)
    metadata = {**metadata, "store_dtype": store_dtype}
    encode, names, kept = None, [], 0
    bar = tqdm(total=total, unit="text", desc="embed", disable=rank != 0, dynamic_ncols=True)
    for index, texts in enumerate(chunks):
        names.append(os.path.join(parts, f"chunk-{index:06d}.safetensors"))
        bar.update(len(texts))
        if index % world != rank:
            continue
        hashes = hash_texts(texts)
        if _chunk_is_done(names[-1], hashes, metadata):
            kept += 1
            continue
        encode = encode or make_encode()
        vectors = to_store_dtype(encode(texts), store_dtype, output)
        with atomic_path(names[-1]) as tmp:
            save_file({"embeddings": vectors, "text_hashes": torch.from_numpy(hashes.copy())}, tmp, metadata=metadata)
    bar.close()
    if kept:
        log(f"rank {rank}: kept {kept} chunks already written to {parts} by an earlier run")
    if not names:
        raise DataError(f"{output}: no texts to embed")
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        concatenate_caches(names, output, metadata)
        shutil.rmtree(parts)
    if dist.is_initialized():
        dist.barrier()


def ensure_vector_cache(path: str, texts: list[str], make_encode: Callable[[], Callable[[list[str]], torch.Tensor]],
                        identity: dict[str, str], info: dict[str, str] | None = None,
                        store_dtype: str = DEFAULT_STORE_DTYPE, chunk_texts: int = CHUNK_TEXTS,
                        what: str = "text cache", flag: str = "--text-cache", log=print,
                        absent: dict[str, str] | None = None) -> VectorCache:
    """Open the cache at `path`, encoding (and appending) whichever of `texts` it lacks; all ranks call this.

    `identity` says what the vectors mean (e.g. the encoder's fingerprint and settings): a cache whose stored
    identity differs is refused, since its vectors would silently mean something else. `info` is stored too but
    not compared (e.g. the encoder's path). `absent` holds the value a cache written before an identity key existed
    is taken to have. Appending copies the old file's bytes; it never loads them.
    """
    known = None
    if os.path.isfile(path):
        known = VectorCache(path)
        stored = {k: known.metadata.get(k, (absent or {}).get(k)) for k in identity}
        differing = [k for k, v in identity.items() if stored[k] != v]
        if differing:
            key = differing[0]
            raise CacheError(f"{path}: {what} was built with another {key.replace('_', ' ')} "
                             f"({stored[key]}, now {identity[key]}); pass a new {flag} or delete this file")
        todo = known.missing(texts)
        if not todo:
            return known
        store_dtype = known.store_dtype  # appended rows are stored like the old ones
    else:
        todo = list(dict.fromkeys(texts))
    log(f"{what}: encoding {len(todo)} texts into {path}")
    fresh, metadata = f"{path}.new", {**identity, **(info or {})}
    embed_to_file(make_encode, chunked(todo, chunk_texts), fresh, metadata, store_dtype, len(todo), log)
    if rank_and_world()[0] == 0:
        if known is not None:  # the old rows, then the new ones
            concatenate_caches([path, fresh], path, {**metadata, "store_dtype": store_dtype})
            os.remove(fresh)
        else:
            os.replace(fresh, path)
    if dist.is_initialized():
        dist.barrier()
    return VectorCache(path)


def llm_encoder(llm_dir: str, settings: EmbedSettings, dtype: torch.dtype, device: str, batch_tokens: int,
                log=print) -> Callable[[], Callable[[list[str]], torch.Tensor]]:
    """`make_encode` for an LLM folder: loads the LLM when first needed; encode(texts) -> (B, hidden) float32."""
    def make_encode():
        embedder = LLMEmbedder(llm_dir, settings, dtype, device)

        def encode(texts: list[str]) -> torch.Tensor:
            vectors, truncated = embedder.embed(texts, batch_tokens)
            if truncated:
                log(f"{truncated} of {len(texts)} texts were cut to {settings.max_length} tokens")
            return vectors
        return encode
    return make_encode


def text_cache_path(folder: str, tag: str | None = None) -> str:
    """The one naming rule of LLM caches: FOLDER/text_cache.safetensors, or FOLDER/text_cache_<tag>.safetensors
    where several LLMs share the folder (the toy world's LLMs, a dataset embedded by several released models);
    the tag is the LLM's folder name or path, with every non-word character as '_'."""
    name = "text_cache" if tag is None else "text_cache_" + re.sub(r"\W", "_", tag)
    return os.path.join(folder, f"{name}.safetensors")


def llm_identity(llm_dir: str, settings: EmbedSettings) -> dict[str, str]:
    """What an LLM cache's vectors mean: the LLM's fingerprint and the embedding settings."""
    return {"llm_fingerprint": folder_fingerprint(llm_dir), **{k: json.dumps(v) for k, v in settings.__dict__.items()}}


def ensure_text_cache(path: str, llm_dir: str, texts: list[str], settings: EmbedSettings, dtype=torch.float32,
                      device: str = "cpu", batch_tokens: int = 8192, log=print,
                      store_dtype: str = DEFAULT_STORE_DTYPE) -> VectorCache:
    """The LLM text cache at `path` holding every one of `texts` (see `ensure_vector_cache`); all ranks call this.
    A cache made by another LLM or with other embedding settings is refused."""
    return ensure_vector_cache(path, texts, llm_encoder(llm_dir, settings, dtype, device, batch_tokens, log),
                               llm_identity(llm_dir, settings), {"llm": os.path.abspath(llm_dir)}, store_dtype,
                               log=log, absent={k: json.dumps(v) for k, v in FIELDS_BEFORE_PRESETS.items()})


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
    parser.add_argument("--embed-preset", choices=PRESETS, default="default",
                        help="named embedding settings, e.g. qwen3-embedding, nv-embed-v2 (README, 'Embedder presets')")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16", help="weight and compute dtype")
    parser.add_argument("--store-dtype", choices=STORE_DTYPES, default=DEFAULT_STORE_DTYPE,
                        help="dtype of the stored vectors (fp16: half the bytes of fp32, cosine to fp32 > 0.99999)")
    parser.add_argument("--chunk-texts", type=int, default=CHUNK_TEXTS,
                        help="texts per chunk: the unit written to OUT.parts/ and resumed after a crash")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    _, _, args.device = init_distributed(args.device)  # under torchrun: one GPU per rank
    start = time.time()
    try:
        count = sum(1 for _ in iter_texts(args.texts, args.text_key))  # checks every line before any GPU time
        settings = EmbedSettings.from_flags(args.embed_preset, args.max_length, args.instruction, args.append_eos,
                                            args.bidirectional)
        metadata = {**llm_identity(args.llm, settings), "llm": os.path.abspath(args.llm)}
        make_encode = llm_encoder(args.llm, settings, DTYPES[args.dtype], args.device,
                                  args.batch_tokens or default_batch_tokens(args.device))
        embed_to_file(make_encode, chunked(iter_texts(args.texts, args.text_key), args.chunk_texts), args.output,
                      metadata, args.store_dtype, count)
    except UserError as err:
        exit_with(err)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"embedded {count} texts with {args.llm} in {time.time() - start:.1f}s -> {args.output}")
    close_distributed()


if __name__ == "__main__":
    main()
    exit_torchrun_rank()  # under torchrun: without the interpreter teardown, where gloo can abort a finished rank
