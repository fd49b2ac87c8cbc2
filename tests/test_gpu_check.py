"""bench.py gpu, the GPU check, runs end to end on a CPU at the tiny shape (--smoke), so
that it is known to work before a GPU is at hand."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_on_a_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "gpu", "--device=cpu", "--smoke",
                           f"--out={out}"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert re.search(r"runs the flash kernel: \S*flash", text)
    rows = re.findall(r"(plain|FSDP2, 1 rank) +compile (off|on ) AC (off|on ): +([\d,]+) tok/s +MFU +([\d.]+)% +peak "
                      r"memory +([\d.]+) GiB \(planned +([\d.]+)\).*loss ([\d.]+)", text)
    assert [(r[0], r[1].strip(), r[2].strip()) for r in rows] == [
        ("plain", "off", "off"), ("plain", "on", "off"), ("plain", "off", "on"), ("plain", "on", "on"),
        ("FSDP2, 1 rank", "off", "off"), ("FSDP2, 1 rank", "on", "off")]
    assert all(float(r[3].replace(",", "")) > 0 and float(r[4]) > 0 and float(r[6]) > 0 for r in rows)
    assert all(abs(float(r[7]) - float(rows[0][7])) < 0.1 for r in rows)  # the same model trains alike six ways
    assert "weights equal" in text and len(re.findall(r"compile (off|on ): +[\d,.]+ sequences/s", text)) == 2
    report = json.loads(out.read_text())  # every figure printed is in the one JSON file
    assert len(report["training"]) == 6 and report["dcp"]["weights_equal"] and report["flash_kernel"]
    assert len(report["decoding"]) == 2 and "GPU check done" in text
