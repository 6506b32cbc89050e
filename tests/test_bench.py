"""Smoke test of the benchmark scripts (bench/): each runs end to end with --quick (tiny random models) and prints
its table, its machine line, and numbers that make sense (finite times, outputs equal to the reference).

The speed numbers themselves are not asserted (only arithmetic derived from them, such as bench/loader.py's
workers per GPU): speed claims come from the full benchmarks (BENCHMARKS.md), measured in one run on one machine,
not from timed tests. The scripts run on one thread here: at these tiny shapes a second OpenMP thread on a busy
2-core runner only adds waiting (about 35 s in all instead of 60 s).
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run(script: str, *args: str, timeout: int = 300) -> str:
    done = subprocess.run([sys.executable, str(BENCH / script), "--quick", "--device", "cpu", "--threads", "1", *args],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"^machine: CPU: .+, torch \S+, .*threads 1, dtype float32", done.stdout, re.M), done.stdout
    return done.stdout


def table_rows(output: str) -> list[list[str]]:
    """The body rows of the markdown table in `output`, as lists of cells."""
    lines = [line for line in output.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


def test_forward_quick():
    rows = table_rows(run("forward.py"))
    assert [row[0] for row in rows] == ["tiny CLIP ViT-B/16 image tower", "tiny CLIP ViT-B/16 text tower",
                                        "tiny Qwen3-0.6B-shaped decoder", "tiny Llama (stands in for SmolLM2)"]
    for row in rows:
        assert float(row[2]) > 0 and float(row[3]) > 0 and float(row[4].split()[0]) > 0  # ms, ms, ratio
        assert float(row[5]) >= 0 and float(row[6]) >= 0  # peak MiB of each side
        assert float(row[7]) < 1e-4  # same weights, same dtype: the outputs agree


def test_embed_quick():
    output = run("embed.py")
    naive, bucketed, _, fp32, bf16 = table_rows(output)  # two tables; the second's header is the `_` row
    assert naive[0].startswith("naive: 8 captions") and bucketed[0].startswith("length-bucketed: ≤1024")
    assert int(naive[1]) == 6  # 48 captions in batches of 1024 // 128
    # the padded-token budget holds, and sorting by length pads less than input order
    assert int(bucketed[4]) <= 1024 and int(bucketed[2]) < int(naive[2])
    assert float(naive[6]) > 0 and float(bucketed[6]) > 0
    difference = float(re.search(r"max \|difference\| of the embeddings: (\S+)", output).group(1))
    assert difference < 1e-4  # batching must not change the embeddings
    assert re.search(r"48 captions, \d+ real tokens", output)
    # the cache-fill table: fp32 with 8192-token batches vs the CPU default, bf16 with 1024-token batches
    assert fp32[0].startswith("fp32 weights, ≤8192") and bf16[0].startswith("bf16 weights, ≤1024")
    assert float(fp32[3]) > 0 and float(bf16[3]) > 0
    cosine = float(re.search(r"min cosine of the embeddings: (\S+)", output).group(1))
    assert 0.99 <= cosine <= 1.0 + 1e-6  # bf16 weights move the embeddings only slightly


def test_train_step_quick():
    eager, checkpointed, _, *teacher_rows = table_rows(run("train_step.py"))  # two tables; `_`: the second's header
    assert [eager[0], checkpointed[0]] == ["eager", "grad-checkpointing"]
    assert float(eager[1]) > 0 and float(eager[2]) > 0 and float(eager[3]) > float(eager[4]) > 0  # ms, /s, MiB
    # checkpointing recomputes the forward in backward: it counts more FLOPs than the eager step
    assert float(checkpointed[6]) > float(eager[6]) > 0
    # the teacher-cache table: both stages before (live teacher) and after (caches), with a ratio to the live step
    assert [row[0] for row in teacher_rows] == ["stage 1, live teacher", "stage 1, caches",
                                                "stage 1, head alone (inputs on the device)",
                                                "stage 2, live frozen teacher", "stage 2, cached teacher"]
    for row in teacher_rows:
        assert float(row[1]) > 0 and float(row[2].split()[0]) > 0


def test_attention_quick():
    output = run("attention.py")
    distances, _, *attention = table_rows(output)  # two tables; the second's header is the `_` row
    assert distances[0] == "64×32" and float(distances[1]) > 0 and float(distances[2]) > 0
    assert float(distances[3]) >= 0 and float(distances[4]) >= 0  # peak MiB of each kernel
    assert [row[0] for row in attention] == [f"{kind}, {case}" for case in ("unpadded", "right-padded", "left-padded")
                                             for kind in ("causal", "bidirectional")]
    for row in attention:
        assert float(row[2]) > 0 and float(row[3]) > 0
        assert float(row[5]) < 1e-5  # the new mask forms give the old outputs on real tokens


def test_gpu_check_quick():
    """The GPU check's CPU mode: its own section (both stages end to end through train.py) runs every configuration
    with nothing failed or timed out. Its other sections are the bench scripts above, each tested there with the
    same --quick flags, so they are not run twice; here only their wiring (each section names a script that is
    there)."""
    output = run("gpu_check.py", "--sections", "train", timeout=300)
    assert re.search(r"^### 1\. Both stages end to end", output, re.M)
    assert not re.search(r"failed|timed out|skipped", output), output
    runs = {row[0]: row for row in table_rows(output)}
    assert list(runs) == ["stage 1, amp_bf16", "stage 2, amp_bf16", "stage 2, amp (fp16, GradScaler)",
                          "stage 2, amp_bf16, --grad-checkpointing", "stage 2, amp_bf16, --accum-freq 2"]
    for row in runs.values():
        assert row[1] == "ok" and row[3] == "2" and 0 < float(row[4]) < 1e4  # 2 steps, a finite loss
    assert re.search(r"^gpu_check: \d+ s in all", output, re.M)
    sys.path.insert(0, str(BENCH))
    import gpu_check
    for title in list(gpu_check.SECTIONS.values())[1:]:  # "... (bench/<script>)"
        assert (BENCH / re.search(r"bench/(\w+\.py)", title).group(1)).is_file(), title


def test_loader_quick():
    """Per-worker loading, JPEG draft vs full decode: the 1024-px photos decode at 1/2 and stay within a level of
    255 of the full decode, the 500×375 ones are not drafted and come out identical; the projection's arithmetic."""
    output = run("loader.py", timeout=120)
    small, large, _, *epochs = table_rows(output)  # two tables; the second's header is the `_` row
    assert [small[0], large[0]] == ["500×375", "1024×768"]
    assert small[2] == "full: 12" and large[2] == "1/2: 4"  # which decodes were drafted (4 images, 12 of 500×375)
    assert float(small[6]) == 0 and 0 < float(large[6]) < 1  # mean |diff| in levels of 0..255
    per_gpu = float(re.search(r"= ([\d,]+) images/s per H100", output).group(1).replace(",", ""))
    assert 2000 < per_gpu < 4000  # 40% of 989 TFLOP/s over ≈ 135 GFLOP per image
    for row, epoch in zip((small, large), epochs):
        plain, draft = float(row[3]), float(row[4])
        assert plain > 0 and draft > 0 and float(row[5].split()[0]) > 0
        # workers per H100: the GPU's images/s over one worker's (rates are printed rounded)
        assert int(row[7]) == pytest.approx(per_gpu / plain, abs=1.5) and int(row[8]) >= 1
        # the epoch table: 104 workers load 104 × a worker's rate; an epoch is 3.0M images at the slower side's rate
        loading = float(epoch[1].replace(",", ""))
        assert loading == pytest.approx(104 * plain, rel=0.01)
        assert float(epoch[3]) == pytest.approx(3.0e6 / min(loading, 8 * per_gpu) / 60, rel=0.05, abs=0.06)
        assert float(epoch[5]) == pytest.approx(3.0e6 / (8 * per_gpu) / 60, abs=0.06)


def test_precision_quick():
    """bf16 against fp32 for each stage's step and eval's encoders: every row timed, the ratio that of the medians,
    and the profile's top op named."""
    rows = table_rows(run("precision.py", timeout=180))
    assert [row[0] for row in rows] == [
        "stage 0 step, tiny Llama + LoRA, 64 texts", "stage 1 step, head, batch 64 + 64 long",
        "stage 2 step, toy tower, batch 64", "stage 2 step, tiny ViT, batch 2",
        "eval image encoding, toy tower, batch 64", "eval image encoding, tiny ViT, batch 2",
        "eval text encoding, tiny Llama + head, 64 captions"]
    for label, fp32, bf16, ratio, top in rows:
        assert float(fp32) > 0 and float(bf16) > 0
        assert float(ratio.split()[0]) == pytest.approx(float(fp32) / float(bf16), rel=0.06, abs=0.01)
        assert re.fullmatch(r"aten::\w+ \d+%", top), top


def test_eval_throughput_quick():
    rows = table_rows(run("eval_throughput.py", "--workers", "0"))
    assert [(row[0], int(row[1])) for row in rows] == [("images: eval path", 8), ("images: plain loop", 8),
                                                       ("texts: eval path", 16), ("texts: plain loop", 16)]
    assert all(float(row[3]) > 0 for row in rows)  # items/s
