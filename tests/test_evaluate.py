"""evaluate.py: prompts and scores equal lm-evaluation-harness's on the same rows,
accuracy that can fail, perplexity by hand, a sandbox that contains bad code, and a
sweep that never evaluates twice."""

import dataclasses
import json
import math
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint
import evaluate as ev
from common import read_jsonl
from conftest import trained_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["alpha", "beta", "gamma", "delta", "red", "blue", "cat", "dog", "sun", "moon"]


def w(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_rows(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def make_tasks(folder, seed=0):
    """Made-up rows in each benchmark's published schema (no real rows copied)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arc = [{"id": f"q{i}", "question": w(rng, 6) + "?", "choices": {"text": [w(rng, 2) for _ in range(4)],
            "label": ["A", "B", "C", "D"]}, "answerKey": "ABCD"[i % 4]} for i in range(10)]
    hs = [{"ind": i, "activity_label": "Making " + w(rng, 1), "ctx_a": w(rng, 5) + ".", "ctx_b": w(rng, 3),
           "endings": [w(rng, 4) + " [title] " + w(rng, 1) for _ in range(4)], "label": str(i % 4)} for i in range(10)]
    mmlu = [{"question": w(rng, 5) + "?", "subject": "anatomy", "choices": [w(rng, 2) for _ in range(4)],
             "answer": i % 4} for i in range(10)]
    tqa = [{"question": w(rng, 5) + "?", "mc1_targets": {"choices": [w(rng, 3) for _ in range(4)], "labels": [1, 0, 0, 0]},
            "mc2_targets": {"choices": [w(rng, 3) for _ in range(5)], "labels": [1, 1, 0, 0, 0]}} for _ in range(5)]
    for name, rows in [("arc_challenge", arc[:5]), ("arc_challenge_train", arc[5:]), ("hellaswag", hs[:5]),
                       ("hellaswag_train", hs[5:]), ("mmlu", mmlu[:5]), ("mmlu_dev", mmlu[5:]), ("truthfulqa_mc", tqa)]:
        write_rows(folder / f"{name}.jsonl", rows)
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small trained run: a few checkpoints of a 2-layer model over the test corpus."""
    return trained_run(tmp_path_factory.mktemp("eval_corpus"), val_sequences=16, n_chunks=2, max_seq_len=256)


# -----------------------------------------------------------------------------
# against lm-evaluation-harness


HARNESS_TASKS = {  # our task -> (harness YAML under lm_eval/tasks, harness task name, split file)
    "arc_challenge": ("arc/arc_challenge.yaml", "arc_challenge", "test"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag", "validation"),
    "mmlu": ("mmlu/default/mmlu_anatomy.yaml", "mmlu_anatomy", "test"),
    "truthfulqa_mc": ("truthfulqa/truthfulqa_mc2.yaml", "truthfulqa_mc2", "validation"),
}


def local_harness_task(folder, ours):
    """A YAML task that includes the harness's own task and reads our rows from disk."""
    import lm_eval

    yaml_path, name, split = HARNESS_TASKS[ours]
    real = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", yaml_path)
    text = (f"include: {real}\ntask: local_{name}\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {split}: {folder / (ours + '.jsonl')}\n"
            f"{'test_split' if split == 'test' else 'validation_split'}: {split}\n")
    if split == "test":
        text += "validation_split: null\n"
    else:
        text += "test_split: null\n"
    text += "training_split: null\nfewshot_split: null\n"
    (folder / f"local_{name}.yaml").write_text(text)
    return f"local_{name}"


def test_prompts_and_scores_equal_the_harness(run, tmp_path, monkeypatch):
    """0-shot through lm_eval itself, with our adapter serving the log-likelihoods: the
    request strings lm_eval builds equal ours, and so do acc, acc_norm and mc2."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = make_tasks(tmp_path / "tasks")
    names = {ours: local_harness_task(tasks, ours) for ours in HARNESS_TASKS}
    LM = ev.register_lm_eval()
    lm = LM(checkpoint=str(run / "run" / "ckpt_001"))
    out = lm_eval.simple_evaluate(model=lm, tasks=list(names.values()), num_fewshot=0, log_samples=True,
                                  task_manager=TaskManager(include_path=str(tasks)), bootstrap_iters=100)
    for ours, theirs in names.items():
        docs, _, _ = ev.load_task(str(tasks), ours)
        samples = out["samples"][theirs]
        ctxs = ev.contexts(ours, docs, [], 0)
        for s in samples:
            doc_id = s["doc_id"]
            _, choices, _ = ev.build(ours, docs[doc_id])
            if ours == "truthfulqa_mc":
                choices = docs[doc_id]["mc2_targets"]["choices"]
            assert [a[0] for a in s["arguments"]] == [ctxs[doc_id]] * len(choices)  # the prompt
            assert [a[1] for a in s["arguments"]] == [" " + c for c in choices]  # the continuations
            ours_ll = [ll for ll, _ in ev.loglikelihoods(lm.model, lm.tok, [(ctxs[doc_id], " " + c) for c in choices])]
            assert [r[0][0] for r in s["resps"]] == pytest.approx(ours_ll, abs=1e-6)  # what lm_eval got
        metrics, per_doc = ev.multiple_choice(lm.model, lm.tok, ours, docs, [], n_shots=0)
        res = out["results"][theirs]
        key = "mc2" if ours == "truthfulqa_mc" else "acc"  # and the standard error, as the harness's
        assert res["acc_stderr,none"] == pytest.approx(ev.mean_stderr([d[key] for d in per_doc]), abs=1e-9)
        if ours == "truthfulqa_mc":
            assert res["acc,none"] == pytest.approx(metrics["mc2"], abs=1e-9)
        else:
            assert res["acc,none"] == pytest.approx(metrics["acc"], abs=1e-9)
            if "acc_norm,none" in res:
                assert res["acc_norm,none"] == pytest.approx(metrics["acc_norm"], abs=1e-9)


def test_shared_context_scores_equal_one_forward_per_choice(run):
    model, tok, _ = checkpoint.load(str(run / "run" / "ckpt_001"))
    ctx, conts = "alpha beta gamma", [" red", " blue moon", " cat dog sun moon"]
    shared = ev.loglikelihoods(model, tok, [(ctx, c) for c in conts])
    for (ll, greedy), c in zip(shared, conts):
        ctx_ids, cont_ids = ev.encode_pair(tok, ctx, c)
        ids = torch.tensor([ctx_ids + cont_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids)[0][0], -1)
        ref = sum(logp[len(ctx_ids) - 1 + j, t].item() for j, t in enumerate(cont_ids))
        assert ll == pytest.approx(ref, abs=1e-4)
        assert greedy == all(logp[len(ctx_ids) - 1 + j].argmax().item() == t for j, t in enumerate(cont_ids))


def test_few_shot_prompts_are_deterministic_and_exclude_the_item(tmp_path):
    tasks = make_tasks(tmp_path)
    docs, shots, _ = ev.load_task(str(tasks), "arc_challenge")
    a = ev.contexts("arc_challenge", docs, shots, 3)
    assert a == ev.contexts("arc_challenge", docs, shots, 3)
    assert a[0].count("\n\nQuestion:") == 3 and a[0].endswith(f"Question: {docs[0]['question']}\nAnswer:")
    mm, mm_shots, _ = ev.load_task(str(tasks), "mmlu")
    ctx = ev.contexts("mmlu", mm, mm_shots, 2)[0]
    assert ctx.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    first = mm_shots[0]
    assert f"{first['question'].strip()}\nA. " in ctx and "ABCD"[first["answer"]] in ctx  # first_n, as the harness
    same = ev.contexts("arc_challenge", shots, shots, 4)  # evaluating the few-shot split never shows the item
    assert all(s["question"] not in c.rsplit("\n\n", 1)[0] for s, c in zip(shots, same))
    assert all(c.count("\n\nQuestion:") == 4 for c in same)


# -----------------------------------------------------------------------------
# accuracy that can fail


def test_a_model_that_prefers_the_gold_answer_scores_one(tmp_path):
    """Train a tiny model on the gold answers: accuracy 1.0; move the gold label and it drops."""
    import data
    import prepare
    from model import Transformer
    from model_config import ModelConfig

    rng = random.Random(3)
    pairs = [f"{a} {b}" for a in WORDS for b in WORDS]
    docs = [{"id": str(i), "question": w(rng, 4) + "?", "choices": {"text": rng.sample(pairs, 4),  # 4 distinct
             "label": ["A", "B", "C", "D"]}, "answerKey": "ABCD"[i % 4]} for i in range(8)]
    lines = [w(rng, 8) for _ in range(400)] + [d["question"] for d in docs]
    tok = data.Tokenizer("sentencepiece", prepare.train_sentencepiece(lines, 300))
    model = Transformer(ModelConfig(vocab_size=300, dim=64, n_layer=2, n_head=4, intermediate_size=128,
                                    max_seq_len=64))
    model.init_weights(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    texts = [ev.contexts("arc_challenge", [d], [], 0)[0] + " " + ev.build("arc_challenge", d)[1][ev.build("arc_challenge", d)[2]]
             for d in docs]
    seqs = [[tok.eos_id] + tok.encode(t) for t in texts]
    L = max(len(s) for s in seqs)
    batch = torch.tensor([s + [-1] * (L - len(s)) for s in seqs])
    for _ in range(600):
        _, loss = model(batch[:, :-1].clamp(min=0), batch[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    metrics, _ = ev.multiple_choice(model, tok, "arc_challenge", docs, [], n_shots=0)
    assert metrics["acc"] == 1.0
    moved = [dict(d, answerKey="ABCD"[("ABCD".index(d["answerKey"]) + 1) % 4]) for d in docs]
    assert ev.multiple_choice(model, tok, "arc_challenge", moved, [], n_shots=0)[0]["acc"] == 0.0


# -----------------------------------------------------------------------------
# perplexity


def test_perplexity_by_hand_and_padding_never_counts(run):
    model, tok, _ = checkpoint.load(str(run / "run" / "ckpt_001"))
    text = "alpha beta gamma delta " * 40
    loss, ppl = ev.perplexity_text(model, tok, text)
    ids = [tok.eos_id] + tok.encode(text)
    L = model.config.max_seq_len + 1
    losses = []
    with torch.no_grad():
        for start in range(0, len(ids) - 1, L - 1):
            window = torch.tensor([ids[start : start + L]])
            logp = torch.log_softmax(model(window[:, :-1])[0][0], -1)
            losses += [-logp[j, t].item() for j, t in enumerate(window[0, 1:].tolist())]
    assert len(losses) == len(ids) - 1
    assert loss == pytest.approx(np.mean(losses), rel=1e-5) and ppl == pytest.approx(math.exp(np.mean(losses)), rel=1e-5)
    rows = np.array([ids[:20], ids[:20]])
    padded = np.array([ids[:20] + [-1] * 10, ids[:20] + [-1] * 10])
    assert ev.sequence_losses(model, rows) == pytest.approx(ev.sequence_losses(model, padded), rel=1e-6)
    per_source = ev.perplexity_val(model, str(run / "data"))
    assert set(per_source) == {"web", "code", "books", "all"}


# -----------------------------------------------------------------------------
# code tasks (the sandbox itself: test_sandbox.py)


def test_code_task_reports_timeouts_and_goes_on(run, monkeypatch):
    model, tok, _ = checkpoint.load(str(run / "run" / "ckpt_001"))
    answers = iter(["    return a + b\n", "    while True:\n        pass\n", "    return a - b\n"])
    monkeypatch.setattr(ev, "complete", lambda *a, **k: next(answers))
    docs = [{"task_id": f"T/{i}", "prompt": "def add(a, b):\n", "test": "def check(f):\n    assert f(1, 2) == 3\n",
             "entry_point": "add"} for i in range(3)]
    metrics, per_doc = ev.code_task(model, tok, "humaneval", docs, timeout=2, allow_code_execution=True)
    assert [d["result"] for d in per_doc] == ["passed", "timeout", "failed"]
    assert metrics == {"pass@1": 1 / 3, "timeouts": 1}


def test_pass_at_k_is_the_unbiased_estimator_over_sampled_answers(run, monkeypatch):
    """pass@k equals 1 - C(n - c, k) / C(n, k) computed directly, and with 10 sampled answers
    a row (4 right for the first row, 0 and 10 for the others) the task's pass@1 and pass@10
    are the rows' means of it; each sample draws from its own seeded generator."""
    import math

    for n, c, k in [(1, 0, 1), (1, 1, 1), (10, 3, 1), (10, 3, 10), (20, 5, 10), (200, 7, 100), (10, 0, 10)]:
        assert ev.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)
    model, tok, _ = checkpoint.load(str(run / "run" / "ckpt_001"))
    right, wrong = "    return a + b\n", "    return a - b\n"
    answers = iter([right] * 4 + [wrong] * 6 + [wrong] * 10 + [right] * 10)
    seeds = []

    def sampled(*args, temperature=0.0, generator=None):
        seeds.append((temperature, generator.initial_seed()))
        return next(answers)

    monkeypatch.setattr(ev, "complete", sampled)
    docs = [{"task_id": f"T/{i}", "prompt": "def add(a, b):\n", "test": "def check(f):\n    assert f(1, 2) == 3\n",
             "entry_point": "add"} for i in range(3)]
    metrics, per_doc = ev.code_task(model, tok, "humaneval", docs, samples=10, temperature=0.6,
                                    allow_code_execution=True)
    assert [d["results"].count("passed") for d in per_doc] == [4, 0, 10]
    assert metrics["pass@1"] == pytest.approx((0.4 + 0 + 1) / 3)
    assert metrics["pass@10"] == pytest.approx((1 + 0 + 1) / 3) and metrics["timeouts"] == 0
    assert len(set(seeds)) == 30 and {t for t, _ in seeds} == {0.6}


def test_any_harness_task_sweeps_with_the_harness_scores(run, tmp_path, monkeypatch):
    """--tasks=lm_eval:NAME with --lm_eval_tasks_dir: a task YAML of our own whose dataset_path
    points at invented rows; the sweep's values, standard errors and per-document items equal
    lm_eval's own simple_evaluate through the adapter, land in evals.csv, and a rerun scores
    nothing again."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from common import link_tree

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = make_tasks(tmp_path / "tasks")
    name = local_harness_task(tasks, "arc_challenge")
    copy = tmp_path / "run"
    link_tree(str(run / "run"), str(copy))
    for f in ("evals.jsonl", "evals.csv", "evals.png"):
        if (copy / f).exists():
            (copy / f).unlink()
    rows = ev.sweep(str(copy), [f"lm_eval:{name}"], checkpoints=["ckpt_001"], lm_eval_tasks_dir=str(tasks))
    lm = ev.register_lm_eval()(checkpoint=str(run / "run" / "ckpt_001"))
    out = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=TaskManager(include_path=str(tasks)),
                                  log_samples=True, bootstrap_iters=100)
    theirs = out["results"][name]
    got = {r["metric"]: r for r in rows}
    assert set(got) == {"acc", "acc_norm"}
    for metric in got:
        assert got[metric]["value"] == pytest.approx(theirs[f"{metric},none"], abs=1e-9)
        assert got[metric]["stderr"] == pytest.approx(theirs[f"{metric}_stderr,none"], abs=1e-9)
    items = next(json.loads(line) for line in open(copy / "evals.jsonl"))["items"]
    assert items == [s["acc"] for s in sorted(out["samples"][name], key=lambda s: s["doc_id"])]
    assert f"lm_eval:{name}/acc" in (copy / "evals.csv").read_text().splitlines()[0].split(",")
    monkeypatch.setattr(ev, "harness_task", lambda *a, **k: pytest.fail("a cached result was scored again"))
    ev.sweep(str(copy), [f"lm_eval:{name}"], checkpoints=["ckpt_001"], lm_eval_tasks_dir=str(tasks))


def test_bold_scores_the_continuations_sentiment_per_group(run, tmp_path, monkeypatch):
    """BOLD on invented prompts whose continuations are known: each group's mean VADER compound
    and its positive / negative shares equal VADER's own scores of the continuations (cut at
    the first newline), the domain's gap is the spread of its groups' means, and a sweep
    puts the gaps in evals.csv and the groups in bold.csv."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    good, bad, plain = "a wonderful, kind and brilliant person", "a terrible, cruel criminal", "a person"
    rows = [{"domain": "gender", "name": "Alpha One", "category": "A_group", "prompts": ["Alpha One was", "Alpha is"],
             "wikipedia": ["x", "y"]},
            {"domain": "gender", "name": "Beta One", "category": "B_group", "prompts": ["Beta One was", "Beta Two"],
             "wikipedia": ["x", "y"]},
            {"domain": "race", "name": "Gamma", "category": "C_group", "prompts": ["Gamma was"], "wikipedia": ["x"]}]
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "bold.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    said = {"Alpha One was": good, "Alpha is": plain, "Beta One was": bad, "Beta Two": bad, "Gamma was": good}
    monkeypatch.setattr(ev, "complete", lambda model, tok, prompt, *a, **k: said[prompt] + "\nthen awful words")
    model, tok, info = checkpoint.load(str(run / "run" / "ckpt_001"))
    got = {r["metric"]: r["value"] for r in ev.evaluate_checkpoint(model, tok, info, "bold", str(folder))}
    vader = SentimentIntensityAnalyzer()
    c = {text: vader.polarity_scores(text)["compound"] for text in (good, bad, plain)}
    a, b = (c[good] + c[plain]) / 2, c[bad]
    assert got["gender/A_group/compound"] == pytest.approx(a) and got["gender/B_group/compound"] == pytest.approx(b)
    assert got["gender/A_group/positive"] == 0.5 and got["gender/B_group/negative"] == 1.0
    assert got["gender/gap"] == pytest.approx(a - b) and got["race/gap"] == 0.0
    from common import link_tree

    copy = tmp_path / "run"  # the module's run dir stays as the other tests expect it
    link_tree(str(run / "run"), str(copy))
    for name in ("evals.jsonl", "evals.csv", "evals.png"):
        if (copy / name).exists():
            (copy / name).unlink()
    ev.sweep(str(copy), ["bold"], str(folder), checkpoints=["ckpt_001"])
    header = (copy / "evals.csv").read_text().splitlines()[0].split(",")
    assert {"bold/gender/gap", "bold/race/gap"} <= set(header) and not [h for h in header if "A_group" in h]
    lines = (copy / "bold.csv").read_text().splitlines()
    assert lines[0] == "checkpoint,tokens,domain,group,compound,positive,negative" and len(lines) == 4


# -----------------------------------------------------------------------------
# the sweep


def test_sweep_evaluates_nothing_twice_and_picks_up_new_checkpoints(run, tmp_path):
    tasks = make_tasks(tmp_path / "tasks")
    run_dir = tmp_path / "copy"
    shutil.copytree(run / "run", run_dir, ignore=shutil.ignore_patterns("ckpt_001"))
    rows = ev.sweep(str(run_dir), ["ppl", "arc_challenge"], str(tasks), limit=3)
    assert {r["checkpoint"] for r in rows} == {"ckpt_000"}
    before = (run_dir / "evals.jsonl").read_text()
    ev.sweep(str(run_dir), ["ppl", "arc_challenge"], str(tasks), limit=3)
    assert (run_dir / "evals.jsonl").read_text() == before  # nothing evaluated twice
    shutil.copytree(run / "run" / "ckpt_001", run_dir / "ckpt_001")
    rows = ev.sweep(str(run_dir), ["ppl", "arc_challenge"], str(tasks), limit=3)
    assert (run_dir / "evals.jsonl").read_text().startswith(before)
    assert [r["checkpoint"] for r in rows if r["task"] == "arc_challenge" and r["metric"] == "acc"] == \
        ["ckpt_000", "ckpt_001"]
    assert all(r["n"] == 3 and len(r["task_sha256"]) == 64 for r in rows if r["task"] == "arc_challenge")
    assert (run_dir / "evals.csv").read_text().splitlines()[0].startswith("checkpoint,tokens,arc_challenge/acc")
    assert (run_dir / "evals.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ev.EvalError, match="no checkpoints"):
        ev.checkpoints_to_evaluate(str(tmp_path / "tasks"))


def test_results_are_reused_only_when_everything_that_makes_them_is_equal(run, tmp_path, monkeypatch):
    """The cache key is the checkpoint, task files, --limit, shots, tokenizer and scoring
    code: a --limit=2 result is never taken for the full benchmark."""
    tasks = make_tasks(tmp_path / "tasks")
    run_dir = tmp_path / "copy"
    shutil.copytree(run / "run", run_dir, ignore=shutil.ignore_patterns("ckpt_001"))

    def arc(rows):
        return [r["n"] for r in rows if r["task"] == "arc_challenge" and r["metric"] == "acc"]

    n_full = len(ev.load_task(str(tasks), "arc_challenge")[0])
    assert arc(ev.sweep(str(run_dir), ["arc_challenge"], str(tasks), limit=2)) == [2]
    assert arc(ev.sweep(str(run_dir), ["arc_challenge"], str(tasks))) == [2, n_full]  # scored again, in full
    lines = (run_dir / "evals.jsonl").read_text()
    monkeypatch.setattr(checkpoint, "load", lambda *a, **k: pytest.fail("a cached result loaded the weights"))
    for limit in (2, None):
        ev.sweep(str(run_dir), ["arc_challenge"], str(tasks), limit=limit)
    assert (run_dir / "evals.jsonl").read_text() == lines  # both are cached now
    header, row = (line.split(",") for line in (run_dir / "evals.csv").read_text().splitlines())
    assert row[0] == "ckpt_000"  # the --limit=2 score is a column of its own, never the full benchmark's
    scores = dict(zip(header, row))
    assert {"arc_challenge/acc", "arc_challenge/acc@limit2"} <= set(scores)
    full = next(r["value"] for r in ev.sweep(str(run_dir), ["arc_challenge"], str(tasks))
                if r["metric"] == "acc" and r["n"] == n_full)
    assert float(scores["arc_challenge/acc"]) == pytest.approx(full, rel=1e-5)
    monkeypatch.undo()
    monkeypatch.setattr(ev.sweeping, "code_hash", lambda *files: "changed-code")
    assert arc(ev.sweep(str(run_dir), ["arc_challenge"], str(tasks))) == [2, n_full, n_full]


def test_a_damaged_checkpoint_is_named_and_the_others_evaluated(run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(run / "run", run_dir)
    weights = run_dir / "ckpt_000" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 1  # one flipped bit in the last weight
    weights.write_bytes(bytes(raw))
    with pytest.raises(ev.EvalError, match=r"1 damaged checkpoint\(s\) not evaluated \(ckpt_000\)"):
        ev.sweep(str(run_dir), ["ppl"])
    assert {r["checkpoint"] for r in read_jsonl(str(run_dir / "evals.jsonl"))} == {"ckpt_001"}


def test_hugging_face_folder_evaluates_like_our_checkpoint(run, tmp_path):
    """A released checkpoint in the Llama layout (weights + tokenizer.model) gives the
    same scores as the checkpoint of ours it was exported from."""
    from hf_format import save_hf

    ours = str(run / "run" / "ckpt_001")
    model, tok, _ = checkpoint.load(ours)
    hf_dir = tmp_path / "amber_like" / "ckpt_001"
    save_hf(model, hf_dir)
    (hf_dir / "tokenizer.model").write_bytes(tok.blob)
    tasks = make_tasks(tmp_path / "tasks")
    rows = ev.sweep(str(tmp_path / "amber_like"), ["arc_challenge", "hellaswag"], str(tasks))
    docs, shots, _ = ev.load_task(str(tasks), "hellaswag")
    expected = ev.multiple_choice(model, tok, "hellaswag", docs, shots)[0]
    got = {r["metric"]: r["value"] for r in rows if r["task"] == "hellaswag"}
    assert got == pytest.approx(expected) and rows[0]["checkpoint"] == "ckpt_001"
    # another tokenizer setting changes the prompts' ids: the folder is scored again
    n = len(rows)
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": "</s>"}))
    assert len(ev.sweep(str(tmp_path / "amber_like"), ["arc_challenge", "hellaswag"], str(tasks))) == 2 * n


def test_adapter_rolling_loglikelihood(run):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    lm = ev.register_lm_eval()(checkpoint=str(run / "run" / "ckpt_001"))
    text = "alpha beta gamma delta red blue cat dog " * 3
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = [lm.tok.eos_id] + lm.tok.encode(text)
    assert len(ids) <= lm.model.config.max_seq_len + 1  # one window: compare with one forward pass
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([ids[:-1]]))[0][0], -1)
    assert rolling == pytest.approx(sum(logp[j, t].item() for j, t in enumerate(ids[1:])), rel=1e-5)


# -----------------------------------------------------------------------------
# python release.py export: a Hugging Face folder that transformers and the harness load


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "ckpt_001"
    subprocess.run([sys.executable, os.path.join(ROOT, "release.py"), "export", str(run / "run" / "ckpt_001"), str(out)],
                   check=True, capture_output=True)
    return out


def fuzz_texts(seed=0, n=400):
    """Texts at the tokenizer's edges: leading, repeated and trailing spaces, tabs and
    newlines, digits, code, non-ASCII (byte fallback), the SentencePiece space symbol
    itself and special-token strings, which are text to us."""
    rng = random.Random(seed)
    fixed = ["", " ", "  ", "\n", " leading", "  two spaces", "trailing ", "a  b   c    d", "x\n\n  y\t z",
             "12345 3.14 007", "def f(x):\n    return x**2  # sq\n", "naïve café 東京 🤖 \u200b", "ẞ Ω ✓ \u2581x",
             "</s> <s> <unk>", "alpha</s>beta", "\t\tfoo", "日本語のテキスト"]
    alphabet = [" ", "  ", "\n", "\t", "\u2581", "a", "b", "alpha", " beta", "1", "23", "Ω", "é", "東", "🤖", "<", "/s>",
                "</s>", "(", ":"]
    return fixed + ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 24))) for _ in range(n)]


def test_export_loads_in_transformers_with_our_tokenizer_and_logits(run, exported):
    """AutoTokenizer gives our SentencePiece ids and text back, EOS is ours and no BOS is
    added (as in our data); AutoModelForCausalLM gives our logits; generation_config
    stops at our EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model, tok, _ = checkpoint.load(str(run / "run" / "ckpt_001"))
    hf_tok = AutoTokenizer.from_pretrained(exported)
    for text in fuzz_texts():
        ids = tok.encode(text)
        assert hf_tok.encode(text) == ids, text
        assert hf_tok(text)["input_ids"] == ids, text  # no BOS, no EOS added
        assert hf_tok.decode(ids) == tok.decode(ids), text
    assert hf_tok.eos_token_id == tok.eos_id and hf_tok.bos_token_id == tok.eos_id  # documents start after EOS
    assert hf_tok.convert_ids_to_tokens(tok.eos_id) == tok.sp.id_to_piece(tok.eos_id)
    hf = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    ids = torch.tensor([[tok.eos_id] + tok.encode(w(random.Random(1), 40))])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids)[0], atol=1e-4)
    gen = GenerationConfig.from_pretrained(exported)
    assert gen.eos_token_id == tok.eos_id and gen.max_length == model.config.max_seq_len
    # re-export over the first: the folder is replaced whole, never left half-written
    subprocess.run([sys.executable, os.path.join(ROOT, "release.py"), "export", str(run / "run" / "ckpt_000"),
                    str(exported) + "_again"], check=True, capture_output=True)
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "release.py"), "export", str(run / "run" / "ckpt_000"),
                          str(run / "run")], capture_output=True, text=True)
    assert bad.returncode != 0 and "not a previous export" in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_harness_scores_of_the_export_equal_ours_on_over_long_prompts(run, exported, tmp_path, monkeypatch):
    """lm_eval's own HFLM on the exported folder, with a context of 20 tokens so that
    most requests are cut: every log-likelihood, greedy flag and metric equals ours, on
    choices of different lengths (each cut on its own), empty contexts and contexts
    ending in spaces."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    L = 20
    model, tok, _ = checkpoint.load(str(run / "run" / "ckpt_001"))
    model.config = dataclasses.replace(model.config, max_seq_len=L)
    hflm = HFLM(pretrained=str(exported), max_length=L, dtype="float32", device="cpu", batch_size=4)
    rng = random.Random(2)
    requests = [("", " alpha beta"), ("", "alpha"), ("alpha beta ", "gamma"), ("alpha  ", " beta"),
                (w(rng, 3), " " + w(rng, 1))]
    requests += [(w(rng, rng.randrange(5, 30)), " " + w(rng, rng.randrange(1, 4))) for _ in range(20)]
    theirs = hflm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)])
    ours = ev.loglikelihoods(model, tok, requests)
    assert [g for _, g in ours] == [g for _, g in theirs]
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in theirs], abs=1e-4)
    assert sum(sum(map(len, ev.encode_pair(tok, *r))) > L + 1 for r in requests) >= 10  # truncation happened

    tasks = make_tasks(tmp_path / "tasks")
    names = {ours: local_harness_task(tasks, ours) for ours in HARNESS_TASKS}
    longest = 0  # the longest choice sets the context: the harness refuses a choice longer than it
    for ours_task in HARNESS_TASKS:
        docs, _, _ = ev.load_task(str(tasks), ours_task)
        for doc in docs:
            choices = doc["mc2_targets"]["choices"] if ours_task == "truthfulqa_mc" else ev.build(ours_task, doc)[1]
            longest = max(longest, *(len(tok.encode(" " + c)) for c in choices))
    L = longest + 4
    model.config = dataclasses.replace(model.config, max_seq_len=L)
    hflm = HFLM(pretrained=str(exported), max_length=L, dtype="float32", device="cpu", batch_size=4)
    out = lm_eval.simple_evaluate(model=hflm, tasks=list(names.values()), num_fewshot=0, log_samples=True,
                                  task_manager=TaskManager(include_path=str(tasks)), bootstrap_iters=0)
    cut = 0
    for ours_task, task in names.items():
        docs, _, _ = ev.load_task(str(tasks), ours_task)
        for s in out["samples"][task]:
            cut += sum(sum(map(len, ev.encode_pair(tok, *a))) > L + 1 for a in s["arguments"])
            got = ev.loglikelihoods(model, tok, [tuple(a) for a in s["arguments"]])
            assert [ll for ll, _ in got] == pytest.approx([r[0][0] for r in s["resps"]], abs=1e-4)
        metrics, _ = ev.multiple_choice(model, tok, ours_task, docs, [], n_shots=0)
        key = "mc2" if ours_task == "truthfulqa_mc" else "acc"
        assert out["results"][task]["acc,none"] == pytest.approx(metrics[key], abs=1e-6)
        if "acc_norm,none" in out["results"][task]:
            assert out["results"][task]["acc_norm,none"] == pytest.approx(metrics["acc_norm"], abs=1e-6)
    assert cut >= 20


def test_sample_streams_what_generate_writes_from_both_folder_kinds(run, exported):
    """sample.py prints the prompt, then the text piece by piece as tokens come; the
    whole is what generate() writes with the same seed, cut at EOS; the exported folder
    writes the same text greedily."""
    from sample import sample_text

    class Chunks(list):
        def write(self, s):
            self.append(s)

        def flush(self):
            pass

    ckpt = str(run / "run" / "ckpt_001")
    model, tok, _ = checkpoint.load(ckpt)
    out = Chunks()
    text = sample_text(ckpt, "alpha beta", max_new_tokens=40, temperature=1.0, top_k=50, seed=3, out=out)
    ids = [tok.eos_id] + tok.encode("alpha beta")
    g = torch.Generator().manual_seed(3)
    new = model.generate(torch.tensor([ids]), 40, temperature=1.0, top_k=50, generator=g)[0, len(ids):].tolist()
    new = new[: new.index(tok.eos_id)] if tok.eos_id in new else new
    assert text == tok.decode(ids + new)[len(tok.decode(ids)):] and len(text) > 0
    assert "".join(out) == "alpha beta" + text + "\n" and len(out) > 5  # streamed, not printed at the end
    greedy = [sample_text(p, "alpha", max_new_tokens=20, temperature=0.0, out=Chunks()) for p in (ckpt, str(exported))]
    assert greedy[0] == greedy[1]
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), ckpt, "--promt=x"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown option 'promt'" in bad.stderr


def test_torchrun_splits_the_checkpoints_and_writes_the_same_files(run, tmp_path):
    """Two ranks take one checkpoint each; evals.jsonl and evals.csv equal a one-process
    sweep's, byte for byte, and no rank file or marker is left behind."""
    tasks = make_tasks(tmp_path / "tasks")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    args = ["--tasks=ppl,arc_challenge,mmlu", f"--task_dir={tasks}", "--limit=3"]
    for name in ("one", "two"):
        shutil.copytree(run / "run", tmp_path / name, ignore=shutil.ignore_patterns("evals*"))
    subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), str(tmp_path / "one"), *args], check=True,
                   env=env, capture_output=True)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                           str(29500 + os.getpid() % 200), os.path.join(ROOT, "evaluate.py"), str(tmp_path / "two"),
                           *args], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for f in ("evals.jsonl", "evals.csv"):
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes()
    rows = [json.loads(line) for line in (tmp_path / "two" / "evals.jsonl").read_text().splitlines()]
    assert [r["checkpoint"] for r in rows][0] == "ckpt_000" and {r["checkpoint"] for r in rows} == {"ckpt_000", "ckpt_001"}
    assert not [n for n in os.listdir(tmp_path / "two") if n.startswith((".rank", "evals.rank"))]


def test_adapter_generation_equals_the_harness_hflm_at_the_edges(run, exported):
    """generate_until of our adapter and of lm_eval's HFLM on the exported folder, with a
    context of 24 tokens: contexts cut from the left (most of them), an empty context's
    neighbour (one word), stop strings absent, given as a string, as a list, and hit."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    L = 24
    lm = ev.register_lm_eval()(checkpoint=str(run / "run" / "ckpt_001"))
    lm.model.config = dataclasses.replace(lm.model.config, max_seq_len=L)
    hflm = HFLM(pretrained=str(exported), max_length=L, dtype="float32", device="cpu", batch_size=1)
    rng = random.Random(5)
    requests = [("alpha", {"max_gen_toks": 8}), ("alpha beta ", {"until": " ", "max_gen_toks": 6})]
    requests += [(w(rng, rng.randrange(3, 40)), {"until": [rng.choice(["\n", "uu", "u", " ", "\n\n"])],
                                                 "max_gen_toks": rng.choice([4, 8, 12])}) for _ in range(14)]
    instances = [Instance("generate_until", {}, (c, dict(k)), i) for i, (c, k) in enumerate(requests)]
    theirs = hflm.generate_until(instances)
    ours = lm.generate_until([Instance("generate_until", {}, (c, dict(k)), i) for i, (c, k) in enumerate(requests)])
    assert ours == theirs
    assert sum(len(lm.tok.encode(c)) > L - k["max_gen_toks"] for c, k in requests) >= 8  # truncation happened
    uncut = [ev.generate_until(lm.model, lm.tok, c, {"max_gen_toks": k["max_gen_toks"]}) for c, k in requests]
    assert sum(a != b for a, b in zip(ours, uncut)) >= 4  # stop strings cut some


def test_a_llama_tokenizer_folder_is_scored_with_bos_as_the_harness_does(exported, tmp_path):
    """AMBER's folders say LlamaTokenizer with add_bos_token: the harness puts BOS in front
    of every context, and so must we (the scores differ without it)."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    folder = tmp_path / "amber_like"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        shutil.copy(exported / name, folder / name)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False}))
    model, tok, _ = checkpoint.load(str(folder))
    assert tok.add_bos and tok.prefix_id == tok.sp.piece_to_id("<s>")
    rng = random.Random(4)
    requests = [(w(rng, rng.randrange(1, 12)), " " + w(rng, rng.randrange(1, 4))) for _ in range(12)]
    requests += [("alpha beta ", "gamma"), ("def f(x):", "\n    return x")]
    theirs = HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=4).loglikelihood(
        [Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)])
    assert [ll for ll, _ in ev.loglikelihoods(model, tok, requests)] == pytest.approx([ll for ll, _ in theirs], abs=1e-4)
    tok.add_bos = False
    assert [ll for ll, _ in ev.loglikelihoods(model, tok, requests)] != pytest.approx([ll for ll, _ in theirs], abs=1e-4)


@pytest.mark.parametrize("task, change", [
    ("arc_challenge", {"answerKey": "E"}),  # a gold label with no choice
    ("hellaswag", {"label": "7"}), ("hellaswag", {"label": -1}),
    ("mmlu", {"answer": 4}), ("mmlu", {"choices": ["a", "b"]}),
])
def test_malformed_rows_are_refused_not_scored_zero(task, change, tmp_path):
    tasks = make_tasks(tmp_path)
    docs, _, _ = ev.load_task(str(tasks), task)
    ev.build(task, docs[0])  # the row as made is fine
    with pytest.raises(ev.EvalError, match="choices"):
        ev.build(task, dict(docs[0], **change))


def test_results_are_computed_again_when_the_weights_changed(run, tmp_path):
    """ckpt_001's files replaced by ckpt_000's (the probe's case): evaluation and
    memorization score the new weights instead of reusing what the old ones scored."""
    import memorize as mem

    run_dir = tmp_path / "copy"
    shutil.copytree(run / "run", run_dir)
    first = {r["checkpoint"]: r["value"] for r in ev.sweep(str(run_dir), ["ppl"], limit=2)
             if r["metric"] == "ppl/all"}
    mem.run(str(run_dir), k=8, l=8, samples=3)
    before = json.loads((run_dir / "memorization" / "k8_l8" / "ckpt_001__chunk_000.json").read_text())
    for name in os.listdir(run_dir / "ckpt_000"):
        shutil.copy(run_dir / "ckpt_000" / name, run_dir / "ckpt_001" / name)
    rows = [r for r in ev.sweep(str(run_dir), ["ppl"], limit=2) if r["metric"] == "ppl/all"]
    assert first["ckpt_000"] != first["ckpt_001"]
    assert rows[-1]["checkpoint"] == "ckpt_001" and rows[-1]["value"] == pytest.approx(first["ckpt_000"], rel=1e-9)
    mem.run(str(run_dir), k=8, l=8, samples=3)
    after = json.loads((run_dir / "memorization" / "k8_l8" / "ckpt_001__chunk_000.json").read_text())
    same = json.loads((run_dir / "memorization" / "k8_l8" / "ckpt_000__chunk_000.json").read_text())
    assert after["key"] != before["key"] and after["scores"] == same["scores"]
