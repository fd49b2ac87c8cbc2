"""
Loss spikes traced to the rows that caused them (AMBER's NaN chunks came from
"misbehaved" data; K2 restarted twice by hand after spikes).

    python spikes.py RUN_DIR [--window=50] [--z=8] [--min_rise=0.1] [--max_spikes=5]
    python dynamics.py spikes RUN_DIR ...      the same
    python spikes.py plant CONFIG --chunk=C --step=S [--rows=3] [--seed=0]
                                               a controlled spike: rows of random ids written
                                               over rows of step S of chunk C of the config's
                                               data dir, its manifest updated (experiments)

Detection, from metrics.jsonl: a step's loss, or its gradient norm, against the median
of the `window` steps before it. A spike rises more than z robust standard deviations
(1.4826 x the median absolute deviation) and more than min_rise of that median, so the
step-to-step noise of a small run is not one (the defaults find a planted spike and
nothing in the main job's curve: tests/test_dynamics.py).

Each spike (the max_spikes highest) is replayed: the run's weights and AdamW state at
the checkpoint before it (the end of the schedule position before, or the seeded
initialization), the steps from there to the spike trained again as train.py trains
them (each replayed loss beside the one logged: equal bit for bit on one thread), and
at the spike's step, every row of its batch on its own: its loss, and its share of the
step's gradient, <g_row, g> / ||g||^2 with g the step's gradient, the mean of the rows'
(the shares sum to 1). Rows ranked by share go to RUN_DIR/spikes.csv, one line per spike
and row, with their source, how often each occurs whole in the training data (when the
run's index is built: python tracing.py index) and their first words; spikes.png marks
the spikes on the loss curve. One process, the model whole in memory: at 7B a GPU of 80 GB
or more.
"""

import csv
import os
import sys
from contextlib import nullcontext

import numpy as np
import torch

import checkpoint
import data
import index
import plot
import runstate
import step
from common import (UserError, atomic_write, iter_jsonl, one_line_errors, parse_options, read_json,
                    sha256_file, write_json_atomic)
from config import load_config, saved_config
from parallelize import build_model, speed_up

COLUMNS = ["step", "chunk", "chunk_step", "lr", "loss", "grad_norm", "replayed_loss", "rank",
           "row", "source", "row_loss", "grad_share", "occurrences", "text"]


class SpikeError(UserError):
    pass


def detect(records, window=50, z=8.0, min_rise=0.1):
    """The training records (metrics.jsonl's step lines) whose loss or gradient norm rises
    above their rolling robust baseline, with the rise in robust standard deviations."""
    found = {}
    for key in ("loss", "grad_norm"):
        values = np.array([r[key] for r in records], dtype=float)
        for i in range(window, len(values)):
            before = values[i - window : i]
            median = np.median(before)
            scale = 1.4826 * np.median(np.abs(before - median))
            rise = values[i] - median
            if rise > z * scale and rise > min_rise * abs(median):
                score = rise / scale if scale else float("inf")
                found[i] = max(found.get(i, 0.0), score)
    return [(records[i], score) for i, score in sorted(found.items())]


KEPT = ("step", "pos", "chunk", "chunk_step", "loss", "grad_norm", "lr")


def training_records(run_dir):
    """metrics.jsonl's training steps, read a line at a time, each kept with KEPT only (AMBER
    logs 300k steps, with per-layer norms on some)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise SpikeError(f"{path} not found: give the run dir of a train.py run")
    return [{k: r[k] for k in KEPT} for r in iter_jsonl(path) if "loss" in r]


# -----------------------------------------------------------------------------
# the replay


def checkpoint_before(run_dir, record):
    """The checkpoint a spike's replay starts from: the end of the schedule position before
    its chunk (None: the run's start)."""
    if record["pos"] == 0:
        return None
    path = os.path.join(run_dir, f"ckpt_{record['pos'] - 1:03d}")
    state = checkpoint.read_state(path)
    if state is None or state["step"] != record["step"] - record["chunk_step"]:
        raise SpikeError(f"{path}: not the end of the chunk before step {record['step']} "
                         "(missing, damaged, or a run with skipped chunks); nothing to replay from")
    return path


def replay_run(run_dir, record):
    """A train.Run of one process at the state just before the spike's chunk, and its
    reader at the chunk's first step."""
    cfg = saved_config(read_json(os.path.join(run_dir, "config.json")))
    if cfg.objective != "lm" or cfg.init_from and record["pos"] == 0:
        raise SpikeError(f"{run_dir}: the replay covers pre-training from the seed "
                         "(objective='lm', no init_from)")
    info = read_json(os.path.join(run_dir, "run.json"))
    device = torch.device("cpu")
    dtype = getattr(torch, info.get("dtype", "float32"))
    model = build_model(cfg, device, dtype, fsdp=False)
    dirs = data.stage_dirs(cfg)
    table = data.chunk_table(dirs)
    start = checkpoint_before(run_dir, record)
    state = checkpoint.read_state(start) if start else runstate.new_state(cfg, table, None)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else nullcontext()
    run = step.one_process_run(cfg, model, device, autocast, dirs=dirs, table=table,
                               total_steps=state["total_steps"])
    if start:
        checkpoint.load_checkpoint(start, model, run.optimizer, 0, False)
    speed_up(model, cfg, device)
    data_dir, manifest, local = table[record["chunk"]]
    reader = data.ChunkReader(data_dir, local, cfg.seed, cfg.global_batch_size,
                              cfg.micro_batch_size, manifest=manifest)
    return run, reader, data_dir, manifest


def row_gradients(run, rows, tokens):
    """(each row's loss, each row's share of the step's gradient): one backward per row, the
    step's gradient g the mean of the rows' (every row has seq_len targets)."""
    params = [p for p in run.params if p.requires_grad]

    def grad_of(row):
        run.model.zero_grad(set_to_none=True)
        x, y = data.rows_to_xy(tokens[[row]])
        with run.autocast:
            loss = run.objective(run.model, x, y)[0]
        loss.backward()
        return loss.item(), [p.grad.detach().clone() for p in params]

    total, losses = None, []
    for row in rows:
        loss, grads = grad_of(row)
        losses.append(loss)
        total = grads if total is None else [t.add_(g) for t, g in zip(total, grads)]
    step = [t / len(rows) for t in total]
    norm2 = sum(s.double().square().sum() for s in step).item()
    shares = []
    for row in rows:
        _, grads = grad_of(row)
        dot = sum((g.double() * s.double()).sum() for g, s in zip(grads, step)).item()
        shares.append(dot / len(rows) / norm2)
    run.model.zero_grad(set_to_none=True)
    return losses, shares


def occurrences(run_dir, rows):
    """How often each row occurs whole in the training data, from the run's index (python
    tracing.py index RUN_DIR); None for each when there is no index."""
    try:
        found = index.Index(run_dir)
    except index.TraceError:
        return [None] * len(rows)
    return [found.count(r) for r in rows]


def replay(run_dir, record, logged):
    """(replayed losses of the chunk's steps before the spike and of the spike, the rows of
    the spike's step ranked by their share of its gradient). logged: {step: logged loss}."""
    run, reader, data_dir, manifest = replay_run(run_dir, record)
    first = record["step"] - record["chunk_step"]  # steps done when the chunk began
    replayed = {}
    for s in range(first, record["step"] - 1):
        loss, _, _ = step.train_step(run, reader, step.get_lr(s, run.cfg, run.total_steps))
        replayed[s + 1] = loss
    rows = reader.step_rows(record["chunk_step"] - 1)
    losses, shares = row_gradients(run, rows, reader.tokens)
    replayed[record["step"]] = float(np.mean(losses))
    names = [s["name"] for s in manifest["sources"]]
    has_tok = manifest["tokenizer"].get("file") or manifest["tokenizer"]["kind"] == "tiktoken"
    tok = data.load_tokenizer(data_dir, manifest) if has_tok else None
    counts = dict(zip(rows, occurrences(run_dir, [reader.tokens[r] for r in rows])))
    ranked = sorted(zip(rows, losses, shares), key=lambda t: -t[2])
    out = [{"row": int(r), "source": names[reader.sources[r]], "row_loss": loss,
            "grad_share": share, "occurrences": counts[r],
            "text": tok.decode(reader.tokens[r][:24].tolist())[:80] if tok else ""}
           for r, loss, share in ranked]
    worst = max((abs(replayed[s] - logged[s]) for s in replayed if s in logged), default=0.0)
    return replayed, worst, out


def run(run_dir, *, window=50, z=8.0, min_rise=0.1, max_spikes=5):
    """spikes.csv and spikes.png of a run; returns the spikes found [(record, score)]."""
    records = training_records(run_dir)
    logged = {r["step"]: r["loss"] for r in records}
    found = detect(records, window, z, min_rise)
    chosen = sorted(sorted(found, key=lambda t: -t[1])[:max_spikes], key=lambda t: t[0]["step"])
    lines = []
    for record, score in chosen:
        replayed, worst, rows = replay(run_dir, record, logged)
        print(f"step {record['step']} (chunk {record['chunk']}, its step {record['chunk_step']}):"
              f" loss {record['loss']:.4f}, grad norm {record['grad_norm']:.3f}, "
              f"{score:.1f} robust std above the {window} steps before; replayed "
              f"{len(replayed)} steps, largest loss difference {worst:.2e}; top rows "
              + ", ".join(f"{r['row']} ({r['source']}, {r['grad_share']:.0%})" for r in rows[:3]),
              flush=True)
        for rank, r in enumerate(rows, 1):
            lines.append({"step": record["step"], "chunk": record["chunk"],
                          "chunk_step": record["chunk_step"], "lr": record["lr"],
                          "loss": record["loss"], "grad_norm": record["grad_norm"],
                          "replayed_loss": replayed[record["step"]], "rank": rank} | r)

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, COLUMNS)
            w.writeheader()
            w.writerows(lines)

    atomic_write(os.path.join(run_dir, "spikes.csv"), write)
    plot.plot_spikes(run_dir, records, [r["step"] for r, _ in found])
    if not found:
        print(f"{run_dir}: no spike in {len(records)} steps (window {window}, z {z}, "
              f"min_rise {min_rise})")
    return chosen


def plant(cfg, chunk, step, rows=3, seed=0):
    """Rows of uniformly random ids written over the first `rows` rows that optimizer step
    `step` (0-based, in the chunk) of `chunk` trains on, in cfg's data dir; the chunk's
    sha256 in the manifest is updated, so the data dir stays consistent (a run trained on
    it before is refused: its data changed). Returns the rows."""
    manifest = data.load_manifest(cfg.data_dir)
    reader = data.ChunkReader(cfg.data_dir, chunk, cfg.seed, cfg.global_batch_size,
                              cfg.global_batch_size, manifest=manifest)
    if not 0 <= step < reader.steps:
        raise SpikeError(f"--step={step}: chunk {chunk} has steps 0..{reader.steps - 1}")
    chosen = reader.step_rows(step)[:rows].tolist()
    path = os.path.join(cfg.data_dir, manifest["chunks"][chunk]["file"])
    del reader
    table = np.load(path, mmap_mode="r+")
    shape = (len(chosen), table.shape[1])
    ids = np.random.default_rng(seed).integers(0, cfg.model.vocab_size, shape)
    table[chosen] = ids.astype(table.dtype)
    table.flush()
    del table
    manifest["chunks"][chunk]["sha256"] = sha256_file(path)
    write_json_atomic(os.path.join(cfg.data_dir, "manifest.json"), manifest)
    return chosen


def main(argv):
    if argv and argv[0] == "plant":
        known = {"chunk": int, "step": int, "rows": int, "seed": int}
        with one_line_errors():
            mine = [a for a in argv[1:] if a.split("=")[0].lstrip("-") in known]
            opts = parse_options(mine, known, SpikeError)
            if "chunk" not in opts or "step" not in opts:
                raise SpikeError("plant needs --chunk=C and --step=S")
            cfg = load_config([a for a in argv[1:] if a not in mine])
            rows = plant(cfg, opts["chunk"], opts["step"], opts.get("rows", 3),
                         opts.get("seed", 0))
            print(f"{cfg.data_dir}: rows {rows} of chunk {opts['chunk']}, its step "
                  f"{opts['step']}, are random ids now")
        return
    if not argv or argv[0].startswith("--"):
        sys.exit("usage: python spikes.py RUN_DIR [--window=50] [--z=8] [--min_rise=0.1] "
                 "[--max_spikes=5]")
    with one_line_errors():
        opts = parse_options(argv[1:], {"window": int, "z": float, "min_rise": float,
                                        "max_spikes": int}, SpikeError)
        if not os.path.isdir(argv[0]):
            raise SpikeError(f"{argv[0]}: no such run dir")
        run(argv[0], **opts)
        print(f"wrote {os.path.join(argv[0], 'spikes.csv')} and spikes.png")


if __name__ == "__main__":
    main(sys.argv[1:])
