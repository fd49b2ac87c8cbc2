"""dynamics.py over a checkpoint series: its values equal a direct computation from the
checkpoint files, the initialization it re-draws is train.py's, a rerun reads only what is
new, and its memory stays flat as the series grows."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
import dynamics
from config import saved_config
from conftest import trained_run
from model import Transformer
from parallelize import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run (4 chunks of 18 steps) with Pythia's early checkpoints (ckpt_steps="log")."""
    return trained_run(tmp_path_factory.mktemp("dynamics"), max_seq_len=64, ckpt_steps="log") / "run"


def read_csv(path):
    with open(path, newline="") as f:
        return {(r["checkpoint"], r["tensor"], r["stat"]): float(r["value"]) for r in csv.DictReader(f)}


def close(a, b, rel=1e-4):
    return abs(a - float(b)) <= rel * max(abs(a), abs(float(b)), 1e-12)


def test_values_equal_a_direct_computation_from_the_checkpoint_files(run):
    dynamics.run(str(run), iters=200)
    got = read_csv(run / "dynamics.csv")
    cfg = saved_config(checkpoint.read_state(str(run / "ckpt_000"))["config"])
    init = build_model(cfg, torch.device("cpu"), torch.float32, fsdp=False).state_dict()  # train.py's
    with torch.device("meta"):
        redrawn = dict(Transformer(cfg.model).init_values(cfg.seed, torch.device("cpu")))
    assert redrawn.keys() == init.keys() and all(torch.equal(redrawn[k], init[k]) for k in init)

    last3 = checkpoint.checkpoint_names(str(run))[-3:]  # ckpt_002, ckpt_step000064, ckpt_003
    w = {n: load_file(run / n / "model.safetensors") for n in last3}
    for t in ("layers.1.attn.wqkv.weight", "tok_emb.weight", "layers.0.mlp_norm.weight"):
        a, b, c = (w[n][t] for n in last3)
        u, before = c - b, b - a
        assert close(got["init", t, "norm"], init[t].norm())
        assert close(got["ckpt_003", t, "norm"], c.norm())
        assert close(got["ckpt_003", t, "init_distance"], (c - init[t]).norm() / init[t].norm())
        assert close(got["ckpt_003", t, "update"], u.norm() / c.norm())
        assert close(got["ckpt_003", t, "update_cos"], (u * before).sum() / (u.norm() * before.norm()))
        if c.ndim == 2:
            assert close(got["ckpt_003", t, "stable_rank"],
                         c.norm() ** 2 / torch.linalg.matrix_norm(c, ord=2) ** 2, rel=1e-3)
    # the first checkpoint's update is from the initialization
    t = "layers.0.attn.wo.weight"
    first = load_file(run / "ckpt_step000001" / "model.safetensors")[t]
    assert close(got["ckpt_step000001", t, "update"], (first - init[t]).norm() / first.norm())
    # a layer's summary sums its tensors
    layer = [k for k in w["ckpt_003"] if k.startswith("layers.1.")]
    assert close(got["ckpt_003", "layer.1", "norm"], sum(w["ckpt_003"][k].square().sum() for k in layer) ** 0.5)
    # AdamW's moments, from optimizer.pt by the index train.py's param groups give them
    model = build_model(cfg, torch.device("cpu"), torch.float32, fsdp=False)
    order = [p for g in model.param_groups(cfg.weight_decay) for p in g["params"]]
    index = next(i for i, p in enumerate(order) if p is dict(model.named_parameters())[t])
    state = torch.load(run / "ckpt_003" / "optimizer.pt", weights_only=True)["state"][index]
    v_hat = state["exp_avg_sq"] / (1 - cfg.beta2 ** float(state["step"]))
    assert close(got["ckpt_003", t, "adam_m"], state["exp_avg"].norm())
    assert close(got["ckpt_003", t, "adam_v"], state["exp_avg_sq"].norm())
    assert close(got["ckpt_003", t, "eps_share"], (v_hat.sqrt() < cfg.eps).float().mean(), rel=1e-6)


def test_a_rerun_reads_only_what_is_not_cached(run, monkeypatch):
    dynamics.run(str(run))
    before = (run / "dynamics.csv").read_text()
    calls = []
    real = dynamics.analyse
    monkeypatch.setattr(dynamics, "analyse", lambda chain, cfg, todo, *rest: calls.append(todo) or
                        real(chain, cfg, todo, *rest))
    dynamics.run(str(run))
    (run / "dynamics" / "ckpt_002.json").unlink()
    dynamics.run(str(run))
    chain = ["init"] + checkpoint.checkpoint_names(str(run))
    assert calls == [[chain.index("ckpt_002")]]  # only the one whose cache went
    assert (run / "dynamics.csv").read_text() == before
    assert (run / "dynamics.png").stat().st_size > 0


def hf_series(folder, n, seed=0):
    """n Hugging Face checkpoints of one 36,000 x 256 embedding and two matrices, each a random
    walk step from the one before. 37 MB, above glibc's 32 MB mmap threshold as a 7B
    model's tensors are: below it, freed copies stay in the heap and blur the measure."""
    g = torch.Generator().manual_seed(seed)
    w = {"model.embed_tokens.weight": torch.randn(36000, 256, generator=g),
         "model.layers.0.self_attn.q_proj.weight": torch.randn(256, 256, generator=g),
         "model.layers.0.mlp.down_proj.weight": torch.randn(256, 512, generator=g)}
    for i in range(n):
        w = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in w.items()}
        os.makedirs(folder / f"ckpt_{i:03d}")
        save_file(w, folder / f"ckpt_{i:03d}" / "model.safetensors")
        (folder / f"ckpt_{i:03d}" / "config.json").write_text(json.dumps({"model_type": "llama"}))


def test_memory_stays_flat_as_the_series_grows_4x(tmp_path):
    peaks = {}
    for n in (3, 12):
        hf_series(tmp_path / f"s{n}", n)
        code = ("import resource, sys, dynamics; dynamics.run(sys.argv[1]); "
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / f"s{n}")], cwd=ROOT, check=True,
                             capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
        peaks[n] = int(out.stdout.split()[-1]) / 1024  # MB
    got = read_csv(tmp_path / "s12" / "dynamics.csv")
    assert got["ckpt_011", "layer.0.attn_qkv", "init_distance"] > 0 and ("ckpt_000", "embed", "update") not in got
    # holding the series would add 9 checkpoints x 37 MB; one tensor's copies are all it keeps
    assert peaks[12] - peaks[3] < 60, peaks


def test_a_planted_spike_is_found_and_its_rows_ranked_first(run, tmp_path):
    """Rows of random ids written over 3 of the 8 rows of one step of the last chunk (the
    data file edited, its sha256 in the manifest updated): spikes.py finds that step and
    nothing else, and the replay ranks the 3 rows first by their share of its gradient.
    The unplanted run of the same shape has no spike."""
    import numpy as np

    import data
    import index
    import prepare
    import spikes
    from config import config_from_dict
    from conftest import corpus_values, make_corpus, write_config

    assert spikes.detect(spikes.training_records(str(run))) == []
    root = make_corpus(tmp_path)
    values = corpus_values(root, "data", dim=64, n_layer=2, n_head=4, intermediate_size=128,
                           out_dir=str(root / "run"), warmup_steps=5, lr=1e-2, min_lr=1e-3, seq_len=64,
                           max_seq_len=64)
    cfg = config_from_dict(values)
    prepare.prepare(cfg, progress=False)
    manifest = data.load_manifest(cfg.data_dir)
    chunk, step = len(manifest["chunks"]) - 1, 5
    before = np.load(os.path.join(cfg.data_dir, manifest["chunks"][chunk]["file"]))
    planted = spikes.plant(cfg, chunk, step, rows=3)
    after = np.load(os.path.join(cfg.data_dir, manifest["chunks"][chunk]["file"]))
    assert data.verify_dir(cfg.data_dir) == len(manifest["chunks"])  # consistent: sha256 updated
    changed = np.flatnonzero((before != after).any(axis=1)).tolist()
    assert sorted(planted) == changed and len(changed) == 3
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), write_config(root / "cfg.py", values)],
                   check=True, capture_output=True, cwd=root)

    index.build(str(root / "run"), progress=False)  # for each row's occurrences
    found = spikes.run(str(root / "run"))
    assert [(r["chunk"], r["chunk_step"]) for r, _ in found] == [(chunk, step + 1)]
    with open(root / "run" / "spikes.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == cfg.global_batch_size
    assert {int(r["row"]) for r in lines[:3]} == set(planted)
    assert [int(r["occurrences"]) for r in lines[:3]] == [1, 1, 1]  # random ids: once, there
    assert sum(float(r["grad_share"]) for r in lines) == pytest.approx(1.0, abs=1e-4)
    logged = next(r for r, _ in found)["loss"]
    assert float(lines[0]["replayed_loss"]) == pytest.approx(logged, rel=1e-4)

    # the remedy: a branch from the checkpoint before that skips the step, in its ledger
    spike = found[0][0]["step"]
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), str(root / "cfg.py"),
                    f"--branch_from={root / 'run' / f'ckpt_{chunk - 1:03d}'}",
                    f"--out_dir={root / 'branch'}", f"--skip_steps=({spike},)"],
                   check=True, capture_output=True, cwd=root)
    events = [json.loads(line) for line in open(root / "branch" / "ledger.jsonl")]
    assert events[0]["changes"]["skip_steps"] == [[], [spike]]
    assert [e["step"] for e in events if e["event"] == "skip_step"] == [spike]
    branch = {r["step"]: r["loss"] for r in spikes.training_records(str(root / "branch"))}
    trunk = {r["step"]: r["loss"] for r in spikes.training_records(str(root / "run"))}
    assert spike not in branch and branch[spike + 1] < trunk[spike] - 0.5


def test_early_checkpoints_are_in_training_order_and_resumable(run, tmp_path):
    """ckpt_steps="log": ckpt_step000000 holds the initialization dynamics.py re-draws; the
    step checkpoints sort between the chunk ends by the steps they were written at, and
    evaluate.py lists them; a run resumed from ckpt_step000016 ends bit for bit as the
    uninterrupted one."""
    import evaluate
    from common import link_tree

    names = checkpoint.checkpoint_names(str(run))
    assert names == ["ckpt_step000000", "ckpt_step000001", "ckpt_step000002", "ckpt_step000004",
                     "ckpt_step000008", "ckpt_step000016", "ckpt_000", "ckpt_step000032",
                     "ckpt_001", "ckpt_002", "ckpt_step000064", "ckpt_003"]
    assert [os.path.basename(p) for p in evaluate.checkpoints_to_evaluate(str(run))] == names
    cfg = saved_config(checkpoint.read_state(str(run / "ckpt_000"))["config"])
    with torch.device("meta"):
        redrawn = dict(Transformer(cfg.model).init_values(cfg.seed, torch.device("cpu")))
    first = load_file(run / "ckpt_step000000" / "model.safetensors")
    assert first.keys() == redrawn.keys() and all(torch.equal(first[k], redrawn[k]) for k in first)

    copy = tmp_path / "resumed"
    link_tree(str(run), str(copy))
    for name in names[names.index("ckpt_step000016") + 1:]:
        import shutil

        shutil.rmtree(copy / name)
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), str(run.parent / "cfg.py"),
                    f"--out_dir={copy}"], check=True, capture_output=True, cwd=run.parent)
    events = [json.loads(line) for line in open(copy / "ledger.jsonl")]
    assert [e["checkpoint"] for e in events if e["event"] == "resume"] == ["ckpt_step000016"]
    assert checkpoint.checkpoint_names(str(copy)) == names
    a, b = (load_file(d / "ckpt_003" / "model.safetensors") for d in (run, copy))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_ranks_write_what_one_process_writes(run, tmp_path):
    """Under torchrun the tensors are split over the ranks: the same dynamics.csv, byte for
    byte, as one process (one thread each: a reduction's order depends on the threads)."""
    from common import link_tree

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    out = {}
    for n in (1, 2):
        copy = tmp_path / f"ranks{n}"
        link_tree(str(run), str(copy))
        for cached in ("dynamics", "dynamics.csv", "dynamics.png"):
            subprocess.run(["rm", "-rf", str(copy / cached)], check=True)
        cmd = [sys.executable, os.path.join(ROOT, "dynamics.py"), str(copy)] if n == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
             f"--master_port={29500 + os.getpid() % 1000}", os.path.join(ROOT, "dynamics.py"), str(copy)]
        subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=300)
        out[n] = (copy / "dynamics.csv").read_bytes()
    assert out[1] == out[2] and out[1].count(b"\n") > 1000
