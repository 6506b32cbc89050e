"""The embedding cache: batching, order, prefix pooling, padding independence, the CLI and torchrun sharding."""

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from miniproclip.embed import load_cache, main
from miniproclip.embedder import EmbedSettings, LLMEmbedder, text_hash, token_budget_batches
from miniproclip.llm import mean_pool

from fixtures import write_tiny_llm

@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llm")
    write_tiny_llm(str(folder))
    return str(folder)


TEXTS = ["a photo of a cat", "two dogs", "a small red cat on the grass with a blue dog and three large cats in the table",
         "dog", "a photo of two red dog on a table"]


def test_token_budget_batches_cover_all_and_respect_budget():
    lengths = [3, 50, 7, 7, 12, 1, 50, 30]
    batches = token_budget_batches(lengths, batch_tokens=60)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 60
    assert batches[0] == [1]  # 50 + 50 would need 100 padded tokens


def test_embed_matches_one_by_one_in_input_order(tiny_llm):
    embedder = LLMEmbedder(tiny_llm)
    batched, truncated = embedder.embed(TEXTS, batch_tokens=40)
    assert truncated == 0
    for i, text in enumerate(TEXTS):
        ids = torch.tensor([embedder.tokenizer.encode(text).ids])
        assert ids[0, 0] == 1  # the tokenizer's BOS
        single = mean_pool(embedder.model(ids), torch.ones_like(ids))
        assert (batched[i] - single[0]).abs().max() < 1e-5


def test_instruction_prefix_is_attended_but_not_pooled(tiny_llm):
    embedder = LLMEmbedder(tiny_llm, EmbedSettings(instruction="retrieve"))
    assert embedder.prefix == [1, 60]
    embedding, _ = embedder.embed(["a red cat"])
    ids = torch.tensor([[1, 60] + embedder.tokenizer.encode("a red cat", add_special_tokens=False).ids])
    hidden = embedder.model(ids)
    assert (embedding[0] - hidden[0, 2:].mean(0)).abs().max() < 1e-5
    plain, _ = LLMEmbedder(tiny_llm).embed(["a red cat"])
    assert (embedding - plain).abs().max() > 1e-3  # the prefix changes the states it is pooled from


def test_max_length_and_append_eos(tiny_llm):
    embedder = LLMEmbedder(tiny_llm, EmbedSettings(max_length=5, append_eos=True))
    ids, truncated = embedder.tokenize(["a photo of a cat on the grass", "dog"])
    assert ids == [[1, 3, 4, 5, 2], [1, 8, 2]] and truncated == 1


def test_cli_txt_and_jsonl_write_the_same_cache(tiny_llm, tmp_path):
    (tmp_path / "t.txt").write_text("\n".join(TEXTS) + "\n")
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"caption": t}) for t in TEXTS) + "\n")
    main(["--llm", tiny_llm, "--texts", str(tmp_path / "t.txt"), "--output", str(tmp_path / "a.safetensors"),
          "--batch-tokens", "32", "--dtype", "fp32"])
    main(["--llm", tiny_llm, "--texts", str(tmp_path / "t.jsonl"), "--text-key", "caption",
          "--output", str(tmp_path / "b.safetensors"), "--dtype", "fp32"])
    (a, hashes, meta), (b, _, _) = load_cache(str(tmp_path / "a.safetensors")), load_cache(str(tmp_path / "b.safetensors"))
    assert a.shape == (len(TEXTS), 32) and a.dtype == torch.float32
    assert (a - b).abs().max() < 1e-5
    assert bytes(hashes[2].tolist()) == text_hash(TEXTS[2])
    assert meta["llm_fingerprint"] and json.loads(meta["max_length"]) == 512
    assert (a - LLMEmbedder(tiny_llm).embed(TEXTS)[0]).abs().max() < 1e-5


def test_cli_reports_user_errors_in_one_line(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"caption": "a"}\n{"text": "b"}\n')
    result = subprocess.run([sys.executable, "-m", "miniproclip.embed", "--llm", str(tmp_path), "--texts",
                             str(tmp_path / "t.jsonl"), "--text-key", "caption", "--output", str(tmp_path / "o")],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {tmp_path / 't.jsonl'}:2: no text under key 'caption' (KeyError)"


def test_torchrun_two_ranks_merge_in_input_order(tiny_llm, tmp_path):
    (tmp_path / "t.txt").write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "c.safetensors"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29517", "-m", "miniproclip.embed", "--llm", tiny_llm,
                             "--texts", str(tmp_path / "t.txt"), "--output", str(out), "--dtype", "fp32"],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    embeddings, _, _ = load_cache(str(out))
    assert (embeddings - LLMEmbedder(tiny_llm).embed(TEXTS)[0]).abs().max() < 1e-5
    assert sorted(os.listdir(tmp_path)) == ["c.safetensors", "t.txt"]  # shards removed


def test_text_cache_embeds_once_appends_missing_and_refuses_another_llm(tiny_llm, tmp_path):
    from miniproclip.embed import TextEmbeddingCache, ensure_text_cache
    path = str(tmp_path / "cache.safetensors")
    cache = ensure_text_cache(path, tiny_llm, TEXTS[:3], EmbedSettings())
    reference, _ = LLMEmbedder(tiny_llm).embed(TEXTS)
    assert (cache(TEXTS[:3][::-1]) - reference[:3].flip(0)).abs().max() < 1e-5
    assert cache.missing(TEXTS) == TEXTS[3:]
    grown = ensure_text_cache(path, tiny_llm, TEXTS, EmbedSettings())  # appends the two new captions only
    assert grown.embeddings.shape == (len(TEXTS), 32)
    assert (grown(TEXTS) - reference).abs().max() < 1e-5
    assert (TextEmbeddingCache(path)(TEXTS[:1]) - reference[:1]).abs().max() < 1e-5
    with pytest.raises(ValueError, match=f"^{path}: text cache was built with another max length"):
        ensure_text_cache(path, tiny_llm, TEXTS, EmbedSettings(max_length=64))
    other = tmp_path / "other_llm"
    write_tiny_llm(str(other))
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(config, rms_norm_eps=1e-5)))
    with pytest.raises(ValueError, match="text cache was built with another llm fingerprint"):
        ensure_text_cache(path, str(other), TEXTS, EmbedSettings())
