"""memorize.py: exact scores, a memorized chunk scores 1.0, decoding equal to
transformers, only seen chunks sampled, resumable, and clear errors."""

import json
import os
import pathlib

import numpy as np
import pytest
import torch

import data
import prepare
import memorize as mem
from config import config_from_dict, config_to_dict
from conftest import corpus_values, make_corpus
from model import Transformer

K, L = 16, 16


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = make_corpus(tmp_path_factory.mktemp("mem_corpus"))
    cfg = config_from_dict(corpus_values(root, "data", dim=64, n_layer=2, n_head=4, intermediate_size=128))
    prepare.prepare(cfg, progress=False)
    return root, cfg


def save_ckpt(run_dir, name, model, cfg, schedule, pos, skipped=()):
    """A checkpoint folder in train.py's format (weights and state.json)."""
    from safetensors.torch import save_file

    path = run_dir / name
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    state = {"config": config_to_dict(cfg), "schedule": schedule, "pos": pos, "skipped": list(skipped),
             "step": pos * 10, "tokens": pos * 1000}
    (path / "state.json").write_text(json.dumps(state))
    return path


def fresh_model(cfg, seed=0):
    model = Transformer(cfg.model)
    model.init_weights(seed)
    return model


def memorized_model(cfg, rows, steps=400):
    """A tiny model trained on `rows` until it reproduces them."""
    torch.manual_seed(0)
    model = fresh_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = torch.as_tensor(np.asarray(rows, dtype=np.int64))
    for _ in range(steps):
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def chunk_rows(cfg, chunk, samples):
    manifest = data.load_manifest(cfg.data_dir)
    tokens, _ = data.open_split(cfg.data_dir, manifest["chunks"][chunk])
    return np.asarray(tokens[mem.sample_indices(len(tokens), samples, 0, chunk)])


def test_scores_are_exact_on_a_hand_made_case():
    truth = np.array([[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]])
    gen = np.array([[1, 2, 3, 4], [1, 2, 0, 4], [0, 0, 0, 8], [0, 0, 0, 0]])
    assert mem.memorization_scores(gen, truth).tolist() == [1.0, 0.75, 0.25, 0.0]


def test_run_scores_and_summaries_exactly_with_known_outputs(prepared, tmp_path, monkeypatch):
    """Known model outputs, known data: every file and summary number is exactly right."""
    root, cfg = prepared
    manifest = data.load_manifest(cfg.data_dir)
    L_all = {}
    for c in range(len(manifest["chunks"])):
        tokens, _ = data.open_split(cfg.data_dir, manifest["chunks"][c])
        for row in np.asarray(tokens):
            L_all[tuple(row[:K])] = row[K : K + L]

    def known(model, prompts, l, batch_size, device, compile=False):  # right for prompts starting with an even token
        out = np.array([L_all[tuple(p)] for p in prompts])
        wrong = prompts[:, 0] % 2 == 1
        out[wrong, -1] = out[wrong, -1] + 1  # one token of l wrong
        return out

    monkeypatch.setattr(mem, "greedy_continuations", known)
    run_dir = tmp_path / "run"
    save_ckpt(run_dir, "ckpt_000", fresh_model(cfg), cfg, [0, 1, 2, 3], 1)
    save_ckpt(run_dir, "ckpt_001", fresh_model(cfg), cfg, [0, 1, 2, 3], 2)
    mem.run(str(run_dir), k=K, l=L, samples=20)
    results = mem.load_results(mem.results_dir(str(run_dir), K, L))
    for r in results:
        rows = chunk_rows(cfg, r["chunk"], 20)
        expected = np.where(rows[:, 0] % 2 == 0, 1.0, (L - 1) / L)
        assert r["scores"] == expected.tolist()
    summary = mem.summarize(mem.results_dir(str(run_dir), K, L))
    seen_rows = np.concatenate([chunk_rows(cfg, 0, 20), chunk_rows(cfg, 1, 20)])
    lines = (pathlib.Path(mem.results_dir(str(run_dir), K, L)) / "per_checkpoint.csv").read_text().splitlines()
    extractible = float(lines[2].split(",")[3])
    assert extractible == pytest.approx(np.mean(seen_rows[:, 0] % 2 == 0), abs=1e-6)
    assert summary["score_corr"][0, 1] == pytest.approx(1.0)  # the same outputs at both checkpoints
    for png in ("scores.png", "matrix.png", "correlation.png"):
        assert (pathlib.Path(mem.results_dir(str(run_dir), K, L)) / png).read_bytes()[:4] == b"\x89PNG"


def test_memorized_chunk_scores_one_and_a_fresh_model_near_chance(prepared, tmp_path):
    root, cfg = prepared
    rows = chunk_rows(cfg, 0, 8)
    run_dir = tmp_path / "run"
    save_ckpt(run_dir, "ckpt_000", memorized_model(cfg, rows), cfg, [0, 1, 2, 3], 1)
    save_ckpt(tmp_path / "fresh", "ckpt_000", fresh_model(cfg), cfg, [0, 1, 2, 3], 1)
    mem.run(str(run_dir), k=K, l=L, samples=8)
    mem.run(str(tmp_path / "fresh"), k=K, l=L, samples=8)
    trained = mem.load_results(mem.results_dir(str(run_dir), K, L))[0]
    fresh = mem.load_results(mem.results_dir(str(tmp_path / "fresh"), K, L))[0]
    assert trained["scores"] == [1.0] * 8
    assert np.mean(fresh["scores"]) < 0.1


def test_batched_cached_decoding_equals_transformers_generate(prepared, tmp_path):
    transformers = pytest.importorskip("transformers")
    from hf_format import save_hf

    root, cfg = prepared
    rows = chunk_rows(cfg, 1, 8)
    model = memorized_model(cfg, rows, steps=150)  # partly memorized: a mix of right and wrong tokens
    ours = mem.greedy_continuations(model, rows[:, :K], L, batch_size=3, device=torch.device("cpu"))
    save_hf(model, tmp_path / "hf")
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    prompts = torch.as_tensor(rows[:, :K].astype(np.int64))
    with torch.no_grad():
        theirs = ref.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=L,
                              min_new_tokens=L, eos_token_id=None, pad_token_id=0)[:, K:]
    assert np.array_equal(ours, theirs.numpy())


@pytest.mark.slow
def test_compiled_decoding_step_writes_the_same_tokens(prepared):
    """torch.compile of the decoding step (memorize's --compile): token for token the eager
    path's, on a model that memorized the rows and on a fresh one (small logit margins)."""
    root, cfg = prepared
    rows = chunk_rows(cfg, 1, 8)
    for model in (memorized_model(cfg, rows, steps=150), fresh_model(cfg)):
        eager = mem.greedy_continuations(model, rows[:, :K], L, batch_size=4, device=torch.device("cpu"))
        compiled = mem.greedy_continuations(model, rows[:, :K], L, batch_size=4, device=torch.device("cpu"),
                                            compile=True)
        assert np.array_equal(eager, compiled)
        assert model._compiled_decode is not None  # the compiled step ran


def test_only_seen_chunks_and_the_same_indices_every_time(prepared, tmp_path):
    root, cfg = prepared
    run_dir = tmp_path / "run"
    # position 1 (chunk 1) was skipped: the checkpoint has seen chunks 0 and 2
    save_ckpt(run_dir, "ckpt_002", fresh_model(cfg), cfg, [0, 1, 2, 3, 0], 3, skipped=[{"chunk": 1, "pos": 1}])
    mem.run(str(run_dir), k=K, l=L, samples=5)
    results = mem.load_results(mem.results_dir(str(run_dir), K, L))
    assert sorted(r["chunk"] for r in results) == [0, 2] and all(r["seen"] for r in results)
    first = {r["chunk"]: r["indices"] for r in results}
    mem.run(str(tmp_path / "run"), k=K, l=L, samples=5, unseen=True)
    results = mem.load_results(mem.results_dir(str(run_dir), K, L))
    assert {r["chunk"]: r["seen"] for r in results} == {0: True, 1: False, 2: True, 3: False}
    assert {r["chunk"]: r["indices"] for r in results if r["seen"]} == first


def test_interrupted_analysis_resumes_without_recomputing(prepared, tmp_path, monkeypatch):
    root, cfg = prepared
    for name in ("a", "b"):
        for i in range(3):
            save_ckpt(tmp_path / name, f"ckpt_{i:03d}", fresh_model(cfg, seed=i), cfg, [0, 1, 2, 3], i + 1)
    mem.run(str(tmp_path / "a"), k=K, l=L, samples=6)  # uninterrupted: 1 + 2 + 3 = 6 pairs
    real, calls = mem.score_pair, []

    def dies_after_four(*args, **kwargs):
        calls.append(1)
        if len(calls) > 4:
            raise KeyboardInterrupt  # killed midway
        return real(*args, **kwargs)

    monkeypatch.setattr(mem, "score_pair", dies_after_four)
    with pytest.raises(KeyboardInterrupt):
        mem.run(str(tmp_path / "b"), k=K, l=L, samples=6)
    calls.clear()
    monkeypatch.setattr(mem, "score_pair", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    mem.run(str(tmp_path / "b"), k=K, l=L, samples=6)
    assert len(calls) == 2  # only the pairs not finished before
    a, b = (pathlib.Path(mem.results_dir(str(tmp_path / n), K, L)) for n in "ab")
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in os.listdir(a))


def test_bad_input(prepared, tmp_path):
    root, cfg = prepared
    (tmp_path / "empty").mkdir()
    with pytest.raises(mem.MemorizeError, match="no checkpoints"):
        mem.run(str(tmp_path / "empty"))
    save_ckpt(tmp_path / "run", "ckpt_000", fresh_model(cfg), cfg, [0, 1, 2, 3], 1)
    with pytest.raises(mem.MemorizeError, match="k \\+ l = 64 is longer than the 33 tokens"):
        mem.run(str(tmp_path / "run"), k=32, l=32)
    small = config_from_dict(dict(config_to_dict(cfg), vocab_size=300))
    save_ckpt(tmp_path / "small", "ckpt_000", fresh_model(small), small, [0, 1, 2, 3], 1)
    with pytest.raises(mem.MemorizeError, match="vocab_size is 300"):
        mem.run(str(tmp_path / "small"), k=K, l=L, data_dir=cfg.data_dir)


@pytest.mark.slow
def test_torchrun_splits_the_pairs_and_gives_the_same_files(prepared, tmp_path):
    import subprocess
    import sys

    root, cfg = prepared
    for name in ("one", "two"):
        for i in range(2):
            save_ckpt(tmp_path / name, f"ckpt_{i:03d}", fresh_model(cfg, seed=i), cfg, [0, 1, 2, 3], i + 1)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = ["--prompt_len=16", "--gen_len=16", "--samples=6"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo)
    subprocess.run([sys.executable, os.path.join(repo, "memorize.py"), str(tmp_path / "one"), *args], check=True,
                   env=env, capture_output=True)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                           str(29700 + os.getpid() % 200), os.path.join(repo, "memorize.py"), str(tmp_path / "two"),
                           *args], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = (pathlib.Path(mem.results_dir(str(tmp_path / n), 16, 16)) for n in ("one", "two"))
    pairs = [f for f in os.listdir(a) if f.endswith(".json")]
    assert len(pairs) == 3 and all((a / f).read_bytes() == (b / f).read_bytes() for f in pairs)
    assert (a / "matrix.csv").read_text() == (b / "matrix.csv").read_text()
