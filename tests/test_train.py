"""train.py: the LR schedule, gradient accumulation, and whole runs in subprocesses:
exact resume after SIGKILL, DDP and FSDP2 against one process, the NaN policy."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import corpus_values, make_corpus, write_config
from config import ConfigError, config_from_dict
from model import Transformer
from model_config import ModelConfig
import checkpoint
import verify
import parallelize
import train as train_py
from train import get_lr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_MODEL = dict(dim=64, n_layer=2, n_head=4, intermediate_size=128)
DETERMINISTIC = ("step", "pos", "chunk", "chunk_step", "tokens", "loss", "grad_norm", "lr", "val_loss")


# -----------------------------------------------------------------------------
# pure parts


def test_lr_schedule():
    cfg = config_from_dict(dict(lr=1.0, min_lr=0.1, warmup_steps=10))
    total = 110
    lrs = [get_lr(s, cfg, total) for s in range(130)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup to the peak
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111]))  # then decays monotonically ...
    assert lrs[60] == pytest.approx(0.55)  # cosine: half-way down at mid-decay
    assert lrs[110] == lrs[129] == pytest.approx(0.1)  # ... to min_lr, and stays there
    lin = config_from_dict(dict(lr=1.0, min_lr=0.1, warmup_steps=10, lr_schedule="linear"))
    assert get_lr(35, lin, total) == pytest.approx(1.0 - 0.25 * 0.9)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, max_seq_len=32, **SMALL_MODEL))
    model.init_weights(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = torch.randint(0, 64, (4, 33))
    for _ in range(200):
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.05, loss.item()  # from ln(64) = 4.16


def test_gradient_accumulation_equals_one_big_batch():
    model = Transformer(ModelConfig(vocab_size=64, max_seq_len=32, **SMALL_MODEL))
    model.init_weights(0)
    batch = torch.randint(0, 64, (8, 17), generator=torch.Generator().manual_seed(1))
    _, loss = model(batch[:, :-1], batch[:, 1:])
    loss.backward()
    big = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for micro in batch.split(2):
        _, loss = model(micro[:, :-1], micro[:, 1:])
        (loss / 4).backward()
    for p, g in zip(model.parameters(), big):
        assert torch.allclose(p.grad, g, atol=1e-6, rtol=1e-5), (p.grad - g).abs().max()


def test_dry_run_plans_amber(capsys):
    import train

    plan = train.plan(config_from_dict(dict(model="amber_7b", **_amber_keys())), world_size=1)
    out = capsys.readouterr().out
    assert plan["tokens_per_step"] == 4_587_520 and plan["params"] == 6_738_415_616
    assert set(plan["steps_per_chunk"]) == {762} and len(plan["steps_per_chunk"]) == 360
    assert "2,240 sequences x 2,048 tokens = 4,587,520 tokens per step" in out and "224 devices" in out
    # disk: 360 x 1,706,976 rows of 2,049 uint16 ids and a source byte; 12 bytes a parameter per checkpoint
    assert f"{360 * 1_706_976 * (2049 * 2 + 1) / 1e12:,.3f} TB of chunks (614,511,360 rows of 2,049 ids)" in out
    assert "80.9 GB per checkpoint" in out and "29.11 TB for all 360" in out and "h on 64 cores" in out
    # per rank at 224 ranks: rank 0's FSDP2 shard, counted on the sharded model (a fake process group)
    assert "rank 0 of 224 under FSDP2: 30,541,011 elements" in out
    assert plan["stop_ckpt_bytes_per_rank"] == 12 * 30_541_011 and plan["stop_s"] < 30


def test_every_shipped_config_fits_the_gpu_it_names():
    """The dry run of every config in configs/ fits its plan_gpu with 10% headroom, and its
    stop fits its grace period (the plan refuses otherwise); and the activations it plans
    agree within 10% with what autograd saves over a whole micro-batch of real blocks."""
    import train
    from config import load_config

    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        cfg = load_config([os.path.join(ROOT, "configs", name), "--data_dir=/nonexistent", "--stages=()",
                           "--dry_run_sequences_per_chunk=100000"])
        plan = train.plan(cfg, world_size=1)
        assert sum(plan["memory_gib"].values()) < 0.9 * cfg.plan_gpu_memory_gb and plan["stop_s"] < cfg.stop_grace_s
    with pytest.raises(ConfigError, match="more than 90%"):
        train.plan(load_config([os.path.join(ROOT, "configs", "crystalcoder_7b.py"), "--data_dir=/nonexistent",
                                "--stages=()", "--activation_checkpointing=False", "--dry_run_sequences_per_chunk=100000"]),
                   world_size=1)


def test_planned_activations_equal_what_a_micro_batch_saves():
    import memory
    from model import rope_tables

    cfg = ModelConfig(vocab_size=512, dim=256, n_layer=3, n_head=4, intermediate_size=704, max_seq_len=256)
    B, T = 4, 256
    planned = memory.activations(cfg, B * T, torch.float32, torch.float32, False, 2**21)["blocks"]
    model = Transformer(cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    x = model.tok_emb(torch.randint(0, 512, (B, T))).detach().requires_grad_()
    cos, sin = rope_tables(cfg, torch.arange(T))
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params | {cos.data_ptr(), sin.data_ptr()}:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for layer in model.layers:
            x = layer(x, cos, sin)
    measured = sum(seen.values())
    print(f"activations of a micro-batch: planned {planned:,.0f} bytes, saved {measured:,.0f}")
    assert abs(planned - measured) <= 0.1 * measured, (planned, measured)


def _amber_keys():
    from config import load_config

    cfg = load_config([os.path.join(ROOT, "configs", "amber_7b.py")])
    return dict(seq_len=cfg.seq_len, n_chunks=cfg.n_chunks, global_batch_size=cfg.global_batch_size,
                micro_batch_size=cfg.micro_batch_size, parallel=cfg.parallel, data_dir="/nonexistent",
                activation_checkpointing=cfg.activation_checkpointing,
                dry_run_sequences_per_chunk=cfg.dry_run_sequences_per_chunk)


# -----------------------------------------------------------------------------
# whole runs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("train_corpus"))


def run_values(corpus, name, **kw):
    values = corpus_values(corpus, "data", **SMALL_MODEL, out_dir=str(corpus / name), warmup_steps=5, lr=1e-2,
                           min_lr=1e-3, val_sequences=16, n_chunks=3, ckpt_interval=10)
    values.update(kw)
    return values


def train(corpus, name, nproc=1, fault=None, expect_ok=True, nan_chunks=(), fault_rank=0, hash_log="", rope_log="",
          **kw):
    """train.py on the corpus in a subprocess; faults (fault="step:N" / "save:N", chunks
    whose loss is NaN) are injected from outside by tests/faulty_train.py, which also logs
    the data files each rank hashes (hash_log)."""
    cfg_path = write_config(corpus / f"{name}.py", run_values(corpus, name, **kw))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, LLM360_FAULT=fault or "",
               LLM360_NAN_CHUNKS=",".join(map(str, nan_chunks)), LLM360_FAULT_RANK=str(fault_rank),
               LLM360_HASH_LOG=str(hash_log), LLM360_ROPE_LOG=str(rope_log), WANDB_MODE="offline",
               WANDB_SILENT="true")
    script = os.path.join(ROOT, "tests", "faulty_train.py") if fault or nan_chunks or hash_log or rope_log else \
        os.path.join(ROOT, "train.py")
    if nproc == 1:
        cmd = [sys.executable, script, cfg_path]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(29500 + os.getpid() % 1000), script, cfg_path]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(corpus))
    if expect_ok and not fault:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def final_weights(run_dir):
    from safetensors.torch import load_file

    last = sorted(n for n in os.listdir(run_dir) if n.startswith("ckpt_") and n[5:].isdigit())[-1]
    return load_file(os.path.join(run_dir, last, "model.safetensors"))


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: r[k] for k in DETERMINISTIC if k in r} for r in map(json.loads, f)]


def ledger(run_dir):
    with open(os.path.join(run_dir, "ledger.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def reference(corpus):
    """One uninterrupted single-process run."""
    train(corpus, "ref")
    return corpus / "ref"


def test_run_writes_fp32_checkpoints_with_full_adamw_state(reference):
    names = sorted(os.listdir(reference))
    assert [n for n in names if n.startswith("ckpt_")] == ["ckpt_000", "ckpt_001", "ckpt_002"]  # rolling removed
    model = Transformer(ModelConfig(vocab_size=400, max_seq_len=32, **SMALL_MODEL))
    weights = final_weights(reference)
    assert set(weights) == set(model.state_dict()) and all(t.dtype == torch.float32 for t in weights.values())
    opt = torch.load(reference / "ckpt_002" / "optimizer.pt", weights_only=True)
    n_params = len(list(model.parameters()))
    assert len(opt["state"]) == n_params
    assert all({"step", "exp_avg", "exp_avg_sq"} <= set(s) for s in opt["state"].values())
    state = json.loads((reference / "ckpt_002" / "state.json").read_text())
    assert state["finished"] and state["step"] == opt["state"][0]["step"].item()
    rows = metrics(reference)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == state["step"] and np.mean(losses[-10:]) < np.mean(losses[:10]) - 1.0
    assert sum("val_loss" in r for r in rows) == 3  # one validation per checkpoint
    assert [e["event"] for e in ledger(reference)] == ["start"] + ["checkpoint"] * 3 + ["finish"]  # no figure_failed
    png = (reference / "training.png").read_bytes()  # redrawn after the last checkpoint
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and not (reference / "training.tmp.png").exists()
    assert os.path.getmtime(reference / "training.png") >= os.path.getmtime(reference / "ckpt_002" / "state.json")
    # a finished run is not retrained
    again = train(reference.parent, "ref")
    assert "nothing to do" in again.stdout


def assert_same_checkpoint(a, b):
    """Every file of two checkpoint folders byte for byte (RNG states included), and
    state.json equal but for the run's own out_dir (and branch_from: a branch's parent), the
    digest of its metrics (which hold timings) and its own digest."""
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    for name in names:
        if name == "state.json":
            sa, sb = (json.loads((d / name).read_text()) for d in (a, b))
            for s in (sa, sb):
                s["config"].pop("out_dir"), s["config"].pop("branch_from", None)
                s.pop("metrics_sha256"), s.pop("state_sha256")
            assert sa == sb
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("fault", ["step:3", "step:25", "save:2"],
                         ids=["before-any-checkpoint", "mid-chunk", "mid-checkpoint-write"])
def test_sigkill_and_rerun_equals_uninterrupted(corpus, reference, fault):
    name = "kill_" + fault.replace(":", "")
    killed = train(corpus, name, fault=fault)
    assert killed.returncode == -9  # SIGKILL
    assert not os.path.exists(corpus / name / "ckpt_002")
    train(corpus, name)  # the same command again
    assert_same_checkpoint(reference / "ckpt_002", corpus / name / "ckpt_002")  # bitwise, RNG files included
    assert metrics(corpus / name) == metrics(reference)  # every step once
    assert ("resume" in [e["event"] for e in ledger(corpus / name)]) == (fault != "step:3")


def _flip_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))


def _truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


DAMAGE = {
    "weights-bit-flip": lambda d: _flip_byte(d / "model.safetensors"),
    "weights-truncated": lambda d: _truncate(d / "model.safetensors"),
    "optimizer-truncated": lambda d: _truncate(d / "optimizer.pt"),
    "rng-missing": lambda d: os.remove(d / "rng_rank0.pt"),
    "state-garbage": lambda d: (d / "state.json").write_bytes(b"\x00{not json"),
}


@pytest.fixture(scope="module")
def killed_after_two_chunks(corpus, reference):
    """A run killed in its third chunk: ckpt_000 and ckpt_001 on disk."""
    assert train(corpus, "two_chunks", fault="step:100").returncode == -9
    assert checkpoint.checkpoint_names(corpus / "two_chunks") == ["ckpt_000", "ckpt_001"]
    return corpus / "two_chunks"


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_moved_aside(corpus, killed_after_two_chunks, damage, capsys):
    """Each kind of damage is found by the resume, which moves the checkpoint aside, says so
    and records it, and resumes from the one before (the next test trains on from there)."""
    import shutil

    run = corpus / f"damaged_{damage}"
    shutil.copytree(killed_after_two_chunks, run)
    DAMAGE[damage](run / "ckpt_001")
    if damage == "weights-bit-flip":  # evaluate.py, memorize.py and release.py load weights through load_model
        with pytest.raises(checkpoint.CheckpointError, match="differs from the file written"):
            checkpoint.load_model(str(run / "ckpt_001"))
    assert checkpoint.resume_point(str(run), train_py.RunLog(str(run), 0)) == str(run / "ckpt_000")
    out = capsys.readouterr().out
    moved = [n for n in os.listdir(run) if n.startswith("ckpt_001.damaged-")]
    assert len(moved) == 1 and "ckpt_001 is damaged" in out and "moved aside" in out
    assert [e["checkpoint"] for e in ledger(run) if e["event"] == "damaged_checkpoint"] == ["ckpt_001"]


def test_a_run_resumed_past_a_damaged_checkpoint_ends_bitwise(corpus, reference, killed_after_two_chunks):
    import shutil

    run = corpus / "damaged_run"
    shutil.copytree(killed_after_two_chunks, run)
    _flip_byte(run / "ckpt_001" / "model.safetensors")
    proc = train(corpus, run.name)
    assert "ckpt_001 is damaged" in proc.stdout
    assert [e["checkpoint"] for e in ledger(run) if e["event"] == "resume"] == ["ckpt_000"]
    assert_same_checkpoint(reference / "ckpt_002", run / "ckpt_002")  # as if nothing had happened
    assert metrics(run) == metrics(reference)  # cut back to ckpt_000, then retrained


def test_a_damaged_old_checkpoint_blocks_nothing_and_verify_finds_it(corpus, reference, killed_after_two_chunks):
    import shutil

    verify = [sys.executable, os.path.join(ROOT, "train.py"), "verify"]
    ok = subprocess.run(verify + [str(reference)], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.count(" ok (") == 5, ok.stdout  # 3 checkpoints, metrics, data dir
    run = corpus / "damaged_old"
    shutil.copytree(killed_after_two_chunks, run)
    DAMAGE["state-garbage"](run / "ckpt_000")
    train(corpus, run.name)
    assert [e["checkpoint"] for e in ledger(run) if e["event"] == "resume"] == ["ckpt_001"]
    assert not [n for n in os.listdir(run) if "damaged" in n]
    assert_same_checkpoint(reference / "ckpt_002", run / "ckpt_002")
    _flip_byte(run / "ckpt_002" / "optimizer.pt")
    bad = subprocess.run(verify + [str(run)], capture_output=True, text=True)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    lines = {line.split()[0]: line for line in bad.stdout.splitlines()}
    assert "DAMAGED: state.json" in lines["ckpt_000"] and " ok (" in lines["ckpt_001"]
    assert "DAMAGED: optimizer.pt: sha256 differs" in lines["ckpt_002"]


def test_a_stripped_state_json_is_damaged_and_a_format_1_checkpoint_reads_as_it_is(corpus, reference, tmp_path,
                                                                                   capsys):
    """A state.json of the current format without its integrity fields is damaged, and so
    is one that also lost its format version in a run dir started by the current code; a
    run dir of format 1 (no version, no digests, as older code wrote it) is read as it is:
    verify says "not checked", and a resume takes its newest checkpoint."""
    import shutil

    from common import link_tree

    def strip(run, name, keys):
        path = run / name / "state.json"
        state = json.loads(path.read_text())
        path.unlink()  # a hard link of the reference's: replaced, not written through
        path.write_text(json.dumps({k: v for k, v in state.items() if k not in keys}, indent=1))

    def verified(run_dir):  # python train.py verify RUN_DIR, in this process: (problems, {name: its line})
        bad = verify.verify_run(str(run_dir))
        return bad, {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}

    run = tmp_path / "stripped"
    link_tree(str(reference), str(run))
    strip(run, "ckpt_001", ("files", "state_sha256", "metrics_sha256"))
    strip(run, "ckpt_002", ("files", "state_sha256", "metrics_sha256", "format_version"))
    _, lines = verified(run)
    assert "DAMAGED: state.json lacks files, state_sha256, metrics_sha256" in lines["ckpt_001"]
    assert "DAMAGED: state.json says format 1, but its run dir was started by code that writes format 2" \
        in lines["ckpt_002"]
    old = tmp_path / "format_1"
    link_tree(str(reference), str(old))
    events = (old / "ledger.jsonl").read_text().splitlines()
    first = {k: v for k, v in json.loads(events[0]).items() if k != "checkpoint_format"}
    (old / "ledger.jsonl").unlink()
    (old / "ledger.jsonl").write_text("\n".join([json.dumps(first)] + events[1:]) + "\n")
    for name in ("ckpt_000", "ckpt_001", "ckpt_002"):
        strip(old, name, ("files", "state_sha256", "metrics_sha256", "format_version", "total_steps"))
    bad, lines = verified(old)
    assert bad == 0 and sum("not checked: format 1" in line for line in lines.values()) == 3, lines
    log = train_py.RunLog(str(old), 0)
    assert checkpoint.resume_point(str(old), log) == str(old / "ckpt_002")
    assert torch.equal(checkpoint.load_model(str(old / "ckpt_002")).tok_emb.weight,
                       checkpoint.load_model(str(reference / "ckpt_002")).tok_emb.weight)
    shutil.rmtree(run)


def rolling_weights(run_dir):
    """The weights of ckpt_rolling, as model.safetensors or (FSDP) as the ranks' DCP shards."""
    return checkpoint.load_model(os.path.join(run_dir, "ckpt_rolling")).state_dict()


def assert_same_training(a_dir, b_dir, tol):
    """Losses of every step and the weights at the end agree within a relative tol."""
    a, b = metrics(a_dir), metrics(b_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= tol * abs(x["loss"]), (x, y)
    wa, wb = rolling_weights(a_dir), rolling_weights(b_dir)
    worst = max(((wb[k] - wa[k]).norm() / wa[k].norm()).item() for k in wa)
    assert worst <= tol, worst
    return worst


@pytest.fixture(scope="module")
def short_reference(corpus):
    """12 steps in one process, stopped mid-chunk by max_steps: AdamW magnifies float
    reordering over long runs, so data-parallel equality is checked over a short one. Every
    4th step logs each layer's norms (layer_stats_interval)."""
    train(corpus, "short", max_steps=12, lr=1e-3, layer_stats_interval=4)
    return corpus / "short"


@pytest.mark.slow
def test_ddp_matches_one_process_and_resumes_bitwise(corpus, short_reference):
    train(corpus, "ddp_short", nproc=2, max_steps=12, lr=1e-3)
    assert_same_training(short_reference, corpus / "ddp_short", tol=1e-6)
    train(corpus, "ddp", nproc=2, hash_log=corpus / "ddp_hashes.txt")
    # each chunk (and the held-out split) is hashed once, by rank 0, not by every rank at each chunk start
    hashed = [h for h in (corpus / "ddp_hashes.txt").read_text().splitlines() if h.endswith(".npy")]  # not manifests
    assert sorted(hashed) == sorted(set(hashed)) and {h.split()[0] for h in hashed} == {"0"}, hashed
    assert {h.split()[1] for h in hashed} >= {"chunk_000.npy", "chunk_002.npy", "val.npy"}, hashed
    killed = train(corpus, "ddp_kill", nproc=2, fault="step:40")
    assert killed.returncode != 0
    train(corpus, "ddp_kill", nproc=2)
    ddp_w, resumed = final_weights(corpus / "ddp"), final_weights(corpus / "ddp_kill")
    assert all(torch.equal(ddp_w[k], resumed[k]) for k in ddp_w)
    assert metrics(corpus / "ddp_kill") == metrics(corpus / "ddp")


@pytest.mark.slow
def test_fsdp_matches_one_process_and_resumes_bitwise(corpus, short_reference):
    train(corpus, "fsdp_short", nproc=2, parallel="fsdp", max_steps=12, lr=1e-3, layer_stats_interval=4)
    assert_same_training(short_reference, corpus / "fsdp_short", tol=1e-6)
    # each layer's gradient, update and weight norms: 2 sharded ranks (2 micro-batches each)
    # give one process's (4 micro-batches), and the layers' gradient norms make up the global one
    one, two = ([r for r in metrics_full(d) if "grad_norm/embed" in r]
                for d in (short_reference, corpus / "fsdp_short"))
    assert [r["step"] for r in one] == [r["step"] for r in two] == [4, 8, 12]
    for a, b in zip(one, two):
        keys = [k for k in a if "/layer." in k or k.split("/")[-1] in ("embed", "head", "final_norm")]
        assert len(keys) == 3 * (SMALL_MODEL["n_layer"] + 3) and keys == [k for k in b if k in keys]
        assert all(abs(a[k] - b[k]) <= 1e-5 * a[k] for k in keys), [(k, a[k], b[k]) for k in keys]
        grads = [a[k] ** 2 for k in keys if k.startswith("grad_norm/")]
        assert sum(grads) ** 0.5 == pytest.approx(a["grad_norm"], rel=1e-5)
    train(corpus, "fsdp", nproc=2, parallel="fsdp")
    assert os.path.isdir(corpus / "fsdp" / "ckpt_002" / "optimizer")  # distributed checkpoint, sharded
    # a resume under FSDP from its sharded checkpoint: test_slurms_early_warning_stops_fsdp_ranks...


@pytest.mark.slow
def test_fsdp_in_bf16_keeps_the_rotary_tables_float32(corpus):
    """Under FSDP2 with bf16 parameters on 2 ranks, every block's rotary tables arrive
    float32 (FSDP2's default policy would cast them to bf16 with the block's inputs)."""
    log = corpus / "rope_log.txt"
    train(corpus, "fsdp_bf16", nproc=2, parallel="fsdp", dtype="bfloat16", max_steps=1, val_sequences=0,
          rope_log=log)
    calls = [line.split() for line in log.read_text().splitlines()]
    assert {c[0] for c in calls} == {"0", "1"} and len(calls) >= 2 * SMALL_MODEL["n_layer"]
    assert all(c[1:] == ["torch.float32", "torch.float32", "torch.bfloat16"] for c in calls), calls[:4]


@pytest.mark.slow
def test_a_resume_may_change_parallel_and_the_number_of_processes(corpus, short_reference):
    """One process to step 6 (optimizer.pt), resumed by 2 FSDP ranks to step 12 (a sharded
    ckpt_rolling: model/ and optimizer/), which one process resumes to step 14: each resume
    reads the AdamW state in the form the checkpoint holds, and the first 12 steps train as
    the uninterrupted single-process run does."""
    train(corpus, "switch", max_steps=6, lr=1e-3)
    assert (corpus / "switch" / "ckpt_rolling" / "optimizer.pt").exists()
    train(corpus, "switch", nproc=2, parallel="fsdp", max_steps=12, lr=1e-3)
    assert (corpus / "switch" / "ckpt_rolling" / "optimizer").is_dir()
    assert_same_training(short_reference, corpus / "switch", tol=1e-6)
    # dynamics.py reads AdamW's moments from the DCP shards as from the one-process optimizer.pt
    import dynamics

    cfg = config_from_dict(run_values(corpus, "switch", lr=1e-3))
    names = dynamics.optimizer_names(cfg)
    sharded, whole = ({n: (m.norm().item(), v.norm().item(), step)
                       for n, m, v, step in dynamics.moments(str(d / "ckpt_rolling"), names, set(names))}
                      for d in (corpus / "switch", short_reference))
    assert sharded.keys() == whole.keys() == set(names)
    assert all(a[2] == b[2] == 12 and a[0] == pytest.approx(b[0], rel=1e-4) and a[1] == pytest.approx(b[1], rel=1e-4)
               for a, b in ((sharded[n], whole[n]) for n in names)), (sharded, whole)
    train(corpus, "switch", max_steps=14, lr=1e-3)
    assert [r["step"] for r in metrics(corpus / "switch") if "loss" in r][-1] == 14
    assert [e["event"] for e in ledger(corpus / "switch")].count("resume") == 2


def test_nan_chunk_is_skipped_and_replaced(corpus, reference):
    train(corpus, "nan", nan_chunks=(1,))
    events = ledger(corpus / "nan")
    skips = [e for e in events if e["event"] == "skip_chunk"]
    assert len(skips) == 1 and skips[0]["chunk"] == 1 and skips[0]["replacement"] == 0
    final = json.loads((corpus / "nan" / "ckpt_003" / "state.json").read_text())
    ref_state = json.loads((reference / "ckpt_002" / "state.json").read_text())
    assert final["schedule"] == [0, 1, 2, 0] and final["step"] == ref_state["step"]  # all steps of the schedule
    assert not os.path.exists(corpus / "nan" / "ckpt_001")  # nothing written for the skipped position
    from safetensors.torch import load_file

    for ckpt in ("ckpt_000", "ckpt_002", "ckpt_003"):
        assert all(torch.isfinite(t).all() for t in load_file(corpus / "nan" / ckpt / "model.safetensors").values())


def test_a_run_that_skipped_every_chunk_fails(corpus):
    proc = train(corpus, "nan_all", nan_chunks=(0, 1, 2), expect_ok=False)
    last = proc.stderr.strip().splitlines()[-1]  # above it: the progress bars
    assert proc.returncode == 1 and last.startswith("error: every chunk of the schedule (5) gave a non-finite loss")
    assert "Traceback" not in proc.stderr and checkpoint.checkpoint_names(corpus / "nan_all") == []  # 3 + 2 replacements
    assert [e["event"] for e in ledger(corpus / "nan_all")][-1] == "failed"


def test_nan_stop_exits_cleanly_with_the_last_good_checkpoint(corpus):
    proc = train(corpus, "nan_stop", nan_chunks=(1,), nan_policy="stop", expect_ok=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "non-finite loss" in proc.stderr and "last good checkpoint is ckpt_000" in proc.stderr
    assert os.path.exists(corpus / "nan_stop" / "ckpt_000" / "state.json")


def test_bad_input_gives_one_line_errors(corpus, reference):
    proc = train(corpus, "bad1", expect_ok=False, data_dir=str(corpus / "nowhere"), sources={})
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "not prepared" in proc.stderr
    proc = train(corpus, "bad2", expect_ok=False, vocab_size=300)
    assert "vocab_size is 300" in proc.stderr and proc.stderr.strip().count("\n") == 0
    proc = train(corpus, "ref", expect_ok=False, n_layer=3)  # the reference run dir holds 2-layer checkpoints
    assert "another model shape (n_layer=2)" in proc.stderr and proc.stderr.strip().count("\n") == 0
    proc = train(corpus, "bad3", expect_ok=False, lrr=1.0)
    assert "did you mean 'lr'" in proc.stderr
    # a finished run rerun has nothing to do, and exits cleanly (it aborted in 4 of 6 tries elsewhere,
    # "terminate called without an active exception": the figure warm-up thread was inside matplotlib)
    proc = train(corpus, "ref")
    assert "nothing to do" in proc.stdout and "terminate" not in proc.stderr


def test_a_resume_that_would_change_the_run_is_refused_and_records_nothing(corpus, killed_after_two_chunks):
    """A resume is the same run: a config that changes its schedule, data order or numbers
    is refused in one line naming every difference and the branch that makes it an
    experiment; the run dir is left as it was. What a resume may change is recorded."""
    import shutil

    run = corpus / "changed"
    shutil.copytree(killed_after_two_chunks, run)
    before = {n: (run / n).read_bytes() for n in ("ledger.jsonl", "config.json", "metrics.jsonl")}
    proc = train(corpus, "changed", expect_ok=False, lr=2e-2, warmup_steps=7)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "lr 0.01 -> 0.02, warmup_steps 5 -> 7" in proc.stderr and f"--branch_from={run}/ckpt_001" in proc.stderr
    assert {n: (run / n).read_bytes() for n in before} == before
    saved = checkpoint.read_state(str(run / "ckpt_001"))
    data_sha = saved["data_manifest_sha256"]
    for key, value in [("global_batch_size", 16), ("seed", 7), ("lr_schedule", "linear"), ("grad_clip", 0.5),
                       ("nan_policy", "stop"), ("init_from", str(run / "ckpt_000"))]:
        cfg = config_from_dict(run_values(corpus, "changed", **{key: value}))
        with pytest.raises(checkpoint.ConfigError, match=f"changes {key} "):
            checkpoint.check_resumable(saved, cfg, data_sha, "ckpt_001")
    cfg = config_from_dict(run_values(corpus, "changed", max_steps=50, micro_batch_size=4, val_interval=5))
    assert checkpoint.check_resumable(saved, cfg, data_sha, "ckpt_001") == {  # a moved run dir is the same run
        "out_dir": [str(killed_after_two_chunks), str(run)], "max_steps": [0, 50], "val_interval": [0, 5],
        "micro_batch_size": [2, 4]}


def test_tampering_that_keeps_the_shapes_is_found(corpus, killed_after_two_chunks, tmp_path, capsys):
    """A checkpoint covers its own state.json and the metrics lines up to it, and is a folder of
    its run dir: an edited state (step, pos), edited or deleted metrics lines, and a checkpoint
    replaced by a symbolic link are each found by verify and stop (or roll back) a resume."""
    import shutil

    def copy(name):
        run = tmp_path / name
        shutil.copytree(killed_after_two_chunks, run)
        return run

    def edit_json(path, **changes):
        path.write_text(json.dumps(json.loads(path.read_text()) | changes, indent=1))

    log = train_py.RunLog(str(tmp_path), 0)
    assert verify.verify_run(str(killed_after_two_chunks)) == 0
    # state.json edited: step 192 -> 100 in the newest (the resume rolls back past it), pos in an older one
    run = copy("state")
    edit_json(run / "ckpt_001" / "state.json", step=100)
    edit_json(run / "ckpt_000" / "state.json", pos=0)
    capsys.readouterr()
    assert verify.verify_run(str(run)) == 2
    out = capsys.readouterr().out
    assert out.count("state.json was changed after it was written") == 2, out
    run = copy("step")
    edit_json(run / "ckpt_001" / "state.json", step=100)
    assert checkpoint.resume_point(str(run), log) == str(run / "ckpt_000")  # ckpt_001 moved aside, not retrained over
    assert checkpoint.checkpoint_names(run) == ["ckpt_000"]
    # metrics.jsonl: a value edited inside ckpt_000's lines, or the last line ckpt_001 counted deleted
    n0 = checkpoint.read_state(str(killed_after_two_chunks / "ckpt_000"))["metrics_lines"]
    for how in ("edit", "delete"):
        run = copy(f"metrics_{how}")
        lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
        if how == "edit":
            lines[n0 - 2] = lines[n0 - 2].replace('"loss": ', '"loss": 1')
        else:
            del lines[n0 + 1]
        (run / "metrics.jsonl").write_text("".join(lines))
        capsys.readouterr()
        assert verify.verify_run(str(run)) == 1
        out = capsys.readouterr().out
        recorded = "ckpt_000, ckpt_001" if how == "edit" else "ckpt_001"
        assert f"its first lines are not those {recorded} recorded" in out, out
        saved = checkpoint.read_state(str(run / "ckpt_001"))
        with pytest.raises(checkpoint.CheckpointError, match="lines are not those ckpt_001 recorded"):
            checkpoint.check_metrics(str(run), saved, "ckpt_001")
    # a checkpoint that is a symbolic link (to another checkpoint) is never followed
    run = copy("linked")
    shutil.rmtree(run / "ckpt_001")
    os.symlink(run / "ckpt_000", run / "ckpt_001")
    with pytest.raises(checkpoint.CheckpointError, match="ckpt_001 is a symbolic link"):
        checkpoint.resume_point(str(run), log)
    capsys.readouterr()
    assert verify.verify_run(str(run)) == 1 and "ckpt_001       DAMAGED: a symbolic link" in capsys.readouterr().out
    proc = train(corpus, "linked_run", expect_ok=False, out_dir=str(run))
    assert proc.returncode == 1 and "is a symbolic link" in proc.stderr and proc.stderr.strip().count("\n") == 0


def test_activation_checkpointing_changes_nothing_but_memory(corpus, short_reference):
    train(corpus, "ac_short", max_steps=12, lr=1e-3, activation_checkpointing=True)
    assert metrics(corpus / "ac_short") == metrics(short_reference)  # recomputation is exact on a CPU
    a, b = rolling_weights(short_reference), rolling_weights(corpus / "ac_short")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation-checkpointing"])
def test_compile_traces_each_block_whole_with_or_without_checkpointing(monkeypatch, checkpointing):
    """compile=True as train.py sets it up: every block is one graph, traced once for all
    layers, with no graph break, and the gradients are those of the eager model. Dynamo's
    tracing is what is under test; its backend here is aot_eager (inductor's code
    generation would cost seconds and tests nothing of ours)."""
    from torch._dynamo.utils import counters

    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self: compile_module(self, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    cfg = config_from_dict(dict(SMALL_MODEL, vocab_size=96, seq_len=16, max_seq_len=16, compile=True,
                                activation_checkpointing=checkpointing))
    eager, compiled = Transformer(cfg.model), Transformer(cfg.model)
    for m in (eager, compiled):
        m.init_weights(0)
    parallelize.speed_up(compiled, cfg, torch.device("cpu"))
    idx = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        for m in (eager, compiled):
            m.zero_grad()
            m(idx[:, :-1], idx[:, 1:])[1].backward()
    assert counters["stats"]["unique_graphs"] == 1 and counters["stats"]["calls_captured"] > 0, dict(counters["stats"])
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    grads = dict(eager.named_parameters())
    worst = max((p.grad - grads[n].grad).abs().max().item() for n, p in compiled.named_parameters())
    assert worst < 1e-5, worst


def test_init_from_starts_a_new_run_from_another_runs_checkpoint(corpus, reference):
    train(corpus, "continued", max_steps=3, init_from=str(reference / "ckpt_000"))
    start, first = metrics(corpus / "continued")[:2]
    fresh = metrics(reference)[0]
    assert first["step"] == 1 and first["loss"] < fresh["loss"] - 1.0  # starts from trained weights
    assert start["step"] == 0 and start["val_loss"] < fresh["loss"] - 1.0  # validated before the first step
    assert any(e["event"] == "init_from" for e in ledger(corpus / "continued"))
    proc = train(corpus, "continued_bad", expect_ok=False, init_from=str(reference / "ckpt_000"), n_layer=3)
    assert "another model shape" in proc.stderr


def test_stages_train_one_data_dir_after_the_other(corpus):
    """CrystalCoder's three stages, in small: each stage its own prepared data dir, sharing
    the first stage's tokenizer; chunks count on across stages; memorize.py follows them."""
    import memorize
    import prepare
    from config import config_from_dict

    base = run_values(corpus, "staged")
    stage1 = config_from_dict(dict(base, data_dir=str(corpus / "stage1"), n_chunks=2,
                                   sources={"web": base["sources"]["web"]}))
    prepare.prepare(stage1, progress=False)
    stage2 = config_from_dict(dict(base, data_dir=str(corpus / "stage2"), n_chunks=2,
                                   sources={"code": base["sources"]["code"]},
                                   tokenizer=str(corpus / "stage1" / "tokenizer.model")))
    prepare.prepare(stage2, progress=False)
    train(corpus, "staged", stages=(str(corpus / "stage1"), str(corpus / "stage2")))
    state = json.loads((corpus / "staged" / "ckpt_003" / "state.json").read_text())
    assert state["schedule"] == [0, 1, 2, 3] and state["finished"]
    stages = {r["chunk"]: r["stage"] for r in metrics_full(corpus / "staged") if "stage" in r}
    assert stages == {0: 0, 1: 0, 2: 1, 3: 1}
    memorize.run(str(corpus / "staged"), k=8, l=8, samples=3, checkpoints=["ckpt_003"])
    files = {r["chunk"]: r for r in memorize.load_results(memorize.results_dir(str(corpus / "staged"), 8, 8))}
    assert sorted(files) == [0, 1, 2, 3]
    assert files[3]["data_dir"] == str(corpus / "stage2") and files[3]["chunk_in_data_dir"] == 1
    assert set(files[3]["sources"]) == {"code"} and set(files[0]["sources"]) == {"web"}
    # another tokenizer in a later stage is refused
    other = config_from_dict(dict(base, data_dir=str(corpus / "stage_other"), n_chunks=2, seed=9,
                                  sources={"code": base["sources"]["code"]}))
    prepare.prepare(other, progress=False)
    proc = train(corpus, "staged_bad", expect_ok=False, stages=(str(corpus / "stage1"), str(corpus / "stage_other")))
    assert "different tokenizers" in proc.stderr


def metrics_full(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_auto_dtype_takes_bf16_only_where_it_measures_faster(monkeypatch, reference):
    """dtype="auto" on a CPU: bf16 where its measured matmul beats float32 by the margin,
    float32 where it does not (AMD EPYC: 10-300x slower), measured without touching the
    run's RNG; the choice and both rates go to run.json, and MFU counts against the
    dtype used. An explicit dtype is taken as given."""
    import machine

    cpu = torch.device("cpu")
    cfg = config_from_dict(dict(dtype="auto"))
    before = torch.get_rng_state()
    dtype, info = machine.choose_dtype(cfg, cpu)  # this machine, measured for real
    assert torch.equal(torch.get_rng_state(), before)
    r = info["matmul_gflops"]
    assert r["float32"] > 0 and r["bfloat16"] > 0
    assert (dtype == torch.bfloat16) == (r["bfloat16"] >= machine.BF16_CPU_MARGIN * r["float32"])
    for bf16_rate, expected in [(4e12, torch.bfloat16), (1.2e11, torch.float32), (1e9, torch.float32)]:
        monkeypatch.setattr(machine, "matmul_rate", lambda device, dtype=torch.float32, **k: (
            1e11 if dtype == torch.float32 else bf16_rate))
        dtype, info = machine.choose_dtype(cfg, cpu)
        assert dtype == expected and info["matmul_gflops"] == {"float32": 100.0, "bfloat16": bf16_rate / 1e9}
        assert machine.peak_flops(cfg, cpu, dtype, info["matmul_gflops"]) == (1e11 if expected == torch.float32 else 4e12)
    assert machine.choose_dtype(config_from_dict(dict(dtype="float32")), cpu)[0] == torch.float32
    run = json.loads((reference / "run.json").read_text())  # the tests pin float32
    assert run["dtype"] == "float32" and "config" in run["reason"]


def test_one_writer_per_run_dir_and_no_stale_lock(corpus, tmp_path):
    """A second train.py on a run dir in use stops at once with one line naming the holder
    and changes nothing; a holder killed by SIGKILL leaves no lock behind."""
    import signal

    import common

    out = corpus / "locked"
    lock = str(out / ".lock")
    common.hold_lock(lock, "this test")
    try:
        proc = train(corpus, "locked", expect_ok=False)
        assert proc.returncode != 0 and f"pid {os.getpid()}" in proc.stderr and len(proc.stderr.splitlines()) == 1
        assert sorted(os.listdir(out)) == [".lock"]  # nothing written
    finally:
        os.close(common._LOCKS.pop(os.path.abspath(lock)))
    holder = subprocess.Popen([sys.executable, "-c", f"import common, time; common.hold_lock({lock!r}, 'x'); "
                               "print('held', flush=True); time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    common.hold_lock(lock, "this test")  # free again
    os.close(common._LOCKS.pop(os.path.abspath(lock)))


def test_validation_is_over_a_seeded_sample_of_the_whole_mix(tmp_path, monkeypatch):
    """The held-out split is stored source by source. val_loss is the token mean over a
    seeded sample of the whole split (rows of several sources), val_loss/<source> over
    val_sequences rows of each source (all of them when it has fewer), both equal to the
    losses computed row by row; the same rows and values on 2 ranks as on one. (The code
    before took the split's first rows: one source's.)"""
    import data
    import prepare

    root = make_corpus(tmp_path)
    cfg = config_from_dict(corpus_values(root, "data", **SMALL_MODEL, val_fraction=0.3, val_sequences=6,
                                         micro_batch_size=4))
    prepare.prepare(cfg, progress=False)
    manifest = data.load_manifest(cfg.data_dir)
    tokens, sources = data.open_split(cfg.data_dir, manifest["val"])
    assert (np.diff(sources) >= 0).all() and len(set(sources.tolist())) == 3  # stored source by source
    model = Transformer(cfg.model)
    model.init_weights(0)
    cpu, off = torch.device("cpu"), torch.autocast("cpu", enabled=False)
    got = train_py.validation_loss(model, cfg.data_dir, manifest, cfg, rank=0, world_size=1, device=cpu, autocast=off)

    def mean_loss(rows):  # row by row: the sum of each row's token losses over all their tokens
        sums = []
        for r in rows:
            x, y = data.rows_to_xy(tokens[[r]])
            sums.append((model(x, y)[1].item() * y.numel(), y.numel()))
        return sum(s for s, _ in sums) / sum(n for _, n in sums)

    mix, extra = data.validation_rows(sources, 6, cfg.seed)
    assert len(set(mix.tolist())) == 6 and len(set(sources[mix].tolist())) > 1  # a sample of the mix
    assert got["val_loss"] == pytest.approx(mean_loss(mix), rel=1e-6)
    assert got["val_loss"] != pytest.approx(mean_loss(range(6)), rel=1e-3)  # not the split's head
    for s, source in enumerate(manifest["sources"]):
        rows = np.union1d(mix[sources[mix] == s], extra[s])
        assert len(rows) == min(6, int((sources == s).sum())) and (sources[rows] == s).all()
        assert got[f"val_loss/{source['name']}"] == pytest.approx(mean_loss(rows), rel=1e-6)
    # two ranks: each runs its share, then the sums are reduced
    shares = {}
    monkeypatch.setattr(train_py, "all_reduce_sum", lambda x, ws: shares.setdefault("rank1", x.clone()))
    train_py.validation_loss(model, cfg.data_dir, manifest, cfg, rank=1, world_size=2, device=cpu, autocast=off)
    monkeypatch.setattr(train_py, "all_reduce_sum", lambda x, ws: x.add_(shares["rank1"]))
    two = train_py.validation_loss(model, cfg.data_dir, manifest, cfg, rank=0, world_size=2, device=cpu, autocast=off)
    assert two.keys() == got.keys() and all(two[k] == pytest.approx(got[k], rel=1e-12) for k in got)
    # the sample is uniform: every row of a 40-row split is drawn 2,000 x 8 / 40 times, within chance
    counts = np.bincount(np.concatenate([data.validation_rows(np.zeros(40, int), 8, s)[0] for s in range(2000)]),
                         minlength=40)
    assert ((counts - 400) ** 2 / 400).sum() < 80  # chi-square, 39 degrees of freedom: p < 1e-4 above 80


# -----------------------------------------------------------------------------
# branches


def test_a_branch_with_the_parents_config_is_the_parent_bit_for_bit(corpus, reference):
    """Branched at ckpt_000 with nothing changed, a run's later checkpoints and metrics are
    its parent's, byte for byte; the parent's checkpoint is a hard link, the ledger's first
    event names it and its sha256; killed (after its first checkpoint, and before it) and
    run again, the branch still ends as the parent."""
    branch_of = dict(branch_from=str(reference / "ckpt_000"))
    train(corpus, "branch_same", **branch_of)
    run = corpus / "branch_same"
    for name in ("ckpt_001", "ckpt_002"):
        assert_same_checkpoint(reference / name, run / name)
    assert metrics(run) == metrics(reference)
    assert os.path.samefile(run / "ckpt_000" / "model.safetensors", reference / "ckpt_000" / "model.safetensors")
    first = ledger(run)[0]
    assert first["event"] == "branch" and first["checkpoint"] == "ckpt_000" and first["changes"] == {}
    assert first["checkpoint_sha256"] == checkpoint.sha256_file(reference / "ckpt_000" / "state.json")
    # the same branch point however it is written; a branch with checkpoints of its own resumes with its
    # parent gone (hard links hold every file it needs); killed before its first rolling checkpoint
    # (step 50) it starts again, from a symbolic link to the parent's checkpoint
    os.symlink(reference / "ckpt_000", corpus / "parent_link")
    for name, fault, again, starts in (("branch_kill", "step:100", str(reference / "ckpt_000") + "/", 1),
                                       ("branch_kill_early", "step:49", str(corpus / "parent_link"), 2)):
        assert train(corpus, name, fault=fault, **branch_of).returncode == -9
        if starts == 1:
            os.rename(reference, corpus / "reference_away")
        try:
            train(corpus, name, branch_from=again)
        finally:
            if starts == 1:
                os.rename(corpus / "reference_away", reference)
        assert_same_checkpoint(reference / "ckpt_002", corpus / name / "ckpt_002")
        assert metrics(corpus / name) == metrics(reference)
        assert [e["event"] for e in ledger(corpus / name)].count("branch") == starts
    (corpus / "not_a_run").mkdir()
    (corpus / "not_a_run" / "notes.txt").write_text("mine")
    refused = train(corpus, "branch_same_again", expect_ok=False, out_dir=str(corpus / "not_a_run"), **branch_of)
    assert refused.returncode == 1 and "is not empty and is not this branch's run dir" in refused.stderr
    inside = train(corpus, "branch_inside", expect_ok=False, out_dir=str(reference / "branches" / "b"), **branch_of)
    assert inside.returncode == 1 and "inside the parent's run dir" in inside.stderr
    assert not (reference / "branches").exists()


def test_a_branch_loads_the_checkpoint_it_verified(corpus, reference, tmp_path):
    """A parent still training replaces its checkpoint between the branch's reading it and
    linking it: the branch refuses in one line and keeps no half-linked branch point."""
    import shutil

    import branch
    from common import link_tree

    parent_dir = tmp_path / "parent"
    link_tree(str(reference), str(parent_dir))
    cfg = branch.resolved(config_from_dict(run_values(corpus, "branch_race",
                                                      branch_from=str(parent_dir / "ckpt_000"))))
    parent = branch.parent_of(cfg)
    shutil.rmtree(parent_dir / "ckpt_000")
    os.rename(parent_dir / "ckpt_001", parent_dir / "ckpt_000")  # the parent's newer checkpoint took its place
    here = tmp_path / "branch_race" / "ckpt_000"
    with pytest.raises(ConfigError, match="changed while it was linked"):
        branch._link_branch_point(parent, str(here))
    assert not here.exists()


def test_a_branch_with_other_data_goes_on_from_its_parent(corpus, reference):
    """A remix of the parent's last two chunks without the "web" source: the branch trains
    its chunks after the parent's first, from the parent's step, tokens and LR curve, and
    records the change; memorize.py and plot.py read the branch as any run."""
    import data
    import memorize
    import remix as remixing

    remix = str(corpus / "remix_noweb")
    remixing.main([str(corpus / "data"), remix, "--weights=web:0,code:2", "--chunks=1-2"])
    m = data.load_manifest(remix)
    assert m["config"]["remix_of"] == str(corpus / "data") and all(c["tokens_per_source"]["web"] == 0
                                                                   for c in m["chunks"])
    train(corpus, "branch_remix", branch_from=str(reference / "ckpt_000"), data_dir=remix)
    run = corpus / "branch_remix"
    state = json.loads((run / "ckpt_002" / "state.json").read_text())
    assert state["schedule"] == [0, 3, 4] and state["config"]["stages"] == [str(corpus / "data"), remix]
    parent_ckpt = json.loads((reference / "ckpt_000" / "state.json").read_text())
    ref, ours = metrics(reference), metrics(run)
    k = [r for r in ref if "loss" in r].index(next(r for r in ref if r["step"] == parent_ckpt["step"] and "loss" in r))
    assert ours[: parent_ckpt["metrics_lines"]] == ref[: parent_ckpt["metrics_lines"]]  # the parent's lines
    after = [r for r in ours[parent_ckpt["metrics_lines"]:] if "loss" in r]
    assert after[0]["step"] == parent_ckpt["step"] + 1 and after[0]["tokens"] == parent_ckpt["tokens"] + 8 * 32
    assert after[0]["lr"] == [r for r in ref if "loss" in r][k + 1]["lr"]  # the parent's LR curve goes on
    first = ledger(run)[0]
    assert first["event"] == "branch" and first["changes"]["data_dir"] == [str(corpus / "data"), remix]
    memorize.run(str(run), k=8, l=8, samples=2, checkpoints=["ckpt_000", "ckpt_002"])
    seen = json.loads((run / "memorization" / "k8_l8" / "ckpt_002__chunk_004.json").read_text())
    assert seen["data_dir"] == remix and seen["seen"]
    # trunk and branch on one axis: the same validation up to the branch point, then the branch's own
    import plot
    import release

    table = plot.plot_compare([str(reference), str(run)], str(corpus / "compare"))
    assert os.path.exists(corpus / "compare" / "compare.png")
    col = table[0].index("branch_remix:val_loss")
    vals = [r for r in metrics(reference) if "val_loss" in r and "loss" not in r]
    assert [float(r[1]) for r in table[1:]][:1] == pytest.approx([vals[0]["val_loss"]], rel=1e-6)  # the shared past
    assert float(table[1][col]) == pytest.approx(vals[0]["val_loss"], rel=1e-6)
    assert float(table[2][col]) != pytest.approx(vals[1]["val_loss"], rel=1e-4)  # its own data from there
    card = (pathlib.Path(release.release(str(run), str(corpus / "branch_release"))) / "README.md").read_text()
    assert f"Branched from `{reference}` at `ckpt_000` (step {parent_ckpt['step']}" in card


def test_a_branch_refuses_a_parent_whose_data_changed_or_is_gone(corpus):
    """One line, and nothing but the lock written into the branch's run dir."""
    import shutil

    moved = corpus / "data_moving"
    shutil.copytree(corpus / "data", moved)
    train(corpus, "parent_moving", data_dir=str(moved), max_steps=48)  # ckpt_000 at the end of chunk 0
    branch_of = dict(branch_from=str(corpus / "parent_moving" / "ckpt_000"), data_dir=str(moved))
    manifest = json.loads((moved / "manifest.json").read_text())
    (moved / "manifest.json").write_text(json.dumps(manifest | {"note": "edited"}))
    changed = train(corpus, "branch_moving", expect_ok=False, **branch_of)
    assert changed.returncode == 1 and "changed since" in changed.stderr and len(changed.stderr.splitlines()) == 1
    shutil.rmtree(moved)
    gone = train(corpus, "branch_moving", expect_ok=False, **branch_of)
    assert gone.returncode == 1 and "not prepared" in gone.stderr and len(gone.stderr.splitlines()) == 1
    assert os.listdir(corpus / "branch_moving") == [".lock"]


@pytest.mark.parametrize("fault", ["sigterm:130", "sigterm_in_save"], ids=["mid-step", "again-while-saving"])
def test_sigterm_finishes_the_step_checkpoints_and_resumes_bitwise(corpus, reference, fault):
    """SIGTERM in the middle of a step (and, the second case, at the first rolling save and
    again while the stopping checkpoint is written): the run finishes the step, writes
    ckpt_rolling at the last step it logged (no step lost), records "preempted" and exits 1
    with one line that says the same command resumes; that command ends bitwise as the
    uninterrupted run."""
    name = "term_" + fault.replace(":", "_")
    proc = train(corpus, name, fault=fault)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") is False and "stopped by SIGTERM after step" in last and "resume" in last
    steps = [r["step"] for r in metrics(corpus / name) if "loss" in r]
    state = json.loads((corpus / name / "ckpt_rolling" / "state.json").read_text())
    assert state["step"] == steps[-1] and f"after step {steps[-1]}:" in last  # no step lost
    assert ledger(corpus / name)[-1]["event"] == "preempted"
    assert train_py.verify_run(str(corpus / name)) == 0
    train(corpus, name)
    assert_same_checkpoint(reference / "ckpt_002", corpus / name / "ckpt_002")
    assert metrics(corpus / name) == metrics(reference)


@pytest.mark.slow
def test_a_sigterm_to_one_rank_stops_every_rank_at_the_same_step(corpus):
    """Under torchrun, SIGTERM to rank 1 alone: both ranks stop after the same step (one
    rolling checkpoint with both ranks' RNG states, at the last logged step), and the resumed
    run ends bitwise as an uninterrupted one."""
    proc = train(corpus, "ddp_term", nproc=2, fault="sigterm:130", fault_rank=1)
    assert proc.returncode != 0
    steps = [r["step"] for r in metrics(corpus / "ddp_term") if "loss" in r]
    rolling = corpus / "ddp_term" / "ckpt_rolling"
    assert json.loads((rolling / "state.json").read_text())["step"] == steps[-1] < 144
    assert (rolling / "rng_rank0.pt").exists() and (rolling / "rng_rank1.pt").exists()
    assert ledger(corpus / "ddp_term")[-1]["event"] == "preempted"
    train(corpus, "ddp_term", nproc=2)
    train(corpus, "ddp", nproc=2)  # the uninterrupted DDP run (test_ddp_matches... has trained it already)
    assert_same_checkpoint(corpus / "ddp" / "ckpt_002", corpus / "ddp_term" / "ckpt_002")


def launch_like_srun(corpus, cfg_path, nproc=2):
    """The ranks started as the README's SLURM script starts them (srun, one task a GPU:
    RANK, LOCAL_RANK and WORLD_SIZE from SLURM's variables), with no torchrun agent between
    the scheduler's signal and the ranks."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(nproc):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, RANK=str(r), LOCAL_RANK=str(r),
                   WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), cfg_path], env=env,
                                      cwd=str(corpus), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    return procs


@pytest.mark.slow
def test_slurms_early_warning_stops_fsdp_ranks_with_sharded_checkpoint_and_resumes_bitwise(corpus):
    """SLURM's --signal=USR1 reaches every rank of the job step at once: the 2 FSDP ranks
    finish the step, write ckpt_rolling at the last logged step as each rank's own shard
    (model/, no weights gathered), record "preempted" and exit 1; the same launch resumes
    and ends bitwise as the uninterrupted run."""
    import signal
    import time

    cfg_path = write_config(corpus / "usr1.py", run_values(corpus, "usr1", parallel="fsdp"))
    procs = launch_like_srun(corpus, cfg_path)
    deadline = time.monotonic() + 120
    while len([r for r in metrics(corpus / "usr1") if "loss" in r] if (corpus / "usr1" / "metrics.jsonl").exists()
              else []) < 5:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), procs[0].stderr.read()[-2000:]
        time.sleep(0.05)
    t0 = time.monotonic()
    for p in procs:
        p.send_signal(signal.SIGUSR1)
    errors = [p.communicate(timeout=120)[1] for p in procs]
    stop_s = time.monotonic() - t0
    assert [p.returncode for p in procs] == [1, 1], errors[0][-2000:]
    assert "stopped by SIGUSR1 after step" in errors[0].strip().splitlines()[-1]
    steps = [r["step"] for r in metrics(corpus / "usr1") if "loss" in r]
    rolling = corpus / "usr1" / "ckpt_rolling"
    assert json.loads((rolling / "state.json").read_text())["step"] == steps[-1] < 144
    assert (rolling / "model").is_dir() and not (rolling / "model.safetensors").exists()
    assert ledger(corpus / "usr1")[-1]["event"] == "preempted" and ledger(corpus / "usr1")[-1]["signal"] == "SIGUSR1"
    print(f"stop to exit: {stop_s:.2f} s (2 FSDP ranks, step {steps[-1]})")
    procs = launch_like_srun(corpus, cfg_path)
    assert [p.wait(timeout=300) for p in procs] == [0, 0], procs[0].stderr.read()[-2000:]
    assert ledger(corpus / "usr1")[[e["event"] for e in ledger(corpus / "usr1")].index("preempted") + 1]["event"] \
        == "resume"
    train(corpus, "fsdp", nproc=2, parallel="fsdp")  # the uninterrupted run (test_fsdp_matches... trained it)
    a, b = final_weights(corpus / "fsdp"), final_weights(corpus / "usr1")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(corpus / "usr1") == metrics(corpus / "fsdp")


@pytest.mark.slow
def test_deterministic_runs_of_the_main_job_shape_repeat_bit_for_bit(tmp_path):
    """configs/tiny.py (the main job's model, data and dtype="auto") for 8 steps, twice, with
    two threads allowed and deterministic=True: every file of the checkpoint is the same."""
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=ROOT)
    for name in ("a", "b"):
        subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), os.path.join(ROOT, "configs", "tiny.py"),
                        f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / name}", "--max_steps=8",
                        "--deterministic=True"], env=env, check=True, capture_output=True, cwd=tmp_path)
    assert_same_checkpoint(tmp_path / "a" / "ckpt_rolling", tmp_path / "b" / "ckpt_rolling")
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert run["deterministic"] and run["threads"] == 1


def wandb_runs(run_dir):
    """[(run id, config, {(step, key): value})] of the offline W&B runs under a run dir, read
    from their .wandb files: a LevelDB-style log (a 7-byte file header, then records of
    checksum, length and type, never across a 32 KiB block) of wandb's protobuf records."""
    import glob

    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    for path in sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))):
        raw, pos, part, run = pathlib.Path(path).read_bytes(), 7, b"", [None, {}, {}]
        assert raw[:4] == b":W&B"
        while pos + 7 <= len(raw):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header is padding
                pos += 32768 - pos % 32768
                continue
            length, kind = int.from_bytes(raw[pos + 4 : pos + 6], "little"), raw[pos + 6]
            part, pos = part + raw[pos + 7 : pos + 7 + length], pos + 7 + length
            if kind in (1, 4):  # a whole record, or the last piece of one
                rec = pb.Record()
                rec.ParseFromString(part)
                part, which = b"", rec.WhichOneof("record_type")
                if which == "run":
                    run[0] = rec.run.run_id
                    run[1].update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                   for i in rec.run.config.update})
                elif which == "config":
                    run[1].update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.config.update})
                elif which == "history":
                    items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
                    run[2].update({(rec.history.step.num, k): v for k, v in items.items() if not k.startswith("_")})
        out.append(tuple(run))
    return out


def test_wandb_logs_every_metric_at_its_step_and_a_resume_keeps_its_run(corpus, monkeypatch):
    """wandb_project, offline: every numeric metric and validation key of metrics.jsonl is in
    W&B at its step with its value; a run killed and resumed logs into the same W&B run (its
    id kept in the run dir); a branch is a new W&B run that names its parent's."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert train(corpus, "wb", fault="step:45", wandb_project="llm360-test").returncode == -9
    train(corpus, "wb", wandb_project="llm360-test")
    run_id = json.loads((corpus / "wb" / "wandb.json").read_text())["id"]
    runs = wandb_runs(corpus / "wb")
    assert len(runs) == 2 and {r[0] for r in runs} == {run_id}  # the killed process's and the resumed one's
    logged = {}
    for _, _, history in runs:
        logged.update(history)  # in time order: the resumed run's values last
    with open(corpus / "wb" / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    want = {(r["step"], k): v for r in lines for k, v in r.items() if isinstance(v, (int, float)) and k != "step"}
    assert any(k == "val_loss" for _, k in want) and any(k.startswith("val_loss/") for _, k in want)
    assert set(want) <= set(logged)
    assert all(logged[sk] == v for sk, v in want.items() if sk[1] in DETERMINISTIC or sk[1].startswith("val_loss"))
    # a branch's W&B run (opened here as train.setup opens it, without training the branch)
    branch = corpus / "wb_branch"
    branch.mkdir()
    cfg = config_from_dict(run_values(corpus, "wb_branch", wandb_project="llm360-test",
                                      branch_from=str(corpus / "wb" / "ckpt_000")))
    log = train_py.RunLog(str(branch), 0)
    log.open_wandb(cfg, str(corpus / "wb"))
    log.wandb.finish()
    (branch_id, config, _), = wandb_runs(branch)
    assert branch_id != run_id and config["wandb_parent_id"] == run_id
    assert config["branch_from"] == str(corpus / "wb" / "ckpt_000")


def test_one_optimizer_step_runs_the_core_files_only(corpus, reference, tmp_path):
    """What a reader follows through one pre-training step (sys.setprofile around
    step.train_step): the core files and fused.py's kernels, functions of under 300 lines
    in all, and nothing of DPO, fine-tuning, checkpoints or logging on the way."""
    import ast

    import data

    cfg = config_from_dict(run_values(corpus, "step", out_dir=str(tmp_path / "step")))
    run, state = train_py.setup(cfg, 0, 1, torch.device("cpu"))
    d, manifest, local = run.table[state["schedule"][0]]
    reader = data.ChunkReader(d, local, cfg.seed, cfg.global_batch_size, cfg.micro_batch_size,
                              verify=False, manifest=manifest)
    called = set()

    def record(frame, event, arg):
        code = frame.f_code
        if event == "call" and os.path.dirname(code.co_filename) == ROOT:
            called.add((os.path.basename(code.co_filename), code.co_name, code.co_firstlineno))

    sys.setprofile(record)
    try:
        train_py.train_step(run, reader, 1e-3)
    finally:
        sys.setprofile(None)
    lines = 0
    for name, func, first in called:
        tree = ast.parse(open(os.path.join(ROOT, name)).read())
        node = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
                    and min([n.lineno] + [d.lineno for d in n.decorator_list]) == first)
        lines += node.end_lineno - node.lineno + 1
    files = {name for name, _, _ in called}
    assert files <= {"step.py", "data.py", "model.py", "model_config.py", "fused.py", "common.py"}, files
    assert {"train_step", "lm_objective", "batch", "forward"} <= {f for _, f, _ in called}
    assert not [f for _, f, _ in called if "dpo" in f or "mask" in f], called
    assert lines < 300, (lines, sorted(called))
