"""
Benchmark of model.py against transformers on this machine, in float32.

    python bench.py [model] [CONFIG] [--key=value ...] [--compile]   # default configs/tiny.py
    python bench.py data [CONFIG] [--key=value ...]
    python bench.py eval [CONFIG] [--key=value ...]
    python bench.py convert
    python bench.py prepare
    python bench.py figures [RUN_DIR]
    python bench.py trace [DATA_DIR]                      index build, memory, query latency
    python bench.py rehearsal [FOLDER]                    AMBER's tensors on 2 CPU ranks
    python bench.py gpu [CONFIG] [--device=cpu --smoke]   the GPU check (gpu_check.py)
    python bench.py fused [CONFIG]                        model.py's steps against fused.py's
    python bench.py ckpt [FOLDER] [--gb=2]                a rank's checkpoint write and sha256 rates
    python bench.py layers [CONFIG]                       a step with layer_stats_interval's norms

`model` times, in one run and on the same weights and batch:
  1. one training step (forward + backward + AdamW) of our model and of
     transformers.LlamaForCausalLM, as tokens/s, their ratio, and the share of this
     machine's measured float32 matmul rate that our step reaches (MFU here);
  2. greedy generation of NEW_TOKENS tokens for GEN_BATCH prompts of PROMPT_LEN
     tokens: ours with its KV cache against transformers `generate` with and without
     its cache.
Rounds alternate between the contenders, and medians are reported, because this
machine is shared and noisy: read the ratios, not the absolute times.
Needs requirements-dev.txt (transformers).

`data` prepares the config's data dir if needed, then times the tokenization of
all its sources with 1 and 2 worker processes, and the reader's time per
optimizer step against the time of that training step.

`convert` writes synthetic releases in AMBER's format (1,000 and 15,000 rows of
2,049 ids) and runs `convert_amber.py` on each with 1 worker and one per
core: wall time, tokens/s per worker, and the peak resident memory of the
process with its workers.

`prepare` runs `prepare.py CONFIG` on a corpus of made-up documents and on one 4x
larger, with the same given tokenizer (training one reads a capped sample, apart
from the data path), and prints the peak resident memory of each; then fine-tuning's
preparation on made-up conversations, and on 4x as many.

`figures` times the redraw of a run's training.png (default runs/tiny) against
the run's training time per chunk.

`fused` times a training step (forward, backward) of the config's model at its
micro-batch with model.py's plain SwiGLU and loss, with each of fused.py's versions, and
with both; and a validation forward (no_grad) with the plain and the chunked loss.
train.py takes the fused versions on a CPU from what it prints.

`ckpt` writes a state dict of GB gigabytes of float32 tensors as one rank writes its
shard (torch.distributed.checkpoint, then fsync), then hashes the files as checkpoint.py
does: the rates train.py's dry run plans a stop checkpoint with (checkpoint.WRITE_BYTES_PER_S,
HASH_BYTES_PER_S).

`eval` times multiple-choice scoring (4 choices, 5-shot ARC-style contexts of
made-up words) with evaluate.py against lm_eval's HFLM on the exported Hugging
Face copy of the same weights.
"""

import os
import shutil
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import replace

import numpy as np
import torch

from common import parse_options
from config import ConfigError, load_config
from model import to_hf_state_dict
from model_config import hf_config
from machine import matmul_rate
from parallelize import build_model, speed_up
import step

BATCH = 8  # sequences per training step (of the config's seq_len)
ROUNDS = 5  # alternating timing rounds
STEPS = 3  # training steps per round and contender
GEN_BATCH, PROMPT_LEN, NEW_TOKENS = 32, 32, 32


def hf_copy(model):
    """transformers.LlamaForCausalLM holding exactly our weights."""
    import transformers

    hf = dict(hf_config(model.config))
    for key in ("architectures", "model_type", "torch_dtype"):
        hf.pop(key)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf))
    ref.load_state_dict(to_hf_state_dict(model), strict=not model.config.tie_embeddings)
    return ref


def timed(fn, n):
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main(cfg):
    torch.manual_seed(0)
    ours = build_model(cfg, torch.device("cpu"), torch.float32, fsdp=False)
    ref = hf_copy(ours)
    T = cfg.seq_len
    idx = torch.randint(0, cfg.model.vocab_size, (BATCH, T + 1))
    x, y = idx[:, :-1], idx[:, 1:]
    print(f"model {cfg.model.n_layer}L x {cfg.model.dim}, {ours.num_params():,} params; "
          f"batch {BATCH} x {T}; torch {torch.__version__}, {torch.get_num_threads()} threads")

    # the same function on the same weights before timing anything
    with torch.no_grad():
        diff = (ours(x)[0] - ref(input_ids=x).logits).abs().max().item()
    print(f"max |logits ours - transformers| = {diff:.2e}")
    # as train.py on a CPU: fused.py's SwiGLU and chunked loss
    speed_up(ours, cfg, torch.device("cpu"))

    # 1. training step: ours as train.py sets it up (param groups, fused AdamW); transformers with
    # torch.optim.AdamW's defaults, as its Trainer's "adamw_torch"
    opt_ours = step.make_optimizer(ours.param_groups(0.1), cfg, torch.device("cpu"))
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                weight_decay=0.1)

    def step_ours():
        _, loss = ours(x, y)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_ref():
        logits = ref(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)

    ours.train(), ref.train()
    step_ours(), step_ref()  # warm up
    t_ours, t_ref = [], []
    for _ in range(ROUNDS):
        t_ours.append(timed(step_ours, STEPS))
        t_ref.append(timed(step_ref, STEPS))
    rate = matmul_rate(torch.device("cpu"))
    tok_ours, tok_ref = BATCH * T / statistics.median(t_ours), BATCH * T / statistics.median(t_ref)
    mfu = tok_ours * ours.flops_per_token(T) / rate
    print(f"float32 matmul rate      {rate / 1e9:.1f} GFLOP/s (1024 x 1024, best of 3)")
    print(f"train step, ours         {tok_ours:9.0f} tok/s   MFU {100 * mfu:.0f}% of the matmul "
          "rate")
    print(f"train step, transformers {tok_ref:9.0f} tok/s   MFU "
          f"{100 * tok_ref * ours.flops_per_token(T) / rate:.0f}%")
    print(f"train step ratio         {tok_ours / tok_ref:.2f}x (ours / transformers)")
    # train.py's compile=True: each block through torch.compile, the plain SwiGLU
    if "--compile" in sys.argv:
        for block in ours.layers:
            del block.mlp.forward
        speed_up(ours, replace(cfg, compile=True), torch.device("cpu"))
        t_compile = timed(step_ours, 1)
        step_ours()
        t_comp = statistics.median(timed(step_ours, STEPS) for _ in range(ROUNDS))
        print(f"train step, ours, compiled blocks {BATCH * T / t_comp:9.0f} tok/s   "
              f"{statistics.median(t_ours) / t_comp:.2f}x eager (first step, compiling: "
              f"{t_compile:.1f} s)")
        for block in ours.layers:  # back to eager for the decoding benchmark
            block._compiled_call_impl = None

    # 2. greedy generation, on the same weights again (the two optimizers moved them apart)
    ref.load_state_dict(to_hf_state_dict(ours), strict=not ours.config.tie_embeddings)
    ours.eval(), ref.eval()
    prompts = torch.randint(0, cfg.model.vocab_size, (GEN_BATCH, PROMPT_LEN))
    mask = torch.ones_like(prompts)

    def gen_ours(compile=False):
        return ours.generate(prompts, NEW_TOKENS, compile=compile)

    def gen_ref(use_cache):
        return ref.generate(prompts, attention_mask=mask, do_sample=False,
                            max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, eos_token_id=None,
                            pad_token_id=0, use_cache=use_cache)

    with torch.no_grad():
        t0 = time.perf_counter()
        compiled = gen_ours(compile=True)  # compiles the decoding step
        t_compile = time.perf_counter() - t0
        eager, theirs = gen_ours(), gen_ref(True)  # warm up
        same = torch.equal(compiled, eager) and torch.equal(eager, theirs)
        g_ours, g_comp, g_ref, g_nocache = [], [], [], []
        for _ in range(ROUNDS):
            g_ours.append(timed(gen_ours, 1))
            g_comp.append(timed(lambda: gen_ours(True), 1))
            g_ref.append(timed(lambda: gen_ref(True), 1))
            g_nocache.append(timed(lambda: gen_ref(False), 1))
    n = GEN_BATCH * NEW_TOKENS
    s_ours, s_comp, s_ref, s_nc = (n / statistics.median(t)
                                   for t in (g_ours, g_comp, g_ref, g_nocache))
    print(f"generate {GEN_BATCH} x ({PROMPT_LEN} + {NEW_TOKENS}) greedy (the same tokens all four "
          f"ways: {same}):")
    print(f"  ours, KV cache                {s_ours:9.0f} new tok/s   {s_ours / s_ref:.2f}x "
          "transformers cached")
    print(f"  ours, KV cache, compiled step {s_comp:9.0f} new tok/s   {s_comp / s_ref:.2f}x "
          f"transformers cached (compile {t_compile:.1f} s)")
    print(f"  transformers, cache           {s_ref:9.0f} new tok/s")
    print(f"  transformers, no cache        {s_nc:9.0f} new tok/s   ours {s_ours / s_nc:.2f}x, "
          f"compiled {s_comp / s_nc:.2f}x")


def bench_fused(cfg, rounds=7, steps=3):
    import fused

    device = torch.device("cpu")
    torch.manual_seed(0)
    B, T = cfg.micro_batch_size, cfg.seq_len
    idx = torch.randint(0, cfg.model.vocab_size, (B, T + 1))
    x, y = idx[:, :-1], idx[:, 1:]
    print(f"model {cfg.model.n_layer}L x {cfg.model.dim}, vocabulary {cfg.model.vocab_size:,}; "
          f"micro-batch {B} x {T}; float32, {torch.get_num_threads()} threads; medians of {rounds} "
          f"alternating rounds of {steps} steps")
    variants = {"plain": {}, "fused swiglu": dict(loss=False), "chunked loss": dict(swiglu=False),
                "both": {}}
    models = {}
    for name, kw in variants.items():
        models[name] = build_model(cfg, device, torch.float32, fsdp=False)
        if name != "plain":
            fused.apply(models[name], device, **kw)

    def train_step(m):
        _, loss = m(x, y)
        loss.backward()
        m.zero_grad(set_to_none=True)

    @torch.no_grad()
    def val_step(m):
        m(x, y)

    for what, fn, names in [("training step", train_step, list(variants)),
                            ("validation forward", val_step, ["plain", "chunked loss"])]:
        times = {n: [] for n in names}
        for n in names:
            fn(models[n])  # warm-up
        for _ in range(rounds):
            for n in names:
                times[n].append(timed(lambda: fn(models[n]), steps))
        base = statistics.median(times["plain"])
        print(f"{what}:")
        for n in names:
            t = statistics.median(times[n])
            print(f"   {n:14s} {1000 * t:8.1f} ms   {base / t:5.2f}x plain")
    return 0


def bench_ckpt(folder="runs/bench_ckpt", gb=2.0, tries=3):
    import torch.distributed.checkpoint as dcp

    from checkpoint import HASH_BYTES_PER_S, WRITE_BYTES_PER_S, hash_files

    n = int(gb * 2**30 / 4 / 64)
    sd = {f"t{i}": torch.randn(n) for i in range(64)}
    writes, hashes = [], []
    for i in range(tries):
        shutil.rmtree(folder, ignore_errors=True)
        t0 = time.perf_counter()
        dcp.save(sd, checkpoint_id=folder, no_dist=True)
        for name in os.listdir(folder):
            with open(os.path.join(folder, name), "rb+") as f:
                os.fsync(f.fileno())
        t1 = time.perf_counter()
        files = hash_files(folder)
        t2 = time.perf_counter()
        size = sum(f["bytes"] for f in files.values())
        writes.append(size / (t1 - t0))
        hashes.append(size / (t2 - t1))
    shutil.rmtree(folder)
    print(f"{size / 1e9:.2f} GB as one rank's DCP shard, {tries} tries: write + fsync "
          f"{statistics.median(writes) / 1e9:.2f} GB/s (planned with "
          f"{WRITE_BYTES_PER_S / 1e9:.2f}), sha256 {statistics.median(hashes) / 1e9:.2f} GB/s "
          f"(planned with {HASH_BYTES_PER_S / 1e9:.2f})")
    return 0


def bench_data(cfg):
    """Tokenization throughput with 1 and 2 worker processes, and the reader's time per step."""
    import multiprocessing

    import data
    import prepare

    manifest = prepare.prepare(cfg, progress=False)  # nothing to do when already prepared
    tok = data.load_tokenizer(cfg.data_dir, manifest)
    docs = [d for name, spec in cfg.sources.items()
            for d in prepare.source_documents(prepare.resolve_source(name, spec), [])]
    n_bytes = sum(len(d.encode()) for d in docs)
    print(f"{len(docs):,} documents, {n_bytes / 1e6:.1f} MB; tokenizer {tok.kind}, vocab "
          f"{tok.vocab_size}")
    dtype = data.token_dtype(tok.vocab_size)
    ctx = multiprocessing.get_context("fork")
    for workers in (1, 2):
        with ctx.Pool(workers, prepare.init_tokenizer_worker, (tok.kind, tok.blob, tok.name,
                                                               dtype)) as pool:
            pool.map(prepare.encode_document, docs[:workers])  # start-up, outside the timing
            t0 = time.perf_counter()
            n_tokens = sum(len(a) for a in pool.imap(prepare.encode_document, docs, chunksize=8))
            dt = time.perf_counter() - t0
        print(f"tokenize, {workers} worker process{'es' if workers > 1 else ''}: "
              f"{n_bytes / dt / 1e6:6.2f} MB/s {n_tokens / dt:10,.0f} tok/s")

    # the reader's share of a training step of this config (one process, float32)
    reader = data.ChunkReader(cfg.data_dir, 0, cfg.seed, cfg.global_batch_size,
                              cfg.micro_batch_size)
    steps = min(reader.steps, 20)
    t0 = time.perf_counter()
    for s in range(steps):
        for micro in range(reader.accum):
            reader.batch(s, micro)
    t_read = (time.perf_counter() - t0) / steps
    model = build_model(cfg, torch.device("cpu"), torch.float32, fsdp=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        for micro in range(reader.accum):
            x, y = reader.batch(0, micro)
            _, loss = model(x, y)
            (loss / reader.accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    train_step()
    t_step = statistics.median(timed(train_step, 1) for _ in range(3))
    print(f"reader: {t_read * 1e3:.3f} ms per step of {cfg.global_batch_size} x {cfg.seq_len + 1} "
          f"tokens ({reader.accum} micro-batches), {100 * t_read / t_step:.3f}% of a {t_step:.2f} "
          "s training step")


def _tree_anon_mb(pid):
    """Anonymous resident memory (not file pages) of a process and its descendants, in MB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            pass  # the process ended between two reads
    return total / 1024


def _peak_run(cmd):
    """(wall seconds, peak resident MB, peak anonymous MB) of a command with its workers.
    Resident memory counts the pages of memory-mapped files, which the kernel drops when
    memory is short; anonymous memory is what the process really holds (sampled every 20 ms)."""
    import subprocess

    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    anon = 0.0
    while True:
        pid, status, usage = os.wait4(p.pid, os.WNOHANG)  # usage: of this process tree alone
        if pid:
            break
        anon = max(anon, _tree_anon_mb(p.pid))
        time.sleep(0.02)
    if status:
        sys.exit(f"{' '.join(cmd)} failed")
    return time.perf_counter() - t0, usage.ru_maxrss / 1024, anon


def bench_convert(rows=(1000, 15000), files=4):
    """convert-amber on synthetic releases of AMBER's shape (rows of 2,049 ids under
    32,000): peak memory as the release grows, and tokens/s with 1 and N workers."""
    import tempfile

    import convert_amber

    tmp = tempfile.mkdtemp(prefix="bench_convert_")
    _, base, base_anon = _peak_run([sys.executable, "-c", "import data"])
    print(f"python with data.py imported: {base:.0f} MB resident, {base_anon:.0f} MB anonymous")
    cores = os.cpu_count()
    for n in rows:
        src = os.path.join(tmp, f"release_{n}")
        convert_amber.write_synthetic_release(src, files, n // files, seed=n)
        mb = sum(os.path.getsize(p) for p in convert_amber.release_files(src)) / 1e6
        tokens = n * 2049
        for workers in sorted({1, cores}):
            out = os.path.join(tmp, f"out_{n}_{workers}")
            t0 = time.perf_counter()  # in this process: the rate without the interpreter's start-up
            convert_amber.convert_amber(src, out, workers=workers, progress=False)
            rate = tokens / (time.perf_counter() - t0)
            shutil.rmtree(out)
            _, peak, anon = _peak_run([sys.executable, "convert_amber.py", src, out,
                                       f"--workers={workers}"])
            print(f"{n:6,d} rows ({mb:4.0f} MB of JSON), {workers} "
                  f"worker{'s' if workers > 1 else ' '}: {rate / 1e6:5.2f}M tok/s "
                  f"({rate / workers / 1e6:.2f}M per worker), peak {peak:4.0f} MB resident "
                  f"(largest process), {anon:4.0f} MB anonymous (all processes)")
            shutil.rmtree(out)
        shutil.rmtree(src)
    print(f"AMBER's 1.26T tokens at the last per-worker rate on 64 cores: "
          f"{1.26e12 / (rate / workers * 64) / 3600:.1f} h (if the disk keeps up: 2.5 TB written, "
          "7.5 TB read)")
    shutil.rmtree(tmp)


def bench_prepare(docs=(20000, 80000)):
    """`prepare.py CONFIG` on a corpus of made-up JSON-lines documents and on one 4x larger:
    peak resident memory and time of the whole preparation (tokenizer, packing, shuffle)."""
    import json
    import random
    import tempfile

    tmp = tempfile.mkdtemp(prefix="bench_prepare_")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(5000)]
    for n in docs:
        corpus = os.path.join(tmp, f"corpus_{n}.jsonl")
        with open(corpus, "w") as f:
            for _ in range(n):
                f.write(json.dumps({"text": " ".join(rng.choice(words)
                                                     for _ in range(rng.randint(50, 400)))}) + "\n")
        # a tokenizer trained once, then given: its training sample is capped apart
        if n == docs[0]:
            import prepare

            tok = prepare.train_sentencepiece(prepare.sample_lines(
                [prepare.resolve_source("web", {"path": corpus, "format": "jsonl"})], 0), 4096)
            with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
                f.write(tok)
        cfg_path = os.path.join(tmp, f"prepare_{n}.py")
        with open(cfg_path, "w") as f:
            f.write(f"model = 'tiny'\nsources = {{'web': {{'path': {corpus!r}, 'format': "
                    f"'jsonl'}}}}\ntokenizer = {os.path.join(tmp, 'tokenizer.model')!r}\n"
                    f"data_dir = {os.path.join(tmp, f'data_{n}')!r}\nseq_len = 256\nn_chunks = "
                    "16\nnum_workers = 1\n")
        dt, peak, anon = _peak_run([sys.executable, "prepare.py", cfg_path])
        with open(os.path.join(tmp, f"data_{n}", "manifest.json")) as f:
            tokens = json.load(f)["totals"]["train_tokens"]
        print(f"{n:7,d} documents ({os.path.getsize(corpus) / 1e6:5.0f} MB, {tokens / 1e6:6.1f}M "
              f"training tokens): {dt:6.1f} s, peak {peak:4.0f} MB resident, {anon:4.0f} MB "
              "anonymous")
    # fine-tuning's preparation (finetune.prepare): conversations rendered into rows of 2,049 ids
    code = ("import sys, config, data, finetune; tok = data.Tokenizer('sentencepiece', "
            "open(sys.argv[1], 'rb').read()); "
            "finetune.prepare(config.config_from_dict(dict(finetune_data=sys.argv[2], "
            "data_dir=sys.argv[3], seq_len=2048, max_seq_len=2048)), tok)")
    for n in (docs[0] // 4, docs[0]):
        convs = os.path.join(tmp, f"sft_{n}.jsonl")
        with open(convs, "w") as f:
            for _ in range(n):
                f.write(json.dumps({"instruction": " ".join(rng.choice(words)
                                                            for _ in range(rng.randint(20, 100))),
                                    "output": " ".join(rng.choice(words)
                                                       for _ in range(rng.randint(50, 300)))})
                        + "\n")
        dt, peak, anon = _peak_run([sys.executable, "-c", code,
                                    os.path.join(tmp, "tokenizer.model"), convs,
                                    os.path.join(tmp, f"sft_data_{n}")])
        print(f"finetune.prepare, {n:6,d} conversations ({os.path.getsize(convs) / 1e6:4.0f} MB; "
              f"rows of 2,049 int32 ids: {n * 2049 * 4 / 1e6:4.0f} MB): {dt:5.1f} s, peak "
              f"{peak:4.0f} MB resident, {anon:4.0f} MB anonymous")
    shutil.rmtree(tmp)


def bench_eval(cfg, n_items=40, n_shots=5):
    """Multiple-choice items/s, 4 choices and a few-shot context: our scorer against
    lm_eval's HFLM on the exported Hugging Face copy of the same weights."""
    import random
    import tempfile

    import transformers
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    import data
    import evaluate as ev
    import prepare
    from hf_format import hf_tokenizer_files, save_hf

    manifest = prepare.prepare(cfg, progress=False)
    tok = data.load_tokenizer(cfg.data_dir, manifest)
    model = build_model(cfg, torch.device("cpu"), torch.float32, fsdp=False)
    model.eval()
    rng = random.Random(0)
    words = "the of and to in is was for on that with as by at from his her which or be".split()

    def w(n):
        return " ".join(rng.choice(words) for _ in range(n))

    rows = [{"question": w(12) + "?", "choices": {"text": [w(3) for _ in range(4)],
                                                  "label": list("ABCD")},
             "answerKey": "ABCD"[i % 4]} for i in range(n_items + n_shots)]
    docs, shots = rows[:n_items], rows[n_items:]
    ctxs = ev.contexts("arc_challenge", docs, shots, n_shots)
    requests = [Instance(request_type="loglikelihood", doc=d, arguments=(c, " " + choice), idx=i)
                for d, c in zip(docs, ctxs) for i, choice in enumerate(d["choices"]["text"])]
    with tempfile.TemporaryDirectory() as folder:
        save_hf(model, folder, bos_token_id=tok.eos_id, eos_token_id=tok.eos_id)
        for name, blob in hf_tokenizer_files(tok, cfg.model.max_seq_len).items():
            with open(os.path.join(folder, name), "wb") as f:
                f.write(blob)
        hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
        hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    lm = HFLM(pretrained=hf, tokenizer=hf_tok, batch_size=16, max_length=cfg.model.max_seq_len)
    n_tokens = statistics.mean(len(tok.encode(c)) for c in ctxs)
    print(f"{n_items} items, 4 choices, {n_shots}-shot contexts of {n_tokens:.0f} tokens on "
          "average")

    def ours():
        ev.multiple_choice(model, tok, "arc_challenge", docs, shots, n_shots)

    def theirs():
        lm.loglikelihood(requests, disable_tqdm=True)

    ours(), theirs()
    t_ours, t_theirs = [], []
    for _ in range(3):
        t_ours.append(timed(ours, 1))
        t_theirs.append(timed(theirs, 1))
    a, b = n_items / statistics.median(t_ours), n_items / statistics.median(t_theirs)
    print(f"ours (shared context, KV cache)     {a:7.1f} items/s")
    print(f"lm_eval HFLM (batch 16)             {b:7.1f} items/s   ours {a / b:.2f}x")


def bench_figures(run_dir="runs/tiny", reps=5):
    """Seconds to redraw a run's training.png (train.py does it at every checkpoint),
    against the run's mean training time per chunk (its steps' step_time)."""
    import json

    from plot import plot_run, warm_figures

    if not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        sys.exit(f"error: {run_dir}/metrics.jsonl not found; train first (python train.py "
                 "configs/tiny.py)")
    per_chunk = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for r in map(json.loads, f):
            if "step_time" in r:
                per_chunk[r["pos"]] = per_chunk.get(r["pos"], 0.0) + r["step_time"]
    warm = timed(warm_figures, 1)  # train.py does this in a thread while the first chunk trains
    first = timed(lambda: plot_run(run_dir), 1)
    again = statistics.median(timed(lambda: plot_run(run_dir), 1) for _ in range(reps))
    chunk = statistics.mean(per_chunk.values())
    print(f"{run_dir}: {len(per_chunk)} chunks of {chunk:.1f} s of training on average")
    print("warm-up (matplotlib import and one off-screen draw, in a background thread): "
          f"{warm:.3f} s")
    print(f"training.png: first draw {first:.3f} s ({100 * first / chunk:.2f}% of a chunk), then "
          f"{again:.3f} s ({100 * again / chunk:.2f}%, median of {reps})")


def bench_trace(data_dir="data/tiny", spans=200, span_len=32):
    """tracing.py at the main job's data: the index build (ours, from the chunk files) in
    tokens/s against infini-gram's own pipeline from JSON lines of the same rows' text (the
    one way it runs offline: UTF-8 bytes, no tokenizer), and peak memory as the data grows
    4x (a remix of every source at weight 4); query latency of a 32-token span; the
    memorization-duplication pass on runs/tiny if memorize.py has results there."""
    import json
    import subprocess
    import tempfile

    import data
    import remix
    import index

    if not os.path.exists(os.path.join(data_dir, "manifest.json")):
        sys.exit(f"error: {data_dir} is not prepared; run python train.py configs/tiny.py first")
    manifest = data.load_manifest(data_dir)
    tokens = sum(e["sequences"] for e in manifest["chunks"]) * (manifest["seq_len"] + 1)
    work = tempfile.mkdtemp(prefix="bench_trace_")
    big = os.path.join(work, "x4")
    remix.remix(data_dir, big, {s["name"]: 4 for s in manifest["sources"]}, progress=False)
    code = "import sys, index; index.build(sys.argv[1], progress=False)"
    for name, folder, n in (("1x", os.path.join(work, "x1"), tokens), ("4x", big, 4 * tokens)):
        if name == "1x":
            shutil.copytree(data_dir, folder, ignore=shutil.ignore_patterns("index"))
        seconds, rss, anon = _peak_run([sys.executable, "-c", code, folder])
        print(f"index {name}: {n:,} tokens in {seconds:.1f} s, {n / seconds / 1e6:.2f}M tokens/s; "
              f"peak resident {rss:.0f} MB, anonymous {anon:.0f} MB")
    # infini-gram's own pipeline from JSON lines: the same rows as text
    tok = data.load_tokenizer(data_dir)
    raw = os.path.join(work, "jsonl")
    os.makedirs(raw)
    with open(os.path.join(raw, "rows.jsonl"), "w") as f:
        for entry in manifest["chunks"]:
            for row in data.open_split(data_dir, entry, verify=False)[0]:
                f.write(json.dumps({"text": tok.decode(row)}) + "\n")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "infini_gram.indexing", "--data_dir", raw, "--save_dir",
                    os.path.join(work, "theirs"), "--token_dtype", "u8", "--mem", "2", "--cpus",
                    "1", "--ulimit", "1024"], check=True, capture_output=True)
    seconds = time.perf_counter() - t0
    text_bytes = os.path.getsize(os.path.join(work, "theirs", "tokenized.0"))
    print(f"infini-gram's pipeline from JSON lines: {text_bytes:,} bytes of the same rows' text in "
          f"{seconds:.1f} s, {text_bytes / seconds / 1e6:.2f}M byte-tokens/s (ours above: "
          f"{tokens:,} tokens of 2 bytes)")
    # query latency: spans drawn from the data
    found = index.Index(os.path.join(work, "x1"))
    rng = np.random.default_rng(0)
    rows = data.open_split(data_dir, manifest["chunks"][0], verify=False)[0]
    times = []
    for _ in range(spans):
        r, i = rng.integers(len(rows)), rng.integers(rows.shape[1] - span_len)
        t0 = time.perf_counter()
        found.occurrences(rows[r, i : i + span_len].tolist(), limit=10)
        times.append(time.perf_counter() - t0)
    print(f"query of a {span_len}-token span (count, rows, positions): median "
          f"{1e3 * np.median(times):.2f} ms, p99 {1e3 * np.percentile(times, 99):.2f} ms over "
          f"{spans}")
    shutil.rmtree(work)
    if os.path.isdir("runs/tiny/memorization"):
        import trace

        index.build("runs/tiny", progress=False)
        t0 = time.perf_counter()
        trace.duplication("runs/tiny")
        with open("runs/tiny/memorization/duplication.csv") as f:
            n = sum(1 for _ in f) - 1
        print(f"memorization-duplication pass on runs/tiny: {n} scored sequences in "
              f"{time.perf_counter() - t0:.1f} s")


def _rank_pids(pid):
    """The worker processes of a torchrun launcher: its children (the ranks, in start order)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _anon_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def _run_watched(cmd, env, log, until=None):
    """Run a torchrun command, its output appended to `log`; SIGKILL it and its ranks as
    soon as until() is true. Returns (exit status, wall seconds, peak anonymous MB of each
    rank, sampled every 50 ms)."""
    import signal
    import subprocess

    t0 = time.perf_counter()
    with open(log, "a") as out:
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    peaks, ranks = {}, []
    while p.poll() is None:
        ranks = _rank_pids(p.pid) or ranks
        for r, pid in enumerate(ranks):
            peaks[r] = max(peaks.get(r, 0.0), _anon_mb(pid))
        if until and until():  # the ranks too: torchrun starts each in a session of its own
            for pid in [p.pid] + ranks:
                os.kill(pid, signal.SIGKILL)
            p.wait()
            while any(os.path.exists(f"/proc/{pid}") and _anon_mb(pid) for pid in ranks):
                # a killed rank frees its memory (and the run dir's lock) before it is gone
                time.sleep(0.1)
            break
        time.sleep(0.05)
    return p.returncode, time.perf_counter() - t0, [peaks[r] for r in sorted(peaks)]


def bench_rehearsal(folder="runs/rehearsal"):
    """AMBER's real tensors on two CPU ranks: configs/amber_7b.py with 2 of its 32 layers
    (dim 4,096, MLP 11,008, vocabulary 32,000, sequences of 2,048: 0.67B parameters) under
    torchrun --nproc_per_node=2 with FSDP2, on a synthetic release of 8 rows. One chunk of
    4 steps of 2 sequences, a rolling checkpoint every 2 steps: the run is SIGKILLed once
    step 3 is logged, then the same command resumes from the step-2 checkpoint, trains
    steps 3 and 4 and writes ckpt_000. Printed: each rank's peak memory against the dry
    run's estimate, the checkpoint's parts (weights gathered to rank 0, the DCP optimizer
    shards, hashing) in seconds and bytes, and whether the resumed step 3 is bitwise the
    killed run's. About 10 GB of memory per rank and 17 GB of disk; minutes."""
    import json
    import subprocess

    import convert_amber

    shutil.rmtree(folder, ignore_errors=True)
    release, data_dir, run_dir = (os.path.join(folder, n) for n in ("release", "data", "run"))
    convert_amber.write_synthetic_release(release, 1, 8, seed=0)
    convert_amber.convert_amber(release, data_dir, workers=1, progress=False)
    args = ["configs/amber_7b.py", f"--data_dir={data_dir}", f"--out_dir={run_dir}", "--n_layer=2",
            "--n_chunks=1", "--global_batch_size=2", "--micro_batch_size=1", "--ckpt_interval=2",
            "--val_sequences=0", "--warmup_steps=2"]
    # CPU ranks, also on a machine with one GPU
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    dry = subprocess.run([sys.executable, "train.py", *args, "--dry_run=True",
                          "--dry_run_world_size=2"],
                         capture_output=True, text=True, env=env, check=True).stdout
    print(next(line for line in dry.splitlines() if line.startswith("model ")))
    print(next(line for line in dry.splitlines() if line.startswith("memory/device")), "(dry run)")
    # torchrun
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "train.py", *args]
    metrics = os.path.join(run_dir, "metrics.jsonl")

    def steps():
        try:
            with open(metrics) as f:
                return {r["step"]: r for r in map(json.loads, f) if "loss" in r}
        except (OSError, ValueError):
            return {}

    log = os.path.join(folder, "output.log")
    rc, seconds, peaks = _run_watched(cmd, env, log, until=lambda: 3 in steps())
    killed = steps()[3]
    print(f"run 1: {seconds:.0f} s to step 3 ({killed['step_time']:.1f} s a step, "
          f"{killed['tok_per_s']:,.0f} tok/s, " + (f"MFU {100 * killed['mfu']:.1f}% of bf16 matmul"
                                                   if killed["mfu"] is not None else "MFU unknown")
          + "); SIGKILLed; peak anonymous memory per rank "
          + ", ".join(f"{m / 1024:.2f} GiB" for m in peaks))
    rc, seconds, peaks = _run_watched(cmd, env, log)
    if rc:
        sys.exit(f"the resumed run failed (exit status {rc}); see {log}")
    with open(os.path.join(run_dir, "ledger.jsonl")) as f:
        ledger = [json.loads(line) for line in f]
    resume = next(e for e in ledger if e["event"] == "resume")
    ckpt = next(e for e in ledger if e["event"] == "checkpoint")
    again = steps()[3]
    print(f"run 2: resumed from {resume['checkpoint']} at step {resume['step']}, finished in "
          f"{seconds:.0f} s; peak anonymous memory per rank "
          + ", ".join(f"{m / 1024:.2f} GiB" for m in peaks) + "; peak resident (the ranks' own "
          "count, file pages included) " + ", ".join(f"{m:.2f} GiB" for m in ckpt["peak_mem_gb"]))
    with open(os.path.join(run_dir, "ckpt_000", "state.json")) as f:
        files = json.load(f)["files"]
    parts = {"model.safetensors": 0, "optimizer/ (DCP shards)": 0, "rng": 0}
    for name, f in files.items():
        parts["model.safetensors" if name == "model.safetensors" else "rng"
              if name.startswith("rng") else "optimizer/ (DCP shards)"] += f["bytes"]
    print(f"ckpt_000: {ckpt['seconds']:.1f} s in all: weights gathered to rank 0 and written "
          f"{ckpt['weights_s']:.1f} s, optimizer shards {ckpt['optimizer_s']:.1f} s, sha256 of "
          f"{len(files)} files on 2 ranks {ckpt['hash_s']:.1f} s "
          f"({ckpt['bytes'] / ckpt['hash_s'] / 1e9:.2f} GB/s); {ckpt['bytes'] / 1e9:.2f} GB: "
          + ", ".join(f"{k} {v / 1e9:.3f} GB" for k, v in parts.items()))
    same = all(killed[k] == again[k] for k in ("loss", "grad_norm", "lr", "tokens"))
    print(f"step 3 after the resume: loss {again['loss']!r} (killed run {killed['loss']!r}), grad "
          f"norm {again['grad_norm']!r} ({killed['grad_norm']!r}): "
          f"{'bitwise equal' if same else 'DIFFERENT'}")
    shutil.rmtree(folder)
    return 0 if same else 1


def bench_layers(cfg, rounds=7, steps=5):
    """A training step (step.train_step) with and without the per-layer norms of
    layer_stats_interval, alternating, on random rows: medians and their ratio."""
    device = torch.device("cpu")
    model = build_model(cfg, device, torch.float32, fsdp=False)
    speed_up(model, cfg, device)
    run = step.one_process_run(cfg, model, device, nullcontext())
    ids = torch.randint(0, cfg.model.vocab_size, (cfg.micro_batch_size, cfg.seq_len + 1))
    batches = iter(lambda: (ids[:, :-1], ids[:, 1:]), None)
    times = {False: [], True: []}
    for _ in range(rounds):
        for layers in (False, True):
            t0 = time.perf_counter()
            for _ in range(steps):
                step.train_step(run, batches, 1e-4, layers=layers)
            times[layers].append((time.perf_counter() - t0) / steps)
    plain, with_layers = (statistics.median(times[k]) for k in (False, True))
    print(f"a step {plain * 1e3:.1f} ms, with the layers' norms {with_layers * 1e3:.1f} ms "
          f"({with_layers / plain:.3f}x; medians of {rounds} alternating rounds of {steps})")


if __name__ == "__main__":
    args = sys.argv[1:]
    mode = args.pop(0) if args and args[0] in ("model", "data", "eval", "convert", "prepare",
                                               "figures", "gpu", "trace", "rehearsal", "fused",
                                               "ckpt", "layers") else "model"
    if mode == "trace":
        sys.exit(bench_trace(*args))
    if mode == "rehearsal":
        sys.exit(bench_rehearsal(*args))
    if mode == "gpu":  # the GPU check has a file of its own
        import gpu_check

        sys.exit(gpu_check.main(args))
    if mode == "ckpt":
        opts = parse_options([a for a in args if a.startswith("--")])
        sys.exit(bench_ckpt(*[a for a in args if not a.startswith("--")],
                            **{k: float(v) for k, v in opts.items()}))
    if mode == "figures":
        sys.exit(bench_figures(*args))
    if mode in ("convert", "prepare"):
        sys.exit({"convert": bench_convert, "prepare": bench_prepare}[mode]())
    try:
        cfg = load_config([a for a in args if a != "--compile"] or ["configs/tiny.py"])
    except ConfigError as e:
        sys.exit(f"error: {e}")
    {"model": main, "data": bench_data, "eval": bench_eval, "fused": bench_fused,
     "layers": bench_layers}[mode](cfg)
