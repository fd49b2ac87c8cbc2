"""data.py, prepare.py, convert_amber.py, remix.py: deterministic preparation, nothing lost or leaked, world-size independent
batches, exact resume, and clear errors that leave no half-written data dir."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

import convert_amber
import data
import remix
from data import ChunkReader, DataError, load_manifest
from prepare import permutation_pieces, prepare, split_and_pack, train_sentencepiece
from conftest import make_corpus, make_cfg, make_text

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def prepared(corpus):
    cfg = make_cfg(corpus, "prepared")
    prepare(cfg, progress=False)
    return cfg


def files_of(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def all_rows(cfg):
    manifest = load_manifest(cfg.data_dir)
    rows = [np.load(os.path.join(cfg.data_dir, c["file"])) for c in manifest["chunks"]]
    return manifest, rows


# -----------------------------------------------------------------------------
# preparation


def test_prepare_is_byte_identical_on_rerun_and_seed_changes_the_order(corpus, prepared):
    again = make_cfg(corpus, "again", num_workers=2)  # worker processes give the same bytes as one
    prepare(again, progress=False)
    assert files_of(prepared.data_dir) == files_of(again.data_dir)
    other = make_cfg(corpus, "other_seed", seed=6)
    prepare(other, progress=False)
    a, b = files_of(prepared.data_dir), files_of(other.data_dir)
    assert a["chunk_000.npy"] != b["chunk_000.npy"]
    # a finished data dir is not rebuilt; one built with another config is refused
    before = os.path.getmtime(os.path.join(prepared.data_dir, "manifest.json"))
    prepare(prepared, progress=False)
    assert os.path.getmtime(os.path.join(prepared.data_dir, "manifest.json")) == before
    with pytest.raises(DataError, match="another config"):
        prepare(make_cfg(corpus, "prepared", seed=7), progress=False)


def test_every_sequence_in_exactly_one_chunk_and_counts_add_up(prepared):
    manifest, rows = all_rows(prepared)
    L = prepared.seq_len + 1
    sizes = [len(r) for r in rows]
    assert max(sizes) - min(sizes) <= 1  # split evenly
    assert sum(sizes) == manifest["totals"]["train_sequences"] == sum(s["train_sequences"] for s in manifest["sources"])
    train = np.concatenate(rows)
    src_ids = np.concatenate([np.load(os.path.join(prepared.data_dir, c["sources_file"])) for c in manifest["chunks"]])
    # in the sources read once (weight 1) no two packed sequences of this corpus are equal,
    # so equal rows would be a sequence written twice
    once = train[src_ids != 1]
    assert len({r.tobytes() for r in once}) == len(once)
    val = np.load(os.path.join(prepared.data_dir, "val.npy"))
    assert not {r.tobytes() for r in val} & {r.tobytes() for r in train}
    for s in manifest["sources"]:
        in_chunks = sum(c["tokens_per_source"][s["name"]] for c in manifest["chunks"])
        assert in_chunks == s["train_tokens"] == s["train_sequences"] * L
        assert s["val_documents"] >= 1 and s["train_documents"] + s["val_documents"] == s["documents"]
    assert np.bincount(src_ids).tolist() == [s["train_sequences"] for s in manifest["sources"]]
    code = manifest["sources"][1]
    assert code["documents"] == 10 and all("tests/" not in f["path"] for f in code["files"])  # exclude works
    assert manifest["sources"][2]["documents"] == 6  # jsonl rows grouped by book
    assert manifest["totals"]["train_tokens"] == manifest["totals"]["train_sequences"] * L


def test_split_and_pack_never_leaks_validation_and_loses_only_the_tail():
    # documents whose tokens are unique ids, so every token says where it came from
    rng = np.random.default_rng(0)
    docs, start = [], 0
    for _ in range(50):
        n = int(rng.integers(5, 60))
        docs.append(np.arange(start, start + n, dtype=np.uint32))
        start += n
    L = 16
    for weight in (1.0, 2.0, 0.5):
        train, val, val_docs, dropped = split_and_pack(docs, 0.1, weight, [3, 1], L)
        assert len(val_docs) == 5
        val_ids = np.concatenate([docs[d] for d in val_docs])
        assert not np.isin(val_ids, train).any()  # no validation token is ever trained on
        assert np.isin(val.ravel(), val_ids).all()
        train_ids = np.concatenate([d for i, d in enumerate(docs) if i not in set(val_docs.tolist())])
        counts = np.bincount(train.ravel(), minlength=start)[train_ids]
        assert dropped < L
        if weight == 0.5:  # a seeded half of the documents, each whole or not at all
            assert abs(train.size + dropped - len(train_ids) / 2) <= 60 and set(counts.tolist()) <= {0, 1}
        else:  # every training token `weight` times, except those of the dropped tail
            assert train.size + dropped == weight * len(train_ids)
            assert (counts == weight).sum() >= len(train_ids) - dropped and counts.max() == weight
        if weight == 2.0:  # each epoch in its own shuffled document order
            starts = {int(d[0]): i for i, d in enumerate(docs)}
            seen = [starts[t] for t in train.ravel().tolist() if t in starts]
            half = len(docs) - len(val_docs)
            assert seen[:half] != seen[half : 2 * half] and seen[:half] != sorted(seen[:half])
    # the same seed gives the same packing; another seed another
    a, b, c = split_and_pack(docs, 0.1, 1.0, [3, 1], L), split_and_pack(docs, 0.1, 1.0, [3, 1], L), \
        split_and_pack(docs, 0.1, 1.0, [4, 1], L)
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], c[0])


def test_two_pass_shuffle_is_a_uniform_permutation_in_pieces(tmp_path, monkeypatch):
    import itertools

    monkeypatch.setattr("prepare.SHUFFLE_BLOCK", 64)  # many blocks, so pass 1 really deals across them
    n, sizes = 1000, [300, 1, 0, 450, 249]
    pieces = list(permutation_pieces(n, sizes, [5, 1]))
    assert [len(p) for p in pieces] == sizes
    assert sorted(np.concatenate(pieces).tolist()) == list(range(n))  # each item exactly once
    on_disk = list(permutation_pieces(n, sizes, [5, 1], str(tmp_path)))
    assert all(np.array_equal(a, b) for a, b in zip(pieces, on_disk)) and os.listdir(tmp_path) == []
    other = np.concatenate(list(permutation_pieces(n, sizes, [6, 1])))
    assert not np.array_equal(np.concatenate(pieces), other)
    # uniform: all 4! orders of 4 items, blocks of 2 cut into pieces of 1 and 3, equally often
    monkeypatch.setattr("prepare.SHUFFLE_BLOCK", 2)
    draws = 4800
    seen = {p: 0 for p in itertools.permutations(range(4))}
    for s in range(draws):
        seen[tuple(np.concatenate(list(permutation_pieces(4, [1, 3], s))).tolist())] += 1
    expected = draws / 24
    chi2 = sum((k - expected) ** 2 / expected for k in seen.values())
    assert chi2 < 60, f"chi-square {chi2:.1f} over 23 degrees of freedom: not uniform ({seen})"


def test_tokenizer_round_trips_code_and_prose(prepared, corpus):
    tok = data.load_tokenizer(prepared.data_dir)
    text = (corpus / "code" / "pkg" / "m3.py").read_text() + "\n\tindented  twice \n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 400 and tok.eos_id == 2


# -----------------------------------------------------------------------------
# reading


def step_contents(cfg, chunk, step, world_size, micro):
    """All sequences that `step` trains on, gathered over ranks and micro-batches, sorted."""
    got = []
    for rank in range(world_size):
        reader = ChunkReader(cfg.data_dir, chunk, cfg.seed, cfg.global_batch_size, micro, rank=rank, world_size=world_size)
        for m in range(reader.accum):
            x, y = reader.batch(step, m)
            assert x.shape == (micro, cfg.seq_len) and np.array_equal(x[:, 1:], y[:, :-1])
            got += [np.concatenate([r[:1], s]).tolist() for r, s in zip(x.numpy(), y.numpy())]
    return sorted(got)


def test_steps_do_not_depend_on_world_size_or_micro_batch(prepared):
    for chunk in (0, 3):
        reader = ChunkReader(prepared.data_dir, chunk, prepared.seed, 8, 8)
        assert reader.steps >= 2
        for step in (0, reader.steps - 1):
            ref = sorted(reader.tokens[reader.step_rows(step)].tolist())
            for world_size, micro in [(1, 8), (1, 2), (2, 4), (2, 1), (4, 2), (4, 1)]:
                assert step_contents(prepared, chunk, step, world_size, micro) == ref
    # the order inside a chunk is a function of (seed, chunk) alone
    a = ChunkReader(prepared.data_dir, 1, prepared.seed, 8, 2).order
    assert np.array_equal(a, ChunkReader(prepared.data_dir, 1, prepared.seed, 8, 4, rank=1, world_size=2).order)
    assert not np.array_equal(a, ChunkReader(prepared.data_dir, 1, prepared.seed + 1, 8, 2).order)


def test_resume_mid_chunk_gives_the_remaining_batches(prepared):
    full = [(x.clone(), y.clone()) for x, y in ChunkReader(prepared.data_dir, 2, prepared.seed, 8, 2)]
    reader = ChunkReader(prepared.data_dir, 2, prepared.seed, 8, 2)
    first = [next(reader) for _ in range(7)]  # mid-step: 7 micro-batches of 4 per step
    state = json.loads(json.dumps(reader.state_dict()))  # survives a JSON round trip
    resumed = ChunkReader(prepared.data_dir, 2, prepared.seed, 8, 2)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(first) + len(rest) == len(full)
    for (x, y), (fx, fy) in zip(first + rest, full):
        assert (x == fx).all() and (y == fy).all()
    # mid-step state needs the same split; another seed is refused
    with pytest.raises(DataError, match="same micro_batch_size"):
        ChunkReader(prepared.data_dir, 2, prepared.seed, 8, 4).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        ChunkReader(prepared.data_dir, 2, prepared.seed + 1, 8, 2).load_state_dict(state)


def test_inspect_prints_the_rows_of_a_step(prepared, capsys):
    cfg_file = os.path.join(os.path.dirname(prepared.data_dir), "cfg_inspect.py")
    with open(cfg_file, "w") as f:
        f.write("".join(f"{k} = {getattr(prepared, k)!r}\n" for k in
                        ("sources", "seq_len", "n_chunks", "seed", "val_fraction", "data_dir", "global_batch_size")))
        f.write("vocab_size = 400\nmax_seq_len = 32\n")
    data.main(["inspect", cfg_file, "--chunk=1", "--step=1"])
    out = capsys.readouterr().out.splitlines()
    reader = ChunkReader(prepared.data_dir, 1, prepared.seed, 8, 8)
    rows = [int(line.split()[2]) for line in out[1:]]
    assert rows == reader.step_rows(1).tolist()
    names = {s["id"]: s["name"] for s in load_manifest(prepared.data_dir)["sources"]}
    assert [line.split()[3] for line in out[1:]] == [names[reader.sources[r]] for r in rows]


# -----------------------------------------------------------------------------
# other formats


def test_parquet_and_hf_disk_sources(tmp_path, corpus):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rng = random.Random(1)
    table = pa.table({"content": [make_text(rng, 40) for _ in range(12)], "n": list(range(12))})
    pq.write_table(table, tmp_path / "t.parquet")
    (tmp_path / "hf").mkdir()
    with pa.OSFile(str(tmp_path / "hf" / "data-00000-of-00001.arrow"), "wb") as f:
        with pa.ipc.new_stream(f, table.schema) as w:
            w.write_table(table)
    cfg = make_cfg(corpus, "fmt", sources={
        "pq": {"path": str(tmp_path / "t.parquet"), "format": "parquet", "text_key": "content"},
        "hf": {"path": str(tmp_path / "hf"), "format": "hf_disk", "text_key": "content"}}, n_chunks=2)
    manifest = prepare(cfg, progress=False)
    pq_src, hf_src = manifest["sources"]
    assert pq_src["documents"] == hf_src["documents"] == 12 and pq_src["tokens"] == hf_src["tokens"]


def test_tiktoken_offline_error_and_a_local_encoding(tmp_path, corpus, monkeypatch):
    tiktoken = pytest.importorskip("tiktoken")

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(DataError, match="TIKTOKEN_CACHE_DIR"):
        prepare(make_cfg(corpus, "tk", tokenizer="tiktoken:cl100k_base"), progress=False)
    assert not os.path.exists(corpus / "tk")
    # a byte-level encoding built here stands in for a downloaded one
    ranks = {bytes([i]): i for i in range(256)}
    enc = tiktoken.Encoding("bytes", pat_str=r"\S+|\s+", mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 256})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: enc)
    manifest = prepare(make_cfg(corpus, "tk2", tokenizer="tiktoken:bytes"), progress=False)
    assert manifest["tokenizer"] == {"kind": "tiktoken", "name": "bytes", "file": None, "sha256": None,
                                     "vocab_size": 257, "eos_id": 256}
    web = manifest["sources"][0]
    assert web["tokens"] == sum(f["bytes"] for f in web["files"]) + web["documents"]  # bytes + one EOS each


def release_rows(path):
    import gzip

    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_convert_amber_streams_at_amber_shapes_and_resumes_byte_identical(tmp_path, monkeypatch):
    import hashlib

    src = str(tmp_path / "release")
    paths = convert_amber.write_synthetic_release(src, 3, 40, seed=1)  # rows of 2,049 ids under 32,000
    os.rename(paths[2], paths[2].replace("train_002", "train_10"))  # natural order: train_10 after train_001
    convert_amber.write_synthetic_release(str(tmp_path / "gz"), 1, 30, seed=2, gz=True)
    os.rename(str(tmp_path / "gz" / "train_000.jsonl.gz"), os.path.join(src, "train_2.jsonl.gz"))
    paths = convert_amber.release_files(src)
    assert [os.path.basename(p) for p in paths] == ["train_000.jsonl", "train_001.jsonl", "train_2.jsonl.gz",
                                                    "train_10.jsonl"]
    monkeypatch.setattr(convert_amber, "CONVERT_BLOCK", 16)  # several blocks per file, and a partial last one
    ref = str(tmp_path / "ref")
    manifest = convert_amber.convert_amber(src, ref, workers=2, progress=False)
    assert manifest["dtype"] == "uint16" and manifest["seq_len"] == 2048 and len(manifest["chunks"]) == 4
    names = list(convert_amber.AMBER_SOURCES)
    for c, path in enumerate(paths):
        rows = release_rows(path)
        tokens, sources = data.open_split(ref, manifest["chunks"][c])  # checks the sha256 too
        assert tokens.dtype == np.uint16 and tokens.tolist() == [r["token_ids"] for r in rows]
        assert [names[s] for s in sources] == [r["source"] for r in rows]
        # a block-by-block file is byte for byte what np.save writes
        with open(os.path.join(ref, manifest["chunks"][c]["file"]), "rb") as f:
            import io

            buf = io.BytesIO()
            np.save(buf, np.asarray(tokens))
            assert f.read() == buf.getvalue()
        entry = manifest["chunks"][c]
        with open(path, "rb") as f:  # provenance: release file -> chunk
            assert entry["source_file"] == {"name": os.path.basename(path), "bytes": os.path.getsize(path),
                                            "sha256": hashlib.sha256(f.read()).hexdigest()}
        assert sum(entry["tokens_per_source"].values()) == tokens.size
    assert sum(s["train_tokens"] for s in manifest["sources"]) == manifest["totals"]["train_tokens"] == 150 * 2049

    # a crash in the middle of the third file: two chunks committed, a half-written .tmp, no manifest
    out = str(tmp_path / "out")
    calls, real_append = [], data.NpyAppender.append

    def crash(self, block):
        calls.append(1)
        if len(calls) == 2 * 3 + 2 * 3 + 2:  # 3 blocks of tokens and sources per 40-row file, then 1 more
            raise KeyboardInterrupt
        real_append(self, block)

    monkeypatch.setattr(data.NpyAppender, "append", crash)
    with pytest.raises(KeyboardInterrupt):
        convert_amber.convert_amber(src, out, workers=1, progress=False)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    assert os.path.exists(os.path.join(out, "chunk_002.npy.tmp")) and not os.path.exists(os.path.join(out, "chunk_002.json"))
    monkeypatch.setattr(data.NpyAppender, "append", real_append)
    done, real_convert = [], convert_amber._convert_file
    monkeypatch.setattr(convert_amber, "_convert_file", lambda job: done.append(job[0]) or real_convert(job))
    convert_amber.convert_amber(src, out, workers=1, progress=False)
    assert done == [2, 3]  # the finished chunks are not redone
    assert files_of(out) == files_of(ref) | {"convert.json": files_of(out)["convert.json"]}
    json_of = lambda d: json.loads(files_of(d)["manifest.json"])
    assert json_of(out)["chunks"] == json_of(ref)["chunks"]
    done.clear()
    convert_amber.convert_amber(src, out, workers=1, progress=False)  # nothing left to do
    assert done == []
    reader = ChunkReader(out, 3, 0, 8, 4)
    assert reader.steps == 5 and reader.batch(0, 0)[0].shape == (4, 2048)


# a conversion whose worker hangs in the middle of chunk 1 (faults come from outside the product)
HUNG_WORKER = """
import sys, time
sys.path.insert(0, {root!r})
import convert_amber
import data
real = data.NpyAppender.append
def append(self, block):
    real(self, block)
    self.f.flush()
    if "chunk_001" in self.f.name:
        time.sleep(3600)
data.NpyAppender.append = append
convert_amber.CONVERT_BLOCK = 16
convert_amber.main([{src!r}, {out!r}, "--workers=2"])
"""


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_a_killed_conversion_goes_on_with_the_same_command(tmp_path, sig):
    """Killed (SIGKILL or SIGTERM) while a worker is in the middle of a chunk: no worker
    outlives the conversion, and the same command ends byte-identical to an uninterrupted one."""
    import signal
    import time

    src, out, ref = (str(tmp_path / n) for n in ("release", "out", "ref"))
    convert_amber.write_synthetic_release(src, 4, 40, seed=3)  # rows of 2,049 ids under 32,000
    convert_amber.convert_amber(src, ref, workers=2, progress=False)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", HUNG_WORKER.format(root=root, src=src, out=out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while sum(os.path.exists(os.path.join(out, f"chunk_{c:03d}.json")) for c in (0, 2, 3)) < 3:
        assert proc.poll() is None and time.time() < deadline, "the conversion ended or stalled before the kill"
        time.sleep(0.05)
    with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
        workers = [int(p) for p in f.read().split()]
    assert os.path.exists(os.path.join(out, "chunk_001.npy.tmp"))  # half-written by the hung worker
    proc.send_signal(getattr(signal, sig))
    proc.wait()
    deadline = time.time() + 30
    while any(os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().split()[2] != "Z" for p in workers):
        assert time.time() < deadline, "a worker outlived the conversion"
        time.sleep(0.05)
    convert_amber.convert_amber(src, out, workers=2, progress=False)  # the same command
    assert files_of(out) == files_of(ref) and not any(n.endswith(".tmp") for n in os.listdir(out))


@pytest.mark.parametrize("bad,error", [
    ("{not json", r"train_000.jsonl:3: not valid JSON"),
    ('{"token_ids": [1, 2], "source": "c4"}', r"train_000.jsonl:3: a row of 2 token ids; every row of the release has 2049"),
    ("[32000]", r"train_000.jsonl:3: an id outside the vocabulary 0..31999 \(32000\)"),
    ("[-1]", r"train_000.jsonl:3: an id outside the vocabulary"),
    ("[2.5]", r"train_000.jsonl:3: ids that are not integers in 0..31999"),
    ('{"token_ids": "abc"}', r"train_000.jsonl:3: no 'token_ids' list"),
    ('{"token_ids": [0], "source": "reddit"}', r"train_000.jsonl:3: source 'reddit' is not one of arxiv, .*--sources"),
])
def test_convert_amber_bad_rows_name_file_and_line(tmp_path, bad, error):
    src = str(tmp_path / "release")
    path = convert_amber.write_synthetic_release(src, 1, 4)[0]
    lines = open(path).read().splitlines()
    if bad.startswith("["):  # one bad id at the end of an otherwise good row
        row = json.loads(lines[2])
        row["token_ids"][-1] = json.loads(bad)[0]
        bad = json.dumps(row)
    elif '"source": "reddit"' in bad:
        bad = json.dumps({"token_ids": [0] * 2049, "source": "reddit"})
    lines[2] = bad
    open(path, "w").write("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=error):
        convert_amber.convert_amber(src, str(tmp_path / "out"), workers=1, progress=False)
    assert not os.path.exists(tmp_path / "out" / "manifest.json")
    if "not json" in bad:  # the command line says the same in one line
        last = subprocess_error([src, str(tmp_path / "out2"), "--workers=1"])
        assert last.startswith("error: ") and "train_000.jsonl:3: not valid JSON" in last


def subprocess_error(args):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, os.path.join(root, "convert_amber.py"), *args], capture_output=True, text=True)
    assert p.returncode == 1, p.stderr
    return p.stderr.strip().splitlines()[-1]  # above it: the progress bar


def test_convert_amber_dtype_follows_the_vocabulary_and_refuses_a_changed_release(tmp_path):
    src = str(tmp_path / "release")
    convert_amber.write_synthetic_release(src, 2, 3, row_length=9, vocab_size=70000, seed=3)
    manifest = convert_amber.convert_amber(src, str(tmp_path / "out"), vocab_size=70000, workers=1, progress=False)
    assert manifest["dtype"] == "uint32" and manifest["seq_len"] == 8
    assert manifest["tokenizer"]["vocab_size"] == 70000
    with pytest.raises(DataError, match="vocab_size=70000, not 32000"):
        convert_amber.convert_amber(src, str(tmp_path / "out"), workers=1, progress=False)
    convert_amber.write_synthetic_release(src, 2, 4, row_length=9, vocab_size=70000, seed=4)  # the release changed
    os.remove(tmp_path / "out" / "manifest.json")
    with pytest.raises(DataError, match="chunk 0 was converted from train_000.jsonl"):
        convert_amber.convert_amber(src, str(tmp_path / "out"), vocab_size=70000, workers=1, progress=False)
    os.makedirs(tmp_path / "other")
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="holds no conversion"):
        convert_amber.convert_amber(src, str(tmp_path / "other"), workers=1, progress=False)


# -----------------------------------------------------------------------------
# bad input: a clear error and nothing that looks valid left behind


def no_leftovers(root, name):
    return not any(p.startswith(name) for p in os.listdir(root))


def test_missing_and_empty_sources(corpus, tmp_path):
    cfg = make_cfg(corpus, "bad1", sources={"web": {"path": str(corpus / "nope" / "*.txt"), "format": "text"}})
    with pytest.raises(DataError, match=r"source 'web'.*nope.*does not exist"):
        prepare(cfg, progress=False)
    assert no_leftovers(corpus, "bad1")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("   \n")
    cfg = make_cfg(corpus, "bad2", sources={"e": {"path": str(tmp_path / "empty"), "format": "text"}})
    with pytest.raises(DataError, match="source 'e'.*no text"):
        prepare(cfg, progress=False)
    assert no_leftovers(corpus, "bad2")
    cfg = make_cfg(corpus, "bad3", sources={"w": {"path": str(corpus / "txt"), "fromat": "text"}})
    with pytest.raises(DataError, match="'fromat'.*did you mean 'format'"):
        prepare(cfg, progress=False)


def test_invalid_utf8_is_replaced_and_counted(corpus, tmp_path):
    (tmp_path / "u").mkdir()
    rng = random.Random(3)
    for i in range(4):
        text = make_text(rng, 100).encode()
        (tmp_path / "u" / f"{i}.txt").write_bytes(text[:50] + b"\xff\xfe" + text[50:] if i == 2 else text)
    manifest = prepare(make_cfg(corpus, "utf", sources={"u": {"path": str(tmp_path / "u"), "format": "text"}},
                                n_chunks=2), progress=False)
    files = manifest["sources"][0]["files"]
    assert [f["replaced_bytes"] for f in files] == [0, 0, 2, 0] and manifest["sources"][0]["replaced_bytes"] == 2


def test_more_chunks_than_sequences(corpus):
    with pytest.raises(DataError, match="cannot fill n_chunks=100000"):
        prepare(make_cfg(corpus, "many", n_chunks=100000), progress=False)
    assert no_leftovers(corpus, "many")


def test_tampered_chunk_is_refused(prepared, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared.data_dir, copy)
    arr = np.load(copy / "chunk_001.npy")
    arr[0, 0] += 1
    np.save(copy / "chunk_001.npy", arr)
    with pytest.raises(DataError, match="chunk_001.npy: sha256 does not match"):
        ChunkReader(str(copy), 1, prepared.seed, 8, 2)
    ChunkReader(str(copy), 0, prepared.seed, 8, 2)  # the others still read


def test_tokenizer_vocab_larger_than_the_model_is_refused(prepared, corpus):
    cfg = make_cfg(corpus, "vocab", tokenizer=os.path.join(prepared.data_dir, "tokenizer.model"), vocab_size=300)
    with pytest.raises(DataError, match="tokenizer has 400 tokens but the model's vocab_size is 300"):
        prepare(cfg, progress=False)
    assert no_leftovers(corpus, "vocab")
    from model_config import ModelConfig

    with pytest.raises(DataError, match="vocab_size is 300"):
        data.check_vocab(load_manifest(prepared.data_dir), ModelConfig(vocab_size=300, dim=64, n_head=4))


def test_token_dtype_switches_above_65535():
    assert data.token_dtype(65535) == np.uint16 and data.token_dtype(65536) == np.uint32


def test_a_pydoc_topics_file_is_read_never_run(tmp_path):
    """format 'pydoc_topics' takes the literal `topics` dict; code in the file never runs."""
    import prepare as d

    pwned = tmp_path / "pwned"
    path = tmp_path / "topics.py"
    path.write_text(f"open({str(pwned)!r}, 'w').write('ran')\ntopics = {{'b': 'second', 'a': 'first'}}\n")
    src = {"name": "docs", "format": "pydoc_topics", "path": str(path)}
    assert list(d.documents(src, str(path))) == ["first", "second"] and not pwned.exists()
    path.write_text("topics = dict(a='made by a call')\n")
    with pytest.raises(d.DataError, match="not a pydoc topics file"):
        list(d.documents(src, str(path)))


def test_a_swapped_tokenizer_or_damaged_validation_split_is_refused(prepared, tmp_path):
    """The tokenizer and the held-out split are checked against the manifest's sha256:
    another SentencePiece model, or a zeroed region of val.npy, would give wrong numbers."""
    import shutil

    import numpy as np
    import torch

    import train
    from model import Transformer

    cfg = prepared
    copy = tmp_path / "data"
    shutil.copytree(cfg.data_dir, copy)
    (copy / "tokenizer.model").write_bytes(train_sentencepiece(["another corpus"] * 300, 300))
    with pytest.raises(DataError, match="not the tokenizer this data was made with"):
        data.load_tokenizer(str(copy))
    val = np.load(copy / "val.npy", mmap_mode="r+")
    val[:2] = 0
    val.flush()
    del val
    model = Transformer(cfg.model)
    with pytest.raises(DataError, match="val.npy"):
        train.validation_loss(model, str(copy), data.load_manifest(str(copy)), cfg, rank=0, world_size=1,
                              device=torch.device("cpu"), autocast=torch.autocast("cpu", enabled=False))


def test_remix_takes_each_row_as_its_weight_says_resumes_and_holds_one_block(tmp_path, monkeypatch):
    """A remix of a release converted at AMBER's shapes (rows of 2,049 ids under 32,000):
    every row of a source of weight 2 twice, weight 0 never, 0.5 a seeded half of each
    chunk's, 1 once, shuffled (no longer grouped by chunk); killed after its first chunk and
    run again it ends byte for byte as an uninterrupted remix; its peak traced memory does
    not grow with the rows (a block of rows at a time)."""
    import hashlib
    import tracemalloc

    def converted(name, rows):
        convert_amber.write_synthetic_release(str(tmp_path / f"{name}_release"), 2, rows, seed=1)
        return convert_amber.convert_amber(str(tmp_path / f"{name}_release"), str(tmp_path / name), workers=1, progress=False)

    parent = converted("amber", 300)
    weights = {"arxiv": 2, "c4": 0, "book": 0.5}

    def rows_of(folder, manifest):
        out = []
        for entry in manifest["chunks"]:
            tokens, sources = data.open_split(folder, entry)
            out += [(hashlib.sha1(t.tobytes()).hexdigest(), int(s)) for t, s in zip(tokens, sources)]
        return out

    whole = remix.remix(str(tmp_path / "amber"), str(tmp_path / "whole"), weights, n_chunks=3, progress=False)
    got, before = rows_of(tmp_path / "whole", whole), rows_of(tmp_path / "amber", parent)
    names = [s["name"] for s in parent["sources"]]
    count = {}
    for row in got:
        count[row] = count.get(row, 0) + 1
    for row in set(before):
        w = weights.get(names[row[1]], 1)
        assert count.get(row, 0) == (2 if w == 2 else 0 if w == 0 else 1 if w == 1 else count.get(row, 0)), row
    for c in range(2):  # a half of each chunk's book rows, exactly
        book = [r for r in before[c * 300 : (c + 1) * 300] if names[r[1]] == "book"]
        assert sum(r in count for r in book) == round(len(book) / 2)
    assert got != sorted(got, key=lambda r: before.index(r))  # shuffled across the parent's order
    assert whole["config"]["parent_manifest_sha256"] == data.manifest_sha256(str(tmp_path / "amber"))
    assert {s["name"]: s["train_tokens"] for s in whole["sources"]}["arxiv"] == 2 * 2049 * sum(
        names[r[1]] == "arxiv" for r in before)

    real = remix._remix_chunk

    def die_after_first(src_dir, parent_m, out_dir, k, **kw):
        if k == 1:
            raise KeyboardInterrupt
        return real(src_dir, parent_m, out_dir, k, **kw)

    monkeypatch.setattr(remix, "_remix_chunk", die_after_first)
    with pytest.raises(KeyboardInterrupt):
        remix.remix(str(tmp_path / "amber"), str(tmp_path / "resumed"), weights, n_chunks=3, progress=False)
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    monkeypatch.setattr(remix, "_remix_chunk", real)
    remix.remix(str(tmp_path / "amber"), str(tmp_path / "resumed"), weights, n_chunks=3, progress=False)
    for name in sorted(os.listdir(tmp_path / "whole")):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name

    monkeypatch.setattr(remix, "REMIX_BLOCK", 32)
    peaks = []
    for name, rows in (("small", 300), ("large", 1200)):
        converted(name, rows)
        tracemalloc.start()
        remix.remix(str(tmp_path / name), str(tmp_path / f"{name}_remix"), weights, progress=False)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    chunk_bytes = 1200 * 2049 * 2  # 4.9 MB: the large data is two of them
    assert peaks[1] < 1.5 * peaks[0] and peaks[1] < chunk_bytes / 2, peaks


def test_data_py_and_its_workers_never_load_torch():
    """data.py (and config.py, which it reads configs with) import no torch: each conversion or
    tokenizer worker process would hold it (135 MB of its own memory where workers are spawned)."""
    code = "import sys, data; assert 'torch' not in sys.modules, 'torch was imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-500:]


def test_a_fractional_remix_weight_takes_exactly_round_w_n_rows():
    """Weight 1.37 on 10 rows: each once, and round(0.37 * 10) = 4 of them again (floor would take 3)."""
    sources = np.array([0] * 10 + [1] * 7)
    rows = remix.remix_rows(sources, {0: 1.37, 1: 0.5}, seed=3, chunk=0)
    taken = np.bincount(rows, minlength=17)
    assert taken[:10].sum() == 14 and taken[:10].min() == 1 and taken[:10].max() == 2
    assert taken[10:].sum() == round(0.5 * 7) == 4 and taken[10:].max() == 1  # a seeded half, each row at most once
