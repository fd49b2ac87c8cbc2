"""trace.py against a brute-force scan: a sentence planted in a corpus is found at every
row that holds it, with the steps that trained those rows as data.py inspect's reader
gives them; an index of other data is refused; a rebuild does only what is missing."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import data
from conftest import corpus_values, make_corpus, write_config

pytest.importorskip("infini_gram")
import trace as tr  # noqa: E402  (ours, not the standard library's: the repo is first on the path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLANTED = "zorbify quelm vantrix oplu mendabor"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run over the test corpus with PLANTED in several text documents."""
    root = tmp_path_factory.mktemp("trace")
    make_corpus(root)
    for i in range(6):
        (root / "txt" / f"planted{i}.txt").write_text(f"some words {i} before it. {PLANTED} and after it {i}.\n")
    values = corpus_values(root, "data", dim=32, n_layer=1, n_head=2, intermediate_size=64, out_dir=str(root / "run"),
                           warmup_steps=2, lr=1e-2, min_lr=1e-3, val_fraction=0.2, seq_len=128, max_seq_len=128)
    cfg_path = write_config(root / "cfg.py", values)
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), cfg_path], check=True, capture_output=True,
                   cwd=root, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
    tr.index(str(root / "run"), progress=False)
    return root, values


def brute(data_dir, entries, ids):
    """[(entry index, row, position)] of ids in the given splits, by a numpy scan."""
    out = []
    for e, entry in enumerate(entries):
        tokens = np.load(os.path.join(data_dir, entry["file"]))
        windows = np.lib.stride_tricks.sliding_window_view(tokens, len(ids), axis=1)
        rows, pos = np.nonzero((windows == ids).all(axis=2))
        out += [(e, int(r), int(p)) for r, p in zip(rows, pos)]
    return out


def test_a_planted_sentence_is_found_where_a_scan_finds_it_with_inspects_steps(run):
    root, values = run
    data_dir = str(root / "data")
    manifest = data.load_manifest(data_dir)
    ids = data.load_tokenizer(data_dir).encode(PLANTED)
    expected = brute(data_dir, manifest["chunks"], ids)
    held_out = brute(data_dir, [manifest["val"]], ids)
    assert len(expected) >= 2 and expected + held_out  # planted in training rows (and maybe held-out ones)
    rows, total = tr.query(str(root / "run"), ids=",".join(map(str, ids)), limit=100, out=lambda *a: None)
    assert total == len(expected) and sorted((r["chunk"], r["row"], r["position"]) for r in rows) == sorted(expected)
    assert tr.Index(str(root / "run")).count(ids, val=True) == len(held_out)
    G, steps_per_chunk = values["global_batch_size"], None
    for r in rows:
        (t,) = r["trained"]  # every chunk trained once, none skipped
        reader = data.ChunkReader(data_dir, r["chunk"], values["seed"], G, G)
        steps_per_chunk = reader.steps
        if t["chunk_step"] < reader.steps:
            assert r["row"] in reader.step_rows(t["chunk_step"]).tolist()  # the rows data.py inspect shows
        assert t["step"] == r["chunk"] * steps_per_chunk + t["chunk_step"] + 1 and t["pos"] == r["chunk"]
        assert t["checkpoint"] == f"ckpt_{r['chunk']:03d}"
    spans = tr.Index(str(root / "run")).spans([3, 3, 3] + ids + [3, 3], min_len=len(ids))
    assert any(s[1] - s[0] >= len(ids) and s[2] >= len(expected) for s in spans)


def test_the_index_refuses_other_data_and_a_rebuild_does_only_what_is_missing(run, capsys):
    root, _ = run
    index_dir = root / "data" / "index"
    shutil.rmtree(index_dir / "chunk_001")
    (index_dir / "chunk_001.tmp").mkdir()  # a build killed halfway: never read
    with pytest.raises(tr.TraceError, match="no index of chunk_001; build it: python trace.py index"):
        tr.Index(str(root / "run"))
    assert tr.index(str(root / "run"), progress=False) == [str(index_dir / "chunk_001")]
    record = (index_dir / "chunk_002" / "shard.json").read_text()
    (index_dir / "chunk_002" / "shard.json").write_text(record.replace('"sha256": "', '"sha256": "0'))
    with pytest.raises(tr.TraceError, match="built from other data"):
        tr.Index(str(root / "run"))
    tr.index(str(root / "run"), progress=False)
    with pytest.raises(SystemExit, match="tokenizes to nothing"):
        tr.main([str(root / "run"), "--text="])
