"""The two ProCLIP training stages as loss functions over a batch, with contrastive-aware accumulation.

Stage 1, representation inheritance (paper section 3.2): the frozen CLIP text encoder teaches LLM+head.
    L = w_ins · (L_ins(short) + L_ins(long)) + w_struct · L_struct(short)
  as in the official `train_one_epoch_stage1`: the instance term on every caption set of the batch, the
  structure term on the short captions. The teacher sees each caption cut to its 77-token window; the student
  (the cached LLM embedding) sees it whole.
Stage 2, contrastive tuning (paper section 3.3): the image encoder trains against LLM+head.
    L = InfoNCE(v, s) + λ · (w_ins · L_ins(v, v̂) + w_struct · L_struct(v, v̂))
  where v̂ are the features of a frozen (or EMA) copy of the initial image encoder.

Accumulation (`accum_freq` > 1, open_clip's scheme): a first no-grad pass computes every micro-batch's features;
then each micro-batch is recomputed with gradient and the loss is taken over the whole batch with the other
micro-batches' cached features, so negatives and pairwise distances still cover the full batch and the summed
gradient equals the full-batch one. The temperature gets its gradient in the last micro-batch only (open_clip
counts it once per micro-batch, i.e. accum_freq times too much).
"""

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn

from .losses import ClipLoss, distillation_loss, instance_loss, splice_micro_batch, structure_loss


@dataclass
class LossSettings:
    ins_weight: float = 1.0  # w_ins
    struct_weight: float = 1.0  # w_struct
    reg_weight: float = 1.0  # λ, stage 2 only (not published; reported with every result)
    reduction: str = "sum"  # the official code's; "mean" makes the loss scale independent of the batch size
    gather_with_grad: bool = False  # distillation terms over the global batch too (else per device, as official)
    local_loss: bool = False  # InfoNCE: score local rows against all (open_clip --local-loss)


def gather_rows(features: torch.Tensor, settings: LossSettings) -> torch.Tensor:
    """All ranks' rows with gradient when `--gather-with-grad` under torchrun; the local rows otherwise."""
    if settings.gather_with_grad and dist.is_initialized() and dist.get_world_size() > 1:
        return torch.cat(torch.distributed.nn.all_gather(features.contiguous()), dim=0)
    return features


def stage1_loss(f: dict, settings: LossSettings) -> tuple[torch.Tensor, dict]:
    """Stage-1 loss from features {student_short, teacher_short, student_long, teacher_long}, each (B_k, D)."""
    s, u = gather_rows(f["student_short"], settings), gather_rows(f["teacher_short"], settings)
    ins = instance_loss(s, u, settings.reduction)
    struct = structure_loss(s, u, settings.reduction) if s.shape[0] > 1 else s.new_zeros(())
    if f["student_long"].shape[0] > 0:  # rows with a long caption: instance term only, as the official code
        ins = ins + instance_loss(gather_rows(f["student_long"], settings), gather_rows(f["teacher_long"], settings),
                                  settings.reduction)
    total = settings.ins_weight * ins + settings.struct_weight * struct
    return total, {"ins": ins.detach(), "struct": struct.detach()}


def stage2_loss(f: dict, settings: LossSettings, clip_loss: ClipLoss, logit_scale: torch.Tensor,
                last: bool = True) -> tuple[torch.Tensor, dict]:
    """Stage-2 loss from features {image, text, teacher_image}, each (B, D); `logit_scale` is the log."""
    scale = (logit_scale if last else logit_scale.detach()).exp()
    contrastive = clip_loss(f["image"], f["text"], scale)
    reg, parts = distillation_loss(gather_rows(f["image"], settings), gather_rows(f["teacher_image"], settings),
                                   settings.ins_weight, settings.struct_weight, settings.reduction)
    total = contrastive + settings.reg_weight * reg
    return total, {"contrastive": contrastive.detach(), "reg": reg.detach(),
                   "reg_ins": parts["instance"], "reg_struct": parts["structure"], "scale": scale.detach()}


def accumulated_backward(micro_batches: list, features_fn, loss_fn, no_sync=contextlib.nullcontext,
                         backward=torch.Tensor.backward):
    """Backward of the full-batch loss over `micro_batches`, never holding more than one micro-batch's graph.

    features_fn(micro_batch, student_only) -> dict of (B_j, D) features; with student_only=True it may skip
    the no-grad teacher features (they are reused from the first pass). loss_fn(features, last) -> (loss, parts).
    `no_sync` is DDP's context that defers the gradient all-reduce to the last backward; `backward(loss)` lets
    a GradScaler scale the loss first (fp16).
    Returns the loss and its parts (detached).
    """
    if len(micro_batches) == 1:
        loss, parts = loss_fn(features_fn(micro_batches[0], False), True)
        backward(loss)
        return loss.detach(), parts
    with torch.no_grad():
        cached = [features_fn(mb, False) for mb in micro_batches]
    for j, micro_batch in enumerate(micro_batches):
        fresh = features_fn(micro_batch, True)
        spliced = {key: splice_micro_batch([c[key] for c in cached], j, fresh[key]) if key in fresh
                   else torch.cat([c[key] for c in cached]) for key in cached[0]}
        last = j == len(micro_batches) - 1
        loss, parts = loss_fn(spliced, last)
        with contextlib.nullcontext() if last else no_sync():
            backward(loss)
    return loss.detach(), parts
