"""
LLM360's released AMBER chunks as a data dir that ChunkReader and every analysis read.

    python convert_amber.py SRC_DIR DATA_DIR [--workers=N] [--vocab_size=32000]
                            [--sources=a,b,c] [--tokenizer=tokenizer.model]
"""

import contextlib
import glob
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import re
import sys

import numpy as np

from common import (atomic_write, dir_lock, hold_lock, one_line_errors, parse_options, read_json,
                    sha256_file, worker_signals, write_json_atomic)
from data import DataError, NpyAppender, Tokenizer, chunk_entry, new_manifest, token_dtype


# AMBER's release: 360 JSON-lines files of rows {"token_ids": [2,049 ids], "source": NAME},
# about 20 GB of text each. Converting streams: each file is read line by line and
# written block by block, so memory holds one block whatever the size of the release.
# paper Table 2
AMBER_SOURCES = ("arxiv", "book", "c4", "refinedweb", "starcoder", "stackexchange", "wikipedia")
CONVERT_BLOCK = 256  # rows parsed and written at a time: ~20 MB of Python ints at 2,049 ids a row
CONVERT_FORMAT = "llm360-mini convert-amber"
# measured with `python bench.py convert` (2 cores, 2 workers); for plans
CONVERT_TOKENS_PER_S_PER_WORKER = 7.8e6


class _HashingReader(io.RawIOBase):
    """A raw binary file that feeds every byte read through sha256, so a release file is
    hashed in the same pass that parses it."""

    def __init__(self, path):
        self.f, self.sha = open(path, "rb"), hashlib.sha256()

    def readable(self):
        return True

    def readinto(self, buf):
        n = self.f.readinto(buf)
        self.sha.update(memoryview(buf)[:n])
        return n

    def close(self):
        self.f.close()
        super().close()


def release_files(src_dir):
    """The release's .jsonl and .jsonl.gz files in natural order (train_2 before train_10)."""
    files = glob.glob(os.path.join(src_dir,
                                   "*.jsonl")) + glob.glob(os.path.join(src_dir, "*.jsonl.gz"))
    files.sort(key=lambda p: [int(t) if t.isdigit() else t
                              for t in re.split(r"([0-9]+)", os.path.basename(p))])
    if not files:
        raise DataError(f"{src_dir}: no .jsonl or .jsonl.gz files; LLM360 releases AMBER's chunks "
                        "as train_NNN.jsonl")
    return files


def _open_release_file(path):
    """(binary line stream, raw hashing reader) of a .jsonl or .jsonl.gz file."""
    raw = _HashingReader(path)
    stream = io.BufferedReader(raw, 1 << 22)
    return (gzip.GzipFile(fileobj=stream, mode="rb") if path.endswith(".gz") else stream), raw


def _first_row_length(path):
    stream, raw = _open_release_file(path)
    with stream:
        for lineno, line in enumerate(stream, 1):
            if line.strip():
                return len(_parse_row(line, path, lineno)[0])
    raise DataError(f"{path}: the file holds no rows")


def _parse_row(line, path, lineno):
    """(token ids, source name) of one line of the release."""
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise DataError(f"{path}:{lineno}: not valid JSON ({msg}); fix or remove the "
                        "line") from None
    ids = row.get("token_ids") if isinstance(row, dict) else None
    if not isinstance(ids, list):
        raise DataError(f"{path}:{lineno}: no 'token_ids' list; AMBER's rows are "
                        '{"token_ids": [...], "source": "..."}')
    return ids, row.get("source")


_CONVERT = {}


def _init_convert(counter):
    worker_signals()
    _CONVERT["progress"] = lambda n: _add(counter, n)


def _add(counter, n):
    with counter.get_lock():
        counter.value += n


def _tokens_per_byte(path, L):
    """About how many tokens one byte of a release file holds, from its first 4 MB of rows."""
    with open(path, "rb") as f, (gzip.GzipFile(fileobj=f) if path.endswith(".gz")
                                 else contextlib.nullcontext(f)) as s:
        head = s.read(1 << 22)
        return head.count(b"\n") * L / max(1, f.tell())


def _convert_file(job):
    """Convert release file `path` into chunk c of out_dir, and commit it: the token and
    source files are written under temporary names and renamed, then the chunk's record
    (chunk_NNN.json) is written atomically. The record is what marks the chunk done."""
    c, path, out_dir, L, vocab_size, names, dtype = job
    stem = f"chunk_{c:03d}"
    tok_path, src_path = os.path.join(out_dir,
                                      f"{stem}.npy"), os.path.join(out_dir, f"{stem}.src.npy")
    ids_of = {n: i for i, n in enumerate(names)}
    per_source = np.zeros(len(names), dtype=np.int64)
    tokens = NpyAppender(tok_path + ".tmp", dtype, (L,))
    sources = NpyAppender(src_path + ".tmp", np.uint8)
    stream, raw = _open_release_file(path)

    def flush(block, block_src, first_line):
        try:
            arr = np.array(block)  # no dtype: floats or strings among the ids show in arr.dtype
        except (ValueError, TypeError):
            arr = np.zeros(0)
        bad = None
        if arr.dtype.kind not in "iu" or arr.ndim != 2:  # floats, strings, nulls, ints beyond int64
            bad = next((i for i, r in enumerate(block)
                        if not all(type(t) is int and 0 <= t < vocab_size for t in r)), 0)
            what = f"ids that are not integers in 0..{vocab_size - 1}"
        elif arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
            bad = int(np.nonzero((arr < 0).any(1) | (arr >= vocab_size).any(1))[0][0])
            what = (f"an id outside the vocabulary 0..{vocab_size - 1} "
                    f"({int(arr[bad][(arr[bad] < 0) | (arr[bad] >= vocab_size)][0])})")
        if bad is not None:
            raise DataError(f"{path}:{first_line[bad]}: {what}; is this AMBER's release? "
                            f"(--vocab_size={vocab_size})")
        tokens.append(arr)
        sources.append(np.asarray(block_src, dtype=np.uint8))
        np.add.at(per_source, block_src, L)
        _CONVERT["progress"](arr.size)

    with stream, raw:
        block, block_src, block_lines = [], [], []
        for lineno, line in enumerate(stream, 1):
            if not line.strip():
                continue
            ids, name = _parse_row(line, path, lineno)
            if len(ids) != L:
                raise DataError(f"{path}:{lineno}: a row of {len(ids)} token ids; every row of the "
                                f"release has {L}")
            if name not in ids_of:
                raise DataError(f"{path}:{lineno}: source {name!r} is not one of "
                                f"{', '.join(names)}; name every source of the release with "
                                "--sources=a,b,c")
            block.append(ids)
            block_src.append(ids_of[name])
            block_lines.append(lineno)
            if len(block) == CONVERT_BLOCK:
                flush(block, block_src, block_lines)
                block, block_src, block_lines = [], [], []
        if block:
            flush(block, block_src, block_lines)
        while raw.read(1 << 22):  # hash what the line reader left (a gzip trailer)
            pass
        source_sha = raw.sha.hexdigest()
    n = tokens.close()
    sources.close()
    if n == 0:
        raise DataError(f"{path}: the file holds no rows")
    os.replace(tok_path + ".tmp", tok_path)
    os.replace(src_path + ".tmp", src_path)
    record = chunk_entry(stem, sha256=sha256_file(tok_path),
                         sources_sha256=sha256_file(src_path), sequences=n,
                         tokens_per_source=dict(zip(names, per_source)),
                         source_file={"name": os.path.basename(path),
                                      "bytes": os.path.getsize(path), "sha256": source_sha})
    write_json_atomic(os.path.join(out_dir, f"{stem}.json"), record)
    return c, record


def _finished_chunk(out_dir, c, path):
    """The record of chunk c if it was committed from this same release file, else None."""
    rec_path = os.path.join(out_dir, f"chunk_{c:03d}.json")
    if not os.path.exists(rec_path):
        return None
    rec = read_json(rec_path, "remove it: its chunk is converted again")
    src = rec["source_file"]
    if (src["name"], src["bytes"]) != (os.path.basename(path), os.path.getsize(path)):
        raise DataError(f"{rec_path}: chunk {c} was converted from {src['name']} ({src['bytes']:,} "
                        f"bytes), but file {c} of the release is now {os.path.basename(path)} "
                        f"({os.path.getsize(path):,} bytes); convert into a new folder")
    sizes_ok = all(os.path.exists(os.path.join(out_dir, rec[k])) for k in ("file", "sources_file"))
    return rec if sizes_ok else None


def write_synthetic_release(folder, n_files, rows_per_file, row_length=2049, vocab_size=32000,
                            seed=0, gz=False):
    """A made-up release in LLM360's exact format (train_NNN.jsonl, rows of `row_length`
    ids under `vocab_size`, AMBER's source names): for tests and benchmarks at AMBER's shapes."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for c in range(n_files):
        path = os.path.join(folder, f"train_{c:03d}.jsonl" + (".gz" if gz else ""))
        with (gzip.open(path, "wt") if gz else open(path, "w")) as f:
            for _ in range(rows_per_file):
                ids = rng.integers(0, vocab_size, row_length).tolist()
                f.write(json.dumps({"token_ids": ids,
                                    "source": AMBER_SOURCES[rng.integers(len(AMBER_SOURCES))]})
                        + "\n")
        paths.append(path)
    return paths


def convert_amber(src_dir, out_dir, workers=None, vocab_size=32000, sources=AMBER_SOURCES,
                  tokenizer=None, progress=True):
    """LLM360's released chunks (one JSON-lines file per chunk, in natural file-name order)
    -> a data dir that ChunkReader and the analyses read. Files convert in parallel worker
    processes; each chunk commits on its own, so the same call after a crash resumes at the
    unfinished chunks. The manifest is written last."""
    from tqdm import tqdm

    files = release_files(src_dir)
    names = list(sources)
    if len(names) > 255:
        raise DataError(f"{len(names)} sources: at most 255 (source ids are uint8)")
    dtype = token_dtype(vocab_size)
    # the conversion's parameters, to resume only the same one
    job_path = os.path.join(out_dir, "convert.json")
    if os.path.exists(os.path.join(out_dir, "manifest.json")) and not os.path.exists(job_path):
        raise DataError(f"{out_dir} holds a prepared data dir; give a new folder for the converted "
                        "data")
    if os.path.exists(out_dir) and os.listdir(out_dir) and not os.path.exists(job_path):
        raise DataError(f"{out_dir} exists and holds no conversion; give a new folder for the "
                        "converted data")
    # one conversion at a time: its temporary files are stale
    hold_lock(dir_lock(out_dir), "convert_amber.py")
    os.makedirs(out_dir, exist_ok=True)
    # a killed run's half-written files
    for stale in glob.glob(os.path.join(glob.escape(out_dir), "chunk_*.tmp")):
        os.remove(stale)
    if os.path.exists(job_path):
        job = read_json(job_path, "convert into a new folder")
        mine = {"vocab_size": vocab_size, "sources": names,
                "files": [os.path.basename(p) for p in files]}
        for key, value in mine.items():
            if job[key] != value:
                raise DataError(f"{out_dir} is a conversion with {key}={job[key]!r}, not "
                                f"{value!r}; rerun it with the same release and options, or "
                                "convert into a new folder")
        L = job["row_length"]
    else:
        L = _first_row_length(files[0])
        job = {"format": CONVERT_FORMAT, "src_dir": os.path.abspath(src_dir), "row_length": L,
               "vocab_size": vocab_size, "sources": names, "files": [os.path.basename(p)
                                                                     for p in files]}
        write_json_atomic(job_path, job)
    if tokenizer:
        with open(tokenizer, "rb") as f:
            blob = f.read()
        tok = Tokenizer("sentencepiece", blob)
        if tok.vocab_size > vocab_size:
            raise DataError(f"{tokenizer}: {tok.vocab_size} tokens, more than "
                            f"--vocab_size={vocab_size}")
        atomic_write(os.path.join(out_dir, "tokenizer.model"),
                     lambda tmp: open(tmp, "wb").write(blob))

    records = {c: r for c, path in enumerate(files) if (r := _finished_chunk(out_dir, c, path))}
    jobs = [(c, path, out_dir, L, vocab_size, names, dtype) for c, path in enumerate(files)
            if c not in records]
    workers = max(1, min(workers or os.cpu_count(), len(jobs)))
    if records:
        print(f"{out_dir}: {len(records)} of {len(files)} chunks are done already; converting the "
              f"other {len(jobs)}")
    # the bar counts tokens; its total (for the ETA) is estimated from the first pending file's head
    estimate = _tokens_per_byte(jobs[0][1], L) * sum(os.path.getsize(j[1])
                                                     for j in jobs) if jobs else 0
    bar = tqdm(desc="converting", unit="tok", unit_scale=True, total=int(estimate),
               disable=not progress or not jobs)
    try:
        if workers == 1:
            _CONVERT["progress"] = bar.update
            for j in jobs:
                c, rec = _convert_file(j)
                records[c] = rec
        else:
            ctx = multiprocessing.get_context("fork"
                                              if "fork" in multiprocessing.get_all_start_methods()
                                              else "spawn")
            counter = ctx.Value("q", 0)
            with ctx.Pool(workers, _init_convert, (counter,)) as pool:
                result = pool.map_async(_convert_file, jobs, chunksize=1)
                while not result.ready():  # a failed file makes the result ready at once
                    result.wait(0.5)
                    bar.update(counter.value - bar.n)
                records.update(result.get())
                bar.update(counter.value - bar.n)
    finally:
        bar.close()

    entries = [records[c] for c in range(len(files))]
    tok_info = {"kind": "sentencepiece", "file": None, "sha256": None, "vocab_size": vocab_size,
                "note": "LLaMA's tokenizer; not shipped with the chunks (give "
                "--tokenizer=tokenizer.model to add it)"}
    if tokenizer:
        tok_info |= {"file": "tokenizer.model", "sha256": hashlib.sha256(blob).hexdigest(),
                     "source_file": os.path.abspath(tokenizer), "eos_id": tok.eos_id}
    manifest = new_manifest(
        config={"converted_from": os.path.abspath(src_dir), "vocab_size": vocab_size,
                "sources": names},
        tokenizer=tok_info, seed=None, seq_len=L - 1, dtype=np.dtype(dtype).name,
        sources=[{"name": n, "id": i, "origin": "LLM360 AMBER data release",
                  "license": "see the release",
                  "train_tokens": sum(e["tokens_per_source"][n] for e in entries)}
                 for i, n in enumerate(names)],
        chunks=entries, val=None)
    # last: the data dir is complete
    write_json_atomic(os.path.join(out_dir, "manifest.json"), manifest)
    return manifest


# -----------------------------------------------------------------------------


def main(argv):
    with one_line_errors():
        paths = [a for a in argv if not a.startswith("--")]
        if len(paths) != 2:
            raise DataError("usage: python convert_amber.py SRC_DIR DATA_DIR [--workers=N] "
                            "[--vocab_size=32000] [--sources=a,b,c] [--tokenizer=tokenizer.model]")
        opts = parse_options([a for a in argv if a.startswith("--")],
                             {"workers": int, "vocab_size": int, "sources": str, "tokenizer": str},
                             DataError)
        manifest = convert_amber(paths[0], paths[1], workers=opts.get("workers") or None,
                                 vocab_size=opts.get("vocab_size", 32000),
                                 sources=opts["sources"].split(",") if "sources" in opts
                                 else AMBER_SOURCES,
                                 tokenizer=opts.get("tokenizer"))
        t = manifest["totals"]
        print(f"{paths[1]}: {t['chunks']} chunks, {t['train_sequences']:,} sequences, "
              f"{t['train_tokens']:,} tokens")


if __name__ == "__main__":
    main(sys.argv[1:])
