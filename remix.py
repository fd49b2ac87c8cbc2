"""
Another mix of a data dir, by source, without its raw text (ours, or AMBER's converted
release): the same rows, each source re-weighted, shuffled into new chunks.

    python remix.py DATA_DIR OUT_DIR --weights=books:2,code:0.5 [--chunks=4-7] [--n_chunks=N]
        [--seed=0]
"""

import contextlib
import os
import shutil
import sys

import numpy as np

from common import (dir_lock, hold_lock, link, one_line_errors, parse_options, read_json,
                    sha256_file, write_json_atomic)
from data import (DataError, NpyAppender, chunk_entry, chunk_ids, load_manifest, manifest_sha256,
                  new_manifest, open_split)
from prepare import even_sizes, permutation_pieces


# -----------------------------------------------------------------------------
# Remixing a data dir by source, without its raw text (ours, or AMBER's converted release)

REMIX_FORMAT = "llm360-mini remix"
REMIX_BLOCK = 4096  # rows gathered and written at a time: 16 MB at 2,049 uint16 ids a row


def remix_rows(sources, weights, seed, chunk):
    """The rows of one chunk a remix takes, by source id {id: weight}: weight 2 takes each
    row twice, 0.5 a seeded half (exactly round(0.5 n) rows), 1.5 each once and a seeded
    half again, 0 none. Sorted; a row taken twice appears twice."""
    out = []
    for s, w in sorted(weights.items()):
        rows = np.flatnonzero(sources == s)
        whole, part = int(w), round((w - int(w)) * len(rows))
        rng = np.random.default_rng([seed, chunk, s])
        out += [np.repeat(rows, whole), rng.choice(rows, part, replace=False)]
    return np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)


def remix(src_dir, out_dir, weights, chunks=None, n_chunks=None, seed=0, progress=True):
    """A data dir of src_dir's chunks (all, or the ids in `chunks`) with each source's rows
    re-weighted by {source name: weight} (remix_rows), shuffled uniformly (the two-pass
    shuffle of prepare) into n_chunks chunks (default: as many as were read). Memory holds
    one output chunk's row ids and a block of rows, whatever the data's size; each chunk
    commits on its own, so the same call after a kill resumes at the next one. The held-out
    split and the tokenizer are the parent's (hard links), so validation losses compare.
    The manifest records the parent, its manifest's sha256, the weights, and the tokens
    per source that result: the Table 2 of a branch."""
    from tqdm import tqdm

    parent = load_manifest(src_dir)
    names = [s["name"] for s in parent["sources"]]
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise DataError(f"{src_dir} has no source {', '.join(map(repr, unknown))}; its sources: "
                        f"{', '.join(names)}")
    if any(not (isinstance(w, (int, float)) and 0 <= w <= 100) for w in weights.values()):
        raise DataError(f"remix weights {weights}: each must be a number from 0 to 100 (epochs "
                        "over the source)")
    chunks = list(range(len(parent["chunks"]))) if chunks is None else list(chunks)
    bad = [c for c in chunks if not 0 <= c < len(parent["chunks"])]
    if bad or not chunks or len(set(chunks)) < len(chunks):
        raise DataError(f"chunks {bad or chunks}: {src_dir} has chunks "
                        f"0..{len(parent['chunks']) - 1}; give each once")
    if n_chunks is not None and not (isinstance(n_chunks, int) and n_chunks >= 1):
        raise DataError(f"n_chunks={n_chunks!r}: give a whole number of at least 1")
    ids = {names.index(n): weights.get(n, 1.0) for n in names}
    job = {"format": REMIX_FORMAT, "remix_of": os.path.abspath(src_dir), "parent_manifest_sha256":
           manifest_sha256(src_dir), "weights": {n: float(weights.get(n, 1.0)) for n in names},
           "chunks": chunks, "n_chunks": n_chunks or len(chunks), "seed": seed}
    hold_lock(dir_lock(out_dir), "remix.py")
    job_path = os.path.join(out_dir, "remix.json")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        old = read_json(job_path, "remix into a new folder") if os.path.exists(job_path) else None
        if old != job:
            raise DataError(f"{out_dir} exists and holds "
                            f"{'another remix' if old else 'other files'}; give a new folder, or "
                            "the same command to resume it")
    fresh = not os.path.exists(job_path)
    os.makedirs(out_dir, exist_ok=True)
    write_json_atomic(job_path, job)

    # which rows: each read chunk's selection, in a file (8 bytes a row taken), then a uniform
    # shuffle of them
    work = os.path.join(out_dir, ".remix_work")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    taken, n = os.path.join(work, "taken.bin"), 0  # (chunk, row, source) of every row taken
    try:
        with open(taken, "wb") as f:
            for c in chunks:  # each parent chunk checked against its sha256 once, here
                tokens, sources = open_split(src_dir, parent["chunks"][c], verify=True)
                rows = remix_rows(sources, ids, seed, c)
                f.write(np.stack([np.full(len(rows), c), rows, sources[rows]],
                                 1).astype(np.int64).tobytes())
                n += len(rows)
        if n < job["n_chunks"]:
            raise DataError(f"the remix takes {n} rows, fewer than n_chunks={job['n_chunks']}; "
                            "raise the weights")
    except BaseException:  # nothing committed yet: the folder goes back to what it was
        shutil.rmtree(work, ignore_errors=True)
        if fresh:
            os.remove(job_path)
            with contextlib.suppress(OSError):
                os.rmdir(out_dir)
        raise
    dtype = tokens.dtype
    pairs = np.memmap(taken, dtype=np.int64, mode="r", shape=(n, 3))
    L = parent["seq_len"] + 1
    entries = []
    bar = tqdm(desc="remixing", unit="row", total=n, disable=not progress)
    for k, order in enumerate(permutation_pieces(n, even_sizes(n, job["n_chunks"]),
                                                 [seed, len(chunks)], work)):
        rec_path = os.path.join(out_dir, f"chunk_{k:03d}.json")
        if os.path.exists(rec_path):  # committed before a kill
            entries.append(read_json(rec_path, "remove it: its chunk is remixed again"))
            bar.update(len(order))
            continue
        entries.append(_remix_chunk(src_dir, parent, out_dir, k, pairs=pairs, order=order,
                                    dtype=dtype, L=L, names=names,
                                   bar=bar))
        write_json_atomic(rec_path, entries[-1])
    bar.close()
    del pairs
    shutil.rmtree(work)

    # the parent's held-out split, and its tokenizer
    for entry in [parent["val"]] if parent.get("val") else []:
        for key in ("file", "sources_file"):
            link(os.path.join(src_dir, entry[key]), os.path.join(out_dir, entry[key]))
    if parent["tokenizer"].get("file"):
        link(os.path.join(src_dir, parent["tokenizer"]["file"]),
             os.path.join(out_dir, parent["tokenizer"]["file"]))
    tokens_of = {s: sum(e["tokens_per_source"][s] for e in entries) for s in names}
    kept = {k: v for k, v in parent.items() if k not in ("format", "version", "totals")}
    manifest = new_manifest(**kept | {
        "config": {k: v for k, v in job.items() if k != "format"}, "chunks": entries,
        "sources": [dict(s, train_tokens=tokens_of[s["name"]],
                         remix_weight=job["weights"][s["name"]]) for s in parent["sources"]]})
    # last: the data dir is complete
    write_json_atomic(os.path.join(out_dir, "manifest.json"), manifest)
    return manifest


def _remix_weights(text):
    """"books:2,code:0.5" -> {"books": 2.0, "code": 0.5}."""
    try:
        return {k.strip(): float(v) for k, v in (part.split(":") for part in text.split(","))}
    except ValueError:
        raise DataError(f"--weights={text!r}: write source:weight pairs, e.g. "
                        "books:2,code:0.5") from None


def _remix_chunk(src_dir, parent, out_dir, k, *, pairs, order, dtype, L, names, bar):
    """Chunk k of a remix: the rows at `order` of the taken (chunk, row, source) triples,
    gathered from the parent's memory-mapped chunk files block by block, written under a
    temporary name, then renamed."""
    stem = os.path.join(out_dir, f"chunk_{k:03d}")
    tokens_out = NpyAppender(stem + ".npy.part", dtype, (L,))
    sources_out = NpyAppender(stem + ".src.npy.part", np.uint8)
    opened = {}
    for start in range(0, len(order), REMIX_BLOCK):
        block = pairs[order[start : start + REMIX_BLOCK]]
        rows = np.empty((len(block), L), dtype)
        for c in np.unique(block[:, 0]).tolist():
            if c not in opened:
                opened[c] = np.load(os.path.join(src_dir, parent["chunks"][c]["file"]),
                                    mmap_mode="r")
            here = block[:, 0] == c
            rows[here] = opened[c][block[here, 1]]
        tokens_out.append(rows)
        sources_out.append(block[:, 2])
        bar.update(len(block))
    n = tokens_out.close()
    sources_out.close()
    for ext in (".npy", ".src.npy"):
        os.replace(stem + ext + ".part", stem + ext)
    counts = np.bincount(np.load(stem + ".src.npy"), minlength=len(names)) * L
    return chunk_entry(f"chunk_{k:03d}", sha256=sha256_file(stem + ".npy"),
                       sources_sha256=sha256_file(stem + ".src.npy"), sequences=n,
                       tokens_per_source=dict(zip(names, counts)))


# -----------------------------------------------------------------------------


def main(argv):
    with one_line_errors():
        paths = [a for a in argv if not a.startswith("--")]
        opts = parse_options([a for a in argv if a.startswith("--")],
                             {"weights": str, "chunks": str, "n_chunks": int, "seed": int},
                             DataError)
        if len(paths) != 2 or "weights" not in opts:
            raise DataError("usage: python remix.py DATA_DIR OUT_DIR --weights=books:2,code:0.5 "
                            "[--chunks=4-7] [--n_chunks=N] [--seed=0]")
        n_parent = len(load_manifest(paths[0])["chunks"])
        manifest = remix(paths[0], paths[1], _remix_weights(opts["weights"]),
                         chunk_ids(opts.get("chunks"), n_parent), opts.get("n_chunks"),
                         opts.get("seed", 0))
        for s in manifest["sources"]:
            print(f"{s['name']:16s} weight {s['remix_weight']:<5g} {s['train_tokens']:15,d} "
                  "training tokens")
        print(f"{paths[1]}: {manifest['totals']['chunks']} chunks, "
              f"{manifest['totals']['train_sequences']:,} rows")


if __name__ == "__main__":
    main(sys.argv[1:])
