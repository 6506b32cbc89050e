"""The LLM-based text embedder: an LLM folder's tokenizer + a frozen `DecoderLM` + mean pooling.

A caption becomes one vector: the instruction prefix (if any) and the caption are tokenized, the decoder runs
(causal, or bidirectional for LLM2Vec-style embedders), and the final-norm hidden states are averaged over the
caption's tokens. Captions are sorted by token count and packed into batches under a token budget, so short
captions are not padded to the length of long ones. `embed.py` caches these vectors on disk.
"""

import hashlib
import json
import os
import re
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from .llm import DecoderLM, mean_pool
from .weights import ModelFolderError, model_weight_files, read_config, read_model_config



def text_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def folder_fingerprint(folder: str) -> str:
    """Identifies a model folder's weights (an LLM, a CLIP), so a cache made by another model (or another
    fine-tune of it) is detected.

    Hashes config.json and, per weight file, its name, size, safetensors header and a strided sample of its data.
    Config and sizes alone do not tell a fine-tune from its base: a merged LoRA has the same config, keys, dtypes
    and file sizes. The header holds the metadata stage 0 writes (a hash of the merged adapters, exact); the
    sample (WEIGHT_SAMPLES chunks) catches other same-layout fine-tunes at a cost of a few MB read per file.
    """
    digest = hashlib.sha256(json.dumps(read_model_config(folder), sort_keys=True).encode())
    for path in model_weight_files(folder):
        digest.update(f"{os.path.basename(path)}:{os.path.getsize(path)}".encode())
        digest.update(safetensors_content_sample(path))
    return digest.hexdigest()[:16]


WEIGHT_SAMPLES, SAMPLE_BYTES = 64, 65536  # evenly spaced chunks of each weight file that the fingerprint reads


def safetensors_content_sample(path: str) -> bytes:
    """The header (8-byte length + JSON, with `__metadata__`) and WEIGHT_SAMPLES chunks of the data section."""
    with open(path, "rb") as f:
        if path.endswith(".safetensors"):
            header_size = int.from_bytes(f.read(8), "little")
            parts, data_start = [f.read(header_size)], 8 + header_size
        else:  # an open_clip .bin (a torch pickle, never unpickled here) has no header: the whole file is sampled
            parts, data_start = [], 0
        data_size = os.path.getsize(path) - data_start
        stride = max(data_size // WEIGHT_SAMPLES, SAMPLE_BYTES)
        for offset in range(0, data_size, stride):
            f.seek(data_start + offset)
            parts.append(f.read(SAMPLE_BYTES))
    return b"".join(parts)


@dataclass
class EmbedSettings:
    """How a caption becomes a vector; part of the cache's identity (a cache made otherwise is not reused)."""
    max_length: int = 512  # tokens per caption, prefix and suffix included (LLM2CLIP uses 512)
    instruction: str = ""  # prefix, e.g. "Given a caption, retrieve a matching image: "; excluded from the mean pool
    append_eos: bool = False  # end each caption with the EOS token (some LLM2Vec-style embedders expect it)
    causal: bool = True  # False for bidirectional embedders (LLM2Vec / LLM2CLIP's Llama-3 embedder)
    suffix: str = ""  # appended to each caption and pooled with it (llm2vec-llama3: "<|eot_id|>")
    # with no instruction: pool the tokens the tokenizer adds before the text (Llama's BOS); leaving them out
    # measured no better on paraphrase retrieval (README, "Stage 0"), so the default keeps them
    pool_bos: bool = True

    @classmethod
    def preset(cls, name: str, **overrides) -> "EmbedSettings":
        """Named settings (PRESETS), with fields such as max_length overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown embedding preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_flags(cls, preset: str = "default", max_length: int = 512, instruction: str = "",
                   append_eos: bool = False, bidirectional: bool = False) -> "EmbedSettings":
        """The command-line flags (train.py, the embed CLI; a checkpoint's saved args): the preset's fields, with
        --max-length always and --instruction, --append-eos, --bidirectional where given overriding them."""
        given = {"instruction": instruction or None, "append_eos": append_eos or None,
                 "causal": False if bidirectional else None}  # None: not given, the preset's value stands
        return cls.preset(preset, max_length=max_length, **{k: v for k, v in given.items() if v is not None})


# llm2vec's `LLM2Vec.encode` for Llama-3 instruct models (llm2vec/llm2vec.py `prepare_for_tokenization`, `tokenize`,
# `get_pooling`), the path LLM2CLIP's and ProCLIP's caption features come from: BOS + user header + caption +
# <|eot_id|>, bidirectional attention, mean over the caption and <|eot_id|> (not BOS, not the header). The same
# tokens, attention and pool as llm2vec for every caption whose wrapped form fits max_length (tests/
# test_embedder_presets.py); a longer one is cut token-wise before <|eot_id|>, where llm2vec cuts it word-wise to
# doc_max_length and then from the right, losing <|eot_id|>.
LLAMA3_USER_HEADER = "<|start_header_id|>user<|end_header_id|>\n\n"
PRESETS = {
    "default": {},
    "llm2vec-llama3": {"instruction": LLAMA3_USER_HEADER, "suffix": "<|eot_id|>", "causal": False},
}
SPECIAL_TOKEN = re.compile(r"<\|[a-z_]+\|>")  # Llama-3 / ChatML-style special tokens named in an instruction or suffix


class CaptionTokenizer:
    """An LLM folder's tokenizer.json with the embedding settings: prefix + caption + suffix [+ EOS], cut to max_length.

    The prefix (instruction, or with pool_bos=False the tokenizer's leading special tokens) is left out of the pool.
    """

    def __init__(self, folder: str, settings: EmbedSettings = EmbedSettings()):
        tokenizer_path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(tokenizer_path):
            raise ModelFolderError(f"{folder}: no tokenizer.json; expected a Hugging Face LLM folder with its "
                                   "tokenizer")
        self.tokenizer = Tokenizer.from_file(tokenizer_path)
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.settings = settings
        for token in SPECIAL_TOKEN.findall(settings.instruction + settings.suffix):
            if self.tokenizer.token_to_id(token) is None:  # it would be split into characters, silently
                raise ModelFolderError(f"{tokenizer_path}: no {token} token, which the embedding settings use; "
                                       "is this the LLM the preset is meant for?")
        eos = read_config(folder).get("eos_token_id")
        self.eos_id = eos[0] if isinstance(eos, list) else eos
        if settings.append_eos and self.eos_id is None:
            raise ModelFolderError(f"{folder}: config.json has no eos_token_id, needed by --append-eos")
        # The prefix keeps the tokenizer's special tokens (e.g. Llama's BOS); captions are then encoded bare.
        if settings.instruction:
            self.prefix = self.tokenizer.encode(settings.instruction).ids
        elif not settings.pool_bos:  # the special tokens the tokenizer puts before a text, e.g. [BOS]
            probe = self.tokenizer.encode("a")
            self.prefix = probe.ids[:probe.special_tokens_mask.index(0)]
        else:
            self.prefix = []
        self.suffix = self.tokenizer.encode(settings.suffix, add_special_tokens=False).ids
        self.suffix += [self.eos_id] if settings.append_eos else []

    def __call__(self, texts: list[str]) -> tuple[list[list[int]], int]:
        """Token ids per text and how many texts were cut to max_length."""
        add_special = not self.prefix  # with a prefix, BOS etc. come from the prefix
        room = self.settings.max_length - len(self.prefix) - len(self.suffix)
        if room <= 0:
            raise ValueError(f"--max-length {self.settings.max_length} leaves no room after the prefix and suffix")
        ids, truncated = [], 0
        for encoding in self.tokenizer.encode_batch(texts, add_special_tokens=add_special):
            truncated += len(encoding.ids) > room
            ids.append(self.prefix + encoding.ids[:room] + self.suffix)
        return ids, truncated


def pad_batch(ids: list[list[int]], prefix_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) input ids, attention mask (1 = real token) and pool mask (real tokens after the prefix)."""
    T = max(len(row) for row in ids)
    input_ids = torch.zeros(len(ids), T, dtype=torch.long)
    attention = torch.zeros(len(ids), T, dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, :len(row)] = torch.tensor(row)
        attention[i, :len(row)] = 1
    pool = attention.clone()
    pool[:, :prefix_length] = 0  # the prefix is not part of the caption's meaning
    return input_ids, attention, pool


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
        input_ids, attention, pool = (t.to(self.device) for t in pad_batch(ids, len(self.prefix)))
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


def default_batch_tokens(device: str) -> int:
    """Padded tokens per LLM batch: large on a GPU; on a CPU ~1k, so a batch's activations stay in cache
    (SmolLM2-135M on 2 cores, bf16: 1186 tokens/s at 1024 vs 703 at 8192; fp32: 514 vs 394)."""
    return 8192 if str(device).startswith("cuda") else 1024
