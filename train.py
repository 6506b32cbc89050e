"""Train ProCLIP (arXiv 2510.18795) in its two stages, and optionally its LLM embedder first (stage 0).

On one CPU, on the built-in toy world (built into ./toyworld on first use, about 8 minutes):
    python train.py --stage 0              # optional: LoRA on SmolLM2 -> RUN/llm (the world builds one itself)
    python train.py --stage 1
    python train.py --stage 2 --init runs/<stage-1 run>
On one GPU, on your data (JSONL/CSV rows or webdataset tar shards; the LLM embeddings are cached on first use):
    python train.py --stage 1 --train-data pairs.jsonl --clip CLIP_DIR --llm LLM_DIR --batch-size 1024
    python train.py --stage 2 --init runs/<stage-1 run> --train-data 'shards/{00000..00999}.tar' --batch-size 512 \\
        --grad-checkpointing
On N GPUs (DDP; --gather-with-grad gives every rank the gradient of the global-batch losses):
    torchrun --nproc_per_node 8 train.py --stage 2 --init runs/<stage-1 run> --train-data ... --gather-with-grad
Interrupted runs continue with `--resume latest --output RUN`. This file is orchestration: `resolve_settings` (flags
-> the run's settings, once), `setup` (the stage, optimizer, resumed state), then `train()`, the loop. The training
code is in miniproclip/training/ (settings.py the flags, stages.py the Stage protocol and stages 1-2, stage0.py stage
0, build.py the setup of stages 1-2), the model math in the library, miniproclip/ (model.py, losses.py).
"""

import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

from miniproclip import checkpoint as ckpt
from miniproclip.api import embed_settings
from miniproclip.distributed import StopSignal, close_distributed, exit_torchrun_rank, init_distributed
from miniproclip.errors import USER_ERRORS, TrainingError
from miniproclip.loader import count_bad_images, epoch_batches, make_loader
from miniproclip.toy import defaults as toy
from miniproclip.training.build import setup_clip_stage
from miniproclip.training.curves import write_curves
from miniproclip.training.optim import cosine_lr_factor, param_groups
from miniproclip.training.settings import find_checkpoints, inherited_settings, parse_args, stage_defaults
from miniproclip.training.stage0 import setup_stage0
from miniproclip.training.stages import Stage, accumulated_backward, split


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
    stage: Stage  # the model, its data, and the features and loss of a micro-batch (training/stages.py)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # fp16 (--precision amp) only; a no-op otherwise
    device: torch.device
    rank: int
    world: int
    total_steps: int
    warmup: int  # linear warmup steps, then cosine decay to 0
    cursor: Cursor


def main(argv=None):
    try:
        args, checkpoints, rank, world, log = resolve_settings(argv)
        run = setup(args, checkpoints, rank, world, log)
    except USER_ERRORS as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:  # before the first step nothing needs saving (the text cache is written atomically)
        sys.exit("interrupted before training started; nothing was lost, run the same command again")
    try:
        train(args, run, log)
    except TrainingError as err:  # a fatal condition mid-run; the last checkpoint is intact
        sys.exit(f"error: {err}")


# -----------------------------------------------------------------------------
# setup: flags -> settings -> the stage (models, data, caches), optimizer, and the resumed state (applied here only)


def resolve_settings(argv):
    """The flags -> the run's settings, every final value written here, in this order: the launch (the device
    torchrun gives this rank), what a resumed run brings (every flag not typed again), the toy world's data,
    models and recipe (without --train-data), then the stage's defaults. Returns (settings, checkpoints, rank,
    world, log); nothing changes the settings after this."""
    args = parse_args(argv)
    rank, world, args.device = init_distributed(args.device)
    log = print if rank == 0 else (lambda *a, **k: None)
    checkpoints = find_checkpoints(args, world)
    inherited = inherited_settings(args, checkpoints)
    vars(args).update(inherited)
    fixed = set(args.given_flags) | set(inherited)  # values the later rules leave alone
    if args.train_data is None:  # the toy world (built on first use), its CLIP teacher and SmolLM2
        vars(args).update(toy.paths(args.stage, args.toy_dir, args.llm, args.text_cache, args.val_data, args.clip, log))
        vars(args).update({k: v for k, v in toy.recipe(args.stage, args.init == "scratch").items() if k not in fixed})
    vars(args).update(stage_defaults(args, fixed))
    return args, checkpoints, rank, world, log


def setup(args, checkpoints, rank, world, log) -> Run:
    """Everything before the first step; a resumed run's weights, optimizer, scaler, RNG and cursor are applied
    here (and in the stage's setup) and nowhere else."""
    resume_path = checkpoints.resume_path
    train_state = ckpt.load_train_state(resume_path) if resume_path else None  # a bad one fails here, not mid-run
    if rank == 0:
        ckpt.check_writable(args.output)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    # the stage: stage 0 the LLM with LoRA adapters and groups of texts, stages 1-2 ProCLIP with its caches
    settings = embed_settings(vars(args))
    stage = (setup_stage0(args, settings, device, rank, world, resume_path, log) if args.stage == 0 else
             setup_clip_stage(args, settings, device, rank, world, checkpoints, log))
    steps = args.max_steps or args.epochs * len(epoch_batches(len(stage.dataset), args.batch_size, seed=args.seed,
                                                                epoch=0, rank=rank, world_size=world,
                                                                sources=stage.sources))
    warmup = args.warmup if args.warmup is not None else max(1, steps // 10)  # stage 0's default: 10% of the steps
    # optimizer: AdamW over the stage's parameter groups (stage 2: the head at --lr, the image tower at --lr-vision)
    optimizer = torch.optim.AdamW(param_groups(stage.model, args.wd, stage.lr_of), lr=args.lr,
                                  betas=(args.beta1, args.beta2), eps=args.eps)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "amp")  # fp16 only; a no-op otherwise
    cursor = Cursor()
    if resume_path:  # the optimizer, scaler, RNG and data cursor of the resumed run
        optimizer.load_state_dict(train_state["optimizer"])
        if train_state["scaler"]:  # empty when saved without fp16 (e.g. resuming a bf16 run with --precision amp)
            scaler.load_state_dict(train_state["scaler"])
        ckpt.set_rng_state(train_state["rng"])
        cursor = Cursor(**train_state["cursor"])
        log(f"resumed from {resume_path} at step {cursor.step}")
    log(f"stage {args.stage}: {steps} steps of {args.batch_size} rows per rank, lr {args.lr} (warmup {warmup})")
    return Run(stage=stage, optimizer=optimizer, scaler=scaler, device=device, rank=rank, world=world,
               total_steps=steps, warmup=warmup, cursor=cursor)


# -----------------------------------------------------------------------------
# the training loop


def train(args, run: Run, log):
    cursor, stop = run.cursor, StopSignal()  # SIGTERM/SIGINT end the run after the current step, saved
    bar = tqdm(total=run.total_steps, initial=cursor.step, disable=run.rank != 0, dynamic_ncols=True,
               desc=f"stage {args.stage}")
    trainable = [p for p in run.stage.model.parameters() if p.requires_grad]
    # record: the last logged numbers; timer: (time, step) of the last log, for samples_per_s
    record, timer = {}, (time.time(), cursor.step)
    for batch in training_batches(args, run, log):
        # schedule: linear warmup, then cosine decay to 0, set on every step
        for group in run.optimizer.param_groups:
            group["lr"] = group["base_lr"] * cosine_lr_factor(cursor.step, run.warmup, run.total_steps)
        # forward and backward over the micro-batches: the gradient of the full-batch loss (stages.py)
        run.optimizer.zero_grad(set_to_none=True)
        loss, parts = accumulated_backward(split(batch, args.accum_freq), run.stage.features, run.stage.loss,
                                           run.stage.no_sync, lambda l: run.scaler.scale(l).backward())
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
        evaluating = args.eval_every and run.stage.validate and cursor.step % args.eval_every == 0 \
            and run.rank == 0
        if cursor.step % args.log_every == 0 or saving or evaluating:
            record, timer = step_record(args, run, loss, parts, grad_norm, timer), (time.time(), cursor.step)
            bar.set_postfix({k: f"{record[k]:.4g}" for k in ["loss", *parts, "lr"]})
        # eval: retrieval on the held-out rows (rank 0)
        if evaluating:
            record.update(run.stage.validate())
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
    dropped and counted, each prepared by its stage (e.g. the caption each row shows this epoch)."""
    cursor, dataset = run.cursor, run.stage.dataset
    while cursor.step < run.total_steps:
        batches = epoch_batches(len(dataset), args.batch_size, seed=args.seed, epoch=cursor.epoch, rank=run.rank,
                                world_size=run.world, sources=run.stage.sources)
        dataset.epoch = cursor.epoch  # this epoch's random crops (seeded per sample)
        for batch in make_loader(dataset, batches, args.workers, cursor.batch_in_epoch,
                                 seed=args.seed * 1_000_003 + cursor.epoch):
            cursor.batch_in_epoch += 1  # the data cursor: where a resumed run continues
            if run.world > 1:  # dropped bad images can leave ranks with unequal batches: all use the smallest
                size = torch.tensor(len(batch["indices"]), device=run.device)  # collectives take device tensors
                dist.all_reduce(size, op=dist.ReduceOp.MIN)
                size = int(size)
                batch = {k: v[:size] if k != "bad_images" and v is not None else v for k, v in batch.items()}
            count_bad_images(batch["bad_images"], cursor, log)
            if len(batch["indices"]) >= 2:  # else nothing (or no pair) is left to learn from
                yield run.stage.prepare(batch, cursor.epoch)
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
            **run.stage.counters(), "bad_images": run.cursor.bad_images}


def append_metrics(args, record):
    try:
        ckpt.append_metrics(args.output, record)
    except OSError as err:  # e.g. a full disk: stop now, the last checkpoint is intact
        raise TrainingError(f"cannot append to {args.output}/metrics.jsonl ({err.strerror}); the last checkpoint "
                            "is intact: free space, then continue with --resume latest") from err


def save(args, run: Run, record: dict):
    """Rank 0 writes the stage's weights (stage 0 its adapters, stage 1 the head), optimizer, RNG and data cursor;
    the others wait."""
    if run.rank == 0:
        weights = run.stage.checkpoint_weights()
        head = getattr(run.stage.model, "text_head", None)  # stage 0 trains an LLM: no head
        meta = {"stage": args.stage, "step": run.cursor.step, "args": vars(args), "world_size": run.world,
                "head": head and vars(head.config),
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
        measures, next_command = run.stage.finish(log)  # stage 0: validation, the merged LLM
        if measures:  # metrics.jsonl's last line: the final step's numbers with the final measures
            record.update(measures)
            append_metrics(args, record)
        log(f"stage {args.stage} done: {run.cursor.step} steps, final loss {record.get('loss', float('nan')):.4f}, "
            f"checkpoints in {args.output}\nnext: {next_command}")


if __name__ == "__main__":
    main()
    exit_torchrun_rank()  # under torchrun: without the interpreter teardown, where gloo can abort a finished rank
