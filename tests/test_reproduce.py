"""The toy reproduction end to end at tiny scale (--quick): every variant trains and evaluates and the results
page is written. It checks that the pipeline completes, not which method wins."""

import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_reproduction_writes_the_table(smollm2_dir, tmp_path):
    out = tmp_path / "RESULTS.md"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "reproduce_toy.py"), "--quick",
                             "--seeds", "0", "--toy-dir", str(tmp_path / "toy"), "--runs", str(tmp_path / "runs"),
                             "--output", str(out), "--workers", "0", "--llm", str(smollm2_dir)],
                            cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    for row in ("CLIP teacher", "direct alignment (LLM2CLIP-style)", "ProCLIP stage 1 only", "| ProCLIP |",
                "ProCLIP w/o L_struct", "ProCLIP w/o L_reg", "ProCLIP w/o stage 1", "no cut captions in stage 1"):
        assert row in text, row
    table_rows = [line for line in text.splitlines() if line.startswith("| ") and "±" in line]
    assert len(table_rows) == 8 and all(line.count("±") == 2 + 2 * 6 for line in table_rows)
    assert "head lr 0.0001" in text and "image-encoder lr 0.0001" in text  # settings read back from meta.json
    assert (tmp_path / "RESULTS.png").stat().st_size > 1000
    # the probes of the same (quick) world's cached LLM embeddings
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "probe_toy_llm.py"), "--toy-dir",
                             str(tmp_path / "toy")], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split(" | ")[1:] for line in result.stdout.splitlines() if line.startswith("| ") and "(0." in line]
    assert len(rows) == 4 and all(0.0 <= float(cell.strip(" |")) <= 1.0 for row in rows for cell in row)


def test_probe_reads_a_linear_signal_and_not_noise():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from probe_toy_llm import probe_accuracy

    torch.manual_seed(0)
    x = torch.randn(600, 16)
    signal = (x[:, 3] > 0).long()  # linearly separable
    assert probe_accuracy(x[:400], signal[:400], x[400:], signal[400:], 2) > 0.95
    noise = torch.randint(0, 2, (600,))  # independent of x
    assert probe_accuracy(x[:400], noise[:400], x[400:], noise[400:], 2) < 0.65
