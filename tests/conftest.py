"""Shared test helpers: a small made-up corpus and configs over it."""

import json
import os
import random

from config import config_from_dict

WORDS = None


def words():
    global WORDS
    if WORDS is None:  # a made-up vocabulary, seeded: no real text is copied into the tests
        rng = random.Random(0)
        WORDS = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
                 for _ in range(300)]
    return WORDS


def make_text(rng, n_words):
    return " ".join(rng.choice(words()) for _ in range(n_words))


def make_corpus(root, n_files=30, seed=0):
    """A folder of text files, a folder of code, and a JSON-lines file with grouped rows."""
    rng = random.Random(seed)
    (root / "txt").mkdir(parents=True)
    for i in range(n_files):
        (root / "txt" / f"doc{i:03d}.txt").write_text(make_text(rng, rng.randint(50, 400)) + "\n")
    (root / "code" / "pkg").mkdir(parents=True)
    (root / "code" / "tests").mkdir()
    for i in range(10):
        body = "\n".join(f"    x{j} = {rng.randint(0, 999)}  # {make_text(rng, 5)}" for j in range(20))
        (root / "code" / "pkg" / f"m{i}.py").write_text(f"def f{i}():\n{body}\n    return x0\n")
    (root / "code" / "tests" / "test_skip.py").write_text("SKIPPED = True\n")
    with open(root / "rows.jsonl", "w") as f:
        for book in range(6):
            for verse in range(5):
                f.write(json.dumps({"book": book, "verse": verse, "text": make_text(rng, 30)}) + "\n")
    return root


def corpus_values(root, out="out", **kw):
    """The config keys of a small run over the corpus at root, as a dict."""
    values = dict(
        sources={
            "web": {"path": str(root / "txt"), "format": "text"},
            "code": {"path": str(root / "code"), "format": "code", "exclude": ["tests/*"], "weight": 2.0},
            "books": {"path": str(root / "rows.jsonl"), "format": "jsonl", "group_by": ["book"]},
        },
        vocab_size=400, seq_len=32, max_seq_len=32, n_chunks=4, val_fraction=0.1, seed=5, num_workers=1,
        global_batch_size=8, micro_batch_size=2, data_dir=str(root / out),
        dtype="float32",  # pinned: the tests compare bitwise and against float32 references
        peak_flops=1e11)  # for MFU: a run then skips measuring this machine's matmul rate (0.2-0.3 s a process)
    values.update(kw)
    return values


def make_cfg(root, out="out", **kw):
    return config_from_dict(corpus_values(root, out, **kw))


def write_config(path, values):
    """A config file (plain assignments) holding `values`."""
    with open(path, "w") as f:
        f.writelines(f"{k} = {v!r}\n" for k, v in values.items())
    return str(path)


def save_like_amber(tensors, config, folder, max_shard_bytes, dtype=None):
    """HF-named `tensors` and a config.json dict in the layout of AMBER's released
    checkpoints: sharded pytorch_model-0000i-of-0000n.bin pickles and their index, as
    transformers 4.x's save_pretrained(safe_serialization=False) wrote them (transformers 5
    writes no .bin files, so the shards are written here, the same way). Returns the shard count."""
    import os

    import torch

    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    shards, size, total = [{}], 0, 0
    for name, t in tensors.items():
        t = t.detach().to(dtype or t.dtype).clone()
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards, size = shards + [{}], 0
        shards[-1][name] = t
        size, total = size + t.nbytes, total + t.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        torch.save(shard, os.path.join(folder, fname))
        weight_map.update(dict.fromkeys(shard, fname))
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return len(shards)


def trained_run(root, **kw):
    """root, after training a 2-layer model on make_corpus(root): data in root/data, the run
    (a checkpoint per chunk) in root/run. kw: config keys (n_chunks, max_seq_len, ...)."""
    import subprocess
    import sys

    make_corpus(root)
    values = corpus_values(root, "data", dim=64, n_layer=2, n_head=4, intermediate_size=128, out_dir=str(root / "run"),
                           warmup_steps=5, lr=1e-2, min_lr=1e-3, seq_len=64, **kw)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, os.path.join(repo, "train.py"), write_config(root / "cfg.py", values)], check=True,
                   capture_output=True, cwd=root)
    return root
