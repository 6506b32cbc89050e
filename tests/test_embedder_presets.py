"""Embedding presets: `llm2vec-llama3` equals llm2vec's own encode(), and the BOS / suffix pooling options.

llm2vec cannot be installed next to transformers 5 (it pins transformers<=4.44.2 and imports attention classes
that are gone), so `llm2vec_encode` below ports its exact logic, on transformers' LlamaModel and tokenizer.
"""

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from miniproclip.embedder import CaptionTokenizer, EmbedSettings, LLMEmbedder  # noqa: E402

from fixtures import WORDS, write_tiny_llm  # noqa: E402

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Llama-3's pre-tokenizer pattern (its tokenizer.json), so words, spaces and "\n\n" split as in the real one
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TEXTS = ["a photo of the red cat", "two small dogs on the grass, with a blue circle", "Striped!",
         "the large green triangle in the top left, on a dark background and with three dotted squares"]


def write_tiny_llama3(folder, seed=0) -> str:
    """A tiny random Llama with a byte-level BPE tokenizer laid out as Llama-3's: its special tokens, its
    pre-tokenizer pattern, BOS added by the post-processor."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) + " user\n\n, ! ." for i in range(len(WORDS))]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=LLAMA3_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                            special_tokens=[("<|begin_of_text|>", 0)])
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      bos_token_id=0, eos_token_id=4)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    return str(folder)


def llm2vec_encode(folder: str, texts: list[str], max_length: int = 512) -> tuple[torch.Tensor, list, list]:
    """llm2vec's `LLM2Vec.encode(texts)` as LLM2CLIP calls it (pooling_mode="mean", skip_instruction=True, a
    Llama-3-8B-Instruct `_name_or_path`), ported from McGill-NLP/llm2vec@312adcf llm2vec/llm2vec.py and
    models/bidirectional_llama.py. Returns the embeddings and, per text, its token ids and pooled positions."""
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"),
                                              bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    hf.pad_token, hf.padding_side = hf.eos_token, "left"  # LLM2Vec.from_pretrained
    separator = "!@#$%^&*()"
    # encode(): [""] + [text] -> _convert_to_str("", text) -> separator + text (short texts: no doc_max_length cut)
    # prepare_for_tokenization() for "meta-llama/Meta-Llama-3-8B-Instruct":
    texts = ["<|start_header_id|>user<|end_header_id|>\n\n" + (separator + t).strip() + "<|eot_id|>" for t in texts]
    # tokenize(): the whole string with special tokens; embed_mask = the last len(ids of the part after the
    # separator, tokenized alone without special tokens) positions (left padding)
    parts = [t.split(separator) for t in texts]
    features = hf(["".join(p) for p in parts], return_tensors="pt", padding=True, truncation=True,
                  max_length=max_length)
    embed_mask = torch.zeros_like(features["attention_mask"])
    for i, p in enumerate(parts):
        n = len(hf([p[1]], add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"][0])
        embed_mask[i, -n:] = 1
    # LlamaBiModel._update_causal_mask: no causal triangle, only padded keys get finfo.min
    model = transformers.LlamaModel.from_pretrained(folder, dtype=torch.float32).eval()
    T, min_value = features["input_ids"].shape[1], torch.finfo(torch.float32).min
    mask = torch.zeros(len(texts), 1, T, T).masked_fill(features["attention_mask"][:, None, None, :] == 0, min_value)
    with torch.no_grad():
        hidden = model(input_ids=features["input_ids"], attention_mask=mask).last_hidden_state
    # get_pooling(): skip_instruction replaces attention_mask by embed_mask; mean over the last seq_len positions
    lengths = embed_mask.sum(-1)
    embeddings = torch.stack([hidden[i, -n:].mean(0) for i, n in enumerate(lengths)])
    rows = [ids[mask_row == 1].tolist() for ids, mask_row in zip(features["input_ids"], features["attention_mask"])]
    pooled = [m[a == 1].tolist() for m, a in zip(embed_mask, features["attention_mask"])]
    return embeddings, rows, pooled


def test_llm2vec_llama3_preset_equals_llm2vec(tmp_path):
    folder = write_tiny_llama3(tmp_path / "llama3")
    reference, reference_ids, reference_pool = llm2vec_encode(folder, TEXTS)
    settings = EmbedSettings.preset("llm2vec-llama3")
    tokenize = CaptionTokenizer(folder, settings)
    ids, truncated = tokenize(TEXTS)
    assert truncated == 0 and ids == reference_ids  # BOS, header, caption, <|eot_id|>: the same tokens
    header = tokenize.tokenizer.decode(tokenize.start, skip_special_tokens=False)
    assert header == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"  # BOS and the header
    assert all(row[-1] == 4 for row in ids)  # <|eot_id|>
    for row, pool in zip(ids, reference_pool):  # the pool: everything after BOS and the header
        assert pool == [0] * tokenize.unpooled + [1] * (len(row) - tokenize.unpooled)
    ours, _ = LLMEmbedder(folder, settings).embed(TEXTS)
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)
    causal, _ = LLMEmbedder(folder, EmbedSettings.preset("llm2vec-llama3", causal=True)).embed(TEXTS)
    assert (causal - reference).abs().max() > 1e-3  # the comparison can tell attention modes apart


def test_preset_needs_its_special_tokens(tmp_path):
    folder = write_tiny_llm(tmp_path / "llama2")  # word-level vocabulary without <|eot_id|>
    with pytest.raises(ValueError, match=r"no <\|start_header_id\|> token"):
        CaptionTokenizer(folder, EmbedSettings.preset("llm2vec-llama3"))
    with pytest.raises(ValueError, match="unknown embedding preset 'llm2vec'"):
        EmbedSettings.preset("llm2vec")


def test_pool_bos_and_suffix(tmp_path):
    folder = write_tiny_llm(tmp_path / "llm")  # its tokenizer adds BOS (id 1)
    with_bos = CaptionTokenizer(folder, EmbedSettings())
    without_bos = CaptionTokenizer(folder, EmbedSettings(max_length=5, suffix="dog", append_eos=True, pool_bos=False))
    assert with_bos.unpooled == 0 and with_bos(["red cat"])[0] == [[1, 9, 7]]  # a = 3, cat = 7, dog = 8, red = 9
    assert without_bos.start == [1] and without_bos.unpooled == 1 and without_bos.end == [8, 2]
    assert without_bos(["red cat", "a red cat"]) == ([[1, 9, 7, 8, 2], [1, 3, 9, 8, 2]], 1)  # cut before the suffix
    embedder = LLMEmbedder(folder, EmbedSettings(pool_bos=False))
    states = embedder.model(torch.tensor([[1, 9, 7]]))
    torch.testing.assert_close(embedder.embed(["red cat"])[0][0], states[0, 1:].mean(0))  # BOS left out
