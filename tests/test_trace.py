"""tracing.py against a brute-force scan: a sentence planted in a corpus is found at every
row that holds it, with the steps that trained those rows as data.py inspect's reader
gives them; an index of other data is refused; a rebuild does only what is missing."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import data
from conftest import corpus_values, make_corpus, write_config
from test_evaluate import make_tasks

pytest.importorskip("infini_gram")
import index as suffix  # noqa: E402
import tracing as tr  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLANTED = "zorbify quelm vantrix oplu mendabor"
LEAKED = (1, 3)  # the ARC rows planted in the corpus


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run over the test corpus with PLANTED in several text documents."""
    root = tmp_path_factory.mktemp("trace")
    make_corpus(root)
    for i in range(6):
        (root / "txt" / f"planted{i}.txt").write_text(f"some words {i} before it. {PLANTED} and after it {i}.\n")
    arc = [json.loads(line) for line in (make_tasks(root / "tasks") / "arc_challenge.jsonl").read_text().splitlines()]
    for j in LEAKED:  # two ARC rows leak into the training data, each in several documents
        for copy in range(4):
            (root / "txt" / f"arc{j}_{copy}.txt").write_text("\n".join(tr.ROW_TEXT["arc_challenge"](arc[j])) + "\n")
    values = corpus_values(root, "data", dim=32, n_layer=1, n_head=2, intermediate_size=64, out_dir=str(root / "run"),
                           warmup_steps=2, lr=1e-2, min_lr=1e-3, val_fraction=0.2, seq_len=128, max_seq_len=128)
    cfg_path = write_config(root / "cfg.py", values)
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), cfg_path], check=True, capture_output=True,
                   cwd=root, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
    suffix.build(str(root / "run"), progress=False)
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


def test_a_branch_with_another_batch_size_traces_each_chunk_with_its_own(run):
    """A branch from ckpt_002 that doubles global_batch_size: a row of chunks 0-2 was
    trained at the parent's batch size, a row of chunk 3 at the branch's, after the parent's steps."""
    root, values = run
    G, seed, data_dir = values["global_batch_size"], values["seed"], str(root / "data")
    cfg_path = write_config(root / "branch_g.py", values | dict(out_dir=str(root / "branch_g"), global_batch_size=2 * G,
                                                                branch_from=str(root / "run" / "ckpt_002")))
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), cfg_path], check=True, capture_output=True,
                   cwd=root, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
    ids = data.load_tokenizer(data_dir).encode(PLANTED)
    rows, _ = tr.query(str(root / "branch_g"), ids=",".join(map(str, ids)), limit=100, out=lambda *a: None)

    def batch(chunk):
        return G if chunk <= 2 else 2 * G

    checked = set()
    for r in rows:
        reader = data.ChunkReader(data_dir, r["chunk"], seed, batch(r["chunk"]), batch(r["chunk"]))
        base = sum(data.ChunkReader(data_dir, c, seed, batch(c), batch(c)).steps for c in range(r["chunk"]))
        for t in r["trained"]:
            assert r["row"] in reader.step_rows(t["chunk_step"]).tolist()
            assert t["step"] == base + t["chunk_step"] + 1
            checked.add(batch(r["chunk"]))
    assert checked == {G, 2 * G}, [(r["chunk"], r["trained"]) for r in rows]  # the parent's chunks and the branch's


def test_the_index_refuses_other_data_and_a_rebuild_does_only_what_is_missing(run, capsys):
    root, _ = run
    index_dir = root / "data" / "index"
    shutil.rmtree(index_dir / "chunk_001")
    (index_dir / "chunk_001.tmp").mkdir()  # a build killed halfway: never read
    with pytest.raises(tr.TraceError, match="no index of chunk_001; build it: python tracing.py index"):
        tr.Index(str(root / "run"))
    assert suffix.build(str(root / "run"), progress=False) == [str(index_dir / "chunk_001")]
    record = (index_dir / "chunk_002" / "shard.json").read_text()
    (index_dir / "chunk_002" / "shard.json").write_text(record.replace('"sha256": "', '"sha256": "0'))
    with pytest.raises(tr.TraceError, match="built from other data"):
        tr.Index(str(root / "run"))
    suffix.build(str(root / "run"), progress=False)
    # a chunk whose rows changed in place (same shape, manifest untouched): stale, and a rebuild refuses it
    chunk = root / "data" / "chunk_003.npy"
    original = chunk.read_bytes()
    rows = np.load(chunk)
    np.save(chunk, rows[::-1])
    with pytest.raises(tr.TraceError, match="the chunk file changed since"):
        tr.Index(str(root / "run"))
    with pytest.raises(data.DataError):
        suffix.build(str(root / "run"), progress=False)
    chunk.write_bytes(original)
    assert suffix.build(str(root / "run"), progress=False) == [str(index_dir / "chunk_003")]
    # queries and options it cannot take: one line each, before any work
    for args, error in ((["--text="], "tokenizes to nothing"), (["--ids=65535"], "65535 is not a token id"),
                        (["--ids=1,x"], "write token ids separated by commas"),
                        (["--text=caf\udce9"], "not valid UTF-8")):
        with pytest.raises(SystemExit, match=error):
            tr.main([str(root / "run"), *args])
    for args, error in ((["--chunks=9-12"], "chunks the data does not have"), (["--chunks=3-1"], "an empty range"),
                        (["--mem_gb=0"], "at least 1"), (["--mem_gb=-1"], "at least 1")):
        with pytest.raises(SystemExit, match=error):
            tr.main(["index", str(root / "run"), *args])


def _stuck_indexer(tmp_path):
    """A PYTHONPATH on which infini_gram.indexing never ends and writes nothing (the rest
    of infini_gram is the real one)."""
    import importlib.util

    real = importlib.util.find_spec("infini_gram").submodule_search_locations[0]
    fake = tmp_path / "fake" / "infini_gram"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(f"__path__.append({real!r})\n")
    (fake / "indexing.py").write_text("import time\nwhile True:\n    time.sleep(1)\n")
    return str(tmp_path / "fake")


def test_a_stuck_indexer_is_stopped_and_sigterm_stops_every_worker(run, tmp_path, monkeypatch):
    root, _ = run
    fake = _stuck_indexer(tmp_path)
    monkeypatch.setenv("PYTHONPATH", fake)
    monkeypatch.setattr(suffix, "STALL_S", 1)
    manifest = data.load_manifest(str(root / "data"))
    with pytest.raises(tr.TraceError, match="wrote nothing for 1 s"):
        suffix.build_shard(str(root / "data"), manifest["chunks"][0], str(tmp_path / "shard"))
    # SIGTERM while two workers' indexers run: the command ends, and no indexer is left
    import signal
    import time

    copy = tmp_path / "data"
    shutil.copytree(root / "data", copy, ignore=shutil.ignore_patterns("index"))
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tracing.py"), "index", str(copy), "--workers=2"],
                            env=dict(os.environ, PYTHONPATH=f"{fake}:{ROOT}"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)

    def indexers():
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
            except OSError:
                continue
            if b"infini_gram.indexing" in cmdline and str(copy).encode() in cmdline:
                found.append(pid)
        return found

    deadline = time.time() + 60
    while len(indexers()) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143 and "stopped" in proc.stderr.read()
    deadline = time.time() + 10
    while indexers():
        assert time.time() < deadline, "an indexer outlived tracing.py index"
        time.sleep(0.1)


def test_contamination_flags_exactly_the_leaked_rows_and_splits_the_scores(run):
    """Two ARC rows were put into training documents: exactly those are dirty (a 13-gram in
    the training data), no row of any other task is; the score on the clean and dirty rows
    is the mean of evaluate.py's per-row results over each."""
    import evaluate as ev

    root, _ = run
    ev.sweep(str(root / "run"), ["arc_challenge"], str(root / "tasks"))
    summary = tr.contamination(str(root / "run"), str(root / "tasks"), out=lambda *a: None)
    rows = [json.loads(line) for line in (root / "run" / "contamination_rows.jsonl").read_text().splitlines()]
    assert {(r["task"], r["row"]) for r in rows if r["dirty"]} == {("arc_challenge", j) for j in LEAKED}
    assert {r["task"] for r in rows} == {"arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc"}
    assert all(r["longest_span"] == r["tokens"] for r in rows if r["dirty"])  # the whole row is in a document
    evals = [r for r in ev.read_jsonl(str(root / "run" / "evals.jsonl")) if r["task"] == "arc_challenge"]
    for line in (s for s in summary if s["task"] == "arc_challenge" and s["checkpoint"]):
        items = next(r["items"] for r in evals if (r["checkpoint"], r["metric"]) == (line["checkpoint"], line["metric"]))
        assert line["dirty_score"] == pytest.approx(np.mean([items[j] for j in LEAKED]))
        assert line["clean"] == pytest.approx(np.mean([v for j, v in enumerate(items) if j not in LEAKED]))
    assert (root / "run" / "contamination.csv").read_text().startswith("task,rows,dirty,dirty_share")
    import release

    card = (root / "release" / "README.md")
    release.release(str(root / "run"), str(root / "release"))
    assert "Benchmark contamination" in card.read_text() and "| arc_challenge | 5 | 2 | 40.0% |" in card.read_text()
    # the task's rows reordered since they were evaluated: their per-row results are not split by the new flags
    reordered = root / "tasks_reordered"
    shutil.copytree(root / "tasks", reordered)
    lines = (reordered / "arc_challenge.jsonl").read_text().splitlines(keepends=True)
    (reordered / "arc_challenge.jsonl").write_text("".join(lines[::-1]))
    summary = tr.contamination(str(root / "run"), str(reordered), out=lambda *a: None)
    assert not [s for s in summary if s["task"] == "arc_challenge" and s["checkpoint"]]


def test_memorization_is_explained_by_the_times_each_sequence_was_trained_on(run):
    """For every sequence memorize.py scored, the occurrences of its k + l tokens in the
    training data and how many the checkpoint had trained on (and how many steps ago) equal
    a brute-force scan of the chunks with the reader's order; the summary and the rank
    correlations are written."""
    import memorize

    root, values = run
    run_dir = str(root / "run")
    memorize.run(run_dir, k=8, l=8, samples=20, checkpoints=["ckpt_001", "ckpt_003"])
    memorize.run(run_dir, k=4, l=4, samples=5, checkpoints=["ckpt_001"])  # another (k, l): kept apart, never mixed
    import csv

    rho = tr.duplication(run_dir, k=8, l=8, out=lambda *a: None)
    with open(root / "run" / "memorization" / "k8_l8" / "duplication.csv") as f:
        rows = [{k: (v if k == "checkpoint" else int(v) if k != "score" and v else float(v) if v else v)
                 for k, v in r.items()} for r in csv.DictReader(f)]
    data_dir = str(root / "data")
    manifest = data.load_manifest(data_dir)
    G = values["global_batch_size"]
    readers = [data.ChunkReader(data_dir, c, values["seed"], G, G) for c in range(len(manifest["chunks"]))]
    step_of = {}  # (chunk, row) -> the step that trained it, from the reader's order
    for c, reader in enumerate(readers):
        for s in range(reader.steps):
            for r in reader.step_rows(s).tolist():
                step_of[(c, r)] = c * reader.steps + s + 1
    checked = 0
    for r in rows:
        seq = np.load(os.path.join(data_dir, manifest["chunks"][r["chunk"]]["file"]))[r["index"]][:16]
        found = brute(data_dir, manifest["chunks"], seq.tolist())
        state_step = json.loads((root / "run" / r["checkpoint"] / "state.json").read_text())["step"]
        trained = sorted(step_of[(c, row)] for c, row, _ in found if (c, row) in step_of)
        before = [s for s in trained if s <= state_step]
        assert r["occurrences"] == len(found) and r["trained_before"] == len(before)
        assert r["steps_since_last"] == (state_step - before[-1] if before else "")
        checked += bool(before)
    assert checked >= 20 and set(rho) == {"ckpt_001", "ckpt_003"}
    assert len(rows) == sum(len(r["scores"]) for r in memorize.load_results(memorize.results_dir(run_dir, 8, 8)))
    for name in ("duplication.csv", "duplication_summary.csv", "duplication.png"):
        assert (root / "run" / "memorization" / "k8_l8" / name).exists()
    assert tr.spearman([1, 2, 3, 4], [10, 20, 20, 40]) == pytest.approx(0.9486833, rel=1e-6)  # scipy's value


def test_sample_lists_the_spans_of_its_output_that_the_checkpoint_trained_on(run, capsys):
    """sample.py --trace: a span holding the planted sentence is found, with the last step up
    to the checkpoint that trained a row holding it (the query's own steps); the command
    prints the spans after the text."""
    import sample

    root, _ = run
    ids = data.load_tokenizer(str(root / "data")).encode(PLANTED)
    rows, _ = tr.query(str(root / "run"), ids=",".join(map(str, ids)), limit=100, out=lambda *a: None)
    trained = [t["step"] for r in rows for t in r["trained"]]
    spans = sample.traced_spans(str(root / "run" / "ckpt_003"), [5, 5] + ids + [5], min_len=len(ids))
    assert any(s <= 2 and e >= 2 + len(ids) and last == max(trained) for s, e, _, last in spans), spans
    early = json.loads((root / "run" / "ckpt_000" / "state.json").read_text())["step"]
    assert all(last <= early for *_, last in sample.traced_spans(str(root / "run" / "ckpt_000"), ids, len(ids)))
    sample.main([str(root / "run" / "ckpt_003"), "--prompt=some words", "--max_new_tokens=20", "--temperature=0",
                 "--trace=True", "--min_len=2"])
    assert "in the training data, last trained at step" in capsys.readouterr().out
