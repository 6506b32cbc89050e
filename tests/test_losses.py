"""Tests for miniproclip/losses.py: hand-computed values, independent loop formulas, open_clip's formula,
gradient flow, a 2-process gloo run of ClipLoss against the single-process loss, EMA and clamp."""

import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from miniproclip.losses import (ClipLoss, all_gather_with_grad, clamp_logit_scale_, distillation_loss, ema_update,
                                instance_loss, pairwise_distances,
                                splice_micro_batch, structure_loss)


def huber(x: float, beta: float) -> float:
    """Smooth L1 of one residual, written out."""
    return 0.5 * x * x / beta if abs(x) < beta else abs(x) - 0.5 * beta


def loop_structure_loss(s: np.ndarray, u: np.ndarray, beta: float) -> list[float]:
    """Per-pair Huber terms over i<j, from explicit Euclidean distances."""
    n = len(s)
    return [huber(math.dist(s[i], s[j]) - math.dist(u[i], u[j]), beta) for i in range(n) for j in range(i + 1, n)]


def loop_clip_loss(v: np.ndarray, s: np.ndarray, tau: float) -> float:
    """Symmetric InfoNCE from explicit log-softmax loops, float64."""
    n = len(v)
    total = 0.0
    for i in range(n):
        image_row = [tau * float(v[i] @ s[j]) for j in range(n)]  # image i against every text
        text_row = [tau * float(s[i] @ v[j]) for j in range(n)]  # text i against every image
        total += -(image_row[i] - math.log(sum(math.exp(x) for x in image_row)))
        total += -(text_row[i] - math.log(sum(math.exp(x) for x in text_row)))
    return total / (2 * n)


def open_clip_formula(v: torch.Tensor, s: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """open_clip ClipLoss.forward with world_size 1."""
    labels = torch.arange(len(v))
    return (F.cross_entropy(tau * v @ s.T, labels) + F.cross_entropy(tau * s @ v.T, labels)) / 2


def unit_rows(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# -----------------------------------------------------------------------------
# instance / structure / distillation

def test_instance_loss_hand_values():
    s = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    u = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    # (0.2^2 + 0.2^2) + (1^2 + 1^2) = 2.08 over B*D = 4 elements
    assert instance_loss(s, u).item() == pytest.approx(2.08, abs=1e-6)
    assert instance_loss(s, u, reduction="mean").item() == pytest.approx(0.52, abs=1e-6)


def test_structure_loss_hand_values():
    s = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])  # distances 5, 1, sqrt(18)
    u = torch.tensor([[0.0, 0.0], [0.0, 2.0], [3.0, 0.0]])  # distances 2, 3, sqrt(13)
    # residuals 3, -2, sqrt(18)-sqrt(13) = 0.63691 -> huber 2.5, 1.5, 0.5 * 0.63691^2 = 0.20283
    residual = math.sqrt(18) - math.sqrt(13)
    expected = 2.5 + 1.5 + 0.5 * residual ** 2
    assert structure_loss(s, u).item() == pytest.approx(expected, abs=1e-5)
    assert structure_loss(s, u, reduction="mean").item() == pytest.approx(expected / 3, abs=1e-5)
    # beta = 2: 3 -> 3 - 1, -2 -> 2 - 1, 0.63691 -> 0.25 * 0.63691^2
    assert structure_loss(s, u, beta=2.0).item() == pytest.approx(2 + 1 + 0.25 * residual ** 2, abs=1e-5)


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_structure_loss_matches_pair_loops(beta):
    s, u = unit_rows(6, 5, seed=0), unit_rows(6, 5, seed=1)
    terms = loop_structure_loss(s.double().numpy(), u.double().numpy(), beta)
    assert structure_loss(s, u, beta=beta).item() == pytest.approx(sum(terms), abs=1e-5)
    assert structure_loss(s, u, "mean", beta).item() == pytest.approx(sum(terms) / len(terms), abs=1e-6)


def test_structure_loss_identical_rows_have_finite_hand_gradient():
    # rows 0 and 1 identical (a repeated caption): distance 0, whose derivative sqrt'(0) is undefined
    s = unit_rows(4, 3, seed=2)
    s[1] = s[0]
    s.requires_grad_(True)
    u = unit_rows(4, 3, seed=3)
    structure_loss(s, u).backward()
    assert torch.isfinite(s.grad).all()
    # expected: sum over pairs with d_ij > 0 of huber'(d_ij - t_ij) * (s_i - s_j) / d_ij; the zero pair adds 0
    x, t = s.detach().double().numpy(), u.double().numpy()
    expected = np.zeros_like(x)
    for i in range(4):
        for j in range(4):
            d = math.dist(x[i], x[j])
            if i != j and d > 0:
                residual = d - math.dist(t[i], t[j])
                expected[i] += np.clip(residual, -1.0, 1.0) * (x[i] - x[j]) / d
    torch.testing.assert_close(s.grad.double(), torch.from_numpy(expected), atol=1e-6, rtol=0)


def rows_with_duplicates(dtype: torch.dtype, seed: int) -> torch.Tensor:
    """(9, 7) rows, not unit length, with row 3 = row 0 and rows 5 = 6 = 8 (repeated captions)."""
    x = torch.randn(9, 7, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2
    x[3], x[6], x[8] = x[0], x[5], x[5]
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pairwise_distances_equal_pdist_values_and_gradients(dtype):
    x = rows_with_duplicates(dtype, seed=20)
    upstream = torch.randn(9 * 8 // 2, generator=torch.Generator().manual_seed(21), dtype=dtype)
    rows, cols = torch.triu_indices(9, 9, offset=1)  # pdist's pair order (0,1), (0,2), ..., (7,8)
    ours_x, pdist_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours = pairwise_distances(ours_x)
    reference = F.pdist(pdist_x)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(ours[rows, cols], reference, atol=tol, rtol=0)
    torch.testing.assert_close(ours, ours.T, atol=0, rtol=0)  # symmetric, exact zeros on the diagonal
    assert ours[0, 3] == 0 and ours[5, 8] == 0 and ours.diagonal().eq(0).all()
    (ours[rows, cols] * upstream).sum().backward()  # only the upper triangle carries gradient, as pdist's
    (reference * upstream).sum().backward()
    assert torch.isfinite(ours_x.grad).all()
    torch.testing.assert_close(ours_x.grad, pdist_x.grad, atol=10 * tol, rtol=0)
    # a gradient arriving on both triangles counts for the pair twice, as d_ij and d_ji are one distance
    full_x, twice_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    pairwise_distances(full_x).sum().backward()
    (2 * F.pdist(twice_x).sum()).backward()
    torch.testing.assert_close(full_x.grad, twice_x.grad, atol=10 * tol, rtol=0)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_structure_loss_equals_official_pdist_formula(reduction):
    # the official code: F.smooth_l1_loss(F.pdist(s), F.pdist(u)); with repeated rows in both batches
    s, u = rows_with_duplicates(torch.float32, seed=22), rows_with_duplicates(torch.float32, seed=23)
    ours_s, official_s = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    ours = structure_loss(ours_s, u, reduction, beta=0.5)
    official = F.smooth_l1_loss(F.pdist(official_s), F.pdist(u), beta=0.5, reduction=reduction)
    torch.testing.assert_close(ours, official, atol=1e-5, rtol=1e-6)
    ours.backward()
    official.backward()
    torch.testing.assert_close(ours_s.grad, official_s.grad, atol=1e-5, rtol=0)


def test_distillation_loss_combines_weighted_parts():
    s, u = unit_rows(5, 4, seed=4), unit_rows(5, 4, seed=5)
    total, parts = distillation_loss(s, u, ins_weight=0.5, struct_weight=3.0)
    ins = ((s - u) ** 2).sum().item()
    struct = sum(loop_structure_loss(s.double().numpy(), u.double().numpy(), 1.0))
    assert parts["instance"].item() == pytest.approx(ins, abs=1e-5)
    assert parts["structure"].item() == pytest.approx(struct, abs=1e-5)
    assert total.item() == pytest.approx(0.5 * ins + 3.0 * struct, abs=1e-5)
    total_mean, parts_mean = distillation_loss(s, u, reduction="mean")
    assert parts_mean["instance"].item() == pytest.approx(ins / 20, abs=1e-6)
    assert total_mean.item() == pytest.approx(ins / 20 + struct / 10, abs=1e-6)


def test_distillation_gradient_reaches_student_only():
    student = unit_rows(4, 3, seed=6).requires_grad_(True)
    teacher = unit_rows(4, 3, seed=7).requires_grad_(True)
    total, _ = distillation_loss(student, teacher)
    total.backward()
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_distillation_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        instance_loss(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="reduction"):
        structure_loss(torch.zeros(4, 3), torch.zeros(4, 3), reduction="none")


# -----------------------------------------------------------------------------
# ClipLoss

def test_clip_loss_hand_value():
    # orthonormal aligned pairs, tau = 1: each row softmax is (e, 1)/(e + 1) -> loss = log(1 + 1/e)
    eye = torch.eye(2)
    assert ClipLoss()(eye, eye, torch.tensor(1.0)).item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)


def test_clip_loss_matches_loops_and_open_clip():
    v, s, tau = unit_rows(6, 8, seed=8), unit_rows(6, 8, seed=9), torch.tensor(14.3)
    loss = ClipLoss()(v, s, tau)
    assert loss.item() == pytest.approx(loop_clip_loss(v.double().numpy(), s.double().numpy(), 14.3), abs=1e-5)
    torch.testing.assert_close(loss, open_clip_formula(v, s, tau), atol=1e-6, rtol=0)
    torch.testing.assert_close(ClipLoss()(s, v, tau), loss, atol=1e-6, rtol=0)  # symmetric in image/text


def test_clip_loss_near_zero_when_aligned_with_large_scale():
    v = unit_rows(5, 8, seed=10)  # off-diagonal cosines <= 0.48
    # orthonormal rows: log(1 + 4 e^-100) = 0 in fp32; random rows: each row's margin is >= 100 * 0.52
    assert ClipLoss()(torch.eye(5), torch.eye(5), torch.tensor(100.0)).item() < 1e-30
    assert ClipLoss()(v, v, torch.tensor(100.0)).item() < 1e-20
    assert ClipLoss()(v, v, torch.tensor(1.0)).item() > 0.5  # at tau = 1 the same features are far from 0


def test_clip_loss_gradients_and_fp32_under_autocast():
    v = unit_rows(6, 8, seed=11).requires_grad_(True)
    s = unit_rows(6, 8, seed=12).requires_grad_(True)
    tau = torch.tensor(20.0, requires_grad=True)
    reference = open_clip_formula(v.double(), s.double(), tau.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 matmul would be off by ~1e-2
        loss = ClipLoss()(v, s, tau)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference.item(), abs=1e-5)
    loss.backward()
    assert all(torch.isfinite(g).all() for g in (v.grad, s.grad, tau.grad))
    assert tau.grad.abs() > 0


def test_clip_loss_caches_labels_per_size():
    loss = ClipLoss()
    loss(unit_rows(4, 3, seed=0), unit_rows(4, 3, seed=1), 1.0)
    loss(unit_rows(3, 3, seed=0), unit_rows(3, 3, seed=1), 1.0)
    assert sorted(k[1] for k in loss.labels) == [3, 4]
    assert torch.equal(loss.get_labels(torch.device("cpu"), 3), torch.arange(3))


def test_splice_micro_batch_accumulation_gives_full_batch_gradient():
    # linear "encoders"; 3 micro-batches of 2 pairs: open_clip's two-pass accumulation vs. one big batch
    images, texts = torch.randn(6, 5), torch.randn(6, 4)
    image_proj, text_proj = nn.Linear(5, 3), nn.Linear(4, 3)
    log_tau = torch.tensor(2.0, requires_grad=True)

    def encode(x, y):
        return F.normalize(image_proj(x), dim=-1), F.normalize(text_proj(y), dim=-1)

    loss_fn = ClipLoss()
    loss_fn(*encode(images, texts), log_tau.exp()).backward()
    full = [p.grad.clone() for p in (*image_proj.parameters(), *text_proj.parameters(), log_tau)]
    for p in (*image_proj.parameters(), *text_proj.parameters(), log_tau):
        p.grad = None

    chunks = list(zip(images.chunk(3), texts.chunk(3)))
    with torch.no_grad():
        cached = [encode(x, y) for x, y in chunks]  # first pass: every micro-batch, no graph
    cached_images, cached_texts = [c[0] for c in cached], [c[1] for c in cached]
    for j, (x, y) in enumerate(chunks):  # second pass: recompute micro-batch j with grad
        v, s = encode(x, y)
        loss_fn(splice_micro_batch(cached_images, j, v), splice_micro_batch(cached_texts, j, s),
                log_tau.exp()).backward()
    accumulated = [p.grad for p in (*image_proj.parameters(), *text_proj.parameters(), log_tau)]
    for a, f in zip(accumulated[:-1], full[:-1]):
        torch.testing.assert_close(a, f, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(accumulated[-1], 3 * full[-1], atol=1e-6, rtol=1e-5)  # logit_scale: once per step


# -----------------------------------------------------------------------------
# ClipLoss across 2 gloo processes

DDP_CONFIGS = [(True, False), (True, True), (False, False)]  # (gather_with_grad, local_loss)


def _ddp_worker(rank, world_size, init_method, image, text, tau, out_dir):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        rows = slice(rank * len(image) // world_size, (rank + 1) * len(image) // world_size)
        results = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for gather_with_grad, local_loss in DDP_CONFIGS:
                v = image[rows].clone().requires_grad_(True)
                s = text[rows].clone().requires_grad_(True)
                scale = tau.clone().requires_grad_(True)
                loss = ClipLoss(local_loss, gather_with_grad, rank, world_size)(v, s, scale)
                loss.backward()
                results[(gather_with_grad, local_loss)] = (loss.detach(), v.grad, s.grad, scale.grad)
            # the bare gather: rank r's loss weighs the gathered rows by (r + 1) * image, so row i's gradient
            # summed over ranks is (1 + 2) * image[i] whichever rank owns it
            x = image[rows].clone().requires_grad_(True)
            gathered = all_gather_with_grad(x)
            (gathered * image * (rank + 1)).sum().backward()
            results["gather"] = (gathered.detach(), x.grad)
        results["warnings"] = [str(w.category.__name__) + ": " + str(w.message) for w in caught
                               if issubclass(w.category, (FutureWarning, DeprecationWarning))]
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    os._exit(0)  # no interpreter teardown, where gloo can abort a finished rank (distributed.exit_torchrun_rank)


def test_clip_loss_two_process_gloo_matches_single_process(tmp_path):
    world_size = 2
    image, text, tau = unit_rows(8, 6, seed=13), unit_rows(8, 6, seed=14), torch.tensor(10.0)
    mp.spawn(_ddp_worker, args=(world_size, f"file://{tmp_path}/rendezvous", image, text, tau, str(tmp_path)),
             nprocs=world_size, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]

    v, s, scale = (x.clone().requires_grad_(True) for x in (image, text, tau))
    full_loss = ClipLoss()(v, s, scale)
    full_loss.backward()

    for r in ranks:
        assert r["warnings"] == []  # torch.distributed.nn.all_gather warned on every call
        torch.testing.assert_close(r["gather"][0], image, atol=0, rtol=0)  # all rows, in rank order
    torch.testing.assert_close(torch.cat([r["gather"][1] for r in ranks]), 3 * image, atol=1e-6, rtol=0)
    for config in DDP_CONFIGS:
        gather_with_grad, local_loss = config
        losses, image_grads, text_grads, tau_grads = zip(*(r[config] for r in ranks))
        # local_loss: the ranks' losses average to the global one; otherwise each rank has the global loss
        for loss in ([torch.stack(losses).mean()] if local_loss else losses):
            torch.testing.assert_close(loss, full_loss.detach(), atol=1e-6, rtol=0)
        # gather_with_grad: each rank's rows get world_size x the global gradient, which DDP's mean undoes;
        # without it each rank's rows get exactly the global gradient (DDP's mean then scales by 1/world_size)
        factor = world_size if gather_with_grad else 1
        torch.testing.assert_close(torch.cat(image_grads) / factor, v.grad, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.cat(text_grads) / factor, s.grad, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.stack(tau_grads).mean(), scale.grad, atol=1e-5, rtol=0)


# -----------------------------------------------------------------------------
# EMA teacher and logit-scale clamp

class TinyEncoder(nn.Module):
    def __init__(self, weight, bias, count):
        super().__init__()
        self.proj = nn.Linear(2, 1)
        with torch.no_grad():
            self.proj.weight.copy_(torch.tensor([weight]))
            self.proj.bias.copy_(torch.tensor([bias]))
        self.register_buffer("count", torch.tensor(count))


def test_ema_update_hand_values():
    teacher, student = TinyEncoder([1.0, 2.0], 0.5, 3), TinyEncoder([3.0, -2.0], 1.5, 7)
    ema_update(teacher, student, momentum=0.9)
    # 0.9 * t + 0.1 * s
    torch.testing.assert_close(teacher.proj.weight, torch.tensor([[1.2, 1.6]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(teacher.proj.bias, torch.tensor([0.6]), atol=1e-6, rtol=0)
    assert teacher.count.item() == 7  # buffers copied
    assert student.proj.weight.tolist() == [[3.0, -2.0]]  # student untouched


def test_ema_update_foreach_equals_per_tensor_lerp():
    torch.manual_seed(30)
    teacher = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3, bias=False))
    student = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3, bias=False))
    with torch.no_grad():
        expected = [t.clone().lerp_(s, 1.0 - 0.97) for t, s in zip(teacher.parameters(), student.parameters())]
    ema_update(teacher, student, momentum=0.97)
    for param, want in zip(teacher.parameters(), expected):
        assert torch.equal(param, want)  # same kernel arithmetic: bitwise equal to the per-tensor loop


def test_ema_update_momentum_one_freezes_teacher():
    teacher, student = TinyEncoder([1.0, 2.0], 0.5, 3), TinyEncoder([3.0, -2.0], 1.5, 7)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, momentum=1.0)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    with pytest.raises(ValueError, match="momentum"):
        ema_update(teacher, student, momentum=1.5)
    with pytest.raises(ValueError, match="counterpart"):
        ema_update(teacher, nn.Linear(2, 1), momentum=0.5)


def test_clamp_logit_scale():
    for start, expected in [(5.0, math.log(100)), (-1.0, 0.0), (2.0, 2.0)]:
        param = nn.Parameter(torch.tensor(start))
        out = clamp_logit_scale_(param)
        assert out is param and param.item() == pytest.approx(expected, abs=1e-6)
    param = nn.Parameter(torch.tensor(3.0))
    assert clamp_logit_scale_(param, max_log=1.0).item() == 1.0
