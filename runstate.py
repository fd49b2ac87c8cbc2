"""
The run's state: where a run stands, as the loop keeps it and every checkpoint's
state.json holds it. One plain dict (JSON as it is), made here and nowhere else:

    key                    set by                 what it holds
    step, tokens           the loop               optimizer steps and tokens trained so far
    pos                    the loop               the schedule position: chunks done (or skipped)
    schedule               new_state, a branch    the chunk (by its index in the run's chunk
                                                  table) trained at each position
    skipped                the loop               [{chunk, pos, step, reason}]: chunks skipped
                                                  for a non-finite loss
    reader                 a mid-chunk save       the reader's place inside the chunk, or None
    total_steps            new_state              the LR schedule's length (lr_steps, or the
                                                  steps of every planned chunk)
    data_manifest_sha256   new_state, a branch    the data the schedule indexes
    finished               the loop               the schedule's end was reached
    metrics_lines,         a save                 the metrics.jsonl lines up to this state
    metrics_sha256
    config, world_size,    checkpoint.py          written with the checkpoint: the resolved
    files, state_sha256,                          config, the ranks, every file's size and
    format_version                                sha256, state.json's own digest, the format

A state.json of an older format is brought to this shape by upgraded(), the one place
that knows the older formats.
"""

import data
from config import saved_config

FORMAT_VERSION = 2  # state.json's format; 1 (no version): written before the integrity fields
INTEGRITY = ("files", "state_sha256", "metrics_lines", "metrics_sha256", "total_steps")


def planned_steps(table, global_batch_size):
    """The steps of every planned chunk: the LR schedule's length unless lr_steps says
    otherwise (a replacement chunk fills the steps of a skipped one)."""
    return sum(data.chunk_steps(m, c, global_batch_size) for _, m, c in table)


def new_state(cfg, table, data_sha, *, step=0, tokens=0, pos=0):
    """The state of a run that starts: every chunk of its table in order, nothing trained
    (or, for a branch from a Hugging Face folder, the place it starts at)."""
    return {"step": step, "tokens": tokens, "pos": pos, "schedule": list(range(len(table))),
            "skipped": [], "reader": None, "data_manifest_sha256": data_sha,
            "metrics_lines": 0,
            "total_steps": cfg.lr_steps or planned_steps(table, cfg.global_batch_size)}


def upgraded(state):
    """A state of an older format in the current one's shape, where what it lacks can be
    derived: format 1 recorded no total_steps, so it is planned again from its config's
    data. The digests it never recorded stay absent (checkpoint.integrity_problems and
    verify know format 1)."""
    if state.get("format_version", 1) < 2 and "total_steps" not in state:
        cfg = saved_config(state["config"])
        table = data.chunk_table(data.stage_dirs(cfg))
        state["total_steps"] = cfg.lr_steps or planned_steps(table, cfg.global_batch_size)
    return state
