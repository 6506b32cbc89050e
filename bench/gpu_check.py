"""The GPU check of issue 12: one script, markdown tables, under 8 minutes on one large GPU.

1. Both stages end to end through train.py's CLI (each run a subprocess) on a ViT-B/16-sized CLIP with random
   weights in HF layout (written by transformers, with the real CLIP tokenizer) and the real SmolLM2-135M, on
   random images with short and long captions: stage 1 under amp_bf16 and --compile, stage 2 (from it) under
   amp_bf16, amp (fp16 + GradScaler), --compile, --grad-checkpointing and --accum-freq 2.
2. Stage-2 step speed and memory (bench/train_step.py): images/s, MFU at batch 256 bf16, peak memory with and
   without gradient checkpointing, eager and compiled.
3. Forward time and memory against transformers on identical weights (bench/forward.py).
4. LLM embedding throughput: length-bucketed batches vs padded fixed-size batching (bench/embed.py).
5. L_struct's distances vs F.pdist, and the LLM's attention before/after with a math-kernel-free check
   (bench/attention.py).

Every section fails soft: an error or a timeout is printed in its table row and the next section runs.

    python bench/gpu_check.py                        # on a GPU: prints the tables for BENCHMARKS.md
    python bench/gpu_check.py --device cpu --quick   # the same code paths on tiny models (CI, under 3 minutes)
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import common  # bench/common.py; also puts the repository on sys.path
import embed as embed_bench  # bench/embed.py: the caption words and its tiny LLM folder
import forward as forward_bench  # bench/forward.py: the CLIP ViT-B/16 config
import transformers
from miniproclip.tokenizer import save_clip_tokenizer_json

BENCH = Path(__file__).resolve().parent
# (label, stage, extra train.py flags); stage 2 runs start from the first stage-1 run
TRAIN_RUNS = [("stage 1, amp_bf16", 1, ["--precision", "amp_bf16"]),
              ("stage 1, amp_bf16, --compile", 1, ["--precision", "amp_bf16", "--compile"]),
              ("stage 2, amp_bf16", 2, ["--precision", "amp_bf16"]),
              ("stage 2, amp (fp16, GradScaler)", 2, ["--precision", "amp"]),
              ("stage 2, amp_bf16, --compile", 2, ["--precision", "amp_bf16", "--compile"]),
              ("stage 2, amp_bf16, --grad-checkpointing", 2, ["--precision", "amp_bf16", "--grad-checkpointing"]),
              ("stage 2, amp_bf16, --accum-freq 2", 2, ["--precision", "amp_bf16", "--accum-freq", "2"])]


def write_world(root: Path, quick: bool) -> dict[str, str]:
    """A CLIP folder (random weights, HF layout), the LLM folder and a JSONL of random images with captions."""
    torch.manual_seed(0)
    clip = transformers.CLIPModel(forward_bench.clip_config(quick))
    with torch.no_grad():  # HF initialises the class token to a constant
        clip.vision_model.embeddings.class_embedding.normal_()
    clip.save_pretrained(root / "clip")
    save_clip_tokenizer_json(str(root / "clip" / "tokenizer.json"))
    size = clip.config.vision_config.image_size
    with open(root / "clip" / "preprocessor_config.json", "w") as f:
        json.dump({"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": size},
                   "crop_size": {"height": size, "width": size}, "do_resize": True, "do_center_crop": True,
                   "do_normalize": True, "resample": 3, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711]}, f)
    if quick:
        os.makedirs(root / "llm")
        llm = embed_bench.tiny_llm_folder(str(root / "llm"))
    else:
        llm = str(common.smollm2_folder())
    n = 16 if quick else 512
    texts, _ = embed_bench.captions(2 * n, long_share=0.0, long_range=(0, 0))
    long_texts, _ = embed_bench.captions(n, long_share=1.0, long_range=(40, 80) if quick else (100, 300), seed=1)
    rng = np.random.default_rng(0)
    os.makedirs(root / "data" / "images")
    rows = []
    for i in range(n):
        path = f"images/{i:05d}.jpg"
        Image.fromarray(rng.integers(0, 255, (size + 16, size + 32, 3), dtype=np.uint8)).save(root / "data" / path)
        row = {"image": path, "caption": texts[i]}
        if i % 2 == 0:
            row["long_caption"] = long_texts[i]
        rows.append(row)
    with open(root / "data" / "train.jsonl", "w") as f:
        f.write("\n".join(json.dumps(row) for row in rows) + "\n")
    return {"clip": str(root / "clip"), "llm": llm, "data": str(root / "data" / "train.jsonl")}


def time_left(args, limit: float) -> float:
    """Seconds the next subprocess may take: its own limit, cut to what is left of --budget."""
    return min(limit, args.budget - (time.perf_counter() - args.started))


def first_error_line(text: str) -> str:
    """The last line that looks like an error (a traceback's final line), shortened for a table cell."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "rror" in line or line.startswith("error")]
    return ((errors or lines or ["no output"])[-1])[:160].replace("|", "/")


def run_train(label: str, stage: int, extra: list[str], world: dict, root: Path, args) -> list:
    """One train.py run as a subprocess: a table row with its status, time, steps and last loss."""
    out = root / f"run{len(list(root.glob('run*')))}"
    steps = 2 if args.quick else 10
    flags = ["--stage", str(stage), "--train-data", world["data"], "--clip", world["clip"], "--llm", world["llm"],
             "--output", str(out), "--device", args.device, "--workers", "0" if args.quick else "4",
             "--batch-size", "4" if args.quick else "64", "--max-steps", str(steps), "--warmup", "1",
             "--text-cache", str(root / "text_cache.safetensors"), *extra]
    if stage == 2:
        flags += ["--init", str(root / "run0")]  # the first stage-1 run
    start, timeout = time.perf_counter(), time_left(args, args.run_timeout)
    if timeout <= 0:
        return [label, "skipped: the time budget is spent", "–", "–", "–", "–"]
    try:
        done = subprocess.run([sys.executable, str(BENCH.parent / "train.py"), *flags], capture_output=True,
                              text=True, timeout=timeout, cwd=str(root))
    except subprocess.TimeoutExpired:
        return [label, f"timed out after {timeout:.0f} s", "–", "–", "–", "–"]
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        return [label, "failed: " + first_error_line(done.stderr + done.stdout), f"{seconds:.0f}", "–", "–", "–"]
    with open(out / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    last = records[-1]
    return [label, "ok", f"{seconds:.0f}", last["step"], f"{last['loss']:.4g}", f"{last.get('samples_per_s', 0):.1f}"]


def end_to_end(args) -> str:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        try:
            world = write_world(root, args.quick)
        except Exception as err:  # noqa: BLE001 - fail soft: the other sections still run
            return common.markdown_table(["run", "status"], [["writing the models and data", f"failed: {err!r}"]])
        runs = TRAIN_RUNS if not args.quick else [r for r in TRAIN_RUNS if "--compile" not in r[2] or args.compile]
        for label, stage, extra in runs:
            rows.append(run_train(label, stage, extra, world, root, args))
    return common.markdown_table(["train.py run", "status", "wall s (with loading, cache, compile)", "steps",
                                  "last loss", "samples/s (last step)"], rows)


def bench_script(script: str, argv: list[str], args) -> str:
    """Another bench script's tables as they print them, or a one-row table with its error or timeout."""
    cmd = [sys.executable, str(BENCH / script), "--device", args.device, *argv] + ["--quick"] * args.quick
    cmd += ["--threads", str(args.threads)] if args.threads else []
    timeout = time_left(args, args.bench_timeout)
    if timeout <= 0:
        return common.markdown_table(["script", "status"], [[script, "skipped: the time budget is spent"]])
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return common.markdown_table(["script", "status"], [[script, f"timed out after {timeout:.0f} s"]])
    if done.returncode != 0:
        return common.markdown_table(["script", "status"],
                                     [[script, "failed: " + first_error_line(done.stderr + done.stdout)]])
    return done.stdout.strip()


SECTIONS = {"train": "1. Both stages end to end (train.py CLI)",
            "step": "2. Stage-2 step: speed, MFU, peak memory (bench/train_step.py)",
            "forward": "3. Forward vs transformers (bench/forward.py)",
            "embed": "4. LLM embedding throughput (bench/embed.py)",
            "attention": "5. L_struct distances and LLM attention (bench/attention.py)"}


def main(argv=None):
    parser = argparse.ArgumentParser(description="The GPU check of issue 12: all sections, markdown tables.")
    common.add_machine_args(parser)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--compile", action="store_true", help="with --quick: also the --compile runs (slow on CPU)")
    parser.add_argument("--run-timeout", type=int, default=None,
                        help="seconds per train.py run (default 150, 90 quick)")
    parser.add_argument("--bench-timeout", type=int, default=240, help="seconds per bench script")
    parser.add_argument("--budget", type=int, default=450, help="seconds for everything: later runs are skipped")
    args = parser.parse_args(argv)
    device, dtype = common.setup(args)
    args.run_timeout = args.run_timeout or (90 if args.quick else 150)
    args.started = started = time.perf_counter()
    transformers.utils.logging.disable_progress_bar()
    tables = {"train": lambda: end_to_end(args),
              "step": lambda: bench_script("train_step.py", ["--configs", "eager", "grad-checkpointing", "compile"]
                                           if device.type == "cuda" else [], args),
              "forward": lambda: bench_script("forward.py", [], args),
              "embed": lambda: bench_script("embed.py", [], args),
              # on CPU the distances table alone takes minutes (python bench/attention.py runs it)
              "attention": lambda: bench_script("attention.py", [] if device.type == "cuda"
                                                else ["--only", "attention"], args)}
    for name in args.sections:
        section_start = time.perf_counter()
        try:
            body = tables[name]()
        except Exception as err:  # noqa: BLE001 - fail soft: print the error where the table would be
            body = common.markdown_table(["section", "status"], [[name, f"failed: {err!r}"[:200]]])
        print(f"\n### {SECTIONS[name]} ({time.perf_counter() - section_start:.0f} s)\n\n{body}", flush=True)
    print("\n" + common.machine_line(device, dtype))
    print(f"gpu_check: {time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    sys.exit(main())
