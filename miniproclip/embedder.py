"""The LLM-based text embedder: an LLM folder's tokenizer + a frozen `DecoderLM` + pooling.

A caption becomes one vector: the instruction prefix (if any) and the caption are tokenized, the decoder runs
(causal, or bidirectional for LLM2Vec-style embedders), and the final-norm hidden states are pooled: averaged over
the caption's tokens (ProCLIP, LLM2CLIP), taken at the last token (e5-mistral, gte-Qwen2, Qwen3-Embedding), or
through NV-Embed's latent attention. Named presets (PRESETS) reproduce released embedders. Captions are sorted by
token count and packed into batches under a token budget, so short captions are not padded to the length of long
ones. `embed.py` caches these vectors on disk; stage 0 trains through the same `pooled_embeddings`.
"""

import hashlib
import os
import re
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from .errors import SettingsError
from .llm import DecoderLM, last_token_pool, mean_pool
from .nvembed import LatentAttention
from .weights import ModelFolderError, read_config



def text_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


POOLS = ("mean", "last", "latent")  # mean_pool, last_token_pool, NV-Embed's latent attention (nvembed.py)
FIELDS_BEFORE_PRESETS = {"pool": "mean", "instruction_format": "{}"}  # what caches written before these fields hold


@dataclass
class EmbedSettings:
    """How a caption becomes a vector; part of the cache's identity (a cache made otherwise is not reused)."""
    max_length: int = 512  # tokens per caption, prefix and suffix included (LLM2CLIP uses 512)
    instruction: str = ""  # prefix, e.g. "Given a caption, retrieve a matching image: "; excluded from the pool
    append_eos: bool = False  # end each caption with the EOS token, unless the tokenizer already ends it with EOS
    causal: bool = True  # False for bidirectional embedders (LLM2Vec / LLM2CLIP's Llama-3 embedder)
    suffix: str = ""  # appended to each caption and pooled with it (llm2vec-llama3: "<|eot_id|>")
    # with no instruction: pool the tokens the tokenizer adds before the text (Llama's BOS); leaving them out
    # measured no better on paraphrase retrieval (README, "Stage 0"), so the default keeps them
    pool_bos: bool = True
    pool: str = "mean"  # one of POOLS: mean over the caption's tokens, its last token, or NV-Embed's latent attention
    instruction_format: str = "{}"  # how a given instruction becomes the prefix, e.g. "Instruct: {}\nQuery: "

    def __post_init__(self):
        if self.pool not in POOLS:
            raise SettingsError(f"unknown pooling {self.pool!r} in the embedding settings; use one of "
                                f"{', '.join(POOLS)} "
                             "(or an embedder preset, --embed-preset, that names one)")

    @classmethod
    def preset(cls, name: str, **overrides) -> "EmbedSettings":
        """Named settings (PRESETS), with fields such as max_length overridden by keyword."""
        if name not in PRESETS:
            raise SettingsError(f"unknown embedding preset {name!r} (embed_preset); known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_flags(cls, preset: str = "default", max_length: int = 512, instruction: str = "",
                   append_eos: bool = False, bidirectional: bool = False) -> "EmbedSettings":
        """The command-line flags (train.py, the embed CLI; a checkpoint's saved args): the preset's fields, with
        --max-length always and --instruction, --append-eos, --bidirectional where given overriding them."""
        given = {"instruction": instruction or None, "append_eos": append_eos or None,
                 "causal": False if bidirectional else None}  # None: not given, the preset's value stands
        return cls.preset(preset, max_length=max_length, **{k: v for k, v in given.items() if v is not None})

    @property
    def prefix(self) -> str:
        """The text before each caption: the instruction in the preset's format ("" without an instruction)."""
        return self.instruction_format.format(self.instruction) if self.instruction else ""


# llm2vec's `LLM2Vec.encode` for Llama-3 instruct models (llm2vec/llm2vec.py `prepare_for_tokenization`, `tokenize`,
# `get_pooling`), the path LLM2CLIP's and ProCLIP's caption features come from: BOS + user header + caption +
# <|eot_id|>, bidirectional attention, mean over the caption and <|eot_id|> (not BOS, not the header). The same
# tokens, attention and pool as llm2vec for every caption whose wrapped form fits max_length (tests/
# test_embedder_presets.py); a longer one is cut token-wise before <|eot_id|>, where llm2vec cuts it word-wise to
# doc_max_length and then from the right, losing <|eot_id|>.
LLAMA3_USER_HEADER = "<|start_header_id|>user<|end_header_id|>\n\n"
# The released last-token and latent-attention embedders, as their model cards' transformers code embeds a text
# (tests/test_embedder_pooling.py): captions are documents, embedded with no instruction; a given --instruction
# (a task) is wrapped in the card's query format. EOS ends every text (the cards append it, or their tokenizers do).
CARD_QUERY = "Instruct: {}\nQuery: "  # e5-mistral `get_detailed_instruct`; gte-Qwen2 and NV-Embed-v2 the same
PRESETS = {
    "default": {},
    "llm2vec-llama3": {"instruction": LLAMA3_USER_HEADER, "suffix": "<|eot_id|>", "causal": False},
    # Qwen/Qwen3-Embedding-0.6B/4B/8B: causal, last token = <|endoftext|>; its query format has no space after "Query:"
    "qwen3-embedding": {"pool": "last", "append_eos": True, "instruction_format": "Instruct: {}\nQuery:"},
    # intfloat/e5-mistral-7b-instruct: causal, BOS + text + </s>, last token
    "e5-mistral": {"pool": "last", "append_eos": True, "instruction_format": CARD_QUERY},
    # Alibaba-NLP/gte-Qwen2-1.5B/7B-instruct: text + <|endoftext|>, last token; attention as config.json says
    # (`is_causal: false`: bidirectional, as vLLM and transformers >= 5.2 read it)
    "gte-qwen2": {"pool": "last", "append_eos": True, "instruction_format": CARD_QUERY},
    # nvidia/NV-Embed-v2: bidirectional Mistral, BOS + text + </s>, latent attention over all but the instruction
    "nv-embed-v2": {"pool": "latent", "append_eos": True, "causal": False, "instruction_format": CARD_QUERY},
}
SPECIAL_TOKEN = re.compile(r"<\|[a-z_]+\|>")  # Llama-3 / ChatML-style special tokens named in an instruction or suffix


class CaptionTokenizer:
    """An LLM folder's tokenizer.json with the embedding settings: [the tokenizer's leading special tokens] +
    prefix + caption + suffix + [its closing special tokens] [+ EOS], the caption cut to fit max_length.

    `unpooled` leading tokens are left out of the pool: the prefix with its special tokens where there is an
    instruction (or pool_bos is False), else none. Captions lose trailing whitespace first, as llm2vec strips them
    (`LLM2Vec.prepare_for_tokenization`: `(separator + text).strip()`): "A dog.  " is embedded as "A dog.".
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
        for token in SPECIAL_TOKEN.findall(settings.prefix + settings.suffix):
            if self.tokenizer.token_to_id(token) is None:  # it would be split into characters, silently
                raise ModelFolderError(f"{tokenizer_path}: no {token} token, which the embedding settings use; "
                                       "is this the LLM the preset is meant for?")
        config = read_config(folder)
        eos = config.get("eos_token_id", config.get("text_config", {}).get("eos_token_id"))  # NV-Embed: text_config
        self.eos_id = eos[0] if isinstance(eos, list) else eos
        if settings.append_eos and self.eos_id is None:
            raise ModelFolderError(f"{folder}: config.json has no eos_token_id, needed by append_eos (--append-eos)")
        # the special tokens the tokenizer's template puts around a text, e.g. [BOS] before, [<|endoftext|>] after
        probe = self.tokenizer.encode("a")
        words = [i for i, special in enumerate(probe.special_tokens_mask) if not special]
        opening, closing = probe.ids[:words[0]], probe.ids[words[-1] + 1:]
        self.start = opening + self.tokenizer.encode(settings.prefix, add_special_tokens=False).ids
        self.end = self.tokenizer.encode(settings.suffix, add_special_tokens=False).ids + closing
        if settings.append_eos and self.end[-1:] != [self.eos_id]:
            self.end.append(self.eos_id)
        self.unpooled = len(self.start) if settings.prefix or not settings.pool_bos else 0

    def __call__(self, texts: list[str]) -> tuple[list[list[int]], int]:
        """Token ids per text and how many texts were cut to max_length."""
        room = self.settings.max_length - len(self.start) - len(self.end)
        if room <= 0:
            raise SettingsError(f"max_length {self.settings.max_length} leaves no room after the prefix and suffix")
        ids, truncated = [], 0
        for encoding in self.tokenizer.encode_batch([text.rstrip() for text in texts], add_special_tokens=False):
            truncated += len(encoding.ids) > room
            ids.append(self.start + encoding.ids[:room] + self.end)
        return ids, truncated


def pad_batch(ids: list[list[int]], unpooled: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) input ids, attention mask (1 = real token) and pool mask (real tokens after the first
    `unpooled`). Positions count real tokens only (`DecoderLM.forward`), so left padding, as the last-token model
    cards use, gives the same vectors."""
    T = max(len(row) for row in ids)
    input_ids = torch.zeros(len(ids), T, dtype=torch.long)
    attention = torch.zeros(len(ids), T, dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, :len(row)] = torch.tensor(row)
        attention[i, :len(row)] = 1
    pool = attention.clone()
    pool[:, :unpooled] = 0  # the prefix is not part of the caption's meaning
    return input_ids, attention, pool


def make_pool(settings: EmbedSettings, folder: str | None = None, dtype: torch.dtype = torch.float32,
              device: str = "cpu"):
    """`pool(hidden, attention, pool_mask) -> (B, C) fp32` for the settings' pooling (the latent attention's
    weights come from the NV-Embed `folder`)."""
    if settings.pool == "mean":
        return lambda hidden, attention, pool_mask: mean_pool(hidden, pool_mask)
    if settings.pool == "last":
        return lambda hidden, attention, pool_mask: last_token_pool(hidden, attention)
    if folder is None:
        raise SettingsError("latent-attention pooling needs the NV-Embed folder its weights are in")
    latent = LatentAttention.from_pretrained(folder, dtype, device)
    latent.requires_grad_(False)
    return lambda hidden, attention, pool_mask: latent(hidden, pool_mask)


def pooled_embeddings(forward, pool, ids: list[list[int]], unpooled: int, batch_tokens: int, device,
                      one_batch: bool = False, progress: bool = False) -> torch.Tensor:
    """(N, C) fp32 embeddings of token-id rows in input order: rows in length-sorted batches of at most
    `batch_tokens` padded tokens (or `one_batch`), padded, run by `forward(ids, mask)`, pooled by `pool`.

    The one implementation of tokens -> vectors, for the frozen embedder (LLMEmbedder) and stage 0's training."""
    batches = [list(range(len(ids)))] if one_batch else token_budget_batches([len(row) for row in ids], batch_tokens)
    rows = [None] * len(ids)
    bar = tqdm(total=sum(map(len, ids)), unit="tok", desc="embed", disable=not progress, dynamic_ncols=True)
    for batch in batches:
        input_ids, attention, pool_mask = (t.to(device) for t in pad_batch([ids[i] for i in batch], unpooled))
        for i, vector in zip(batch, pool(forward(input_ids, attention), attention, pool_mask)):  # (b, C)
            rows[i] = vector
        bar.update(sum(len(ids[i]) for i in batch))
    bar.close()
    return torch.stack(rows)


class LLMEmbedder:
    """Tokenizer + frozen `DecoderLM` + pooling: list of captions -> (N, hidden) float32 embeddings."""

    def __init__(self, folder: str, settings: EmbedSettings = EmbedSettings(), dtype: torch.dtype = torch.float32,
                 device: str = "cpu"):
        self.tokenize = CaptionTokenizer(folder, settings)
        self.tokenizer = self.tokenize.tokenizer
        self.model = DecoderLM.from_pretrained(folder, dtype=dtype, device=device, causal=settings.causal)
        self.model.requires_grad_(False)
        self.pool = make_pool(settings, folder, dtype, device)
        self.settings, self.device, self.folder = settings, device, folder

    @torch.no_grad()
    def embed_ids(self, ids: list[list[int]]) -> torch.Tensor:
        """(B, hidden) float32 embeddings of one padded batch of token-id rows."""
        vectors = pooled_embeddings(self.model, self.pool, ids, self.tokenize.unpooled, 0, self.device, one_batch=True)
        return vectors.cpu()

    @torch.no_grad()
    def embed(self, texts: list[str], batch_tokens: int = 8192, progress: bool = False) -> tuple[torch.Tensor, int]:
        """(N, hidden) float32 embeddings in input order, computed in length-sorted token-budget batches,
        and the number of texts cut to max_length."""
        if not texts:
            return torch.empty(0, self.model.config.hidden_size), 0
        ids, truncated = self.tokenize(texts)
        vectors = pooled_embeddings(self.model, self.pool, ids, self.tokenize.unpooled, batch_tokens, self.device,
                                    progress=progress)
        return vectors.cpu(), truncated


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
