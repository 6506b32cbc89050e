"""Smoke test of bench/scale.py: with --quick it runs every part end to end and its tables hold numbers that
make sense (a resumed cache equal to the uninterrupted one, compact rows cheaper than Row objects). Memory and
time ratios themselves are not asserted here: they come from the full run recorded in BENCHMARKS.md."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.slow  # seven fresh processes (each CLI run loads torch): ~1-2 min on 2 busy cores
def test_scale_quick():
    done = subprocess.run([sys.executable, str(BENCH / "scale.py"), "--quick", "--threads", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    tables = {title: [[c.strip() for c in line.strip("|").split("|")] for line in body.splitlines()[2:]
                      if line.startswith("| ")] for title, body in re.findall(r"^## (.+)\n\n((?:\|.*\n)+)", out, re.M)}
    assert [row[0] for row in tables["embed CLI peak memory"]] == ["2,000", "10,000"]
    resumed = tables["killed and resumed"][0]
    assert resumed[6] == "1.000000" and resumed[7] == "True"  # min cosine, bitwise equal
    compact, objects = tables["data rows"]
    assert float(compact[3]) < 1.5 and float(compact[2]) < float(objects[2])
    assert float(tables["tar index"][0][3]) < float(tables["tar index"][0][2])  # sidecar faster than the scan
    assert len(tables["projection (derived from FLOPs, not measured)"]) == 6
    assert re.search(r"^machine: CPU: .+threads 1", out, re.M)
