"""
Text from a checkpoint, as nanoGPT's sample.py: the prompt, then what the model
writes after it, printed token by token as it comes.

    python sample.py CKPT_DIR --prompt="def fib(n):" [--max_new_tokens=200] [--temperature=0.8]
                     [--top_k=200] [--seed=1337] [--device=cpu] [--chat=True]

CKPT_DIR is a checkpoint of ours (runs/tiny/ckpt_007) or a Hugging Face folder with
a tokenizer.model (one of AMBER's, or an export). The prompt follows EOS, the start
of a document as in training (a Hugging Face folder's BOS if it has one).
temperature=0 is greedy; --chat=True wraps the prompt in the Vicuna v1.1 template
that finetune.py trains with.
"""

import sys

import torch

import checkpoint
import data
from common import UserError, one_line_errors, parse_options
from config import Config

OPTIONS = {"prompt": str, "max_new_tokens": int, "temperature": float, "top_k": int, "seed": int, "device": str,
           "chat": lambda v: v == "True"}


def sample_text(ckpt_dir, prompt, max_new_tokens=200, temperature=0.8, top_k=200, seed=1337, device="cpu",
                out=None, chat=False):
    """Write the prompt and what the checkpoint writes after it to `out` (default stdout),
    piece by piece, until EOS or max_new_tokens; return the new text."""
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
    for t in model.stream(torch.tensor([ids], device=device), max_new_tokens, temperature, top_k, g):
        if int(t) == tok.eos_id:
            break
        new.append(int(t))
        text = tok.decode(ids + new)
        if not text.endswith("\ufffd"):  # wait for the rest of a character split over byte tokens
            out.write(text[len(printed):])
            out.flush()
            printed = text
    out.write(tok.decode(ids + new)[len(printed):] + "\n")
    return tok.decode(ids + new)[len(tok.decode(ids)):]


def main(argv):
    if not argv or argv[0].startswith("--"):
        sys.exit(__doc__.strip().split("\n\n")[1])
    with one_line_errors():
        opts = parse_options(argv[1:], OPTIONS)
        kw = {}
        for k, v in opts.items():
            try:
                kw[k] = OPTIONS[k](v)
            except ValueError:
                raise UserError(f"--{k}={v!r}: expected {OPTIONS[k].__name__}") from None
        sample_text(argv[0], **kw)


if __name__ == "__main__":
    main(sys.argv[1:])
