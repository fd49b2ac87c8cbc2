"""bench.py gpu, the GPU check, runs end to end on a CPU at the tiny shape (--smoke), so
that it is known to work before a GPU is at hand."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_on_a_cpu():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "gpu", "--device=cpu", "--smoke"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"runs the flash kernel: \S*flash", out)
    rows = re.findall(r"(plain|FSDP2, 1 rank) +compile (off|on ): +([\d,]+) tok/s +MFU +([\d.]+)% +peak memory +([\d.]+) GiB"
                      r".*loss ([\d.]+)", out)
    assert [(r[0], r[1].strip()) for r in rows] == [("plain", "off"), ("plain", "on"), ("FSDP2, 1 rank", "off"),
                                                    ("FSDP2, 1 rank", "on")]
    assert all(float(r[2].replace(",", "")) > 0 and float(r[3]) > 0 and float(r[4]) > 0 for r in rows)
    assert all(abs(float(r[5]) - float(rows[0][5])) < 0.1 for r in rows)  # the same model trains alike four ways
    assert len(re.findall(r"compile (off|on ): +[\d,.]+ sequences/s", out)) == 2 and "GPU check done" in out
