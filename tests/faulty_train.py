"""train.py with faults injected from outside, for the tests: the product has no hooks.

    LLM360_FAULT="step:N"     SIGKILL after optimizer step N (its metrics line written)
    LLM360_FAULT="save:N"     SIGKILL in the middle of writing this process's N-th checkpoint:
                              its files written, not yet hashed, described or renamed
    LLM360_NAN_CHUNKS="1,2"   the training loss of these chunks is NaN wherever the schedule puts them

    python tests/faulty_train.py CONFIG [--key=value ...]    (or under torchrun, like train.py)
"""

import os
import signal
import sys

import checkpoint
import data
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

nan_chunks = {int(c) for c in os.environ.get("LLM360_NAN_CHUNKS", "").split(",") if c}
if nan_chunks:
    reading, reader_init, objective = {}, data.ChunkReader.__init__, train.objective

    def init_and_note(self, data_dir, chunk, *args, **kwargs):
        reading["chunk"] = chunk
        reader_init(self, data_dir, chunk, *args, **kwargs)

    def diverging(*args, **kwargs):
        loss, stats = objective(*args, **kwargs)
        return (loss * float("nan") if reading.get("chunk") in nan_chunks else loss), stats

    data.ChunkReader.__init__ = init_and_note
    train.objective = diverging

if __name__ == "__main__":
    train.cli(sys.argv[1:])
