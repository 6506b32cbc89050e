"""Embedding presets: `llm2vec-llama3` equals llm2vec's own encode(), and the BOS / suffix pooling options.

llm2vec cannot be installed next to transformers 5 (it pins transformers<=4.44.2 and imports attention classes
that are gone), so `llm2vec_encode` (tests/fixtures.py) ports its exact logic, on transformers' LlamaModel and tokenizer.
"""


import pytest
import torch

transformers = pytest.importorskip("transformers")

from miniproclip.embedder import CaptionTokenizer, EmbedSettings, LLMEmbedder  # noqa: E402

from fixtures import TEXTS, llm2vec_encode, write_tiny_llama3, write_tiny_llm  # noqa: E402


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
