"""SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) outside the training loop: every
script stops with one line and status 143 or 130, leaves only what it had finished (written
whole), and the same command goes on to the result an uninterrupted run gives. The signal is
sent from outside the product: a wrapper sends it to its own process once a given function
has returned N times (train.py's own loop is tested in test_train.py)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import data
from conftest import trained_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WRAPPER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import {module} as m
original, calls = m.{func}, [0]
def wrapped(*args, **kwargs):
    out = original(*args, **kwargs)
    calls[0] += 1
    if calls[0] == {after}:
        os.kill(os.getpid(), signal.{sig})
    return out
m.{func} = wrapped
m.main(sys.argv[1:])
"""


def run(module, argv, stop=None, cwd=None):
    """module.main(argv) in a subprocess; stop=(func, after, signal name) sends the signal."""
    func, after, sig = stop or ("main", 0, "SIGTERM")
    code = WRAPPER.format(root=ROOT, module=module, func=func, after=after, sig=sig)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=300,
                          cwd=cwd)


def assert_stopped(proc, name, status):
    assert proc.returncode == status, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"stopped by {name}: ") and "run the same command to go on" in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_convert_amber_stopped_after_a_chunk_goes_on_to_the_same_data_dir(tmp_path):
    release = tmp_path / "release"
    data.write_synthetic_release(str(release), 3, 40, row_length=257, vocab_size=500, seed=1)
    argv = ["convert-amber", str(release), str(tmp_path / "once"), "--workers=1", "--vocab_size=500"]
    assert run("data", argv).returncode == 0
    argv[2] = str(tmp_path / "stopped")
    assert_stopped(run("data", argv, stop=("_convert_file", 1, "SIGTERM")), "SIGTERM", 143)
    assert not os.path.exists(tmp_path / "stopped" / "manifest.json")  # never a data dir that looks complete
    again = run("data", argv)
    assert again.returncode == 0 and "1 of 3 chunks are done already" in again.stdout, again.stdout
    once, stopped = (data.load_manifest(str(tmp_path / d)) for d in ("once", "stopped"))
    assert once["chunks"] == stopped["chunks"] and once["totals"] == stopped["totals"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory.mktemp("preempt"), val_sequences=16, n_chunks=3, max_seq_len=128) / "run"


def _values(path):
    with open(path) as f:
        return [(r["checkpoint"], r["task"], r["metric"], r["value"]) for r in map(json.loads, f)]


def test_evaluate_and_memorize_stopped_mid_sweep_go_on_to_the_same_results(run_dir, tmp_path):
    once, stopped = tmp_path / "once", tmp_path / "stopped"
    for d in (once, stopped):
        shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns("evals*", "memorization"))
    assert run("evaluate", [str(once), "--tasks=ppl", "--limit=4"]).returncode == 0
    assert_stopped(run("evaluate", [str(stopped), "--tasks=ppl", "--limit=4"], stop=("_sweep_checkpoint", 1, "SIGINT")),
                   "SIGINT", 130)
    assert not os.path.exists(stopped / "evals.jsonl")  # the finished checkpoint's rows wait in evals.rank0.jsonl
    assert run("evaluate", [str(stopped), "--tasks=ppl", "--limit=4"]).returncode == 0
    assert _values(once / "evals.jsonl") == _values(stopped / "evals.jsonl")

    argv = ["--samples=4", "--batch_size=4", "--k=8", "--l=8"]
    assert run("memorize", [str(once), *argv]).returncode == 0
    assert_stopped(run("memorize", [str(stopped), *argv], stop=("score_pair", 2, "SIGTERM")), "SIGTERM", 143)
    done = sorted(os.listdir(stopped / "memorization"))
    assert 1 <= len(done) < len(os.listdir(once / "memorization")) and not [n for n in done if "tmp" in n], done
    assert run("memorize", [str(stopped), *argv]).returncode == 0
    for name in sorted(os.listdir(once / "memorization")):
        if name.endswith(".json"):
            a, b = (json.loads((d / "memorization" / name).read_text()) for d in (once, stopped))
            assert a["scores"] == b["scores"] and a["indices"] == b["indices"], name
