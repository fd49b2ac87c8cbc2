"""
The benchmark task files: where they are in a task dir, what a row of each task must
hold (the public datasets' fields), the one reader of them (evaluate.py and tracing.py),
and the sha256 a result records of them.

    TASK_DIR/TASK.jsonl (or .parquet)            the split evaluated
    TASK_DIR/TASK_train.jsonl (MMLU: mmlu_dev)   the split few-shot examples come from
"""

import hashlib
import json
import os

from common import UserError

# the leaderboard's shots
FEWSHOT = {"arc_challenge": 25, "hellaswag": 10, "mmlu": 5, "truthfulqa_mc": 0}
FEWSHOT_SPLIT = {"mmlu": "dev"}  # the split few-shot examples come from, where not "train"


class TaskError(UserError):
    pass


def _strs(x):
    return isinstance(x, list) and all(isinstance(t, str) for t in x)


# what a row of each task must hold: the public datasets' fields, as evaluate.py reads them
ROW_SCHEMA = {
    "arc_challenge": {"question": str, "answerKey": str,
                      "choices": lambda c: isinstance(c, dict) and _strs(c.get("text"))
                      and isinstance(c.get("label"), list)},
    "hellaswag": {"ctx_a": str, "ctx_b": str, "activity_label": str, "endings": _strs,
                  "label": (str, int)},
    "mmlu": {"question": str, "choices": _strs, "answer": int},
    "truthfulqa_mc": {"question": str, "mc1_targets": lambda t: isinstance(t, dict)
                      and _strs(t.get("choices"))},
    "humaneval": {"task_id": str, "prompt": str, "test": str, "entry_point": str},
    "mbpp": {"task_id": (int, str), "text": str, "test_list": _strs},
    "bold": {"domain": str, "name": str, "category": str, "prompts": _strs},
}


def _check_row(task, row, where):
    """A row of a task file that holds what the task reads, or a one-line error at `where`."""
    if not isinstance(row, dict):
        raise TaskError(f"{where}: a {type(row).__name__}, not a JSON object")
    for key, want in ROW_SCHEMA.get(task, {}).items():
        if key not in row:
            raise TaskError(f"{where}: no {key!r}; a {task} row has {', '.join(ROW_SCHEMA[task])}")
        if callable(want) and not isinstance(want, type):
            ok = want(row[key])
        else:
            ok = isinstance(row[key], want)
        if not ok or isinstance(row[key], bool):
            raise TaskError(f"{where}: {key!r} is {type(row[key]).__name__} "
                            f"{str(row[key])[:40]!r}, not what the {task} dataset holds there")
    return row


def read_rows(path, task=None):
    """The rows of a task file (each checked against the task's fields when given); a
    malformed line, a file that is not JSON lines or parquet, and a file without rows are
    one line each (a benchmark of 0 items is not a score). tracing.py reads them here too."""
    rows = []
    if path.endswith(".parquet"):
        import pyarrow.parquet

        try:
            table = pyarrow.parquet.read_table(path).to_pylist()
        except Exception as e:  # pyarrow's errors are its own classes
            raise TaskError(f"{path}: not a readable parquet file "
                            f"({str(e).splitlines()[0][:120]})") from None
        rows = [_check_row(task, row, f"{path} row {i}") for i, row in enumerate(table)]
    else:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:  # not JSON, or not UTF-8
                    raise TaskError(f"{path}:{lineno}: not a JSON object ({e}); fix or remove the "
                                    "line") from None
                rows.append(_check_row(task, row, f"{path}:{lineno}"))
    if not rows:
        raise TaskError(f"{path} holds no rows; save the task's rows there")
    return rows


def task_file(task_dir, name):
    for ext in (".jsonl", ".parquet"):
        if os.path.exists(os.path.join(task_dir, name + ext)):
            return os.path.join(task_dir, name + ext)
    return None


def task_sha256(task_dir, task):
    """The sha256 of a task's files (its rows, then its few-shot split): what a result records."""
    h = hashlib.sha256()
    for p in (task_file(task_dir, task),
              task_file(task_dir, f"{task}_{FEWSHOT_SPLIT.get(task, 'train')}")):
        if p:
            with open(p, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
    return h.hexdigest()


def load_task(task_dir, task):
    """(eval rows, few-shot rows, sha256 of the files) of a task."""
    path = task_file(task_dir, task)
    if path is None:
        raise TaskError(f"no {task}.jsonl or {task}.parquet in {task_dir}: save the task's rows "
                        "there")
    shots_path = task_file(task_dir, f"{task}_{FEWSHOT_SPLIT.get(task, 'train')}")
    if FEWSHOT.get(task) and shots_path is None:
        raise TaskError(f"{task} is {FEWSHOT[task]}-shot: save its few-shot split as "
                        f"{task}_{FEWSHOT_SPLIT.get(task, 'train')}.jsonl in {task_dir}")
    return read_rows(path, task), read_rows(shots_path,
                                            task) if shots_path else [], task_sha256(task_dir, task)
