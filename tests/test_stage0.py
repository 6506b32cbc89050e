"""Stage 0: groups reader, pair choice, the loss against a hand computation, accumulation, 2 ranks, merged folder."""

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from miniproclip.data import DataError  # noqa: E402
from miniproclip.embedder import CaptionTokenizer, EmbedSettings, LLMEmbedder, llm_fingerprint  # noqa: E402
from miniproclip.lora import lora_state_dict  # noqa: E402
from miniproclip.stage0 import (CaptionContrastive, LoRASettings, load_stage0_llm,  # noqa: E402
                                nearest_neighbour_accuracy, pick_pairs, read_groups, write_merged_llm)
from miniproclip.stages import accumulated_backward  # noqa: E402

from fixtures import write_tiny_llm  # noqa: E402

GROUPS = [["a red circle", "one red circle", "the red circle"], ["a blue square", "one blue square"],
          ["two green triangles", "the two green triangles"], ["a small dog", "the small dog"],
          ["a large cat on the grass", "the large cat on the grass"], ["three striped stars", "the three stars"]]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_read_groups_both_row_kinds_and_malformed_rows(tmp_path):
    path = write_lines(tmp_path / "g.jsonl", [
        json.dumps({"texts": [" a cat ", "one cat", "a cat"]}),  # stripped, the repeat dropped
        json.dumps({"image": "x.png", "caption": "a dog", "long_caption": "a dog on the grass"}),
        json.dumps({"texts": ["alone"]}), json.dumps({"caption": "no long one"}), "{not json", "[1, 2]",
        json.dumps({"texts": "a cat"}), json.dumps({"texts": ["a", 3]})])
    logged = []
    assert read_groups(path, log=logged.append) == [["a cat", "one cat"], ["a dog", "a dog on the grass"]]
    assert logged[-1] == f"warning: skipped 6 malformed rows in {path}"
    with pytest.raises(DataError, match=f"{path}:3: a group needs two different texts"):
        read_groups(path, strict=True)
    empty = write_lines(tmp_path / "empty.jsonl", [json.dumps({"texts": ["x"]})])
    with pytest.raises(DataError, match="no valid groups"):
        read_groups(empty, log=lambda _: None)


def test_pairs_depend_on_seed_epoch_and_row_only():
    together = pick_pairs(GROUPS, [0, 1, 2, 3], seed=0, epoch=0)
    assert together == pick_pairs(GROUPS, [0, 1], 0, 0) + pick_pairs(GROUPS, [2, 3], 0, 0)  # any rank layout
    assert all(a != b and {a, b} <= set(GROUPS[i]) for i, (a, b) in enumerate(together))
    draws = {pick_pairs(GROUPS, [0], seed=0, epoch=epoch)[0] for epoch in range(20)}
    assert len(draws) == 6  # all ordered pairs of the 3-text group turn up across epochs


def test_loss_is_symmetric_infonce_by_hand():
    a, b = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    stage = CaptionContrastive(model=None, tokenize=None, temperature=0.05)
    loss, _ = stage.loss({"a": a, "b": b})
    logits = (a @ b.T) / 0.05
    rows = -torch.log_softmax(logits, 1).diagonal().mean()
    columns = -torch.log_softmax(logits, 0).diagonal().mean()
    torch.testing.assert_close(loss, (rows + columns) / 2)


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    return write_tiny_llm(tmp_path_factory.mktemp("llm"))


def stage_and_model(folder, seed=0, **kwargs):
    settings = EmbedSettings(causal=False)
    torch.manual_seed(seed)
    model = load_stage0_llm(folder, settings, LoRASettings(rank=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # non-zero B: otherwise the A gradients are exactly zero
        for name, p in lora_state_dict(model).items():
            p.add_(0.05 * torch.randn(p.shape)) if name.endswith("lora_B") else None
    return CaptionContrastive(model, CaptionTokenizer(folder, settings), **kwargs), model


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_accumulation_equals_full_batch(tiny_llm):
    pairs = pick_pairs(GROUPS, list(range(6)), seed=0, epoch=0)
    stage, model = stage_and_model(tiny_llm)
    full, _ = accumulated_backward([pairs], stage.features, stage.loss)
    expected = lora_grads(model)
    model.zero_grad()
    accumulated, _ = accumulated_backward([pairs[:2], pairs[2:4], pairs[4:]], stage.features, stage.loss)
    torch.testing.assert_close(accumulated, full)
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(grad, expected[name], atol=1e-6, rtol=1e-4)


def _two_rank_worker(rank, folder, init_file, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    stage, model = stage_and_model(folder, gather_with_grad=True, rank=rank, world_size=2)
    pairs = pick_pairs(GROUPS, list(range(rank * 3, rank * 3 + 3)), seed=0, epoch=0)
    loss, _ = stage.loss(stage.features(pairs))
    loss.backward()
    grads = lora_grads(model)
    for grad in grads.values():  # what DDP does: the average over ranks
        dist.all_reduce(grad)
        grad /= 2
    if rank == 0:
        torch.save({"loss": loss.detach(), **grads}, out)
    dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(tiny_llm, tmp_path):
    stage, model = stage_and_model(tiny_llm)
    loss, _ = stage.loss(stage.features(pick_pairs(GROUPS, list(range(6)), seed=0, epoch=0)))
    loss.backward()
    torch.multiprocessing.spawn(_two_rank_worker, args=(tiny_llm, str(tmp_path / "init"), str(tmp_path / "r0.pt")),
                                nprocs=2)
    two = torch.load(tmp_path / "r0.pt", weights_only=True)
    torch.testing.assert_close(two.pop("loss"), loss.detach())
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(two[name], grad, atol=1e-6, rtol=1e-4)


def test_merged_folder_loads_in_transformers_and_as_llm(tiny_llm, tmp_path):
    stage, model = stage_and_model(tiny_llm)
    texts = ["a red circle on the grass", "two dogs", "the small striped square in the top left"]
    tokenize = stage.tokenize
    with torch.no_grad():
        unmerged = F.normalize(stage.features([(t, t) for t in texts])["a"], dim=-1)
    output = write_merged_llm(model, tiny_llm, str(tmp_path / "run" / "llm"), LoRASettings(rank=4, alpha=8))
    assert sorted(os.listdir(output)) == sorted(os.listdir(tiny_llm))  # config, tokenizer, model.safetensors
    ours, _ = LLMEmbedder(output, EmbedSettings(causal=False)).embed(texts)
    torch.testing.assert_close(F.normalize(ours, dim=-1), unmerged, atol=1e-5, rtol=1e-4)
    # transformers' reading of the folder, mean-pooled over the same tokens (causal: its default attention)
    reference = transformers.AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32).model.eval()
    ids, _ = tokenize(texts)
    causal, _ = LLMEmbedder(output, EmbedSettings()).embed(texts)
    for row, embedding in zip(ids, causal):
        with torch.no_grad():
            hidden = reference(input_ids=torch.tensor([row])).last_hidden_state[0]
        torch.testing.assert_close(embedding, hidden.mean(0), atol=1e-5, rtol=1e-4)
    assert llm_fingerprint(output) != llm_fingerprint(tiny_llm)  # the adapters' digest in the metadata
    # merged by another tool: same config, keys, dtypes, metadata and file size as the base; the sample tells
    external = tmp_path / "external"
    os.makedirs(external)
    shutil.copy(f"{tiny_llm}/config.json", external)
    save_file(load_file(f"{output}/model.safetensors"), external / "model.safetensors", metadata={"format": "pt"})
    assert os.path.getsize(external / "model.safetensors") == os.path.getsize(f"{tiny_llm}/model.safetensors")
    assert llm_fingerprint(str(external)) != llm_fingerprint(tiny_llm)


def test_sharded_export_and_nearest_neighbour_accuracy(tiny_llm, tmp_path):
    _, model = stage_and_model(tiny_llm)
    output = write_merged_llm(model, tiny_llm, str(tmp_path / "llm"), LoRASettings(rank=4, alpha=8),
                              max_shard_bytes=20_000)
    index = json.load(open(f"{output}/model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 2 and "model.norm.weight" in index["weight_map"]
    LLMEmbedder(output, EmbedSettings())  # strict load of the shards
    x = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1], [0.2, 1]])
    assert nearest_neighbour_accuracy(x, [0, 0, 1, 1]) == 1.0
    assert nearest_neighbour_accuracy(x, [0, 1, 0, 1]) == 0.0


def test_toy_paraphrase_groups_hold_out_scenes_and_templates():
    from miniproclip.toy.groups import TRAIN_TEMPLATES, paraphrase_groups
    train = paraphrase_groups(50, seed=0, templates=TRAIN_TEMPLATES)
    test = paraphrase_groups(20, seed=1, templates=range(8, 12), languages=("de",),
                             exclude={g["scene"] for g in train})
    assert not {g["scene"] for g in train} & {g["scene"] for g in test}
    assert all(len(set(g["texts"])) == 8 for g in train) and all(len(set(g["texts"])) == 5 for g in test)
    assert not {t for g in train for t in g["texts"]} & {t for g in test for t in g["texts"]}
