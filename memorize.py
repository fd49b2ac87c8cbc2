"""
Memorization across checkpoints and data chunks (LLM360 paper §4.3, after
Biderman et al. 2023): prompt a checkpoint with the first k tokens of a training
sequence, generate exactly l tokens greedily, and score the share of them that
equal the data. A sequence with score 1 is k-extractible.

    python memorize.py RUN_DIR [--k=32] [--l=32] [--samples=1000] [--checkpoints=ckpt_003,...]
        [--unseen=True] [--data_dir=DIR] [--batch_size=64] [--seed=0] [--compile=auto]
    torchrun --nproc_per_node=8 memorize.py RUN_DIR --prompt_len=32 --gen_len=32 ...
        (pairs split across ranks; torchrun itself claims --l, so --prompt_len / --gen_len
        name k / l)

RUN_DIR is a run of ours, or a folder of Hugging Face checkpoints ckpt_000 ...
ckpt_359 (AMBER's release; checkpoint i has seen chunks 0..i) with --data_dir
pointing at chunks converted by `python convert_amber.py`. For every
checkpoint and every chunk it has trained on (and, with --unseen, the others, as
a baseline), the same --samples sequences of the chunk, chosen by the seed and
recorded by index, are scored. Each (checkpoint, chunk) pair is written to
RUN_DIR/memorization/kK_lL/ (results at other k and l never mix) as soon as it is done,
so an interrupted analysis resumes where it stopped and a rerun recomputes nothing.
Then the summaries: per checkpoint the score distribution and k-extractible share (Figure 7), the
checkpoint x chunk matrix of mean scores (Figure 8), and the correlation of
per-sequence scores and of k-extractibility between checkpoints (Figure 9), as
printed tables, CSV files, and PNG figures. --compile=auto compiles the decoding
step (torch.compile; CUDA graphs on a GPU) for a checkpoint with sweeping.COMPILE_MIN_STEPS
decoding steps or more to run; True or False forces it.
"""

import json
import os
import sys

import numpy as np
import torch

import checkpoint
import data
import model as model_module
import sweeping
from common import (UserError, as_bool, hold_lock, init_distributed, one_line_errors, parse_options,
                    rank_token, wait_for_ranks, write_json_atomic)
from plot import plot_memorization


class MemorizeError(UserError):
    pass


# -----------------------------------------------------------------------------
# what each checkpoint has seen


def checkpoints_of(run_dir):
    """[(name, path, seen chunk ids in training order, the run's data dirs or None)]. Chunk
    ids count over all stages of a run, as train.py's schedule does."""
    out = []
    for name in checkpoint.checkpoint_names(run_dir):
        path = os.path.join(run_dir, name)
        if checkpoint.kind(path) == "ours":
            st = checkpoint.read_state(path)
            if st is None:
                raise MemorizeError(f"{path}/state.json is not valid: the checkpoint is damaged; "
                                    "move it aside (or leave it out with --checkpoints=...)")
            skipped = {(s["pos"]) for s in st["skipped"]}
            seen = [c for p, c in enumerate(st["schedule"][: st["pos"]]) if p not in skipped]
            out.append((name, path, seen, data.stage_dirs(st["config"])))
        elif checkpoint.kind(path) == "hf":  # AMBER's release: ckpt_i has seen chunks 0..i
            out.append((name, path, list(range(int(name[5:]) + 1)), None))
    if not out:
        raise MemorizeError(f"{run_dir} holds no checkpoints (ckpt_NNN folders with state.json or "
                            "config.json)")
    return out


def sample_indices(n_sequences, samples, seed, chunk):
    """The sequences of a chunk that are scored: the same for every checkpoint and rerun."""
    rng = np.random.default_rng([seed, chunk])
    return np.sort(rng.choice(n_sequences, min(samples, n_sequences), replace=False))


# -----------------------------------------------------------------------------
# scoring


@torch.no_grad()
def greedy_continuations(model, prompts, l, batch_size, device, compile=False):
    """Exactly l greedy tokens after each prompt (n, k), batched, with the KV cache (its
    decoding step compiled with compile=True)."""
    out = []
    if device.type == "cuda":
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        autocast = torch.autocast("cpu", enabled=False)
    for i in range(0, len(prompts), batch_size):
        x = torch.as_tensor(prompts[i : i + batch_size], dtype=torch.long, device=device)
        with autocast:
            out.append(model.generate(x, l, compile=compile)[:, x.shape[1]:].cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, l), dtype=np.int64)


def memorization_scores(generated, truth):
    """Per sequence: the share of the l generated tokens equal to the data's."""
    return (np.asarray(generated) == np.asarray(truth)).mean(axis=1)


def score_pair(model, tokens, sources, indices, k, l, *, batch_size, device, compile=False):
    rows = np.asarray(tokens[indices], dtype=np.int64)
    generated = greedy_continuations(model, rows[:, :k], l, batch_size, device, compile=compile)
    return memorization_scores(generated, rows[:, k : k + l]), sources[indices]


# -----------------------------------------------------------------------------
# the analysis


def run(run_dir, *, k=32, l=32, samples=1000, checkpoints=None, unseen=False, data_dir=None,
        batch_size=64, seed=0, rank=0, world_size=1, device=None, compile="auto"):
    """Score every (checkpoint, chunk) pair not yet on disk; returns the result files' paths.
    compile: True, False, or "auto": compile the decoding step for a checkpoint whose pairs
    here take sweeping.COMPILE_MIN_STEPS steps or more (a compile takes seconds to a minute)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for key, value in (("k", k), ("l", l), ("samples", samples), ("batch_size", batch_size)):
        if value < 1:
            raise MemorizeError(f"{key}={value}: must be >= 1")
    ckpts = checkpoints_of(run_dir)
    picked = sweeping.pick(run_dir, [c[0] for c in ckpts], checkpoints, MemorizeError)
    ckpts = [c for c in ckpts if c[0] in picked]
    # the newest: a branch's stages extend its parent's
    dirs = [data_dir] if data_dir else ckpts[-1][3]
    if dirs is None:
        raise MemorizeError("these checkpoints do not name their data: give --data_dir (converted "
                            "AMBER chunks)")
    table = data.chunk_table(dirs)
    L = min(m["seq_len"] for _, m, _ in table) + 1
    if k + l > L:
        raise MemorizeError(f"k + l = {k + l} is longer than the {L} tokens of each stored "
                            "sequence; lower k or l")
    out_dir = results_dir(run_dir, k, l)
    os.makedirs(out_dir, exist_ok=True)
    if rank == 0:
        # beside the results
        hold_lock(os.path.join(run_dir, ".memorization.lock"), "a memorize.py analysis")
    n_chunks = len(table)
    pairs = []
    for name, path, seen, _ in ckpts:
        chunks = list(dict.fromkeys(seen)) + ([c for c in range(n_chunks) if c not in seen]
                                              if unseen else [])
        pairs += [(name, path, c, c in seen) for c in chunks]
    files, model_for, verified, weights = [], {}, set(), {}
    steps = {}  # decoding steps each checkpoint takes on this rank
    for i, (name, *_) in enumerate(pairs):
        if i % world_size == rank:
            steps[name] = steps.get(name, 0) + -(-samples // batch_size) * l
    for i, (name, path, chunk, was_seen) in enumerate(pairs):
        file = os.path.join(out_dir, f"{name}__chunk_{chunk:03d}.json")
        files.append(file)
        if i % world_size != rank:
            continue
        d, manifest, local = table[chunk]
        if path not in weights:  # once per checkpoint, not once per pair
            weights[path] = checkpoint.identity(path)["weights"]
        key = result_key(weights[path], manifest["chunks"][local]["sha256"], k, l, samples, seed)
        old = read_result(file)
        if old and old.get("key") == key:
            continue  # done before, from the same weights, data and code: nothing is recomputed
        if name not in model_for:
            model_for.clear()
            model, _, _ = checkpoint.load(path, device, need_tokenizer=False)
            model_for[name] = model
        data.check_vocab(manifest, model_for[name].config, where=f"{path}: ", error=MemorizeError)
        # a chunk's sha256 is checked once per process, not once per checkpoint: at AMBER's
        # 360 checkpoints that is 7 GB read once instead of up to 360 times
        tokens, sources = data.open_split(d, manifest["chunks"][local],
                                          verify=(d, local) not in verified)
        verified.add((d, local))
        indices = sample_indices(len(tokens), samples, seed, chunk)
        use_compile = sweeping.compile_decoding(compile, steps[name])
        scores, srcs = score_pair(model_for[name], tokens, sources, indices, k, l,
                                  batch_size=batch_size, device=device, compile=use_compile)
        names = [s["name"] for s in manifest["sources"]]
        write_json_atomic(file, {"checkpoint": name, "chunk": chunk, "seen": was_seen, "k": k,
                                 "l": l, "samples": samples,
                           "seed": seed, "key": key, "data_dir": d, "chunk_in_data_dir": local,
                           "indices": indices.tolist(),
                           "sources": [names[i] for i in srcs.tolist()], "scores": scores.tolist()})
        print(f"{name} chunk {chunk:3d}{'' if was_seen else ' (unseen)'}: mean score "
              f"{scores.mean():.4f}, k-extractible {np.mean(scores == 1.0):.4f}", flush=True)
    return files


def result_key(weights, chunk_sha256, k, l, samples, seed):
    """What a (checkpoint, chunk) result depends on: the checkpoint's weights (their
    fingerprint, checkpoint.identity), the chunk's sha256, k, l, the samples and their
    seed, and the code that computes the scores (this file and model.py)."""
    parts = {"weights": weights, "chunk_sha256": chunk_sha256, "k": k, "l": l, "samples": samples,
             "seed": seed}
    return sweeping.result_key(parts, __file__, model_module.__file__)


def read_result(path):
    """A (checkpoint, chunk) result file, or None when there is none or it is unreadable
    (cut short by a full disk or a copy: it is computed again, with a line that says so)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            result = json.load(f)
        if {"k", "l", "samples", "seed", "scores", "checkpoint", "chunk"} <= set(result):
            return result
    except (OSError, ValueError):
        pass
    print(f"{path} is unreadable (cut short?): not used, computed again when its pair is run",
          flush=True)
    return None


def results_dir(run_dir, k, l):
    """Where the results at prompt length k and generation length l go: one folder per
    (k, l), so that tables, figures and tracing.py never mix two settings."""
    return os.path.join(run_dir, "memorization", f"k{k}_l{l}")


def load_results(out_dir):
    names = sorted(n for n in os.listdir(out_dir) if n.endswith(".json") and "__chunk_" in n)
    return [r for r in (read_result(os.path.join(out_dir, n)) for n in names) if r]


def summarize(out_dir):
    """Tables (printed), CSV files and PNG figures of the results in out_dir (one (k, l))."""
    results = load_results(out_dir)
    ckpts = sorted({r["checkpoint"] for r in results})
    chunks = sorted({r["chunk"] for r in results})
    l = results[0]["l"] if results else 0
    lines = []

    # Figure 7: distribution per checkpoint, over the chunks it has seen
    with open(os.path.join(out_dir, "per_checkpoint.csv"), "w") as f:
        f.write("checkpoint,sequences,mean_score,k_extractible,"
                + ",".join(f"score_{i}/{l}" for i in range(l + 1)) + "\n")
        for c in ckpts:
            s = np.concatenate([r["scores"] for r in results if r["checkpoint"] == c and r["seen"]]
                               or [np.zeros(0)])
            hist = np.bincount(np.rint(s * l).astype(int),
                               minlength=l + 1) if len(s) else np.zeros(l + 1, int)
            f.write(f"{c},{len(s)},{s.mean() if len(s) else float('nan'):.6f},"
                    f"{np.mean(s == 1.0) if len(s) else float('nan'):.6f},"
                    + ",".join(map(str, hist)) + "\n")
            lines.append(f"{c}: {len(s)} seen sequences, mean score {s.mean():.4f}, k-extractible "
                         f"{np.mean(s == 1.0):.4f}" if len(s) else f"{c}: no seen sequences")

    # Figure 8: checkpoint x chunk matrix of mean scores; * marks each checkpoint's newest chunk
    matrix = np.full((len(ckpts), len(chunks)), np.nan)
    newest = {}
    for r in results:
        matrix[ckpts.index(r["checkpoint"]), chunks.index(r["chunk"])] = np.mean(r["scores"])
    for c in ckpts:
        seen = [r["chunk"] for r in results if r["checkpoint"] == c and r["seen"]]
        newest[c] = seen[-1] if seen else None
    with open(os.path.join(out_dir, "matrix.csv"), "w") as f:
        f.write("checkpoint," + ",".join(f"chunk_{c}" for c in chunks) + ",newest_seen_chunk\n")
        for i, c in enumerate(ckpts):
            f.write(c + "," + ",".join("" if np.isnan(v) else f"{v:.6f}" for v in matrix[i])
                    + f",{newest[c]}\n")
    lines.append("mean score, checkpoint x chunk (* = newest chunk seen):")
    lines.append(" " * 10 + "".join(f"{c:>8d}" for c in chunks))
    for i, c in enumerate(ckpts):
        cells = "".join(("" if np.isnan(v) else f"{v:.3f}").rjust(7)
                        + ("*" if chunks[j] == newest[c] else " ") for j, v in enumerate(matrix[i]))
        lines.append(f"{c:>10s}{cells}")

    # Figure 9: correlations between checkpoints, over the sequences both scored
    corr_s, corr_x = correlations(results, ckpts)
    with open(os.path.join(out_dir, "correlation.csv"), "w") as f:
        f.write("checkpoint_a,checkpoint_b,score_corr,extractible_corr\n")
        for i, a in enumerate(ckpts):
            for j, b in enumerate(ckpts):
                f.write(f"{a},{b},{corr_s[i, j]:.6f},{corr_x[i, j]:.6f}\n")

    # per source, when the chunks record their sources
    by_source = {}
    for r in results:
        if r["seen"]:
            for s, v in zip(r["sources"], r["scores"]):
                by_source.setdefault(s, []).append(v)
    with open(os.path.join(out_dir, "per_source.csv"), "w") as f:
        f.write("source,sequences,mean_score,k_extractible\n")
        for name, v in sorted(by_source.items()):
            f.write(f"{name},{len(v)},{np.mean(v):.6f},{np.mean(np.array(v) == 1.0):.6f}\n")
            lines.append(f"source {name}: {len(v)} sequences, mean {np.mean(v):.4f}, "
                         f"k-extractible {np.mean(np.array(v) == 1.0):.4f}")
    plot_memorization(out_dir)
    print("\n".join(lines))
    return {"checkpoints": ckpts, "chunks": chunks, "matrix": matrix, "score_corr": corr_s,
            "extractible_corr": corr_x}


def correlations(results, ckpts):
    """Pearson correlation of per-sequence scores, and of k-extractibility, between checkpoints."""
    per = {c: {} for c in ckpts}
    for r in results:
        for i, s in zip(r["indices"], r["scores"]):
            per[r["checkpoint"]][(r["chunk"], i)] = s
    n = len(ckpts)
    cs, cx = np.full((n, n), np.nan), np.full((n, n), np.nan)
    for i, a in enumerate(ckpts):
        for j, b in enumerate(ckpts):
            keys = sorted(set(per[a]) & set(per[b]))
            if len(keys) < 2:
                continue
            x, y = np.array([per[a][q] for q in keys]), np.array([per[b][q] for q in keys])
            cs[i, j] = _pearson(x, y)
            cx[i, j] = _pearson((x == 1.0).astype(float), (y == 1.0).astype(float))
    return cs, cx


def _pearson(x, y):
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


# -----------------------------------------------------------------------------


def _auto_or_bool(text):
    return "auto" if text == "auto" else as_bool(text)


_auto_or_bool.what = "auto, True or False"


def main(argv):
    if not argv or argv[0].startswith("--"):
        sys.exit("usage: python memorize.py RUN_DIR [--k=32] [--l=32] [--samples=1000] "
                 "[--checkpoints=a,b] [--unseen=True] [--data_dir=DIR] [--batch_size=64] "
                 "[--seed=0] [--compile=auto|True|False]")
    ints = {"k": 32, "l": 32, "samples": 1000, "batch_size": 64, "seed": 0}
    with one_line_errors():
        # torchrun takes --l for its own --log-dir, so --prompt_len / --gen_len are the same as --k
        # / --l
        opts = parse_options(argv[1:], {**dict.fromkeys(ints, int), "prompt_len": int,
                                        "gen_len": int, "checkpoints": str, "unseen": as_bool,
                                        "data_dir": str, "compile": _auto_or_bool}, MemorizeError)
        opts["k"], opts["l"] = opts.pop("prompt_len",
                                        opts.get("k", 32)), opts.pop("gen_len", opts.get("l", 32))
        kw = {key: opts.get(key, default) for key, default in ints.items()}
        rank, world_size, device = init_distributed()
        token = rank_token(world_size)
        run(argv[0], checkpoints=opts["checkpoints"].split(",") if "checkpoints" in opts else None,
            unseen=opts.get("unseen", False), data_dir=opts.get("data_dir"), rank=rank,
            compile=opts.get("compile", "auto"), world_size=world_size, device=device, **kw)
        out_dir = results_dir(argv[0], kw["k"], kw["l"])
        wait_for_ranks(out_dir, token, rank, world_size)  # no timeout
        if rank == 0:
            summarize(out_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
