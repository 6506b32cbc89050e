"""Training steps: stage 2's time, samples/s and peak memory ± --grad-checkpointing ± --compile; both stages' step
time with the frozen teacher live and with the teacher caches.

A step is train.py's stage-2 step on one device without data loading: the image tower and the text head
(ProCLIP's: 1 residual block, r=8) on cached LLM embeddings, the frozen teacher tower for L_reg, InfoNCE + L_reg,
backward, gradient clipping, AdamW, the logit-scale clamp. The image tower is ViT-B/16-shaped (random weights),
all of it trained as in train.py (without --lock-image-layers); on CUDA the step runs under bf16 autocast with fp32
weights (`--precision amp_bf16`). Each configuration runs in a fresh process, so its peak memory is its own: on
CPU the process's maximum resident set, on CUDA `torch.cuda.max_memory_allocated` (weights, optimizer state and
activations). FLOPs are counted by `torch.utils.flop_counter` on the warm-up step of the eager configuration
(model FLOPs: checkpointing's recomputation is not counted as useful); model TFLOP/s = those FLOPs / step time,
MFU = that / the GPU's peak dense bf16 FLOP/s.

The second table (issue 12, item 7) times a toy-world step of each stage with its frozen teacher run live, as
before the teacher caches (CLIP tokenisation, caption hashing and the teacher forward every step), against the
step train.py runs now (`Stage1` / `Stage2` reading teacher_cache.py's caches by row index), interleaved in one
process; for stage 1 also the head's step on inputs already on the device, the bound a cache can reach.

    python bench/train_step.py --tables teacher-caches   # the second table only
    python bench/train_step.py                  # CPU: batch 8, fp32, text embeddings of SmolLM2's width (576)
    python bench/train_step.py --device cuda    # batch 256, bf16 autocast, Llama-3-8B's width (4096), MFU
    python bench/train_step.py --quick          # tiny shapes (the CI smoke test)
"""

import argparse
import contextlib
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import torch
from torch.utils.flop_counter import FlopCounterMode

import common  # bench/common.py; also puts the repository on sys.path
from miniproclip.clip import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from miniproclip.head import HeadConfig
from miniproclip.losses import ClipLoss, clamp_logit_scale_
from miniproclip.model import ProCLIP
from miniproclip.precision import autocast
from miniproclip.training.stages import LossSettings, accumulated_backward, attention_for_training, stage1_loss, \
    stage2_loss

CONFIGS = {"eager": [], "grad-checkpointing": ["--grad-checkpointing"], "compile": ["--compile"],
           "compile + grad-checkpointing": ["--compile", "--grad-checkpointing"]}
# Dense bf16 tensor-core peaks (TFLOP/s) from NVIDIA's data sheets; the first name found in the device name wins.
# Other GPUs get no MFU unless --peak-tflops is given.
PEAK_BF16_TFLOPS = [("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("A100", 312),
                    ("L40S", 362), ("L4", 121)]


def vision_config(quick: bool) -> CLIPVisionConfig:
    if quick:
        return CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                image_size=64, patch_size=16)
    return CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            image_size=224, patch_size=16)


def build_step(args, device: torch.device):
    """A closure running one stage-2 step of the ViT-B/16-shaped tower (bf16 autocast on CUDA, fp32 on CPU)."""
    config = CLIPConfig(vision=vision_config(args.quick), text=CLIPTextConfig(), projection_dim=512)
    return stage2_step(config, args.batch_size, args.llm_dim, device, "amp_bf16" if device.type == "cuda" else "fp32",
                       args.grad_checkpointing, args.compile)


def stage2_step(config: CLIPConfig, batch_size: int, llm_dim: int, device: torch.device, precision: str,
                grad_checkpointing: bool = False, compile: bool = False):
    """(step, trainable parameter count): a closure running one stage-2 step on a fixed random batch, as train.py's
    loop does (its autocast, and SDPA's math kernel for the trained tower on a CPU); also bench/precision.py's."""
    torch.manual_seed(0)
    model = ProCLIP(config, HeadConfig(llm_dim, config.projection_dim))
    teacher = model.image_teacher().to(device)  # the whole image tower trains, as train.py's default
    model.vision_model.encoder.grad_checkpointing = grad_checkpointing
    model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05)
    compiled = torch.compile(model) if compile else model
    size = config.vision.image_size
    pixels = torch.randn(batch_size, 3, size, size, device=device)
    llm_embeddings = torch.randn(batch_size, llm_dim, device=device)  # stands in for the text cache
    settings, clip_loss = LossSettings(), ClipLoss()

    def features(micro_batch, student_only):
        with autocast(device.type, precision), attention_for_training(device, grad_checkpointing):
            image, text = compiled(pixels, llm_embeddings)
        f = {"image": image, "text": text}
        if not student_only:
            with torch.no_grad(), autocast(device.type, precision):
                f["teacher_image"] = teacher.encode_image(pixels)
        return f

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss, _ = accumulated_backward([None], features,
                                       lambda f, last: stage2_loss(f, settings, clip_loss, model.logit_scale, last))
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        clamp_logit_scale_(model.logit_scale)
        return loss

    return step, sum(p.numel() for p in trainable)


def run_config(args, device: torch.device) -> dict:
    """In the child: warm-up steps (the first one counted for FLOPs unless compiled), then timed steps."""
    step, n_trainable = build_step(args, device)
    built = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else common.proc_status_mib("VmRSS")
    flops = None
    for i in range(args.warmup):
        if i == 0 and not args.compile:
            with FlopCounterMode(display=False) as counter:
                step()
            flops = counter.get_total_flops()
        else:
            step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        common.sync(device)
        start = time.perf_counter()
        loss = step()
        common.sync(device)
        times.append(time.perf_counter() - start)
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss.item()}")
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux reports KiB
    return {"times": times, "peak_mib": peak, "built_mib": built, "flops": flops, "trainable": n_trainable}


# ----------------------------------------------------------------------------- teacher caches: before and after

def toy_folder(root: Path, device: torch.device, quick: bool):
    """A toy-world-shaped CLIP folder (random weights; 2 layers with --quick), toy captions (every row with a long
    caption of ~100-180 CLIP tokens, as the toy world's) and random pixels; the LLM cache holds random vectors."""
    from safetensors.torch import save_file
    from miniproclip.clip import CLIP, save_hf_config
    from miniproclip.data import Row
    from miniproclip.embed import ensure_vector_cache
    from miniproclip.tokenizer import save_clip_tokenizer_json
    from miniproclip.toy.teacher import toy_clip_config
    torch.manual_seed(0)
    config = toy_clip_config()
    if quick:
        config.vision.num_hidden_layers = config.text.num_hidden_layers = 2
    save_hf_config(config, str(root))
    save_file({k: v.contiguous() for k, v in CLIP(config).state_dict().items()}, str(root / "model.safetensors"))
    save_clip_tokenizer_json(str(root / "tokenizer.json"))
    words = "a photo of the small large red blue green circle square triangle on grass table left right".split()
    rng = np.random.default_rng(0)
    rows = [Row(f"{i}.png", " ".join(rng.choice(words, 6)), " ".join(rng.choice(words, rng.integers(100, 180))))
            for i in range(4 * 64)]
    texts = [t for row in rows for t in (row.caption, row.long_caption)]
    llm_cache = ensure_vector_cache(str(root / "text_cache.safetensors"), texts,
                                    lambda: lambda batch: torch.randn(len(batch), 576), {"what": "random"}, log=id)
    pixels = torch.randn(len(rows), 3, config.vision.image_size, config.vision.image_size)
    return CLIP.from_pretrained(str(root)).to(device), rows, llm_cache, pixels


def teacher_cache_steps(args, device: torch.device, root: Path) -> dict:
    """name -> one training step: stage 1 and stage 2, each with the teacher live (the code before the caches:
    CLIP tokenisation, caption hashing and the teacher forward every step) and with the caches (train.py's)."""
    from miniproclip.embed import ensure_vector_cache
    from miniproclip.training.stages import HeadOnly, Stage1, Stage2
    from miniproclip.training.teacher_cache import RowVectors, caption_columns, stage1_vectors
    from miniproclip.tokenizer import CLIPTokenizer
    clip, rows, llm_cache, pixels = toy_folder(root, device, args.quick)
    tokenizer = CLIPTokenizer.from_folder(str(root))
    run_autocast = autocast(device.type, "amp_bf16" if device.type == "cuda" else "fp32")  # precision.py's
    llm, taught = stage1_vectors(llm_cache, rows, str(root), device, run_autocast, log=id)
    model = ProCLIP.from_clip(clip, HeadConfig(576, clip.config.projection_dim)).to(device)
    teacher = model.image_teacher()
    images = ensure_vector_cache(str(root / "images.safetensors"), [row.image for row in rows], lambda: (
        lambda keys: teacher.encode_image(pixels[[int(k[:-4]) for k in keys]].to(device)).float().cpu()),
        {"what": "toy"}, store_dtype="fp32", log=id)
    settings, batch = LossSettings(), {"indices": list(range(args.teacher_batch))}
    batch.update(captions=[rows[i].caption for i in batch["indices"]], pixels=pixels[:args.teacher_batch],
                 long_captions=[rows[i].long_caption for i in batch["indices"]])
    text_side = HeadOnly(model)

    def live_stage1(mb, student_only):  # the stage-1 features before the caches
        texts = mb["captions"] + [c for c in mb["long_captions"] if c]
        student = text_side(llm_cache(texts).to(device))
        with torch.no_grad(), run_autocast:
            teacher_text = clip.encode_text(tokenizer(texts).input_ids.to(device), normalize=True)
        n = len(mb["captions"])
        return {"student_short": student[:n], "student_long": student[n:], "teacher_short": teacher_text[:n],
                "teacher_long": teacher_text[n:]}

    def live_stage2(mb, student_only):  # the stage-2 features before the caches
        pixels_on = mb["pixels"].to(device)
        with run_autocast:
            image, text = model(pixels_on, llm_cache(mb["captions"]).to(device))
            with torch.no_grad():
                return {"image": image, "text": text, "teacher_image": teacher.encode_image(pixels_on)}

    # the Stage fields the loop alone uses (dataset, optimizer groups, validation, next command) are left out
    common_args = dict(model=model, no_sync=contextlib.nullcontext, dataset=rows, lr_of=None, validate=None,
                       next_command="", device=device, autocast=run_autocast, loss_settings=settings)
    stage1 = Stage1(forward=text_side, llm_vectors=llm, teacher_vectors=taught, skip_truncated_long=False, **common_args)
    stage2 = Stage2(forward=model, teacher=None, llm_vectors=RowVectors.map(llm_cache, caption_columns(rows)),
                    teacher_vectors=RowVectors.map(images, [(row.image for row in rows)]), contrastive_loss=ClipLoss(),
                    ema_momentum=1.0, long_prob=0.0, seed=0, **common_args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(features, loss_fn, prepare=lambda b: b):
        def run():
            optimizer.zero_grad(set_to_none=True)
            accumulated_backward([prepare(dict(batch))], features, loss_fn)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        return run

    with torch.no_grad():  # the stage-1 inputs of the batch, already on the device: what no cache can beat
        fixed = {k: v.detach() for k, v in stage1.features(dict(batch), False).items() if k.startswith("teacher")}
        fixed_input = llm.to_device(np.concatenate([llm.rows[batch["indices"], 0], llm.rows[batch["indices"], 1]]),
                                    device)

    def head_alone(mb, student_only):
        student = text_side(fixed_input)
        return {"student_short": student[:args.teacher_batch], "student_long": student[args.teacher_batch:], **fixed}

    loss1 = lambda f, last: stage1_loss(f, settings)
    loss2 = lambda f, last: stage2_loss(f, settings, ClipLoss(), model.logit_scale, last)
    return {"stage 1, live teacher": step(live_stage1, loss1), "stage 1, caches": step(stage1.features, loss1),
            "stage 1, head alone": step(head_alone, loss1),
            "stage 2, live frozen teacher": step(live_stage2, loss2),
            "stage 2, cached teacher": step(stage2.features, stage2.loss,
                                            lambda b: stage2.prepare(b, 0))}


def teacher_cache_table(args, device: torch.device) -> str:
    """Before/after table: each stage's two steps timed interleaved (common.interleaved_times)."""
    with tempfile.TemporaryDirectory() as tmp:
        steps = teacher_cache_steps(args, device, Path(tmp))
        times = common.interleaved_times(steps, device, warmup=2, repeats=args.teacher_repeats)
    rows = []
    for before, after in (("stage 1, live teacher", "stage 1, caches"),
                          ("stage 2, live frozen teacher", "stage 2, cached teacher")):
        ratio = common.ratio_summary(times[before], times[after])
        rows += [[before, f"{statistics.median(times[before]) * 1e3:.1f}", "1.00"],
                 [after, f"{statistics.median(times[after]) * 1e3:.1f}", ratio]]
        if before.startswith("stage 1"):  # the bound: the head's step on inputs already on the device
            rows.append(["stage 1, head alone (inputs on the device)",
                         f"{statistics.median(times['stage 1, head alone']) * 1e3:.1f}",
                         common.ratio_summary(times[before], times["stage 1, head alone"])])
    return common.markdown_table(["toy-world step (batch %d)" % args.teacher_batch, "step ms",
                                  "speed-up (range over rounds)"], rows)


def peak_bf16_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def configurations_table(args, device: torch.device) -> str:
    """The stage-2 step in each configuration, each in a fresh process: time, memory, FLOPs (and MFU on CUDA)."""
    cuda = device.type == "cuda"
    shared = ["--device", args.device, "--batch-size", str(args.batch_size), "--llm-dim", str(args.llm_dim),
              "--steps", str(args.steps), "--warmup", str(args.warmup)] + ["--quick"] * args.quick
    shared += ["--threads", str(args.threads)] if args.threads else []
    results = {name: common.run_child(__file__, ["--child", *shared, *CONFIGS[name]]) for name in args.configs}
    model_flops = results.get("eager", {}).get("flops")
    peak = peak_bf16_flops(device, args.peak_tflops) if cuda else None
    baseline = results.get("eager")
    rows = []
    for name, r in results.items():
        seconds = statistics.median(r["times"])
        row = [name, f"{seconds * 1e3:.0f}", f"{args.batch_size / seconds:.1f}", f"{r['peak_mib']:.0f}",
               f"{r['peak_mib'] - r['built_mib']:.0f}",
               f"{r['peak_mib'] / baseline['peak_mib']:.2f}" if baseline else "–",
               f"{r['flops'] / 1e9:.3g}" if r["flops"] else "–",
               f"{model_flops / seconds / 1e12:.3g}" if model_flops else "–"]
        if cuda:
            row.append(f"{100 * model_flops / seconds / peak:.1f}%" if model_flops and peak else "–")
        rows.append(row)
    headers = ["configuration", "step ms", "samples/s", "peak MiB", "peak above the built model MiB",
               "peak / eager", "counted GFLOP/step",
               "model TFLOP/s"]
    note = (f"batch {args.batch_size}, text embeddings of width {args.llm_dim}, "
            f"{results[args.configs[0]]['trainable'] / 1e6:.1f}M trainable parameters; median of {args.steps} "
            f"steps after {args.warmup} warm-up step(s), each configuration in a fresh process; peak MiB: "
            + ("max_memory_allocated" if cuda else "the process's maximum resident set")
            + "; the built model: weights and teacher, before the first step (no gradients or AdamW state yet)")
    return common.markdown_table(headers + (["MFU"] if cuda else []), rows) + "\n" + note


def main(argv=None):
    parser = argparse.ArgumentParser(description="Stage-2 training step: time, samples/s, peak memory, MFU.")
    common.add_machine_args(parser)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 on CPU, 256 on CUDA, 2 with --quick")
    parser.add_argument("--llm-dim", type=int, default=None, help="width of the cached text embeddings "
                        "(default: 576, SmolLM2's, on CPU; 4096, Llama-3-8B's as in the paper, on CUDA)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 2 on CPU, 10 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 on CPU, 3 on CUDA)")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=None,
                        help="default: all four on CUDA; on CPU the first three (compiling a ViT-B/16 step takes over "
                             "a minute on 2 cores), with --quick the first two")
    parser.add_argument("--tables", nargs="+", choices=("configurations", "teacher-caches"),
                        default=["configurations", "teacher-caches"], help="which tables to print")
    parser.add_argument("--teacher-batch", type=int, default=None,
                        help="batch of the teacher-cache table (default: 64, the toy world's; 8 with --quick)")
    parser.add_argument("--teacher-repeats", type=int, default=None, help="timed rounds of that table (default 10)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU")
    parser.add_argument("--grad-checkpointing", action="store_true", help=argparse.SUPPRESS)  # set in the child
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device, dtype = common.setup(args)
    cuda = device.type == "cuda"
    args.batch_size = args.batch_size or (2 if args.quick else 256 if cuda else 8)
    args.llm_dim = args.llm_dim or (32 if args.quick else 4096 if cuda else 576)
    args.steps = args.steps or (2 if args.quick or not cuda else 10)
    args.warmup = args.warmup or (1 if args.quick or not cuda else 3)
    args.teacher_batch = args.teacher_batch or (8 if args.quick else 64)
    args.teacher_repeats = args.teacher_repeats or (3 if args.quick else 10)
    args.configs = args.configs or list(CONFIGS)[:2 if args.quick else 4 if cuda else 3]
    if args.child:
        print(json.dumps(run_config(args, device)))
        return
    if "configurations" in args.tables:
        print(configurations_table(args, device))
    if "teacher-caches" in args.tables:
        print("\n" + teacher_cache_table(args, device))
        print("teacher caches: a toy-world step (CLIP 64 wide, %d layers; LLM embeddings 576 wide; every row with a "
              "long caption) with the frozen teacher run live as before (CLIP tokenisation, caption hashing, teacher "
              "forward every step) and read from the caches (train.py now); interleaved, median of %d rounds"
              % (2 if args.quick else 4, args.teacher_repeats))
    print(common.machine_line(device, torch.bfloat16 if cuda else dtype)
          + (" (autocast, fp32 weights)" if cuda else ""))


if __name__ == "__main__":
    sys.exit(main())
