"""Parity of miniproclip.tokenizer with OpenAI's BPE algorithm and with transformers' CLIP tokenizer.

transformers 5.x no longer ships a slow (pure-Python) CLIPTokenizer, so the independent reference here is a
port of OpenAI's clip/simple_tokenizer.py (its ftfy/HTML cleanup replaced by NFC, as the hub tokenizers do).
transformers' CLIPTokenizer is built from vocab.json/merges.txt written by that reference, and loaded from the
tokenizer.json we save.
"""

import functools
import gzip
import json
import unicodedata

import pytest
import regex
import torch
import transformers

from miniproclip.weights import ModelFolderError
from miniproclip.tokenizer import DEFAULT_CLIP_BPE, CLIPTokenizer, build_clip_tokenizer, save_clip_tokenizer_json

CAPTIONS = [
    "a photo of a cat",
    "A Photo of a DOG, sitting on the couch!",
    "  two   people\twalking\n\nalong the beach at sunset...  ",
    "It's the dog's toy; they'll play, we've won, I'm here, you'd see, don't!",
    "3.14159 apples cost $12,345 (approx.) -- 50% off!!! #sale @store",
    "Ein Mädchen läuft über die Straße, große Bäume",
    "Une fenêtre ouverte sur la forêt, déjà été, garçon à l'école",
    "猫がソファの上で寝ている",
    "一只狗在草地上奔跑",
    "🐶 dog 🐱 cat ❤️ 👍🏽 🇫🇷",
    "Ünïcödé NFD: Cafe\u0301 vs Café; İstanbul ß ẞ",
    "tabs\u00a0nbsp\u3000ideographic space and a <|endoftext|> literal",
    "",
]
LONG_CAPTION = " ".join(["a very long and detailed description of a red bicycle parked near a bakery"] * 8)


def openai_bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(n) for n in cs]))


class OpenAISimpleTokenizer:
    """clip/simple_tokenizer.py from openai/CLIP, with ftfy.fix_text + html.unescape replaced by NFC."""

    def __init__(self, bpe_path):
        self.byte_encoder = openai_bytes_to_unicode()
        merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")
        merges = [tuple(merge.split()) for merge in merges[1 : 49152 - 256 - 2 + 1]]
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab]
        vocab += ["".join(merge) for merge in merges] + ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = dict(zip(vocab, range(len(vocab))))
        self.merges = merges
        self.bpe_ranks = dict(zip(merges, range(len(merges))))
        self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}
        self.pat = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )

    @functools.lru_cache(maxsize=None)
    def bpe(self, token):
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = {(a, b) for a, b in zip(word, word[1:])}
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word, i = [], 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = {(a, b) for a, b in zip(word, word[1:])}
        return " ".join(word)

    def encode(self, text):
        text = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip().lower()
        ids = []
        for token in regex.findall(self.pat, text):
            if token in self.cache:
                ids.append(self.encoder[token])
                continue
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[bpe_token] for bpe_token in self.bpe(token).split(" "))
        return ids

    def tokenize(self, texts, context_length=77):
        """open_clip's tokenize(): SOT + ids + EOT, cut keeping EOT last, zero-padded."""
        rows = torch.zeros(len(texts), context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.encoder["<|startoftext|>"]] + self.encode(text) + [self.encoder["<|endoftext|>"]]
            if len(ids) > context_length:
                ids = ids[:context_length]
                ids[-1] = self.encoder["<|endoftext|>"]
            rows[i, : len(ids)] = torch.tensor(ids)
        return rows


@pytest.fixture(scope="module")
def reference():
    return OpenAISimpleTokenizer(DEFAULT_CLIP_BPE)


@pytest.fixture(scope="module")
def ours():
    return CLIPTokenizer(build_clip_tokenizer())


@pytest.fixture(scope="module")
def hf_from_vocab(reference, tmp_path_factory):
    """transformers' CLIPTokenizer built from vocab.json + merges.txt (the files HF hub repos also carry)."""
    folder = tmp_path_factory.mktemp("clip_vocab")
    (folder / "vocab.json").write_text(json.dumps(reference.encoder), encoding="utf-8")
    merges = "#version: 0.2\n" + "\n".join(" ".join(m) for m in reference.merges) + "\n"
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    return transformers.CLIPTokenizer.from_pretrained(folder)


def test_known_ids(ours):
    # ids published with OpenAI CLIP for this prompt ("a</w>" 320, "photo</w>" 1125, "of</w>" 539, "cat</w>" 2368)
    assert ours(["a photo of a cat"]).input_ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]


def test_matches_openai_reference(ours, reference):
    tokenized = ours(CAPTIONS)
    assert tokenized.num_truncated == 0
    expected = reference.tokenize(CAPTIONS)
    # the reference pads with 0; ours pads with EOS (49407), so compare up to and including the first EOS
    for row, text in zip(range(len(CAPTIONS)), CAPTIONS):
        length = len(reference.encode(text)) + 2
        assert tokenized.input_ids[row, :length].tolist() == expected[row, :length].tolist(), text
        assert (tokenized.input_ids[row, length:] == 49407).all()


def test_matches_transformers(ours, hf_from_vocab):
    texts = CAPTIONS + [LONG_CAPTION]
    expected = hf_from_vocab(texts, truncation=True, max_length=77, padding="max_length").input_ids
    assert ours(texts).input_ids.tolist() == expected


def test_truncation_keeps_eos_last(ours, reference):
    tokenized = ours([LONG_CAPTION, "short", LONG_CAPTION + " tail"])
    assert tokenized.num_truncated == 2 and tokenized.truncated.tolist() == [True, False, True]
    assert tokenized.input_ids.shape == (3, 77)
    assert tokenized.input_ids[0].tolist() == reference.tokenize([LONG_CAPTION])[0].tolist()
    assert tokenized.input_ids[0, -1] == 49407 and tokenized.input_ids[0, -2] != 49407
    # both pooling rules of HF's CLIP text tower land on the last position
    assert tokenized.input_ids[0].argmax() == 76 and (tokenized.input_ids[0] == 49407).nonzero()[0, 0] == 76
    # a short caption: argmax and first-EOS both find its EOS at position 2 despite EOS padding
    assert tokenized.input_ids[1].argmax() == 2 and (tokenized.input_ids[1] == 49407).nonzero()[0, 0] == 2


def test_saved_json_loads_in_transformers(ours, tmp_path):
    save_clip_tokenizer_json(str(tmp_path / "tokenizer.json"))
    texts = CAPTIONS + [LONG_CAPTION]
    expected = ours(texts).input_ids.tolist()
    kwargs = dict(truncation=True, max_length=77, padding="max_length")
    # the CLIP class (rebuilds its pipeline around our vocab/merges) and the generic backend (runs our pipeline)
    assert transformers.CLIPTokenizerFast.from_pretrained(tmp_path)(texts, **kwargs).input_ids == expected
    generic = transformers.AutoTokenizer.from_pretrained(tmp_path, pad_token="<|endoftext|>")
    assert generic(texts, **kwargs).input_ids == expected
    assert CLIPTokenizer.from_folder(str(tmp_path))(texts).input_ids.tolist() == expected


def test_pad_id_from_folder(tmp_path):
    save_clip_tokenizer_json(str(tmp_path / "tokenizer.json"))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "!"}}))
    ids = CLIPTokenizer.from_folder(str(tmp_path))(["a cat"]).input_ids[0]
    # open_clip exports pad with "!" (id 0), as open_clip.tokenize does
    assert ids[:5].tolist() == [49406, 320, 2368, 49407, 0] and (ids[4:] == 0).all()


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(ModelFolderError, match=str(tmp_path)):
        CLIPTokenizer.from_folder(str(tmp_path))


def test_malformed_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        CLIPTokenizer.from_folder(str(tmp_path))
