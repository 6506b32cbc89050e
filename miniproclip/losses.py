"""The ProCLIP training losses, plus the EMA teacher update and the logit-scale clamp.

- `instance_loss`, `structure_loss`, `distillation_loss`: the self-distillation terms of ProCLIP (arXiv 2510.18795):
  L_ins + L_struct in stage 1 (text head vs. CLIP text encoder) and L_reg in stage 2 (image encoder vs. its
  teacher). They mirror VisionXLab/ProCLIP `training/train.py` (`train_one_epoch_stage1/2`): `F.mse_loss` and
  `F.smooth_l1_loss(F.pdist(.), F.pdist(.))`, both with `reduction="sum"` by default, per-device batch, no gather.
  `pairwise_distances` gives pdist's values and gradients in O(B²) memory (CUDA's pdist backward takes O(B²·D)).
- `ClipLoss`: the symmetric InfoNCE of mlfoundations/open_clip `src/open_clip/loss.py` (`ClipLoss`,
  `gather_features`), with the same `local_loss` / `gather_with_grad` / `rank` / `world_size` switches;
  `all_gather_with_grad` is the gather whose backward returns each rank its rows' gradient.
- `SigmoidLoss`: SigLIP's pairwise sigmoid loss (open_clip `SigLipLoss`), texts passed round the ranks' ring.
- `splice_micro_batch`: the feature splicing of open_clip's `--accum-freq` (open_clip_train/train.py).
- `ema_update`, `clamp_logit_scale_`: the stage-2 teacher update and open_clip's `clamp_(0, ln 100)`.

All losses are computed in fp32: inputs are cast with `.float()` and autocast is switched off inside, so a bf16
autocast region in the training loop does not turn the logits matmul into a bf16 one.
"""

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

REDUCTIONS = ("sum", "mean")
# torch 2.13 renamed the single-tensor collectives (the `_tensor` names now warn); older torch has only those
ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
REDUCE_SCATTER_SINGLE = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


def _fp32_region(tensor: torch.Tensor):
    """A context with autocast off on `tensor`'s device, so ops keep the fp32 dtype of their inputs."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def _check_pair(student: torch.Tensor, teacher: torch.Tensor, reduction: str) -> None:
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(f"student and teacher features must both be (B, D), got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


# -----------------------------------------------------------------------------
# self-distillation: L_ins, L_struct (stage 1) and L_reg (stage 2)

def instance_loss(student: torch.Tensor, teacher: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """L_ins = sum_i ||s_i - u_i||^2 between L2-normalised (B, D) features; the caller normalises.

    reduction="sum" is the official code's; "mean" divides by B*D (F.mse_loss's mean). No gradient reaches
    `teacher`.
    """
    _check_pair(student, teacher, reduction)
    with _fp32_region(student):
        return F.mse_loss(student.float(), teacher.detach().float(), reduction=reduction)


class PairwiseDistances(torch.autograd.Function):
    """(B, D) -> (B, B) Euclidean distances with F.pdist's values and backward, in O(B²) memory.

    F.pdist's CUDA backward materialises every difference x_i - x_j: (B-1)·B·D floats, 48 GiB for B=4096, D=768.
    Here the forward is the exact difference kernel of cdist (no Gram-matrix cancellation, so equal rows give
    exactly 0), and the backward is pdist's formula grad_i = sum_j W_ij (x_i - x_j) with W_ij = g_ij / d_ij,
    regrouped as x_i * sum_j W_ij - (W @ x)_i: two (B, B) matrices and one matmul, never a (B, B, D) tensor.
    The regrouping costs precision only for nearly equal rows (large W_ij): an fp32 rounding of |W_ij|·|x|.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        distances = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")  # (B, B), diagonal exactly 0
        ctx.save_for_backward(x, distances)
        return distances

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, distances = ctx.saved_tensors
        # d_ij = d_ji, so pair (i, j) receives the gradient of both entries; the zero-distance rule of pdist's
        # backward (ATen DistanceOpsKernel.cpp / DistanceKernel.cu: `dist == 0 ? 0 : grad * diff / dist`) sets
        # W_ij = 0 for equal rows and the diagonal (their 0/0 = NaN is overwritten), so no NaN reaches x
        weights = (grad + grad.T).div_(distances).masked_fill_(distances == 0, 0.0)  # (B, B), in place: 0/0 -> 0
        return x * weights.sum(1, keepdim=True) - weights @ x  # (B, D)


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B, B) with d_ij = ||x_i - x_j||: F.pdist's values (its upper triangle) and gradients."""
    return PairwiseDistances.apply(x)


def structure_loss(student: torch.Tensor, teacher: torch.Tensor, reduction: str = "sum",
                   beta: float = 1.0) -> torch.Tensor:
    """L_struct: Huber (smooth L1, threshold `beta`) between the batch's pairwise Euclidean distances.

    Over the B(B-1)/2 pairs i<j: sum of huber(||s_i - s_j|| - ||u_i - u_j||); "mean" divides by the number of
    pairs. The official code's `F.pdist` is replaced by `pairwise_distances` (same values and gradients, O(B²)
    memory). Identical rows (distance 0, e.g. a caption repeated in the batch) are safe: as in pdist's backward,
    a zero distance has gradient 0, so no NaN/inf appears and no eps is needed.
    A batch of one row has no pairs: its loss is 0 ("sum") or NaN ("mean", as F.smooth_l1_loss of empty input).
    """
    _check_pair(student, teacher, reduction)
    with _fp32_region(student):
        student_dist = pairwise_distances(student.float())  # (B, B), symmetric, zero diagonal
        with torch.no_grad():
            teacher_dist = torch.cdist(teacher.float(), teacher.float(), compute_mode="donot_use_mm_for_euclid_dist")
        per_pair = F.smooth_l1_loss(student_dist, teacher_dist, beta=beta, reduction="none").triu(1)  # pairs i<j
        if reduction == "sum":
            return per_pair.sum()
        return per_pair.sum() / (student.shape[0] * (student.shape[0] - 1) // 2)  # 0 pairs: 0/0 = NaN


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, ins_weight: float = 1.0,
                      struct_weight: float = 1.0, reduction: str = "sum"
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ins_weight * L_ins + struct_weight * L_struct: the stage-1 loss, and L_reg (before lambda) in stage 2.

    Returns (total, {"instance": L_ins, "structure": L_struct}), the parts unweighted and detached for logging.
    Stage 1 with two caption sets adds a second `instance_loss` for the noisy captions, as the official code does.
    """
    l_ins = instance_loss(student, teacher, reduction)
    l_struct = structure_loss(student, teacher, reduction)
    total = ins_weight * l_ins + struct_weight * l_struct
    return total, {"instance": l_ins.detach(), "structure": l_struct.detach()}


# -----------------------------------------------------------------------------
# contrastive loss (stage 2)

class AllGatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sends every rank the sum over ranks of its rows' gradients (a reduce-scatter).

    Replaces `torch.distributed.nn.all_gather` (which warns on use) with the two single-tensor collectives:
    all-gather forward, reduce-scatter backward. Every rank must pass the same shape.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        gathered = x.new_empty((dist.get_world_size() * x.shape[0], *x.shape[1:]))  # (W*B, ...), rank order
        ALL_GATHER_SINGLE(gathered, x)
        return gathered

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        own = grad.new_empty((grad.shape[0] // dist.get_world_size(), *grad.shape[1:]))  # (B, ...)
        REDUCE_SCATTER_SINGLE(own, grad, op=dist.ReduceOp.SUM)  # rank r: sum over ranks of rows r*B..r*B+B-1
        return own


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each rank -> (world_size * B, ...) in rank order; gradients flow back to each rank's rows."""
    return AllGatherWithGrad.apply(x)


def gather_features(image_features: torch.Tensor, text_features: torch.Tensor, local_loss: bool,
                    gather_with_grad: bool, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather (B, D) features from every rank into (world_size * B, D), rank order, as open_clip does.

    With `gather_with_grad`, `all_gather_with_grad` sends each rank's gradient back to the rank that owns the
    rows (summed over ranks). Without it the gathered copies carry no gradient; unless `local_loss`, this rank's
    own slot is replaced by the local tensors so its rows still get a gradient.
    """
    if gather_with_grad:
        return all_gather_with_grad(image_features), all_gather_with_grad(text_features)
    gathered_image = [torch.zeros_like(image_features) for _ in range(world_size)]
    gathered_text = [torch.zeros_like(text_features) for _ in range(world_size)]
    dist.all_gather(gathered_image, image_features.contiguous())
    dist.all_gather(gathered_text, text_features.contiguous())
    if not local_loss:
        gathered_image[rank] = image_features
        gathered_text[rank] = text_features
    return torch.cat(gathered_image, dim=0), torch.cat(gathered_text, dim=0)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE: (CE(tau V S^T, I) + CE(tau S V^T, I)) / 2, mean over the batch (open_clip `ClipLoss`).

    `logit_scale` is tau itself, already exp'd (open_clip's convention: the model returns `logit_scale.exp()`).
    With world_size > 1 the features are all-gathered first:
    - local_loss=False: every rank computes the same loss over the global batch (N = world_size * B rows);
    - local_loss=True: each rank scores only its own B rows against all N columns (labels offset by rank*B);
      the mean of the ranks' losses is the global loss.
    Gradient scale with gather_with_grad=True (either local_loss): the gradient reaching this rank's features is
    world_size times the global-batch gradient (the gather's backward sums over ranks), so DDP's average over
    ranks gives exactly the global-batch gradient of the parameters. With gather_with_grad=False and
    local_loss=False, each rank's rows get the global-batch gradient through its own slot only, so after DDP's
    average the parameter gradient is 1/world_size of the global-batch one.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, rank: int = 0,
                 world_size: int = 1):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.rank = rank
        self.world_size = world_size
        self.labels: dict[tuple[torch.device, int], torch.Tensor] = {}  # (device, rows) -> targets, cached

    def get_labels(self, device: torch.device, num_rows: int) -> torch.Tensor:
        """Targets 0..num_rows-1 (shifted to this rank's columns under local_loss), cached per device and size."""
        key = (device, num_rows)
        if key not in self.labels:
            labels = torch.arange(num_rows, device=device, dtype=torch.long)
            if self.world_size > 1 and self.local_loss:
                labels = labels + num_rows * self.rank  # this rank's rows sit at columns rank*B .. rank*B+B-1
            self.labels[key] = labels
        return self.labels[key]

    def get_logits(self, image_features: torch.Tensor, text_features: torch.Tensor,
                   logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_per_image, logits_per_text), each (rows, columns) = (B or N, N)."""
        if self.world_size > 1:
            all_image, all_text = gather_features(image_features, text_features, self.local_loss,
                                                  self.gather_with_grad, self.rank, self.world_size)
            all_image, all_text = all_image.float(), all_text.float()
            if self.local_loss:
                logits_per_image = logit_scale * image_features @ all_text.T  # (B, N)
                logits_per_text = logit_scale * text_features @ all_image.T  # (B, N)
                return logits_per_image, logits_per_text
            logits_per_image = logit_scale * all_image @ all_text.T  # (N, N)
            return logits_per_image, logits_per_image.T
        logits_per_image = logit_scale * image_features @ text_features.T  # (B, B)
        return logits_per_image, logits_per_image.T

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
        """Loss from L2-normalised (B, D) image and text features, row i of each forming the positive pair."""
        if image_features.dim() != 2 or image_features.shape != text_features.shape:
            raise ValueError(f"image and text features must both be (B, D), got {tuple(image_features.shape)} "
                             f"and {tuple(text_features.shape)}")
        with _fp32_region(image_features):
            logits_per_image, logits_per_text = self.get_logits(
                image_features.float(), text_features.float(), torch.as_tensor(logit_scale).float())
            labels = self.get_labels(image_features.device, logits_per_image.shape[0])
            return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class NeighbourExchange(torch.autograd.Function):
    """Send (B, D) rows to rank `to_rank` and receive the same shape from `from_rank`, one hop round the ring
    (open_clip `neighbour_exchange_with_grad`); the backward sends the gradient one hop back the other way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, from_rank: int, to_rank: int) -> torch.Tensor:
        ctx.from_rank, ctx.to_rank = from_rank, to_rank
        received = torch.empty_like(x)  # every rank's batch has the same shape (the SigLIP exchange needs it)
        ops = [dist.P2POp(dist.isend, x.contiguous(), to_rank), dist.P2POp(dist.irecv, received, from_rank)]
        for request in dist.batch_isend_irecv(ops):
            request.wait()
        return received

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return NeighbourExchange.apply(grad.contiguous(), ctx.to_rank, ctx.from_rank), None, None


class SigmoidLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss (arXiv 2303.15343; open_clip `SigLipLoss`), stage 2's `--loss sigmoid`:

        L = -(1/B) Σ_ij log σ(z_ij (t · v_i·s_j + b)),  z_ij = +1 on the diagonal, -1 elsewhere

    over this rank's B images against every text of the global batch; `logit_scale` is t itself (exp'd, as
    ClipLoss takes it) and `logit_bias` is b. Every pair is its own binary problem, so no softmax needs the
    whole batch at once: with world_size > 1 the texts travel round the ring one neighbour at a time (open_clip's
    "shift" exchange; its default "bidir" sends both ways at once and gives the same sum) and the other ranks'
    blocks add negatives only. No rank ever holds the global (N, N) logits. Each rank's loss is its own images'
    share; as in open_clip, the gradient that reaches a rank's texts from the others comes back through the ring.
    """

    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.rank, self.world_size = rank, world_size

    @staticmethod
    def block(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
              positives_on_diagonal: bool) -> torch.Tensor:
        """-Σ log σ(z · logits) / B over one (B, B') block: the local block has the positives on its diagonal."""
        logits = scale * image @ text.T + bias  # (B, B')
        signs = -torch.ones_like(logits)
        if positives_on_diagonal:
            signs.diagonal().fill_(1.0)
        return -F.logsigmoid(signs * logits).sum() / image.shape[0]

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> torch.Tensor:
        """Loss from L2-normalised (B, D) image and text features, row i of each forming the positive pair."""
        if image_features.dim() != 2 or image_features.shape != text_features.shape:
            raise ValueError(f"image and text features must both be (B, D), got {tuple(image_features.shape)} "
                             f"and {tuple(text_features.shape)}")
        with _fp32_region(image_features):
            image, text = image_features.float(), text_features.float()
            scale, bias = torch.as_tensor(logit_scale).float(), torch.as_tensor(logit_bias).float()
            loss = self.block(image, text, scale, bias, positives_on_diagonal=True)
            left, right = (self.rank - 1) % self.world_size, (self.rank + 1) % self.world_size
            for _ in range(self.world_size - 1):  # hop k: the texts of the rank k places to the left
                text = NeighbourExchange.apply(text, left, right)
                loss = loss + self.block(image, text, scale, bias, positives_on_diagonal=False)
            return loss


def splice_micro_batch(cached: list[torch.Tensor], index: int, fresh: torch.Tensor) -> torch.Tensor:
    """Contrastive-aware gradient accumulation (open_clip `--accum-freq`): the full batch's features, with
    micro-batch `index` taken from `fresh` (recomputed with grad) and the others from `cached` (no-grad features
    from a first pass over all micro-batches). Backward of the loss on each spliced batch, summed over the
    micro-batches, gives the full-batch gradient of the encoders' parameters, so the negatives cover the whole
    batch. The loss's direct gradient to logit_scale would be counted once per micro-batch (accum_freq times the
    full-batch one, as in open_clip); training/stages.py avoids that by letting it through in the last micro-batch only.
    """
    return torch.cat(cached[:index] + [fresh] + cached[index + 1:], dim=0)


# -----------------------------------------------------------------------------
# teacher update and logit-scale clamp

@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher = momentum * teacher + (1 - momentum) * student, parameter by parameter; buffers are copied.

    momentum=1.0 leaves the teacher untouched (parameters and buffers): the released ProCLIP code's frozen copy of
    the initial image encoder. Pass unwrapped modules (no DDP `module.` prefix): names must match.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    if momentum == 1.0:
        return
    student_params = dict(student.named_parameters())
    student_buffers = dict(student.named_buffers())
    teacher_params, sources = [], []
    for name, param in teacher.named_parameters():
        if name not in student_params:
            raise ValueError(f"EMA teacher parameter {name!r} has no counterpart in the student; "
                             "pass the unwrapped student module with the same architecture")
        teacher_params.append(param)
        sources.append(student_params[name].to(param.dtype))
    torch._foreach_lerp_(teacher_params, sources, 1.0 - momentum)  # t + (1-m)(s - t), few kernels for all
    for name, buffer in teacher.named_buffers():
        if name in student_buffers:
            buffer.copy_(student_buffers[name])


@torch.no_grad()
def clamp_logit_scale_(logit_scale: torch.Tensor, max_log: float = math.log(100)) -> torch.Tensor:
    """Clamp the learnable log-temperature in place to [0, max_log] (tau <= 100), after each optimiser step."""
    return logit_scale.clamp_(0.0, max_log)
