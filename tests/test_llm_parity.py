"""Decoder parity with transformers on tiny random Llama, Llama-3 (rope scaling), Mistral, Qwen2 and Qwen3
checkpoints written by `save_pretrained`: last hidden states (after the final norm) to ≤1e-4 max abs, fp32.
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from miniproclip.llm import DecoderLM, mean_pool
from miniproclip.weights import ModelFolderError

TOL = 1e-4
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}
CASES = {
    "llama": (transformers.LlamaConfig, dict(COMMON)),
    "llama3": (transformers.LlamaConfig, dict(COMMON, rope_parameters=LLAMA3_ROPE)),
    "llama-bias": (transformers.LlamaConfig, dict(COMMON, attention_bias=True, mlp_bias=True)),
    "mistral": (transformers.MistralConfig, dict(COMMON, sliding_window=4)),
    "qwen2": (transformers.Qwen2Config, dict(COMMON)),
    "qwen3": (transformers.Qwen3Config, dict(COMMON, head_dim=24)),  # head_dim ≠ hidden/heads
}


def randomise_norms(model):
    """HF initialises norm weights to 1 and biases to 0: randomise them so a misplaced norm or bias shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.5)


def save_tiny(kind, folder, causal_lm=True, seed=0):
    config_cls, kwargs = CASES[kind]
    torch.manual_seed(seed)
    config = config_cls(**kwargs, tie_word_embeddings=False)
    model = (transformers.AutoModelForCausalLM if causal_lm else transformers.AutoModel).from_config(config).eval()
    randomise_norms(model)
    model.save_pretrained(folder)
    return model.model if causal_lm else model


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    mask[2, 3:] = 0
    return ids, mask


@pytest.mark.parametrize("kind", list(CASES))
def test_hidden_states_match_transformers(tmp_path, kind):
    reference = save_tiny(kind, tmp_path)
    ours = DecoderLM.from_pretrained(str(tmp_path))
    ids, mask = batch()
    with torch.no_grad():
        theirs = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        mine = ours(ids, mask)
    real = mask.bool()  # padded positions are unused and differ by design (positions, self-attention)
    assert (mine[real] - theirs[real]).abs().max() < TOL


def test_base_model_folder_without_prefix_loads(tmp_path):
    reference = save_tiny("qwen2", tmp_path, causal_lm=False)
    ids, mask = batch()
    with torch.no_grad():
        diff = DecoderLM.from_pretrained(str(tmp_path))(ids) - reference(input_ids=ids).last_hidden_state
    assert diff.abs().max() < TOL


def test_sharded_folder_loads(tmp_path):
    reference = save_tiny("llama", tmp_path / "one")
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "one").save_pretrained(tmp_path / "many",
                                                                                       max_shard_size="100KB")
    assert (tmp_path / "many" / "model.safetensors.index.json").exists()
    ids, _ = batch()
    with torch.no_grad():
        diff = DecoderLM.from_pretrained(str(tmp_path / "many"))(ids) - reference(input_ids=ids).last_hidden_state
    assert diff.abs().max() < TOL


def left_pad(ids, mask):
    """Move each row's real tokens to the right end (left padding)."""
    out_ids, out_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        out_ids[row, -n:], out_mask[row, -n:] = ids[row, :n], 1
    return out_ids, out_mask


@pytest.mark.parametrize("causal", [True, False])
def test_left_and_right_padding_and_single_rows_pool_the_same(tmp_path, causal):
    save_tiny("llama3", tmp_path)
    model = DecoderLM.from_pretrained(str(tmp_path), causal=causal)
    ids, mask = batch()
    with torch.no_grad():
        right = mean_pool(model(ids, mask), mask)
        left = mean_pool(model(*left_pad(ids, mask)), left_pad(ids, mask)[1])
        singles = torch.cat([mean_pool(model(ids[i:i + 1, :n]), mask[i:i + 1, :n])
                             for i, n in enumerate(mask.sum(1).tolist())])
    assert (right - left).abs().max() < 1e-5
    assert (right - singles).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen3"])
def test_left_padded_batch_matches_transformers(tmp_path, kind):
    # left padding needs the full (B, 1, T, T) mask (mistral: with its 4-token window); transformers is given the
    # same positions (counted over real tokens), since it would count the pads
    reference = save_tiny(kind, tmp_path)
    ours = DecoderLM.from_pretrained(str(tmp_path))
    ids, mask = left_pad(*batch())
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        theirs = reference(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        mine = ours(ids, mask)
    real = mask.bool()
    assert (mine[real] - theirs[real]).abs().max() < TOL


def test_attention_mask_forms(tmp_path):
    """SDPA's fast kernels take no mask or a plain one: the mask is only as large as the padding requires."""
    save_tiny("llama", tmp_path)
    causal, bidirectional = (DecoderLM.from_pretrained(str(tmp_path), causal=c) for c in (True, False))
    ids, right = batch()
    _, left = left_pad(ids, right)
    full = torch.ones_like(right)
    assert causal.attention_mask(full, 12, "cpu") is None and bidirectional.attention_mask(None, 12, "cpu") is None
    assert causal.attention_mask(right, 12, "cpu") is None  # right padding: no real token sees a pad anyway
    assert causal.attention_mask(left, 12, "cpu").shape == (3, 1, 12, 12)
    key_mask = bidirectional.attention_mask(right, 12, "cpu")
    assert key_mask.shape == (3, 1, 1, 12) and torch.equal(key_mask[:, 0, 0], right.bool())
    empty_row = right.clone()
    empty_row[0] = 0  # a row without real tokens sees every key instead of none (NaN)
    assert bidirectional.attention_mask(empty_row, 12, "cpu")[0].all()
    with torch.no_grad():
        assert torch.isfinite(bidirectional(ids, empty_row)).all()


def test_bidirectional_attention_sees_later_tokens(tmp_path):
    save_tiny("llama", tmp_path)
    ids, _ = batch()
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % 128
    with torch.no_grad():
        for causal, should_change in ((True, False), (False, True)):
            model = DecoderLM.from_pretrained(str(tmp_path), causal=causal)
            first_token_moved = (model(ids)[:, 0] - model(changed)[:, 0]).abs().max() > 1e-6
            assert bool(first_token_moved) == should_change


def test_bf16_load(tmp_path):
    save_tiny("qwen3", tmp_path)
    model = DecoderLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    ids, mask = batch()
    assert model(ids, mask).dtype == torch.bfloat16


def test_mean_pool_by_hand():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert mean_pool(hidden, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 3.0]]


def test_clear_errors(tmp_path):
    save_tiny("llama", tmp_path / "ok")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    with pytest.raises(ModelFolderError, match=f"^{tmp_path / 'noweights'}: no weights found"):
        DecoderLM.from_pretrained(str(tmp_path / "noweights"))
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelFolderError, match=f"^{tmp_path / 'gpt2'}: unsupported LLM model_type 'gpt2'"):
        DecoderLM.from_pretrained(str(tmp_path / "gpt2"))
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "ok" / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=3)))
    with pytest.raises(ModelFolderError, match=r"missing: layers\.2\.") as err:
        DecoderLM.from_pretrained(str(tmp_path / "ok"))
    assert str(err.value).startswith(str(tmp_path / "ok")) and "\n" not in str(err.value)
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text(json.dumps(config))
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ModelFolderError, match="never unpickles"):
        DecoderLM.from_pretrained(str(tmp_path / "pickled"))
