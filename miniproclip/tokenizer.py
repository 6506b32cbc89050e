"""CLIP's byte-level BPE tokenizer, and the batch wrapper that turns captions into the text tower's 77 ids.

`build_clip_tokenizer` builds, with the `tokenizers` library alone, the same pipeline as transformers'
`CLIPConverter` (convert_slow_tokenizer.py), which wrote the hub's `openai/clip-vit-*/tokenizer.json`:
NFC + whitespace collapse + lowercase, OpenAI's word regex, GPT-2's byte-to-unicode map, BPE over the first
48,894 merges of OpenAI's `bpe_simple_vocab_16e6.txt.gz` with a `</w>` end-of-word suffix, and
`<|startoftext|>` 49406 / `<|endoftext|>` 49407 around the text. OpenAI's own clip/simple_tokenizer.py also runs
ftfy and HTML unescaping first; like the hub tokenizers we skip both, so curly quotes, full-width forms and
`&amp;`-style entities tokenize as written.

`CLIPTokenizer` wraps any CLIP tokenizer.json (the hub's, or one saved by `save_clip_tokenizer_json`) and makes
fixed-length rows: `<|startoftext|>`, the BPE ids, `<|endoftext|>`, then padding. A caption longer than the
window is cut so that `<|endoftext|>` stays the last token (as open_clip's and HF's truncation do), because the
text tower pools its output at that token.
"""

import gzip
import json
import os
import re
import string
from dataclasses import dataclass

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from .weights import ModelFolderError

DEFAULT_CLIP_BPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "bpe_simple_vocab_16e6.txt.gz")
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps 48,894 merges: 2*256 byte tokens + merges + 2 specials = 49,408 ids
# OpenAI's word splitter: contractions, letter runs, single digits, runs of other non-space characters
CLIP_WORD_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from the 256 byte values to printable characters; its order fixes the first 256 CLIP ids."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    # the remaining bytes (controls, space, ...) get the code points 256, 257, ... in byte order
    others = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
    return dict(zip(printable + others, chars))


def read_clip_bpe(bpe_gz_path: str = DEFAULT_CLIP_BPE) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) exactly as OpenAI's simple_tokenizer.py derives them from the gzipped merges file."""
    if not os.path.isfile(bpe_gz_path):
        raise ModelFolderError(f"CLIP BPE merges file {bpe_gz_path} not found: "
                                f"pass the path of OpenAI's bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(bpe_gz_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a version header
    byte_chars = list(bytes_to_unicode().values())
    # ids: bytes, bytes ending a word, one id per merge result in merge order, then the two specials
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(pair) for pair in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, merges


def build_clip_tokenizer(bpe_gz_path: str = DEFAULT_CLIP_BPE) -> Tokenizer:
    """The CLIP tokenizer as a `tokenizers.Tokenizer`, identical to transformers' CLIPConverter output."""
    vocab, merges = read_clip_bpe(bpe_gz_path)
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                              fuse_unk=False, unk_token=EOS_TOKEN))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    # keep the regex matches, drop what lies between them (whitespace); then map bytes to BPE characters
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_WORD_REGEX), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    # the specials already have ids 49406/49407 in the vocab; registering them stops BPE from splitting them
    tokenizer.add_special_tokens([AddedToken(BOS_TOKEN, special=True), AddedToken(EOS_TOKEN, special=True)])
    # RobertaProcessing(sep, cls) adds "<|startoftext|> ... <|endoftext|>" (the converter's choice, kept for HF)
    tokenizer.post_processor = processors.RobertaProcessing(
        (EOS_TOKEN, vocab[EOS_TOKEN]), (BOS_TOKEN, vocab[BOS_TOKEN]), trim_offsets=False, add_prefix_space=False)
    return tokenizer


def save_clip_tokenizer_json(out_path: str, bpe_gz_path: str = DEFAULT_CLIP_BPE) -> None:
    """Write the CLIP tokenizer.json (loadable by `CLIPTokenizer.from_folder` and transformers' AutoTokenizer)."""
    build_clip_tokenizer(bpe_gz_path).save(out_path)


@dataclass
class TokenizedText:
    input_ids: torch.Tensor  # (B, context_length) int64: BOS, BPE ids, EOS, then pad_id
    truncated: torch.Tensor  # (B,) bool: captions longer than the window, which lost tokens

    @property
    def num_truncated(self) -> int:
        return int(self.truncated.sum())


def _token_id(tokenizer: Tokenizer, token: str, where: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ModelFolderError(f"{where} has no {token} token: it is not the tokenizer of this model")
    return token_id


def _folder_pad_token(folder: str) -> str | None:
    """The pad token named by HF's tokenizer_config.json or special_tokens_map.json, if either names one."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    pad = json.load(f).get("pad_token")
            except json.JSONDecodeError as error:
                raise ModelFolderError(f"{path} is not valid JSON ({error}): fix or delete it") from error
            if pad is not None:
                return pad["content"] if isinstance(pad, dict) else pad  # older files store an AddedToken dict
    return None


def read_tokenizer_json(folder: str, remedy: str) -> Tokenizer:
    """The folder's tokenizer.json; a one-line error naming it, with `remedy`, when it is missing or malformed."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise ModelFolderError(f"{folder} has no tokenizer.json: copy the checkpoint's tokenizer.json there {remedy}")
    try:
        return Tokenizer.from_file(path)
    except Exception as error:  # tokenizers raises a bare Exception for malformed files
        raise ModelFolderError(f"{path} is not a valid tokenizer.json ({error})") from error


class CLIPTokenizer:
    """Captions -> (B, 77) ids for the CLIP text tower.

    Padding id: tokenizer.json's own padding config if it has one, else the pad token of the folder's
    tokenizer_config.json / special_tokens_map.json (`<|endoftext|>` for openai/*, "!" = 0 for open_clip exports),
    else `<|endoftext|>`, so that our ids equal what HF's tokenizer returns for the same checkpoint. The choice does
    not change the text features: the tower is causal, so nothing after the first EOS reaches it, and both pooling
    rules find that EOS with any of these pads (`argmax(ids)` returns the first maximum and no pad id exceeds
    49407; "first id == eos_token_id" stops at the real EOS, which precedes all padding).
    """

    def __init__(self, tokenizer: Tokenizer, context_length: int = 77, pad_id: int | None = None,
                 bos_token: str | None = BOS_TOKEN, eos_token: str = EOS_TOKEN, prepare=None):
        # bos_token None: rows start with the text (SigLIP); prepare: str -> str before encoding (SigLIP's lowercase)
        self.bos_id = _token_id(tokenizer, bos_token, "tokenizer") if bos_token is not None else None
        self.eos_id = _token_id(tokenizer, eos_token, "tokenizer")
        padding = tokenizer.padding  # None unless the tokenizer.json configures padding
        self.pad_id = pad_id if pad_id is not None else padding["pad_id"] if padding else self.eos_id
        self.context_length = context_length
        self.prepare = prepare
        # a private copy without built-in padding/truncation: rows are cut and padded here, BOS/EOS added here
        self.tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()

    @classmethod
    def from_folder(cls, folder: str, context_length: int = 77) -> "CLIPTokenizer":
        path = os.path.join(folder, "tokenizer.json")
        open_clip_config = os.path.join(folder, "open_clip_config.json")
        if not os.path.isfile(path) and os.path.isfile(open_clip_config):  # open_clip's own BPE, pads with 0
            with open(open_clip_config, encoding="utf-8") as f:
                text_cfg = json.load(f).get("model_cfg", {}).get("text_cfg", {})
            return cls(build_clip_tokenizer(), text_cfg.get("context_length", context_length), pad_id=0)
        tokenizer = read_tokenizer_json(folder, "or write one with miniproclip.tokenizer.save_clip_tokenizer_json")
        pad_id = None
        if tokenizer.padding is None and (pad_token := _folder_pad_token(folder)) is not None:
            pad_id = _token_id(tokenizer, pad_token, path)
        return cls(tokenizer, context_length, pad_id)

    def __call__(self, texts: list[str]) -> TokenizedText:
        n = self.context_length
        bos = [] if self.bos_id is None else [self.bos_id]
        input_ids = torch.full((len(texts), n), self.pad_id, dtype=torch.long)  # (B, n)
        truncated = torch.zeros(len(texts), dtype=torch.bool)
        texts = [self.prepare(text) for text in texts] if self.prepare else texts
        for row, encoding in enumerate(self.tokenizer.encode_batch(texts, add_special_tokens=False)):
            room = n - len(bos) - 1
            truncated[row] = len(encoding.ids) > room
            ids = [*bos, *encoding.ids[:room], self.eos_id]  # EOS stays last even when cut
            input_ids[row, : len(ids)] = torch.tensor(ids)
        return TokenizedText(input_ids, truncated)


def canonicalize_text(text: str) -> str:
    """SigLIP's caption normalisation (transformers SiglipTokenizer.canonicalize_text, from big_vision's
    prompt_engineering.py): lowercase, ASCII punctuation removed, whitespace runs collapsed, ends stripped."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def siglip_tokenizer(folder: str, context_length: int = 64, canonicalize: bool = False) -> CLIPTokenizer:
    """Captions -> (B, 64) ids for a SigLIP text tower, as the model was trained (big_vision's text preprocessing):
    no BOS, the text, EOS (kept when cut), then padding to the full window on the right, because the tower pools
    the last position. SigLIP (SentencePiece, `</s>` = EOS = pad): `canonicalize_text` first, as transformers'
    SiglipTokenizer does. SigLIP2 (Gemma's vocabulary, `<eos>`, `<pad>`): lowercased (`lower|tok(..., bos='no',
    eos='sticky')` in big_vision's SigLIP2 config; transformers' Siglip2Tokenizer also lowercases but adds no EOS
    and pads on the left), or canonicalized with `canonicalize` (open_clip's SigLIP2 configs: clean "canonicalize").
    The pad token is the folder's tokenizer_config.json one when it names one."""
    tokenizer = read_tokenizer_json(folder, "(SigLIP's hub folders may hold only spiece.model: convert it once "
                                            "with transformers' convert_slow_tokenizer, saved as tokenizer.json)")
    gemma = tokenizer.token_to_id("<eos>") is not None
    eos = "<eos>" if gemma else "</s>"
    pad = _folder_pad_token(folder) or ("<pad>" if gemma else eos)
    pad_id = _token_id(tokenizer, pad, os.path.join(folder, "tokenizer.json"))
    prepare = str.lower if gemma and not canonicalize else canonicalize_text
    return CLIPTokenizer(tokenizer, context_length, pad_id=pad_id, bos_token=None, eos_token=eos, prepare=prepare)
