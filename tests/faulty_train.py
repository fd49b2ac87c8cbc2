"""train.py with faults injected from outside, for the tests: the product has no hooks.

    LLM360_FAULT="step:N"     SIGKILL after optimizer step N (its metrics line written)
    LLM360_FAULT="save:N"     SIGKILL in the middle of writing this process's N-th checkpoint:
                              its files written, not yet hashed, described or renamed
    LLM360_FAULT="sigterm:K"  SIGTERM to itself in the K-th forward pass (in the middle of a step)
    LLM360_FAULT="sigterm_in_save"  SIGTERM to itself in the middle of writing every checkpoint
    LLM360_NAN_CHUNKS="1,2"   the training loss of these chunks is NaN wherever the schedule puts them
    LLM360_HASH_LOG=PATH      append "RANK FILE" to PATH for each data file whose sha256 a rank computes
    LLM360_ROPE_LOG=PATH      append "RANK COS_DTYPE SIN_DTYPE" to PATH for each rotary call in training

    python tests/faulty_train.py CONFIG [--key=value ...]    (or under torchrun, like train.py)
    LLM360_MAIN=finetune python tests/faulty_train.py CONFIG   the same faults in finetune.py
"""

import os
import signal
import sys

import checkpoint
import data
import step
import train


def die():
    os.kill(os.getpid(), signal.SIGKILL)


kind, _, n = os.environ.get("LLM360_FAULT", "").partition(":")
if kind == "step":
    log_metric = train.RunLog.metric

    def metric_then_die(self, record):
        log_metric(self, record)
        if "loss" in record and record["step"] == int(n):  # a training step's line, not a validation line
            die()

    train.RunLog.metric = metric_then_die
elif kind == "save":
    hash_files, saves = checkpoint.hash_files, [0]

    def die_on_nth_save(folder, *args, **kwargs):
        if str(folder).endswith(".tmp"):  # a checkpoint being written, not one being verified
            saves[0] += 1
            if saves[0] == int(n):
                die()
        return hash_files(folder, *args, **kwargs)

    checkpoint.hash_files = die_on_nth_save

elif kind == "sigterm":
    forward, calls = step.lm_objective, [0]

    def objective_then_term(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(n) and os.environ.get("RANK", "0") == os.environ.get("LLM360_FAULT_RANK", "0"):
            os.kill(os.getpid(), signal.SIGTERM)  # under torchrun: to one rank only (LLM360_FAULT_RANK, default 0)
        return forward(*args, **kwargs)

    step.lm_objective = objective_then_term
elif kind == "sigterm_in_save":
    hash_files = checkpoint.hash_files

    def term_while_saving(folder, *args, **kwargs):
        if str(folder).endswith(".tmp"):
            os.kill(os.getpid(), signal.SIGTERM)
        return hash_files(folder, *args, **kwargs)

    checkpoint.hash_files = term_while_saving

nan_chunks = {int(c) for c in os.environ.get("LLM360_NAN_CHUNKS", "").split(",") if c}
if nan_chunks:
    reading, reader_init, objective = {}, data.ChunkReader.__init__, step.lm_objective

    def init_and_note(self, data_dir, chunk, *args, **kwargs):
        reading["chunk"] = chunk
        reader_init(self, data_dir, chunk, *args, **kwargs)

    def diverging(*args, **kwargs):
        loss, stats = objective(*args, **kwargs)
        return (loss * float("nan") if reading.get("chunk") in nan_chunks else loss), stats

    data.ChunkReader.__init__ = init_and_note
    step.lm_objective = diverging

if os.environ.get("LLM360_HASH_LOG"):
    sha256_file = data.sha256_file

    def logged_sha256(path, *args, **kwargs):
        with open(os.environ["LLM360_HASH_LOG"], "a") as f:
            f.write(f"{os.environ.get('RANK', '0')} {os.path.basename(path)}\n")
        return sha256_file(path, *args, **kwargs)

    data.sha256_file = logged_sha256

if os.environ.get("LLM360_ROPE_LOG"):
    import model

    apply_rope = model.apply_rope

    def logged_rope(x, cos, sin):
        if x.requires_grad:  # training, not generation
            with open(os.environ["LLM360_ROPE_LOG"], "a") as f:
                f.write(f"{os.environ.get('RANK', '0')} {cos.dtype} {sin.dtype} {x.dtype}\n")
        return apply_rope(x, cos, sin)

    model.apply_rope = logged_rope

if __name__ == "__main__":
    if os.environ.get("LLM360_MAIN") == "finetune":
        import finetune

        finetune.main(sys.argv[1:])
    else:
        train.cli(sys.argv[1:])
