"""emergence.py: per item the checkpoint from which it stays right, its flips, and the
dirty flag of tracing.py contamination, from evals.jsonl as evaluate.py writes it."""
import csv
import json
import os

import emergence


def test_items_are_learned_for_good_where_they_stay_right(tmp_path):
    for name in ("ckpt_000", "ckpt_001", "ckpt_002"):
        os.makedirs(tmp_path / name)

    def row(ckpt, items, **kw):
        return {"checkpoint": ckpt, "tokens": 100 * int(ckpt[5:]), "task": "arc_challenge", "metric": "acc",
                "value": sum(items) / len(items), "items": items, "task_sha256": "new", "limit": None} | kw

    rows = [row("ckpt_001", [0, 0, 0, 0]),  # replaced by the newer result of ckpt_001 below
            row("ckpt_000", [0, 1, 0, 1]), row("ckpt_002", [1, 1, 1, 0]), row("ckpt_001", [1, 1, 0, 0]),
            row("ckpt_002", [0, 0, 0, 0], limit=2),  # a --limit score: not the benchmark's
            row("ckpt_000", [1, 1, 1, 1], task_sha256="old"),  # another task file: left out
            row("ckpt_000", [1, 1, 1, 1], metric="mc2")]  # not right-or-wrong
    rows[-2]["task"] = "hellaswag"
    (tmp_path / "evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "contamination_rows.jsonl").write_text("".join(
        json.dumps({"task": "arc_challenge", "row": i, "dirty": d}) + "\n" for i, d in enumerate([1, 0, 1, 0])))
    table = emergence.write(str(tmp_path))
    assert list(table) == [("arc_challenge", "acc")]  # hellaswag has one checkpoint of its task file
    with open(tmp_path / "emergence.csv", newline="") as f:
        got = [(r["item"], r["learned_at"], r["learned_tokens"], r["flips"], r["dirty"]) for r in csv.DictReader(f)]
    # item 0: 0 1 1, item 1: 1 1 1, item 2: 0 0 1, item 3: 1 0 0 (never for good)
    assert got == [("0", "ckpt_001", "100", "1", "True"), ("1", "ckpt_000", "0", "0", "False"),
                   ("2", "ckpt_002", "200", "1", "True"), ("3", "", "", "1", "False")]
    assert (tmp_path / "emergence.png").stat().st_size > 0
