"""train.py's flags (open_clip's params.py) and the rules that give the unset ones their values.

argparse leaves the stage-dependent defaults None. config.py's `resolve_config` is the one function that writes
the run's settings: it applies, in this order, what a resumed run brings (`inherited_settings`), the toy world's
(toy/defaults.py, without --train-data) and each stage's (`stage_defaults`). The functions here only read the
flags and return values. `parse_args` also returns the flags typed on the command line: a resumed run takes every
other setting from its checkpoint.
"""

import argparse
import os
import time
from dataclasses import dataclass

import torch

from ..checkpoint import CheckpointError, config_sections, load_meta, resolve_checkpoint
from ..embed import text_cache_path
from ..embedder import PRESETS, default_batch_tokens
from ..errors import TrainingError
from ..precision import PRECISIONS, default_precision
from .stage0 import LLM2CLIP_LR, LLM2CLIP_TEMPERATURE, STAGE0_OPTIMIZER


def parse_args(argv=None) -> tuple[argparse.Namespace, set[str]]:
    """(the flags' values, the names of those typed on the command line)."""
    p = argparse.ArgumentParser(description="Train ProCLIP: stage 0 (LoRA caption-contrastive fine-tune of the "
                                            "LLM embedder), stage 1 (distil CLIP's text encoder into LLM+head), "
                                            "stage 2 (contrastive tuning of the image encoder with L_reg).")
    # run
    p.add_argument("--stage", type=int, choices=(0, 1, 2), required=True,
                   help="0: LLM embedder (LoRA, optional), 1: representation inheritance, 2: contrastive tuning")
    p.add_argument("--init", default=None, help="stage 2: a stage-1 (or stage-2) run folder or checkpoint to start "
                                                "from; 'scratch' = a fresh head (direct alignment, no stage 1)")
    p.add_argument("--resume", default=None,
                   help="'latest' (in --output) or a checkpoint: restore weights, optimizer, data position")
    p.add_argument("--output", default=None, help="run folder (default: runs/stage<N>-<time>)")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    p.add_argument("--keep", type=int, default=3, help="keep the newest N checkpoints")
    p.add_argument("--log-every", type=int, default=1, help="append to metrics.jsonl every N steps")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and caption choice")
    # models
    p.add_argument("--clip", default=None, help="Hugging Face CLIP folder, or open_clip folder (ViT, EVA02-CLIP) "
                                                "(default: the toy world's teacher)")
    p.add_argument("--llm", default=None, help="Hugging Face LLM folder (default on the toy world: its stage-0 embedder in "
                                               "stages 1-2, SmolLM2-135M in stage 0)")
    p.add_argument("--toy-dir", default="toyworld", help="where the toy world is built when no --train-data is given")
    p.add_argument("--head-blocks", type=int, default=1,
                   help="residual MLP blocks of the text head (ProCLIP 1, LLM2CLIP 4)")
    p.add_argument("--head-mlp-ratio", type=int, default=8, help="hidden width of each block / LLM width (ProCLIP 8)")
    p.add_argument("--head-dropout", type=float, default=0.0, help="dropout inside the head's MLP blocks")
    p.add_argument("--max-length", type=int, default=512, help="LLM tokens per caption")
    p.add_argument("--instruction", default="", help="LLM instruction prefix, excluded from the mean pool")
    p.add_argument("--bidirectional", action="store_true", help="LLM with bidirectional attention (LLM2Vec-style)")
    p.add_argument("--embed-preset", choices=PRESETS, default="default",
                   help="named embedding settings: llm2vec-llama3, qwen3-embedding, e5-mistral, gte-qwen2, "
                        "nv-embed-v2 (README, 'Embedder presets')")
    p.add_argument("--llm-dtype", choices=("fp32", "bf16"), default="bf16",
                   help="LLM weights when filling the cache (bf16: ~2x faster on CPU too, cosine to fp32 >= 0.999)")
    p.add_argument("--text-cache", default=None,
                   help="LLM embedding cache (default: text_cache.safetensors beside the data; on the toy "
                        "world TOY_DIR/text_cache_<LLM>.safetensors)")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="padded tokens per LLM batch when filling the cache (default: 8192 on CUDA, 1024 on CPU)")
    # data
    p.add_argument("--train-data", default=None,
                   help="JSONL, CSV/TSV, or tar shards ('a/{000..009}.tar'); default: the toy world")
    p.add_argument("--val-data", default=None, help="held-out rows (JSONL/CSV), for --eval-every; stage 0: held-out "
                                                    "groups, measured at the end of the run")
    p.add_argument("--eval-every", type=int, default=0, help="retrieval R@K on --val-data every N steps (0: never)")
    p.add_argument("--csv-img-key", default="filepath", help="CSV/TSV column of the image paths")
    p.add_argument("--csv-caption-key", default="title", help="CSV/TSV column of the captions")
    p.add_argument("--csv-separator", default=None, help="default: tab for .tsv, comma for .csv")
    p.add_argument("--strict-data", action="store_true", help="stop at the first malformed row instead of skipping it")
    p.add_argument("--workers", type=int, default=2, help="data loader processes per rank")
    p.add_argument("--train-crop", choices=("random", "center"), default="random",
                   help="stage 2's training transform: RandomResizedCrop of 90-100%% of the area (official), or "
                        "CLIP's deterministic centre crop")
    # optimisation
    p.add_argument("--batch-size", type=int, default=64, help="per-rank batch size (after accumulation)")
    p.add_argument("--accum-freq", type=int, default=1,
                   help="micro-batches per step; the loss still sees the whole batch")
    p.add_argument("--epochs", type=int, default=None,
                   help="passes over the data (default: 1 in stage 0, 20 in stage 1, 10 in stage 2)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate of the text head (default: 1e-3 for a fresh head, i.e. stage 1 and "
                        "--init scratch; 1e-4 when stage 2 starts from a trained head, so it keeps what it inherited; "
                        "on the toy world, its recipe's: toy/defaults.py)")
    p.add_argument("--lr-vision", type=float, default=None,
                   help="peak learning rate of the image encoder in stage 2 (default: 1e-5, a pretrained CLIP's "
                        "fine-tuning rate; on the toy world, its recipe's: toy/defaults.py)")
    p.add_argument("--wd", type=float, default=0.05,
                   help="AdamW weight decay (not on biases, norms, embeddings, logit_scale)")
    p.add_argument("--beta1", type=float, default=0.9, help="AdamW β1")
    p.add_argument("--beta2", type=float, default=0.98, help="AdamW β2 (CLIP's)")
    p.add_argument("--eps", type=float, default=1e-6, help="AdamW ε (CLIP's)")
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps, then cosine decay to 0")
    p.add_argument("--grad-clip-norm", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--lock-image-layers", type=int, default=None,
                   help="stage 2: freeze the patch/class/position embeddings, pre_layrnorm and the first N ViT "
                        "layers (default: the whole image tower trains, as the official code)")
    p.add_argument("--max-bad-steps", type=int, default=5, help="stop after N consecutive non-finite losses/gradients")
    # losses
    p.add_argument("--ins-weight", type=float, default=1.0, help="weight of L_ins (stage 1; inside L_reg in stage 2)")
    p.add_argument("--struct-weight", type=float, default=1.0,
                   help="weight of L_struct (stage 1; inside L_reg in stage 2)")
    p.add_argument("--reg-weight", type=float, default=1.0,
                   help="λ, weight of L_reg in stage 2 (0: no self-distillation)")
    p.add_argument("--long-prob", type=float, default=0.5,
                   help="stage 2: chance that a row with a long caption shows it instead of its short one")
    p.add_argument("--reg-scope", choices=("device", "global"), default="device",
                   help="stage 2 under torchrun: L_reg over each device's rows (official; DDP averages it over the "
                        "W ranks) or over the gathered global batch")
    p.add_argument("--ema-momentum", type=float, default=1.0,
                   help="L_reg teacher = EMA of the image encoder; 1 keeps the initial one")
    p.add_argument("--skip-truncated-long", action=argparse.BooleanOptionalAction, default=None,
                   help="stage 1: leave long captions the 77-token teacher sees cut out of L_ins (default: on in the "
                        "toy world, whose long captions are filler up to token 77; off, as the official code, else)")
    p.add_argument("--reduction", choices=("sum", "mean"), default="sum",
                   help="reduction of L_ins/L_struct (official: sum)")
    p.add_argument("--gather-with-grad", action="store_true",
                   help="under torchrun, gather features with their gradient: every rank's rows get the global "
                        "batch's InfoNCE gradient (without it InfoNCE still sees all ranks' features as negatives, "
                        "but only through the local rows), and stage 1's L_ins/L_struct span the global batch")
    p.add_argument("--local-loss", action="store_true", help="InfoNCE of local rows against all (open_clip)")
    p.add_argument("--loss", dest="contrastive_loss", choices=("clip", "sigmoid"), default="clip",
                   help="stage 2's contrastive loss: clip (InfoNCE, CLIP's) or sigmoid (SigLIP's, with a learnable "
                        "bias: a SigLIP folder's own scale and bias, else log 10 and -10; texts pass between "
                        "neighbouring ranks under torchrun)")
    # speed
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu (default: cuda when available); under torchrun each rank takes its LOCAL_RANK GPU")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="autocast dtype (default: amp_bf16 on CUDA and on CPUs with bf16 instructions, else fp32); "
                        "weights stay fp32; amp = fp16 with a GradScaler")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute ViT activations in backward")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (dynamic shapes in stage 1)")
    g = p.add_argument_group("stage 0 (caption-contrastive LoRA fine-tuning of the LLM, LLM2CLIP)")
    g.add_argument("--lora-rank", type=int, default=16, help="LoRA rank r (LLM2CLIP: 16)")
    g.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha; the update is scaled by alpha/r")
    g.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the adapters' input")
    g.add_argument("--lora-targets", default="q,k,v,o,gate,up,down",
                   help="comma-separated projections that get adapters (q = q_proj, ...)")
    g.add_argument("--temperature", type=float, default=None,
                   help="InfoNCE temperature (default: 0.02, LLM2CLIP's scale 50; 0.05 on the toy groups)")
    args = p.parse_args(argv)
    # the flags given on this command line: parsed again into a namespace where every flag already holds a marker
    # (argparse sets a default only where the namespace has none), the typed ones replace it
    unset = object()
    typed = p.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    return args, {name for name, value in vars(typed).items() if value is not unset}


# -----------------------------------------------------------------------------
# --resume and --init: which checkpoints a run starts from, and the settings a resumed run keeps

PER_LAUNCH = {"resume", "device", "workers"}  # settings of a launch, never taken from a checkpoint
FIXED_ON_RESUME = ("train_data", "batch_size")  # the data cursor counts batches of these: a change is refused


@dataclass
class Checkpoints:
    """The checkpoint a run resumes (--resume) and the one it starts from (--init), with their metas."""
    resume_path: str | None = None
    resumed_meta: dict | None = None
    init_path: str | None = None
    init_meta: dict | None = None


def find_checkpoints(args, given: set[str], world: int) -> Checkpoints:
    """The run's checkpoints, each checked against the flags; a bad one fails here, before any work."""
    if args.stage == 2 and not (args.init or args.resume):
        raise CheckpointError("--stage 2 needs --init RUN_OR_CHECKPOINT (a stage-1 run), or --resume")
    if args.resume == "latest" and not args.output:
        raise CheckpointError("--resume latest needs --output RUN naming the run to continue")
    found = Checkpoints()
    if args.resume:
        found.resume_path = resolve_checkpoint(args.output if args.resume == "latest" else args.resume)
        found.resumed_meta = load_meta(found.resume_path)
        stage = found.resumed_meta.get("stage")
        if stage != args.stage:
            raise CheckpointError(f"{found.resume_path} is a stage-{stage} checkpoint: resume it with --stage "
                                  f"{stage}, or start stage {args.stage} from it with --init")
        if found.resumed_meta.get("world_size", world) != world:
            raise CheckpointError(f"{found.resume_path} was trained on {found.resumed_meta['world_size']} rank(s), "
                                  f"not {world}: its data position counts per-rank batches; resume it with the same "
                                  "number of processes")
    # a resumed stage-2 run rebuilds its teacher from its own --init; `--init scratch` is stage 2 with a fresh head
    init = config_sections(found.resumed_meta)["run"].get("init") if found.resumed_meta and "init" not in given \
        else args.init
    if args.stage != 0 and init and init != "scratch":
        found.init_path = resolve_checkpoint(init)
        found.init_meta = load_meta(found.init_path)
        if found.init_meta.get("stage") == 0:  # LoRA weights of an LLM, not a ProCLIP model
            raise CheckpointError(f"{found.init_path} is a stage-0 checkpoint: pass its run's merged LLM as --llm "
                                  "RUN/llm")
    return found


def inherited_settings(args, given: set[str], found: Checkpoints, saved: dict | None, init_config) -> dict:
    """`--resume`: every flag not given again comes from the run being resumed (`saved`, its plain config sections'
    values by flag name: its data, models, losses, schedule, ...), so the command a stopped run prints continues
    the same run. Else the CLIP and LLM that the --init checkpoint's config (`init_config`) names, where not given."""
    if saved is None:
        names = vars(init_config.models) if init_config else {}
        return {key: names[key] for key in ("clip", "llm") if getattr(args, key) is None and names.get(key)}
    for key in FIXED_ON_RESUME:
        if key in given and saved.get(key) != getattr(args, key):
            flag = "--" + key.replace("_", "-")
            raise CheckpointError(f"{found.resume_path} was trained with {flag} {saved.get(key)}; a resumed run keeps "
                                  f"it (its data position counts those batches): leave {flag} out, or start a new "
                                  f"run with --init {found.resume_path}")
    return {key: value for key, value in saved.items() if key not in given and key not in PER_LAUNCH}


# -----------------------------------------------------------------------------
# each stage's defaults

def stage_defaults(args, fixed: set[str]) -> dict:
    """The values of the flags still unset (and of those stage 0 sets differently, where not in `fixed`: typed, or
    brought by a resumed run). Stage 0: LLM2CLIP's recipe (lr 2e-4, temperature 0.02, 1 epoch, warmup 10% of the
    steps, `warmup_ratio`), LLM2Vec's optimizer, and no loader processes unless --workers is typed. Stages 1-2:
    20 / 10 epochs, the head's lr 1e-3 when fresh (stage 1, --init scratch) else 1e-4, the image tower's 1e-5, the
    text cache beside the data."""
    if args.stage == 0 and args.llm is None:
        raise TrainingError("--stage 0 needs --llm LLM_DIR, the Hugging Face LLM to fine-tune")
    if args.stage != 0 and (args.clip is None or args.llm is None):
        raise TrainingError("--train-data needs --clip CLIP_DIR and --llm LLM_DIR (or --init/--resume a run that "
                            "names them)")
    values = {"output": args.output or os.path.join("runs", f"stage{args.stage}-{time.strftime('%Y%m%d-%H%M%S')}"),
              "batch_tokens": args.batch_tokens or default_batch_tokens(args.device)}
    if args.stage == 0:
        if args.init:
            raise TrainingError("--init is for stage 2; stage 0 starts from --llm (continue a run with --resume)")
        values.update({key: value for key, value in STAGE0_OPTIMIZER.items() if key not in fixed})
        if "warmup" not in fixed:
            values.update(warmup=0, warmup_ratio=0.1)  # 10% of the steps (counted at setup)
        if "workers" not in fixed:
            values["workers"] = 0  # the texts are in memory: no loader processes
        return {**values, "epochs": args.epochs or 1, "lr": LLM2CLIP_LR if args.lr is None else args.lr,
                "temperature": LLM2CLIP_TEMPERATURE if args.temperature is None else args.temperature,
                "precision": args.precision or default_precision(args.device)}
    # the text cache sits beside the (first) data source, so every run on that data shares it
    first_source = os.path.abspath(args.train_data.split("::")[0])
    return {**values, "text_cache": args.text_cache or text_cache_path(os.path.dirname(first_source)),
            "epochs": args.epochs or (20 if args.stage == 1 else 10),
            # not `or`: --lr 0 (a frozen head) is a valid choice
            "lr": args.lr if args.lr is not None else 1e-3 if args.stage == 1 or args.init == "scratch" else 1e-4,
            "lr_vision": 1e-5 if args.lr_vision is None else args.lr_vision,
            "skip_truncated_long": bool(args.skip_truncated_long),
            "precision": args.precision or default_precision(args.device)}
