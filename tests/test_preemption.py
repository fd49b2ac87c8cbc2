"""SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) outside the training loop: every
script stops with one line and status 143 or 130, leaves only what it had finished (written
whole), and the same command goes on to the result an uninterrupted run gives. The signal
comes from outside the product: a test wraps one of the script's functions so that the
process signals itself once it has returned N times (train.py's loop: test_train.py)."""

import json
import os
import shutil
import signal

import pytest

import data
import convert_amber
import evaluate
import memorize
from conftest import trained_run


def stop_after(monkeypatch, module, func, after, sig):
    """module.func sends `sig` to this process when it returns for the `after`-th time."""
    original, calls = getattr(module, func), [0]

    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] == after:
            os.kill(os.getpid(), sig)
        return out

    monkeypatch.setattr(module, func, wrapped)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as at a terminal, even in CI
    return lambda: (monkeypatch.undo(), signal.signal(signal.SIGINT, previous))


def assert_stopped(main, argv, status, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    name = {143: "SIGTERM", 130: "SIGINT"}[status]
    assert stop.value.code == status and last.startswith(f"stopped by {name}: ") and "the same command" in last, last


def test_convert_amber_stopped_after_a_chunk_goes_on_to_the_same_data_dir(tmp_path, monkeypatch, capsys):
    release = tmp_path / "release"
    convert_amber.write_synthetic_release(str(release), 3, 40, row_length=257, vocab_size=500, seed=1)
    argv = [str(release), str(tmp_path / "once"), "--workers=1", "--vocab_size=500"]
    convert_amber.main(argv)
    argv[1] = str(tmp_path / "stopped")
    undo = stop_after(monkeypatch, convert_amber, "_convert_file", 1, signal.SIGTERM)
    assert_stopped(convert_amber.main, argv, 143, capsys)
    undo()
    assert not os.path.exists(tmp_path / "stopped" / "manifest.json")  # never a data dir that looks complete
    convert_amber.main(argv)
    assert "1 of 3 chunks are done already" in capsys.readouterr().out
    once, stopped = (data.load_manifest(str(tmp_path / d)) for d in ("once", "stopped"))
    assert once["chunks"] == stopped["chunks"] and once["totals"] == stopped["totals"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory.mktemp("preempt"), val_sequences=16, n_chunks=2, max_seq_len=128) / "run"


def _values(path):
    with open(path) as f:
        return [(r["checkpoint"], r["task"], r["metric"], r["value"]) for r in map(json.loads, f)]


def test_evaluate_and_memorize_stopped_mid_sweep_go_on_to_the_same_results(run_dir, tmp_path, monkeypatch, capsys):
    once, stopped = tmp_path / "once", tmp_path / "stopped"
    for d in (once, stopped):
        shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns("evals*", "memorization"))
    evaluate.main([str(once), "--tasks=ppl", "--limit=4"])
    undo = stop_after(monkeypatch, evaluate, "_sweep_checkpoint", 1, signal.SIGINT)
    assert_stopped(evaluate.main, [str(stopped), "--tasks=ppl", "--limit=4"], 130, capsys)
    undo()
    assert not os.path.exists(stopped / "evals.jsonl")  # the finished checkpoint's rows wait in evals.rank0.jsonl
    evaluate.main([str(stopped), "--tasks=ppl", "--limit=4"])
    assert _values(once / "evals.jsonl") == _values(stopped / "evals.jsonl")

    argv = ["--samples=4", "--batch_size=4", "--k=8", "--l=8"]
    memorize.main([str(once), *argv])
    undo = stop_after(monkeypatch, memorize, "score_pair", 2, signal.SIGTERM)
    assert_stopped(memorize.main, [str(stopped), *argv], 143, capsys)
    undo()
    done = sorted(os.listdir(stopped / "memorization" / "k8_l8"))
    assert done == ["ckpt_000__chunk_000.json"], done  # the second pair was scored, not written: no half file
    memorize.main([str(stopped), *argv])
    for name in sorted(os.listdir(once / "memorization" / "k8_l8")):
        if name.endswith(".json"):
            a, b = (json.loads((d / "memorization" / "k8_l8" / name).read_text()) for d in (once, stopped))
            assert a["scores"] == b["scores"] and a["indices"] == b["indices"], name
