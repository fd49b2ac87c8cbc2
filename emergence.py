"""
How the evaluation metrics emerge, item by item: for each multiple-choice and code task
in a run's evals.jsonl, per item the first checkpoint from which it is answered right
and stays right to the last one evaluated, and how many times it flips between right
and wrong on the way; evaluate.py writes them after every sweep.

    RUN_DIR/emergence.csv    task, metric, item, learned_at (a checkpoint, or empty: not
                             learned for good), learned_tokens, flips, dirty
    RUN_DIR/emergence.png    per task and metric, over the checkpoints: the share of items
                             answered right, and the share learned for good by then; the
                             clean and the dirty items apart where tracing.py contamination
                             wrote contamination_rows.jsonl (are dirty items learned earlier?)

Only full scores (no --limit) of the task file the newest result used, one result per
checkpoint (the newest), in training order.
"""

import csv
import os

import numpy as np

import checkpoint
import plot
from common import atomic_write, iter_jsonl

BINARY = ("acc", "acc_norm", "mc1", "pass@1")  # metrics whose items are right (1) or wrong (0)


def item_series(run_dir):
    """{(task, metric): (checkpoints in training order, {checkpoint: tokens}, items as a
    (checkpoints, items) array)} from evals.jsonl, read one line at a time."""
    newest, sha_of = {}, {}
    for r in iter_jsonl(os.path.join(run_dir, "evals.jsonl")):
        if r["metric"] in BINARY and r.get("items") and not r.get("limit"):
            newest[(r["task"], r["metric"], r["checkpoint"])] = {  # 1 byte an item, not a float
                k: r[k] for k in ("checkpoint", "tokens", "task_sha256")} | {
                "items": np.asarray(r["items"], dtype=np.uint8)}
            sha_of[r["task"]] = r["task_sha256"]  # the task file of the newest result
    order = {n: i for i, n in enumerate(checkpoint.checkpoint_names(run_dir))}
    out = {}
    for (task, metric, ckpt), r in newest.items():
        if r["task_sha256"] == sha_of[task]:
            out.setdefault((task, metric), []).append(r)
    series = {}
    for key, rows in out.items():
        rows.sort(key=lambda r: order.get(r["checkpoint"], len(order)))
        if len(rows) > 1 and len({len(r["items"]) for r in rows}) == 1:
            series[key] = ([r["checkpoint"] for r in rows],
                           {r["checkpoint"]: r["tokens"] for r in rows},
                           np.stack([r["items"] for r in rows]).astype(float))
    return series


def learned_and_flips(values):
    """(index of the first checkpoint from which the item is right to the end, or None; the
    number of changes between consecutive checkpoints) of one item's 0/1 values."""
    learned = None
    for i in range(len(values) - 1, -1, -1):
        if values[i] != 1:
            break
        learned = i
    return learned, int(sum(a != b for a, b in zip(values, values[1:])))


def dirty_flags(run_dir):
    """{task: [dirty per row]} from tracing.py contamination's rows, or {}."""
    path = os.path.join(run_dir, "contamination_rows.jsonl")
    flags = {}
    if os.path.exists(path):
        for r in iter_jsonl(path):
            flags.setdefault(r["task"], []).append(bool(r["dirty"]))
    return flags


def write(run_dir):
    """emergence.csv and emergence.png of a run dir; returns {(task, metric): per-item rows}."""
    series, flags = item_series(run_dir), dirty_flags(run_dir)
    if not series:
        return {}
    table = {}
    for (task, metric), (ckpts, tokens, values) in sorted(series.items()):
        dirty = flags.get(task, [])
        table[task, metric] = []
        for item in range(values.shape[1]):
            at, flips = learned_and_flips(values[:, item].tolist())
            table[task, metric].append({
                "task": task, "metric": metric, "item": item,
                "learned_at": ckpts[at] if at is not None else "",
                "learned_tokens": tokens[ckpts[at]] if at is not None else "", "flips": flips,
                "dirty": dirty[item] if item < len(dirty) else ""})

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, ["task", "metric", "item", "learned_at", "learned_tokens",
                                   "flips", "dirty"])
            w.writeheader()
            for rows in table.values():
                w.writerows(rows)

    atomic_write(os.path.join(run_dir, "emergence.csv"), write_csv)
    plot.plot_emergence(run_dir, series, table)
    return table
