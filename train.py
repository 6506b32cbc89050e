"""Train ProCLIP (arXiv 2510.18795) in its two stages, and optionally its LLM embedder first (stage 0).

On one CPU, on the built-in toy world (built into ./toyworld on first use, a few minutes):
    python train.py --stage 0              # optional: LoRA on SmolLM2 -> RUN/llm (stage0.py; the world builds one)
    python train.py --stage 1
    python train.py --stage 2 --init runs/<stage-1 run>
On one GPU, on your data (JSONL/CSV rows or webdataset tar shards; the LLM embeddings are cached on first use):
    python train.py --stage 1 --train-data pairs.jsonl --clip CLIP_DIR --llm LLM_DIR --batch-size 1024
    python train.py --stage 2 --init runs/stage1 --train-data 'shards/{00000..00999}.tar' --batch-size 512 \\
        --grad-checkpointing
On N GPUs (DDP; --gather-with-grad gives every rank the gradient of the global-batch losses):
    torchrun --nproc_per_node 8 train.py --stage 2 --init runs/stage1 --train-data ... --gather-with-grad
Interrupted runs continue with `--resume latest --output RUN`. This file is orchestration: setup (flags -> models,
data, text cache, optimizer, resumed state), then `train()`, the loop. The flags are in miniproclip/params.py, the
model math in miniproclip/ (model.py; stages.py holds each stage's features and loss; losses.py the loss functions).
"""

import contextlib
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

from miniproclip import checkpoint as ckpt
from miniproclip.clip import CLIP
from miniproclip.curves import write_curves
from miniproclip.data import DataError, caption_texts, read_rows
from miniproclip.loader import ImageTextDataset, count_bad_images, epoch_batches, make_loader
from miniproclip.distributed import StopSignal, close_distributed, init_distributed
from miniproclip.embed import ensure_text_cache
from miniproclip import stage0
from miniproclip.api import embed_settings
from miniproclip.errors import TrainingError
from miniproclip.evaluation import Encoders, RetrievalSet, inference, run_retrieval
from miniproclip.head import HeadConfig
from miniproclip.image import ImageTransform, RandomResizedCropTransform
from miniproclip.llm import LLMConfig
from miniproclip.lora import lora_state_dict
from miniproclip.losses import ClipLoss
from miniproclip.model import ProCLIP
from miniproclip.optim import cosine_lr_factor, param_groups
from miniproclip.params import fill_defaults, fill_run_defaults, parse_args
from miniproclip.stages import AUTOCAST, LossSettings, Stage1, Stage2, TextSide, accumulated_backward, split
from miniproclip.teacher_cache import stage_teachers
from miniproclip.weights import ModelFolderError

VISION = ("vision_model.", "visual_projection.")  # the image tower's parameters get --lr-vision
# errors of the user's input that setup turns into one line; during training only TrainingError does
USER_ERRORS = (TrainingError, ModelFolderError, DataError, ckpt.CheckpointError, FileNotFoundError, ValueError)


# -----------------------------------------------------------------------------
# the state of a run


@dataclass
class Cursor:
    """Where the run is: saved with every checkpoint, so a resumed run continues at the same batch."""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of this epoch already taken (including skipped ones)
    bad_steps: int = 0  # consecutive non-finite steps
    bad_images: int = 0  # unreadable images dropped so far
    bad_image_paths: list = field(default_factory=list)  # the first 10 of them


@dataclass
class Run:
    """Everything setup builds and the loop uses."""
    model: ProCLIP  # the trainable model, unwrapped (checkpoints, EMA, evaluation); stage 0: the LoRA-wrapped LLM
    teacher: torch.nn.Module | None  # stage 2's live image teacher (frozen or EMA); None where cached
    stage: Stage1 | Stage2  # features and loss of a micro-batch
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # fp16 (--precision amp) only; a no-op otherwise
    no_sync: object  # DDP's context deferring the gradient all-reduce (a null context on one process)
    dataset: ImageTextDataset
    rows: list
    val_rows: list
    cache: object  # caption -> cached LLM embedding
    head: HeadConfig
    device: torch.device
    rank: int
    world: int
    total_steps: int
    cursor: Cursor
    sources: list | None = None  # stage 0: the source file of each group (a batch holds one source's groups)


def main(argv=None):
    args = parse_args(argv)
    rank, world, args.device = init_distributed(args.device)
    log = print if rank == 0 else (lambda *a, **k: None)
    try:
        run = setup(args, rank, world, log)
    except USER_ERRORS as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:  # before the first step nothing needs saving (the text cache is written atomically)
        sys.exit("interrupted before training started; nothing was lost, run the same command again")
    try:
        train(args, run, log)
    except TrainingError as err:  # a fatal condition mid-run; the last checkpoint is intact
        sys.exit(f"error: {err}")


# -----------------------------------------------------------------------------
# setup: flags -> checkpoints, models, data, text cache, optimizer, and the resumed state (applied here only)


def build_model(args, clip, meta, source):
    """ProCLIP from the CLIP's image tower and a head shaped by the checkpoint `meta` (or by the flags)."""
    # the head maps the LLM's width (d) to CLIP's joint space (D); a checkpoint fixes both
    projection_dim = clip.config.projection_dim
    llm_width = LLMConfig.from_folder(args.llm).hidden_size
    head = HeadConfig(**meta["head"]) if meta else HeadConfig(input_dim=llm_width, output_dim=projection_dim,
                                                              num_blocks=args.head_blocks,
                                                              mlp_ratio=args.head_mlp_ratio, dropout=args.head_dropout)
    if head.output_dim != projection_dim:
        raise TrainingError(f"{source}: its head maps to {head.output_dim} dims but {args.clip} has a "
                            f"{projection_dim}-dim joint space; use a checkpoint trained with this CLIP")
    if head.input_dim != llm_width:
        raise TrainingError(f"{source}: its head takes {head.input_dim}-dim LLM embeddings but {args.llm} is "
                            f"{llm_width} wide; use the --llm it was trained with")
    return ProCLIP.from_clip(clip, head), head


def read_data(args, log):
    """Training rows, validation rows (when evaluating) and the LLM embedding cache covering both."""
    keys = {"csv_img_key": args.csv_img_key, "csv_caption_key": args.csv_caption_key,
            "csv_separator": args.csv_separator}
    rows = read_rows(args.train_data, strict=args.strict_data, log=log, **keys)
    val_rows = read_rows(args.val_data, log=log, **keys) if args.val_data and args.eval_every else []
    settings = embed_settings(vars(args))
    cache = ensure_text_cache(args.text_cache, args.llm, caption_texts(rows + val_rows), settings,
                              torch.bfloat16 if args.llm_dtype == "bf16" else torch.float32, args.device,
                              args.batch_tokens, log)
    return rows, val_rows, cache


def set_trainable(args, model):
    """Stage 1: the head only. Stage 2: everything (--lock-image-layers freezes the stem and the first N layers)."""
    if args.stage == 1:
        model.requires_grad_(False).text_head.requires_grad_(True)
    elif args.lock_image_layers is not None:
        vision = model.vision_model
        for module in [vision.embeddings, vision.pre_layrnorm, *vision.encoder.layers[:args.lock_image_layers]]:
            module.requires_grad_(False)


def train_transform(args):
    """Stage 2's image transform: the official RandomResizedCrop(0.9-1.0) or CLIP's centre crop; none in stage 1."""
    if args.stage == 1:
        return None
    base = ImageTransform.from_folder(args.clip)
    return RandomResizedCropTransform(base=base) if args.train_crop == "random" else base


def check_images(args, dataset):
    """Fail early when the images are not where the rows say."""
    probe = [dataset[i] for i in range(min(len(dataset), 64))]  # a sample of a bad image carries "bad_image"
    if all("bad_image" in sample for sample in probe):
        raise DataError(f"{args.train_data}: none of the first {len(probe)} images is readable (e.g. "
                        f"{probe[0]['bad_image']}); check the image paths, which are relative to the data file")


def setup(args, rank, world, log) -> Run:
    """Everything before the first step; a resumed run's weights, optimizer, scaler, RNG and cursor are applied
    here and nowhere else."""
    resume_path, resumed_meta, init_path, init_meta = ckpt.find_checkpoints(args, world)
    train_state = ckpt.load_train_state(resume_path) if resume_path else None  # a bad one fails here, not mid-run
    (stage0.fill_defaults(args, resumed_meta, log) if args.stage == 0 else
     fill_defaults(args, resumed_meta, init_meta, log))
    fill_run_defaults(args)
    if rank == 0:
        ckpt.check_writable(args.output)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if args.stage == 0:  # the LLM with LoRA adapters and groups of texts (stage0.py): no CLIP, no caches
        return setup_stage0(args, device, rank, world, resume_path, train_state, log)
    # models: fp32 master weights (autocast does the low-precision math), the trainable part and the teacher
    clip = CLIP.from_pretrained(args.clip)
    model, head = build_model(args, clip, init_meta or resumed_meta, init_path or resume_path)
    if init_path:  # a stage-1 checkpoint gives the head, a stage-2 one everything
        meta = ckpt.load_trained_weights(model, init_path)[1]
        log(f"init: stage-{meta['stage']} weights from {init_path} (step {meta['step']})")
    del clip  # the model copied its image tower; stage 1's text teacher is loaded again only to fill its cache
    set_trainable(args, model)
    model.vision_model.encoder.grad_checkpointing = args.grad_checkpointing
    # data, the LLM cache and the teacher caches (each filled on first use, its model released after), the model
    rows, val_rows, cache = read_data(args, log)
    dataset = ImageTextDataset(rows, train_transform(args), seed=args.seed)
    if args.stage == 2:
        check_images(args, dataset)
    autocast = torch.autocast(device.type, dtype=AUTOCAST.get(args.precision, torch.float32),
                              enabled=args.precision != "fp32")
    teacher, llm, taught = stage_teachers(args, model, rows, cache, dataset.transform, device, autocast, log)
    # optimizer: AdamW, the head at --lr and the image tower at --lr-vision; GradScaler for fp16
    lr_of = lambda name: ("vision", args.lr_vision) if name.startswith(VISION) else ("head", args.lr)
    optimizer = torch.optim.AdamW(param_groups(model, args.wd, lr_of), lr=args.lr, betas=(args.beta1, args.beta2),
                                  eps=args.eps)
    # a resumed run: weights (and an EMA teacher), optimizer, scaler, RNG and data cursor
    if resume_path:
        teacher_weights = ckpt.load_trained_weights(model, resume_path)[0]
        if teacher_weights:
            teacher.load_state_dict(teacher_weights)
    scaler, cursor = restore(args, optimizer, device, resume_path, train_state, log)
    # DDP and torch.compile wrap the trained part for the forward passes only (stage 1: the text side alone)
    forward = TextSide(model) if args.stage == 1 else model
    forward = torch.nn.parallel.DistributedDataParallel(forward) if world > 1 else forward
    no_sync = forward.no_sync if world > 1 else contextlib.nullcontext
    if args.compile:  # stage 1's row count varies with the long captions: dynamic shapes, no recompiles
        forward = torch.compile(forward, dynamic=True if args.stage == 1 else None)
    stage = build_stage(args, forward, model, teacher, llm, taught, device, autocast, rank, world)
    log(f"stage {args.stage}: {len(rows)} rows from {args.train_data}, CLIP {args.clip}, LLM {args.llm}, "
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trainable parameters, "
        f"{world} rank(s), precision {args.precision}, output {args.output}")
    return Run(model=model, teacher=teacher, stage=stage, optimizer=optimizer, scaler=scaler, no_sync=no_sync,
               dataset=dataset, rows=rows, val_rows=val_rows, cache=cache, head=head, device=device, rank=rank,
               world=world, total_steps=total_steps(args, len(rows), rank, world), cursor=cursor)


def restore(args, optimizer, device, resume_path, train_state, log):
    """(GradScaler, Cursor): fresh, or a resumed run's optimizer, scaler, RNG and data cursor applied."""
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "amp")  # fp16 only; a no-op otherwise
    if not resume_path:
        return scaler, Cursor()
    optimizer.load_state_dict(train_state["optimizer"])
    if train_state["scaler"]:  # empty when saved without fp16 (e.g. resuming a bf16 run with --precision amp)
        scaler.load_state_dict(train_state["scaler"])
    ckpt.set_rng_state(train_state["rng"])
    log(f"resumed from {resume_path} at step {train_state['cursor']['step']}")
    return scaler, Cursor(**train_state["cursor"])


def total_steps(args, rows, rank, world, sources=None):
    steps_per_epoch = len(epoch_batches(rows, args.batch_size, seed=args.seed, epoch=0, rank=rank, world_size=world,
                                        sources=sources))
    return args.max_steps or args.epochs * steps_per_epoch


def setup_stage0(args, device, rank, world, resume_path, train_state, log) -> Run:
    """Stage 0: the LoRA-wrapped LLM (its adapters resumed), AdamW on the adapters, the CaptionContrastive stage."""
    settings = embed_settings(vars(args))
    model, groups = stage0.setup_model(args, settings, device, resume_path, log)
    steps = total_steps(args, len(groups), rank, world, groups.sources)
    args.warmup = max(1, steps // 10) if args.warmup is None else args.warmup  # stage 0's default: 10% of the steps
    optimizer = torch.optim.AdamW(param_groups(model, args.wd, lambda name: ("lora", args.lr)), lr=args.lr,
                                  betas=(args.beta1, args.beta2), eps=args.eps)
    scaler, cursor = restore(args, optimizer, device, resume_path, train_state, log)
    stage, no_sync = stage0.build_stage(args, model, groups, settings, cursor, device, rank, world)
    log(f"stage 0: {steps} steps of {args.batch_size} pairs, lr {args.lr} (warmup {args.warmup}), temperature "
        f"{args.temperature}, precision {args.precision}, output {args.output}")
    return Run(model=model, teacher=None, stage=stage, optimizer=optimizer, scaler=scaler, no_sync=no_sync,
               dataset=stage0.GroupDataset(groups), rows=groups.texts, val_rows=[], cache=None, head=None,
               device=device, rank=rank, world=world, total_steps=steps, cursor=cursor, sources=groups.sources)


def build_stage(args, forward, model, teacher, llm, taught, device, autocast, rank, world):
    settings = LossSettings(ins_weight=args.ins_weight, struct_weight=args.struct_weight, reg_weight=args.reg_weight,
                            reduction=args.reduction, gather_with_grad=args.gather_with_grad,
                            local_loss=args.local_loss, reg_scope=args.reg_scope)
    if args.stage == 1:
        return Stage1(forward=forward, llm=llm, teacher=taught, device=device, autocast=autocast, settings=settings,
                      skip_truncated_long=args.skip_truncated_long)
    return Stage2(forward=forward, model=model, teacher=teacher, llm=llm, teacher_vectors=taught, device=device,
                  autocast=autocast, settings=settings, ema_momentum=args.ema_momentum,
                  clip_loss=ClipLoss(args.local_loss, args.gather_with_grad, rank, world))


# -----------------------------------------------------------------------------
# the training loop


def train(args, run: Run, log):
    cursor, stop = run.cursor, StopSignal()  # SIGTERM/SIGINT end the run after the current step, saved
    bar = tqdm(total=run.total_steps, initial=cursor.step, disable=run.rank != 0, dynamic_ncols=True,
               desc=f"stage {args.stage}")
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    # record: the last logged numbers; timer: (time, step) of the last log, for samples_per_s
    record, timer = {}, (time.time(), cursor.step)
    for batch in training_batches(args, run, log):
        # schedule: linear warmup, then cosine decay to 0, set on every step
        for group in run.optimizer.param_groups:
            group["lr"] = group["base_lr"] * cosine_lr_factor(cursor.step, args.warmup, run.total_steps)
        # forward and backward over the micro-batches: the gradient of the full-batch loss (stages.py)
        run.optimizer.zero_grad(set_to_none=True)
        loss, parts = accumulated_backward(split(batch, args.accum_freq), run.stage.features, run.stage.loss,
                                           run.no_sync, lambda l: run.scaler.scale(l).backward())
        # optimizer step: clip the unscaled gradient; skip a non-finite step (fp16 overflow is the scaler's to skip)
        run.scaler.unscale_(run.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip_norm or float("inf"))
        bad, stopping = step_verdict(run, loss, grad_norm, stop)  # the one host sync (GradScaler.step has its own)
        if bad:
            cursor.bad_steps += 1
            log(f"step {cursor.step}: non-finite loss {loss.item()} / grad norm {grad_norm.item()}, step skipped")
        else:
            run.scaler.step(run.optimizer)
            cursor.bad_steps = 0
        run.scaler.update()
        # after the step: stage 2 clamps the temperature and moves an EMA teacher
        run.stage.after_step()
        cursor.step += 1
        bar.update(1)
        # log: metrics.jsonl every --log-every steps (and the numbers of every saved or evaluated step)
        done = cursor.step >= run.total_steps or stopping
        saving = done or cursor.step % args.save_every == 0
        evaluating = args.eval_every and run.val_rows and cursor.step % args.eval_every == 0 and run.rank == 0
        if cursor.step % args.log_every == 0 or saving or evaluating:
            record, timer = step_record(args, run, loss, parts, grad_norm, timer), (time.time(), cursor.step)
            bar.set_postfix({k: f"{record[k]:.4g}" for k in ["loss", *parts, "lr"]})
        # eval: retrieval on the held-out rows (rank 0)
        if evaluating:
            record.update(validate(args, run))
            log(f"step {cursor.step}: " + ", ".join(f"{k} {v:.3f}" for k, v in record.items() if k.startswith("val/")))
        if run.rank == 0 and (cursor.step % args.log_every == 0 or saving or evaluating):
            append_metrics(args, record)
        if cursor.bad_steps >= args.max_bad_steps:
            raise TrainingError(f"{cursor.bad_steps} consecutive non-finite steps; stopping. The last good "
                                f"checkpoint is kept in {args.output}; try a lower --lr or --precision fp32")
        # save: every --save-every steps, at the end, and on SIGTERM/SIGINT
        if saving:
            save(args, run, record)
        if done:
            break
    bar.close()
    close_distributed()  # the last collective is behind us; rank 0's end-of-run writes need no other rank
    finish_message(args, run, stop, record, log)


def training_batches(args, run: Run, log):
    """The batches from the data cursor on, epoch after epoch: equal sizes on every rank, unreadable images
    dropped and counted, each with its stage's captions chosen."""
    cursor = run.cursor
    while cursor.step < run.total_steps:
        batches = epoch_batches(len(run.rows), args.batch_size, seed=args.seed, epoch=cursor.epoch, rank=run.rank,
                                world_size=run.world, sources=run.sources)
        # a coin per row and epoch, so the choice does not depend on how rows are split over ranks or resumes
        coins = torch.Generator().manual_seed(args.seed * 1_000_003 + cursor.epoch)
        pick_long = (torch.rand(len(run.rows), generator=coins) < args.long_prob).numpy()
        run.dataset.epoch = cursor.epoch  # this epoch's random crops (seeded per sample)
        for batch in make_loader(run.dataset, batches, args.workers, cursor.batch_in_epoch, seed=coins.initial_seed()):
            cursor.batch_in_epoch += 1  # the data cursor: where a resumed run continues
            if run.world > 1:  # dropped bad images can leave ranks with unequal batches: all use the smallest
                size = torch.tensor(len(batch["captions"]), device=run.device)  # collectives take device tensors
                dist.all_reduce(size, op=dist.ReduceOp.MIN)
                size = int(size)
                batch = {k: v[:size] if k != "bad_images" and v is not None else v for k, v in batch.items()}
            count_bad_images(batch["bad_images"], cursor, log)
            if len(batch["captions"]) >= 2:  # else nothing (or no pair) is left to learn from
                yield run.stage.prepare(batch, pick_long)
        cursor.epoch += 1
        cursor.batch_in_epoch = 0


def step_verdict(run: Run, loss, grad_norm, stop: "StopSignal") -> tuple[bool, bool]:
    """(skip this step, stop after it). Skip on a non-finite loss, or non-finite gradients that no GradScaler
    handles (fp16 overflow is the scaler's to skip, not a bad step). Under torchrun both verdicts are shared, so
    every rank skips, saves and stops together: a signal that reached one rank stops all of them after this step
    (ranks that went different ways would wait forever in different collectives)."""
    bad = ~torch.isfinite(loss) | (~torch.isfinite(grad_norm) & (not run.scaler.is_enabled()))
    verdict = torch.stack([bad, torch.tensor(stop.received is not None, device=bad.device)]).to(torch.int32)
    if run.world > 1:  # a loss can be non-finite, or a signal arrive, on one rank only
        dist.all_reduce(verdict, op=dist.ReduceOp.MAX)
    bad, stopping = verdict.tolist()
    if stopping and stop.received is None:
        stop.received = "a signal on another rank"
    return bool(bad), bool(stopping)


def step_record(args, run: Run, loss, parts, grad_norm, timer) -> dict:
    """The numbers of the step just taken (host syncs: called on log, eval and save steps only)."""
    since, since_step = timer
    return {"step": run.cursor.step, "epoch": run.cursor.epoch, "loss": loss.item(),
            **{k: v.item() for k, v in parts.items()}, "lr": run.optimizer.param_groups[0]["lr"],
            "grad_norm": grad_norm.item(),
            "samples_per_s": args.batch_size * run.world * (run.cursor.step - since_step) / (time.time() - since),
            "teacher_truncated": run.stage.teacher_truncated, "teacher_unknown": run.stage.teacher_unknown,
            "bad_images": run.cursor.bad_images}


def append_metrics(args, record):
    try:
        ckpt.append_metrics(args.output, record)
    except OSError as err:  # e.g. a full disk: stop now, the last checkpoint is intact
        raise TrainingError(f"cannot append to {args.output}/metrics.jsonl ({err.strerror}); the last checkpoint "
                            "is intact: free space, then continue with --resume latest") from err


def validate(args, run: Run):
    """Retrieval R@K both ways on the --val-data rows (one caption each), with the model as it is now."""
    rows, model, device = run.val_rows, run.model, run.device
    # one caption per image: row i's caption belongs to image i
    dataset = RetrievalSet([r.image for r in rows], [r.caption for r in rows], list(range(len(rows))), "val")
    encode_text = inference(lambda texts: model.encode_text(run.cache(texts).to(device)), device, args.precision)
    # eval.py's retrieval runner, with the model's own encoders and CLIP's eval (centre crop) transform
    encoders = Encoders(args.output, args.clip, ImageTransform.from_folder(args.clip),
                        inference(model.encode_image, device, args.precision), encode_text, lambda texts: 0)
    model.eval()
    report, _ = run_retrieval(encoders, dataset, args.batch_size, 0, device, [k for k in (1, 5, 10) if k <= len(rows)])
    model.train()
    return {f"val/{k}": v for k, v in report["metrics"].items()}


def save(args, run: Run, record: dict):
    """Rank 0 writes weights (head only in stage 1), optimizer, RNG and data cursor; the others wait."""
    if run.rank == 0:
        model = run.model
        # stage 1 saves the head only (the image tower is CLIP's, unchanged); stage 2 the whole model
        weights = ({f"text_head.{k}": v for k, v in model.text_head.state_dict().items()} if args.stage == 1
                   else lora_state_dict(model) if args.stage == 0 else dict(model.state_dict()))
        if args.stage == 2 and args.ema_momentum < 1:  # an EMA teacher is state too
            weights.update({f"teacher.{k}": v for k, v in run.teacher.state_dict().items()})
        meta = {"stage": args.stage, "step": run.cursor.step, "args": vars(args), "world_size": run.world,
                "head": run.head and vars(run.head),
                "metrics": record, "bad_image_paths": run.cursor.bad_image_paths}
        # what a resumed run needs to continue as if never stopped (torch.load(weights_only=True)-safe types)
        train_state = {"optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
                       "rng": ckpt.rng_state(), "cursor": asdict(run.cursor)}
        try:
            ckpt.save_checkpoint(args.output, run.cursor.step, weights, train_state, meta, keep=args.keep)
            ckpt.write_run_meta(args.output, meta)
        except ckpt.CheckpointError as err:  # e.g. the disk filled up: the previous checkpoint is intact
            raise TrainingError(f"{err}, then continue with --resume latest") from err
    if dist.is_initialized():  # no rank runs ahead of a checkpoint being written
        dist.barrier()


def finish_message(args, run: Run, stop: StopSignal, record: dict, log):
    """The run's curves (loss parts and eval metrics over steps, also after a resume), then what to do next."""
    if run.rank == 0:
        log(f"curves: {write_curves(args.output)}")
    if stop.received:
        log(f"{stop.received}: saved step {run.cursor.step} to {args.output}; continue with "
            f"`python train.py --stage {args.stage} --output {args.output} --resume latest`")
    elif run.rank == 0:
        if args.stage == 0:  # the held-out groups' anchor recall, then the merged LLM
            validation = stage0.validate(args, run.stage, run.model, log)
            if validation:  # metrics.jsonl's last line: the final step's numbers with the validation's
                record.update(validation)
                append_metrics(args, record)
        next_command = (stage0.finish(args, run.model, log) if args.stage == 0 else
                        f"python train.py --stage 2 --init {args.output}" if args.stage == 1
                        else f"python eval.py --task retrieval --model {args.output}")
        log(f"stage {args.stage} done: {run.cursor.step} steps, final loss {record.get('loss', float('nan')):.4f}, "
            f"checkpoints in {args.output}\nnext: {next_command}")


if __name__ == "__main__":
    main()
