"""The embedding cache: batching, order, prefix pooling, padding independence, the CLI and torchrun sharding,
resume after kill -9, appending by copying bytes, the hash lookup and the storage dtypes."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from miniproclip import embed
from miniproclip.embed import VectorCache, ensure_text_cache, ensure_vector_cache, load_cache, main
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
    assert embedder.tokenize.start == [1, 60] and embedder.tokenize.unpooled == 2
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
          "--batch-tokens", "32", "--dtype", "fp32", "--store-dtype", "fp32", "--chunk-texts", "2"])
    main(["--llm", tiny_llm, "--texts", str(tmp_path / "t.jsonl"), "--text-key", "caption",
          "--output", str(tmp_path / "b.safetensors"), "--dtype", "fp32", "--store-dtype", "fp32"])
    (a, hashes, meta), (b, _, _) = load_cache(str(tmp_path / "a.safetensors")), load_cache(str(tmp_path / "b.safetensors"))
    assert a.shape == (len(TEXTS), 32) and a.dtype == torch.float32
    assert (a - b).abs().max() < 1e-5
    assert bytes(hashes[2].tolist()) == text_hash(TEXTS[2])
    assert meta["llm_fingerprint"] and json.loads(meta["max_length"]) == 512 and meta["store_dtype"] == "fp32"
    assert (a - LLMEmbedder(tiny_llm).embed(TEXTS)[0]).abs().max() < 1e-5
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "b.safetensors", "t.jsonl", "t.txt"]  # parts removed


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
                             "--texts", str(tmp_path / "t.txt"), "--output", str(out), "--dtype", "fp32",
                             "--store-dtype", "fp32", "--chunk-texts", "2"],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    embeddings, _, _ = load_cache(str(out))
    assert (embeddings - LLMEmbedder(tiny_llm).embed(TEXTS)[0]).abs().max() < 1e-5
    assert sorted(os.listdir(tmp_path)) == ["c.safetensors", "t.txt"]  # shards removed


def test_text_cache_embeds_once_appends_missing_and_refuses_another_llm(tiny_llm, tmp_path):
    path = str(tmp_path / "cache.safetensors")
    cache = ensure_text_cache(path, tiny_llm, TEXTS[:3], EmbedSettings(), store_dtype="fp32")
    reference, _ = LLMEmbedder(tiny_llm).embed(TEXTS)
    assert (cache(TEXTS[:3][::-1]) - reference[:3].flip(0)).abs().max() < 1e-5
    assert cache.missing(TEXTS) == TEXTS[3:]
    grown = ensure_text_cache(path, tiny_llm, TEXTS, EmbedSettings())  # appends the two new captions only
    assert grown.embeddings.shape == (len(TEXTS), 32)
    assert (grown(TEXTS) - reference).abs().max() < 1e-5
    assert (VectorCache(path)(TEXTS[:1]) - reference[:1]).abs().max() < 1e-5
    with pytest.raises(ValueError, match=f"^{path}: text cache was built with another max length"):
        ensure_text_cache(path, tiny_llm, TEXTS, EmbedSettings(max_length=64))
    other = tmp_path / "other_llm"
    write_tiny_llm(str(other))
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(config, rms_norm_eps=1e-5)))
    with pytest.raises(ValueError, match="text cache was built with another llm fingerprint"):
        ensure_text_cache(path, str(other), TEXTS, EmbedSettings())


# ----------------------------------------------------------------------------- scale: resume, append, lookup, dtype

def fake_vectors(texts: list[str]) -> torch.Tensor:
    """(B, 8) vectors that depend on the text alone: a stand-in encoder for the generic vector cache."""
    seeds = [int.from_bytes(hashlib.sha256(t.encode()).digest()[:4], "little") for t in texts]
    return torch.stack([torch.randn(8, generator=torch.Generator().manual_seed(s)) for s in seeds])


def counting_encoder(calls: list):
    def make_encode():
        def encode(texts):
            calls.append(list(texts))
            return fake_vectors(texts)
        return encode
    return make_encode


def test_cli_resumes_after_kill_9_and_matches_an_uninterrupted_run(tiny_llm, tmp_path):
    words = "a photo of the cat dog red blue green small large on in grass table two three".split()
    rng = np.random.default_rng(0)
    (tmp_path / "t.txt").write_text("\n".join(" ".join(rng.choice(words, 6)) for _ in range(1200)) + "\n")
    flags = ["-m", "miniproclip.embed", "--llm", tiny_llm, "--texts", str(tmp_path / "t.txt"), "--dtype", "fp32",
             "--chunk-texts", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed, parts = tmp_path / "killed.safetensors", tmp_path / "killed.safetensors.parts"
    process = subprocess.Popen([sys.executable, *flags, "--output", str(killed)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = lambda: [name for name in os.listdir(parts) if name.endswith(".safetensors")] if parts.is_dir() else []
    while len(done()) < 10 and process.poll() is None:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = len(done())
    assert 10 <= written < 150 and not killed.exists()  # stopped halfway, nothing final written
    resumed = subprocess.run([sys.executable, *flags, "--output", str(killed)], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    kept = int(re.search(r"rank 0: kept (\d+) chunks already written", resumed.stdout)[1])
    assert kept >= written - 1  # all whole chunks (the one being renamed at the kill may be a .tmp)
    whole = subprocess.run([sys.executable, *flags, "--output", str(tmp_path / "whole.safetensors")], env=env,
                           capture_output=True, text=True)
    assert whole.returncode == 0 and "kept" not in whole.stdout
    whole_cache = tmp_path / "whole.safetensors"
    (a, hashes_a, meta_a), (b, hashes_b, meta_b) = load_cache(str(killed)), load_cache(str(whole_cache))
    assert a.shape == (1200, 32) and a.dtype == torch.float16 and meta_a == meta_b
    assert torch.equal(a, b) and torch.equal(hashes_a, hashes_b)
    assert not parts.exists()


def test_append_copies_old_rows_without_loading_them_and_encodes_only_new_texts(tmp_path, monkeypatch):
    path, calls = str(tmp_path / "vectors.safetensors"), []
    identity = {"teacher_fingerprint": "abc"}
    texts = [f"caption {i}" for i in range(50)]
    first = ensure_vector_cache(path, texts[:30], counting_encoder(calls), identity, chunk_texts=7, log=print)
    assert [len(c) for c in calls] == [7, 7, 7, 7, 2] and first.store_dtype == "fp16"
    old_bytes = np.array(first.embeddings).tobytes()
    # appending may not read the old vectors into tensors: only copy bytes
    monkeypatch.setattr(embed, "load_cache", None)
    monkeypatch.setattr(VectorCache, "__call__", None)
    calls.clear()
    grown = ensure_vector_cache(path, texts[::-1], counting_encoder(calls), identity, log=print)
    assert [text for call in calls for text in call] == texts[30:][::-1]  # the 20 missing ones, once
    assert len(grown) == 50 and np.array(grown.embeddings[:30]).tobytes() == old_bytes
    monkeypatch.undo()
    assert torch.allclose(grown(texts), fake_vectors(texts), atol=2e-3)  # fp16 storage
    assert ensure_vector_cache(path, texts, counting_encoder(calls), identity).path == path and len(calls) == 1
    with pytest.raises(ValueError, match=f"^{path}: teacher cache was built with another teacher fingerprint "
                                         r"\(abc, now xyz\); pass a new --teacher-cache or delete this file$"):
        ensure_vector_cache(path, texts, counting_encoder(calls), {"teacher_fingerprint": "xyz"},
                            what="teacher cache", flag="--teacher-cache")


def test_lookup_by_sorted_hash_prefix_survives_prefix_collisions(tmp_path, monkeypatch):
    texts = [f"text {i}" for i in range(40)]
    # every text's hash starts with the same 8 bytes: all keys collide, the full 16 bytes must decide
    colliding = lambda text: b"\0" * 8 + hashlib.blake2b(text.encode(), digest_size=8).digest()
    monkeypatch.setattr(embed, "text_hash", colliding)
    path = str(tmp_path / "c.safetensors")
    cache = ensure_vector_cache(path, texts, counting_encoder([]), {"k": "v"}, store_dtype="fp32")
    assert (cache.sorted_keys == cache.sorted_keys[0]).all()
    query = texts[::3] + ["not cached"]
    assert cache.rows_of(query).tolist() == list(range(0, 40, 3)) + [-1]
    assert torch.equal(cache(texts[::-1]), fake_vectors(texts[::-1]))
    with pytest.raises(KeyError, match="1 texts are not in this cache, e.g. 'not cached'"):
        cache(query)
    monkeypatch.undo()
    many = [f"row {i}" for i in range(5000)]  # real hashes: sorted keys, one step per lookup
    cache = ensure_vector_cache(str(tmp_path / "d.safetensors"), many, counting_encoder([]), {"k": "v"})
    assert (np.diff(cache.sorted_keys) >= 0).all()
    picks = np.random.default_rng(1).permutation(5000)[:300]
    assert cache.rows_of([many[i] for i in picks]).tolist() == picks.tolist()


@pytest.mark.parametrize("store_dtype", ["fp32", "fp16", "bf16"])
def test_store_dtypes_read_back_as_float32(tmp_path, store_dtype):
    texts = [f"t{i}" for i in range(20)]
    cache = ensure_vector_cache(str(tmp_path / "c.safetensors"), texts, counting_encoder([]), {},
                                store_dtype=store_dtype)
    read = cache(texts)
    assert read.dtype == torch.float32 and cache.store_dtype == store_dtype
    expected = fake_vectors(texts).to(embed.STORE_DTYPES[store_dtype][0])
    assert torch.equal(read, expected.float())  # exactly the stored rounding, upcast


def test_fp16_overflow_is_refused(tmp_path):
    huge = lambda: lambda texts: torch.full((len(texts), 4), 7e4)
    with pytest.raises(ValueError, match=r"vectors up to 7e\+04 exceed fp16's range; pass --store-dtype bf16 or fp32"):
        ensure_vector_cache(str(tmp_path / "c.safetensors"), ["a"], huge, {})
    assert ensure_vector_cache(str(tmp_path / "d.safetensors"), ["a"], huge, {}, store_dtype="bf16")(["a"]).max() > 6e4


@pytest.mark.parametrize("cut", ["data", "header"])
def test_a_truncated_cache_names_its_file_and_the_remedy(tmp_path, cut):
    """A cache cut short (a full disk, a copy that stopped) is refused with one line naming it, not numpy's
    "mmap length is greater than file size"; deleting it rebuilds it with the same vectors."""
    from miniproclip.errors import UserError
    path, texts = str(tmp_path / "c.safetensors"), [f"t{i}" for i in range(20)]
    whole = ensure_vector_cache(path, texts, counting_encoder([]), {"k": "v"})(texts)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 10 if cut == "data" else 20)
    with pytest.raises(embed.CacheError) as error:
        ensure_vector_cache(path, texts, counting_encoder([]), {"k": "v"})
    assert isinstance(error.value, UserError)
    assert str(error.value).startswith(f"{path} is damaged or truncated (")
    assert str(error.value).endswith("delete it and run the same command again, which rebuilds it")
    os.remove(path)
    assert torch.equal(ensure_vector_cache(path, texts, counting_encoder([]), {"k": "v"})(texts), whole)
