"""
The suffix-array index of a run's training data, for tracing.py and sample.py --trace:
infini-gram's engine (OLMoTrace's; requirements-trace.txt) over one shard per chunk.

    DATA_DIR/index/chunk_NNN/    tokenized.0 (each training row after a separator of
                                 all-ones ids), offset.0 (where each row starts), table.0
                                 (infini-gram's suffix array), shard.json (the chunk's
                                 sha256 and the table's size)
    DATA_DIR/index/val/          the same for the held-out split, kept apart

Shards are written straight from the chunk files (never from raw text), each chunk
checked against the manifest's sha256 as it is read, built in a temporary folder and
renamed into place: a kill resumes at the next shard, and a query refuses a shard
that was built from other data or is incomplete. `Index` maps what the engine finds
to chunk, row and position, and a row to the optimizer steps that trained it.
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np

import checkpoint
import data
from common import UserError, die_with_parent, hold_lock, worker_signals, write_json_atomic

INDEX_FORMAT = "llm360-mini infini-gram shard"
SMALL_SHARD = 64 << 20  # bytes of ids under which a shard is built by one indexer process


class TraceError(UserError):
    pass


def _engine_class():
    try:
        from infini_gram.engine import InfiniGramEngine
    except ImportError:
        raise TraceError("tracing.py needs infini-gram: pip install -r "
                         "requirements-trace.txt") from None
    return InfiniGramEngine


def data_dirs(path):
    """The data dirs of a run dir (its stages), or [path] for a data dir."""
    if os.path.exists(os.path.join(path, "manifest.json")):
        return [path]
    newest = checkpoint.find_checkpoint(path, chunk_ends_only=False)
    if newest is None:
        raise TraceError(f"{path} is neither a data dir (manifest.json) nor a run dir with a "
                         "checkpoint")
    return data.stage_dirs(checkpoint.read_state(newest)["config"])


# -----------------------------------------------------------------------------
# the index: a shard per chunk, written from the chunk files


def _shards(data_dir, manifest):
    """[(shard name, manifest entry)]: every chunk, then the held-out split."""
    out = [(f"chunk_{c:03d}", e) for c, e in enumerate(manifest["chunks"])]
    return out + ([("val", manifest["val"])] if manifest.get("val")
                  and manifest["val"]["sequences"] else [])


def build_shard(data_dir, entry, folder, mem_gb=2, cpus=1, block=4096):
    """One chunk's infini-gram shard: tokenized.0 (each row after a separator of all-ones
    ids, which no token has), offset.0 (where each row starts), then infini-gram's
    suffix array, table.0, built by its own indexer; in folder.tmp, then renamed."""
    tokens, _ = data.open_split(data_dir, entry, verify=True)
    width = tokens.dtype.itemsize
    if tokens.dtype.kind != "u" or width not in (2, 4):
        raise TraceError(f"{data_dir}: tokens of dtype {tokens.dtype} cannot be indexed (uint16 or "
                         "uint32 only; fine-tuning data is not pre-training data)")
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    L = tokens.shape[1] + 1
    with open(os.path.join(tmp, "tokenized.0"), "wb") as f, open(os.path.join(tmp, "offset.0"),
                                                                 "wb") as o:
        for start in range(0, len(tokens), block):  # a block of rows at a time: memory holds one
            rows = np.asarray(tokens[start : start + block])
            out = np.full((len(rows), L), np.iinfo(tokens.dtype).max, dtype=tokens.dtype)
            out[:, 1:] = rows
            f.write(out.tobytes())
            o.write((np.arange(start, start + len(rows), dtype=np.uint64) * (L * width)).tobytes())
    import resource

    # its parallel jobs overlap by 100 kB, and a small shard gets
    if L * width * len(tokens) < SMALL_SHARD:
        # suffixes twice (a wrong table, then a crashed query): measured with infini-gram 2.6.0
        cpus = 1
    cmd = [sys.executable, "-m", "infini_gram.indexing", "--data_dir", os.path.abspath(tmp),
           "--save_dir", os.path.abspath(tmp), "--token_dtype", f"u{8 * width}", "--mem",
           str(mem_gb), "--cpus", str(cpus), "--ulimit",
           str(resource.getrlimit(resource.RLIMIT_NOFILE)[1])]
    returncode, tail = _run_indexer(cmd, tmp, folder)
    size = L * width * len(tokens)
    want = size // width * int(np.ceil(np.log2(size) / 8))  # a pointer of `ratio` bytes per token
    if returncode or not os.path.exists(os.path.join(tmp, "table.0")) or \
            os.path.getsize(os.path.join(tmp, "table.0")) != want:
        raise TraceError(f"infini-gram's indexer failed on {folder}: {tail}")
    write_json_atomic(os.path.join(tmp, "shard.json"),
                      {"format": INDEX_FORMAT, "sha256": entry["sha256"],
                                                        "rows": len(tokens), "row_length": L - 1,
                                                        "dtype": tokens.dtype.name,
                       "table_bytes": want,
                                                        "chunk_file": _file_stamp(data_dir, entry)})
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)


STALL_S = 1800  # an indexer whose files have not grown for this long is stuck, and is stopped


def _run_indexer(cmd, tmp, folder):
    """(exit status, its last line of output) of infini-gram's indexer: it dies with this
    process (a killed worker leaves no indexer behind), and a watchdog stops it when
    nothing under tmp has grown for STALL_S seconds."""
    import functools
    import tempfile
    import time

    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=functools.partial(die_with_parent, os.getpid()))
        grown, last = time.monotonic(), -1
        while proc.poll() is None:
            with contextlib.suppress(OSError):
                size = sum(e.stat().st_size for e in os.scandir(tmp))
                if size != last:
                    grown, last = time.monotonic(), size
            if time.monotonic() - grown > STALL_S:
                proc.kill()
                proc.wait()
                raise TraceError(f"infini-gram's indexer wrote nothing for {STALL_S} s on {folder} "
                                 "and was stopped (too little --mem_gb for the shard?); run "
                                 "tracing.py index again, with more --mem_gb")
            time.sleep(0.2)
        log.seek(0)
        lines = log.read().decode(errors="replace").strip().splitlines()
    return proc.returncode, (lines[-1] if lines else "no output")


def _build_job(job):
    return build_shard(*job)


def build(path, workers=1, chunks=None, mem_gb=2, progress=True):
    """Build the shards of every data dir of path that are missing or stale (or those of
    `chunks`, "4-7" or "1,3,5"); returns them. Ctrl-C or SIGTERM stops every worker and
    its indexer at once: a shard commits by a rename, and the next run builds the rest."""
    import multiprocessing

    from tqdm import tqdm

    _engine_class()  # infini-gram installed, or one line that says what to install
    if not (isinstance(mem_gb, int) and mem_gb >= 1) or not (isinstance(workers, int)
                                                             and workers >= 1):
        raise TraceError(f"--mem_gb={mem_gb} --workers={workers}: each must be a whole number of "
                         "at least 1")
    dirs = data_dirs(path)
    chunks = data.chunk_ids(chunks, max(len(data.load_manifest(d)["chunks"]) for d in dirs))
    jobs = []
    for d in dirs:
        manifest = data.load_manifest(d)
        hold_lock(os.path.join(d, "index.lock"), "tracing.py index")
        for name, entry in _shards(d, manifest):
            if chunks is not None and not (name == "val" or int(name[6:]) in chunks):
                continue
            folder = os.path.join(d, "index", name)
            if not fresh(folder, entry):
                jobs.append((d, entry, folder))
    cpus = max(1, (os.cpu_count() or 1) // max(1, workers))
    with tqdm(total=len(jobs), desc="indexing", unit="shard", disable=not progress) as bar:
        if workers <= 1:
            for d, entry, folder in jobs:
                build_shard(d, entry, folder, mem_gb, cpus)
                bar.update(1)
        else:
            # its exit terminates the workers
            with multiprocessing.Pool(workers, initializer=worker_signals) as pool:
                for _ in pool.imap_unordered(_build_job,
                                             [(d, e, f, mem_gb, cpus) for d, e, f in jobs]):
                    bar.update(1)
    return [f for _, _, f in jobs]


def _shard_record(folder):
    try:
        with open(os.path.join(folder, "shard.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _file_stamp(data_dir, entry):
    """[size, mtime in ns] of a chunk's file: a chunk rewritten in place (its manifest left
    as it was) shows here, without hashing 7 GB for every query."""
    st = os.stat(os.path.join(data_dir, entry["file"]))
    return [st.st_size, st.st_mtime_ns]


def fresh(folder, entry):
    """Whether a shard is complete and was built from this chunk as it is now (its sha256,
    the file's size and time, and the table's size)."""
    record, table = _shard_record(folder), os.path.join(folder, "table.0")
    data_dir = os.path.dirname(os.path.dirname(os.path.abspath(folder)))  # DATA_DIR/index/NAME
    return record.get("sha256") == entry["sha256"] and os.path.exists(table) and \
        os.path.getsize(table) == record.get("table_bytes") and \
        record.get("chunk_file") == _file_stamp(data_dir, entry)


# -----------------------------------------------------------------------------
# the engine over a run's shards, and where each row was trained


class Index:
    """infini-gram over every training chunk of a run's data dirs (chunk ids as the run's
    schedule counts them, over all stages), and apart from it over the held-out splits."""

    def __init__(self, path):
        Engine = _engine_class()
        self.path, self.dirs = path, data_dirs(path)
        self.table = data.chunk_table(self.dirs)
        self.run = None if os.path.exists(os.path.join(path, "manifest.json")) else path
        folders, vals = [], []
        for d, manifest, c in self.table:
            folders.append(self._checked(d, f"chunk_{c:03d}", manifest["chunks"][c]))
        for d in self.dirs:
            manifest = data.load_manifest(d)
            if manifest.get("val") and manifest["val"]["sequences"]:
                vals.append(self._checked(d, "val", manifest["val"]))
        manifest = self.table[0][1]
        self.dtype = np.dtype(manifest["dtype"])
        self.vocab_size = manifest["tokenizer"]["vocab_size"]
        kw = dict(eos_token_id=0, vocab_size=int(np.iinfo(self.dtype).max), version=4,
                  token_dtype=f"u{8 * self.dtype.itemsize}")
        self.engine = Engine(index_dir=folders, **kw)
        self.val = Engine(index_dir=vals, **kw) if vals else None
        self.rows_before = np.cumsum([0] + [m["chunks"][c]["sequences"] for _, m, c in self.table])
        self.tok = None
        if manifest["tokenizer"]["kind"] == "tiktoken" or manifest["tokenizer"].get("file"):
            self.tok = data.load_tokenizer(self.table[0][0], manifest)
        self.state = (checkpoint.read_state(checkpoint.find_checkpoint(self.run)) if self.run
                      else None)
        self._orders, self._configs = {}, {}

    def _checked(self, data_dir, name, entry):
        folder = os.path.join(data_dir, "index", name)
        record = _shard_record(folder)
        if not record:
            raise TraceError(f"{data_dir} has no index of {name}; build it: python tracing.py "
                             f"index {self.path}")
        if not fresh(folder, entry):
            raise TraceError(f"{folder} was built from other data than {data_dir}'s {name} (its "
                             "sha256, or the chunk file changed since); build it again: python "
                             f"tracing.py index {self.path}")
        return os.path.abspath(folder)

    def count(self, ids, val=False):
        engine = self.val if val else self.engine
        return engine.count(input_ids=[int(i) for i in ids])["count"] if engine else 0

    def occurrences(self, ids, limit=None):
        """[(chunk, row, position in the row)] of every occurrence of ids in the training
        chunks (the first `limit` rows found, when given), and the exact total count."""
        ids = [int(i) for i in ids]
        found = self.engine.find(input_ids=ids)
        rows = set()
        for s, (lo, hi) in enumerate(found["segment_by_shard"]):
            for rank in range(lo, hi):
                doc = self.engine.get_doc_by_rank(s=s, rank=rank, max_disp_len=1)["doc_ix"]
                rows.add((s, doc - int(self.rows_before[s])))
                if limit and len(rows) >= limit:
                    break
        out = []
        for c, r in sorted(rows):
            d, manifest, local = self.table[c]
            row = np.load(os.path.join(d, manifest["chunks"][local]["file"]), mmap_mode="r")[r]
            windows = np.lib.stride_tricks.sliding_window_view(np.asarray(row), len(ids))
            out += [(c, r, int(i)) for i in np.flatnonzero((windows == ids).all(axis=1))]
        return out, found["cnt"]

    def trained(self, chunk, row):
        """Where a run trained a row: [{pos, step, chunk_step, slot, checkpoint}], one per
        schedule position of its chunk that trained it (a replacement chunk trains its
        rows again); [] when the run never reached it or the row is in the chunk's
        untrained remainder. Each position counts with the batch size and seed it was
        trained with (a branch may change them: its parent's positions keep the parent's)."""
        if not self.state:
            return []
        skipped = {s["pos"] for s in self.state["skipped"]}
        out, base = [], 0
        for pos, c in enumerate(self.state["schedule"]):
            if pos in skipped:
                continue
            cfg = self._config_at(pos)
            G = cfg["global_batch_size"]
            d_c, m_c, l_c = self.table[c]
            steps = data.chunk_steps(m_c, l_c, G)
            if c == chunk:
                chunk_step, slot = divmod(self._place(chunk, cfg["seed"], row), G)
                done = pos < self.state["pos"] or (self.state["reader"]
                                                   and pos == self.state["pos"]
                                                   and chunk_step < self.state["reader"]["step"])
                if chunk_step < steps and done:
                    out.append({"pos": pos, "step": base + chunk_step + 1, "chunk_step": chunk_step,
                                "slot": slot, "checkpoint": f"ckpt_{pos:03d}"
                                if pos < self.state["pos"] else "ckpt_rolling"})
            base += steps
        return out

    def _config_at(self, pos):
        """The config that trained schedule position pos: the one its chunk-end checkpoint
        recorded (in a branch's run dir, the parent's, linked), else the newest state's."""
        if pos not in self._configs:
            done = (pos < self.state["pos"]
                    and checkpoint.read_state(os.path.join(self.run, f"ckpt_{pos:03d}")))
            self._configs[pos] = (done or self.state)["config"]
        return self._configs[pos]

    def _place(self, chunk, seed, row):
        """A row's place in its chunk's shuffled order under a seed."""
        if (chunk, seed) not in self._orders:
            d, manifest, local = self.table[chunk]
            n_rows = manifest["chunks"][local]["sequences"]
            order = np.random.default_rng([seed, local]).permutation(n_rows)
            self._orders[chunk, seed] = np.argsort(order)  # row -> its place in the chunk's order
        return int(self._orders[chunk, seed][row])

    def source(self, chunk, row):
        d, manifest, local = self.table[chunk]
        sources = np.load(os.path.join(d, manifest["chunks"][local]["sources_file"]), mmap_mode="r")
        return manifest["sources"][int(sources[row])]["name"]

    def context(self, chunk, row, i, n, width=12):
        d, manifest, local = self.table[chunk]
        ids = np.load(os.path.join(d, manifest["chunks"][local]["file"]), mmap_mode="r")[row]
        piece = ids[max(0, i - width) : i + n + width].tolist()
        return self.tok.decode(piece) if self.tok else " ".join(map(str, piece))

    def spans(self, ids, min_len):
        """The maximal spans [(start, end, count)] of ids, at least min_len tokens long, that
        occur in the training data (each as long as it can be from its start, and not
        inside an earlier one)."""
        out, end_max = [], 0
        for start in range(len(ids)):
            end = start + min_len
            if end > len(ids) or self.count(ids[start:end]) == 0:
                continue
            while end < len(ids) and self.count(ids[start : end + 1]) > 0:
                end += 1
            if end > end_max:
                out.append((start, end, self.count(ids[start:end])))
                end_max = end
        return out
