"""Numeric precision in one place: the --precision names, their autocast, weight dtypes, and each device's default.

Training keeps fp32 master weights and runs the matmuls under autocast (open_clip's `--precision amp_bf16`); a
frozen tower that only ever runs under autocast may be stored in the autocast dtype instead. Norms, softmax,
logits and losses stay fp32 (losses.py turns autocast off around them).
"""

import contextlib

import torch

PRECISIONS = ("amp_bf16", "amp", "fp32")  # bf16 autocast; fp16 autocast + GradScaler; no autocast
AUTOCAST_DTYPES = {"amp_bf16": torch.bfloat16, "amp": torch.float16}  # --precision -> autocast dtype
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # weight dtype names (--llm-dtype, the embed CLI's --dtype)


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX), where bf16 runs several times faster."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_precision(device) -> str:
    """amp_bf16 on GPUs and on CPUs with bf16 instructions, fp32 on other CPUs (bf16 matmuls are slow there).
    On such a CPU bench/precision.py finds every stage's step and eval's encoders faster in bf16 (its table is in
    BENCHMARKS.md)."""
    if str(device).startswith("cuda"):
        return "amp_bf16"
    return "amp_bf16" if cpu_has_bf16() else "fp32"


def describe(precision: str, device) -> str:
    """The start-up line's words: 'precision amp_bf16 (this CPU's default: it has bf16 instructions)'."""
    if precision != default_precision(device):
        return f"precision {precision}"
    if str(device).startswith("cuda"):
        return f"precision {precision} (the GPU default)"
    return f"precision {precision} (this CPU's default: it has {'' if cpu_has_bf16() else 'no '}bf16 instructions)"


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype a module runs in under `precision`: its autocast dtype, fp32 without autocast."""
    return AUTOCAST_DTYPES.get(precision, torch.float32)


def autocast(device_type: str, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of `precision` on `device_type` ("cuda" or "cpu"); a disabled one for fp32."""
    return torch.autocast(device_type, dtype=compute_dtype(precision) if precision in AUTOCAST_DTYPES
                          else torch.bfloat16, enabled=precision in AUTOCAST_DTYPES)
