"""Two kernels of issue 12, old and new side by side in one run: L_struct's pairwise distances and the LLM's SDPA.

1. L_struct (`structure_loss`): `F.pdist` (the official code's) vs `pairwise_distances` (cdist forward, pdist's
   backward formula as (B, B) matrices). Forward + backward time and peak memory at batch B, width D; each side's
   memory is measured in a fresh child process (CPU: peak resident set under `common.cpu_memory_env`; CUDA:
   `max_memory_allocated`). The last column is what CUDA's pdist backward allocates for its (B-1)·B·D
   differences, computed, not measured: the CPU kernel loops instead, so the CPU table cannot show it. On a GPU
   pdist is skipped when that buffer would not fit in half the free memory.
2. LLM attention (`DecoderLM`): the code before this change (a boolean (B, 1, T, T) mask on every padded or
   bidirectional batch, always with `enable_gqa`) vs now (no mask for unpadded and right-padded causal batches, a
   (B, 1, 1, T) key mask for bidirectional ones, kv heads repeated when masked on a GPU), on a SmolLM2-shaped
   decoder (GQA 9/3 heads; fewer layers than its 30 on CPU: the per-layer ratio is what matters). On CUDA the
   last column says whether the call runs with SDPA's math kernel disabled (flash, efficient, cuDNN only).

    python bench/attention.py                 # CPU fp32
    python bench/attention.py --device cuda   # bf16, larger batches, the kernel check
    python bench/attention.py --quick         # tiny shapes (the CI smoke test)
"""

import argparse
import contextlib
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import common  # bench/common.py; also puts the repository on sys.path
from miniproclip.llm import Attention, DecoderLM, LLMConfig, rotate_half
from miniproclip.losses import pairwise_distances

# ----------------------------------------------------------------------------- 1. pairwise distances


def distance_step(name: str, x: torch.Tensor) -> float:
    """Forward + backward of sum(distances * weights) by `name`'s kernel; returns the seconds it took."""
    leaf = x.detach().clone().requires_grad_(True)
    start = time.perf_counter()
    if name == "F.pdist":
        distances = F.pdist(leaf)  # (B(B-1)/2,)
    else:
        distances = pairwise_distances(leaf).triu(1)  # (B, B), the same pairs above the diagonal
    distances.sum().backward()
    common.sync(x.device)
    return time.perf_counter() - start


def distance_child(args, device: torch.device) -> dict:
    """In a fresh process: one warm-up step, then the peak memory of one step and the median time of three."""
    x = torch.randn(args.rows, args.width, device=device)
    distance_step(args.distance_child, x)
    peak = common.peak_memory_mib(lambda: distance_step(args.distance_child, x), device)
    seconds = statistics.median(distance_step(args.distance_child, x) for _ in range(3))
    return {"peak_mib": peak, "ms": seconds * 1e3}


def distance_table(args, device: torch.device) -> str:
    rows = []
    sizes = [(64, 32)] if args.quick else [(1024, 768), (2048, 768)] + [(4096, 768)] * (device.type == "cuda")
    for n, width in sizes:
        cuda_buffer_mib = (n - 1) * n * width * 4 / 2**20
        results = {}
        for name in ("F.pdist", "pairwise_distances"):
            free = torch.cuda.mem_get_info(device)[0] / 2**20 if device.type == "cuda" else None
            if name == "F.pdist" and free is not None and cuda_buffer_mib > free / 2:
                results[name] = None  # would not fit: the point of the change
                continue
            argv = ["--distance-child", name, "--rows", str(n), "--width", str(width), "--device", args.device]
            argv += ["--threads", str(args.threads)] if args.threads else []
            results[name] = common.run_child(__file__, argv, memory_env=device.type == "cpu")
        old, new = results["F.pdist"], results["pairwise_distances"]
        cell = (lambda r, key, fmt: fmt.format(r[key]) if r else "skipped (out of memory)")
        rows.append([f"{n}×{width}", cell(old, "ms", "{:.2f}"), cell(new, "ms", "{:.2f}"),
                     cell(old, "peak_mib", "{:.0f}"), cell(new, "peak_mib", "{:.0f}"), f"{cuda_buffer_mib:.0f}"])
    return common.markdown_table(["B×D", "pdist ms", "ours ms", "pdist peak MiB", "ours peak MiB",
                                  "CUDA pdist backward buffer MiB (computed)"], rows)


# ----------------------------------------------------------------------------- 2. LLM attention, before and after

def legacy_mask(self, attention_mask, T, device):
    """DecoderLM.attention_mask before this change: a (B, 1, T, T) boolean mask for any padding or when
    bidirectional."""
    plain = attention_mask is None or bool(attention_mask.all())
    if plain and self.causal and (self.config.sliding_window is None or T <= self.config.sliding_window):
        return None
    i = torch.arange(T, device=device)
    allowed = i[:, None] >= i[None, :] if self.causal else torch.ones(T, T, dtype=torch.bool, device=device)
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
        allowed = allowed | torch.eye(T, dtype=torch.bool, device=device)
    return allowed


def legacy_attention(self, x, cos, sin, mask):
    """Attention.forward before this change: `enable_gqa` with or without a mask."""
    B, T, _ = x.shape
    q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
    k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
    v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                       enable_gqa=self.n_kv_heads != self.n_heads)
    return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


@contextlib.contextmanager
def legacy_path():
    saved = DecoderLM.attention_mask, Attention.forward
    DecoderLM.attention_mask, Attention.forward = legacy_mask, legacy_attention
    try:
        yield
    finally:
        DecoderLM.attention_mask, Attention.forward = saved


def attention_batches(batch: int, T: int, vocab: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(ids, mask) per case: full rows; right padding with lengths T/4..T (the embedder's); left padding."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, T), generator=g)
    lengths = torch.linspace(T // 4, T, batch).long()
    right = (torch.arange(T)[None] < lengths[:, None]).long()  # 1…1 0…0
    return {"unpadded": (ids, torch.ones_like(right)), "right-padded": (ids, right),
            "left-padded": (ids, right.flip(1))}


def fast_kernels_only(fn, device: torch.device) -> str:
    """On CUDA: whether `fn` runs with SDPA's math kernel disabled."""
    if device.type != "cuda":
        return "–"
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
            fn()
        return "yes"
    except RuntimeError as err:
        return "no (" + str(err).splitlines()[0][:60] + ")"


def attention_table(args, device: torch.device, dtype: torch.dtype) -> str:
    layers = 2 if args.quick else 30 if device.type == "cuda" else 4
    config = (LLMConfig(vocab_size=1000, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                        num_attention_heads=3, num_key_value_heads=1, head_dim=16) if args.quick else
              LLMConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                        num_attention_heads=9, num_key_value_heads=3, head_dim=64))
    batch, T = (4, 32) if args.quick else (64, 512) if device.type == "cuda" else (4, 512)
    torch.manual_seed(0)
    models = {causal: DecoderLM(config, causal=causal).to(device, dtype).eval() for causal in (True, False)}
    rows = []
    with torch.inference_mode():
        for case, (ids, mask) in attention_batches(batch, T, config.vocab_size).items():
            ids, mask = ids.to(device), mask.to(device)
            for causal, model in models.items():
                def new():
                    return model(ids, mask)

                def old():
                    with legacy_path():
                        return model(ids, mask)
                real = mask.bool()
                diff = (new()[real].float() - old()[real].float()).abs().max().item()
                times = common.interleaved_times({"old": old, "new": new}, device, warmup=1, repeats=args.repeats)
                rows.append([f"{'causal' if causal else 'bidirectional'}, {case}", f"{batch}×{T}",
                             f"{statistics.median(times['old']) * 1e3:.1f}",
                             f"{statistics.median(times['new']) * 1e3:.1f}",
                             common.ratio_summary(times["new"], times["old"]), f"{diff:.1e}",
                             fast_kernels_only(old, device), fast_kernels_only(new, device)])
    print(f"decoder: SmolLM2-135M's shape with {layers} layers" if not args.quick else "decoder: a tiny GQA Llama")
    return common.markdown_table(["attention, batch", "B×T", "before ms", "now ms", "ratio now/before (range)",
                                  "max |diff|", "before: no math kernel", "now: no math kernel"], rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description="pdist vs pairwise_distances; the LLM's SDPA before vs now.")
    common.add_machine_args(parser)
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per side (default 3; 10 on CUDA)")
    parser.add_argument("--only", choices=("distances", "attention"), default=None, help="one of the two tables")
    parser.add_argument("--distance-child", default=None, help=argparse.SUPPRESS)  # in the child: one kernel
    parser.add_argument("--rows", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device, dtype = common.setup(args)
    if args.distance_child:
        print(json.dumps(distance_child(args, device)))
        return
    args.repeats = args.repeats or (10 if device.type == "cuda" else 3)
    if args.only != "attention":
        print("L_struct's pairwise distances, forward + backward (fp32):\n" + distance_table(args, device))
    if args.only != "distances":
        print("\nLLM forward, attention before and after:\n" + attention_table(args, device, dtype))
    print(common.machine_line(device, dtype))
    print(f"attention: median of {args.repeats} interleaved calls per side after a warm-up; ratio < 1: now faster; "
          "max |diff|: over real tokens; peak MiB: memory one step adds, each kernel in a fresh process")


if __name__ == "__main__":
    sys.exit(main())
