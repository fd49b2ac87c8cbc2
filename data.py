"""
The data dir, as every script reads it: its manifest, its tokenizer, its chunk files,
and ChunkReader, which streams a chunk to train.py in the order every rank agrees on.
Made by prepare.py (raw sources), convert_amber.py (LLM360's released chunks),
remix.py (another mix of a data dir) and finetune.py (conversations).

    python data.py inspect CONFIG --chunk=C --step=S        what step S of chunk C trains on

A data dir holds:
    manifest.json         sources (origin, license, files + sha256, documents, tokens),
                          tokenizer, seed, and every chunk's sha256 and tokens per source
    tokenizer.model       the SentencePiece model (trained here or copied)
    chunk_000.npy ...     uint16 (uint32 when vocab > 65,535) arrays [n_sequences, seq_len + 1]
    chunk_000.src.npy     uint8 source id of every sequence
    val.npy, val.src.npy  the held-out documents of every source, packed the same way
"""

import contextlib
import glob
import hashlib
import json
import os
import shutil
import sys

import numpy as np

from common import (UserError, broadcast0, dir_lock, hold_lock, one_line_errors, parse_options,
                    sha256_file)
from config import ConfigError, load_config


MANIFEST_FORMAT, MANIFEST_VERSION = "llm360-mini data", 2  # 2: the two-pass global shuffle
# what defines a data dir
DATA_KEYS = ("sources", "tokenizer", "val_fraction", "seq_len", "n_chunks", "seed")


class DataError(UserError):
    pass


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
                raise DataError("the SentencePiece model has no EOS piece; train one with eos_id "
                                "set")
        else:
            self.enc = load_tiktoken(name)
            self.vocab_size, self.eos_id = self.enc.n_vocab, self.enc.eot_token
        # what starts a document: our documents follow an EOS and no BOS is added (a Hugging
        # Face folder's tokenizer_config.json may say otherwise, see checkpoint.load)
        self.prefix_id, self.add_bos = self.eos_id, False

    def encode(self, text):
        return (self.sp.encode(text) if self.kind == "sentencepiece"
                else self.enc.encode_ordinary(text))

    def decode(self, ids):
        ids = [int(i) for i in ids]
        return (self.sp.decode(ids) if self.kind == "sentencepiece"
                else self.enc.decode(ids, errors="replace"))


# FastChat's vicuna_v1.1, the template AmberChat was trained with
VICUNA_ROLES = ("USER", "ASSISTANT")


def chat_turn(question, system=""):
    """The prompt part of one turn, "[SYSTEM ]USER: q ASSISTANT:"; the reply follows it
    (finetune.py trains on that, sample.py --chat=True prompts with it)."""
    return (f"{system} " if system else "") + f"{VICUNA_ROLES[0]}: {question} {VICUNA_ROLES[1]}:"


def load_tiktoken(name):
    import tiktoken

    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # tiktoken raises whatever its download raised
        raise DataError(f"tiktoken cannot load encoding {name!r} ({type(e).__name__}: {e}). "
                        "tiktoken downloads its BPE file on first use: offline, put the file in "
                        "TIKTOKEN_CACHE_DIR first, or use tokenizer='train' (SentencePiece trained "
                        "on the sources)") from None


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 65535 else np.uint32


# -----------------------------------------------------------------------------
# Preparing a data dir


def data_config(cfg):
    return {k: getattr(cfg, k) for k in DATA_KEYS} | {"vocab_size": cfg.model.vocab_size}


def write_npy(path, array):
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
    return sha256_file(path)


@contextlib.contextmanager
def staging(out, what="prepare.py preparing it"):
    """A temporary sibling folder of `out` to build in, under out's lock: renamed to `out`
    when the block succeeds, removed when it fails, so a half-built data dir never looks
    valid (data.py and finetune.py build theirs in one)."""
    hold_lock(dir_lock(out), what)
    # the lock's holder owns staging: the rest
    for stale in glob.glob(f"{glob.escape(out.rstrip('/'))}.tmp[0-9]*"):
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


# -----------------------------------------------------------------------------
# Reading a data dir


def chunk_entry(stem, *, sha256, sources_sha256, sequences, tokens_per_source, **extra):
    """A chunk's (or the held-out split's) entry in manifest.json: STEM.npy, the rows, and
    STEM.src.npy, each row's source id, with their sha256, the rows and each source's
    tokens; extra keys (where the chunk came from) after them."""
    return {"file": f"{stem}.npy", "sha256": sha256, "sources_file": f"{stem}.src.npy",
            "sources_sha256": sources_sha256, "sequences": int(sequences),
            "tokens_per_source": {k: int(v) for k, v in tokens_per_source.items()}, **extra}


def new_manifest(*, config, tokenizer, seed, seq_len, dtype, sources, chunks, val, **extra):
    """A data dir's manifest.json, built here for every writer (prepare.py, convert_amber.py,
    remix.py, finetune.py); its totals are counted from the chunks, so they cannot disagree."""
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "config": config,
            "tokenizer": tokenizer, "seed": seed, "seq_len": seq_len, "dtype": dtype, **extra,
            "sources": sources, "chunks": chunks, "val": val,
            "totals": {"train_sequences": sum(c["sequences"] for c in chunks),
                       "train_tokens": sum(sum(c["tokens_per_source"].values()) for c in chunks),
                       "val_sequences": val["sequences"] if val else 0, "chunks": len(chunks)}}


def load_manifest(data_dir):
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.exists(path):
        raise DataError(f"{path} not found. HINT: run `python prepare.py CONFIG` first to prepare "
                        f"{data_dir}")
    try:
        with open(path, "rb") as f:
            manifest = json.load(f)
    except ValueError as e:  # not JSON, or not UTF-8
        raise DataError(f"{path}: not valid JSON ({e}); restore it, or prepare the data "
                        "again") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: a JSON {type(manifest).__name__}, not a manifest; restore it, or "
                        "prepare the data again")
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != MANIFEST_VERSION:
        raise DataError(f"{path}: format {manifest.get('format')!r} version "
                        f"{manifest.get('version')!r}, expected {MANIFEST_FORMAT!r} version "
                        f"{MANIFEST_VERSION}; prepare the data again with this data.py")
    return manifest


def manifest_sha256(data_dir):
    return sha256_file(os.path.join(data_dir, "manifest.json"))


def load_tokenizer(data_dir, manifest=None):
    info = (manifest or load_manifest(data_dir))["tokenizer"]
    if info["kind"] == "tiktoken":
        return Tokenizer("tiktoken", name=info["name"])
    if not info.get("file"):
        raise DataError(f"{data_dir}: the manifest names no tokenizer file (converted data?); "
                        "decoding needs one")
    with open(os.path.join(data_dir, info["file"]), "rb") as f:
        blob = f.read()
    if info.get("sha256") and hashlib.sha256(blob).hexdigest() != info["sha256"]:
        raise DataError(f"{os.path.join(data_dir, info['file'])} is not the tokenizer this data "
                        "was made with (sha256 differs from manifest.json); restore it or prepare "
                        "the data again")
    return Tokenizer("sentencepiece", blob)


def check_vocab(manifest, model_cfg, where="", error=None):
    """Refuse a model whose embedding table cannot hold every token id of the data (train.py
    before training; memorize.py before scoring a checkpoint on a data dir)."""
    vocab = manifest["tokenizer"]["vocab_size"]
    if vocab > model_cfg.vocab_size:
        raise (error or DataError)(f"{where}the data's tokenizer has {vocab} tokens but the "
                                   f"model's vocab_size is {model_cfg.vocab_size}: set vocab_size "
                                   f">= {vocab}, or give data of the model's own tokenizer")


def stage_dirs(config):
    """The data dirs a run trains on, in order: its stages, or its one data_dir (a Config or its
    dict)."""
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
    shown = ", ".join(f"{k}={saved.get(k)!r} there, {wanted[k]!r} here" if k != "sources"
                      else "sources differ" for k in changed)
    raise ConfigError(f"{cfg.data_dir} was prepared with another data config ({shown}); set "
                      "another data_dir to prepare this one, or drop the changed keys to train on "
                      "it as it is")


def training_data(cfg):
    """(dirs, chunk table, data sha256) of the prepared data a run trains on, after every
    check that the data fits the config: each stage prepared, vocabularies and sequence
    lengths, the data keys of a config that names its sources, one tokenizer for all
    stages, n_chunks. The sha256 is the manifest's (of all stages' manifests)."""
    dirs = stage_dirs(cfg)
    for d in dirs:
        if not os.path.exists(os.path.join(d, "manifest.json")):
            raise DataError(f"stage {d} is not prepared: run `python prepare.py CONFIG "
                            f"--data_dir={d}` with its sources first")
    table = chunk_table(dirs)
    for d, manifest in {d: m for d, m, _ in table}.items():
        check_vocab(manifest, cfg.model, where=f"{d}: ")
        if manifest["seq_len"] != cfg.seq_len:
            raise ConfigError(f"{d} holds sequences of {manifest['seq_len']} tokens, the config "
                              f"asks for seq_len={cfg.seq_len}; prepare another data dir")
    if cfg.sources and not cfg.stages:  # a config that names its data must train on that data
        check_data_config(cfg, table[0][1])
    tokenizers = {m["tokenizer"].get("sha256") or m["tokenizer"].get("name") for _, m, _ in table}
    if len(tokenizers) > 1:
        raise ConfigError(f"the stages {dirs} were tokenized with different tokenizers; prepare "
                          "every stage with the first one's "
                          "(tokenizer='STAGE1_DIR/tokenizer.model')")
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
            raise DataError(f"{path}: sha256 does not match manifest.json, the file changed after "
                            f"it was written; prepare {data_dir} again into a fresh data_dir")
        arrays.append(np.load(path, mmap_mode="r", allow_pickle=False))
    return arrays[0], np.asarray(arrays[1])


def verify_dir(data_dir):
    """Every chunk and the held-out split of a data dir against its manifest's sizes and
    sha256; a DataError names the first that differs. Returns the number of chunks."""
    manifest = load_manifest(data_dir)
    for entry in manifest["chunks"] + ([manifest["val"]] if manifest.get("val") else []):
        open_split(data_dir, entry, verify=True)
    return len(manifest["chunks"])


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

    def __init__(self, data_dir, chunk, seed, global_batch_size, micro_batch_size, *, rank=0,
                 world_size=1, verify=True, manifest=None):
        manifest = manifest or load_manifest(data_dir)
        if not 0 <= chunk < len(manifest["chunks"]):
            raise DataError(f"chunk {chunk} does not exist: {data_dir} has "
                            f"{len(manifest['chunks'])} chunks")
        G, mb, W = global_batch_size, micro_batch_size, world_size
        if G % (mb * W):
            raise DataError(f"global_batch_size={G} is not divisible by micro_batch_size x world "
                            f"size = {mb} x {W}; change one of them so that the gradient "
                            "accumulation steps are a whole number")
        self.entry = manifest["chunks"][chunk]
        self.tokens, self.sources = open_split(data_dir, self.entry, verify)
        self.chunk, self.seed, self.G, self.mb, self.rank, self.W = chunk, seed, G, mb, rank, W
        self.accum = G // (mb * W)  # micro-batches per rank per optimizer step
        self.steps = len(self.tokens) // G
        if self.steps == 0:
            raise DataError(f"chunk {chunk} has {len(self.tokens)} sequences, fewer than "
                            f"global_batch_size={G}; lower global_batch_size or n_chunks")
        self.order = np.random.default_rng([seed, chunk]).permutation(len(self.tokens))
        self.step, self.micro = 0, 0  # position: the next micro-batch to read

    def step_rows(self, step):
        """The chunk rows that optimizer step `step` trains on, over all ranks (G,)."""
        return self.order[step * self.G : (step + 1) * self.G]

    def rank_rows(self, step):
        per_rank = self.G // self.W
        return self.step_rows(step)[self.rank * per_rank : (self.rank + 1) * per_rank]

    def batch(self, step, micro):
        """(x, y) int64 tensors (micro_batch_size, seq_len) of micro-batch `micro` of `step` on
        this rank."""
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
        for key, mine in [("chunk", self.chunk), ("chunk_sha256", self.entry["sha256"]),
                          ("seed", self.seed), ("global_batch_size", self.G)]:
            if state[key] != mine:
                raise DataError(f"reader state is for {key}={state[key]!r}, this reader has "
                                f"{mine!r}: resume with the data and config of the saved run")
        if state["micro"] and (state["micro_batch_size"], state["world_size"]) != (self.mb, self.W):
            raise DataError("reader state is mid-step; resume it with the same micro_batch_size "
                            "and world size (at a step boundary any split of the global batch "
                            "works)")
        self.step, self.micro = state["step"], state["micro"]


# -----------------------------------------------------------------------------
# Inspection and AMBER's released format


def inspect(cfg, chunk, step, max_chars=100):
    """Print what optimizer step `step` of chunk `chunk` trains on: rows, sources, text."""
    manifest = load_manifest(cfg.data_dir)
    reader = ChunkReader(cfg.data_dir, chunk, cfg.seed, cfg.global_batch_size,
                         cfg.global_batch_size, manifest=manifest)
    if not 0 <= step < reader.steps:
        raise DataError(f"step {step} is not in chunk {chunk}, which has steps "
                        f"0..{reader.steps - 1}")
    has_tok = manifest["tokenizer"]["kind"] == "tiktoken" or manifest["tokenizer"].get("file")
    # converted data may come without one
    tok = load_tokenizer(cfg.data_dir, manifest) if has_tok else None
    names = [s["name"] for s in manifest["sources"]]
    print(f"chunk {chunk} ({manifest['chunks'][chunk]['file']}), step {step} of {reader.steps}: "
          f"{cfg.global_batch_size} sequences of {manifest['seq_len'] + 1} tokens, seed {cfg.seed}"
          + ("" if tok else "; no tokenizer in the data dir, so token ids are shown"))
    for i, row in enumerate(reader.step_rows(step)):
        head = reader.tokens[row][:64]
        text = tok.decode(head)[:max_chars] if tok else " ".join(map(str, head[:16].tolist()))
        print(f"{i:5d} row {row:8d} {names[reader.sources[row]]:14s} {text!r}")


class NpyAppender:
    """A .npy file of rows written block by block. Its header is written for 0 rows and
    rewritten with the final count on close; numpy pads the header so that the first
    dimension can grow in place, and the result is byte-for-byte what np.save writes."""

    def __init__(self, path, dtype, row_shape=()):
        self.f, self.dtype, self.row_shape, self.rows = open(path, "wb"), np.dtype(dtype), \
            tuple(row_shape), 0
        self._header()

    def _header(self):
        self.f.seek(0)
        np.lib.format.write_array_header_1_0(self.f,
                                             {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                      "fortran_order": False,
                                              "shape": (self.rows, *self.row_shape)})

    def append(self, block):
        block = np.ascontiguousarray(block, dtype=self.dtype)
        assert block.shape[1:] == self.row_shape
        self.f.write(block.tobytes())
        self.rows += len(block)

    def close(self):
        end = self.f.tell()
        self._header()
        if self.f.tell() != 128:  # the header kept its length, so the rows did not move
            raise DataError(f"{self.f.name}: .npy header grew; numpy {np.__version__} does not pad "
                            "it for growth")
        self.f.seek(end)
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return self.rows


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


# -----------------------------------------------------------------------------


def main(argv):
    with one_line_errors():
        if not argv or argv[0] != "inspect":
            raise DataError("usage: python data.py inspect CONFIG --chunk=C --step=S (prepare a "
                            "data dir with prepare.py, convert AMBER's release with "
                            "convert_amber.py, remix with remix.py)")
        where = [a for a in argv[1:] if a.startswith(("--chunk=", "--step="))]
        picks = {k: int(v) for k, v in parse_options(where, error=DataError).items()}
        inspect(load_config([a for a in argv[1:] if a not in where]), picks.get("chunk", 0),
                picks.get("step", 0))


if __name__ == "__main__":
    main(sys.argv[1:])
