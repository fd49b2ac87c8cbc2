"""
Every figure of a run, drawn from the files the run wrote, so any of them can be
drawn again at any time:

    python plot.py RUN_DIR        training.png, evals.png and memorization/kK_lL/*.png, from
                                  metrics.jsonl, evals.csv and memorization/kK_lL/*.csv
    python plot.py RUN_DIR RUN_DIR ... [--out_dir=DIR]
                                  compare.png and compare.csv: runs on one token axis
                                  (a trunk and its branches), each branch point marked
    python plot.py NAME=DIR,DIR,... NAME=DIR,DIR,... [--out_dir=DIR]
                                  arms.png and arms.csv: replicated runs per arm (seeds),
                                  each arm's mean and spread, differences with their errors

    training.png              loss and validation loss, learning rate, gradient norm and
                              tokens/s against tokens seen (train.py redraws it at every
                              checkpoint, in about 0.1 s)
    evals.png                 one curve per task and metric over training (evaluate.py)
    dynamics.png              per statistic, layers x checkpoints (dynamics.py)
    emergence.png             items answered right and learned for good (emergence.py)
    memorization/kK_lL/scores.png   the score distribution of each checkpoint (paper Figure 7)
    memorization/kK_lL/matrix.png   mean score, checkpoint x chunk (Figure 8)
    memorization/kK_lL/correlation.png  score correlation between checkpoints (Figure 9)

matplotlib's object API on the Agg canvas (headless, no pyplot state); every PNG is
written atomically.
"""

import csv
import glob
import itertools
import json
import math
import os
import sys
import threading

import numpy as np

import runlog
from common import UserError, atomic_write, one_line_errors, parse_options

_WARM = []  # the warm-up thread, joined before the first figure: matplotlib is not thread-safe


def warm_up_in_background():
    """Import matplotlib and draw a training figure off-screen (fonts, glyph caches, the
    "1e6" offset's mathtext) in a thread, so that the first checkpoint's figure costs
    what the others do; train.py starts it while the first chunk trains. Not a daemon:
    a run that ends first waits for it (a daemon thread killed inside matplotlib's C++
    at exit aborts the process: "terminate called without an active exception")."""
    _WARM.append(threading.Thread(target=warm_figures))
    _WARM[-1].start()


def warm_figures():
    import io

    x = [float(i) * 4096 for i in range(1, 300)]
    series = {"tokens": x, "loss": [8.0 / i for i in range(1, 300)], "lr": [1e-3] * 299,
              "grad_norm": [0.5] * 299, "tok_per_s": [6000.0] * 299}
    draw_run(series, {"val_loss": (x[::40], series["loss"][::40])}, "warm-up", io.BytesIO())


def new_figure(rows, cols, size):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    return fig, fig.subplots(rows, cols, squeeze=False)


def save_figure(fig, path, dpi=80):
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))


# -----------------------------------------------------------------------------
# training.png


def _binned(x, y, n=2000):
    """At most n points: means over equal runs of steps (AMBER logs ~300k steps)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) <= n:
        return x, y
    edges = np.linspace(0, len(x), n + 1).astype(int)
    widths = np.diff(edges)
    return np.add.reduceat(x, edges[:-1]) / widths, np.add.reduceat(y, edges[:-1]) / widths


def read_metrics(out_dir):
    """(series {tokens, loss, lr, grad_norm, tok_per_s} of the training steps, validation
    {"val_loss" or "val_loss/<source>": (tokens, losses)}) of a run's metrics.jsonl, read
    line by line."""
    series, val = {k: [] for k in ("tokens",) + KEYS}, {}
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise UserError(f"{out_dir} has no metrics.jsonl: give the out_dir of a train.py run")
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                r = json.loads(line)
            except ValueError:
                raise UserError(f"{path}:{lineno}: not a JSON line ({line[:40]!r}); the file was "
                                f"edited or cut: python train.py verify {out_dir} says which "
                                "checkpoint still holds it") from None
            if "val_loss" in r:
                for k in (k for k in r if k.startswith("val_loss")):
                    val.setdefault(k, ([], []))
                    val[k][0].append(r["tokens"])
                    val[k][1].append(r[k])
            elif "loss" in r:
                for k in series:
                    series[k].append(r.get(k, float("nan")))
    return series, val


def plot_run(out_dir):
    """training.png of a run from its metrics.jsonl."""
    for t in _WARM:
        t.join()
    series, val = read_metrics(out_dir)
    draw_run(series, val, os.path.basename(os.path.normpath(out_dir)),
             os.path.join(out_dir, "training.png"))


KEYS = ("loss", "lr", "grad_norm", "tok_per_s")
TITLES = {"loss": "loss", "lr": "learning rate", "grad_norm": "gradient norm (before clipping)",
          "tok_per_s": "tokens / s (all devices)"}


def draw_run(series, val, title, out):
    """The four panels of training.png from series {tokens, loss, lr, grad_norm, tok_per_s}
    and validation points {"val_loss": (tokens, losses), "val_loss/<source>": ...}, to a
    path (atomically) or a file object. With more than one source, each source's
    validation loss is drawn dashed beside the mix's."""
    fig, axes = new_figure(2, 2, (10, 6))
    fig.subplots_adjust(left=0.07, right=0.98, top=0.94, bottom=0.09, hspace=0.4, wspace=0.22)
    for ax, k in zip(axes.flat, KEYS):
        ax.plot(*_binned(series["tokens"], series[k]), lw=0.8, label="train")
        if k == "loss" and val.get("val_loss"):
            ax.plot(*val["val_loss"], "o-", ms=3, label="validation")
            sources = sorted(v for v in val if v.startswith("val_loss/"))
            for v in sources if len(sources) > 1 else []:
                ax.plot(*val[v], "--", lw=0.9, label=v.removeprefix("val_loss/"))
            ax.legend(fontsize=7)
        ax.set_title(TITLES[k], fontsize=9)
        ax.set_xlabel("tokens seen", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.locator_params(nbins=4)  # ticks are most of a draw's time
    fig.suptitle(title, fontsize=10)
    if isinstance(out, str):
        save_figure(fig, out)
    else:
        fig.savefig(out, format="png", dpi=80)


# -----------------------------------------------------------------------------
# evals.png and the memorization figures, from the CSV files beside them


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _number(text):
    return float(text) if text not in ("", "None") else math.nan


def plot_evals(run_dir):
    """evals.png from evals.csv (checkpoint, tokens, one column per task/metric, and its
    standard error, drawn as a band of one either side)."""
    header, *rows = _read_csv(os.path.join(run_dir, "evals.csv"))
    keys = [k for k in header[2:] if not k.endswith(":stderr")]
    fig, axes = new_figure(1, len(keys), (4 * len(keys), 3))
    for ax, k in zip(axes[0], keys):
        j, e = header.index(k), header.index(f"{k}:stderr") if f"{k}:stderr" in header else None
        points = [(_number(r[1]) if r[1] != "None" else i, float(r[j]),
                   _number(r[e]) if e is not None else math.nan)
                  for i, r in enumerate(rows) if r[j]]
        x, y, err = (np.array(v, dtype=float) for v in zip(*points)) if points else ([], [], [])
        ax.plot(x, y, marker="o")
        if e is not None and len(x):  # one standard error either side
            ax.fill_between(x, y - err, y + err, alpha=0.25)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("tokens seen")
    fig.tight_layout()
    save_figure(fig, os.path.join(run_dir, "evals.png"), dpi=100)


def plot_memorization(out_dir):
    """scores.png, matrix.png and correlation.png from per_checkpoint.csv, matrix.csv and
    correlation.csv in a memorization folder."""
    header, *rows = _read_csv(os.path.join(out_dir, "per_checkpoint.csv"))
    l = len(header) - 5  # score_0/l ... score_l/l
    fig, ax = new_figure(1, 1, (6, 3.5))
    ax = ax[0, 0]
    for r in rows:
        if int(r[1]):  # sequences seen
            ax.stairs([int(v) for v in r[4:]], np.linspace(0, 1, l + 2), label=r[0])
    ax.set_yscale("log")
    ax.set_xlabel("memorization score")
    ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, os.path.join(out_dir, "scores.png"), dpi=100)

    header, *rows = _read_csv(os.path.join(out_dir, "matrix.csv"))
    ckpts, chunks = [r[0] for r in rows], [h.removeprefix("chunk_") for h in header[1:-1]]
    matrix = np.array([[_number(v) for v in r[1:-1]]
                       for r in rows]).reshape(len(ckpts), len(chunks))
    corr = np.full((len(ckpts), len(ckpts)), np.nan)
    for a, b, s, _ in _read_csv(os.path.join(out_dir, "correlation.csv"))[1:]:
        corr[ckpts.index(a), ckpts.index(b)] = _number(s)
    for name, m, labels, label in [("matrix.png", matrix, chunks, "mean score"),
                                   ("correlation.png", corr, ckpts, "score correlation")]:
        fig, ax = new_figure(1, 1, (6, 4))
        ax = ax[0, 0]
        im = ax.imshow(m, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(ckpts)), ckpts, fontsize=6)
        ax.set_xticks(range(len(labels)), labels, fontsize=6, rotation=90)
        fig.colorbar(im, ax=ax, label=label)
        fig.tight_layout()
        save_figure(fig, os.path.join(out_dir, name), dpi=100)


def plot_dynamics(run_dir):
    """dynamics.png from dynamics.csv (dynamics.py): per statistic, the layers (embeddings
    first, the head last) x checkpoints, one line of the CSV read at a time."""
    stats = ("init_distance", "update", "update_cos", "stable_rank", "eps_share")
    rows, checkpoints, cells = [], [], {}
    with open(os.path.join(run_dir, "dynamics.csv"), newline="") as f:
        for ckpt, _, _, tensor, stat, value in itertools.islice(csv.reader(f), 1, None):
            summary = tensor in ("embed", "final_norm", "head") or (
                tensor.startswith("layer.") and tensor.count(".") == 1)
            if stat in stats and summary:
                cells[stat, tensor, ckpt] = float(value)
                checkpoints += [] if checkpoints and checkpoints[-1] == ckpt else [ckpt]
                rows += [] if tensor in rows else [tensor]
    order = {"embed": -1, "final_norm": 10**6, "head": 10**6 + 1}
    rows.sort(key=lambda t: order.get(t, int(t.split(".")[-1]) if t[-1].isdigit() else 0))
    shown = [s for s in stats if any(k[0] == s for k in cells)]
    fig, axes = new_figure(1, max(1, len(shown)), (3.2 * max(1, len(shown)), 0.25 * len(rows) + 2))
    for ax, stat in zip(axes[0], shown):
        m = np.array([[cells.get((stat, r, c), np.nan) for c in checkpoints] for r in rows])
        im = ax.imshow(m, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(stat, fontsize=9)
        ax.set_yticks(range(len(rows)), rows, fontsize=6)
        ax.set_xticks(range(len(checkpoints)), checkpoints, fontsize=5, rotation=90)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    save_figure(fig, os.path.join(run_dir, "dynamics.png"), dpi=100)


def plot_emergence(run_dir, series, table):
    """emergence.png (emergence.py): per task and metric over the checkpoints, the share of
    items answered right and the share learned for good by then, clean and dirty apart."""
    fig, axes = new_figure(1, len(series), (4 * len(series), 3))
    for ax, ((task, metric), (ckpts, _, values)) in zip(axes[0], sorted(series.items())):
        x = np.arange(len(ckpts))
        rows = table[task, metric]
        at = np.array([ckpts.index(r["learned_at"]) if r["learned_at"] else len(ckpts)
                       for r in rows])
        ax.plot(x, values.mean(axis=1), marker="o", label="right")
        groups = {"learned": np.ones(len(rows), bool)}
        dirty = np.array([r["dirty"] is True for r in rows])
        if any(r["dirty"] != "" for r in rows) and dirty.any() and (~dirty).any():
            groups = {"learned, clean": ~dirty, "learned, dirty": dirty}
        for label, mask in groups.items():
            ax.plot(x, [(at[mask] <= i).mean() for i in x], marker=".", ls="--", label=label)
        ax.set_xticks(x, ckpts, fontsize=5, rotation=90)
        ax.set_title(f"{task}/{metric}", fontsize=9)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, os.path.join(run_dir, "emergence.png"), dpi=100)


def plot_spikes(run_dir, records, spike_steps):
    """spikes.png: the loss and the gradient norm over steps, the spikes spikes.py found
    marked."""
    steps = [r["step"] for r in records]
    at = {r["step"]: r for r in records}
    fig, axes = new_figure(1, 2, (10, 3))
    for ax, key in zip(axes[0], ("loss", "grad_norm")):
        ax.plot(*_binned(steps, [r[key] for r in records]), lw=0.8)
        ax.scatter(spike_steps, [at[s][key] for s in spike_steps], color="red", zorder=3,
                   label=f"{len(spike_steps)} spike(s)")
        ax.set_xlabel("step")
        ax.set_title(key, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, os.path.join(run_dir, "spikes.png"), dpi=100)


def plot_duplication(folder):
    """duplication.png from duplication_summary.csv (tracing.py memorization): the mean
    memorization score and the k-extractible share by how often a sequence was trained on,
    one line per checkpoint."""
    header, *rows = _read_csv(os.path.join(folder, "duplication_summary.csv"))
    buckets = list(dict.fromkeys(r[1] for r in rows))
    fig, axes = new_figure(1, 2, (10, 3.5))
    for ckpt in dict.fromkeys(r[0] for r in rows):
        mine = {r[1]: r for r in rows if r[0] == ckpt}
        xs = [i for i, b in enumerate(buckets) if b in mine]
        for ax, col in zip(axes[0], (3, 4)):
            ax.plot(xs, [float(mine[buckets[i]][col]) for i in xs], "o-", ms=3, label=ckpt)
    for ax, title in zip(axes[0], ("mean memorization score", "k-extractible share")):
        ax.set_xticks(range(len(buckets)), buckets, fontsize=7)
        ax.set_xlabel("times the sequence was trained on before the checkpoint", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, os.path.join(folder, "duplication.png"), dpi=100)


# -----------------------------------------------------------------------------


def branch_tokens(run_dir):
    """The tokens at which a branch left its parent (its ledger's first event), else None."""
    first = runlog.first_event(run_dir)
    return first.get("tokens") if first.get("event") == "branch" else None


def run_names(run_dirs):
    """A name per run: its folder's name, or as many of its last path parts as tell it
    from the others (runs/a/tiny and runs/b/tiny are a/tiny and b/tiny)."""
    parts = [os.path.realpath(d).strip(os.sep).split(os.sep) for d in run_dirs]
    if len(set(map(tuple, parts))) < len(parts):
        raise UserError(f"{' '.join(run_dirs)}: a run given twice; compare different runs")
    names = []
    for p in parts:
        n = 1
        while sum(q[-n:] == p[-n:] for q in parts) > 1:
            n += 1
        names.append("/".join(p[-n:]))
    return names


def plot_compare(run_dirs, out_dir):
    """compare.png: the runs on one token axis (training loss, validation loss of the mix and
    of each source, LR, and the evaluations of evals.csv), each branch point dotted;
    compare.csv: every run's validation losses at the first run's validation points (the
    others' linearly interpolated between their own, blank outside them). Returns the rows."""
    runs = [(name, *read_metrics(d), branch_tokens(d))
            for name, d in zip(run_names(run_dirs), run_dirs)]
    val_keys = sorted({k for _, _, val, _ in runs for k in val}, key=lambda k: (k != "val_loss", k))
    evals = {}
    for d in run_dirs:
        if os.path.exists(os.path.join(d, "evals.csv")):
            header, *rows = _read_csv(os.path.join(d, "evals.csv"))
            for j, key in enumerate(header[2:]):
                if not key.endswith(":stderr"):  # (tokens, value, its standard error)
                    e = header.index(f"{key}:stderr") if f"{key}:stderr" in header else None
                    evals.setdefault(key, {})[d] = [
                        (_number(r[1]), float(r[2 + j]), _number(r[e]) if e else math.nan)
                        for r in rows if r[2 + j]]
    panels = ["loss", *val_keys, "lr", *evals]
    cols = 3
    fig, axes = new_figure(-(-len(panels) // cols), cols, (4.2 * cols, 3 * -(-len(panels) // cols)))
    for ax, key in zip(axes.flat, panels):
        for i, (name, series, val, at) in enumerate(runs):
            color = f"C{i}"
            if key in ("loss", "lr"):
                ax.plot(*_binned(series["tokens"], series[key], 500), lw=0.8, color=color,
                        label=name)
            elif key in val:
                ax.plot(*val[key], "o-", ms=3, color=color, label=name)
            elif key in evals and run_dirs[i] in evals[key]:
                x, y, err = (np.array(v) for v in zip(*evals[key][run_dirs[i]]))
                ax.plot(x, y, "s-", ms=3, color=color, label=name)
                ax.fill_between(x, y - err, y + err, color=color, alpha=0.2)  # one stderr
            if at is not None:
                ax.axvline(at, ls=":", lw=0.8, color=color)
        ax.set_title({"loss": "training loss", "lr": "learning rate", "val_loss": "validation loss "
                      "(the mix)"}.get(
            key, key.replace("val_loss/", "validation loss, ")), fontsize=9)
        ax.set_xlabel("tokens seen", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    save_figure(fig, os.path.join(out_dir, "compare.png"), dpi=90)

    first_val = runs[0][2].get("val_loss", ([], []))[0]
    header = ["tokens"] + [f"{name}:{k}" for name, _, _, _ in runs for k in val_keys]
    rows = []
    for t in first_val:
        row = [str(t)]
        for _, _, val, _ in runs:
            for k in val_keys:
                xs, ys = val.get(k, ([], []))
                inside = xs and xs[0] <= t <= xs[-1]
                row.append(f"{np.interp(t, xs, ys):.6f}" if inside else "")
        rows.append(row)
    atomic_write(os.path.join(out_dir, "compare.csv"),
                 lambda tmp: open(tmp, "w").write("\n".join(",".join(r) for r in [header] + rows)
                                                  + "\n"))
    return [header] + rows


def plot_arms(arms, out_dir):
    """arms.png and arms.csv: replicated runs per arm ({name: [run dirs]}), each validation
    loss at the first run's validation points (interpolated as in compare.csv), as the arm's
    mean with one sample standard deviation either side. Returns the table: per key the
    arms' mean +- std at the last common point, and each arm's difference from the first
    arm with its standard error (sqrt(s1^2/n1 + s2^2/n2))."""
    series = {name: [read_metrics(d)[1] for d in dirs] for name, dirs in arms.items()}
    first = next(iter(series.values()))[0]
    points = np.array(first.get("val_loss", ([], []))[0], dtype=float)
    keys = sorted({k for runs in series.values() for val in runs for k in val},
                  key=lambda k: (k != "val_loss", k))
    stats = {}  # (arm, key) -> (mean, std, n) arrays over the points
    for name, runs in series.items():
        for k in keys:
            ys = np.array([[np.interp(t, *val[k]) if k in val and val[k][0][0] <= t <= val[k][0][-1]
                            else np.nan for t in points] for val in runs])
            n = (~np.isnan(ys)).sum(0)
            std = np.nanstd(ys, 0, ddof=1) if len(runs) > 1 else np.zeros(len(points))
            stats[name, k] = (np.nanmean(ys, 0), std, n)
    fig, axes = new_figure(1, len(keys), (4.2 * len(keys), 3))
    for ax, k in zip(axes[0], keys):
        for i, name in enumerate(arms):
            mean, std, n = stats[name, k]
            ax.plot(points, mean, "o-", ms=3, color=f"C{i}", label=f"{name} (n={len(arms[name])})")
            ax.fill_between(points, mean - std, mean + std, color=f"C{i}", alpha=0.2)
        ax.set_title(k.replace("val_loss/", "validation loss, "), fontsize=9)
        ax.set_xlabel("tokens seen", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    save_figure(fig, os.path.join(out_dir, "arms.png"), dpi=90)
    lines = [",".join(["tokens"] + [f"{a}:{k}:{s}" for a in arms for k in keys
                                    for s in ("mean", "std", "n")])]
    lines += [",".join([str(int(t))] + [f"{stats[a, k][j][p]:.6f}" for a in arms for k in keys
                                        for j in range(3)]) for p, t in enumerate(points)]
    atomic_write(os.path.join(out_dir, "arms.csv"),
                 lambda tmp: open(tmp, "w").write("\n".join(lines) + "\n"))
    last = int(np.max(np.nonzero(np.all([~np.isnan(stats[a, "val_loss"][0]) for a in arms], 0))))
    base = next(iter(arms))
    table = [["key"] + [f"{a} mean +- std" for a in arms]
             + [f"{a} - {base} +- se" for a in list(arms)[1:]]]
    for k in keys:
        m0, s0, n0 = (v[last] for v in stats[base, k])
        row = [k] + [f"{stats[a, k][0][last]:.4f} +- {stats[a, k][1][last]:.4f}" for a in arms]
        for a in list(arms)[1:]:
            m, s, n = (v[last] for v in stats[a, k])
            row.append(f"{m - m0:+.4f} +- {np.sqrt(s ** 2 / n + s0 ** 2 / n0):.4f}")
        table.append(row)
    return table


# -----------------------------------------------------------------------------


def main(argv):
    runs = [a for a in argv if not a.startswith("--")]
    if not runs:
        sys.exit("usage: python plot.py RUN_DIR                 redraws the figures of a run from "
                 "its files\n       python plot.py RUN_DIR RUN_DIR ... [--out_dir=DIR]   "
                 "compare.png and compare.csv of runs (default DIR: compare/ beside the first run)"
                 "\n       python plot.py NAME=DIR,DIR,... NAME=DIR,DIR,... [--out_dir=DIR]   "
                 "arms.png and arms.csv: replicated runs per arm, mean and spread")
    with one_line_errors():
        opts = parse_options([a for a in argv if a.startswith("--")], {"out_dir"})
        missing = [d for r in runs for d in r.split("=", 1)[-1].split(",") if not os.path.isdir(d)]
        if missing:
            raise UserError(f"{missing[0]}: no such run dir; give the out_dir of a train.py run")
        _draw(runs, opts)


def _draw(runs, opts):
    if any("=" in r for r in runs):  # arms of replicated runs: NAME=DIR,DIR,...
        arms = {r.split("=", 1)[0]: r.split("=", 1)[1].split(",") for r in runs}
        out = opts.get("out_dir") or os.path.join(os.path.dirname(os.path.normpath(
            next(iter(arms.values()))[0])), "arms")
        table = plot_arms(arms, out)
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        print("\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in table))
        print(f"wrote {out}/arms.png and arms.csv")
        return
    if len(runs) > 1:
        out = opts.get("out_dir") or os.path.join(os.path.dirname(os.path.normpath(runs[0])),
                                                  "compare")
        table = plot_compare(runs, out)
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        print("\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in table))
        print(f"wrote {out}/compare.png and compare.csv")
        return
    run_dir, drawn = runs[0], []
    if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        plot_run(run_dir)
        drawn.append("training.png")
    if os.path.exists(os.path.join(run_dir, "evals.csv")):
        plot_evals(run_dir)
        drawn.append("evals.png")
    if os.path.exists(os.path.join(run_dir, "dynamics.csv")):
        plot_dynamics(run_dir)
        drawn.append("dynamics.png")
    # one per (k, l)
    for folder in sorted(glob.glob(os.path.join(glob.escape(run_dir), "memorization", "k*_l*"))):
        name = os.path.relpath(folder, run_dir)
        if os.path.exists(os.path.join(folder, "matrix.csv")):
            plot_memorization(folder)
            drawn.append(f"{name}/scores.png, matrix.png, correlation.png")
        if os.path.exists(os.path.join(folder, "duplication_summary.csv")):
            plot_duplication(folder)
            drawn.append(f"{name}/duplication.png")
    if not drawn:
        raise UserError(f"{run_dir} holds no metrics.jsonl, evals.csv or memorization results to "
                        "draw")
    print(f"{run_dir}: drew {', '.join(drawn)}")


if __name__ == "__main__":
    main(sys.argv[1:])
