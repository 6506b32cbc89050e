"""The two ProCLIP training stages: each stage's features and loss in one class, and contrastive-aware accumulation.

Stage 1, representation inheritance (paper section 3.2): the frozen CLIP text encoder teaches LLM+head.
    L = w_ins · (L_ins(short) + L_ins(long)) + w_struct · L_struct(short)
  as in the official `train_one_epoch_stage1`: the instance term on every caption set of the batch, the
  structure term on the short captions. The teacher sees each caption cut to its 77-token window; the student
  (the cached LLM embedding) sees it whole.
Stage 2, contrastive tuning (paper section 3.3): the image encoder trains against LLM+head.
    L = InfoNCE(v, s) + λ · (w_ins · L_ins(v, v̂) + w_struct · L_struct(v, v̂))
  where v̂ are the features of a frozen (or EMA) copy of the initial image encoder.

Under torchrun, InfoNCE sees the global batch (open_clip's gather). L_reg is per device by default, as in the
official code: DDP then applies λ · (1/W) Σ_r L_reg(rank r's rows), i.e. with the "sum" reduction the instance
term weighs 1/W of what it weighs on one device holding the global batch. `reg_scope="global"` computes L_reg
over the gathered global batch instead, so W ranks × B rows train exactly like one device × W·B rows.

Accumulation (`accum_freq` > 1, open_clip's scheme): a first no-grad pass computes every micro-batch's features;
then each micro-batch is recomputed with gradient and the loss is taken over the whole batch with the other
micro-batches' cached features, so negatives and pairwise distances still cover the full batch and the summed
gradient equals the full-batch one. The temperature gets its gradient in the last micro-batch only (open_clip
counts it once per micro-batch, i.e. accum_freq times too much).

Each stage's frozen-teacher features come from one method, `teacher_features`: stage 1 reads CLIP's text features
from their cache, stage 2 reads its frozen teacher's image features from theirs where the crop is deterministic.
"""

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..losses import ClipLoss, SigmoidLoss, all_gather_with_grad, clamp_logit_scale_, distillation_loss, ema_update, \
    instance_loss, splice_micro_batch, structure_loss
from ..model import ProCLIP
from .teacher_cache import RowVectors


class Stage(Protocol):
    """What the training loop (loop.py) runs. Stages 0 (stage0.Stage0), 1 and 2 (below) implement it, each built from the
    settings by its setup function (stage0.setup_stage0, build.setup_clip_stage), which also loads a resumed run's
    weights and wraps the forward for DDP and torch.compile (`wrap_forward`). A step is: `prepare` the collated
    batch, `accumulated_backward` over its micro-batches with `features` and `loss`, the optimizer step, then
    `after_step`."""
    model: nn.Module  # what trains, unwrapped: the optimizer's parameters, checkpoints, validation
    dataset: torch.utils.data.Dataset  # the loader's items, one per data row (or group): {"index": i, ...}
    sources: list[int] | None  # a source id per row, where a batch must hold one source's rows (stage 0)
    no_sync: Callable  # DDP's context deferring the gradient all-reduce (a null context on one process)
    lr_of: Callable[[str], tuple[str, float]]  # parameter name -> (AdamW group, peak learning rate)
    # --eval-every's measure of the model as it is now, {"val/<name>": value}; None where the stage has none
    validate: Callable[[], dict[str, float]] | None

    def prepare(self, batch: dict, epoch: int) -> dict:
        """A collated batch (loader.collate) -> what `features` takes, e.g. which caption each row shows."""

    def features(self, micro_batch: dict, student_only: bool) -> dict[str, torch.Tensor]:
        """Row-aligned features; `student_only` may skip the no-grad teacher's (accumulation reuses them)."""

    def loss(self, features: dict[str, torch.Tensor], last: bool) -> tuple[torch.Tensor, dict]:
        """(loss, its detached parts); `last`: the final micro-batch (the temperature's gradient is taken there)."""

    def after_step(self) -> None:
        """After the optimizer step (stage 2: clamp the temperature, move an EMA teacher)."""

    def counters(self) -> dict[str, int]:
        """Running counts for the log record (e.g. captions the teacher saw cut)."""

    def checkpoint_weights(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint holds: what trained (stage 0 its adapters, stage 1 its head)."""

    def finish(self, log) -> tuple[dict[str, float], str]:
        """The end of a completed run (stage 0: validation, the merged LLM): (final measures, the next command)."""


def wrap_forward(module: nn.Module, world: int, compile: bool, dynamic: bool | None = None):
    """(forward, no_sync): `module` wrapped for the forward passes of training, DDP under torchrun, then
    torch.compile with --compile (`dynamic` shapes where row counts or text lengths vary); no_sync is DDP's context
    deferring the gradient all-reduce, a null context on one process."""
    forward = torch.nn.parallel.DistributedDataParallel(module) if world > 1 else module
    no_sync = forward.no_sync if world > 1 else contextlib.nullcontext
    return (torch.compile(forward, dynamic=dynamic) if compile else forward), no_sync


def attention_for_training(device, grad_checkpointing: bool = False) -> contextlib.AbstractContextManager:
    """SDPA's math kernel (matmul, softmax, matmul) while training on a CPU: the fused CPU kernel's backward is the
    slowest part of a step at caption lengths and at the toy tower's 65 tokens of 16-wide heads, most of all
    under bf16 (bench/precision.py, BENCHMARKS.md). The kernel is chosen in the forward; the backward follows it.
    Inference keeps the fused kernel, the faster one there; so does gradient checkpointing, whose recomputation
    runs in the backward, outside this context, and must save what the forward saved."""
    cpu_training = torch.device(device).type == "cpu" and torch.is_grad_enabled() and not grad_checkpointing
    return sdpa_kernel(SDPBackend.MATH) if cpu_training else contextlib.nullcontext()


@dataclass(kw_only=True)
class LossSettings:
    ins_weight: float = 1.0  # w_ins
    struct_weight: float = 1.0  # w_struct
    reg_weight: float = 1.0  # λ, stage 2 only (not published; reported with every result)
    reduction: str = "sum"  # the official code's; "mean" makes the loss scale independent of the batch size
    gather_with_grad: bool = False  # InfoNCE and the stage-1 terms over the global batch (open_clip's flag)
    local_loss: bool = False  # InfoNCE: score local rows against all (open_clip --local-loss)
    reg_scope: str = "device"  # L_reg over this device's rows (official) or the gathered "global" batch
    ema_momentum: float = 1.0  # stage 2: L_reg's teacher = EMA of the image tower; 1 keeps the initial one
    skip_truncated_long: bool = False  # stage 1: long captions the 77-token teacher sees cut leave L_ins
    temperature: float | None = None  # stage 0's InfoNCE τ
    contrastive_loss: str = "clip"  # stage 2: "clip" (InfoNCE, losses.ClipLoss) or "sigmoid" (SigLIP's, SigmoidLoss)


# -----------------------------------------------------------------------------
# gathering rows across ranks (same collectives, same shapes on every rank)

def distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def gather_rows(features: torch.Tensor, across_ranks: bool) -> torch.Tensor:
    """All ranks' rows with gradient when `across_ranks` under torchrun; the local rows otherwise."""
    return all_gather_with_grad(features) if across_ranks and distributed() else features


def gather_padded(features: torch.Tensor, capacity: int, across_ranks: bool) -> torch.Tensor:
    """Like gather_rows for a row count that differs between ranks, up to `capacity` (equal on every rank).

    Every rank pads its rows to `capacity` and gathers rows and a validity mask, so the collectives and their
    shapes are the same everywhere (an all_gather of unequal sizes aborts gloo and hangs NCCL); the padding rows
    are then dropped, leaving the valid rows in rank order.
    """
    if not (across_ranks and distributed()):
        return features
    padded = features.new_zeros(capacity, features.shape[1])  # (capacity, D)
    padded = torch.cat([features, padded[features.shape[0]:]])  # keeps the rows' autograd history
    valid = torch.arange(capacity, device=features.device) < features.shape[0]  # (capacity,) bool
    return all_gather_with_grad(padded)[all_gather_with_grad(valid.to(features.dtype)).bool()]


# -----------------------------------------------------------------------------
# the stage losses over a batch's features

def stage1_loss(f: dict, settings: LossSettings) -> tuple[torch.Tensor, dict]:
    """Stage-1 loss from features {student_short, teacher_short, student_long, teacher_long}, each (B_k, D).

    There are at most as many long captions as short ones (one per row), so `len(short)` bounds their count on
    every rank; the branch on the long set is taken on the gathered count, which all ranks share.
    """
    across, rows = settings.gather_with_grad, f["student_short"].shape[0]
    s, u = gather_rows(f["student_short"], across), gather_rows(f["teacher_short"], across)
    ins = instance_loss(s, u, settings.reduction)
    struct = structure_loss(s, u, settings.reduction) if s.shape[0] > 1 else s.new_zeros(())
    s_long = gather_padded(f["student_long"], rows, across)
    u_long = gather_padded(f["teacher_long"], rows, across)
    if s_long.shape[0] > 0:  # rows with a long caption: instance term only, as the official code
        ins = ins + instance_loss(s_long, u_long, settings.reduction)
    total = settings.ins_weight * ins + settings.struct_weight * struct
    return total, {"ins": ins.detach(), "struct": struct.detach()}


def stage2_loss(f: dict, settings: LossSettings, contrastive_loss: ClipLoss | SigmoidLoss, logit_scale: torch.Tensor,
                last: bool = True, teacher_may_be_unknown: bool = False,
                logit_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Stage-2 loss from features {image, text, teacher_image}, each (B, D); `logit_scale` is the log, and
    `logit_bias` the sigmoid loss's b (None for InfoNCE).

    teacher_may_be_unknown: the teacher's features come from the image cache, where a row is NaN if its image
    could not be read when the cache was filled (teacher_cache.py). L_reg then leaves such rows out; the
    contrastive loss keeps them (the image was read for this step). Masking costs a host sync, so the caller
    asks for it only when it saw such a row (Stage2.loss).
    """
    scale = (logit_scale if last else logit_scale.detach()).exp()
    if logit_bias is None:
        contrastive = contrastive_loss(f["image"], f["text"], scale)
    else:  # as the scale, b gets its gradient once, from the last micro-batch's pass
        contrastive = contrastive_loss(f["image"], f["text"], scale, logit_bias if last else logit_bias.detach())
    across = settings.reg_scope == "global"
    image, teacher = gather_rows(f["image"], across), gather_rows(f["teacher_image"], across)  # (B or W·B, D)
    if teacher_may_be_unknown:
        known = ~torch.isnan(teacher[:, 0])  # (B or W·B,) rows with a cached v̂
        image, teacher = image[known], teacher[known]
    if image.shape[0] > 1:
        reg, parts = distillation_loss(image, teacher, settings.ins_weight, settings.struct_weight, settings.reduction)
    else:  # a v̂ for one row or none: no pairs, and "mean" over nothing is NaN; no L_reg this step
        reg = image.new_zeros(())
        parts = {"instance": reg, "structure": reg}
    total = contrastive + settings.reg_weight * reg
    return total, {"contrastive": contrastive.detach(), "reg": reg.detach(),
                   "reg_ins": parts["instance"], "reg_struct": parts["structure"], "scale": scale.detach()}


def split(batch, parts):
    """A collated batch -> `parts` micro-batches of (nearly) equal size."""
    n = len(batch["indices"])
    # micro-batch j holds rows [round(j·n/parts), round((j+1)·n/parts)); the bad-image list stays with the batch
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [{k: v[a:b] for k, v in batch.items() if v is not None and k != "bad_images"}
            for a, b in zip(bounds, bounds[1:])]


def accumulated_backward(micro_batches: list, features_fn, loss_fn, no_sync=contextlib.nullcontext,
                         backward=torch.Tensor.backward):
    """Backward of the full-batch loss over `micro_batches`, never holding more than one micro-batch's graph.

    features_fn(micro_batch, student_only) -> dict of (B_j, D) features; with student_only=True it may skip
    the no-grad teacher features (they are reused from the first pass). loss_fn(features, last) -> (loss, parts).
    `no_sync` is DDP's context that defers the gradient all-reduce to the last backward: the forward of the
    other micro-batches must run inside it too, or DDP expects their gradients in this step's reduction.
    `backward(loss)` lets a GradScaler scale the loss first (fp16). Returns the loss and its parts (detached).
    """
    if len(micro_batches) == 1:
        loss, parts = loss_fn(features_fn(micro_batches[0], False), True)
        backward(loss)
        return loss.detach(), parts
    with torch.no_grad():
        cached = [features_fn(mb, False) for mb in micro_batches]
    for j, micro_batch in enumerate(micro_batches):
        last = j == len(micro_batches) - 1
        with contextlib.nullcontext() if last else no_sync():  # one gradient all-reduce per step, in the last
            fresh = features_fn(micro_batch, True)
            spliced = {key: splice_micro_batch([c[key] for c in cached], j, fresh[key]) if key in fresh
                       else torch.cat([c[key] for c in cached]) for key in cached[0]}
            loss, parts = loss_fn(spliced, last)
            backward(loss)
    return loss.detach(), parts


# -----------------------------------------------------------------------------
# the stages: what a micro-batch's features are, and the loss over them

class HeadOnly(nn.Module):
    """ProCLIP's text side alone, the part stage 1 trains: DDP and torch.compile wrap this, so the image tower
    need not be on the device. It shares the model's head (same parameter names, `text_head.*`)."""

    def __init__(self, model: ProCLIP):
        super().__init__()
        self.text_head = model.text_head

    def forward(self, llm_embeddings: torch.Tensor) -> torch.Tensor:
        return ProCLIP.encode_text(self, llm_embeddings)  # encode_text reads self.text_head only


class ClipStage:
    """What stages 1 and 2 share as Stages: the model and its data, the loop's hooks and the run's next command."""

    def __init__(self, *, model: ProCLIP, forward, no_sync, dataset, lr_of, validate, next_command: str,
                 llm_vectors: RowVectors, device, autocast, loss_settings: LossSettings, grad_checkpointing: bool = False):
        self.model, self.forward, self.no_sync, self.dataset, self.sources = model, forward, no_sync, dataset, None
        self.lr_of, self.validate, self.next_command = lr_of, validate, next_command
        self.llm_vectors, self.device, self.autocast, self.loss_settings = llm_vectors, device, autocast, loss_settings
        self.grad_checkpointing = grad_checkpointing  # of the image tower: keeps the fused attention kernel
        self.teacher_truncated = 0  # captions the 77-token text teacher saw cut (stage 1; logged)
        self.teacher_unknown = 0  # rows whose cached v̂ is NaN (stage 2: image unreadable when cached; logged)

    def counters(self) -> dict[str, int]:
        return {"teacher_truncated": self.teacher_truncated, "teacher_unknown": self.teacher_unknown}

    def finish(self, log) -> tuple[dict[str, float], str]:
        return {}, self.next_command


class Stage1(ClipStage):
    """Representation inheritance: the head learns to map cached LLM embeddings onto CLIP's text features.

    Both come from caches (teacher_cache.py), mapped to data rows at setup: a step gathers them by row index and
    runs the head alone. The teacher's vectors carry a last column, 1 where the teacher saw the caption cut.
    """

    def __init__(self, *, teacher_vectors: RowVectors, skip_truncated_long: bool, **shared):
        super().__init__(**shared)
        self.teacher_vectors, self.skip_truncated_long = teacher_vectors, skip_truncated_long

    def prepare(self, batch: dict, epoch: int) -> dict:
        return batch  # both caption sets are used

    def teacher_features(self, index: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """CLIP's cached text features (CPU, (B + L, D + 1): the cut flag last) of the rows' short captions, then
        of their L long ones, and which long ones enter the loss."""
        short, long_ = self.teacher_vectors.rows[index, 0], self.teacher_vectors.rows[index, 1]
        taught = self.teacher_vectors.cache.stored(np.concatenate([short, long_[long_ >= 0]]))
        keep_long = np.ones(len(taught) - len(index), dtype=bool)
        if self.skip_truncated_long:  # a cut caption's target describes its first 77 tokens only
            keep_long = taught[len(index):, -1].numpy() == 0
        return taught, keep_long

    def features(self, micro_batch: dict, student_only: bool) -> dict:
        index = np.asarray(micro_batch["indices"])  # the micro-batch's data rows
        taught, keep_long = self.teacher_features(index)
        short, long_ = self.llm_vectors.rows[index, 0], self.llm_vectors.rows[index, 1]
        llm_rows = np.concatenate([short, long_[long_ >= 0][keep_long]])  # (B + kept L,) LLM cache rows
        with self.autocast:
            student = self.forward(self.llm_vectors.to_device(llm_rows, self.device))
        f = {"student_short": student[:len(index)], "student_long": student[len(index):]}
        if not student_only:
            taught = taught[torch.from_numpy(np.concatenate([np.ones(len(index), dtype=bool), keep_long]))]
            self.teacher_truncated += int(taught[:, -1].sum())
            taught = self.teacher_vectors.upload(taught[:, :-1], self.device)  # (B + kept L, D) float32, L2-normalised
            f["teacher_short"], f["teacher_long"] = taught[:len(index)], taught[len(index):]
        return f

    def loss(self, features: dict, last: bool) -> tuple[torch.Tensor, dict]:
        return stage1_loss(features, self.loss_settings)

    def after_step(self) -> None:
        pass  # nothing but the head changes

    def checkpoint_weights(self) -> dict[str, torch.Tensor]:
        """The head only: the image tower is CLIP's, unchanged."""
        return {f"text_head.{k}": v for k, v in self.model.text_head.state_dict().items()}


class Stage2(ClipStage):
    """Contrastive tuning: the image tower and temperature learn against LLM+head, with L_reg to the teacher.

    A frozen teacher shown a fixed crop reads its features from a cache (`teacher_vectors`); otherwise (EMA, or
    random crops) it runs live on the micro-batch's pixels.
    """

    def __init__(self, *, teacher, teacher_vectors: RowVectors | None, contrastive_loss: ClipLoss | SigmoidLoss,
                 ema_momentum: float, long_prob: float, seed: int, **shared):
        super().__init__(**shared)
        self.teacher, self.teacher_vectors, self.contrastive_loss = teacher, teacher_vectors, contrastive_loss
        self.ema_momentum, self.long_prob, self.seed = ema_momentum, long_prob, seed
        self.unknown_in_step = False  # a NaN v̂ in this step's micro-batches (known on the host, no sync)
        self.pick_long, self.coins_epoch = None, None  # this epoch's coin per row: show the long caption?

    def prepare(self, batch: dict, epoch: int) -> dict:
        """Per sample, the short or the long caption at random (the official loader): its LLM cache row. The coins
        are drawn per row and epoch, so the choice does not depend on how rows are split over ranks or resumes."""
        if epoch != self.coins_epoch:
            coins = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self.pick_long = (torch.rand(len(self.dataset), generator=coins) < self.long_prob).numpy()
            self.coins_epoch = epoch
        index = np.asarray(batch["indices"], dtype=np.int64)
        short, long_ = self.llm_vectors.rows[index, 0], self.llm_vectors.rows[index, 1]
        batch["text_rows"] = np.where((long_ >= 0) & self.pick_long[index], long_, short)  # (B,)
        self.unknown_in_step = False  # a new step
        return batch

    @torch.no_grad()
    def teacher_features(self, micro_batch: dict, pixels: torch.Tensor) -> torch.Tensor:
        """The frozen (or EMA) image tower's features v̂: (B, D), L2-normalised."""
        if self.teacher_vectors is not None:  # frozen teacher, deterministic crop: computed once, read back
            index = np.asarray(micro_batch["indices"], dtype=np.int64)
            vectors = self.teacher_vectors.cache.stored(self.teacher_vectors.rows[index, 0])  # (B, D) on the host
            unknown = int(torch.isnan(vectors[:, 0]).sum())  # counted here, left out of L_reg
            self.teacher_unknown += unknown
            self.unknown_in_step |= unknown > 0
            return self.teacher_vectors.upload(vectors, self.device).float()
        with self.autocast:
            return self.teacher.encode_image(pixels)

    def features(self, micro_batch: dict, student_only: bool) -> dict:
        pixels = micro_batch["pixels"].to(self.device, non_blocking=True)
        with self.autocast, attention_for_training(self.device, self.grad_checkpointing):
            image, text = self.forward(pixels, self.llm_vectors.to_device(micro_batch["text_rows"], self.device))
        f = {"image": image, "text": text}
        if not student_only:
            f["teacher_image"] = self.teacher_features(micro_batch, pixels)
        return f

    def loss(self, features: dict, last: bool) -> tuple[torch.Tensor, dict]:
        # the mask's sync only when this rank saw a NaN v̂, or always when L_reg spans every rank's rows
        cached = self.teacher_vectors is not None
        mask = cached and (self.unknown_in_step or (self.loss_settings.reg_scope == "global" and distributed()))
        return stage2_loss(features, self.loss_settings, self.contrastive_loss, self.model.logit_scale, last,
                           teacher_may_be_unknown=mask, logit_bias=getattr(self.model, "logit_bias", None))

    def after_step(self) -> None:
        """Clamp the temperature to τ ≤ 100 under InfoNCE (CLIP; open_clip leaves SigLIP's unclamped, and a SigLIP's
        is often above), then move the EMA teacher (momentum 1: it stays frozen)."""
        if self.loss_settings.contrastive_loss == "clip":
            clamp_logit_scale_(self.model.logit_scale)
        ema_update(self.teacher, self.model, self.ema_momentum)

    def checkpoint_weights(self) -> dict[str, torch.Tensor]:
        """The whole model, and an EMA teacher (which is state too)."""
        weights = dict(self.model.state_dict())
        if self.ema_momentum < 1:
            weights.update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
        return weights
