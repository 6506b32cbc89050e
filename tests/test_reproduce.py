"""The toy reproduction end to end at tiny scale (--quick): every variant trains and evaluates and the results
page is written. It checks that the pipeline completes, not which method wins."""

import os
import subprocess
import sys

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
                "ProCLIP w/o L_struct", "ProCLIP w/o L_reg", "ProCLIP w/o stage 1"):
        assert row in text, row
    table_rows = [line for line in text.splitlines() if line.startswith("| ") and "±" in line]
    assert len(table_rows) == 7 and all(line.count("±") == 2 + 2 * 6 for line in table_rows)
    assert (tmp_path / "RESULTS.png").stat().st_size > 1000
