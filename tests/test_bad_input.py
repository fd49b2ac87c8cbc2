"""Every bad input the user can make gets one line that says what is wrong and where,
never a traceback, and changes nothing on disk: train.py, evaluate.py, memorize.py and
convert_amber.py, through their command lines (in this process: a traceback would
be an exception here, not a SystemExit)."""

import os
import re
import shutil
import subprocess
import sys

import pytest

import convert_amber
import prepare
import remix
import evaluate
import finetune
import memorize
import plot
import release
import sample
import train
from conftest import corpus_values, trained_run, write_config
from test_evaluate import make_tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A trained run (root/run, two checkpoints), its data (root/data) and task files."""
    root = trained_run(tmp_path_factory.mktemp("bad_input"), val_sequences=16, n_chunks=2, max_seq_len=128)
    make_tasks(root / "tasks")
    return root


def config(root, **kw):
    values = corpus_values(root, "data", dim=64, n_layer=2, n_head=4, intermediate_size=128, seq_len=64,
                           max_seq_len=128, n_chunks=2, out_dir=str(root / "run"))
    return write_config(root / "case.py", values | kw)


def task_dir(root, name, **files):
    """A copy of the task files with some replaced: {file stem: text}."""
    folder = root / name
    shutil.copytree(root / "tasks", folder, dirs_exist_ok=True)
    for stem, text in files.items():
        (folder / f"{stem}.jsonl").write_text(text)
    return str(folder)


def arc_row(key):
    return ('{"id": "x", "question": "q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, '
            f'"answerKey": "{key}"}}\n')


CASES = {  # id: (script's main, argv from root), what the line must say
    # train.py and its config
    "micro_batch_size=0": (lambda r: (train.cli, [config(r), "--micro_batch_size=0"]),
                           "micro_batch_size=0: must be >= 1"),
    "n_chunks=0, fresh dir": (lambda r: (train.cli, [config(r, data_dir=str(r / "fresh"), out_dir=str(r / "o")),
                                                     "--n_chunks=0"]), "n_chunks=0: must be >= 1"),
    "config that raises": (lambda r: (train.cli, [str(_write(r / "raises.py", "lr = 1e-3\n\nx = 1 / 0\n"))]),
                           "raises.py:3: the config file raised ZeroDivisionError"),
    "config with a syntax error": (lambda r: (train.cli, [str(_write(r / "syntax.py", "lr = 1e-3\nlr ==== 2\n"))]),
                                   "syntax.py:2: the config file raised SyntaxError"),
    "data_dir is a file": (lambda r: (train.cli, [config(r, data_dir=str(_write(r / "a_file", "x")))]),
                           "data_dir='.*a_file' is a file, not a folder"),
    "out_dir is a file": (lambda r: (train.cli, [config(r, out_dir=str(_write(r / "a_file", "x")))]),
                          "out_dir='.*a_file' is a file, not a folder"),
    "data keys differ from the data dir's": (lambda r: (train.cli, [config(r, val_fraction=0.5, out_dir=str(r / "o2"))]),
                                             r"prepared with another data config \(val_fraction=0.1 there, 0.5 here\)"),
    "verify a missing run dir": (lambda r: (train.cli, ["verify", str(r / "nowhere")]), "nowhere: no such run dir"),
    # evaluate.py
    "no --task_dir": (lambda r: (evaluate.main, [str(r / "run"), "--tasks=arc_challenge"]),
                      "arc_challenge needs --task_dir=DIR"),
    "malformed JSON line": (lambda r: (evaluate.main, [str(r / "run"), "--tasks=arc_challenge", "--task_dir=" + task_dir(
        r, "t_json", arc_challenge=arc_row("A") + "{broken\n")]), r"arc_challenge.jsonl:2: not a JSON object"),
    "bad answerKey": (lambda r: (evaluate.main, [str(r / "run"), "--tasks=arc_challenge", "--task_dir=" + task_dir(
        r, "t_key", arc_challenge=arc_row("Z"))]), "its answer 'Z' names none of its 2 choices"),
    "2-choice MMLU row": (lambda r: (evaluate.main, [str(r / "run"), "--tasks=mmlu", "--task_dir=" + task_dir(
        r, "t_mmlu", mmlu='{"question": "q", "subject": "s", "choices": ["a", "b"], "answer": 0}\n')]),
        "2 choices; MMLU rows have 4"),
    "--limit=abc": (lambda r: (evaluate.main, [str(r / "run"), "--tasks=ppl", "--limit=abc"]),
                    "--limit='abc': give a whole number >= 1"),
    "missing run dir": (lambda r: (evaluate.main, [str(r / "nowhere"), "--tasks=ppl"]), "nowhere: no such folder"),
    "empty --text": (lambda r: (evaluate.main, [str(r / "run"), "--tasks=ppl", "--text=" + str(_write(r / "e.txt", ""))]),
                     "e.txt is empty"),
    "task file with 0 rows": (lambda r: (evaluate.main, [str(r / "run"), "--tasks=arc_challenge", "--task_dir=" + task_dir(
        r, "t_empty", arc_challenge="\n")]), "arc_challenge.jsonl holds no rows"),
    "unknown checkpoint (evaluate)": (lambda r: (evaluate.main, [str(r / "run"), "--tasks=ppl", "--checkpoints=ckpt_9"]),
                                      "has no checkpoint ckpt_9; it has ckpt_000, ckpt_001"),
    # memorize.py
    "k=0": (lambda r: (memorize.main, [str(r / "run"), "--k=0"]), "k=0: must be >= 1"),
    "l=-1": (lambda r: (memorize.main, [str(r / "run"), "--l=-1"]), "l=-1: must be >= 1"),
    "batch_size=0": (lambda r: (memorize.main, [str(r / "run"), "--batch_size=0"]), "batch_size=0: must be >= 1"),
    "unknown checkpoint (memorize)": (lambda r: (memorize.main, [str(r / "run"), "--checkpoints=ckpt_999"]),
                                      "has no checkpoint ckpt_999; it has ckpt_000, ckpt_001"),
    # train.py --branch_from, remix.py
    "a branch point that does not exist": (lambda r: (train.cli, [config(r, out_dir=str(r / "b")), "--branch_from="
                                                      + str(r / "run" / "ckpt_009")]), "ckpt_009'?: no checkpoint there"),
    "a branch into a non-empty run dir": (lambda r: (train.cli, [config(r, out_dir=str(r / "tasks")), "--branch_from="
                                                     + str(r / "run" / "ckpt_000")]),
                                          "is not empty and is not this branch's run dir"),
    "a remix weight on a source the data dir lacks": (lambda r: (remix.main, [str(r / "data"), str(r / "rmx"),
                                                                             "--weights=nope:2"]), "has no source 'nope'"),
    "remix: a chunk twice": (lambda r: (remix.main, [str(r / "data"), str(r / "rmx"), "--weights=web:2",
                                                    "--chunks=1,1"]), "names a chunk twice"),
    "remix: a range past the last chunk": (lambda r: (remix.main, [str(r / "data"), str(r / "rmx"), "--weights=web:2",
                                                                  "--chunks=1-9"]), "chunks the data does not have"),
    "remix: --n_chunks=abc": (lambda r: (remix.main, [str(r / "data"), str(r / "rmx"), "--weights=web:2",
                                                     "--n_chunks=abc"]), "--n_chunks='abc': expected a whole number"),
    "remix: more chunks than rows": (lambda r: (remix.main, [str(r / "data"), str(r / "rmx"), "--weights=web:2",
                                                            "--n_chunks=100000"]), "fewer than n_chunks=100000"),
    # convert_amber.py
    "convert-amber: a row without token_ids": (lambda r: (convert_amber.main, [str(_release(
        r, '{"tokens": [1, 2]}\n')), str(r / "converted")]), r"train_000.jsonl:1: no 'token_ids' list"),
    "convert-amber: an empty file": (lambda r: (convert_amber.main, [str(_release(r, "")),
                                                            str(r / "converted")]), "train_000.jsonl: the file holds no rows"),
    # sample.py: what sampling cannot do (A negative temperature sampled the inverted distribution)
    "sample: max_new_tokens=-1": (lambda r: (sample.main, [_ckpt(r), "--max_new_tokens=-1"]),
                                  "max_new_tokens=-1: give at least 1"),
    "sample: temperature=nan": (lambda r: (sample.main, [_ckpt(r), "--temperature=nan"]), "temperature=nan: give a number >= 0"),
    "sample: temperature=-1": (lambda r: (sample.main, [_ckpt(r), "--temperature=-1"]), "temperature=-1.0: give a number"),
    "sample: top_k=0": (lambda r: (sample.main, [_ckpt(r), "--top_k=0"]), "top_k=0: give at least 1"),
    "sample: --device=cuda without one": (lambda r: (sample.main, [_ckpt(r), "--device=cuda:7"]),
                                          "--device=cuda:7: this machine has"),
    "sample: --chat=maybe": (lambda r: (sample.main, [_ckpt(r), "--chat=maybe"]), "--chat='maybe': expected True or False"),
    "evaluate: --tasks with a space": (lambda r: (evaluate.main, [str(r / "run"), "--tasks", "ppl"]),
                                       "bad argument '--tasks': options are written --key=value"),
    "evaluate: an extra positional argument": (lambda r: (evaluate.main, [str(r / "run"), "--tasks=ppl", "extra"]),
                                               "bad argument 'extra'"),
    "ARC row with no choices": (lambda r: (evaluate.main, [str(r / "run"), "--tasks=arc_challenge", "--task_dir=" + task_dir(
        r, "t_nochoice", arc_challenge='{"id": "x", "question": "q?", "choices": {"text": [], "label": []}, '
                                       '"answerKey": "A"}\n')]), "arc_challenge row .*: 0 choice"),
    # a Hugging Face folder that is not one, through every script that loads weights
    "sample: HF config.json is []": (lambda r: (sample.main, [_hf(r, "hf_list", config="[]"), "--prompt=x"]),
                                     "hf_list/config.json: not a Hugging Face config"),
    "sample: HF config.json not JSON": (lambda r: (sample.main, [_hf(r, "hf_text", config="{oops"), "--prompt=x"]),
                                        "hf_text/config.json: not a Hugging Face config"),
    "sample: HF safetensors of random bytes": (lambda r: (sample.main, [_hf(r, "hf_noise", noise=True), "--prompt=x"]),
                                               "hf_noise/model.safetensors: not a safetensors file"),
    "export: HF safetensors of random bytes": (lambda r: (release.main, ["export", _hf(r, "hf_noise", noise=True),
                                                                         str(r / "exported")]),
                                               "not a safetensors file"),
    "evaluate: HF config.json is []": (lambda r: (evaluate.main, [_hf(r, "hf_list", config="[]"), "--tasks=ppl",
                                                                  "--text=" + str(_write(r / "t.txt", "some text"))]),
                                       "not a Hugging Face config"),
    "memorize: HF safetensors of random bytes": (lambda r: (memorize.main, [_amber_dir(r), "--data_dir=" + str(r / "data")]),
                                                 "not a safetensors file"),
    "init_from: HF safetensors of random bytes": (lambda r: (train.cli, [config(r, out_dir=str(r / "o3"), init_from=_hf(
        r, "hf_noise", noise=True))]), "not a safetensors file"),
    "init_from: a folder of another width": (lambda r: (train.cli, [config(r, out_dir=str(r / "o4"), dim=32, init_from=str(
        r / "run" / "ckpt_001"))]), "another model shape"),
    "init_from: data of another tokenizer of the same size": (lambda r: (train.cli, [config(
        r, out_dir=str(r / "o6"), data_dir=_other_tokenizer(r), init_from=str(r / "run" / "ckpt_001"))]),
        "was trained with another tokenizer"),
    "an invalid manifest.json": (lambda r: (train.cli, [config(r, out_dir=str(r / "o5"), data_dir=_bad_manifest(r))]),
                                 "manifest.json"),
    # files of ours that are cut short or edited, and odd names
    "a manifest.json that is not JSON": (lambda r: (train.cli, [config(r, out_dir=str(r / "o7"), data_dir=_bad_manifest(
        r, "manifest_text", "{oops"))]), "manifest.json: not valid JSON"),
    "plot: a missing run": (lambda r: (plot.main, [str(r / "nowhere")]), "nowhere: no such run dir"),
    "plot: a metrics line cut short": (lambda r: (plot.main, [_cut_metrics(r)]), r"metrics.jsonl:3: not a JSON line"),
    "plot: the same run twice": (lambda r: (plot.main, [str(r / "run"), str(r / "run") + "/"]), "a run given twice"),
    "sample: a prompt that is not UTF-8": (lambda r: (sample.main, [_ckpt(r), "--prompt=caf\udce9"]),
                                           "--prompt is not valid UTF-8"),
    "W&B's run file cut short": (lambda r: (train.cli, [config(r, out_dir=_with_file(r / "wb_cut", "wandb.json", '{"id": '),
                                                       wandb_project="llm360-test")]), "wandb.json: not valid JSON"),
    # task files: the rows each task reads, as the datasets hold them (tracing.py reads them the same way)
    "a task row with an integer question": (lambda r: (evaluate.main, [str(r / "run"), "--tasks=mmlu", "--task_dir=" + task_dir(
        r, "t_int", mmlu='{"question": 7, "subject": "s", "choices": ["a", "b", "c", "d"], "answer": 0}\n')]),
        r"mmlu.jsonl:1: 'question' is int"),
    "a task row without its question": (lambda r: (evaluate.main, [str(r / "run"), "--tasks=arc_challenge", "--task_dir="
                                                   + task_dir(r, "t_nokey", arc_challenge='{"id": "x", "answerKey": "A"}\n')]),
                                        r"arc_challenge.jsonl:1: no 'question'"),
    "a task file of JSON lists": (lambda r: (evaluate.main, [str(r / "run"), "--tasks=arc_challenge", "--task_dir=" + task_dir(
        r, "t_lists", arc_challenge='["a", "b"]\n')]), r"arc_challenge.jsonl:1: a list, not a JSON object"),
    "a task parquet of random bytes": (lambda r: (evaluate.main, [str(r / "run"), "--tasks=arc_challenge", "--task_dir="
                                                  + _noise_parquet(r)]), "arc_challenge.parquet: not a readable parquet"),
    # fine-tuning files
    "finetune: a value that is not a string": (lambda r: (finetune.main, _ft(r, "list_value.jsonl", '{"instruction": ["a"], '
                                                                              '"output": "b"}\n' * 4)), "'instruction' is list"),
    "finetune: a missing value": (lambda r: (finetune.main, _ft(r, "missing.jsonl", '{"conversations": [{"from": "human"}, '
                                                                '{"from": "gpt", "value": "b"}]}\n' * 4)), "'value' is missing"),
    "finetune: one example": (lambda r: (finetune.main, _ft(r, "one.jsonl", '{"instruction": "a", "output": "b"}\n')),
                              "1 example.*at least 2"),
    "finetune: an empty file": (lambda r: (finetune.main, _ft(r, "empty.jsonl", "")), "0 example"),
    "finetune: a JSON list in .jsonl": (lambda r: (finetune.main, _ft(r, "list.jsonl", '[{"instruction": "a", "output": "b"}]\n')),
                                        "list.jsonl:1: a list, not a JSON object"),
    "finetune: JSON lines in .json": (lambda r: (finetune.main, _ft(r, "lines.json", '{"instruction": "a", "output": "b"}\n' * 2)),
                                      "not one JSON document"),
    "finetune: a parquet file of random bytes": (lambda r: (finetune.main, _ft(r, "noise.parquet", os.urandom(256))),
                                                 "noise.parquet: not a readable parquet file"),
    "dpo: chosen equals rejected": (lambda r: (finetune.main, _ft(r, "same.jsonl", '{"prompt": "p", "chosen": "a", '
                                                                  '"rejected": "a "}\n' * 4, objective="dpo")),
                                    "same.jsonl:1: chosen and rejected are the same response"),
    "finetune: not UTF-8": (lambda r: (finetune.main, _ft(r, "latin.jsonl", b'{"instruction": "caf\xe9", "output": "b"}\n')),
                            "not UTF-8 text"),
}


def _ckpt(r):
    return str(r / "run" / "ckpt_001")


def _hf(r, name, config=None, noise=False):
    """A copy of the run's last checkpoint as a Hugging Face folder, then broken."""
    folder = r / name
    if not folder.exists():
        release.export(_ckpt(r), str(folder))
    if config is not None:
        (folder / "config.json").write_text(config)
    if noise:
        (folder / "model.safetensors").write_bytes(os.urandom(4096))
    return str(folder)


def _amber_dir(r):
    """A folder of AMBER-style checkpoints (ckpt_000 as a Hugging Face folder) with broken weights."""
    folder = r / "amber_noise"
    if not folder.exists():
        folder.mkdir()
        shutil.copytree(_hf(r, "hf_noise", noise=True), folder / "ckpt_000")
    return str(folder)


def _other_tokenizer(r):
    """The run's data dir with another SentencePiece model of the same vocabulary size."""
    import hashlib
    import json

    folder = r / "other_tokenizer"
    if not folder.exists():
        shutil.copytree(r / "data", folder)
        manifest = json.loads((folder / "manifest.json").read_text())
        words = ["".join(chr(97 + (i * 7 + j * 3) % 26) for j in range(2 + i % 6)) for i in range(3000)]
        lines = [" ".join(words[i : i + 12]) for i in range(0, 3000, 3)]
        blob = prepare.train_sentencepiece(lines, manifest["tokenizer"]["vocab_size"])
        (folder / manifest["tokenizer"]["file"]).write_bytes(blob)
        manifest["tokenizer"]["sha256"] = hashlib.sha256(blob).hexdigest()
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return str(folder)


def _bad_manifest(r, name="bad_manifest", text='{"format": "llm360-data", "chunks": 3}'):
    folder = r / name
    if not folder.exists():
        shutil.copytree(r / "data", folder)
        (folder / "manifest.json").write_text(text)
    return str(folder)


def _with_file(folder, name, text):
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(text)
    return str(folder)


def test_a_folder_named_like_a_checkpoint_but_not_one_is_ignored(tmp_path):
    for name in ("ckpt_000", "ckpt_\u00b2", "ckpt_\u0663", "ckpt_1a"):  # a superscript and an Arabic-Indic digit
        (tmp_path / name).mkdir()
    import checkpoint

    assert checkpoint.checkpoint_names(str(tmp_path)) == ["ckpt_000"]


def _cut_metrics(r):
    """A copy of the run whose metrics.jsonl has a line cut short in its middle."""
    folder = r / "cut_metrics"
    if not folder.exists():
        folder.mkdir()
        lines = (r / "run" / "metrics.jsonl").read_text().splitlines(keepends=True)
        (folder / "metrics.jsonl").write_text("".join(lines[:2]) + lines[2][:10] + "\n" + "".join(lines[3:]))
    return str(folder)


def _noise_parquet(r):
    folder = r / "t_parquet"
    folder.mkdir(exist_ok=True)
    (folder / "arc_challenge.parquet").write_bytes(os.urandom(512))
    (folder / "arc_challenge_train.jsonl").write_text((r / "tasks" / "arc_challenge_train.jsonl").read_text())
    return str(folder)


def _ft(r, name, text, **keys):
    path = r / "ft" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    cfg = write_config(r / "ft" / "case.py", dict(init_from=_ckpt(r), finetune_data=str(path), seq_len=64,
                                                  data_dir=str(r / "ft" / "data"), out_dir=str(r / "ft" / "run"),
                                                  global_batch_size=2, micro_batch_size=2, **keys))
    return [cfg]


def _write(path, text):
    path.write_text(text)
    return path


def _release(root, text):
    folder = root / "release"
    folder.mkdir(exist_ok=True)
    (folder / "train_000.jsonl").write_text(text)
    return folder


def snapshot(root):
    """Every file under root but this test's own inputs and lock files, with size and mtime."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            if not f.endswith(".lock"):
                out[p] = (os.path.getsize(p), os.stat(p).st_mtime_ns)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_and_changes_nothing(root, case, capsys):
    make, expected = CASES[case]
    main, argv = make(root)
    before = {p: v for p, v in snapshot(root).items() if "/run/" in p or "/data/" in p}
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    assert re.search(expected, message), message
    after = {p: v for p, v in snapshot(root).items() if "/run/" in p or "/data/" in p}
    assert after == before  # nothing written, nothing lost
    assert not os.path.exists(root / "converted" / "manifest.json")
    assert not os.path.exists(root / "rmx")  # a remix refused leaves no folder, remix.json or .remix_work


def test_a_truncated_memorization_result_is_computed_again(root):
    argv = [str(root / "run"), "--samples=2", "--batch_size=2", "--checkpoints=ckpt_000"]
    memorize.main(argv)
    path = root / "run" / "memorization" / "k32_l32" / "ckpt_000__chunk_000.json"
    good = path.read_text()
    path.write_text(good[: len(good) // 2])
    memorize.main(argv)
    assert path.read_text() == good


def test_out_of_memory_in_setup_is_one_line(root):
    """A model too large for the memory there is (an address-space limit of 6 GiB here):
    one line with the size asked for, not a traceback."""
    cfg = config(root, out_dir=str(root / "too_large"), dim=4096, n_layer=16, n_head=32, intermediate_size=11008)
    code = ("import resource, sys; import train; resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30)); "
            f"train.cli([{cfg!r}])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and re.fullmatch(r"error: out of memory allocating [0-9]+ bytes: .*--dry_run=True",
                                                 last), proc.stderr[-2000:]


def _can_mount():
    try:
        return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _can_mount(), reason="needs unprivileged user and mount namespaces (unshare)")
def test_a_full_or_read_only_disk_gives_one_line(root, tmp_path):
    """In a mount namespace of its own: a 300 KiB tmpfs (full before the first checkpoint,
    and before the data dir is built) and a read-only bind mount."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cfg = config(root)
    train_py = os.path.join(ROOT, "train.py")
    script = (f"mount -t tmpfs -o size=300k tmpfs {mnt} && mkdir {mnt}/ro && mount --bind -o ro {mnt}/ro {mnt}/ro && "
              f"for out in {mnt}/ro/run {mnt}/full_run; do {sys.executable} {train_py} {cfg} --out_dir=$out "
              "2>&1 >/dev/null | tr '\\r' '\\n' | tail -1; done; "
              f"{sys.executable} {train_py} {cfg} --out_dir={mnt}/run2 --data_dir={mnt}/data 2>&1 >/dev/null "
              "| tr '\\r' '\\n' | tail -1; "
              # the disk full in the middle of safetensors' write (its error is no OSError): a 128 KiB tmpfs
              f"mkdir {mnt}/small && mount -t tmpfs -o size=128k tmpfs {mnt}/small && {sys.executable} "
              f"{os.path.join(ROOT, 'release.py')} export {root / 'run' / 'ckpt_001'} {mnt}/small/hf 2>&1 | tail -1; "
              f"ls -A {mnt}/small; ls -A " + str(mnt))
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    read_only, full_ckpt, full_data, full_export, *listing = proc.stdout.splitlines()
    assert re.match(f"error: {mnt}/small/hf(.tmp)?: No space left on device \\(", full_export), full_export
    assert "small" in listing and "hf" not in listing and "hf.tmp" not in listing  # nothing of the export left
    assert read_only == f"error: {mnt}/ro/run: Read-only file system; give a folder this process can write to"
    assert re.fullmatch(f"error: {mnt}/full_run: [0-9.]+ MiB free, a checkpoint needs about [0-9.]+ MiB; free space "
                        r"and run the same command again \(it resumes from the start\)", full_ckpt), full_ckpt
    assert full_data.startswith(f"error: {mnt}/data.tmp") and "No space left on device" in full_data, full_data
    assert "MiB free on" in full_data
    # nothing half-built is left: no data dir staging folder, no checkpoint folder
    assert not [n for n in listing if n.startswith("data.tmp")] and "data" not in listing, listing
