"""The training loop as a function: `setup` (the stage, optimizer and resumed state from the run's Config), then
`train` (schedule, a step over micro-batches, optimizer, log, eval, save; then the run's end). train.py is flag
parsing plus these calls; `train_from_flags` runs the same in-process (the toy world's stage 0, the reproduction).

Mirrors nanoGPT's train.py and open_clip_train's train_one_epoch, with the stage-specific parts behind the Stage
protocol (stages.py): stage 0 (stage0.py), stages 1-2 (build.py). Faults raise TrainingError (the last checkpoint
is intact); train.py turns them into the one-line `error:`.
"""

import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

from .. import checkpoint as ckpt
from ..distributed import StopSignal, close_distributed
from ..errors import TrainingError
from ..loader import count_bad_images, epoch_batches, make_loader
from .build import setup_clip_stage
from .config import Config, resolve_config
from .curves import write_curves
from .optim import cosine_lr_factor, param_groups
from .flags import Checkpoints, parse_args
from .stage0 import setup_stage0
from .stages import Stage, accumulated_backward, split


def train_from_flags(argv: list[str], toy=None, log=print) -> Config:
    """`python train.py ARGV` in this process, on one process (errors raised, not printed); returns the Config.
    `toy`: toy/defaults.py, for a run on the toy world (no --train-data)."""
    args, given = parse_args(argv)
    config, checkpoints = resolve_config(args, given, world=1, toy=toy, log=log)
    train(config, setup(config, checkpoints, rank=0, world=1, log=log), log)
    return config


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


# -----------------------------------------------------------------------------
# setup: flags -> settings -> the stage (models, data, caches), optimizer, and the resumed state (applied here only)


def setup(config: Config, checkpoints: Checkpoints, rank: int, world: int, log=print) -> Run:
    """Everything before the first step; a resumed run's weights, optimizer, scaler, RNG and cursor are applied
    here (and in the stage's setup) and nowhere else."""
    resume_path = checkpoints.resume_path
    train_state = ckpt.load_train_state(resume_path) if resume_path else None  # a bad one fails here, not mid-run
    if rank == 0:
        ckpt.check_writable(config.run.output)
    torch.manual_seed(config.run.seed)
    device = torch.device(config.run.device)
    # the stage: stage 0 the LLM with LoRA adapters and groups of texts, stages 1-2 ProCLIP with its caches
    stage = (setup_stage0(config, device, rank, world, resume_path, log) if config.run.stage == 0 else
             setup_clip_stage(config, device, rank, world, checkpoints, log))
    opt = config.optimizer
    steps = opt.max_steps or opt.epochs * len(epoch_batches(len(stage.dataset), opt.batch_size, seed=config.run.seed,
                                                              epoch=0, rank=rank, world_size=world,
                                                              sources=stage.sources))
    warmup = opt.warmup_steps(steps)  # stage 0's default: 10% of the steps
    # optimizer: AdamW over the stage's parameter groups (stage 2: the head at --lr, the image tower at --lr-vision)
    optimizer = torch.optim.AdamW(param_groups(stage.model, opt.wd, stage.lr_of), lr=opt.lr,
                                  betas=(opt.beta1, opt.beta2), eps=opt.eps)
    # fp16 (--precision amp) only; a no-op otherwise
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision.precision == "amp")
    cursor = Cursor()
    if resume_path:  # the optimizer, scaler, RNG and data cursor of the resumed run
        optimizer.load_state_dict(train_state["optimizer"])
        if train_state["scaler"]:  # empty when saved without fp16 (e.g. resuming a bf16 run with --precision amp)
            scaler.load_state_dict(train_state["scaler"])
        ckpt.set_rng_state(train_state["rng"])
        cursor = Cursor(**train_state["cursor"])
        log(f"resumed from {resume_path} at step {cursor.step}")
    log(f"stage {config.run.stage}: {steps} steps of {opt.batch_size} rows per rank, lr {opt.lr} (warmup {warmup})")
    return Run(stage=stage, optimizer=optimizer, scaler=scaler, device=device, rank=rank, world=world,
               total_steps=steps, warmup=warmup, cursor=cursor)


# -----------------------------------------------------------------------------
# the training loop


def train(config: Config, run: Run, log=print):
    """The loop (`steps`), then the run's end: curves, the stage's final measures, the next command."""
    stop = StopSignal()  # SIGTERM/SIGINT end the run after the current step, saved
    try:
        record = steps(config, run, stop, log)
    finally:
        stop.restore()  # a caller running several trainings in one process gets its handlers back
    close_distributed()  # the last collective is behind us; rank 0's end-of-run writes need no other rank
    finish_message(config, run, stop, record, log)


def steps(config: Config, run: Run, stop: StopSignal, log) -> dict:
    """Schedule, step over micro-batches, optimizer, log, eval, save, until the last step or a signal; returns
    the last logged record."""
    cursor = run.cursor
    bar = tqdm(total=run.total_steps, initial=cursor.step, disable=run.rank != 0, dynamic_ncols=True,
               desc=f"stage {config.run.stage}")
    trainable = [p for p in run.stage.model.parameters() if p.requires_grad]
    # record: the last logged numbers; timer: (time, step) of the last log, for samples_per_s
    record, timer = {}, (time.time(), cursor.step)
    for batch in training_batches(config, run, log):
        # schedule: linear warmup, then cosine decay to 0, set on every step
        for group in run.optimizer.param_groups:
            group["lr"] = group["base_lr"] * cosine_lr_factor(cursor.step, run.warmup, run.total_steps)
        # forward and backward over the micro-batches: the gradient of the full-batch loss (stages.py)
        run.optimizer.zero_grad(set_to_none=True)
        loss, parts = accumulated_backward(split(batch, config.optimizer.accum_freq), run.stage.features,
                                           run.stage.loss, run.stage.no_sync, lambda l: run.scaler.scale(l).backward())
        # optimizer step: clip the unscaled gradient; skip a non-finite step (fp16 overflow is the scaler's to skip)
        run.scaler.unscale_(run.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.optimizer.grad_clip_norm or float("inf"))
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
        saving = done or cursor.step % config.run.save_every == 0
        evaluating = config.run.eval_every and run.stage.validate and cursor.step % config.run.eval_every == 0 \
            and run.rank == 0
        if cursor.step % config.run.log_every == 0 or saving or evaluating:
            record, timer = step_record(config, run, loss, parts, grad_norm, timer), (time.time(), cursor.step)
            bar.set_postfix({k: f"{record[k]:.4g}" for k in ["loss", *parts, "lr"]})
        # eval: retrieval on the held-out rows (rank 0)
        if evaluating:
            record.update(run.stage.validate())
            log(f"step {cursor.step}: " + ", ".join(f"{k} {v:.3f}" for k, v in record.items() if k.startswith("val/")))
        if run.rank == 0 and (cursor.step % config.run.log_every == 0 or saving or evaluating):
            append_metrics(config.run.output, record)
        if cursor.bad_steps >= config.run.max_bad_steps:
            raise TrainingError(f"{cursor.bad_steps} consecutive non-finite steps; stopping. The last good "
                                f"checkpoint is kept in {config.run.output}; try a lower --lr or --precision fp32")
        # save: every --save-every steps, at the end, and on SIGTERM/SIGINT
        if saving:
            save(config, run, record)
        if done:
            break
    bar.close()
    return record


def training_batches(config: Config, run: Run, log):
    """The batches from the data cursor on, epoch after epoch: equal sizes on every rank, unreadable images
    dropped and counted, each prepared by its stage (e.g. the caption each row shows this epoch)."""
    cursor, dataset = run.cursor, run.stage.dataset
    while cursor.step < run.total_steps:
        batches = epoch_batches(len(dataset), config.optimizer.batch_size, seed=config.run.seed, epoch=cursor.epoch,
                                rank=run.rank, world_size=run.world, sources=run.stage.sources)
        dataset.epoch = cursor.epoch  # this epoch's random crops (seeded per sample)
        for batch in make_loader(dataset, batches, config.data.workers, cursor.batch_in_epoch,
                                 seed=config.run.seed * 1_000_003 + cursor.epoch):
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


def step_record(config: Config, run: Run, loss, parts, grad_norm, timer) -> dict:
    """The numbers of the step just taken (host syncs: called on log, eval and save steps only)."""
    since, since_step = timer
    rows = config.optimizer.batch_size * run.world  # per step, all ranks
    return {"step": run.cursor.step, "epoch": run.cursor.epoch, "loss": loss.item(),
            **{k: v.item() for k, v in parts.items()}, "lr": run.optimizer.param_groups[0]["lr"],
            "grad_norm": grad_norm.item(),
            "samples_per_s": rows * (run.cursor.step - since_step) / (time.time() - since),
            **run.stage.counters(), "bad_images": run.cursor.bad_images}


def append_metrics(output: str, record: dict):
    try:
        ckpt.append_metrics(output, record)
    except OSError as err:  # e.g. a full disk: stop now, the last checkpoint is intact
        raise TrainingError(f"cannot append to {output}/metrics.jsonl ({err.strerror}); the last checkpoint "
                            "is intact: free space, then continue with --resume latest") from err


def save(config: Config, run: Run, record: dict):
    """Rank 0 writes the stage's weights (stage 0 its adapters, stage 1 the head), optimizer, RNG and data cursor;
    the others wait."""
    if run.rank == 0:
        weights = run.stage.checkpoint_weights()
        meta = {"stage": config.run.stage, "step": run.cursor.step, "world_size": run.world,
                "config": config.sections(),  # by named section, read back by checkpoint.config_sections
                "metrics": record, "bad_image_paths": run.cursor.bad_image_paths}
        # what a resumed run needs to continue as if never stopped (torch.load(weights_only=True)-safe types)
        train_state = {"optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
                       "rng": ckpt.rng_state(), "cursor": asdict(run.cursor)}
        try:
            ckpt.save_checkpoint(config.run.output, run.cursor.step, weights, train_state, meta, keep=config.run.keep)
            ckpt.write_run_meta(config.run.output, meta)
        except ckpt.CheckpointError as err:  # e.g. the disk filled up: the previous checkpoint is intact
            raise TrainingError(f"{err}, then continue with --resume latest") from err
    if dist.is_initialized():  # no rank runs ahead of a checkpoint being written
        dist.barrier()


def finish_message(config: Config, run: Run, stop: StopSignal, record: dict, log):
    """The run's curves (loss parts and eval metrics over steps, also after a resume), then what to do next."""
    if run.rank == 0:
        log(f"curves: {write_curves(config.run.output)}")
    if stop.received:
        log(f"{stop.received}: saved step {run.cursor.step} to {config.run.output}; continue with "
            f"`python train.py --stage {config.run.stage} --output {config.run.output} --resume latest`")
    elif run.rank == 0:
        measures, next_command = run.stage.finish(log)  # stage 0: validation, the merged LLM
        if measures:  # metrics.jsonl's last line: the final step's numbers with the final measures
            record.update(measures)
            append_metrics(config.run.output, record)
        log(f"stage {config.run.stage} done: {run.cursor.step} steps, "
            f"final loss {record.get('loss', float('nan')):.4f}, "
            f"checkpoints in {config.run.output}\nnext: {next_command}")
