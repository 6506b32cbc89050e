"""Paper scale, simulated on one machine: memory and restart costs of the embedding cache and the data index.

    python bench/scale.py                  # the run recorded in BENCHMARKS.md ("Paper scale")
    python bench/scale.py --quick          # small sizes, about half a minute (the CI smoke test)
    python bench/scale.py --parts project  # only the projection table for CC3M, CC12M and a 60M mix

Parts:
- embed: peak resident memory (ru_maxrss) of `python -m miniproclip.embed` at growing numbers of texts, with a
  tiny random Llama (hidden 256, 2 layers, the issue's setting), each run a fresh process.
- resume: the same command killed with SIGKILL once half of its chunks are written, then run again: the rerun's
  time against a full run's, and the per-row cosine between the resumed cache and the uninterrupted one.
- rows: `read_rows` of a CC3M-like JSONL (an image path and a 6-20 word caption per row): bytes per row as compact
  Rows and as the list of Row objects the loader used to keep, and the PSS (proportional set size: shared pages
  split between the processes sharing them) of the main process + 2 DataLoader workers after one pass.
- tar: indexing webdataset shards the first time (a scan that writes the sidecars) and the next time (sidecars).
- project: storage, RAM per rank and extraction GPU-hours at paper scale, computed from the assumptions below.
"""

import argparse
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

import torch

import common  # bench/common.py; also puts the repository on sys.path
from embed import WORDS, tiny_llm_folder  # bench/embed.py: caption words and the tiny Llama
from miniproclip.data import read_rows
from miniproclip.loader import ImageTextDataset, epoch_batches, make_loader
from miniproclip.embed import load_cache

# ----------------------------------------------------------------------------- projection assumptions
DATASETS = {"CC3M": 3.0e6, "CC12M": 10.0e6, "LLM2CLIP 60M mix": 60.0e6}  # images (downloadable share of each)
TEXTS_PER_IMAGE = 2  # a short and a long caption per image, as ProCLIP trains
TOKENS = {"short": 20, "long": 150}  # mean tokens per caption (Llama-3 tokenizer, BOS included)
ROW_TEXT_BYTES = 40 + 70 + 800  # image path + short caption + long caption, UTF-8 bytes per row
LLMS = {"Llama-3-8B": (4096, 6.98e9), "1B LLM (Llama-3.2-1B)": (2048, 0.97e9)}  # width, non-embedding params
GPU_PEAK, MFU = 989e12, 0.4  # H100 SXM dense bf16 FLOP/s, and the share of it a forward-only pass is assumed to get
PADDING = 0.06  # length-bucketed batches pad ~6% (BENCHMARKS.md, bench/embed.py on 4096 captions)
INDEX_BYTES_PER_TEXT = 12  # the cache's lookup: an int64 hash prefix + an int32 row per text


def write_texts(path: str, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) + "\n")


def embed_command(llm: str, texts: str, output: str, threads: int) -> tuple[list[str], dict]:
    command = [sys.executable, "-m", "miniproclip.embed", "--llm", llm, "--texts", texts, "--output", output,
               "--dtype", "fp32", "--device", "cpu", "--chunk-texts", "4096"]
    return command, {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(common.REPO)}


def run_measured(command: list[str], env: dict) -> tuple[float, float]:
    """(seconds, peak resident MiB) of a child process (its own ru_maxrss, from wait4)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {process.stderr.read().decode()[-2000:]}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def embed_memory(root: str, llm: str, sizes: list[int], threads: int) -> str:
    rows = []
    for n in sizes:
        texts = os.path.join(root, f"texts_{n}.txt")
        write_texts(texts, n)
        seconds, peak = run_measured(*embed_command(llm, texts, os.path.join(root, f"c_{n}.safetensors"), threads))
        rows.append([f"{n:,}", f"{seconds:.1f}", f"{peak:.0f}", f"{peak / rows[0][4] if rows else 1:.2f}", peak])
    return common.markdown_table(["texts", "seconds", "peak RSS MiB", f"peak / peak at {sizes[0]:,}"],
                                 [row[:4] for row in rows])


def kill_and_resume(root: str, llm: str, n: int, threads: int) -> str:
    texts = os.path.join(root, f"resume_{n}.txt")
    write_texts(texts, n, seed=1)
    whole, killed = os.path.join(root, "whole.safetensors"), os.path.join(root, "killed.safetensors")
    full_seconds, _ = run_measured(*embed_command(llm, texts, whole, threads))
    command, env = embed_command(llm, texts, killed, threads)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts, half = killed + ".parts", -(-n // 4096) // 2
    start = time.perf_counter()
    while process.poll() is None and len([p for p in os.listdir(parts) if p.endswith(".safetensors")]
                                          if os.path.isdir(parts) else []) < half:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_after = time.perf_counter() - start
    written = len([p for p in os.listdir(parts) if p.endswith(".safetensors")])
    rerun_seconds, _ = run_measured(command, env)
    a, b = load_cache(whole)[0].float(), load_cache(killed)[0].float()
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=1)
    table = common.markdown_table(
        ["texts", "chunks", "full run s", "killed after s (chunks written)", "rerun s", "rerun / full",
         "min cosine to uninterrupted", "bitwise equal"],
        [[f"{n:,}", -(-n // 4096), f"{full_seconds:.1f}", f"{killed_after:.1f} ({written})", f"{rerun_seconds:.1f}",
          f"{rerun_seconds / full_seconds:.2f}", f"{cosine.min().item():.6f}", torch.equal(a, b)]])
    return table


def write_rows_jsonl(path: str, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 20)))
            f.write(json.dumps({"image": f"images/{i // 10000:04d}/{i:08d}.jpg", "caption": caption}) + "\n")


def pss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Pss:")) / 1024


def rows_child(source: str, kind: str) -> dict:
    """In a fresh process: bytes per row of `kind` rows and the PSS of main + 2 workers after one loader pass."""
    before = common.proc_status_mib("VmRSS")
    rows = read_rows(source)
    if kind == "list":  # the old layout: one Row object (with its strings) per row
        rows = list(rows)
    resident = (common.proc_status_mib("VmRSS") - before) * 2**20
    batches = epoch_batches(len(rows), 1024, seed=0, epoch=0)
    loader = iter(make_loader(ImageTextDataset(rows), batches, workers=2))
    for step, _ in enumerate(loader):
        if step == len(batches) - 1:  # every worker has touched its share of the rows; none has exited yet
            pss = pss_mib(os.getpid()) + sum(pss_mib(w.pid) for w in loader._workers)
    sample = [rows[i] for i in range(min(len(rows), 10000))]
    text = sum(len(r.image.encode()) + len(r.caption.encode()) for r in sample) / len(sample)
    return {"bytes_per_row": resident / len(rows), "text_bytes_per_row": text, "pss_mib": pss}


def rows_memory(root: str, n: int) -> str:
    source = os.path.join(root, "rows.jsonl")
    write_rows_jsonl(source, n)
    out = {kind: common.run_child(__file__, ["--rows-child", source, kind], memory_env=True)
           for kind in ("compact", "list")}
    text = out["compact"]["text_bytes_per_row"]
    return common.markdown_table(
        ["rows", "layout", "bytes per row", "/ text bytes per row", "PSS main + 2 workers after one pass, MiB"],
        [[f"{n:,}", name, f"{out[kind]['bytes_per_row']:.0f}", f"{out[kind]['bytes_per_row'] / text:.2f}",
          f"{out[kind]['pss_mib']:.0f}"]
         for kind, name in (("compact", "Rows (now)"), ("list", "list of Row (before)"))]
    ) + f"\n\ntext bytes per row (image path + caption, UTF-8): {text:.0f}"


def tar_index(root: str, n: int, per_shard: int = 10000) -> str:
    rng, shards = random.Random(0), -(-n // per_shard)
    for s in range(shards):
        with tarfile.open(os.path.join(root, f"shard-{s:04d}.tar"), "w") as tar:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                for name, data in ((f"{i:08d}.jpg", bytes(200)),
                                   (f"{i:08d}.txt", " ".join(rng.choice(WORDS) for _ in range(12)).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    pattern = os.path.join(root, f"shard-{{0000..{shards - 1:04d}}}.tar")
    times = []
    for _ in range(2):  # first: scan + write the sidecars; second: read them
        start = time.perf_counter()
        assert len(read_rows(pattern)) == n
        times.append(time.perf_counter() - start)
    per = 1e5 / n
    return common.markdown_table(["samples", "shards", "first index s (scan)", "next index s (sidecar)",
                                  "scan s / 100k", "sidecar s / 100k", "speed-up"],
                                 [[f"{n:,}", shards, f"{times[0]:.2f}", f"{times[1]:.3f}", f"{times[0] * per:.2f}",
                                   f"{times[1] * per:.3f}", f"{times[0] / times[1]:.0f}×"]])


def projection() -> str:
    """Storage, RAM per rank and extraction GPU-hours at paper scale, from the constants at the top."""
    rows = []
    for data, images in DATASETS.items():
        texts = images * TEXTS_PER_IMAGE
        tokens = images * sum(TOKENS.values()) * (1 + PADDING)
        ram = images * (ROW_TEXT_BYTES + 24) + texts * INDEX_BYTES_PER_TEXT
        for llm, (width, params) in LLMS.items():
            tokens_per_s = MFU * GPU_PEAK / (2 * params)  # forward only: 2 FLOPs per weight per token
            storage = " / ".join(f"{texts * width * b / 1e9:,.0f}" for b in (4, 2, 2))
            rows.append([data, f"{texts / 1e6:.0f}M", llm, storage, f"{ram / 1e9:.1f}",
                         f"{tokens_per_s / 1e3:.0f}k", f"{tokens / tokens_per_s / 3600:,.0f}"])
    return common.markdown_table(["data", "texts", "LLM", "cache GB fp32 / fp16 / bf16", "RAM per rank GB",
                                  "tokens/s per GPU (derived)", "extraction GPU-hours"], rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_machine_args(parser)
    parser.add_argument("--parts", nargs="+", default=["embed", "resume", "rows", "tar", "project"],
                        choices=["embed", "resume", "rows", "tar", "project"])
    parser.add_argument("--embed-sizes", type=int, nargs="+", default=[50_000, 250_000])
    parser.add_argument("--resume-texts", type=int, default=100_000)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--tar-samples", type=int, default=100_000)
    parser.add_argument("--rows-child", nargs=2, help=argparse.SUPPRESS)  # internal: SOURCE KIND
    args = parser.parse_args(argv)
    if args.rows_child:
        print(json.dumps(rows_child(*args.rows_child)))
        return
    if args.quick:
        args.embed_sizes, args.resume_texts, args.rows, args.tar_samples = [2000, 10000], 12000, 20000, 4000
    device, dtype = common.setup(args)
    threads = args.threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory() as root:
        for folder in ("llm", "tar"):
            os.makedirs(os.path.join(root, folder))
        llm = tiny_llm_folder(os.path.join(root, "llm"), hidden=256)
        for part, (title, run) in {
            "embed": ("embed CLI peak memory", lambda: embed_memory(root, llm, args.embed_sizes, threads)),
            "resume": ("killed and resumed", lambda: kill_and_resume(root, llm, args.resume_texts, threads)),
            "rows": ("data rows", lambda: rows_memory(root, args.rows)),
            "tar": ("tar index", lambda: tar_index(os.path.join(root, "tar"), args.tar_samples)),
            "project": ("projection (derived from FLOPs, not measured)", projection),
        }.items():
            if part in args.parts:
                print(f"\n## {title}\n\n{run()}")
    print("\n" + common.machine_line(device, dtype))


if __name__ == "__main__":
    main()
