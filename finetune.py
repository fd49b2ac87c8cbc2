"""
Post-training a checkpoint, as the paper released AmberChat (SFT) and AmberSafe (DPO).

    python finetune.py configs/chat_tiny.py       SFT of the main job's last checkpoint
    python finetune.py configs/safe_tiny.py       DPO of that SFT model
    python finetune.py configs/amberchat.py       the paper's recipes, from AMBER's release
    python finetune.py configs/ambersafe.py

This file only turns conversations or preference pairs into a data dir, and then hands
the run to train.py: one process, DDP or FSDP2, checkpoints with AdamW
state, exact resume, metrics, the NaN policy, all as in pre-training. What is different:

  - the model's shape and tokenizer come from `init_from` (a checkpoint of ours or a
    Hugging Face folder such as AMBER's), whose weights start the run with a fresh AdamW
    (init_optimizer = False);
  - SFT renders each conversation with FastChat's Vicuna v1.1 template, the one
    AmberChat was trained with, and counts the loss on the assistant's tokens only
    (its replies and the EOS closing each); the rest is stored as -(id + 1), which
    data.rows_to_xy feeds as input with no target. One conversation a row, padded:
    packing would let a reply attend to another conversation. A conversation longer
    than seq_len + 1 keeps its first whole turns, never half of one;
  - DPO (objective = "dpo") stores each pair as one row, [chosen | rejected], the prompt
    uncounted; the reference is the starting checkpoint, frozen (step.dpo_objective);
  - each epoch is one chunk (the same rows, shuffled by (seed, epoch)), so each ends in
    a checkpoint, and the held-out examples are the validation split, scored before
    the first step too.

Data (finetune_data): ShareGPT / WizardLM JSON (`conversations: [{from, value}]`),
Alpaca (`instruction`, `input`, `output`), pairs `{prompt, chosen, rejected}`, SafeRLHF
(`prompt`, `response_0`, `response_1`, `safer_response_id`) and Anthropic HH (`chosen`,
`rejected` dialogues), from .json, .jsonl or .parquet; or "builtin:stdlib": made offline
from the standard library (see builtin_examples).
"""

import ast
import hashlib
import json
import os
import random
import sys
import sysconfig
from dataclasses import replace

import numpy as np

import checkpoint
import data
import train
from common import UserError, dir_lock, hold_lock, one_line_errors, sha256_file, write_json_atomic
from config import load_config
from data import chat_turn

ROLE_OF = {"human": 0, "user": 0, "gpt": 1, "assistant": 1, "chatgpt": 1, "bing": 1, "bard": 1}


class FinetuneError(UserError):
    pass


# -----------------------------------------------------------------------------
# the template and the loss mask


def sft_row(tok, system, turns, length):
    """(ids, counted) of one conversation in a row of at most `length` tokens: EOS (the start
    of a document, uncounted), then per turn the prompt part (uncounted) and the reply with
    its EOS (counted). Each part is tokenized on its own; SentencePiece's leading "▁" stands
    for the space before each part. Turns that do not fit whole are left out, with all
    after them; None if not even the first fits."""
    ids, counted = [tok.eos_id], [False]
    for i, (q, a) in enumerate(turns):
        prompt = chat_turn(q, system if i == 0 else "")
        p, r = tok.encode(prompt), tok.encode(a) + [tok.eos_id]
        if len(ids) + len(p) + len(r) > length:
            break
        ids += p + r
        counted += [False] * len(p) + [True] * len(r)
    return (ids, counted) if len(ids) > 1 else None


def pair_rows(tok, system, prompt, chosen, rejected, length):
    """(ids, counted) of the chosen and of the rejected response after the same prompt,
    each a row of at most `length` tokens; None if either does not fit."""
    p = [tok.eos_id] + tok.encode(chat_turn(prompt, system))
    out = []
    for response in (chosen, rejected):
        r = tok.encode(response) + [tok.eos_id]
        if len(p) + len(r) > length:
            return None
        out.append((p + r, [False] * len(p) + [True] * len(r)))
    return out


def encode_row(ids, counted, length, pad_id):
    """Signed int32 row of `length`: counted tokens as ids, the others as -(id + 1), padding
    after."""
    row = np.full(length, -(pad_id + 1), dtype=np.int32)
    ids = np.asarray(ids, dtype=np.int32)
    row[: len(ids)] = np.where(counted, ids, -(ids + 1))
    return row


# -----------------------------------------------------------------------------
# reading conversations and pairs


def read_records(path):
    """(where, record) of each record of a .jsonl (line by line), .parquet (batch by batch)
    or .json file (one list, or one object: read whole); a record is a JSON object."""
    if path.endswith(".parquet"):
        import pyarrow.parquet

        try:
            batches = pyarrow.parquet.ParquetFile(path).iter_batches(1024)
        except Exception as e:  # pyarrow's errors are its own classes
            raise FinetuneError(f"{path}: not a readable parquet file "
                                f"({str(e).splitlines()[0][:120]})") from None
        i = 0
        for batch in batches:
            for rec in batch.to_pylist():
                yield f"{path} row {i}", rec
                i += 1
        return
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                for n, line in enumerate(f, 1):
                    if line.strip():
                        yield f"{path}:{n}", _json_object(line, f"{path}:{n}")
                return
            try:
                rows = json.load(f)
            except ValueError as e:
                raise FinetuneError(f"{path}: not one JSON document ({e}); JSON lines go in a "
                                    ".jsonl file") from None
    except UnicodeDecodeError as e:
        raise FinetuneError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    for i, rec in enumerate(rows if isinstance(rows, list) else [rows]):
        yield f"{path} record {i}", _json_object(rec, f"{path} record {i}")


def _json_object(item, where):
    if isinstance(item, str):
        try:
            item = json.loads(item)
        except ValueError as e:
            raise FinetuneError(f"{where}: not JSON ({e})") from None
    if not isinstance(item, dict):
        raise FinetuneError(f"{where}: a {type(item).__name__}, not a JSON object; one record per "
                            "line (or in the list)")
    return item


def _text(rec, key, where):
    if not isinstance(rec.get(key), str):
        raise FinetuneError(f"{where}: {key!r} is "
                            f"{'missing' if key not in rec else type(rec[key]).__name__}; it must "
                            "be a string")
    return rec[key]


def conversation(rec, where):
    """[(user, assistant)] of a ShareGPT / WizardLM or Alpaca record."""
    if "conversations" in rec:
        if not isinstance(rec["conversations"], list) or not all(isinstance(m, dict)
                                                                 for m in rec["conversations"]):
            raise FinetuneError(f"{where}: 'conversations' must be a list of {{from, value}} "
                                "objects")
        msgs = [m for m in rec["conversations"] if m.get("from") != "system"]
        roles = [ROLE_OF.get(str(m.get("from")).lower()) for m in msgs]
        if None in roles:
            raise FinetuneError(f"{where}: unknown speaker {msgs[roles.index(None)].get('from')!r} "
                                f"(known: {', '.join(ROLE_OF)})")
        if msgs and roles[0] == 1:
            # FastChat skips a conversation's leading assistant message
            msgs, roles = msgs[1:], roles[1:]
        if any(r != i % 2 for i, r in enumerate(roles)):
            raise FinetuneError(f"{where}: turns must alternate user, assistant")
        values = [_text(m, "value", f"{where} message {i}") for i, m in enumerate(msgs)]
        return [(values[i], values[i + 1]) for i in range(0, len(values) - 1, 2)]
    if "instruction" in rec and "output" in rec:
        q = _text(rec, "instruction", where)
        extra = rec.get("input") and _text(rec, "input", where)
        return [(q + (f"\n\n{extra}" if extra else ""), _text(rec, "output", where))]
    raise FinetuneError(f"{where}: neither ShareGPT (conversations) nor Alpaca (instruction, "
                        "output)")


def preference(rec, where):
    """(prompt, chosen, rejected) of a pair record: plain, SafeRLHF or Anthropic HH; a pair
    whose two responses are the same text is refused (its DPO gradient is zero: it would
    train nothing, silently)."""
    prompt, chosen, rejected = _pair(rec, where)
    if chosen.strip() == rejected.strip():
        raise FinetuneError(f"{where}: chosen and rejected are the same response; a preference "
                            "pair needs two different ones: fix or remove the pair")
    return prompt, chosen, rejected


def _pair(rec, where):
    if {"prompt", "chosen", "rejected"} <= set(rec):
        return tuple(_text(rec, k, where) for k in ("prompt", "chosen", "rejected"))
    if {"prompt", "response_0", "response_1"} <= set(rec):
        better = rec.get("safer_response_id", rec.get("better_response_id"))
        if better not in (0, 1):
            raise FinetuneError(f"{where}: SafeRLHF pair without safer_response_id / "
                                "better_response_id")
        return tuple(_text(rec, k, where) for k in ("prompt", f"response_{better}",
                                                    f"response_{1 - better}"))
    # HH: two dialogues that differ in the last assistant turn
    if {"chosen", "rejected"} <= set(rec):
        _text(rec, "chosen", where), _text(rec, "rejected", where)
        cut = rec["chosen"].rfind("\n\nAssistant:")
        if cut < 0 or not rec["rejected"].startswith(rec["chosen"][:cut + 12]):
            raise FinetuneError(f"{where}: HH pair whose dialogues do not share the turns before "
                                "the last reply")
        prompt = rec["chosen"][:cut].replace("\n\nHuman: ",
                                             "\n").replace("\n\nAssistant: ", "\n").strip()
        return prompt, rec["chosen"][cut + 12 :].strip(), rec["rejected"][cut + 12 :].strip()
    raise FinetuneError(f"{where}: not a preference pair (prompt, chosen, rejected; SafeRLHF; or "
                        "HH)")


# -----------------------------------------------------------------------------
# the laptop default: made from the standard library, offline


def builtin_examples(seed, limit=3000):
    """SFT conversations and DPO pairs from what Python installs. SFT: "Write a function
    `name(args)` that ..." (its docstring's first paragraph) answered by the function's
    source, and questions on the pydoc topics answered by their first paragraph. DPO: the
    same instructions, chosen = the true function, rejected = another function's body
    under this one's signature, or the true one with each `return` made `return None`."""
    import pydoc_data.topics

    root = sysconfig.get_paths()["stdlib"]
    funcs = []
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py") or name.startswith("_"):
            continue
        with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
            source = f.read()
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):  # functions and methods
            doc = ast.get_docstring(node) if isinstance(node, ast.FunctionDef) else None
            if not doc or node.name.startswith("_") or not 3 <= node.end_lineno - node.lineno <= 14:
                continue
            code = ast.get_source_segment(source, node)
            if code and node.col_offset:  # a method: its lines lose the class body's indent
                pad = node.col_offset
                code = "\n".join([code.split("\n")[0]] + [line[pad:] if not line[:pad].strip()
                                                          else line
                                                          for line in code.split("\n")[1:]])
            if code and "return" in code:
                args = ast.unparse(node.args)
                funcs.append((f"{name[:-3]}.{node.name}", f"{node.name}({args})",
                              doc.split("\n\n")[0][:300], code))
    random.Random(seed).shuffle(funcs)
    funcs = funcs[:limit]
    sft = [[(f"Write a Python function `{sig}` that does this: {doc}", code)]
           for _, sig, doc, code in funcs]
    topics = pydoc_data.topics.topics
    sft += [[(f"What does the Python documentation say about {t.replace('-', ' ')}?",
              topics[t].strip().split("\n\n")[0][:800])] for t in sorted(topics)]
    pairs = []
    for i, (_, sig, doc, code) in enumerate(funcs):
        header, body = code.split("\n", 1) if "\n" in code else (code, "")
        if i % 2:
            other = funcs[(i + 1) % len(funcs)][3]
            wrong = header + "\n" + (other.split("\n", 1)[1] if "\n" in other
                                     else "    return None")
        else:
            wrong = "\n".join(line.split("return")[0] + "return None"
                              if line.strip().startswith("return ") else line
                              for line in code.split("\n"))
        if wrong != code:
            pairs.append((f"Write a Python function `{sig}` that does this: {doc}", code, wrong))
    return sft, pairs


# -----------------------------------------------------------------------------
# the data dir


def base_of(init_from):
    """(ModelConfig, Tokenizer) of the checkpoint fine-tuning starts from: ours, or a
    Hugging Face folder with a tokenizer.model."""
    if not checkpoint.kind(init_from):
        raise FinetuneError(f"init_from={init_from!r} is neither a checkpoint of ours (state.json) "
                            "nor a Hugging Face folder (config.json); fine-tuning starts from one")
    return checkpoint.model_config(init_from), checkpoint.load_tokenizer(init_from)


def prepare(cfg, tok, val_fraction=0.1):
    """Write cfg.data_dir: the fine-tuning rows (train and held-out) and a manifest that train.py
    reads like any other, with one chunk per epoch. Nothing to do when it holds this data
    already; another data dir's contents are refused."""
    L = cfg.seq_len + 1
    what = {"objective": cfg.objective, "finetune_data": cfg.finetune_data, "seq_len": cfg.seq_len,
            "seed": cfg.seed, "epochs": cfg.epochs, "system_prompt": cfg.system_prompt,
            "tokenizer_sha256": hashlib.sha256(tok.blob).hexdigest(), "val_fraction": val_fraction}
    if cfg.finetune_data and not cfg.finetune_data.startswith("builtin:"):
        what["data_sha256"] = sha256_file(cfg.finetune_data)
    hold_lock(dir_lock(cfg.data_dir), "finetune.py preparing it")
    path = os.path.join(cfg.data_dir, "manifest.json")
    if os.path.exists(path):
        if data.load_manifest(cfg.data_dir).get("config") == what:
            return
        raise FinetuneError(f"{cfg.data_dir} holds other data than this config makes; remove it or "
                            "set another data_dir")
    if cfg.finetune_data == "builtin:stdlib":
        sft, pairs = builtin_examples(cfg.seed)
        examples = pairs if cfg.objective == "dpo" else sft
    elif cfg.finetune_data.startswith("builtin:") or not cfg.finetune_data:
        raise FinetuneError(f"finetune_data={cfg.finetune_data!r}: give a file, or "
                            "'builtin:stdlib'")
    else:
        read = preference if cfg.objective == "dpo" else conversation
        examples = (read(rec, where) for where, rec in read_records(cfg.finetune_data))
    # renamed into place when complete
    with data.staging(cfg.data_dir, "finetune.py preparing it") as tmp:
        # every example rendered, straight to a file: memory stays flat as the data grows
        rows = data.NpyAppender(os.path.join(tmp, "all.npy"), np.int32,
                                (2 * L if cfg.objective == "dpo" else L,))
        n_examples = dropped = 0
        for ex in examples:
            n_examples += 1
            if cfg.objective == "dpo":
                pair = pair_rows(tok, cfg.system_prompt, *ex, L)
                row = None if pair is None else np.concatenate([encode_row(*p, L, tok.eos_id)
                                                                for p in pair])
            else:
                one = sft_row(tok, cfg.system_prompt, ex, L)
                row = None if one is None else encode_row(*one, L, tok.eos_id)
            if row is None:
                dropped += 1
            else:
                rows.append(row[None])
        n = rows.close()
        if n < 2:
            raise FinetuneError(f"{cfg.finetune_data}: {n_examples} example(s), {n} that fit "
                                f"seq_len={cfg.seq_len}; at least 2 are needed (one to train on, "
                                "one held out)" + (" (raise seq_len)" if dropped
                                                                                           else ""))
        # the held-out share and the training rows, each in file order, copied a block at a time
        order = np.random.default_rng(cfg.seed).permutation(n)
        n_val = max(1, int(n * val_fraction))
        every = np.load(os.path.join(tmp, "all.npy"), mmap_mode="r")
        entries = {}
        for split, idx in (("train", np.sort(order[n_val:])), ("val", np.sort(order[:n_val]))):
            out = data.NpyAppender(os.path.join(tmp, f"{split}.npy"), np.int32, every.shape[1:])
            counted = 0
            for block in np.array_split(idx, max(1, len(idx) // 1024)):
                part = every[block]
                counted += int((part[:, 1:] >= 0).sum())
                out.append(part)
            out.close()
            sha = sha256_file(os.path.join(tmp, f"{split}.npy"))
            src_sha = data.write_npy(os.path.join(tmp, f"{split}.src.npy"),
                                     np.zeros(len(idx), dtype=np.uint8))
            entries[split] = data.chunk_entry(split, sha256=sha, sources_sha256=src_sha,
                                              sequences=len(idx),
                                              tokens_per_source={"finetune": counted})
        del every
        os.remove(os.path.join(tmp, "all.npy"))
        with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
            f.write(tok.blob)
        train_n = entries["train"]["sequences"]
        manifest = data.new_manifest(
            config=what, tokenizer={"kind": "sentencepiece", "file": "tokenizer.model",
                                    "sha256": what["tokenizer_sha256"],
                                    "vocab_size": tok.vocab_size, "eos_id": tok.eos_id},
            seed=cfg.seed, seq_len=cfg.seq_len, dtype="int32",
            row="chosen | rejected, seq_len + 1 tokens each" if cfg.objective == "dpo"
            else "one conversation",
            sources=[{"name": "finetune", "id": 0, "origin": cfg.finetune_data,
                      "license": "see the data's own", "format": cfg.objective,
                      "weight": cfg.epochs, "documents": n_examples, "dropped_too_long": dropped,
                      "train_sequences": train_n,
                      "train_tokens": entries["train"]["tokens_per_source"]["finetune"]}],
            chunks=[entries["train"]] * cfg.epochs,  # one per epoch, shuffled by (seed, epoch)
            val=entries["val"])
        write_json_atomic(os.path.join(tmp, "manifest.json"), manifest)
    print(f"{cfg.data_dir}: {train_n} training and {n_val} held-out "
          f"{'pairs' if cfg.objective == 'dpo' else 'conversations'} ({dropped} longer than "
          f"seq_len {cfg.seq_len} left out)")


def finetune_config(argv):
    """The config file's run, with the model shape of its init_from checkpoint."""
    cfg = load_config(argv)
    if not cfg.init_from:
        raise FinetuneError("finetune.py needs init_from: the checkpoint to fine-tune (ours or a "
                            "Hugging Face folder)")
    model_cfg, tok = base_of(cfg.init_from)
    if cfg.seq_len > model_cfg.max_seq_len:
        raise FinetuneError(f"seq_len={cfg.seq_len} is longer than the model's "
                            f"max_seq_len={model_cfg.max_seq_len}")
    return replace(cfg, model=model_cfg, n_chunks=cfg.epochs), tok


def main(argv):
    with one_line_errors():
        cfg, tok = finetune_config(argv)
        # under torchrun, rank 0 builds the data; the others wait for it
        if int(os.environ.get("RANK", "0")) == 0:
            prepare(cfg, tok)
        else:
            import time

            while not os.path.exists(os.path.join(cfg.data_dir, "manifest.json")):
                time.sleep(0.5)
        train.main(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
