"""
python train.py verify RUN_DIR: a run dir checked without changing anything. Every
checkpoint against the sizes and sha256 its state.json recorded (checkpoint.py's
format), metrics.jsonl line by line against the digests the checkpoints recorded, and
every chunk of the data dirs against its manifest; one line each.
"""

import hashlib
import json
import os

import data
from checkpoint import (CheckpointError, checkpoint_names, linked_checkpoints, read_state,
                        verify_checkpoint)
from common import read_json


def verify_run(out_dir):
    """python train.py verify RUN_DIR: every checkpoint against the sizes and sha256 its
    state.json recorded, metrics.jsonl line by line, and every chunk of the data dirs
    against its manifest; one line each. Returns the number of problems (the exit status
    is 1 when there are any). Nothing is changed."""
    bad = 0
    if not os.path.isdir(out_dir):
        raise CheckpointError(f"{out_dir}: no such run dir")
    names = checkpoint_names(out_dir, rolling=True)
    for name in names:
        path = os.path.join(out_dir, name)
        problems = verify_checkpoint(path)
        st = read_state(path)
        if problems:
            bad += 1
            print(f"{name:14s} DAMAGED: {'; '.join(problems)}")
        elif st.get("format_version", 1) < 2:
            print(f"{name:14s} not checked: format 1, from before checkpoints recorded files")
        else:
            print(f"{name:14s} ok ({len(st['files'])} files, "
                  f"{sum(r['bytes'] for r in st['files'].values()) / 1e6:,.1f} MB)")
    for name in linked_checkpoints(out_dir):
        bad += 1
        print(f"{name:14s} DAMAGED: a symbolic link (to "
              f"{os.readlink(os.path.join(out_dir, name))}), not a folder of this run")
    bad += verify_metrics(out_dir, {n: read_state(os.path.join(out_dir, n)) for n in names})
    config_path = os.path.join(out_dir, "config.json")
    if os.path.exists(config_path):
        for d in data.stage_dirs(read_json(config_path)):
            try:
                print(f"{d}  ok ({data.verify_dir(d)} chunks)")
            except data.DataError as e:
                bad += 1
                print(f"{d}  DAMAGED: {e}")
    if not names:
        print(f"{out_dir} holds no checkpoints")
    return bad


def verify_metrics(out_dir, states):
    """metrics.jsonl in one pass: every line JSON, and its first lines those each checkpoint
    recorded (their count and sha256); one line, and 1 when something is wrong."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    recorded = {}  # lines -> [(checkpoint, sha256)]
    for name, st in states.items():
        if st and "metrics_sha256" in st:
            recorded.setdefault(st["metrics_lines"], []).append((name, st["metrics_sha256"]))
    h, n, broken, differ = hashlib.sha256(), 0, [], []
    differ += [name for name, sha in recorded.get(0, []) if sha != h.hexdigest()]
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            h.update(line)
            try:
                json.loads(line)
            except ValueError:
                broken.append(n)
            differ += [name for name, sha in recorded.get(n, []) if sha != h.hexdigest()]
    short = [name for lines, recs in recorded.items() if lines > n for name, _ in recs]
    newest = max((st["metrics_lines"] for st in states.values() if st), default=0)
    if not (broken or differ or short or n < newest):
        print(f"metrics.jsonl  ok ({n} lines)")
        return 0
    line = f"metrics.jsonl  DAMAGED: {n} lines"
    if broken:
        line += f"; lines {broken[:5]} are not JSON"
    if differ or short:
        line += f"; its first lines are not those {', '.join(sorted(differ + short))} recorded"
    print(line + (" (edited or cut since)" if differ or short else
                  f"; the newest checkpoint counted {newest}"))
    return 1
