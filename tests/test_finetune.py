"""finetune.py: the Vicuna v1.1 text and loss mask against a hand-built multi-turn
conversation (truncation included), the DPO loss and its gradient against a direct
computation, the data formats, and SFT and DPO runs that do what they are for."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import data
import prepare
import step
import finetune as ft
from conftest import trained_run, write_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYS = "A chat."
TURNS = [("What is two plus two?", "It is four."), ("And three plus three?", "Six."), ("Thanks", "You are welcome.")]


@pytest.fixture(scope="module")
def tok():
    lines = [q for q, _ in TURNS] + [a for _, a in TURNS] + ["USER: ASSISTANT: A chat. alpha beta gamma"] * 20
    return data.Tokenizer("sentencepiece", prepare.train_sentencepiece(lines * 5, 320))


def test_vicuna_text_and_mask_equal_a_hand_built_conversation(tok):
    # the turns as sft_row tokenizes them (SentencePiece's leading "▁" is the space before a reply)
    rendered = "".join(f"{data.chat_turn(q, SYS if i == 0 else '')} {a}</s>" for i, (q, a) in enumerate(TURNS))
    assert rendered == ("A chat. USER: What is two plus two? ASSISTANT: It is four.</s>"
                                          "USER: And three plus three? ASSISTANT: Six.</s>"
                                          "USER: Thanks ASSISTANT: You are welcome.</s>")  # FastChat's vicuna_v1.1
    e = tok.encode
    parts = [([tok.eos_id], False), (e("A chat. USER: What is two plus two? ASSISTANT:"), False),
             (e("It is four.") + [tok.eos_id], True), (e("USER: And three plus three? ASSISTANT:"), False),
             (e("Six.") + [tok.eos_id], True), (e("USER: Thanks ASSISTANT:"), False),
             (e("You are welcome.") + [tok.eos_id], True)]
    ids = [i for p, _ in parts for i in p]
    counted = [c for p, c in parts for _ in p]
    assert ft.sft_row(tok, SYS, TURNS, 1000) == (ids, counted)
    # truncation keeps whole turns: one token short of the third turn leaves it out entirely
    two = sum(len(p) for p, _ in parts[:5])
    for length in (len(ids) - 1, two, two + 3):
        got, mask = ft.sft_row(tok, SYS, TURNS, length)
        assert got == ids[:two] and mask == counted[:two] and mask[-1]  # ends with the second reply's EOS
    assert ft.sft_row(tok, SYS, TURNS, sum(len(p) for p, _ in parts[:3]) - 1) is None  # not even one turn
    # stored signed and padded; the reader feeds every id and counts the replies and their EOS only
    row = ft.encode_row(ids, counted, len(ids) + 5, tok.eos_id)
    x, y = data.rows_to_xy(row[None])
    assert x[0].tolist() == ids + [tok.eos_id] * 4
    want = [t if c else -1 for t, c in zip(ids[1:], counted[1:])] + [-1] * 5
    assert y[0].tolist() == want
    assert tok.decode([t for t in y[0].tolist() if t >= 0]) == "It is four. Six. You are welcome."


def test_formats(tmp_path):
    share = {"conversations": [{"from": "system", "value": "x"}, {"from": "human", "value": "q1"},
                               {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"},
                               {"from": "gpt", "value": "a2"}]}
    assert ft.conversation(share, "r") == [("q1", "a1"), ("q2", "a2")]
    assert ft.conversation({"instruction": "Do", "input": "this", "output": "done"}, "r") == [("Do\n\nthis", "done")]
    assert ft.preference({"prompt": "p", "chosen": "c", "rejected": "r"}, "r") == ("p", "c", "r")
    assert ft.preference({"prompt": "p", "response_0": "bad", "response_1": "good", "safer_response_id": 1}, "r") == \
        ("p", "good", "bad")
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: well",
          "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: go away"}
    assert ft.preference(hh, "r") == ("hi\nhello\nhow?", "well", "go away")
    with pytest.raises(ft.FinetuneError, match="record 3: unknown speaker 'robot'"):
        ft.conversation({"conversations": [{"from": "robot", "value": "x"}]}, "record 3")
    (tmp_path / "a.json").write_text(json.dumps([share, share]))
    assert len(list(ft.read_records(str(tmp_path / "a.json")))) == 2


def test_dpo_loss_and_gradient_equal_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    pc.requires_grad_(True), pr.requires_grad_(True)
    beta = 0.1
    loss, stats = step.dpo_loss(pc, pr, rc, rr, beta)
    m = beta * ((pc - rc) - (pr - rr))
    direct = torch.tensor([-math.log(1 / (1 + math.exp(-v))) for v in m.tolist()], dtype=torch.float64).mean()
    assert loss.item() == pytest.approx(direct.item(), rel=1e-12)
    loss.backward()
    s = torch.tensor([1 / (1 + math.exp(v)) for v in m.tolist()], dtype=torch.float64)  # sigmoid(-margin)
    assert torch.allclose(pc.grad, -beta * s / 6) and torch.allclose(pr.grad, beta * s / 6)
    assert stats["reward_accuracy"].tolist() == [float(v > 0) for v in m.tolist()]
    assert torch.allclose(stats["reward_chosen"], beta * (pc - rc).detach())
    # log-probabilities summed over the counted targets only
    logits = torch.randn(2, 5, 7, generator=g)
    y = torch.tensor([[1, -1, 3, 4, -1], [-1, -1, -1, 6, 0]])
    lp = torch.log_softmax(logits, -1)
    want = [sum(lp[b, t, y[b, t]].item() for t in range(5) if y[b, t] >= 0) for b in range(2)]
    assert step.sequence_logps(logits, y).tolist() == pytest.approx(want, rel=1e-6)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small pre-trained run to fine-tune."""
    return trained_run(tmp_path_factory.mktemp("ft_corpus"), n_chunks=2, max_seq_len=128)


def finetune_run(root, name, fault="", data_name=None, **values):
    """finetune.py in a subprocess; its metrics lines. fault: SIGKILL it as tests/faulty_train.py says."""
    cfg = write_config(root / f"{name}.py", dict(data_dir=str(root / f"data_{data_name or name}"),
                                                 out_dir=str(root / name), seq_len=64, global_batch_size=8,
                                                 micro_batch_size=4, warmup_steps=2, weight_decay=0.0, dtype="float32",
                                                 init_optimizer=False, system_prompt="A chat.", **values))
    script = os.path.join(ROOT, "tests", "faulty_train.py") if fault else os.path.join(ROOT, "finetune.py")
    env = dict(os.environ, PYTHONPATH=ROOT, LLM360_MAIN="finetune", LLM360_FAULT=fault)
    proc = subprocess.run([sys.executable, script, cfg], capture_output=True, text=True, cwd=root, env=env)
    if fault:
        assert proc.returncode == -9, proc.stderr[-3000:]
        return None
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sft_then_dpo_do_what_they_are_for(base):
    """SFT on made-up Q&A lowers the held-out reply loss from where it started; DPO from the
    SFT model starts at log 2 with zero rewards, and its held-out reward accuracy ends
    above both 0.5 and the reference's own preference."""
    names = ["alpha", "beta", "gamma", "delta", "red", "blue", "cat", "dog"]
    qa = [{"conversations": [{"from": "human", "value": f"what follows {a}?"},
                             {"from": "gpt", "value": f"{b} follows {a}."}]}
          for a, b in zip(names * 8, names[1:] * 8 + names[:1] * 8)]
    (base / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in qa))
    sft = finetune_run(base, "sft", init_from=str(base / "run" / "ckpt_001"), finetune_data=str(base / "qa.jsonl"),
                       epochs=4, lr=3e-3, min_lr=3e-4)
    vals = [r["val_loss"] for r in sft if "val_loss" in r]
    assert sft[0]["step"] == 0 and vals[-1] < vals[0] - 0.5
    # the chosen answer is the longer one, so the reference (a sum of log-probabilities) prefers the other
    pairs = [{"prompt": f"is {a} {b} a {kind}?", "chosen": f"no, {a} {b} is not a {kind}.",
              "rejected": f"yes, {a} {b} is a {kind}."} for a in names for b in names for kind in ("pair", "word")]
    (base / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in pairs))
    dpo = finetune_run(base, "dpo", init_from=str(base / "sft" / "ckpt_003"), finetune_data=str(base / "pairs.jsonl"),
                       objective="dpo", dpo_beta=0.1, epochs=3, lr=3e-3, min_lr=3e-4)
    start, end = dpo[0], [r for r in dpo if "val_reward_accuracy" in r][-1]
    assert start["val_loss"] == pytest.approx(math.log(2), abs=1e-6) and start["val_reward_margin"] == 0.0
    assert end["val_reward_accuracy"] > max(0.5, end["val_ref_preference"])
    assert {"reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected"} <= set(dpo[1])


@pytest.mark.parametrize("objective", ["lm", "dpo"])
def test_sft_and_dpo_killed_and_rerun_end_bitwise_as_uninterrupted(base, objective):
    """SIGKILL after step 3 (a rolling checkpoint every 2 steps), the same command again: the
    same weights, bit for bit, and the same losses as a run that was never stopped. DPO's
    tok/s and MFU count the work of a step: two sequences a row, and the reference's forward."""
    names = ["alpha", "beta", "gamma", "delta", "red", "blue", "cat", "dog"]
    if objective == "dpo":
        rows = [{"prompt": f"is {a} {b}?", "chosen": f"no, {a} {b} is not.", "rejected": f"yes, {a} {b} is."}
                for a in names for b in names]
    else:
        rows = [{"instruction": f"what follows {a} {b}?", "output": f"{b} follows {a}."} for a in names for b in names]
    path = base / f"kill_{objective}.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    common = dict(init_from=str(base / "run" / "ckpt_001"), finetune_data=str(path), objective=objective, epochs=1,
                  lr=1e-3, min_lr=1e-4, max_steps=4, ckpt_interval=2, peak_flops=1e12, data_name=f"kill_{objective}")
    once = finetune_run(base, f"{objective}_once", **common)
    finetune_run(base, f"{objective}_killed", fault="step:3", **common)
    again = finetune_run(base, f"{objective}_killed", **common)
    keys = ("step", "loss", "grad_norm", "lr", "val_loss", "reward_margin")
    assert [{k: r[k] for k in keys if k in r} for r in once] == [{k: r[k] for k in keys if k in r} for r in again]
    a, b = (load_file(str(base / n / "ckpt_rolling" / "model.safetensors")) for n in (f"{objective}_once",
                                                                                     f"{objective}_killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    step = once[-1]
    work = 8 * 64 * (2 if objective == "dpo" else 1)  # trained tokens a step: G rows of seq_len (x2 for a pair)
    assert step["tok_per_s"] * step["step_time"] == pytest.approx(work)
    flops = checkpoint.load_model(str(base / "run" / "ckpt_001")).flops_per_token(64) * work
    flops *= 4 / 3 if objective == "dpo" else 1  # the reference's forward: a third of a training step's
    assert step["mfu"] * step["step_time"] * 1e12 == pytest.approx(flops)  # peak_flops=1e12 in the config


@pytest.mark.slow
def test_dpo_under_fsdp2_matches_one_process(base):
    """DPO on 2 ranks with FSDP2, the reference sharded like the policy: the same losses and
    rewards, step by step, as one process. Rank 0 builds the data dir while rank 1 waits."""
    names = ["alpha", "beta", "gamma", "delta", "red", "blue", "cat", "dog"]
    pairs = [{"prompt": f"is {a} {b} a {kind}?", "chosen": f"no, {a} {b} is not a {kind}.",
              "rejected": f"yes, {a} {b} is a {kind}."} for a in names for b in names for kind in ("pair", "word")]
    (base / "pairs_fsdp.jsonl").write_text("\n".join(json.dumps(r) for r in pairs))
    common = dict(init_from=str(base / "run" / "ckpt_001"), finetune_data=str(base / "pairs_fsdp.jsonl"),
                  objective="dpo", epochs=1, lr=1e-3, min_lr=1e-4, max_steps=2)
    one = finetune_run(base, "dpo_one", **common)
    cfg = write_config(base / "dpo_fsdp.py", dict(data_dir=str(base / "data_dpo_fsdp"), out_dir=str(base / "dpo_fsdp"),
                                                  seq_len=64, global_batch_size=8, micro_batch_size=4, warmup_steps=2,
                                                  weight_decay=0.0, dtype="float32", init_optimizer=False,
                                                  system_prompt="A chat.", parallel="fsdp", **common))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                           str(29300 + os.getpid() % 200), os.path.join(ROOT, "finetune.py"), cfg], env=env,
                          capture_output=True, text=True, cwd=base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = [json.loads(line) for line in (base / "dpo_fsdp" / "metrics.jsonl").read_text().splitlines()]
    keys = ("val_loss", "val_reward_margin", "loss", "reward_margin", "reward_accuracy")
    for a, b in zip(one, two):
        for k in keys:
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    assert len(one) == len(two) == 3 and "val_reward_margin" in one[0] and "reward_margin" in one[2]
