"""
Text from a checkpoint, as nanoGPT's sample.py: the prompt, then what the model
writes after it, printed token by token as it comes.

    python sample.py CKPT_DIR --prompt="def fib(n):" [--max_new_tokens=200] [--temperature=0.8]
        [--top_k=200] [--seed=1337] [--device=cuda|cpu] [--chat=True] [--trace=True --min_len=8]

CKPT_DIR is a checkpoint of ours (runs/tiny/ckpt_007) or a Hugging Face folder with
a tokenizer.model (one of AMBER's, or an export). The prompt follows EOS, the start
of a document as in training (a Hugging Face folder's BOS if it has one).
temperature=0 is greedy; --chat=True wraps the prompt in the Vicuna v1.1 template
that finetune.py trains with. --trace=True then lists the spans of the output of at
least --min_len (8) tokens that occur verbatim in the training data the checkpoint had
seen, with the last step that trained one (OLMoTrace's view; `python tracing.py index
RUN_DIR` first).
"""

import math
import os
import sys

import torch

import checkpoint
import data
from common import UserError, as_bool, one_line_errors, parse_options
from config import Config
from machine import torch_device

OPTIONS = {"prompt": str, "max_new_tokens": int, "temperature": float, "top_k": int, "seed": int,
           "device": str, "chat": as_bool, "trace": as_bool, "min_len": int}


def check_sampling(max_new_tokens, temperature, top_k, min_len):
    """What sampling cannot do is a one-line error, never a traceback or a silently odd result
    (a negative temperature would sample the inverted distribution)."""
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens={max_new_tokens}: give at least 1")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"temperature={temperature}: give a number >= 0 (0: greedy)")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k={top_k}: give at least 1 (the vocabulary size keeps every token)")
    if min_len < 1:
        raise UserError(f"min_len={min_len}: give at least 1")


def sample_text(ckpt_dir, prompt="", *, max_new_tokens=200, temperature=0.8, top_k=200, seed=1337,
                device=None, out=None, chat=False, trace=False, min_len=8):
    """Write the prompt and what the checkpoint writes after it to `out` (default stdout),
    piece by piece, until EOS or max_new_tokens; return the new text. trace=True then lists
    the spans of the new text (min_len tokens or more) that occur verbatim in the training
    data the checkpoint had seen (its run's index, `python tracing.py index RUN_DIR`)."""
    check_sampling(max_new_tokens, temperature, top_k, min_len)
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes of another encoding, passed through by the shell
        raise UserError("--prompt is not valid UTF-8 text; give it in UTF-8") from None
    # a GPU when there is one
    device = torch_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if chat:
        prompt = data.chat_turn(prompt, Config().system_prompt)
    out = sys.stdout if out is None else out
    model, tok, _ = checkpoint.load(ckpt_dir, device)
    if max_new_tokens >= model.config.max_seq_len:
        raise UserError(f"max_new_tokens={max_new_tokens} must be below the model's context of "
                        f"{model.config.max_seq_len} tokens")
    ids = ([tok.prefix_id] + tok.encode(prompt))[-(model.config.max_seq_len - max_new_tokens):]
    g = torch.Generator(device=device).manual_seed(seed)
    printed, new = tok.decode(ids), []
    out.write(prompt)
    for t in model.stream(torch.tensor([ids], device=device), max_new_tokens, temperature, top_k,
                          g):
        if int(t) == tok.eos_id:
            break
        new.append(int(t))
        text = tok.decode(ids + new)
        if not text.endswith("\ufffd"):  # wait for the rest of a character split over byte tokens
            out.write(text[len(printed):])
            out.flush()
            printed = text
    out.write(tok.decode(ids + new)[len(printed):] + "\n")
    if trace:
        for start, end, n, last in traced_spans(ckpt_dir, new, min_len):
            out.write(f"  [{n} in the training data, last trained at step {last}] "
                      f"{tok.decode(new[start:end])!r}\n")
    return tok.decode(ids + new)[len(tok.decode(ids)):]


def traced_spans(ckpt_dir, ids, min_len=8, max_rows=100):
    """[(start, end, occurrences, the last step up to the checkpoint's that trained one)] of
    the maximal spans of ids found in the run's training data (at most max_rows rows
    looked at for the step)."""
    import index

    state = checkpoint.read_state(ckpt_dir)
    if state is None:
        raise UserError(f"--trace=True needs a checkpoint of a run (state.json): {ckpt_dir} has "
                        "none")
    found = index.Index(os.path.dirname(os.path.abspath(ckpt_dir)))
    out = []
    for start, end, n in found.spans(ids, min_len):
        rows, _ = found.occurrences(ids[start:end], limit=max_rows)
        steps = [t["step"] for c, r, _ in rows for t in found.trained(c, r)
                 if t["step"] <= state["step"]]
        if steps:
            out.append((start, end, n, max(steps)))
    return out


def main(argv):
    if not argv or argv[0].startswith("--"):
        sys.exit(__doc__.strip().split("\n\n")[1])
    with one_line_errors():
        sample_text(argv[0], **parse_options(argv[1:], OPTIONS))


if __name__ == "__main__":
    main(sys.argv[1:])
