"""Frozen teachers' features, computed once and read back: what keeps a training step to what actually trains.

Stage 1's teacher is CLIP's text tower. Every caption, cut to its 77-token window as the teacher sees it, is encoded
once into `clip_text_<digest>.safetensors` beside the LLM cache, plus one last column: 1 where the caption was cut
(for --skip-truncated-long and the `teacher_truncated` log). Stage 2's teacher, when frozen (--ema-momentum 1) and
shown a fixed crop (--train-crop center), gives every image the same features all run long: they are cached per
image reference in `clip_image_<digest>.safetensors`. The digest in each name covers what the vectors mean (the
teacher's fingerprint and the tokenizer or the image transform), so another teacher gets another file. Both caches
are `embed.ensure_vector_cache` files (streamed in chunks, resumable, memmapped); they store fp32, so a step
reads the live teacher's values (up to fp32 rounding: the cache fill batches the inputs differently).

At setup every data row is mapped once to its cache rows (`RowVectors`): a step gathers vectors by index, with no
hashing or tokenising, and copies them from pinned memory. The models used to fill a cache are released after it.
"""

import gc
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ..backbones import load_clip, load_tokenizer
from ..data import caption_texts
from ..embed import VectorCache, chunked, ensure_vector_cache, hash_texts
from ..weights import folder_fingerprint, tensors_digest
from ..loader import ImageTextDataset, make_loader
from ..tokenizer import CLIPTokenizer

TEXT_BATCH = 256  # captions per teacher forward when filling the text cache
IMAGE_BATCH = 64  # images per teacher forward when filling the image cache
MAP_CHUNK = 1 << 20  # texts hashed at a time when rows are mapped to cache rows
BESIDE_FLAG = "--text-cache (the teacher caches sit beside it)"  # where a refused cache's error points


def module_fingerprint(module: nn.Module) -> str:
    """A digest of a module's weights themselves (names, dtypes, shapes and bytes of its state dict)."""
    return tensors_digest(module.state_dict().items())


def cache_path(beside: str, kind: str, identity: dict[str, str]) -> str:
    """`<folder of beside>/<kind>_<digest of identity>.safetensors`."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(os.path.dirname(os.path.abspath(beside)), f"{kind}_{digest}.safetensors")


def release_memory(device: torch.device) -> None:
    """Return the memory of models just dropped (e.g. after a cache fill) to the system and the GPU."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -----------------------------------------------------------------------------
# data rows -> cache rows, mapped once; a step gathers by index

@dataclass
class RowVectors:
    """A vector cache and, for each data row, its cache rows: column 0 the short caption (or the image), column 1
    the long caption, -1 where a row has none."""
    cache: VectorCache
    rows: np.ndarray  # (N, K) int32 (int64 past 2^31 cache rows)

    @classmethod
    def map(cls, cache: VectorCache, columns: list[list[str | None]]) -> "RowVectors":
        return cls(cache, map_rows([cache], columns)[0])

    def to_device(self, cache_rows: np.ndarray, device: torch.device) -> torch.Tensor:
        """(B, D) float32 vectors of `cache_rows` on `device`: one gather, then `upload`; fp16 rows are cast to
        float32 after the copy, which so moves half the bytes."""
        return self.upload(self.cache.stored(cache_rows), device).float()

    @staticmethod
    def upload(vectors: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A CPU tensor on `device`; on CUDA from pinned memory, so the copy runs asynchronously to the host."""
        return (vectors.pin_memory() if device.type == "cuda" else vectors).to(device, non_blocking=True)


def map_rows(caches: list[VectorCache], columns: list[Iterable[str | None]]) -> list[np.ndarray]:
    """For each cache, (N, len(columns)) rows of the texts of each column (None -> -1). Each text is hashed once,
    a chunk at a time, and looked up in every cache; a text missing from a cache is an error."""
    dtype = np.int32 if all(len(cache) < 2**31 for cache in caches) else np.int64
    found = [[] for _ in caches]  # per cache, per column: arrays of rows
    for column in columns:
        parts = [[] for _ in caches]
        for chunk in chunked(column, MAP_CHUNK):
            present = np.array([text is not None for text in chunk], dtype=bool)
            digests = hash_texts([text for text in chunk if text is not None])
            for cache, part in zip(caches, parts):
                rows = np.full(len(chunk), -1, dtype=dtype)
                rows[present] = cache.rows_of_digests(digests)
                if (rows[present] < 0).any():
                    raise KeyError(f"{cache.path}: some texts of the data are not in this cache")
                part.append(rows)
        for cache_found, part in zip(found, parts):
            cache_found.append(np.concatenate(part) if part else np.zeros(0, dtype))
    return [np.stack(columns_found, axis=1) for columns_found in found]


def caption_columns(rows) -> list[Iterable[str | None]]:
    """The rows' short captions, then their long ones (None where a row has none), one pass each."""
    return [(row.caption for row in rows), (row.long_caption for row in rows)]


# -----------------------------------------------------------------------------
# stage 1: CLIP's text features of every caption

def clip_text_identity(clip_dir: str, tokenizer: CLIPTokenizer) -> dict[str, str]:
    """What the text teacher's vectors mean: the CLIP folder and how captions become its 77 (SigLIP: 64) tokens."""
    path = os.path.join(clip_dir, "tokenizer.json")
    if os.path.isfile(path):
        with open(path, "rb") as f:
            tokenizer_digest = hashlib.sha256(f.read()).hexdigest()[:16]
    else:  # an open_clip folder without one: the bundled BPE it is built from
        tokenizer_digest = hashlib.sha256(tokenizer.tokenizer.to_str().encode()).hexdigest()[:16]
    return {"clip_fingerprint": folder_fingerprint(clip_dir), "tokenizer": tokenizer_digest,
            "context_length": str(tokenizer.context_length), "pad_id": str(tokenizer.pad_id),
            "columns": "L2-normalised text features, then 1.0 where the caption was cut"}


def clip_text_encoder(clip_dir: str, tokenizer: CLIPTokenizer, device: torch.device,
                      autocast) -> Callable[[], Callable[[list[str]], torch.Tensor]]:
    """`make_encode` for `ensure_vector_cache`: loads CLIP's text tower when first needed (on `device`, fp32 weights
    under `autocast`, as the live teacher ran); encode(texts) -> (B, D + 1) float32, the last column the cut flag."""
    def make_encode():
        clip = load_clip(clip_dir)
        del clip.vision_model, clip.visual_projection  # the text tower only
        clip.to(device)

        @torch.no_grad()
        def encode(texts: list[str]) -> torch.Tensor:
            out = []
            for start in range(0, len(texts), TEXT_BATCH):
                tokens = tokenizer(texts[start:start + TEXT_BATCH])
                with autocast:
                    features = clip.encode_text(tokens.input_ids.to(device), normalize=True)  # (b, D) fp32
                out.append(torch.cat([features.cpu(), tokens.truncated[:, None].float()], dim=1))  # (b, D + 1)
            return torch.cat(out)
        return encode
    return make_encode


def stage1_vectors(llm_cache: VectorCache, rows, clip_dir: str, device: torch.device, autocast,
                   log=print) -> tuple[RowVectors, RowVectors]:
    """(LLM vectors, teacher vectors) of every row's short and long caption; the teacher cache is filled on first
    use beside the LLM cache, and the text tower released after."""
    tokenizer = load_tokenizer(clip_dir)
    identity = clip_text_identity(clip_dir, tokenizer)
    path = cache_path(llm_cache.path, "clip_text", identity)
    texts = caption_texts(rows)
    teacher = ensure_vector_cache(path, texts, clip_text_encoder(clip_dir, tokenizer, device, autocast), identity,
                                  {"clip": os.path.abspath(clip_dir)}, "fp32", what="teacher text cache",
                                  flag=BESIDE_FLAG, log=log)
    del texts
    release_memory(device)
    llm_rows, teacher_rows = map_rows([llm_cache, teacher], caption_columns(rows))
    return RowVectors(llm_cache, llm_rows), RowVectors(teacher, teacher_rows)


# -----------------------------------------------------------------------------
# stage 2: the frozen image teacher's features of every image under a fixed transform

def image_teacher_encoder(teacher: nn.Module, rows, transform, device: torch.device, autocast,
                          workers: int) -> Callable[[], Callable[[list[str]], torch.Tensor]]:
    """`make_encode` for images named by their row's `image`: encode(images) -> (B, D) float32 features of the
    teacher, NaN rows for unreadable images: training drops the image if it is still unreadable, or else leaves
    it out of L_reg and counts it (`teacher_unknown`; delete the cache file to compute it again)."""
    def make_encode():
        where = {row.image: i for i, row in enumerate(rows)}  # an image's row, to read it (tar members too)
        model = teacher.to(device)

        @torch.no_grad()
        def encode(images: list[str]) -> torch.Tensor:
            dataset = ImageTextDataset([rows[where[image]] for image in images], transform)
            batches = [list(range(start, min(start + IMAGE_BATCH, len(images))))
                       for start in range(0, len(images), IMAGE_BATCH)]
            out = torch.full((len(images), model.visual_projection.out_features), float("nan"))
            for batch in make_loader(dataset, batches, workers):
                if batch["pixels"] is not None:
                    with autocast:
                        out[batch["indices"]] = model.encode_image(batch["pixels"].to(device)).float().cpu()
            return out
        return encode
    return make_encode


def image_teacher_vectors(teacher: nn.Module, rows, transform, beside: str, device: torch.device, autocast,
                          workers: int, log=print) -> RowVectors:
    """The frozen image teacher's features of every row's image, from `clip_image_<digest>.safetensors` beside
    `beside` (filled on first use). Only valid for a teacher that never changes and a deterministic transform."""
    identity = {"teacher_fingerprint": module_fingerprint(teacher),
                "transform": json.dumps(transform.__dict__, sort_keys=True, default=str)}
    path = cache_path(beside, "clip_image", identity)
    images = list(dict.fromkeys(row.image for row in rows))
    encoder = image_teacher_encoder(teacher, rows, transform, device, autocast, workers)
    cache = ensure_vector_cache(path, images, encoder, identity, None, "fp32", what="teacher image cache",
                                flag=BESIDE_FLAG, log=log)
    del images
    return RowVectors.map(cache, [(row.image for row in rows)])


def place_image_teacher(teacher: nn.Module, device: torch.device, dtype: torch.dtype, frozen: bool) -> nn.Module:
    """A live image teacher on `device`. A frozen one is cast once to the dtype it runs in (`dtype`, bf16 under
    amp_bf16), instead of autocast re-casting fp32 weights every forward; an EMA one stays fp32, since its
    per-step updates (1 - momentum)·(student - teacher) fall below bf16's resolution."""
    return teacher.to(device=device, dtype=dtype if frozen else torch.float32)
