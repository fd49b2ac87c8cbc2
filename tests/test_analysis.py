"""The analyses over results: emergence.py (per item the checkpoint from which it stays
right, its flips, tracing.py's dirty flag, from evals.jsonl as evaluate.py writes it) and
plot.py's arms of replicated runs (mean, spread, differences with their errors)."""
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


def test_arms_of_replicated_runs_give_mean_spread_and_differences_with_errors(tmp_path):
    """plot.py NAME=DIR,DIR ...: per arm the mean and sample std of each validation loss at the
    first run's validation points (interpolated), and each arm's difference from the first
    with its standard error, sqrt(s1^2/n1 + s2^2/n2)."""
    import statistics

    import plot

    def run(name, losses):
        folder = tmp_path / name
        folder.mkdir()
        lines = [{"step": 1, "tokens": 10, "loss": 5.0, "lr": 1e-3, "grad_norm": 1.0, "tok_per_s": 1.0}]
        lines += [{"step": 0, "tokens": t, "val_loss": v, "val_loss/books": v + 1} for t, v in zip((100, 200), losses)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        return str(folder)

    arms = {"base": [run("a1", (4.0, 3.0)), run("a2", (4.0, 3.2)), run("a3", (4.0, 3.4))],
            "books": [run("b1", (4.0, 2.9)), run("b2", (4.0, 3.1))]}
    table = plot.plot_arms(arms, str(tmp_path / "out"))
    got = {row[0]: row[1:] for row in table[1:]}
    s_a, s_b = statistics.stdev([3.0, 3.2, 3.4]), statistics.stdev([2.9, 3.1])
    assert got["val_loss"][0] == f"{3.2:.4f} +- {s_a:.4f}" and got["val_loss"][1] == f"{3.0:.4f} +- {s_b:.4f}"
    assert got["val_loss"][2] == f"{-0.2:+.4f} +- {(s_a ** 2 / 3 + s_b ** 2 / 2) ** 0.5:.4f}"
    assert got["val_loss/books"][2] == got["val_loss"][2]
    header, first, last = (tmp_path / "out" / "arms.csv").read_text().splitlines()
    assert header.startswith("tokens,base:val_loss:mean,base:val_loss:std,base:val_loss:n")
    assert last.startswith("200,3.200000,") and (tmp_path / "out" / "arms.png").exists()
    # compare.png draws evals.csv's standard errors as bands, and leaves their columns out
    for d in (arms["base"][0], arms["books"][0]):
        (tmp_path / d / "evals.csv").write_text("checkpoint,tokens,arc_challenge/acc,arc_challenge/acc:stderr\n"
                                                "ckpt_000,100,0.25,0.04\nckpt_001,200,0.3,0.05\n")
    plot.plot_compare([arms["base"][0], arms["books"][0]], str(tmp_path / "cmp"))
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0
