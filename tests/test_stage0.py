"""Stage 0: groups reader, pair choice, the loss against a hand computation, accumulation, 2 ranks, merged folder."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from miniproclip.data import DataError  # noqa: E402
from miniproclip.distributed import close_distributed  # noqa: E402
from miniproclip.embedder import CaptionTokenizer, EmbedSettings, LLMEmbedder  # noqa: E402
from miniproclip.weights import folder_fingerprint  # noqa: E402
from miniproclip.lora import lora_state_dict  # noqa: E402
from miniproclip.loader import epoch_batches  # noqa: E402
from miniproclip.groups import anchor_recall, nearest_neighbour_accuracy, pick_pairs, read_groups  # noqa: E402
from miniproclip.lora import LoRASettings  # noqa: E402
from miniproclip.merge import write_merged_llm  # noqa: E402
from miniproclip.training.stage0 import CaptionContrastive, load_stage0_llm  # noqa: E402
from miniproclip.training.stages import accumulated_backward  # noqa: E402

from fixtures import assert_same_runs, losses, run_cli, wait_for_lines, write_tiny_llm  # noqa: E402

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
    groups = read_groups(path, log=logged.append)
    assert groups.texts == [["a cat", "one cat"], ["a dog", "a dog on the grass"]] and groups.kinds is None
    assert logged[-1] == f"warning: skipped 6 malformed rows in {path}"
    with pytest.raises(DataError, match=f"{path}:3: a group needs two different texts"):
        read_groups(path, strict=True)
    empty = write_lines(tmp_path / "empty.jsonl", [json.dumps({"texts": ["x"]})])
    with pytest.raises(DataError, match="no valid groups"):
        read_groups(empty, log=lambda _: None)


def test_pairs_are_the_anchor_and_another_text_drawn_by_seed_epoch_and_row_only():
    together = pick_pairs(GROUPS, [0, 1, 2, 3], seed=0, epoch=0)
    assert together == pick_pairs(GROUPS, [0, 1], 0, 0) + pick_pairs(GROUPS, [2, 3], 0, 0)  # any rank layout
    assert all(a == GROUPS[i][0] and b in GROUPS[i][1:] for i, (a, b) in enumerate(together))  # anchor first
    draws = {pick_pairs(GROUPS, [0], seed=0, epoch=epoch)[0] for epoch in range(20)}
    assert draws == {(GROUPS[0][0], GROUPS[0][1]), (GROUPS[0][0], GROUPS[0][2])}  # both positives turn up


def test_sources_kinds_and_one_source_per_batch(tmp_path):
    first = write_lines(tmp_path / "a.jsonl", [json.dumps({"texts": [f"a{i}", f"b{i}"]}) for i in range(10)])
    second = write_lines(tmp_path / "b.jsonl", [json.dumps({"texts": [f"c{i}", f"d{i}"]}) for i in range(7)])
    groups = read_groups(f"{first}::{second}")
    assert groups.sources == [0] * 10 + [1] * 7 and len(groups) == 17
    batches = epoch_batches(len(groups), 3, seed=0, epoch=0, sources=groups.sources)
    assert len(batches) == 3 + 2  # each source's tail is dropped
    assert all(len({groups.sources[i] for i in batch}) == 1 for batch in batches)
    orders = [[groups.sources[b[0]] for b in epoch_batches(17, 3, seed=0, epoch=e, sources=groups.sources)]
              for e in range(4)]
    assert any(order != sorted(order) for order in orders)  # the sources' batches are interleaved
    ranks = [epoch_batches(len(groups), 3, seed=0, epoch=0, rank=r, world_size=2, sources=groups.sources)
             for r in range(2)]  # 2 ranks: the halves of 1 rank's global batches of 6
    assert [a + b for a, b in zip(*ranks)] == epoch_batches(len(groups), 6, seed=0, epoch=0, sources=groups.sources)
    val = write_lines(tmp_path / "v.jsonl", [json.dumps({"texts": ["x", "y", "z"], "kinds": ["s", "l", "de"]})])
    assert read_groups(val).kinds == [["s", "l", "de"]]


def test_anchor_recall_by_hand():
    vectors = {"a": [1.0, 0.0], "b": [0.0, 1.0], "a-long": [0.9, 0.1], "b-long": [0.8, 0.2], "b-de": [0.1, 0.9]}
    embed = lambda texts: torch.tensor([vectors[t] for t in texts])
    groups, kinds = [["a", "a-long"], ["b", "b-long", "b-de"]], [["short", "long"], ["short", "long", "de"]]
    assert anchor_recall(embed, groups, kinds) == {"long": 0.5, "de": 1.0}  # b-long's nearest anchor is a
    assert anchor_recall(embed, groups) == {"1": 0.5, "2": 1.0}


def test_loss_is_symmetric_infonce_by_hand():
    a, b = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    stage = CaptionContrastive(forward=None, tokenize=None, temperature=0.05)
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
    close_distributed()
    os._exit(0)  # no interpreter teardown, where gloo can abort a finished rank (distributed.exit_torchrun_rank)


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
    assert folder_fingerprint(output) != folder_fingerprint(tiny_llm)  # the adapters' digest in the metadata
    # merged by another tool: same config, keys, dtypes, metadata and file size as the base; the sample tells
    external = tmp_path / "external"
    os.makedirs(external)
    shutil.copy(f"{tiny_llm}/config.json", external)
    save_file(load_file(f"{output}/model.safetensors"), external / "model.safetensors", metadata={"format": "pt"})
    assert os.path.getsize(external / "model.safetensors") == os.path.getsize(f"{tiny_llm}/model.safetensors")
    assert folder_fingerprint(str(external)) != folder_fingerprint(tiny_llm)


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


def test_smollm2_first_loss_on_translation_groups_is_near_ln_batch(smollm2_dir):
    """The toy world's translation groups ([English, de, fr, es, ja] of one scene) on the real SmolLM2: with the
    English caption as every pair's anchor the first loss is 3.90 (ln 32 = 3.47); pairs of any two texts of a group
    started at 6.19, far above the collapsed ln 32 that training then fell into (issue 23)."""
    from miniproclip.toy.groups import paraphrase_groups
    groups = [g["texts"] for g in paraphrase_groups(32, seed=3, templates=[0], languages=("de", "fr", "es", "ja"))]
    settings = EmbedSettings()
    model = load_stage0_llm(str(smollm2_dir), settings, LoRASettings(dropout=0.0))
    stage = CaptionContrastive(model.eval(), CaptionTokenizer(str(smollm2_dir), settings), temperature=0.05)
    with torch.no_grad():
        loss, _ = stage.loss(stage.features(pick_pairs(groups, list(range(32)), seed=0, epoch=0)))
    assert loss.item() < math.log(32) + 1


# -----------------------------------------------------------------------------
# `python train.py --stage 0`: the training loop of stages 1-2 running stage 0

import train  # noqa: E402
from miniproclip import checkpoint as ckpt  # noqa: E402
from miniproclip.lora import load_lora_state_dict  # noqa: E402

@pytest.mark.slow
def test_smollm2_40_steps_on_translations_leave_the_collapsed_loss(smollm2_dir, tmp_path):
    """40 steps of 16 (English, German) pairs of toy scenes: the loss ends well below ln 16, where the embeddings
    are all equal and every gradient vanishes (pairs of any two texts of a translation group stayed there)."""
    from miniproclip.toy.groups import paraphrase_groups
    groups = paraphrase_groups(640, seed=3, templates=[0], languages=("de",))
    data = write_lines(tmp_path / "en_de.jsonl", [json.dumps({"texts": g["texts"]}) for g in groups])
    train.main(["--stage", "0", "--llm", str(smollm2_dir), "--train-data", data, "--output", str(tmp_path / "run"),
                "--max-steps", "40", "--batch-size", "16", "--lr", "1e-3", "--temperature", "0.05",
                "--lora-dropout", "0", "--save-every", "1000"])
    last = [r["loss"] for step, r in sorted(losses(tmp_path / "run").items())][-5:]
    assert sum(last) / 5 < math.log(16) - 1


WORDS = ["red", "blue", "green", "circle", "square", "dog", "cat", "star"]


@pytest.fixture(scope="module")
def groups_file(tmp_path_factory):
    """16 groups of the tiny tokenizer's words: a text, its reversal and a shuffled copy mean the same here."""
    rng, rows = torch.Generator().manual_seed(0), []
    for _ in range(16):
        words = [WORDS[i] for i in torch.randperm(len(WORDS), generator=rng)[:3]]
        rows.append({"texts": [" ".join(words), " ".join(words[::-1]), " ".join(words[1:] + words[:1])]})
    path = tmp_path_factory.mktemp("groups") / "groups.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def stage0_args(llm, groups, out, *extra):
    return ["--stage", "0", "--llm", llm, "--train-data", groups, "--output", str(out), "--batch-size", "4",
            "--warmup", "1", "--lr", "1e-2", "--lora-rank", "4", "--lora-alpha", "8", *extra]


def test_train_stage0_checkpoints_the_adapters_only_and_writes_the_merged_llm(tiny_llm, groups_file, tmp_path):
    train.main(stage0_args(tiny_llm, groups_file, tmp_path / "run", "--max-steps", "4", "--save-every", "2",
                           "--lora-dropout", "0"))
    weights, meta = ckpt.load_weights(ckpt.resolve_checkpoint(str(tmp_path / "run")))
    settings = EmbedSettings()
    model = load_stage0_llm(tiny_llm, settings, LoRASettings(rank=4, alpha=8, dropout=0.0))
    assert meta["stage"] == 0 and meta["step"] == 4 and weights.keys() == lora_state_dict(model).keys()
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4]
    # only the adapters trained: every tensor the merge leaves alone equals the base's, bit for bit
    merged, base = load_file(f"{tmp_path}/run/llm/model.safetensors"), load_file(f"{tiny_llm}/model.safetensors")
    assert merged.keys() == base.keys()
    for key in merged:
        adapted = any(f".{t}." in key for t in LoRASettings().targets)
        assert torch.equal(merged[key], base[key]) != adapted, key
    # RUN/llm is the base with the last checkpoint's adapters folded in: the same pooled embeddings
    load_lora_state_dict(model, weights)
    texts = ["red dog star", "the blue circle", "green cat square red"]
    with torch.no_grad():
        expected = CaptionContrastive(model.eval(), CaptionTokenizer(tiny_llm, settings)).features(
            [(t, t) for t in texts])["a"]
    ours, _ = LLMEmbedder(f"{tmp_path}/run/llm", settings).embed(texts)
    torch.testing.assert_close(F.normalize(ours, dim=-1), expected, atol=1e-5, rtol=1e-4)
    # the embed CLI takes it too, with the preset flags; the cache names the tuned LLM, not the base
    from miniproclip.embed import load_cache, main as embed_main
    (tmp_path / "t.txt").write_text("\n".join(texts) + "\n")
    embed_main(["--llm", f"{tmp_path}/run/llm", "--texts", str(tmp_path / "t.txt"), "--output", str(tmp_path / "c"),
                "--dtype", "fp32", "--store-dtype", "fp32", "--embed-preset", "default", "--bidirectional"])
    cached, _, meta = load_cache(str(tmp_path / "c"))
    bidirectional, _ = LLMEmbedder(f"{tmp_path}/run/llm", EmbedSettings(causal=False)).embed(texts)
    assert (cached - bidirectional).abs().max() < 1e-5 and json.loads(meta["causal"]) is False
    assert meta["llm_fingerprint"] == folder_fingerprint(f"{tmp_path}/run/llm") != folder_fingerprint(tiny_llm)


def test_train_stage0_accumulation_equals_the_full_batch(tiny_llm, groups_file, tmp_path):
    # fp32 and Adam eps 1e-6: stage 0's 1e-8 turns the rounding noise of near-zero gradients into full-size steps.
    # The CPU training attention (math kernel) rounds differently at another padded length: adapters within 1e-4
    flags = ["--max-steps", "3", "--lora-dropout", "0", "--precision", "fp32", "--eps", "1e-6"]
    train.main(stage0_args(tiny_llm, groups_file, tmp_path / "full", *flags))
    train.main(stage0_args(tiny_llm, groups_file, tmp_path / "accum", *flags, "--accum-freq", "2"))
    assert_same_runs(tmp_path / "full", tmp_path / "accum", steps=3, loss_tol={"rel": 1e-5}, weight_tol=1e-4)


def test_train_stage0_grad_checkpointing_on_a_cpu_trains_as_without(tiny_llm, groups_file, tmp_path):
    """--grad-checkpointing keeps the fused attention kernel (stages.attention_for_training): the math kernel that a
    CPU step uses otherwise is not active when checkpoint recomputes a layer in the backward, and the recomputation
    failed checkpoint's check that it saved the same tensors. Same losses and adapters as without, to rounding."""
    flags = ["--max-steps", "3", "--lora-dropout", "0", "--precision", "fp32", "--eps", "1e-6"]
    train.main(stage0_args(tiny_llm, groups_file, tmp_path / "plain", *flags))
    train.main(stage0_args(tiny_llm, groups_file, tmp_path / "checkpointed", *flags, "--grad-checkpointing"))
    assert_same_runs(tmp_path / "plain", tmp_path / "checkpointed", steps=3, loss_tol={"rel": 1e-5}, weight_tol=1e-4)


def test_train_stage0_two_gloo_ranks_equal_one_process(tiny_llm, groups_file, tmp_path):
    """torchrun with 2 gloo ranks × 2 groups and --gather-with-grad == 1 process × 4 groups."""
    flags = ["--max-steps", "3", "--lora-dropout", "0", "--gather-with-grad", "--precision", "fp32", "--eps", "1e-6"]
    train.main(stage0_args(tiny_llm, groups_file, tmp_path / "one", *flags))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29541", train.__file__, *stage0_args(tiny_llm, groups_file, tmp_path / "two", *flags),
                             "--batch-size", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_runs(tmp_path / "one", tmp_path / "two", steps=3, loss_tol={"rel": 1e-5}, weight_tol=1e-4)


def test_train_stage0_resumes_after_kill_9_with_the_same_losses(tiny_llm, groups_file, tmp_path):
    args = stage0_args(tiny_llm, groups_file, tmp_path / "killed", "--max-steps", "40", "--save-every", "1")
    train.main(stage0_args(tiny_llm, groups_file, tmp_path / "straight", "--max-steps", "40"))  # dropout on
    straight = losses(tmp_path / "straight")
    process = run_cli(args)
    wait_for_lines(tmp_path / "killed" / "metrics.jsonl", 5, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed_from = ckpt.load_weights(ckpt.resolve_checkpoint(str(tmp_path / "killed")))[1]["step"]
    assert 0 < resumed_from < 40, "the process finished before the kill: the test did not test a kill"
    train.main(args + ["--resume", "latest"])
    with open(tmp_path / "killed" / "metrics.jsonl") as f:
        after = list(map(json.loads, f))[-(40 - resumed_from):]
    assert [r["step"] for r in after] == list(range(resumed_from + 1, 41))
    for r in after:
        assert r["loss"] == pytest.approx(straight[r["step"]]["loss"], rel=1e-6, abs=1e-7)
    assert os.path.isfile(tmp_path / "killed" / "llm" / "model.safetensors")


def test_train_stage0_non_finite_steps_are_skipped_then_stop(tiny_llm, groups_file, tmp_path, monkeypatch, capsys):
    loss = CaptionContrastive.loss
    monkeypatch.setattr(CaptionContrastive, "loss", lambda self, f, last=True: (loss(self, f, last)[0] * float("nan"),
                                                                               {}))
    with pytest.raises(SystemExit, match="3 consecutive non-finite steps"):
        train.main(stage0_args(tiny_llm, groups_file, tmp_path / "nan", "--max-steps", "10", "--max-bad-steps", "3"))
    assert capsys.readouterr().out.count("non-finite loss nan") == 3 and not os.path.exists(tmp_path / "nan" / "llm")


@pytest.mark.parametrize("flags, message", [(["--temperature", "0"], "--temperature must be positive, got 0.0"),
                                            (["--lora-targets", "q,kk"], "has no kk_proj layers")])
def test_train_stage0_bad_flags_are_one_line_errors(tiny_llm, groups_file, tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        train.main(stage0_args(tiny_llm, groups_file, tmp_path / "bad", "--max-steps", "1", *flags))


def test_stage1_takes_the_merged_llm_and_refuses_the_base_cache(tiny_llm, groups_file, tmp_path):
    from fixtures import write_tiny_clip, write_tiny_pairs
    train.main(stage0_args(tiny_llm, groups_file, tmp_path / "s0", "--max-steps", "2"))
    clip, data = write_tiny_clip(tmp_path / "clip"), write_tiny_pairs(tmp_path / "data")
    stage1 = ["--stage", "1", "--clip", clip, "--train-data", data, "--workers", "0", "--batch-size", "8",
              "--max-steps", "1"]
    with pytest.raises(SystemExit, match="is a stage-0 checkpoint: pass its run's merged LLM as --llm RUN/llm"):
        train.main(["--stage", "2", "--init", str(tmp_path / "s0"), "--clip", clip, "--train-data", data])
    train.main(stage1 + ["--llm", tiny_llm, "--output", str(tmp_path / "base")])  # fills the base's cache
    with pytest.raises(SystemExit, match="built with another llm fingerprint"):
        train.main(stage1 + ["--llm", str(tmp_path / "s0" / "llm"), "--output", str(tmp_path / "refused")])
    train.main(stage1 + ["--llm", str(tmp_path / "s0" / "llm"), "--output", str(tmp_path / "tuned"),
                         "--text-cache", str(tmp_path / "tuned_cache.safetensors")])
    assert losses(tmp_path / "tuned")[1]["loss"] != pytest.approx(losses(tmp_path / "base")[1]["loss"], rel=1e-4)


def test_embed_preset_of_a_run_saved_with_flat_flags_is_read_back():
    """A run saved before the config had sections holds its flags: checkpoint.config_sections reads them into the
    embedding section as train.py built it then (the preset, then --max-length, --bidirectional)."""
    from miniproclip.checkpoint import config_sections
    from miniproclip.training.flags import parse_args

    args = vars(parse_args(["--stage", "1", "--embed-preset", "llm2vec-llama3", "--max-length", "64"])[0])
    embedding = lambda saved: EmbedSettings(**config_sections({"args": saved})["embedding"])
    assert embedding(args) == EmbedSettings.preset("llm2vec-llama3", max_length=64)
    assert embedding({**args, "embed_preset": "default", "bidirectional": True}) == EmbedSettings(
        max_length=64, causal=False)
    del args["embed_preset"]  # a checkpoint saved before the flag existed
    assert embedding(args) == EmbedSettings(max_length=64)
