"""A rehearsal of AMBER's own workload at its real shapes: a synthetic release in
LLM360's format (rows of 2,049 ids under 32,000, AMBER's source names) is converted,
trained on with seq_len 2048 and vocabulary 32,000, inspected, and analysed for
memorization both from our checkpoints and from the same weights in the layout of
AMBER's released checkpoints (sharded pytorch_model-*.bin)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import data
import convert_amber
import memorize as mem
from conftest import save_like_amber, write_config
from config import config_from_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_amber_shaped_release_through_convert_train_inspect_memorize(tmp_path, capsys):
    release, data_dir, run_dir = tmp_path / "release", str(tmp_path / "amber_data"), tmp_path / "run"
    convert_amber.write_synthetic_release(str(release), 3, 16, seed=7)
    manifest = convert_amber.convert_amber(str(release), data_dir, workers=2, progress=False)
    assert manifest["seq_len"] == 2048 and manifest["dtype"] == "uint16" and manifest["tokenizer"]["vocab_size"] == 32000

    values = dict(data_dir=data_dir, out_dir=str(run_dir), seq_len=2048, max_seq_len=2048, vocab_size=32000,
                  dim=32, n_layer=1, n_head=2, intermediate_size=64, global_batch_size=8, micro_batch_size=4,
                  lr=1e-2, min_lr=1e-3, warmup_steps=2, val_sequences=0, n_chunks=3, seed=3)
    cfg_path = write_config(tmp_path / "amber_rehearsal.py", values)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), cfg_path], env=env, capture_output=True,
                          text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(run_dir / "metrics.jsonl") as f:
        steps = [json.loads(line) for line in f if '"loss"' in line]
    assert len(steps) == 3 * 2 and all(np.isfinite(s["loss"]) for s in steps)  # 16 rows / 8 per step, 3 chunks
    assert abs(steps[0]["loss"] - np.log(32000)) < 0.5  # a fresh model over 32,000 ids starts near ln V

    # which rows step 1 of chunk 2 trained on, as data.py inspect shows them
    cfg = config_from_dict(values)
    data.inspect(cfg, 2, 1)
    out = capsys.readouterr().out
    reader = data.ChunkReader(data_dir, 2, 3, 8, 8)
    rows = [int(line.split()[2]) for line in out.splitlines()[1:]]
    assert rows == reader.step_rows(1).tolist() and "token ids are shown" in out.splitlines()[0]
    first = json.loads((release / "train_002.jsonl").read_text().splitlines()[rows[0]])
    assert out.splitlines()[1].split()[3] == first["source"]

    # memorization from our checkpoints: checkpoint i pairs with the chunks it has seen
    ours = mem.run(str(run_dir), k=32, l=32, samples=4, batch_size=4)
    assert sorted(os.path.basename(f) for f in ours) == ["ckpt_000__chunk_000.json", "ckpt_001__chunk_000.json",
                                                        "ckpt_001__chunk_001.json", "ckpt_002__chunk_000.json",
                                                        "ckpt_002__chunk_001.json", "ckpt_002__chunk_002.json"]
    # the same weights as AMBER's release: a folder of ckpt_NNN HF folders and --data_dir
    from model import to_hf_state_dict
    from model_config import hf_config
    from checkpoint import load_model

    amber = tmp_path / "amber_ckpts"
    for name in ("ckpt_000", "ckpt_001", "ckpt_002"):
        model = load_model(str(run_dir / name))
        assert save_like_amber(to_hf_state_dict(model), hf_config(model.config), str(amber / name),
                               max_shard_bytes=1 << 20) >= 2
    theirs = mem.run(str(amber), k=32, l=32, samples=4, batch_size=4, data_dir=data_dir)
    assert [os.path.basename(f) for f in theirs] == [os.path.basename(f) for f in ours]
    for a, b in zip(ours, theirs):
        with open(a) as fa, open(b) as fb:
            ra, rb = json.load(fa), json.load(fb)
        assert (ra["indices"], ra["scores"], ra["sources"]) == (rb["indices"], rb["scores"], rb["sources"])

    # a branch from AMBER's ckpt_000 (weights only): it goes on at chunk 1, from the step and LR the
    # position gives, with a fresh AdamW; its first loss is the trunk's at that step (the same weights and rows)
    branch_dir = tmp_path / "branch"
    branch_cfg = write_config(tmp_path / "amber_branch.py", values | dict(out_dir=str(branch_dir),
                                                                         branch_from=str(amber / "ckpt_000")))
    plan = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), branch_cfg, "--dry_run=True"], env=env,
                          capture_output=True, text=True, cwd=str(tmp_path))
    assert "branch           from" in plan.stdout and "4 steps left (step 6 at the end)" in plan.stdout, plan.stdout
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), branch_cfg], env=env, capture_output=True,
                          text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(branch_dir / "metrics.jsonl") as f:
        branch_steps = [json.loads(line) for line in f if '"loss"' in line]
    assert [s["step"] for s in branch_steps] == [3, 4, 5, 6] and branch_steps[0]["tokens"] == 3 * 8 * 2048
    assert [s["lr"] for s in branch_steps] == [s["lr"] for s in steps[2:]]  # the trunk's LR curve
    assert branch_steps[0]["loss"] == pytest.approx(steps[2]["loss"], rel=1e-6)
    with open(branch_dir / "ledger.jsonl") as f:
        first = json.loads(f.readline())
    assert first["event"] == "branch" and first["optimizer"].startswith("fresh") and first["step"] == 2
    # the release's folders stay in the release (nothing linked); a rerun has nothing to do and moves nothing
    assert sorted(n for n in os.listdir(branch_dir) if n.startswith("ckpt_")) == ["ckpt_001", "ckpt_002"]
    again = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), branch_cfg], env=env,
                           capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert again.returncode == 0 and "nothing to do" in again.stdout and "damaged" not in again.stdout + again.stderr
    verify = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "verify", str(branch_dir)], env=env,
                            capture_output=True, text=True, cwd=str(tmp_path))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    with open(branch_dir / "ckpt_002" / "state.json") as f:
        assert (json.load(f)["step"], mem.checkpoints_of(str(branch_dir))[-1][2]) == (6, [0, 1, 2])
