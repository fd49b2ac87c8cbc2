"""release.py: a run as one folder to upload, as LLM360 released AMBER: Hugging Face
checkpoints with our logits, optimizer states and data linked (not copied), a model card
whose links all resolve and whose numbers are the run's, a rerun that exports only what
is new, and a release that reproduces its run bit for bit."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import evaluate as ev
import memorize as mem
import release as rel
from conftest import trained_run
from test_evaluate import make_tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory.mktemp("release_corpus"), val_sequences=16, n_chunks=3, max_seq_len=128)


def links(card):
    return re.findall(r"\]\(([^)]+)\)", card)


def test_release_links_loads_and_reproduces(run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = tmp_path / "run"
    shutil.copytree(run / "run", run_dir, ignore=shutil.ignore_patterns("ckpt_002"), copy_function=os.link)
    out = tmp_path / "release"
    rel.release(str(run_dir), str(out))
    first = {n: os.stat(out / "checkpoints" / "ckpt_000" / n) for n in os.listdir(out / "checkpoints" / "ckpt_000")}

    # a new checkpoint, then evaluations and memorization: a rerun exports ckpt_002 only, refreshes the rest
    shutil.copytree(run / "run" / "ckpt_002", run_dir / "ckpt_002", copy_function=os.link)
    tasks = make_tasks(tmp_path / "tasks")
    ev.sweep(str(run_dir), ["ppl", "arc_challenge"], str(tasks), limit=3)
    mem.run(str(run_dir), k=16, l=16, samples=4)
    mem.summarize(mem.results_dir(str(run_dir), 16, 16))
    rel.release(str(run_dir), str(out))
    for n, st in first.items():  # not exported again
        now = os.stat(out / "checkpoints" / "ckpt_000" / n)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), n

    # every checkpoint loads in transformers with our logits; the final one at the top level
    tok = AutoTokenizer.from_pretrained(out)
    for name in ("ckpt_000", "ckpt_001", "ckpt_002"):
        ours, our_tok, _ = checkpoint.load(str(run_dir / name))
        hf = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / name, dtype=torch.float32).eval()
        ids = torch.tensor([[our_tok.eos_id] + tok.encode("alpha beta gamma delta red blue")])
        with torch.no_grad():
            assert torch.allclose(hf(ids).logits, ours(ids)[0], atol=1e-4)
    top = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(top.lm_head.weight, hf.lm_head.weight)

    # linked, not copied: optimizer states, data chunks, the final model, shared tokenizer files
    same = lambda a, b: os.stat(a).st_ino == os.stat(b).st_ino  # noqa: E731
    assert same(out / "optimizer" / "ckpt_001" / "optimizer.pt", run_dir / "ckpt_001" / "optimizer.pt")
    assert same(out / "data" / "chunk_002.npy", run / "data" / "chunk_002.npy")
    assert same(out / "model.safetensors", out / "checkpoints" / "ckpt_002" / "model.safetensors")
    assert same(out / "checkpoints" / "ckpt_000" / "tokenizer.json", out / "checkpoints" / "ckpt_002" / "tokenizer.json")
    assert same(out / "evals" / "evals.csv", run_dir / "evals.csv")

    # the card: Table 1's columns, every link resolves, the run's numbers
    card = (out / "README.md").read_text()
    assert "| code | config | checkpoints | optimizer states | data mix | data order | data availability |" in card
    assert all((out / p).exists() for p in links(card)), [p for p in links(card) if not (out / p).exists()]
    assert {"logs/training.png", "evals/evals.png", "memorization/k16_l16/scores.png"} <= set(links(card))
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    for s in manifest["sources"]:
        assert f"| {s['name']} |" in card and f"{s['train_tokens']:,}" in card
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert f"final validation loss | {[m for m in metrics if 'val_loss' in m][-1]['val_loss']:.4f}" in card
    for s in manifest["sources"]:  # and each source's
        last = [m for m in metrics if 'val_loss' in m][-1][f"val_loss/{s['name']}"]
        assert f"final validation loss, {s['name']} | {last:.4f}" in card
    assert "Evaluations of ckpt_002" in card and "| arc_challenge | acc |" in card

    # a checkpoint gone from the run (moved aside): the release, which may hold its last copy, is left as it was
    os.rename(run_dir / "ckpt_002", tmp_path / "ckpt_002.away")
    before = sorted((p, os.stat(p).st_mtime_ns) for p in out.rglob("*") if p.is_file())
    with pytest.raises(rel.ReleaseError, match="holds ckpt_002, which .* no longer has"):
        rel.release(str(run_dir), str(out))
    assert sorted((p, os.stat(p).st_mtime_ns) for p in out.rglob("*") if p.is_file()) == before
    os.rename(tmp_path / "ckpt_002.away", run_dir / "ckpt_002")

    # the release reproduces its run: its config and data train the same final weights
    cmd = re.search(r"python train.py logs/config.py (.*)\n", card).group(1).split()
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "logs/config.py", *cmd], check=True,
                   capture_output=True, cwd=out)
    a, b = load_file(out / "rerun" / "ckpt_002" / "model.safetensors"), load_file(run_dir / "ckpt_002" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_release_writes_only_into_a_release_of_its_run(run, tmp_path):
    """The run dir, a folder inside it, a folder of other files, a release of another run:
    each refused before anything is written; a rerun into the same folder leaves exactly
    what one release leaves (no stray *.tmp links)."""
    run_dir = run / "run"
    def tree(folder):
        return sorted((os.path.relpath(os.path.join(d, f), folder), os.path.getsize(os.path.join(d, f)))
                      for d, _, fs in os.walk(folder) for f in fs if not f.endswith(".lock"))
    before = tree(run_dir)
    other = tmp_path / "unrelated"
    other.mkdir()
    (other / "README.md").write_text("mine")
    (other / "config.json").write_text("{}")
    for out, message in [(run_dir, "is the run dir or holds it"), (run, "is the run dir or holds it"),
                         (run_dir / "ckpt_000", "is inside the run dir"), (other, "holds files that are not a release")]:
        with pytest.raises(rel.ReleaseError, match=message):
            rel.release(str(run_dir), str(out))
    assert tree(run_dir) == before and (other / "README.md").read_text() == "mine"
    out = tmp_path / "out"
    rel.release(str(run_dir), str(out))
    once = tree(out)
    rel.release(str(run_dir), str(out))
    assert tree(out) == once and not [n for n, _ in once if n.endswith(".tmp")]
    twin = tmp_path / "twin"
    shutil.copytree(run_dir, twin, ignore=shutil.ignore_patterns("release"))
    with pytest.raises(rel.ReleaseError, match=f"is a release of {os.path.realpath(run_dir)}"):
        rel.release(str(twin), str(out))


def test_bad_run_dir_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "release.py"), str(tmp_path)], capture_output=True,
                          text=True)
    assert proc.returncode != 0 and "not a run dir" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_plot_redraws_every_figure_of_a_run_from_its_files(run, tmp_path):
    """python plot.py RUN_DIR draws training.png, evals.png and the memorization figures
    again from metrics.jsonl and the CSV files alone: the same bytes as the ones drawn
    while the run, the sweep and the analysis went on."""
    run_dir = tmp_path / "run"
    shutil.copytree(run / "run", run_dir, copy_function=os.link)
    ev.sweep(str(run_dir), ["ppl"], limit=2)
    mem.run(str(run_dir), k=8, l=8, samples=3, checkpoints=["ckpt_000", "ckpt_002"])
    mem.summarize(mem.results_dir(str(run_dir), 8, 8))
    figures = ["training.png", "evals.png"] + [f"memorization/k8_l8/{n}.png" for n in ("scores", "matrix", "correlation")]
    drawn = {f: (run_dir / f).read_bytes() for f in figures}
    for f in figures:
        os.remove(run_dir / f)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "plot.py"), str(run_dir)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert {f: (run_dir / f).read_bytes() for f in figures} == drawn
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "plot.py"), str(tmp_path / "tasks_none")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr == f"error: {tmp_path / 'tasks_none'}: no such run dir; give the out_dir " \
        "of a train.py run\n"


def test_runs_of_the_same_folder_name_get_distinct_names():
    import plot

    assert plot.run_names(["runs/a/x/tiny", "runs/b/x/tiny", "runs/c"]) == ["a/x/tiny", "b/x/tiny", "c"]
