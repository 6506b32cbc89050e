"""Train ProCLIP (arXiv 2510.18795) in its two stages.

On one CPU, on the built-in toy world (built into ./toyworld on first use, a few minutes):
    python train.py --stage 1
    python train.py --stage 2 --init runs/<stage-1 run>
On one GPU, on your data (JSONL/CSV rows or webdataset tar shards; the LLM embeddings are cached on first use):
    python train.py --stage 1 --train-data pairs.jsonl --clip CLIP_DIR --llm LLM_DIR --batch-size 1024
    python train.py --stage 2 --init runs/stage1 --train-data 'shards/{00000..00999}.tar' --batch-size 512 --grad-checkpointing
On N GPUs (DDP; --gather-with-grad makes every loss see the global batch):
    torchrun --nproc_per_node 8 train.py --stage 2 --init runs/stage1 --train-data ... --gather-with-grad
Interrupted runs continue with `--resume latest --output RUN`. This file is orchestration; the model math lives in
miniproclip/ (model.py, stages.py, losses.py).
"""

import argparse
import contextlib
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from miniproclip import checkpoint as ckpt
from miniproclip.evaluation import Encoders, RetrievalSet, inference, run_retrieval
from miniproclip.clip import CLIP
from miniproclip.distributed import init_distributed
from miniproclip.data import DataError, ImageTextDataset, caption_texts, epoch_batches, make_loader, read_rows
from miniproclip.embed import ensure_text_cache
from miniproclip.embedder import EmbedSettings, default_batch_tokens
from miniproclip.head import HeadConfig
from miniproclip.image import ImageTransform
from miniproclip.llm import LLMConfig
from miniproclip.losses import ClipLoss, clamp_logit_scale_, ema_update
from miniproclip.model import ProCLIP
from miniproclip.optim import cosine_lr_factor, param_groups
from miniproclip.stages import LossSettings, accumulated_backward, stage1_loss, stage2_loss
from miniproclip.tokenizer import CLIPTokenizer
from miniproclip.weights import ModelFolderError

VISION = ("vision_model.", "visual_projection.")  # the image tower's parameters get --lr-vision
USER_ERRORS = (ModelFolderError, DataError, ckpt.CheckpointError, FileNotFoundError, ValueError)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train ProCLIP: stage 1 (distil CLIP's text encoder into LLM+head), "
                                            "stage 2 (contrastive tuning of the image encoder with L_reg).")
    # run
    p.add_argument("--stage", type=int, choices=(1, 2), required=True, help="1: representation inheritance, 2: contrastive tuning")
    p.add_argument("--init", default=None, help="stage 2: a stage-1 (or stage-2) run folder or checkpoint to start "
                                                "from; 'scratch' = a fresh head (direct alignment, no stage 1)")
    p.add_argument("--resume", default=None, help="'latest' (in --output) or a checkpoint: restore weights, optimizer, data position")
    p.add_argument("--output", default=None, help="run folder (default: runs/stage<N>-<time>)")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    p.add_argument("--keep", type=int, default=3, help="keep the newest N checkpoints")
    p.add_argument("--log-every", type=int, default=1, help="append to metrics.jsonl every N steps")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and caption choice")
    # models
    p.add_argument("--clip", default=None, help="Hugging Face CLIP folder (default: the toy world's teacher)")
    p.add_argument("--llm", default=None, help="Hugging Face LLM folder (default: the toy world's SmolLM2-135M)")
    p.add_argument("--toy-dir", default="toyworld", help="where the toy world is built when no --train-data is given")
    p.add_argument("--head-blocks", type=int, default=1, help="residual MLP blocks of the text head (ProCLIP 1, LLM2CLIP 4)")
    p.add_argument("--head-mlp-ratio", type=int, default=8, help="hidden width of each block / LLM width (ProCLIP 8)")
    p.add_argument("--head-dropout", type=float, default=0.0)
    p.add_argument("--max-length", type=int, default=512, help="LLM tokens per caption")
    p.add_argument("--instruction", default="", help="LLM instruction prefix, excluded from the mean pool")
    p.add_argument("--bidirectional", action="store_true", help="LLM with bidirectional attention (LLM2Vec-style)")
    p.add_argument("--llm-dtype", choices=("fp32", "bf16"), default="bf16",
                   help="LLM weights when filling the cache (bf16: ~2x faster on CPU too, cosine to fp32 >= 0.999)")
    p.add_argument("--text-cache", default=None, help="LLM embedding cache (default: text_cache.safetensors beside the data)")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="padded tokens per LLM batch when filling the cache (default: 8192 on CUDA, 1024 on CPU)")
    # data
    p.add_argument("--train-data", default=None, help="JSONL, CSV/TSV, or tar shards ('a/{000..009}.tar'); default: toy world")
    p.add_argument("--val-data", default=None, help="held-out rows (JSONL/CSV), for --eval-every")
    p.add_argument("--eval-every", type=int, default=0, help="retrieval R@K on --val-data every N steps (0: never)")
    p.add_argument("--csv-img-key", default="filepath")
    p.add_argument("--csv-caption-key", default="title")
    p.add_argument("--csv-separator", default=None, help="default: tab for .tsv, comma for .csv")
    p.add_argument("--strict-data", action="store_true", help="stop at the first malformed row instead of skipping it")
    p.add_argument("--workers", type=int, default=2, help="data loader processes per rank")
    # optimisation
    p.add_argument("--batch-size", type=int, default=64, help="per-rank batch size (after accumulation)")
    p.add_argument("--accum-freq", type=int, default=1, help="micro-batches per step; the loss still sees the whole batch")
    p.add_argument("--epochs", type=int, default=None, help="passes over the data (default: 20 for stage 1, 10 for stage 2)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate of the text head (default: 1e-3 for a fresh head, i.e. stage 1 and "
                        "--init scratch; 1e-4 when stage 2 starts from a trained head, so it keeps what it inherited)")
    p.add_argument("--lr-vision", type=float, default=None,
                   help="peak learning rate of the image encoder in stage 2 (default: 1e-5, a pretrained CLIP's "
                        "fine-tuning rate; 1e-4 on the toy world, whose small ViT barely moves at 1e-5)")
    p.add_argument("--wd", type=float, default=0.05, help="AdamW weight decay (not on biases, norms, embeddings, logit_scale)")
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.98)
    p.add_argument("--eps", type=float, default=1e-6)
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps, then cosine decay to 0")
    p.add_argument("--grad-clip-norm", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--lock-image-layers", type=int, default=0, help="stage 2: freeze patch embedding + first N ViT layers")
    p.add_argument("--max-bad-steps", type=int, default=5, help="stop after N consecutive non-finite losses/gradients")
    # losses
    p.add_argument("--ins-weight", type=float, default=1.0, help="weight of L_ins (stage 1; inside L_reg in stage 2)")
    p.add_argument("--struct-weight", type=float, default=1.0, help="weight of L_struct (stage 1; inside L_reg in stage 2)")
    p.add_argument("--reg-weight", type=float, default=1.0, help="λ, weight of L_reg in stage 2 (0: no self-distillation)")
    p.add_argument("--ema-momentum", type=float, default=1.0, help="L_reg teacher = EMA of the image encoder; 1 keeps the initial one")
    p.add_argument("--skip-truncated-long", action="store_true",
                   help="stage 1: leave long captions the 77-token teacher sees cut out of L_ins (official: distil them cut)")
    p.add_argument("--reduction", choices=("sum", "mean"), default="sum", help="reduction of L_ins/L_struct (official: sum)")
    p.add_argument("--gather-with-grad", action="store_true", help="all losses over the global batch under torchrun")
    p.add_argument("--local-loss", action="store_true", help="InfoNCE of local rows against all (open_clip)")
    # speed
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=("amp_bf16", "amp", "fp32"), default=None,
                   help="autocast dtype (default: amp_bf16 on CUDA, fp32 on CPU); weights stay fp32")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute ViT activations in backward")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    return p.parse_args(argv)


def fill_defaults(args, resumed_meta, init_meta, log):
    """Toy world when no data is given; models and settings from the checkpoint being resumed or started from."""
    for meta in (resumed_meta, init_meta):
        for key in ("clip", "llm"):
            if meta and getattr(args, key) is None:
                setattr(args, key, meta["args"][key])
    toy = args.train_data is None
    if toy:
        from miniproclip.toy.world import build_toyworld
        build_toyworld(args.toy_dir, llm_dir=args.llm, log=log)
        args.train_data = os.path.join(args.toy_dir, "train.jsonl" if args.stage == 1 else "train_stage2.jsonl")
        args.val_data = args.val_data or os.path.join(args.toy_dir, "val.jsonl")
        args.clip = args.clip or os.path.join(args.toy_dir, "clip")
        args.llm = args.llm or os.path.join(args.toy_dir, "smollm2")
    if args.clip is None or args.llm is None:
        raise ValueError("--train-data needs --clip CLIP_DIR and --llm LLM_DIR (or --init/--resume a run that names them)")
    first_source = args.train_data.split("::")[0]
    args.text_cache = args.text_cache or os.path.join(os.path.dirname(os.path.abspath(first_source)), "text_cache.safetensors")
    args.epochs = args.epochs or (20 if args.stage == 1 else 10)
    if args.lr is None:  # not `or`: --lr 0 (a frozen head) is a valid choice
        args.lr = 1e-3 if args.stage == 1 or args.init == "scratch" else 1e-4
    if args.lr_vision is None:
        args.lr_vision = 1e-4 if toy else 1e-5
    args.precision = args.precision or ("amp_bf16" if args.device.startswith("cuda") else "fp32")
    args.batch_tokens = args.batch_tokens or default_batch_tokens(args.device)
    args.output = args.output or os.path.join("runs", f"stage{args.stage}-{time.strftime('%Y%m%d-%H%M%S')}")


def head_config(args, init_meta, llm_dir, projection_dim):
    if init_meta:  # the head's shape is fixed by the checkpoint it comes from
        return HeadConfig(**init_meta["head"])
    hidden = LLMConfig.from_folder(llm_dir).hidden_size
    return HeadConfig(hidden, projection_dim, args.head_blocks, args.head_mlp_ratio, args.head_dropout)


def load_init(model, path, log):
    """Weights of a stage-1 checkpoint (head only) or a stage-2 one (everything) into `model`."""
    _, meta = ckpt.load_trained_weights(model, path)
    log(f"init: stage-{meta['stage']} weights from {path} (step {meta['step']})")


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
    train(args, run, rank, world, log)
    if dist.is_initialized():
        dist.destroy_process_group()


def setup(args, rank, world, log):
    """Everything before the first step: models, data, cache, optimizer, and the state of a resumed run."""
    if args.stage == 2 and not (args.init or args.resume):
        raise ValueError("--stage 2 needs --init RUN_OR_CHECKPOINT (a stage-1 run), or --resume")
    resume_path = None
    if args.resume:
        if args.resume == "latest" and not args.output:
            raise ValueError("--resume latest needs --output RUN naming the run to continue")
        resume_path = ckpt.resolve_checkpoint(args.output if args.resume == "latest" else args.resume)
    resumed_meta = ckpt.load_meta(resume_path) if resume_path else None
    if resumed_meta and resumed_meta.get("stage") != args.stage:
        raise ValueError(f"{resume_path} is a stage-{resumed_meta.get('stage')} checkpoint: resume it with --stage "
                         f"{resumed_meta.get('stage')}, or start stage {args.stage} from it with --init")
    train_state = ckpt.load_train_state(resume_path) if resume_path else None  # a bad one fails here, not mid-run
    # `--init scratch`: stage 2 with a fresh head, i.e. direct contrastive alignment (LLM2CLIP-style ablation)
    init_path = ckpt.resolve_checkpoint(args.init) if args.init and args.init != "scratch" else None
    init_meta = ckpt.load_meta(init_path) if init_path else None
    fill_defaults(args, resumed_meta, init_meta, log)
    if rank == 0:
        ckpt.check_writable(args.output)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    clip = CLIP.from_pretrained(args.clip)  # fp32 master weights; autocast does the low-precision math
    head = head_config(args, init_meta or resumed_meta, args.llm, clip.config.projection_dim)
    if head.output_dim != clip.config.projection_dim:
        raise ValueError(f"{init_path or resume_path}: its head maps to {head.output_dim} dims but {args.clip} has a "
                         f"{clip.config.projection_dim}-dim joint space; use a checkpoint trained with this CLIP")
    llm_width = LLMConfig.from_folder(args.llm).hidden_size
    if head.input_dim != llm_width:
        raise ValueError(f"{init_path or resume_path}: its head takes {head.input_dim}-dim LLM embeddings but "
                         f"{args.llm} is {llm_width} wide; use the --llm it was trained with")
    model = ProCLIP.from_clip(clip, head)
    if init_path:
        load_init(model, init_path, log)
    rows = read_rows(args.train_data, csv_img_key=args.csv_img_key, csv_caption_key=args.csv_caption_key,
                     csv_separator=args.csv_separator, strict=args.strict_data, log=log)
    val_rows = (read_rows(args.val_data, csv_img_key=args.csv_img_key, csv_caption_key=args.csv_caption_key,
                          csv_separator=args.csv_separator, log=log) if args.val_data and args.eval_every else [])
    settings = EmbedSettings(args.max_length, args.instruction, False, not args.bidirectional)
    cache = ensure_text_cache(args.text_cache, args.llm, caption_texts(rows + val_rows), settings,
                              torch.bfloat16 if args.llm_dtype == "bf16" else torch.float32, args.device,
                              args.batch_tokens, log)

    run = {"model": model, "rows": rows, "val_rows": val_rows, "cache": cache, "device": device, "head": head, "resume_path": resume_path,
           "train_state": train_state}
    if args.stage == 1:  # only the head learns; CLIP's text tower is the frozen teacher
        model.requires_grad_(False).text_head.requires_grad_(True)
        run["teacher"] = clip.requires_grad_(False).eval().to(device)
        run["tokenizer"] = CLIPTokenizer.from_folder(args.clip)
        run["transform"] = None  # images are not used
    else:  # the image tower and temperature learn too, against a frozen copy of the initial image tower
        run["teacher"] = model.image_teacher().to(device)
        run["transform"] = ImageTransform.from_folder(args.clip)
        frozen = [model.vision_model.embeddings, model.vision_model.pre_layrnorm]
        frozen += list(model.vision_model.encoder.layers[:args.lock_image_layers]) if args.lock_image_layers else []
        for module in frozen:
            module.requires_grad_(False)
        del clip
    model.vision_model.encoder.grad_checkpointing = args.grad_checkpointing
    model.to(device)
    lr_of = lambda name: ("vision", args.lr_vision) if name.startswith(VISION) else ("head", args.lr)
    run["optimizer"] = torch.optim.AdamW(param_groups(model, args.wd, lr_of), lr=args.lr, betas=(args.beta1, args.beta2),
                                         eps=args.eps)
    run["dataset"] = ImageTextDataset(rows, run["transform"])
    if run["transform"] is not None:  # fail early when the images are not where the rows say
        probe = [run["dataset"][i] for i in range(min(len(rows), 64))]
        if all("bad_image" in sample for sample in probe):
            raise DataError(f"{args.train_data}: none of the first {len(probe)} images is readable (e.g. "
                            f"{probe[0]['bad_image']}); check the image paths, which are relative to the data file")
    run["steps_per_epoch"] = len(epoch_batches(len(rows), args.batch_size, seed=args.seed, epoch=0, rank=rank,
                                               world_size=world))
    log(f"stage {args.stage}: {len(rows)} rows from {args.train_data}, CLIP {args.clip}, LLM {args.llm}, "
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trainable parameters, "
        f"{world} rank(s), precision {args.precision}, output {args.output}")
    return run


def validate(args, run):
    """Retrieval R@K both ways on the --val-data rows (one caption each), with the model as it is now."""
    rows, model, device = run["val_rows"], run["model"], run["device"]
    dataset = RetrievalSet([r.image for r in rows], [r.caption for r in rows], list(range(len(rows))), "val")
    encode_text = inference(lambda texts: model.encode_text(run["cache"](texts).to(device)), device, args.precision)
    encoders = Encoders(args.output, args.clip, ImageTransform.from_folder(args.clip),
                        inference(model.encode_image, device, args.precision), encode_text, lambda texts: 0)
    model.eval()
    report, _ = run_retrieval(encoders, dataset, args.batch_size, 0, device, [k for k in (1, 5, 10) if k <= len(rows)])
    model.train()
    return {f"val/{k}": v for k, v in report["metrics"].items()}


class StopSignal:
    """SIGTERM/SIGINT: finish the current step, save, and exit cleanly (cluster preemption)."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        self.received = signal.Signals(signum).name


def split(batch, parts):
    """A collated batch -> `parts` micro-batches of (nearly) equal size."""
    n = len(batch["captions"])
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [{k: v[a:b] for k, v in batch.items() if v is not None and k != "bad_images"}
            for a, b in zip(bounds, bounds[1:])]


def train(args, run, rank, world, log):
    model, cache, device, optimizer = run["model"], run["cache"], run["device"], run["optimizer"]
    settings = LossSettings(args.ins_weight, args.struct_weight, args.reg_weight, args.reduction,
                            args.gather_with_grad, args.local_loss)
    total_steps = args.max_steps or args.epochs * run["steps_per_epoch"]
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "bad_steps": 0, "bad_images": 0, "bad_image_paths": []}
    scaler = torch.amp.GradScaler(enabled=args.precision == "amp")
    if run["resume_path"]:
        teacher_weights, _ = ckpt.load_trained_weights(model, run["resume_path"])
        if teacher_weights:  # an EMA teacher is state too
            run["teacher"].load_state_dict(teacher_weights)
        saved = run["train_state"]
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        ckpt.set_rng_state(saved["rng"])
        state.update(saved["cursor"])
        log(f"resumed from {run['resume_path']} at step {state['step']}")
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    compiled = torch.compile(ddp) if args.compile else ddp
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if args.precision == "amp_bf16" else torch.float16,
                              enabled=args.precision != "fp32")
    clip_loss = ClipLoss(args.local_loss, args.gather_with_grad, rank, world)
    teacher, tokenizer = run["teacher"], run.get("tokenizer")
    truncated = {"count": 0}

    def stage1_features(mb, student_only):
        short, long_ = mb["captions"], [c for c in mb["long_captions"] if c]
        if args.skip_truncated_long:  # a cut caption's target describes its first 77 tokens only
            long_ = [c for c, cut in zip(long_, tokenizer(long_).truncated.tolist()) if not cut]
        with autocast:
            _, student = compiled(llm_embeddings=cache(short + long_).to(device))
        f = {"student_short": student[:len(short)], "student_long": student[len(short):]}
        if not student_only:  # the teacher sees each caption cut to its 77-token window
            tokens = tokenizer(short + long_)
            truncated["count"] += tokens.num_truncated
            with torch.no_grad(), autocast:
                taught = teacher.encode_text(tokens.input_ids.to(device), normalize=True)
            f["teacher_short"], f["teacher_long"] = taught[:len(short)], taught[len(short):]
        return f

    def stage2_features(mb, student_only):
        pixels = mb["pixels"].to(device, non_blocking=True)
        with autocast:
            image, text = compiled(pixels, cache(mb["text"]).to(device))
        f = {"image": image, "text": text}
        if not student_only:
            with torch.no_grad(), autocast:
                f["teacher_image"] = teacher.encode_image(pixels)
        return f

    if args.stage == 1:
        features_fn, loss_fn = stage1_features, lambda f, last: stage1_loss(f, settings)
    else:
        features_fn = stage2_features
        loss_fn = lambda f, last: stage2_loss(f, settings, clip_loss, model.logit_scale, last)
    trainable = [p for p in model.parameters() if p.requires_grad]
    stop = StopSignal()
    bar = tqdm(total=total_steps, initial=state["step"], disable=rank != 0, dynamic_ncols=True, desc=f"stage {args.stage}")
    last_save = state["step"]
    while state["step"] < total_steps and not stop.received:
        batches = epoch_batches(len(run["rows"]), args.batch_size, seed=args.seed, epoch=state["epoch"],
                                rank=rank, world_size=world)
        loader = make_loader(run["dataset"], batches, args.workers, start_batch=state["batch_in_epoch"])
        # a coin per row and epoch, so the choice does not depend on how rows are split over ranks or resumes
        coins = torch.Generator().manual_seed(args.seed * 1_000_003 + state["epoch"])
        pick_long = (torch.rand(len(run["rows"]), generator=coins) < 0.5).tolist()
        started = time.time()
        for batch in loader:
            state["batch_in_epoch"] += 1  # the data cursor: where a resumed run continues
            if world > 1:  # dropped bad images can leave ranks with unequal batches: all use the smallest
                smallest = torch.tensor(len(batch["captions"]))
                dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
                batch = {k: v[:int(smallest)] if k != "bad_images" and v is not None else v for k, v in batch.items()}
            for path in batch["bad_images"]:  # unreadable images are dropped from the batch, counted and named
                state["bad_images"] += 1
                if state["bad_images"] <= 10:
                    state["bad_image_paths"].append(path)
                    log(f"skipped unreadable image {path}" + (" (further ones are only counted)"
                                                              if state["bad_images"] == 10 else ""))
            if len(batch["captions"]) < 2:  # nothing (or no pair) left to learn from in this batch
                continue
            if args.stage == 2:  # per sample, the short or the long caption at random (the official loader)
                batch["text"] = [lc if (lc and pick_long[i]) else c for i, c, lc in
                                 zip(batch["indices"], batch["captions"], batch["long_captions"])]
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * cosine_lr_factor(state["step"], args.warmup, total_steps)
            optimizer.zero_grad(set_to_none=True)
            loss, parts = accumulated_backward(split(batch, args.accum_freq), features_fn, loss_fn,
                                               ddp.no_sync if world > 1 else contextlib.nullcontext, lambda l: scaler.scale(l).backward())
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip_norm or float("inf"))
            if torch.isfinite(loss) and torch.isfinite(grad_norm):
                scaler.step(optimizer)
                state["bad_steps"] = 0
            else:  # skip the update; the weights stay those of the last good step
                state["bad_steps"] += 1
                log(f"step {state['step']}: non-finite loss {loss.item()} / grad norm {grad_norm.item()}, step skipped")
            scaler.update()
            if args.stage == 2:
                with torch.no_grad():
                    clamp_logit_scale_(model.logit_scale)
                ema_update(teacher, model, args.ema_momentum)
            state["step"] += 1
            record = {"step": state["step"], "epoch": state["epoch"], "loss": loss.item(),
                      **{k: v.item() for k, v in parts.items()}, "lr": optimizer.param_groups[0]["lr"],
                      "grad_norm": grad_norm.item(), "samples_per_s": args.batch_size * world / (time.time() - started),
                      "teacher_truncated": truncated["count"], "bad_images": state["bad_images"]}
            if args.eval_every and run["val_rows"] and state["step"] % args.eval_every == 0 and rank == 0:
                record.update(validate(args, run))
                log(f"step {state['step']}: " + ", ".join(f"{k} {v:.3f}" for k, v in record.items() if k.startswith("val/")))
            if rank == 0:
                bar.set_postfix({k: f"{record[k]:.4g}" for k in ["loss", *parts, "lr"]})
                bar.update(1)
                if state["step"] % args.log_every == 0:
                    try:
                        ckpt.append_metrics(args.output, record)
                    except OSError as err:  # e.g. a full disk: stop now, the last checkpoint is intact
                        sys.exit(f"error: cannot append to {args.output}/metrics.jsonl ({err.strerror}); the last "
                                 "checkpoint is intact: free space, then continue with --resume latest")
            if state["bad_steps"] >= args.max_bad_steps:
                sys.exit(f"error: {state['bad_steps']} consecutive non-finite steps; stopping. The last good "
                         f"checkpoint is kept in {args.output}; try a lower --lr or --precision fp32")
            done = state["step"] >= total_steps
            if done or stop.received or state["step"] % args.save_every == 0:
                save(args, run, state, record, scaler, rank)
                last_save = state["step"]
            if done or stop.received:
                break
            started = time.time()
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    bar.close()
    if last_save != state["step"]:
        save(args, run, state, record, scaler, rank)
    if stop.received:
        log(f"{stop.received}: saved step {state['step']} to {args.output}; continue with "
            f"`python train.py --stage {args.stage} --output {args.output} --resume latest`")
    elif rank == 0:
        next_command = (f"python train.py --stage 2 --init {args.output}" if args.stage == 1
                        else f"python eval.py --task retrieval --model {args.output}")
        log(f"stage {args.stage} done: {state['step']} steps, final loss {record['loss']:.4f}, checkpoints in "
            f"{args.output}\nnext: {next_command}")


def save(args, run, state, record, scaler, rank):
    """Rank 0 writes weights (head only in stage 1), optimizer, RNG and data cursor; the others wait."""
    if rank == 0:
        model = run["model"]
        weights = ({f"text_head.{k}": v for k, v in model.text_head.state_dict().items()} if args.stage == 1
                   else dict(model.state_dict()))
        if args.stage == 2 and args.ema_momentum < 1:  # an EMA teacher is state too
            weights.update({f"teacher.{k}": v for k, v in run["teacher"].state_dict().items()})
        meta = {"stage": args.stage, "step": state["step"], "args": vars(args), "head": run["head"].__dict__,
                "metrics": record, "bad_image_paths": state["bad_image_paths"]}
        train_state = {"optimizer": run["optimizer"].state_dict(), "scaler": scaler.state_dict(),
                       "rng": ckpt.rng_state(), "cursor": {k: v for k, v in state.items()}}
        try:
            ckpt.save_checkpoint(args.output, state["step"], weights, train_state, meta, keep=args.keep)
            ckpt.write_run_meta(args.output, meta)
        except ckpt.CheckpointError as err:  # e.g. the disk filled up: the previous checkpoint is intact
            sys.exit(f"error: {err}, then continue with --resume latest")
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main()
