"""Stage 2's sigmoid loss (`--loss sigmoid`): losses.SigmoidLoss against open_clip's SigLipLoss in value and in
gradients, on 1 rank and across 2 and 3 gloo processes (3 sends an odd number of hops, where open_clip's default
"bidir" exchange ends with a one-way hop), and a stage-2 run that trains SigLIP's bias b."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from miniproclip.losses import SigmoidLoss

open_clip_loss = pytest.importorskip("open_clip.loss")  # conftest.py makes open_clip importable on a CPU torch


def unit_rows(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def loss_and_grads(loss_fn, image, text, scale, bias):
    """(loss, d/d image, d/d text, d/d scale, d/d bias) of loss_fn on fresh leaf copies."""
    leaves = [x.clone().requires_grad_(True) for x in (image, text, scale, bias)]
    loss = loss_fn(*leaves)
    loss.backward()
    return [loss.detach()] + [x.grad for x in leaves]


def test_one_rank_equals_open_clip_and_the_formula():
    image, text = unit_rows(6, 8, seed=1), unit_rows(6, 8, seed=2)
    scale, bias = torch.tensor(10.0), torch.tensor(-3.0)
    ours = loss_and_grads(SigmoidLoss(), image, text, scale, bias)
    reference = loss_and_grads(open_clip_loss.SigLipLoss(), image, text, scale, bias)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # the formula by hand: -(1/B) Σ_ij log σ(z_ij (t·cos_ij + b)), z = +1 on the diagonal, -1 elsewhere
    z = 2 * torch.eye(6) - 1
    by_hand = -F.logsigmoid(z * (10.0 * image @ text.T - 3.0)).sum() / 6
    torch.testing.assert_close(ours[0], by_hand, atol=1e-6, rtol=1e-6)
    assert ours[0].item() > 1.0  # a real value (random features), not a degenerate zero


def _ranks_worker(rank, world_size, init_method, image, text, scale, bias, out_dir):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        rows = slice(rank * len(image) // world_size, (rank + 1) * len(image) // world_size)
        results = {"ours": loss_and_grads(SigmoidLoss(rank, world_size), image[rows], text[rows], scale, bias)}
        for impl in ("bidir", "shift"):
            reference = open_clip_loss.SigLipLoss(rank=rank, world_size=world_size, dist_impl=impl)
            results[impl] = loss_and_grads(reference, image[rows], text[rows], scale, bias)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    os._exit(0)  # no interpreter teardown, where gloo can abort a finished rank (distributed.exit_torchrun_rank)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_exchange_texts_as_open_clip(tmp_path, world_size):
    n = 4 * world_size
    image, text = unit_rows(n, 8, seed=3), unit_rows(n, 8, seed=4)
    scale, bias = torch.tensor(7.0), torch.tensor(-2.0)
    mp.spawn(_ranks_worker, args=(world_size, f"file://{tmp_path}/rendezvous", image, text, scale, bias,
                                  str(tmp_path)), nprocs=world_size, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    for r in ranks:  # per rank: loss, its rows' gradients and the scale/bias gradients, as open_clip's both ways
        for impl in ("bidir", "shift"):
            for a, b in zip(r["ours"], r[impl]):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # each rank scores its B images against all N texts, normalised by its B: weighted by B/N, the ranks' losses
    # and the gradients that came back through the ring are the one-process loss over the global batch
    full = loss_and_grads(SigmoidLoss(), image, text, scale, bias)
    share = (n // world_size) / n
    torch.testing.assert_close(sum(r["ours"][0] for r in ranks) * share, full[0], atol=1e-5, rtol=1e-5)
    for grad in (1, 2):  # d/d image rows, d/d text rows (each rank's texts get every rank's loss through the ring)
        torch.testing.assert_close(torch.cat([r["ours"][grad] for r in ranks]) * share, full[grad], atol=1e-6,
                                   rtol=1e-5)


def test_stage2_with_the_sigmoid_loss_trains_the_bias_and_loads_and_resumes(world, tmp_path):
    """train.py --stage 2 --loss sigmoid on the tiny CLIP: b starts at -10 and t at log 10 (a CLIP folder has no
    SigLIP bias), both train unclamped, the checkpoint loads through load_model and resumes to the same step."""
    import math

    import train
    from miniproclip import checkpoint as ckpt
    from miniproclip import load_model
    from fixtures import common, losses
    flags = ["--stage", "2", "--init", "scratch", "--loss", "sigmoid", "--precision", "fp32", "--lr", "1e-2"]
    train.main([*flags, *common(world, tmp_path / "s2", "--max-steps", "4")])
    records = losses(tmp_path / "s2")
    assert records[1]["scale"] == pytest.approx(10.0, rel=1e-6)  # exp(log 10): the SigLIP init, not CLIP's 100
    weights, meta = ckpt.load_weights(ckpt.resolve_checkpoint(str(tmp_path / "s2")))
    assert meta["config"]["loss"]["contrastive_loss"] == "sigmoid"
    assert weights["logit_bias"].item() != pytest.approx(-10.0, abs=1e-3)  # b trained (4 Adam steps of ~1e-2)
    assert abs(weights["logit_bias"].item() + 10.0) < 0.1 and abs(weights["logit_scale"].item() - math.log(10)) < 0.1
    trained = load_model(str(tmp_path / "s2"), device="cpu")
    assert trained.model.logit_bias.item() == weights["logit_bias"].item()
    train.main([*flags, *common(world, tmp_path / "s2", "--max-steps", "5", "--resume", "latest")])
    assert sorted(losses(tmp_path / "s2")) == [1, 2, 3, 4, 5]
    # the export is a plain CLIP folder (CLIPModel has no bias), whose image features are the run's
    from miniproclip.export import export
    export(str(tmp_path / "s2"), str(tmp_path / "out"))
    exported = load_model(str(tmp_path / "out"), device="cpu")
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported.model.encode_image(pixels), load_model(
            str(tmp_path / "s2"), device="cpu").model.encode_image(pixels), atol=1e-6, rtol=1e-5)
