"""
Evaluation of every checkpoint of a run: perplexity, the Open LLM Leaderboard's
multiple-choice benchmarks, code benchmarks, and an lm-evaluation-harness adapter.

    python evaluate.py RUN_DIR --tasks=ppl,arc_challenge,hellaswag,mmlu,truthfulqa_mc \\
                       --task_dir=DIR [--checkpoints=ckpt_003,ckpt_007] [--limit=N] [--text=FILE]
    python evaluate.py AMBER_CKPT_DIR ...     a Hugging Face Llama folder, or a folder of them

Task files are the public datasets' rows, saved by the user as JSON lines or
parquet in --task_dir: TASK.jsonl (the split evaluated) and TASK_train.jsonl (the
split few-shot examples come from; MMLU: mmlu_dev.jsonl). Prompts are built the
way lm-evaluation-harness 0.4 builds them, with the leaderboard's few-shot counts
(ARC-Challenge 25, HellaSwag 10, MMLU 5, TruthfulQA 0), and choices are scored by
log-likelihood: acc, acc_norm (divided by the choice's length in characters),
TruthfulQA mc1 and mc2. HumanEval and MBPP are pass@1, greedy, run in a sandboxed
subprocess. Results go to RUN_DIR/evals.jsonl line by line (a rerun skips what is
there), then evals.csv and evals.png.

With lm_eval installed, `import evaluate; evaluate.register_lm_eval()` registers
model "llm360" (model_args="checkpoint=PATH"), to run any harness task.
"""

import difflib
import functools
import glob
import hashlib
import json
import math
import os
import re
import sys

import numpy as np
import torch
import torch.nn.functional as F

import bold
import checkpoint
import data
import emergence
import model as model_module
import sandbox
import sweeping
import tasks
from tasks import FEWSHOT, load_task
from common import (UserError, as_bool, hold_lock, init_distributed, one_line_errors, parse_options,
                    rank_token, iter_jsonl, read_jsonl, sha256_file, wait_for_ranks,
                    write_text_atomic)
from machine import torch_device
from model import KVCache
from plot import plot_evals

FEWSHOT_SEED = 1234


class EvalError(UserError):
    pass


# -----------------------------------------------------------------------------
# what a result depends on, and which checkpoints there are


# a score's code
SCORER_FILES = tuple(os.path.abspath(f) for f in (__file__, model_module.__file__, tasks.__file__))


def result_key(task, task_sha, limit, tokenizer, weights=None, sampling=None):
    """What a result depends on: the checkpoint's weights (checkpoint.identity's
    fingerprint), the task's files (or text, or validation split), how many rows
    (--limit), the few-shot count, the tokenizer and the scoring code (this file, model.py
    and tasks.py), and for a code task the samples and temperature of pass@k. evals.jsonl
    rows are reused only when all of these are equal."""
    parts = {"task": task, "task_sha256": task_sha, "limit": limit, "n_shots": FEWSHOT.get(task),
             "tokenizer": tokenizer, "weights": weights, "sampling": sampling}
    return sweeping.result_key(parts, *SCORER_FILES)


def checkpoints_to_evaluate(run_dir):
    """A run's checkpoints in training order (the chunk ends, not ckpt_rolling), a folder of
    Hugging Face checkpoints, or one Hugging Face folder."""
    if not os.path.isdir(run_dir):
        raise EvalError(f"{run_dir}: no such folder; give a run dir, a checkpoint folder or a "
                        "folder of them")
    if (checkpoint.kind(run_dir) == "hf"
        and not os.path.exists(os.path.join(run_dir, "metrics.jsonl"))):
        return [run_dir]
    found = [os.path.join(run_dir, n) for n in checkpoint.checkpoint_names(run_dir)
             if checkpoint.kind(os.path.join(run_dir, n))]
    if not found:
        raise EvalError(f"{run_dir} holds no checkpoints (ckpt_NNN folders); train first, or give "
                        "a checkpoint folder")
    return found


# -----------------------------------------------------------------------------
# log-likelihoods, the shared context computed once


def encode_pair(tok, context, continuation):
    """Token ids of (context, continuation) exactly as lm-evaluation-harness 0.4 splits them:
    trailing spaces of the context move to the continuation, and the continuation's ids
    are those of the whole string after the context's. An empty context is the prefix
    token (EOS; a Hugging Face folder's BOS), or the continuation's first token if that is it."""
    if context == "":
        cont = tok.encode(continuation)
        if not cont:
            raise EvalError("an empty context with an empty continuation has nothing to score")
        return ([tok.prefix_id], cont) if cont[0] != tok.prefix_id else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    bos = [tok.prefix_id] if tok.add_bos else []
    whole, ctx = bos + tok.encode(context + continuation), bos + tok.encode(context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def score_continuations(model, ctx_ids, conts):
    """[(sum log p(continuation | context), is greedy)] for continuations of one context.

    Over-long requests are cut as lm-evaluation-harness's HFLM cuts each one on its own:
    it keeps the last max_seq_len + 1 tokens of context + continuation and drops the final
    one, so a longer choice sees less of the context. Choices that keep the same context
    (all of them, when nothing is too long) share it: it runs once into a KV cache and
    they then run as one batch (right-padded, the padding never scored).
    """
    max_len = model.config.max_seq_len
    groups = {}  # tokens of context kept -> indices of the continuations that keep that many
    for k, c in enumerate(conts):
        if not c or len(c) > max_len:
            raise EvalError(f"a continuation of {len(c)} tokens cannot be scored by a model of "
                            f"{max_len} tokens of context (the harness refuses it too)")
        groups.setdefault(min(len(ctx_ids), max_len + 1 - len(c)), []).append(k)
    out = [None] * len(conts)
    for keep, ks in groups.items():
        for k, r in zip(ks, _score_shared(model, ctx_ids[len(ctx_ids) - keep:],
                                          [conts[k] for k in ks])):
            out[k] = r
    return out


def _score_shared(model, ctx_ids, conts):
    device = model.tok_emb.weight.device
    K, longest = len(conts), max(len(c) for c in conts)
    cache = KVCache(model.config, 1, len(ctx_ids) + longest, device)
    logits, _ = model(torch.tensor([ctx_ids], device=device), cache=cache, pos=0)
    # the prediction of each continuation's first token
    first = F.log_softmax(logits[0, -1].float(), -1)
    # the same context for every continuation: expand the cache
    for i in range(model.config.n_layer):
        cache.k[i] = cache.k[i].expand(K, -1, -1, -1).clone()
        cache.v[i] = cache.v[i].expand(K, -1, -1, -1).clone()
    cache.shape = (K,) + cache.shape[1:]
    out = []
    if longest > 1:
        batch = torch.zeros(K, longest - 1, dtype=torch.long, device=device)
        for k, c in enumerate(conts):
            batch[k, : len(c) - 1] = torch.tensor(c[:-1])
        logits, _ = model(batch, cache=cache, pos=len(ctx_ids))
        logp = F.log_softmax(logits.float(), -1)  # (K, longest - 1, V)
    for k, c in enumerate(conts):
        lp = [first] + ([logp[k, j] for j in range(len(c) - 1)] if len(c) > 1 else [])
        ll = sum(lp[j][t].item() for j, t in enumerate(c))
        greedy = all(int(lp[j].argmax()) == t for j, t in enumerate(c))
        out.append((ll, greedy))
    return out


def loglikelihoods(model, tok, requests):
    """[(ll, is_greedy)] for [(context, continuation)], contexts shared where equal."""
    by_context = {}
    for i, (context, continuation) in enumerate(requests):
        ctx, cont = encode_pair(tok, context, continuation)
        by_context.setdefault(tuple(ctx), []).append((i, cont))
    results = [None] * len(requests)
    for ctx, items in by_context.items():
        for (i, _), r in zip(items, score_continuations(model, list(ctx), [c for _, c in items])):
            results[i] = r
    return results


# -----------------------------------------------------------------------------
# perplexity


@torch.no_grad()
def sequence_losses(model, seqs, batch_size=8):
    """(sum of token losses, number of tokens) over rows (n, L) with -1 as padding."""
    total, count = 0.0, 0
    device = model.tok_emb.weight.device
    for i in range(0, len(seqs), batch_size):
        rows = torch.as_tensor(seqs[i : i + batch_size], dtype=torch.long, device=device)
        x, y = rows[:, :-1].clamp(min=0), rows[:, 1:]
        logits, _ = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                               ignore_index=-1, reduction="sum")
        total, count = total + loss.item(), count + int((y != -1).sum())
    return total, count


def perplexity_val(model, data_dir, limit=None):
    """{source: (loss, ppl), ..., "all": (loss, ppl)} on the held-out split of a data dir."""
    manifest = data.load_manifest(data_dir)
    if not manifest.get("val") or manifest["val"]["sequences"] == 0:
        raise EvalError(f"{data_dir} has no validation split")
    tokens, src = data.open_split(data_dir, manifest["val"])
    n = len(tokens) if limit is None else min(limit, len(tokens))
    out, sums = {}, [0.0, 0]
    for s in manifest["sources"]:
        rows = np.asarray(tokens[:n][src[:n] == s["id"]], dtype=np.int64)
        if len(rows):
            total, count = sequence_losses(model, rows)
            out[s["name"]] = (total / count, math.exp(total / count))
            sums = [sums[0] + total, sums[1] + count]
    out["all"] = (sums[0] / sums[1], math.exp(sums[0] / sums[1]))
    return out


def perplexity_text(model, tok, text):
    """(loss, ppl) of a text: EOS, then its tokens, in windows of max_seq_len + 1 that
    overlap by one token; the last window is padded with -1, never counted."""
    ids = [tok.prefix_id] + tok.encode(text)
    if len(ids) == 1:
        raise EvalError("the text holds no tokens: there is nothing to score")
    L = model.config.max_seq_len + 1
    rows = []
    for start in range(0, max(1, len(ids) - 1), L - 1):
        row = ids[start : start + L]
        rows.append(row + [-1] * (L - len(row)))
    total, count = sequence_losses(model, np.asarray(rows, dtype=np.int64))
    return total / count, math.exp(total / count)


# -----------------------------------------------------------------------------
# multiple-choice tasks, as lm-evaluation-harness 0.4 builds them


def _hellaswag_clean(text):
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def truthfulqa_primer():
    """TruthfulQA's fixed question-answer primer, read from the installed harness's task
    file (we do not ship a copy); TRUTHFULQA_PRIMER=FILE gives it from a file instead."""
    if os.environ.get("TRUTHFULQA_PRIMER"):
        with open(os.environ["TRUTHFULQA_PRIMER"]) as f:
            return f.read()
    try:
        import lm_eval
        import yaml
    except ImportError:
        raise EvalError("truthfulqa_mc needs its QA primer: pip install -r requirements-eval.txt "
                        "(read from lm_eval's task file) or set TRUTHFULQA_PRIMER=FILE") from None
    path = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "truthfulqa",
                        "truthfulqa_mc1.yaml")
    with open(path) as f:
        template = yaml.safe_load(f)["doc_to_text"]
    return re.search(r"set prompt_qa = '(.*?)'\s*%}", template, re.S).group(1)


def _gold(task, doc, gold, n):
    """The gold index, or a one-line error: a malformed row is refused, never scored (0, or
    always right with one choice)."""
    if n < 2:
        raise EvalError(f"{task} row {str(doc)[:80]}...: {n} choice(s); a multiple-choice row "
                        "needs at least 2")
    if not (isinstance(gold, int) and 0 <= gold < n):
        raise EvalError(f"{task} row {str(doc)[:80]}...: its answer {gold!r} names none of its {n} "
                        "choices")
    return gold


def build(task, doc):
    """(prompt, [choices], gold) of one row, without few-shot examples."""
    if task == "arc_challenge":
        labels = list(doc["choices"]["label"])
        if len(labels) != len(doc["choices"]["text"]):
            raise EvalError(f"{task} row {str(doc)[:80]}...: {len(labels)} labels for "
                            f"{len(doc['choices']['text'])} choices")
        gold = labels.index(doc["answerKey"]) if doc["answerKey"] in labels else doc["answerKey"]
        return f"Question: {doc['question']}\nAnswer:", list(doc["choices"]["text"]), \
            _gold(task, doc, gold, len(labels))
    if task == "hellaswag":
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        label = str(doc["label"])
        return _hellaswag_clean(doc["activity_label"] + ": "
                                + ctx), [_hellaswag_clean(e) for e in doc["endings"]], \
            _gold(task, doc, int(label) if label.lstrip("-").isdigit() else label,
                  len(doc["endings"]))
    if task == "mmlu":
        c = doc["choices"]
        if len(c) != 4:
            raise EvalError(f"mmlu row {str(doc)[:80]}...: {len(c)} choices; MMLU rows have 4")
        return (f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:",
                ["A", "B", "C", "D"], _gold(task, doc, doc["answer"], 4))
    if task == "truthfulqa_mc":
        choices = list(doc["mc1_targets"]["choices"])
        return (f"{truthfulqa_primer()}\n\nQ: {doc['question']}\nA:", choices,
                _gold(task, doc, 0, len(choices)))
    raise EvalError(f"unknown multiple-choice task {task!r}")


def contexts(task, docs, shots_from, n_shots):
    """The full prompt of every doc: description, n_shots examples, the doc's prompt.
    Examples are the first n_shots of the few-shot split (MMLU, as the harness), or
    of a permutation of it seeded with 1234 (ARC, HellaSwag); never the doc itself."""
    order = list(range(len(shots_from)))
    if task != "mmlu":
        order = list(np.random.default_rng(FEWSHOT_SEED).permutation(len(shots_from)))
    out = []
    for doc in docs:
        shots = [shots_from[i] for i in order if shots_from[i] is not doc
                 and shots_from[i] != doc][:n_shots]
        parts = []
        for s in shots:
            prompt, choices, gold = build(task, s)
            parts.append(f"{prompt} {choices[gold]}")
        parts.append(build(task, doc)[0])
        prefix = ""
        if task == "mmlu":
            prefix = ("The following are multiple choice questions (with answers) about "
                      f"{doc['subject'].replace('_', ' ')}.\n\n")
        out.append(prefix + "\n\n".join(parts))
    return out


def multiple_choice(model, tok, task, docs, shots_from, n_shots=None):
    """{metric: value} and per-doc results of a multiple-choice task."""
    n_shots = FEWSHOT[task] if n_shots is None else n_shots
    ctxs = contexts(task, docs, shots_from or [], n_shots)
    per_doc = []
    for doc, ctx in zip(docs, ctxs):
        _, choices, gold = build(task, doc)
        if task == "truthfulqa_mc":
            # scored as its own batch, as the harness's mc2 task
            mc2 = list(doc["mc2_targets"]["choices"])
            lls1 = np.array([ll for ll, _ in loglikelihoods(model, tok,
                                                            [(ctx, " " + c) for c in choices])])
            lls2 = np.array([ll for ll, _ in loglikelihoods(model, tok,
                                                            [(ctx, " " + c) for c in mc2])])
            probs = np.exp(lls2) / np.exp(lls2).sum()
            per_doc.append({"mc1": float(np.argmax(lls1) == 0),
                            "mc2": float(probs[np.array(doc["mc2_targets"]["labels"]) == 1].sum())})
            continue
        lls = np.array([ll for ll, _ in loglikelihoods(model, tok,
                                                       [(ctx, " " + c) for c in choices])])
        lengths = np.array([float(len(c)) for c in choices])
        per_doc.append({"acc": float(np.argmax(lls) == gold),
                        "acc_norm": float(np.argmax(lls / lengths) == gold)})
    metrics = {k: float(np.mean([d[k] for d in per_doc])) for k in per_doc[0]} if per_doc else {}
    return metrics, per_doc


# -----------------------------------------------------------------------------
# code benchmarks: generated code runs only in sandbox.py's sandbox

HUMANEVAL_STOP = ["\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint("]

def complete(model, tok, prompt, max_new_tokens, stop, compile=False, *, temperature=0.0,
             generator=None):
    """The model's continuation of prompt, cut at the first stop string: greedy, or sampled
    at `temperature` from `generator`."""
    # the prompt's last tokens that fit beside the answer
    keep = max(1, model.config.max_seq_len - max_new_tokens)
    ids = ([tok.prefix_id] + tok.encode(prompt))[-keep:]
    cache_len = max(model.config.max_seq_len, len(ids) + max_new_tokens) if compile else None
    out = model.generate(torch.tensor([ids], device=model.tok_emb.weight.device), max_new_tokens,
                         temperature=temperature, generator=generator, compile=compile,
                         cache_len=cache_len)
    text = tok.decode(out[0, len(ids):].tolist())
    cut = min([text.find(s) for s in stop if s in text] or [len(text)])
    return text[:cut]


def code_task(model, tok, task, docs, *, samples=1, temperature=0.8, max_new_tokens=128,
              timeout=10.0, compile="auto", allow_code_execution=False):
    """pass@k of HumanEval or MBPP rows: one greedy answer a row (pass@1), or `samples`
    answers sampled at `temperature` (seeded by the row and the sample) and pass@k by the
    unbiased estimator for k = 1, 10, 100 up to samples; each answer runs in the sandbox.
    compile: True, False, or "auto" (sweeping.compile_decoding of the tokens generated)."""
    compile = sweeping.compile_decoding(compile, len(docs) * samples * max_new_tokens)
    device = model.tok_emb.weight.device
    per_doc = []
    for i, doc in enumerate(docs):
        if task == "humaneval":
            prompt, stop = doc["prompt"], HUMANEVAL_STOP
        else:  # mbpp: the problem and its first test as a docstring, as in the MBPP paper
            prompt = f'"""\n{doc["text"]}\n{doc["test_list"][0]}\n"""\n'
            stop = ['\n"""', "\nassert", "\nif __name__", "\nprint("]
        results = []
        for s in range(samples):
            sampling = {} if samples == 1 else {
                "temperature": temperature,
                "generator": torch.Generator(device).manual_seed(1_000_003 * i + s)}
            body = complete(model, tok, prompt, max_new_tokens, stop, compile, **sampling)
            if task == "humaneval":
                program = (prompt + body + "\n\n" + doc["test"]
                           + f"\n\ncheck({doc['entry_point']})\n")
            else:
                program = "\n".join([body, doc.get("test_setup_code", ""), *doc["test_list"], ""])
            results.append(sandbox.run(program, timeout, allow_unisolated=allow_code_execution))
        passed = results.count("passed")
        per_doc.append({"task_id": doc["task_id"], "result": results[0], "results": results}
                       | {f"pass@{k}": pass_at_k(samples, passed, k) for k in ks(samples)})
    n = max(1, len(per_doc))
    metrics = {f"pass@{k}": sum(d[f"pass@{k}"] for d in per_doc) / n for k in ks(samples)}
    return metrics | {"timeouts": sum(r == "timeout" for d in per_doc for r in d["results"])}, \
        per_doc


def ks(samples):
    return [k for k in (1, 10, 100) if k <= samples]


def pass_at_k(n, c, k):
    """The unbiased pass@k of Chen et al. 2021 (Codex) from n samples of which c passed,
    1 - C(n - c, k) / C(n, k), as their numerically stable product."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


# -----------------------------------------------------------------------------
# the sweep over checkpoints (the task files: tasks.py)


def evaluate_checkpoint(model, tok, info, task, task_dir, *, limit=None, text=None,
                        allow_code_execution=False, samples=1, temperature=0.8,
                        lm_eval_tasks_dir=None):
    """[{metric, value, n, task_sha256, items}] of one task on one model (items: each row's value,
    for the multiple-choice and code tasks)."""
    if task == "ppl":
        if text:
            with open(text, encoding="utf-8", errors="replace") as f:
                content = f.read()
            if not content:
                raise EvalError(f"--text={text} is empty: give a file holding the text to score")
            loss, ppl = perplexity_text(model, tok, content)
            sha = sha256_file(text)
            return [{"metric": "loss", "value": loss, "n": 1, "task_sha256": sha},
                    {"metric": "ppl", "value": ppl, "n": 1, "task_sha256": sha}]
        res = perplexity_val(model, info["data_dir"], limit)
        sha = data.manifest_sha256(info["data_dir"])
        return [{"metric": f"ppl/{k}", "value": ppl, "n": None, "task_sha256": sha}
                for k, (_, ppl) in res.items()]
    if task.startswith("lm_eval:"):  # any task of lm-evaluation-harness, by name
        sha = harness_sha(task[8:], lm_eval_tasks_dir)
        return [r | {"task_sha256": sha}
                for r in harness_task(model, tok, task[8:], lm_eval_tasks_dir)]
    docs, shots, sha = load_task(task_dir, task)
    docs = docs[:limit] if limit else docs
    if task == "bold":  # greedy continuations scored by VADER (bold.py)
        compile = sweeping.compile_decoding("auto", sum(len(d["prompts"]) for d in docs)
                                            * bold.MAX_NEW_TOKENS)
        return [r | {"task_sha256": sha} for r in bold.score(
            docs, lambda p: complete(model, tok, p, bold.MAX_NEW_TOKENS, ["\n"], compile))]
    if task in ("humaneval", "mbpp"):
        metrics, per_doc = code_task(model, tok, task, docs, samples=samples,
                                     temperature=temperature,
                                     allow_code_execution=allow_code_execution)
        per_doc = [{k: d[k] for k in metrics if k.startswith("pass@")}
                   | {"timeouts": float(d["results"].count("timeout"))} for d in per_doc]
    else:
        metrics, per_doc = multiple_choice(model, tok, task, docs, shots)
    # items: each row's value, in the task file's order (tracing.py contamination splits them clean
    # / dirty); stderr: of every metric that is their mean (not the count of timeouts)
    return [{"metric": k, "value": v, "n": len(docs), "task_sha256": sha,
             "stderr": mean_stderr([d[k] for d in per_doc]) if k != "timeouts" else None,
             "items": [d[k] for d in per_doc]}
            for k, v in metrics.items()]


def mean_stderr(values):
    """The standard error of a mean of per-item values as lm-evaluation-harness computes it
    (its mean_stderr: the sample standard deviation over sqrt(n)); None under 2 items."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def sweep(run_dir, tasks, task_dir=None, *, checkpoints=None, limit=None, text=None, device="cpu",
          rank=0, world_size=1, allow_code_execution=False, samples=1, temperature=0.8,
          lm_eval_tasks_dir=None):
    """Evaluate every checkpoint x task not yet in RUN_DIR/evals.jsonl; return all rows.

    Under torchrun, rank r takes checkpoints r, r + world_size, ... Each rank appends its
    rows to evals.rank{r}.jsonl as they come (a crash loses nothing: a rerun reads them as
    done); at the end rank 0 moves them into evals.jsonl in checkpoint, then task order,
    so the file is the same whatever the number of ranks."""
    for task in tasks:
        if task.startswith("lm_eval:"):
            harness_config(task[8:], lm_eval_tasks_dir)  # an unknown name stops here
            continue
        if task not in ("ppl", "humaneval", "mbpp", "bold") and task not in FEWSHOT:
            raise EvalError(f"unknown task {task!r}; known: ppl, {', '.join(FEWSHOT)}, humaneval, "
                            "mbpp, bold")
        if task != "ppl" and not task_dir:
            raise EvalError(f"{task} needs --task_dir=DIR, the folder holding {task}.jsonl (the "
                            "rows of the public dataset, saved by you)")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise EvalError(f"limit={limit!r}: give a whole number >= 1, or no limit")
    if text and not os.path.isfile(text):
        raise EvalError(f"--text={text}: no such file")
    # a missing or empty run dir, or an unknown checkpoint, stops here, before anything is written
    names = {os.path.basename(os.path.normpath(p)): p for p in checkpoints_to_evaluate(run_dir)}
    paths = [names[n] for n in sweeping.pick(run_dir, list(names), checkpoints, EvalError)]
    token = rank_token(world_size)
    if rank == 0:  # one evaluation per run dir at a time (training may go on beside it)
        hold_lock(os.path.join(run_dir, "evals.lock"), "an evaluate.py sweep")
    out_path = os.path.join(run_dir, "evals.jsonl")
    part_paths = sorted(glob.glob(os.path.join(run_dir, "evals.rank*.jsonl")))
    done = {(r["checkpoint"], r["task"], r.get("key")) for p in [out_path] + part_paths
            for r in iter_jsonl(p)}
    mine = os.path.join(run_dir, f"evals.rank{rank}.jsonl")
    damaged = []
    for path in paths[rank::world_size]:
        try:
            _sweep_checkpoint(path, tasks, task_dir, limit=limit, text=text, device=device,
                              done=done, mine=mine, allow_code_execution=allow_code_execution,
                              samples=samples, temperature=temperature,
                              lm_eval_tasks_dir=lm_eval_tasks_dir)
        # a damaged checkpoint stops nothing else: it is named at the end
        except checkpoint.CheckpointError as e:
            if len(paths) == 1:
                raise
            print(f"{os.path.basename(os.path.normpath(path))}: not evaluated: {e}", flush=True)
            damaged.append(os.path.basename(os.path.normpath(path)))
    wait_for_ranks(run_dir, token, rank, world_size)
    if rank == 0:
        rows = _merge(run_dir, out_path, tasks)
    if damaged:
        raise EvalError(f"{len(damaged)} damaged checkpoint(s) not evaluated "
                        f"({', '.join(damaged)}); the others are in {out_path}. `python train.py "
                        f"verify {run_dir}` checks the whole run")
    return rows if rank == 0 else None


def _sweep_checkpoint(path, tasks, task_dir, *, limit, text, device, done, mine,
                      allow_code_execution, samples, temperature, lm_eval_tasks_dir):
    """The tasks of one checkpoint that are not done, appended to the rank's file."""
    name = os.path.basename(os.path.normpath(path))
    model = tok = None
    # no weights read: a rerun over 360 done checkpoints loads none
    info = checkpoint.identity(path)
    for task in tasks:
        if task.startswith("lm_eval:"):
            sha = harness_sha(task[8:], lm_eval_tasks_dir)
        elif task != "ppl":
            sha = load_task(task_dir, task)[2]
        elif text:
            sha = sha256_file(text)
        elif info["data_dir"]:
            sha = data.manifest_sha256(info["data_dir"])
        else:
            raise EvalError(f"{path}: ppl of a Hugging Face folder needs --text=FILE (it has no "
                            "data dir)")
        key = result_key(task, sha, limit, info["tokenizer"], info["weights"],
                         sampling=[samples, temperature] if task in ("humaneval", "mbpp")
                         and samples > 1 else None)
        if (name, task, key) in done:
            continue
        if model is None:
            model, tok, info = checkpoint.load(path, device)
        rows = evaluate_checkpoint(model, tok, info, task, task_dir, limit=limit, text=text,
                                   allow_code_execution=allow_code_execution, samples=samples,
                                   temperature=temperature, lm_eval_tasks_dir=lm_eval_tasks_dir)
        with open(mine, "a") as f:
            for r in rows:
                f.write(json.dumps({"checkpoint": name, "step": info["step"],
                                    "tokens": info["tokens"], "task": task, **r, "limit": limit,
                                    "tokenizer": info["tokenizer"],
                                    "scorer": sweeping.code_hash(*SCORER_FILES), "key": key})
                        + "\n")
        print(f"{name} {task}: " + ", ".join(f"{r['metric']} {r['value']:.4f}" for r in rows),
              flush=True)


def _merge(run_dir, out_path, tasks):
    """Rank 0, after every rank is done: the ranks' rows into evals.jsonl in checkpoint,
    then task order; evals.csv and evals.png from all rows."""
    order = {os.path.basename(os.path.normpath(p)): i
             for i, p in enumerate(checkpoints_to_evaluate(run_dir))}
    new = [r for p in sorted(glob.glob(os.path.join(run_dir, "evals.rank*.jsonl")))
           for r in read_jsonl(p)]
    new.sort(key=lambda r: (order.get(r["checkpoint"], len(order)), tasks.index(r["task"])
                            # stable: a task's metrics keep their order
                            if r["task"] in tasks else len(tasks)))
    with open(out_path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in new)
        f.flush()
        os.fsync(f.fileno())
    for p in glob.glob(os.path.join(run_dir, "evals.rank*.jsonl")):
        os.remove(p)
    # the table's values
    rows = [{k: v for k, v in r.items() if k != "items"} for r in iter_jsonl(out_path)]
    write_table(run_dir, rows)
    emergence.write(run_dir)
    return rows


def column(r):
    """A result's column in evals.csv: task/metric, and "@limitN" for a score of the first N
    rows only, so that it is never drawn beside full scores as one of them."""
    return f"{r['task']}/{r['metric']}" + (f"@limit{r['limit']}" if r.get("limit") else "")


def write_table(run_dir, rows):
    """evals.csv (checkpoint x task/metric, each mean with its standard error beside it as
    task/metric:stderr; the newest result of each) and evals.png (plot.py)."""
    if not rows:
        return
    bold.write_table(run_dir, rows)
    rows = [r for r in rows if not r.get("group")]  # BOLD's groups: bold.csv, not a column each
    keys = sorted({column(r) for r in rows})
    with_err = {column(r) for r in rows if r.get("stderr") is not None}
    keys = [c for k in keys for c in ([k, f"{k}:stderr"] if k in with_err else [k])]
    ckpts = list(dict.fromkeys(r["checkpoint"] for r in rows))
    table = {(r["checkpoint"], column(r)): r["value"] for r in rows}
    table |= {(r["checkpoint"], f"{column(r)}:stderr"): r["stderr"] for r in rows
              if r.get("stderr") is not None}
    tokens = {r["checkpoint"]: r["tokens"] for r in rows}
    lines = [",".join(["checkpoint", "tokens"] + keys)]
    lines += [",".join([c, str(tokens[c])] + [f"{table[(c, k)]:.6g}" if (c, k) in table else ""
                                              for k in keys])
              for c in ckpts]
    write_text_atomic(os.path.join(run_dir, "evals.csv"), "\n".join(lines) + "\n")
    plot_evals(run_dir)


# -----------------------------------------------------------------------------
# lm-evaluation-harness adapter


def generate_until(model, tok, context, kwargs):
    """One greedy continuation as lm_eval's HFLM writes it: the context encoded as its
    tokenizer does (BOS in front only where add_bos_token says; no EOS prefix), cut from
    the left to max_seq_len - max_gen_toks tokens, decoding stopped at EOS, the text cut at
    the first stop string (`until`, and EOS's own text). Greedy only, as every task of the
    harness that generates asks (do_sample false, temperature 0)."""
    if kwargs.get("do_sample") or kwargs.get("temperature", 0.0):
        raise EvalError(f"generate_until with {kwargs}: the adapter decodes greedily only")
    until = kwargs.get("until")
    until = [until] if isinstance(until, str) else list(until or [])
    eos = (tok.sp.id_to_piece(tok.eos_id) if tok.kind == "sentencepiece"
           else tok.decode([tok.eos_id]))
    until += [] if eos in until else [eos]
    max_gen = next((kwargs[k] for k in ("max_gen_toks", "max_new_tokens", "max_tokens")
                    if k in kwargs), 256)
    keep = model.config.max_seq_len - max_gen
    if keep <= 0:
        raise EvalError(f"max_gen_toks={max_gen} must be below the model's context of "
                        f"{model.config.max_seq_len}")
    ids = (([tok.prefix_id] if tok.add_bos else [])
           + tok.encode(context))[-keep:] or [tok.prefix_id]
    out = model.generate(torch.tensor([ids], device=model.tok_emb.weight.device),
                         max_gen)[0, len(ids):].tolist()
    text = tok.decode(out[: out.index(tok.eos_id)] if tok.eos_id in out else out)
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


@functools.cache
def register_lm_eval():
    """Register model "llm360" with lm_eval (optional dependency); once per process."""
    try:
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model
    except ImportError:
        raise EvalError("the lm_eval adapter needs lm-evaluation-harness: pip install -r "
                        "requirements-eval.txt") from None

    # lm_eval passes model_args="checkpoint=PATH": the parameter hides the module
    load = checkpoint.load

    @register_model("llm360")
    class LLM360LM(LM):
        def __init__(self, checkpoint=None, device="cpu", loaded=None, **kwargs):
            super().__init__()  # loaded: (model, tokenizer) already in memory (the sweep's)
            self.model, self.tok = loaded or load(checkpoint, device)[:2]

        def loglikelihood(self, requests, disable_tqdm=False):
            return loglikelihoods(self.model, self.tok, [r.args for r in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            out = []
            for r in requests:
                loss, _ = perplexity_text(self.model, self.tok, r.args[0])
                n = len(self.tok.encode(r.args[0]))
                out.append(-loss * n)
            return out

        def generate_until(self, requests, disable_tqdm=False):
            return [generate_until(self.model, self.tok, *r.args) for r in requests]

    return LLM360LM


@functools.cache
def harness_manager(tasks_dir):
    """lm_eval's TaskManager over its own tasks and the YAMLs of tasks_dir (its include_path),
    built once a process: it indexes thousands of YAML files."""
    register_lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=tasks_dir) if tasks_dir else TaskManager()


def harness_config(name, tasks_dir):
    """(the TaskManager, the resolved config of its task `name`)."""
    manager = harness_manager(tasks_dir)
    entry = manager.task_index.get(name)
    if entry is None or entry.cfg is None:
        close = difflib.get_close_matches(name, list(manager.task_index), n=3)
        raise EvalError(f"lm_eval:{name}: no such task of lm-evaluation-harness"
                        + (f"; did you mean {', '.join(close)}?" if close else ""))
    return manager, entry.cfg


def harness_sha(name, tasks_dir):
    """sha256 of what a harness task's scores depend on: its resolved config, and the local
    data files it names (a task whose dataset_path points at files of one's own)."""
    cfg = harness_config(name, tasks_dir)[1]
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    files = (cfg.get("dataset_kwargs") or {}).get("data_files") or {}
    for path in sorted(files.values() if isinstance(files, dict) else [files]):
        if isinstance(path, str) and os.path.isfile(path):
            h.update(sha256_file(path).encode())
    return h.hexdigest()


def harness_task(model, tok, name, tasks_dir):
    """Result rows of a task of lm-evaluation-harness, scored by simple_evaluate through the
    adapter on the model in memory: its metrics with the harness's standard errors (100
    bootstrap iterations where it bootstraps), and each document's value as items."""
    import lm_eval

    manager, _ = harness_config(name, tasks_dir)
    out = lm_eval.simple_evaluate(model=register_lm_eval()(loaded=(model, tok)), tasks=[name],
                                  task_manager=manager, log_samples=True, bootstrap_iters=100)
    results = out["results"][name]
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    rows = []
    for key, value in results.items():
        metric, _, kind = key.partition(",")
        if metric.endswith("_stderr") or isinstance(value, (str, bool)) or not kind:
            continue
        stderr = results.get(f"{metric}_stderr,{kind}")
        rows.append({"metric": metric if kind == "none" else f"{metric},{kind}",
                     "value": float(value), "n": len(samples),
                     "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                     "items": [float(s[metric]) for s in samples] if samples
                     and isinstance(samples[0].get(metric), (int, float)) else None})
    return rows


# -----------------------------------------------------------------------------


def _whole_number(text, what):
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise EvalError(f"{what}={text!r}: give a whole number >= 1")
    return int(text)


def main(argv):
    if not argv or argv[0].startswith("--"):
        sys.exit("usage: python evaluate.py RUN_DIR --tasks=ppl,arc_challenge,... [--task_dir=DIR] "
                 "[--checkpoints=a,b] [--limit=N] [--text=FILE] [--device=cpu] "
                 "[--allow_code_execution=True] [--samples=N --temperature=0.8] "
                 "[--lm_eval_tasks_dir=DIR]   (--tasks=lm_eval:NAME: any harness task)")
    with one_line_errors():
        opts = parse_options(argv[1:], {"tasks": str, "task_dir": str, "checkpoints": str,
                                        "limit": str, "text": str, "device": torch_device,
                                        "allow_code_execution": as_bool, "samples": int,
                                        "temperature": float, "lm_eval_tasks_dir": str},
                             EvalError)
        # one process: rank 0 of 1, on a GPU if there is one
        rank, world_size, device = init_distributed()
        sweep(argv[0], opts.get("tasks", "ppl").split(","), opts.get("task_dir"),
              checkpoints=opts["checkpoints"].split(",") if "checkpoints" in opts else None,
              limit=_whole_number(opts["limit"], "--limit") if "limit" in opts else None,
              text=opts.get("text"), device=opts.get("device", device), rank=rank,
              world_size=world_size, allow_code_execution=opts.get("allow_code_execution", False),
              samples=opts.get("samples", 1), temperature=opts.get("temperature", 0.8),
              lm_eval_tasks_dir=opts.get("lm_eval_tasks_dir"))


if __name__ == "__main__":
    main(sys.argv[1:])
