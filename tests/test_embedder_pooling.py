"""Last-token and latent-attention presets against transformers references of each model family (fp32, 1e-5).

Each reference is the model card's own code on a tiny random model this file writes: Qwen3-Embedding's, e5-mistral's
and gte-Qwen2's `last_token_pool` (left or right padding, EOS appended by the code or by the tokenizer's template)
and NV-Embed-v2's `encode` (modeling_nvembed.py: instruction + text + eos_token, right padding, a bidirectional
Mistral, then `LatentAttentionModel`, re-written below with explicit softmax from that file). Also: caption
stripping (issue 28), last-token pooling under left and right padding, the NV-Embed key mapping, stage 0 with a
last-token preset, and the one-line errors.
"""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402

import train  # noqa: E402
from miniproclip.embed import ensure_text_cache, load_cache, main as embed_main  # noqa: E402
from miniproclip.embedder import CaptionTokenizer, EmbedSettings, LLMEmbedder, pad_batch  # noqa: E402
from miniproclip.llm import DecoderLM, decoder_key, last_token_pool  # noqa: E402
from miniproclip.nvembed import LatentAttention, LatentAttentionConfig, latent_key  # noqa: E402
from miniproclip.training.stage0 import CaptionContrastive  # noqa: E402
from miniproclip.weights import ModelFolderError  # noqa: E402

from fixtures import WORDS, write_tiny_llama3, write_tiny_llm  # noqa: E402

TEXTS = ["a photo of the red cat", "two small dogs on the grass with a blue circle", "dog",
         "the large green table in the grass and three square"]
TASK = "Given a caption retrieve a matching image"  # queries: "Instruct: {TASK}\nQuery: {text}"
EXTRA = ["Instruct", ":", "Query", "Given", "caption", "retrieve", "matching", "image"]
SHAPE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def write_tokenizer(folder, specials: list[str], template: str) -> None:
    """A word-level tokenizer.json: `specials` first (ids 0, 1, ...), then WORDS and EXTRA; `template` is its
    post-processor (e.g. "<s> $A" as Llama/Mistral, "$A <|endoftext|>" as Qwen3-Embedding)."""
    vocab = {token: i for i, token in enumerate(specials + ["<unk>"] + WORDS + EXTRA)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in specials if t in template])
    os.makedirs(folder, exist_ok=True)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    return len(vocab)


def write_model(folder, model_class, config_class, vocab_size, seed=0, **config):
    torch.manual_seed(seed)
    model = model_class(config_class(vocab_size=vocab_size, **SHAPE, **config)).eval()
    model.save_pretrained(folder)
    return model


def hf_tokenizer(folder, padding_side, eos, bos=None):
    return transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"), eos_token=eos,
                                                bos_token=bos, pad_token=eos, padding_side=padding_side)


def card_last_token_pool(last_hidden_states, attention_mask):
    """The model cards' pooling (Qwen3-Embedding, e5-mistral, gte-Qwen2 README), verbatim in logic."""
    left_padding = attention_mask[:, -1].sum() == attention_mask.shape[0]
    if left_padding:
        return last_hidden_states[:, -1]
    sequence_lengths = attention_mask.sum(dim=1) - 1
    return last_hidden_states[torch.arange(last_hidden_states.shape[0]), sequence_lengths]


def card_query(task, text, space=" "):
    return f"Instruct: {task}\nQuery:{space}{text}"


def ours(folder, preset, texts, **overrides):
    return LLMEmbedder(folder, EmbedSettings.preset(preset, **overrides)).embed(texts, batch_tokens=24)[0]


def test_qwen3_embedding_preset_equals_the_model_card(tmp_path):
    folder = str(tmp_path / "qwen3")
    vocab = write_tokenizer(folder, ["<|endoftext|>"], "$A <|endoftext|>")  # the card's tokenizer appends EOS
    model = write_model(folder, transformers.Qwen3Model, transformers.Qwen3Config, vocab, head_dim=8, eos_token_id=0)
    tokenizer = hf_tokenizer(folder, "left", "<|endoftext|>")
    queries = [card_query(TASK, t, space="") for t in TEXTS[:2]]  # 'Instruct: {task}\nQuery:{query}'
    batch = tokenizer(queries + TEXTS, padding=True, return_tensors="pt")
    assert (batch["attention_mask"][:, 0] == 0).any()  # left padding: the card's fast branch
    with torch.no_grad():
        reference = card_last_token_pool(model(**batch).last_hidden_state, batch["attention_mask"])
    torch.testing.assert_close(ours(folder, "qwen3-embedding", TEXTS), reference[2:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(folder, "qwen3-embedding", TEXTS[:2], instruction=TASK), reference[:2],
                               atol=1e-5, rtol=1e-5)
    ids, _ = CaptionTokenizer(folder, EmbedSettings.preset("qwen3-embedding"))(TEXTS)
    assert [row for row in ids] == [r[m == 1].tolist() for r, m in zip(batch["input_ids"][2:],
                                                                      batch["attention_mask"][2:])]
    assert all(row[-1] == 0 and row[-2] != 0 for row in ids)  # one <|endoftext|>, not two
    # the card's earlier code: a tokenizer without the template, <|endoftext|> appended by hand (`eod_id`)
    write_tokenizer(folder, ["<|endoftext|>"], "$A")
    assert CaptionTokenizer(folder, EmbedSettings.preset("qwen3-embedding"))(TEXTS)[0] == ids


def test_e5_mistral_preset_equals_the_model_card(tmp_path):
    folder = str(tmp_path / "e5")
    vocab = write_tokenizer(folder, ["<s>", "</s>"], "<s> $A")
    model = write_model(folder, transformers.MistralModel, transformers.MistralConfig, vocab, bos_token_id=0,
                        eos_token_id=1)
    tokenizer = hf_tokenizer(folder, "right", "</s>", bos="<s>")
    texts = [card_query(TASK, t) for t in TEXTS[:2]] + TEXTS
    # the card: tokenize to max_length - 1, append eos_token_id to every input_ids, pad
    batch = tokenizer(texts, max_length=511, return_attention_mask=False, padding=False, truncation=True)
    batch["input_ids"] = [ids + [tokenizer.eos_token_id] for ids in batch["input_ids"]]
    batch = tokenizer.pad(batch, padding=True, return_attention_mask=True, return_tensors="pt")
    with torch.no_grad():
        reference = card_last_token_pool(model(**batch).last_hidden_state, batch["attention_mask"])
    torch.testing.assert_close(ours(folder, "e5-mistral", TEXTS), reference[2:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(folder, "e5-mistral", TEXTS[:2], instruction=TASK), reference[:2],
                               atol=1e-5, rtol=1e-5)


def test_gte_qwen2_preset_equals_the_model_card_in_the_attention_its_config_names(tmp_path):
    """7B's config.json: `is_causal: false` (bidirectional, as vLLM runs it); 1.5B's: causal."""
    embeddings = {}
    for is_causal in (False, True):
        folder = str(tmp_path / f"gte-{is_causal}")
        vocab = write_tokenizer(folder, ["<|endoftext|>"], "$A <|endoftext|>")
        model = write_model(folder, transformers.Qwen2Model, transformers.Qwen2Config, vocab, eos_token_id=0,
                            is_causal=is_causal)
        assert json.load(open(os.path.join(folder, "config.json"))).get("is_causal", True) is is_causal
        tokenizer = hf_tokenizer(folder, "right", "<|endoftext|>")
        batch = tokenizer([card_query(TASK, t) for t in TEXTS[:2]] + TEXTS, padding=True, return_tensors="pt")
        with torch.no_grad():  # transformers >= 5.2 reads `is_causal` (masking_utils.create_causal_mask)
            reference = card_last_token_pool(model(**batch).last_hidden_state, batch["attention_mask"])
        gte = torch.cat([ours(folder, "gte-qwen2", TEXTS[:2], instruction=TASK), ours(folder, "gte-qwen2", TEXTS)])
        torch.testing.assert_close(gte, reference, atol=1e-5, rtol=1e-5)
        embeddings[is_causal] = gte
    assert (embeddings[False] - embeddings[True]).abs().max() > 1e-3  # the comparison tells the modes apart


# ----------------------------------------------------------------------------- NV-Embed

LATENT = dict(num_latents_value=6, num_cross_heads=2, cross_dim_head=8, hidden_dim=32, latent_dim=32)


def write_tiny_nvembed(folder, seed=0):
    """A tiny NV-Embed folder laid out as nvidia/NV-Embed-v2: config with text_config + latent_attention_config,
    weights `embedding_model.*` (a MistralModel) and `latent_attention_model.*` (random)."""
    vocab = write_tokenizer(folder, ["<s>", "</s>"], "<s> $A")
    torch.manual_seed(seed)
    mistral = transformers.MistralModel(transformers.MistralConfig(vocab_size=vocab, **SHAPE, bos_token_id=0,
                                                                   eos_token_id=1)).eval()
    d, inner, L = 32, LATENT["num_cross_heads"] * LATENT["cross_dim_head"], LATENT["num_latents_value"]
    shapes = {"latents": (L, d), "cross_attend_blocks.0.norm.weight": (d,), "cross_attend_blocks.0.norm.bias": (d,),
              "cross_attend_blocks.0.norm_context.weight": (d,), "cross_attend_blocks.0.norm_context.bias": (d,),
              "cross_attend_blocks.0.fn.to_q.weight": (inner, d),
              "cross_attend_blocks.0.fn.to_kv.weight": (2 * inner, d),
              "cross_attend_blocks.0.fn.to_out.weight": (d, inner), "cross_attend_blocks.1.norm.weight": (d,),
              "cross_attend_blocks.1.norm.bias": (d,), "cross_attend_blocks.1.fn.net.0.weight": (8 * d, d),
              "cross_attend_blocks.1.fn.net.0.bias": (8 * d,), "cross_attend_blocks.1.fn.net.2.weight": (d, 4 * d),
              "cross_attend_blocks.1.fn.net.2.bias": (d,)}
    latent = {k: (1.0 if k.endswith("norm.weight") or k.endswith("context.weight") else 0.0) + 0.2 * torch.randn(s)
              for k, s in shapes.items()}
    weights = {**{f"embedding_model.{k}": v for k, v in mistral.state_dict().items()},
               **{f"latent_attention_model.{k}": v for k, v in latent.items()}}
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(folder, "model.safetensors"))
    text_config = {**mistral.config.to_dict(), "model_type": "bidir_mistral"}
    config = {"model_type": "nvembed", "architectures": ["NVEmbedModel"], "text_config": text_config,
              "latent_attention_config": {"model_type": "latent_attention", **LATENT, "output_normalize": True},
              "padding_side": "right", "is_mask_instruction": True, "add_eos": True, "hidden_size": 32}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return mistral, latent


def latent_attention_reference(hidden, pool_mask, w):
    """modeling_nvembed.py `LatentAttentionModel.forward`, written out: tokens attend to the latents."""
    B, T, d = hidden.shape
    heads, size = LATENT["num_cross_heads"], LATENT["cross_dim_head"]
    block = "cross_attend_blocks.0."
    x = F.layer_norm(hidden, (d,), w[block + "norm.weight"], w[block + "norm.bias"])
    context = F.layer_norm(w["latents"], (d,), w[block + "norm_context.weight"], w[block + "norm_context.bias"])
    q = (x @ w[block + "fn.to_q.weight"].T).view(B, T, heads, size).transpose(1, 2)
    k, v = (context @ w[block + "fn.to_kv.weight"].T).chunk(2, dim=-1)
    k, v = (t.view(-1, heads, size).transpose(0, 1) for t in (k, v))  # (heads, L, size), the same for every row
    attention = torch.softmax(q @ k.transpose(-1, -2) / size ** 0.5, dim=-1)
    hidden = hidden + (attention @ v).transpose(1, 2).reshape(B, T, -1) @ w[block + "fn.to_out.weight"].T
    block = "cross_attend_blocks.1."
    y = F.layer_norm(hidden, (d,), w[block + "norm.weight"], w[block + "norm.bias"])
    value, gate = (y @ w[block + "fn.net.0.weight"].T + w[block + "fn.net.0.bias"]).chunk(2, dim=-1)
    hidden = hidden + (value * F.gelu(gate)) @ w[block + "fn.net.2.weight"].T + w[block + "fn.net.2.bias"]
    pooled = (hidden * pool_mask[..., None]).sum(1) / pool_mask.sum(1, keepdim=True)
    return F.normalize(pooled, dim=-1)


def nvembed_encode(folder, mistral, latent, texts, instruction=""):
    """NV-Embed-v2 `NVEmbedModel.encode`: instruction + text + eos_token, right padding, bidirectional Mistral
    (`_prepare_4d_attention_mask`: padded keys masked, no causal triangle), pool mask without the instruction."""
    tokenizer = hf_tokenizer(folder, "right", "</s>", bos="<s>")
    batch = tokenizer([instruction + t + tokenizer.eos_token for t in texts], padding=True, return_tensors="pt")
    T, attention = batch["input_ids"].shape[1], batch["attention_mask"]
    mask = torch.zeros(len(texts), 1, T, T).masked_fill(attention[:, None, None, :] == 0, torch.finfo().min)
    pool_mask = attention.clone()
    # NV-Embed masks len(tokenize(instruction)) positions, counted from BOS; the preset leaves out BOS too
    pool_mask[:, :len(tokenizer.tokenize(instruction)) + (1 if instruction else 0)] = 0
    with torch.no_grad():
        hidden = mistral(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
        return latent_attention_reference(hidden, pool_mask.float(), latent)


def test_nv_embed_preset_equals_its_modeling_code(tmp_path):
    folder = str(tmp_path / "nv")
    mistral, latent = write_tiny_nvembed(folder)
    torch.testing.assert_close(ours(folder, "nv-embed-v2", TEXTS), nvembed_encode(folder, mistral, latent, TEXTS),
                               atol=1e-5, rtol=1e-5)
    query = card_query(TASK, "")
    torch.testing.assert_close(ours(folder, "nv-embed-v2", TEXTS, instruction=TASK),
                               nvembed_encode(folder, mistral, latent, TEXTS, query), atol=1e-5, rtol=1e-5)
    # the latent attention is what pools: a plain mean of the same states is far from it
    mean = F.normalize(ours(folder, "nv-embed-v2", TEXTS, pool="mean"), dim=-1)
    assert (mean - nvembed_encode(folder, mistral, latent, TEXTS)).abs().max() > 1e-2
    # the folder as --llm of the embed CLI
    (tmp_path / "t.txt").write_text("\n".join(TEXTS) + "\n")
    embed_main(["--llm", folder, "--texts", str(tmp_path / "t.txt"), "--output", str(tmp_path / "c.safetensors"),
                "--embed-preset", "nv-embed-v2", "--dtype", "fp32", "--store-dtype", "fp32"])
    torch.testing.assert_close(load_cache(str(tmp_path / "c.safetensors"))[0],
                               nvembed_encode(folder, mistral, latent, TEXTS), atol=1e-5, rtol=1e-5)


def test_nvembed_keys_map_onto_the_decoder_and_the_pooler(tmp_path):
    assert decoder_key("embedding_model.layers.3.self_attn.q_proj.weight") == "layers.3.self_attn.q_proj.weight"
    assert decoder_key("embedding_model.norm.weight") == "norm.weight"
    assert decoder_key("model.embed_tokens.weight") == "embed_tokens.weight"  # a *ForCausalLM folder
    assert decoder_key("latent_attention_model.latents") is None and decoder_key("lm_head.weight") is None
    assert latent_key("latent_attention_model.latents") == "latents"
    assert latent_key("embedding_model.norm.weight") is None
    _, latent = write_tiny_nvembed(str(tmp_path / "nv"))  # the names modeling_nvembed.py's modules give
    assert set(LatentAttention(LatentAttentionConfig(**LATENT)).state_dict()) == set(latent)


# ----------------------------------------------------------------------------- stripping, padding, stage 0, errors

@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    return write_tiny_llm(tmp_path_factory.mktemp("llm"))


def test_trailing_whitespace_no_longer_changes_a_caption(tmp_path):
    """Issue 28: llm2vec strips captions; "a red circle " had cosine 0.845 to "a red circle" before."""
    folder = write_tiny_llama3(tmp_path / "llama3")  # byte-level BPE: spaces and newlines are tokens
    raw = ["a red circle ", "the dog.  ", "the blue square\n", "two cats \t\n"]
    stripped = ["a red circle", "the dog.", "the blue square", "two cats"]
    tokenizer = CaptionTokenizer(folder).tokenizer
    assert all(tokenizer.encode(r).ids != tokenizer.encode(s).ids for r, s in zip(raw, stripped))  # they would differ
    for preset in ("default", "llm2vec-llama3", "e5-mistral"):
        embedder = LLMEmbedder(folder, EmbedSettings.preset(preset))
        assert embedder.tokenize(raw)[0] == embedder.tokenize(stripped)[0]
        torch.testing.assert_close(embedder.embed(raw)[0], embedder.embed(stripped)[0])
    # a leading space is kept, as llm2vec keeps it (it strips separator + text)
    assert CaptionTokenizer(folder)([" a red cat"])[0] != CaptionTokenizer(folder)(["a red cat"])[0]
    # the cache is keyed by the raw caption and holds the stripped caption's vector
    cache = ensure_text_cache(str(tmp_path / "c.safetensors"), folder, raw, EmbedSettings(), store_dtype="fp32")
    torch.testing.assert_close(cache(raw), LLMEmbedder(folder).embed(stripped)[0])


def test_caches_written_before_the_pool_field_still_serve_mean_pooling(tiny_llm, tmp_path):
    path = str(tmp_path / "old.safetensors")
    ensure_text_cache(path, tiny_llm, TEXTS, EmbedSettings(), store_dtype="fp32")
    embeddings, hashes, metadata = load_cache(path)
    old = {k: v for k, v in metadata.items() if k not in ("pool", "instruction_format")}
    save_file({"embeddings": embeddings, "text_hashes": hashes}, path, metadata=old)  # as an earlier version wrote it
    torch.testing.assert_close(ensure_text_cache(path, tiny_llm, TEXTS, EmbedSettings())(TEXTS), embeddings)
    with pytest.raises(ValueError, match='built with another pool \\("mean", now "last"\\)'):
        ensure_text_cache(path, tiny_llm, TEXTS, EmbedSettings(pool="last"))


def test_last_token_pool_is_the_same_under_left_and_right_padding(tiny_llm):
    model = DecoderLM.from_pretrained(tiny_llm)
    ids, _ = CaptionTokenizer(tiny_llm, EmbedSettings.preset("e5-mistral"))(TEXTS)
    input_ids, attention, _ = pad_batch(ids, 0)
    left_ids = torch.stack([row.roll(int((m == 0).sum())) for row, m in zip(input_ids, attention)])
    left = torch.stack([m.roll(int((m == 0).sum())) for m in attention])
    assert (left[:, -1] == 1).all() and (left[:, 0] == 0).any()
    with torch.no_grad():
        right_pooled = last_token_pool(model(input_ids, attention), attention)
        left_pooled = last_token_pool(model(left_ids, left), left)
        singles = torch.cat([model(torch.tensor([row]))[:, -1] for row in ids])
    torch.testing.assert_close(right_pooled, singles, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left_pooled, singles, atol=1e-5, rtol=1e-5)
    hidden = torch.arange(12.0).view(2, 3, 2)  # by hand: row 0 ends at 1 (right padded), row 1 at 2 (left padded)
    assert last_token_pool(hidden, torch.tensor([[1, 1, 0], [0, 1, 1]])).tolist() == [[2.0, 3.0], [10.0, 11.0]]


def test_stage0_trains_with_the_presets_last_token_pooling(tiny_llm, tmp_path):
    settings = EmbedSettings.preset("e5-mistral")
    model = DecoderLM.from_pretrained(tiny_llm)
    with torch.no_grad():
        trained = CaptionContrastive(model, CaptionTokenizer(tiny_llm, settings), batch_tokens=24).embed(TEXTS)
    torch.testing.assert_close(trained, F.normalize(LLMEmbedder(tiny_llm, settings).embed(TEXTS)[0], dim=-1))
    groups = tmp_path / "groups.jsonl"
    groups.write_text("".join(json.dumps({"texts": [t, t + " dog", "a " + t]}) + "\n" for t in TEXTS * 2))
    train.main(["--stage", "0", "--llm", tiny_llm, "--train-data", str(groups), "--output", str(tmp_path / "run"),
                "--batch-size", "4", "--max-steps", "1", "--lora-rank", "4", "--embed-preset", "e5-mistral"])
    step = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in line]
    assert len(step) == 1 and 0 < step[0]["loss"] < 10
    assert os.path.isfile(tmp_path / "run" / "llm" / "config.json")


def test_errors_name_the_remedy(tiny_llm, tmp_path):
    with pytest.raises(ValueError, match=r"unknown embedding preset 'qwen3' \(embed_preset\); known: default,"):
        EmbedSettings.preset("qwen3")
    with pytest.raises(ValueError, match="unknown pooling 'cls' in the embedding settings; use one of mean, last"):
        EmbedSettings(pool="cls")
    with pytest.raises(ModelFolderError, match=r"needs an NV-Embed folder .* pick another embedder preset \(--embed-preset\)"):
        LLMEmbedder(tiny_llm, EmbedSettings.preset("nv-embed-v2"))
    groups = tmp_path / "groups.jsonl"
    groups.write_text(json.dumps({"texts": ["a red cat", "the red cat"]}) + "\n")
    with pytest.raises(SystemExit, match="not NV-Embed's latent attention; pass another --embed-preset"):
        train.main(["--stage", "0", "--llm", tiny_llm, "--train-data", str(groups), "--output", str(tmp_path / "r"),
                    "--embed-preset", "nv-embed-v2"])
