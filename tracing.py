"""
Any text traced to the training steps that saw it, and benchmark contamination
measured on the exact training data, through infini-gram's suffix-array index of the
token ids (OLMoTrace's engine; requirements-trace.txt).

    python tracing.py index RUN_DIR|DATA_DIR [--workers=2] [--chunks=0-99] [--mem_gb=2]
    python tracing.py RUN_DIR --text="And God said" | --ids=1,2,3 [--max=10]
        [--spans=True --min_len=8]
    python tracing.py contamination RUN_DIR --task_dir=DIR [--n=13]
    python tracing.py memorization RUN_DIR [--k=32 --l=32]  memorize.py's scores by duplication

`index` writes one shard per chunk, DATA_DIR/index/chunk_NNN/, and one for the held-out
split, DATA_DIR/index/val/, straight from the chunk files (never from raw text): each
training row is one infini-gram document. Each chunk is checked against the manifest's
sha256 as it is read, and each shard is built in a temporary folder and renamed into
place with a record of the chunk's sha256, so a kill resumes at the next shard and a
query refuses a shard built from other data. Chunks index independently: at AMBER's
scale, 360 jobs of `--chunks=i-i` (or a range each) on as many machines, into the same
shared data dir. infini-gram's index is about 7 bytes per token (the ids, 2 bytes, and a
5-byte suffix array): 8.8 TB for AMBER's 1.26T tokens.

A query finds every occurrence of the text's token span in the training data: chunk,
row, source, the optimizer step that trained it (the chunk's step that `data.py
inspect` shows, the run's step, and the slot in the global batch), the first
checkpoint that had seen it, and the text around it; the held-out split's count
apart. `--spans=True` lists, as OLMoTrace does for a model's output, the maximal spans
of at least `--min_len` tokens that occur in the training data, with their counts.

`contamination` takes every row of the benchmarks in --task_dir (the files evaluate.py
reads) and reports its longest span found in the training data and whether any
n-gram of --n tokens (13, as GPT-3's analysis) occurs: a row with one is "dirty". Per
task, the dirty share, and per checkpoint the score on the clean and the dirty rows
(from the per-item results in evals.jsonl), to contamination.csv in the run dir.
"""

import json
import os
import sys

import numpy as np

import checkpoint
import data
import index as suffix
import tasks
from common import (as_bool, atomic_write, iter_jsonl, one_line_errors, parse_options, read_json,
                    write_text_atomic)
from index import Index, TraceError


# -----------------------------------------------------------------------------
# contamination: benchmark rows found in the training data


# the text of a benchmark row, from the fields of the schemas evaluate.py reads: question, choices,
# answer, code
ROW_TEXT = {
    "arc_challenge": lambda d: [d["question"], *d["choices"]["text"]],
    "hellaswag": lambda d: [d["ctx_a"] + " " + d["ctx_b"], *d["endings"]],
    "mmlu": lambda d: [d["question"], *d["choices"]],
    "truthfulqa_mc": lambda d: [d["question"], *d["mc1_targets"]["choices"]],
    "humaneval": lambda d: [d["prompt"] + d.get("canonical_solution", "")],
    "mbpp": lambda d: [d["text"], d.get("code", "")],
}


def row_overlap(index, ids, n):
    """(the longest span of ids found in the training data, whether an n-gram of ids is)."""
    longest, start = 0, 0
    for start in range(len(ids)):
        end = start + longest + 1  # only a longer span than the longest so far matters
        while end <= len(ids) and index.count(ids[start:end]) > 0:
            longest, end = end - start, end + 1
    return longest, longest >= n


def contamination(run_dir, task_dir, n=13, out=print):
    """For every row of every benchmark in task_dir: its longest span in the training data
    and whether it is dirty (an n-gram occurs), to contamination_rows.jsonl; per task the
    dirty share, and per checkpoint and metric the score on the clean and the dirty rows
    (from evals.jsonl's per-row items), to contamination.csv. Returns the summary rows."""
    index = Index(run_dir)
    if index.tok is None:
        raise TraceError(f"{run_dir}'s data has no tokenizer: benchmark text cannot be encoded for "
                         "it")
    summary, per_row = [], []
    for task in ROW_TEXT:
        path = tasks.task_file(task_dir, task)
        if path is None:
            continue
        dirty, sha = [], tasks.task_sha256(task_dir, task)
        # evaluate.py's reader, and its checks
        for i, doc in enumerate(tasks.read_rows(path, task)):
            ids = index.tok.encode("\n".join(ROW_TEXT[task](doc)))
            longest, is_dirty = row_overlap(index, ids, n)
            per_row.append({"task": task, "row": i, "tokens": len(ids), "longest_span": longest,
                            "dirty": is_dirty})
            dirty.append(is_dirty)
        line = {"task": task, "rows": len(dirty), "dirty": sum(dirty),
                "dirty_share": sum(dirty) / len(dirty)}
        summary.append(line | {"checkpoint": "", "metric": "", "clean": "", "dirty_score": ""})
        # (checkpoint, metric) -> its newest (clean, dirty) scores; evals.jsonl is streamed
        newest = {}
        # results of these very rows only
        for r in iter_jsonl(os.path.join(run_dir, "evals.jsonl")):
            if r["task"] == task and r.get("items") and r.get("task_sha256") == sha:
                items = np.array(r["items"], dtype=float)
                flags = np.array(dirty[: len(items)])
                newest[(r["checkpoint"], r["metric"])] = (float(items[~flags].mean())
                                                          if (~flags).any() else "",
                                                          float(items[flags].mean()) if flags.any()
                                                          else "")
        for (ckpt, metric), (clean, dirty_score) in newest.items():
            summary.append(line | {"checkpoint": ckpt, "metric": metric, "clean": clean,
                                   "dirty_score": dirty_score})
        out(f"{task}: {sum(dirty)} of {len(dirty)} rows dirty ({100 * line['dirty_share']:.1f}%, "
            f"an {n}-gram in the training data)")
    if not summary:
        raise TraceError(f"{task_dir} holds none of {', '.join(ROW_TEXT)} (.jsonl or .parquet)")
    write_text_atomic(os.path.join(run_dir, "contamination_rows.jsonl"),
                      "".join(json.dumps(r) + "\n" for r in per_row))
    keys = ["task", "rows", "dirty", "dirty_share", "checkpoint", "metric", "clean", "dirty_score"]
    write_text_atomic(os.path.join(run_dir, "contamination.csv"),
                      ",".join(keys) + "\n" + "".join(",".join(str(r[k]) for k in keys) + "\n"
                                                      for r in summary))
    return summary


# -----------------------------------------------------------------------------
# memorization explained by duplication and recency


def _ranks(x):
    """Ranks of x (1-based), ties given their mean rank."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    values, inverse = np.unique(x, return_inverse=True)
    return (np.bincount(inverse, ranks) / np.bincount(inverse))[inverse]


def spearman(x, y):
    """Spearman's rank correlation (Pearson's over ranks, ties averaged); nan when one is
    constant."""
    if len(x) < 2:
        return float("nan")
    rx, ry = _ranks(x), _ranks(y)
    return float("nan") if rx.std() == 0 or ry.std() == 0 else float(np.corrcoef(rx, ry)[0, 1])


# times a sequence was trained on
BUCKETS = [(0, 0), (1, 1), (2, 2), (3, 4), (5, 8), (9, 16), (17, 10**12)]


def duplication(run_dir, k=32, l=32, max_rows=1000, out=print):
    """For every sequence memorize.py scored: how often its k + l tokens occur in the
    training data, how many of those the checkpoint had trained on and how many steps ago
    the last one was, and how often its l-token continuation occurs; to
    memorization/duplication.csv, written as it goes (a checkpoint's rows at a time).
    Then per checkpoint the score and k-extractible share by how often the sequence was
    trained on (duplication_summary.csv, duplication.png), and Spearman's correlation of
    the score with that count and with recency. Returns {checkpoint: (rho duplicates,
    rho recency)}."""
    from plot import plot_duplication

    index = Index(run_dir)
    folder = os.path.join(run_dir, "memorization", f"k{k}_l{l}")  # memorize.results_dir: one (k, l)
    names = sorted(n for n in os.listdir(folder) if "__chunk_" in n and n.endswith(".json")) \
        if os.path.isdir(folder) else []
    if not names:
        raise TraceError(f"{folder} holds no memorization results; run python memorize.py "
                         f"{run_dir} --k={k} --l={l} first")
    by_ckpt = {}
    for name in names:
        by_ckpt.setdefault(name.split("__chunk_")[0], []).append(name)
    keys = ["checkpoint", "chunk", "index", "score", "occurrences", "trained_before",
            "continuation_occurrences", "steps_since_last"]
    summary, rho, cache = [], {}, {}

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(",".join(keys) + "\n")
            for ckpt, files in by_ckpt.items():
                mine = [_duplication_rows(index, run_dir, folder, name, cache, max_rows)
                        for name in files]
                mine = [r for rows in mine for r in rows]
                f.writelines(",".join(str(r[k]) for k in keys) + "\n" for r in mine)
                summary.extend(_by_bucket(ckpt, mine))
                seen = [r for r in mine if r["trained_before"]]
                rho[ckpt] = (spearman([r["score"] for r in seen],
                                      [r["trained_before"] for r in seen]),
                             spearman([r["score"] for r in seen],
                                      [-r["steps_since_last"] for r in seen]))
                out(f"{ckpt}: {len(seen)} sequences it trained on; Spearman's rho of the score "
                    f"with the times trained on {rho[ckpt][0]:.3f}, with recency (fewer steps "
                    f"since last seen) {rho[ckpt][1]:.3f}")

    atomic_write(os.path.join(folder, "duplication.csv"), write)
    write_text_atomic(os.path.join(folder, "duplication_summary.csv"),
                      "checkpoint,trained_before,sequences,mean_score,k_extractible\n"
                      + "".join(",".join(map(str, r)) + "\n" for r in summary))
    plot_duplication(folder)
    return rho


def _duplication_rows(index, run_dir, folder, name, cache, max_rows):
    """The rows of duplication.csv for one (checkpoint, chunk) result of memorize.py."""
    res = read_json(os.path.join(folder, name), "remove it: memorize.py scores its pair again")
    k, l = res["k"], res["l"]
    state = checkpoint.read_state(os.path.join(run_dir, res["checkpoint"]))
    if state is None:
        raise TraceError(f"{run_dir}/{res['checkpoint']}: no readable state.json; python train.py "
                         f"verify {run_dir}")
    at = state["step"]
    d, local = res["data_dir"], res["chunk_in_data_dir"]
    tokens = np.load(os.path.join(d, data.load_manifest(d)["chunks"][local]["file"]), mmap_mode="r")
    rows = []
    for i, score in zip(res["indices"], res["scores"]):
        key = (d, local, i, k + l)
        if key not in cache:  # the same sequences are scored at every checkpoint: looked up once
            seq = np.asarray(tokens[i][: k + l]).tolist()
            found, total = index.occurrences(seq, limit=max_rows)
            cache[key] = (sorted(t["step"] for c, r, _ in found for t in index.trained(c, r)),
                          total, index.count(seq[k:]))
        steps, total, cont = cache[key]
        before = [s for s in steps if s <= at]
        rows.append({"checkpoint": res["checkpoint"], "chunk": res["chunk"], "index": i,
                     "score": score, "occurrences": total, "trained_before": len(before),
                     "continuation_occurrences": cont, "steps_since_last": at - before[-1]
                     if before else ""})
    return rows


def _by_bucket(ckpt, rows):
    out = []
    for lo, hi in BUCKETS:
        s = [r["score"] for r in rows if lo <= r["trained_before"] <= hi]
        if s:
            out.append([ckpt, f"{lo}-{hi}" if hi < 10**12 else f"{lo}+", len(s), float(np.mean(s)),
                        float(np.mean(np.array(s) == 1.0))])
    return out


# -----------------------------------------------------------------------------
# commands


def encode(index, text=None, ids=None):
    """The query's token ids: --ids, each an id of the vocabulary (never the rows'
    separator, which no token is), or --text, valid UTF-8, tokenized."""
    if ids:
        try:
            out = [int(i) for i in ids.split(",")]
        except ValueError:
            raise TraceError(f"--ids={ids!r}: write token ids separated by commas, e.g. "
                             "--ids=1,2,3") from None
        bad = [i for i in out if not 0 <= i < index.vocab_size]
        if bad:
            raise TraceError(f"--ids: {bad[0]} is not a token id; the vocabulary is "
                             f"0..{index.vocab_size - 1}")
        return out
    if index.tok is None:
        raise TraceError("the data dir has no tokenizer to encode --text with; give --ids=1,2,3")
    try:
        (text or "").encode("utf-8")
    except UnicodeEncodeError:
        raise TraceError("--text is not valid UTF-8; give the text in UTF-8 (or its token ids with "
                         "--ids)") from None
    out = index.tok.encode(text or "")
    if not out:
        raise TraceError(f"--text={text!r} tokenizes to nothing; give some text")
    return out


def query(path, text=None, ids=None, limit=10, spans=False, min_len=8, out=print):
    index = Index(path)
    q = encode(index, text, ids)
    if spans:
        found = index.spans(q, min_len)
        for start, end, n in found:
            piece = index.tok.decode(q[start:end]) if index.tok else q[start:end]
            first = index.occurrences(q[start:end], limit=1)[0]
            steps = [t["step"] for c, r, _ in first for t in index.trained(c, r)]
            out(f"tokens {start}-{end} ({end - start}): {n} occurrence(s)"
                + (f", e.g. at step {steps[0]}" if steps else "") + f": {piece!r}")
        return found
    found, total = index.occurrences(q, limit)
    out(f"{len(q)} tokens: {total} occurrence(s) in the training data, {index.count(q, val=True)} "
        f"in the held-out split" + (f"; the first {len(found)} shown" if total > len(found)
                                    else ""))
    rows = []
    for c, r, i in found:
        where = index.trained(c, r)
        rows.append({"chunk": c, "row": r, "position": i, "source": index.source(c, r),
                     "trained": where})
        steps = ", ".join(f"step {t['step']} (chunk step {t['chunk_step']}, slot {t['slot']}, "
                          f"first in {t['checkpoint']})" for t in where) or "not trained"
        out(f"chunk {c} row {r} token {i} [{rows[-1]['source']}]: {steps}: "
            f"{index.context(c, r, i, len(q))!r}")
    return rows, total


def main(argv):
    usage = __doc__.strip().split("\n\n")[1]
    if not argv or argv[0].startswith("--"):
        sys.exit(usage)
    with one_line_errors():
        if argv[0] == "index":
            if len(argv) < 2 or argv[1].startswith("--"):
                sys.exit(usage)
            opts = parse_options(argv[2:], {"workers": int, "chunks": str, "mem_gb": int},
                                 TraceError)
            built = suffix.build(argv[1], opts.get("workers", 1), opts.get("chunks"),
                                 opts.get("mem_gb", 2))
            print(f"{argv[1]}: {len(built)} shard(s) built, the others were up to date")
        elif argv[0] == "contamination":
            if len(argv) < 2 or argv[1].startswith("--"):
                sys.exit(usage)
            opts = parse_options(argv[2:], {"task_dir": str, "n": int}, TraceError)
            if "task_dir" not in opts:
                raise TraceError("contamination needs --task_dir=DIR, the benchmark rows "
                                 "evaluate.py reads")
            contamination(argv[1], opts["task_dir"], opts.get("n", 13))
        elif argv[0] == "memorization":
            if len(argv) < 2 or argv[1].startswith("--"):
                sys.exit(usage)
            opts = parse_options(argv[2:], {"max_rows": int, "k": int, "l": int}, TraceError)
            duplication(argv[1], opts.get("k", 32), opts.get("l", 32), opts.get("max_rows", 1000))
        else:
            opts = parse_options(argv[1:], {"text": str, "ids": str, "max": int, "spans": as_bool,
                                            "min_len": int},
                                 TraceError)
            query(argv[0], opts.get("text"), opts.get("ids"), opts.get("max", 10),
                  opts.get("spans", False), opts.get("min_len", 8))


if __name__ == "__main__":
    main(sys.argv[1:])
