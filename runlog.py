"""
What a run writes as it goes, line by line, by rank 0: metrics.jsonl (one line per
optimizer step, plus validation lines), ledger.jsonl (events: start, resume, branch,
checkpoint, skipped chunk, preempted, finish), and, when asked, the same metrics to
Weights & Biases (one W&B run per run dir, its id kept in wandb.json).
"""

import itertools
import json
import os
import time

from common import atomic_write, read_json, write_json_atomic, writing
from config import ConfigError, config_to_dict


def first_event(out_dir):
    """The first event of a run dir's ledger: "start", or "branch" (where a branch left its
    parent), with the checkpoint format its code writes; {} when there is no ledger. Only
    the first line is read. One that is not a JSON object is a one-line error."""
    path = os.path.join(out_dir, "ledger.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        line = f.readline()
    try:
        first = json.loads(line or b"{}")
    except ValueError:
        first = None
    if not isinstance(first, dict):
        raise ConfigError(f"{path}:1: not a JSON object ({line[:40]!r}); the run dir's history is "
                          "damaged: restore it from a copy")
    return first


def _wandb_id(path):
    """The W&B run id kept in a run dir's wandb.json."""
    record = read_json(path, "remove it: the run then logs to a new W&B run")
    if not (isinstance(record, dict) and isinstance(record.get("id"), str)):
        raise ConfigError(f"{path}: no W&B run id in it; remove it: the run then logs to a new W&B "
                          "run")
    return record["id"]


class RunLog:
    """metrics.jsonl and ledger.jsonl of the run dir, written by rank 0, line by line."""

    def __init__(self, out_dir, rank):
        self.rank = rank
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        self.ledger_path = os.path.join(out_dir, "ledger.jsonl")
        self.wandb = None

    def open_wandb(self, cfg, parent_dir=None):
        """Also log to Weights & Biases (wandb_project; the paper published its metrics there).
        One W&B run per run dir, its id kept in the run dir's wandb.json: a resume logs on
        into the same W&B run; a branch is a W&B run of its own that names its parent's."""
        if self.rank != 0 or not cfg.wandb_project:
            return
        try:
            import wandb  # optional: only when asked for
        except ImportError:
            raise ConfigError("wandb_project is set and wandb is not installed: pip install wandb, "
                              "or set wandb_project=''") from None
        path = os.path.join(cfg.out_dir, "wandb.json")
        if not os.path.exists(path):
            write_json_atomic(path, {"id": os.urandom(6).hex(), "project": cfg.wandb_project})
        run_id = _wandb_id(path)
        parent = os.path.join(parent_dir, "wandb.json") if parent_dir else ""
        extra = {"wandb_parent_id": _wandb_id(parent)} if parent and os.path.exists(parent) else {}
        self.wandb = wandb.init(project=cfg.wandb_project, id=run_id, resume="allow",
                                dir=cfg.out_dir, config=config_to_dict(cfg) | extra,
                                notes=f"a branch of {parent_dir}, from {cfg.branch_from}"
                                if parent_dir else None)

    def _append(self, path, record):
        if self.rank == 0:
            with writing(path), open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()

    def metric(self, record):
        self._append(self.metrics_path, record)
        if self.wandb:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))},
                           step=record["step"])

    def event(self, event, **fields):
        self._append(self.ledger_path, {"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                        **fields})

    def truncate_metrics(self, n_lines):
        """On resume: keep the lines the checkpoint had seen, drop those written after it."""
        if self.rank != 0 or not os.path.exists(self.metrics_path):
            return
        def keep(tmp):  # line by line: AMBER's run logs ~300k steps
            with open(self.metrics_path) as src, open(tmp, "w") as dst:
                dst.writelines(itertools.islice(src, n_lines))

        atomic_write(self.metrics_path, keep)
