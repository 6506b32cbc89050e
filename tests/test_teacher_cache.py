"""Teacher caches (teacher_cache.py): stage-1/2 features read back equal the live teacher's, and each stage keeps only
what it trains on the device, in the dtype it runs in."""

import contextlib
import os

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from miniproclip.clip import CLIP
from miniproclip.loader import collate
from miniproclip.losses import ClipLoss, distillation_loss
from miniproclip.training.config import resolve_config
from miniproclip.training.loop import setup
from miniproclip.training.flags import parse_args
from miniproclip.training.stages import LossSettings, stage1_loss, stage2_loss
from miniproclip.tokenizer import CLIPTokenizer


def setup_run(world, out, *extra, device="cpu"):
    """The training setup (training/loop.py) in fp32, where the caches equal the live teacher to rounding (the references run in fp32)."""
    argv = ["--train-data", world["data"], "--clip", world["clip"], "--llm", world["llm"], "--output", str(out),
            "--workers", "0", "--batch-size", "8", "--device", device, "--precision", "fp32", *extra]
    args, given = parse_args(argv)
    config, checkpoints = resolve_config(args, given, world=1)
    return setup(config, checkpoints, 0, 1, lambda *a, **k: None)


def first_batch(run, n=8):
    """A collated batch of rows 0..n-1, as the loader gives it, prepared by its stage (stage 2: every third row
    shows its long caption)."""
    batch = collate([run.stage.dataset[i] for i in range(n)])
    run.stage.pick_long, run.stage.coins_epoch = np.arange(len(run.stage.dataset)) % 3 == 0, 0
    return run.stage.prepare(batch, 0)


@pytest.mark.parametrize("skip", [False, True])
def test_stage1_cached_losses_equal_the_live_teacher(world, tmp_path, skip):
    """Stage-1 features and loss from the caches == CLIP tokenised and run per step, LLM looked up by text
    (fp32 on CPU: ≤1e-5; the teacher cache stores fp32, the gathered LLM rows are the looked-up ones bit for bit)."""
    run = setup_run(world, tmp_path / "run", "--stage", "1", *(["--skip-truncated-long"] if skip else []))
    batch = first_batch(run)
    with torch.no_grad():
        cached = run.stage.features(batch, student_only=False)
    # the live reference: today's per-step tokenisation, hashing and teacher forward
    tokenizer, clip = CLIPTokenizer.from_folder(world["clip"]), CLIP.from_pretrained(world["clip"])
    long_ = [c for c in batch["long_captions"] if c]
    cut = tokenizer(long_).truncated.tolist()
    assert any(cut)  # the fixture's long captions exceed 77 tokens: the flag is exercised
    long_ = [c for c, was_cut in zip(long_, cut) if not (skip and was_cut)]
    texts = batch["captions"] + long_
    with torch.no_grad():
        teacher = clip.encode_text(tokenizer(texts).input_ids, normalize=True)
        student = run.stage.model.encode_text(run.stage.llm_vectors.cache(texts))
    n = len(batch["captions"])
    live = {"student_short": student[:n], "student_long": student[n:], "teacher_short": teacher[:n],
            "teacher_long": teacher[n:]}
    for key in live:
        assert cached[key].shape == live[key].shape and torch.allclose(cached[key], live[key], rtol=0, atol=1e-5), key
    assert run.stage.teacher_truncated == tokenizer(texts).num_truncated
    (loss, parts), (ref, ref_parts) = stage1_loss(cached, run.stage.loss_settings), stage1_loss(live, run.stage.loss_settings)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5) and loss.item() > 0
    assert parts["struct"].item() == pytest.approx(ref_parts["struct"].item(), rel=1e-5, abs=1e-7)


def test_stage2_cached_teacher_equals_the_live_one(world, tmp_path):
    """A frozen teacher with centre crops is read from the image cache: the same features and losses as running it."""
    cached = setup_run(world, tmp_path / "cached", "--stage", "2", "--init", "scratch", "--train-crop", "center")
    assert cached.stage.teacher is None and cached.stage.teacher_vectors is not None  # no teacher tower at all
    batch = first_batch(cached)
    image_cache = cached.stage.teacher_vectors.cache.path
    assert os.path.dirname(image_cache) == os.path.dirname(cached.stage.llm_vectors.cache.path)  # beside the LLM cache
    with torch.no_grad():
        features = cached.stage.features(batch, student_only=False)
        live = cached.stage.model.image_teacher().encode_image(batch["pixels"])  # the initial tower, run on the pixels
    assert (features["teacher_image"] - live).abs().max() < 1e-5
    # the LLM rows follow the short/long choice: the text side equals a lookup by text
    chosen = [lc if lc and i % 3 == 0 else c for i, c, lc in zip(batch["indices"], batch["captions"],
                                                                   batch["long_captions"])]
    with torch.no_grad():
        assert torch.equal(features["text"], cached.stage.model.encode_text(cached.stage.llm_vectors.cache(chosen)))
    loss, _ = stage2_loss(features, cached.stage.loss_settings, cached.stage.contrastive_loss, cached.stage.model.logit_scale)
    ref, _ = stage2_loss({**features, "teacher_image": live}, cached.stage.loss_settings, cached.stage.contrastive_loss,
                         cached.stage.model.logit_scale)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    # a second run reuses the file: nothing is encoded again
    again = setup_run(world, tmp_path / "again", "--stage", "2", "--init", "scratch", "--train-crop", "center")
    assert again.stage.teacher_vectors.cache.path == image_cache
    assert np.array_equal(again.stage.teacher_vectors.rows, cached.stage.teacher_vectors.rows)


def test_stage2_image_unreadable_when_the_cache_was_filled(world, tmp_path):
    """An image that could not be read at fill time has a NaN row in the image cache; when it can be read later,
    the step keeps it in the contrastive loss, leaves it out of L_reg (== L_reg of the other rows) and counts it."""
    # the caches (and so the image cache beside them) in this test's own folder: the NaN row stays here
    flags = ["--stage", "2", "--init", "scratch", "--train-crop", "center", "--text-cache",
             str(tmp_path / "text_cache.safetensors")]
    filled = setup_run(world, tmp_path / "fill", *flags)
    assert os.path.dirname(filled.stage.teacher_vectors.cache.path) == str(tmp_path)
    cache, rows = filled.stage.teacher_vectors.cache, filled.stage.teacher_vectors.rows
    nan_row = int(rows[0, 0])  # row 0's image, as a failed read leaves it (teacher_cache.image_teacher_encoder)
    writable = np.memmap(cache.path, dtype=np.float32, mode="r+", offset=cache.embeddings.offset,
                         shape=cache.embeddings.shape)
    writable[nan_row] = np.nan
    writable.flush()
    run = setup_run(world, tmp_path / "run", *flags)
    batch = first_batch(run)
    projection = run.stage.model.visual_projection.weight
    with torch.no_grad():
        projection.add_(torch.randn(projection.shape, generator=torch.Generator().manual_seed(0)))  # a moved student
        features = run.stage.features(batch, student_only=False)
        loss, parts = run.stage.loss(features, last=True)
    assert run.stage.teacher_unknown == 1 and torch.isnan(features["teacher_image"][0]).all()
    settings = run.stage.loss_settings
    reg, _ = distillation_loss(features["image"][1:], features["teacher_image"][1:], settings.ins_weight,
                               settings.struct_weight, settings.reduction)
    contrastive = run.stage.contrastive_loss(features["image"], features["text"], run.stage.model.logit_scale.exp())
    assert parts["reg"].item() == pytest.approx(reg.item(), rel=1e-6) and reg.item() > 0.1
    assert loss.item() == pytest.approx(contrastive.item() + settings.reg_weight * reg.item(), rel=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("known_rows", [0, 1, 2])
def test_stage2_loss_with_few_cached_teacher_rows(reduction, known_rows):
    """A batch whose cached v̂ is NaN in all rows but `known_rows`: with fewer than 2 left, L_reg is 0 (no pairs,
    and "mean" over nothing would be NaN), so the loss is InfoNCE alone; with 2 it is L_reg over those 2."""
    generator = torch.Generator().manual_seed(0)
    image, text, teacher = (torch.nn.functional.normalize(torch.randn(4, 8, generator=generator), dim=-1)
                            for _ in range(3))
    teacher[known_rows:] = float("nan")
    settings, clip_loss, logit_scale = LossSettings(reduction=reduction), ClipLoss(), torch.tensor(2.0)
    loss, parts = stage2_loss({"image": image, "text": text, "teacher_image": teacher}, settings, clip_loss,
                              logit_scale, teacher_may_be_unknown=True)
    contrastive = clip_loss(image, text, logit_scale.exp())
    reg = (distillation_loss(image[:2], teacher[:2], reduction=reduction)[0] if known_rows == 2
           else torch.tensor(0.0))
    assert torch.isfinite(loss) and parts["reg"].item() == pytest.approx(reg.item(), rel=1e-6)
    assert loss.item() == pytest.approx(contrastive.item() + reg.item(), rel=1e-6)
    assert known_rows < 2 or reg.item() > 0.01


@pytest.mark.parametrize("extra, dtype", [(["--train-crop", "random"], torch.bfloat16),
                                          (["--train-crop", "center", "--ema-momentum", "0.99"], torch.float32)])
def test_live_stage2_teacher_dtype(world, tmp_path, extra, dtype):
    """A live frozen teacher is cast once to bf16 under amp_bf16; an EMA teacher stays fp32 (its updates need it)."""
    run = setup_run(world, tmp_path / "run", "--stage", "2", "--init", "scratch", "--precision", "amp_bf16", *extra)
    assert run.stage.teacher_vectors is None
    assert {p.dtype for p in run.stage.teacher.parameters()} == {dtype}
    assert {p.dtype for p in run.stage.model.parameters()} == {torch.float32}  # fp32 master weights


def test_each_stage_keeps_only_what_it_uses_on_the_device(world, tmp_path, monkeypatch):
    """Setup on the `meta` device (the caches filled before on CPU): what is on it is what training uses there."""
    setup_run(world, tmp_path / "fill1", "--stage", "1")
    setup_run(world, tmp_path / "fill2", "--stage", "2", "--init", "scratch", "--train-crop", "center")
    monkeypatch.setattr(torch, "autocast", lambda *args, **kwargs: contextlib.nullcontext())  # none for `meta`
    run = setup_run(world, tmp_path / "s1", "--stage", "1", device="meta")
    on_device = {name for name, p in run.stage.model.named_parameters() if p.device.type == "meta"}
    assert on_device == {name for name, _ in run.stage.model.named_parameters() if name.startswith("text_head.")}
    assert not hasattr(run.stage, "teacher")  # the CLIP towers were only loaded to fill the cache (here not even that)
    assert {name for name, _ in run.stage.forward.named_parameters()} == on_device
    run = setup_run(world, tmp_path / "s2", "--stage", "2", "--init", "scratch", "--train-crop", "center",
                    device="meta")
    assert all(p.device.type == "meta" and p.dtype == torch.float32 for p in run.stage.model.parameters())
    assert run.stage.teacher is None  # the frozen teacher's features come from the cache
