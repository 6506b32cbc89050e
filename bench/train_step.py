"""Stage-2 training step: time, samples/s and peak memory, with and without --grad-checkpointing and --compile.

A step is train.py's stage-2 step on one device without data loading: the image tower and the text head
(ProCLIP's: 1 residual block, r=8) on cached LLM embeddings, the frozen teacher tower for L_reg, InfoNCE + L_reg,
backward, gradient clipping, AdamW, the logit-scale clamp. The image tower is ViT-B/16-shaped (random weights),
its patch embedding and pre-norm frozen as in train.py; on CUDA the step runs under bf16 autocast with fp32
weights (`--precision amp_bf16`). Each configuration runs in a fresh process, so its peak memory is its own: on
CPU the process's maximum resident set, on CUDA `torch.cuda.max_memory_allocated` (weights, optimizer state and
activations). FLOPs are counted by `torch.utils.flop_counter` on the warm-up step of the eager configuration
(model FLOPs: checkpointing's recomputation is not counted as useful); model TFLOP/s = those FLOPs / step time,
MFU = that / the GPU's peak dense bf16 FLOP/s.

    python bench/train_step.py                  # CPU: batch 8, fp32, text embeddings of SmolLM2's width (576)
    python bench/train_step.py --device cuda    # batch 256, bf16 autocast, Llama-3-8B's width (4096), MFU
    python bench/train_step.py --quick          # tiny shapes (the CI smoke test)
"""

import argparse
import json
import resource
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import common  # bench/common.py; also puts the repository on sys.path
from miniproclip.clip import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from miniproclip.head import HeadConfig
from miniproclip.losses import ClipLoss, clamp_logit_scale_
from miniproclip.model import ProCLIP
from miniproclip.stages import LossSettings, accumulated_backward, stage2_loss

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
    """A closure running one stage-2 step on a fixed random batch, as train.py's loop does."""
    torch.manual_seed(0)
    config = CLIPConfig(vision=vision_config(args.quick), text=CLIPTextConfig(), projection_dim=512)
    model = ProCLIP(config, HeadConfig(args.llm_dim, config.projection_dim))
    teacher = model.image_teacher().to(device)
    for frozen in (model.vision_model.embeddings, model.vision_model.pre_layrnorm):  # frozen in stage 2
        frozen.requires_grad_(False)
    model.vision_model.encoder.grad_checkpointing = args.grad_checkpointing
    model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05)
    compiled = torch.compile(model) if args.compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    size = config.vision.image_size
    pixels = torch.randn(args.batch_size, 3, size, size, device=device)
    llm_embeddings = torch.randn(args.batch_size, args.llm_dim, device=device)  # stands in for the text cache
    settings, clip_loss = LossSettings(), ClipLoss()

    def features(micro_batch, student_only):
        with autocast:
            image, text = compiled(pixels, llm_embeddings)
        f = {"image": image, "text": text}
        if not student_only:
            with torch.no_grad(), autocast:
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


def peak_bf16_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


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
    args.configs = args.configs or list(CONFIGS)[:2 if args.quick else 4 if cuda else 3]
    if args.child:
        print(json.dumps(run_config(args, device)))
        return
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
    print(common.markdown_table(headers + (["MFU"] if cuda else []), rows))
    print(common.machine_line(device, torch.bfloat16 if cuda else dtype)
          + (" (autocast, fp32 weights)" if cuda else ""))
    print(f"batch {args.batch_size}, text embeddings of width {args.llm_dim}, "
          f"{results[args.configs[0]]['trainable'] / 1e6:.1f}M trainable parameters; median of {args.steps} "
          f"steps after {args.warmup} warm-up step(s), each configuration in a fresh process; peak MiB: "
          + ("max_memory_allocated" if cuda else "the process's maximum resident set")
          + "; the built model: weights and teacher, before the first step (no gradients or AdamW state yet)")


if __name__ == "__main__":
    sys.exit(main())
