"""
The pre-training run: a loop over data chunks, one checkpoint after each.

    python train.py CONFIG [--key=value ...]                 one process (CPU or one GPU)
    torchrun --nproc_per_node=N train.py CONFIG              data parallel: DDP, or FSDP2 (parallel="fsdp")
    python train.py CONFIG --dry_run=True                    the plan, without allocating the model
    python train.py verify RUN_DIR                           check checkpoints, metrics and data; change nothing

Running the same command again resumes from the newest complete checkpoint, and
a resumed run is bitwise identical to an uninterrupted one on a CPU (with one thread,
or MKL_CBWR=COMPATIBLE: MKL's multi-threaded matmul differs from process to process). The run dir
(out_dir) holds:

    config.json, run.json      the resolved config; git commit, versions, devices
    metrics.jsonl              one line per optimizer step (+ validation lines)
    ledger.jsonl               events: start, resume, checkpoint, skipped chunk, finish
    training.png               loss, validation loss, LR, grad norm, tokens/s; redrawn at each checkpoint
    ckpt_000 ... ckpt_N        after schedule position c: model.safetensors (float32),
                               optimizer.pt (AdamW state; a torch.distributed.checkpoint
                               folder `optimizer/` under FSDP), rng_rank*.pt, and state.json
                               (the run's state, and the size and sha256 of every other file)
    ckpt_rolling               the newest mid-chunk checkpoint, when ckpt_interval > 0

A resume verifies the newest checkpoint against those hashes. A damaged one (a disk
error, a truncated copy) is moved aside as ckpt_NNN.damaged-TIME and the run resumes
from the newest intact one, with metrics.jsonl cut back to it.

Tests inject faults with the environment variable LLM360_FAULT: "step:N" kills
the process (SIGKILL) after optimizer step N, "save:N" in the middle of writing
the N-th checkpoint.
"""

import contextlib
import hashlib
import json
import math
import os
import platform
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
from config import ConfigError, config_to_dict, format_config, load_config, os_error_line, save_config, writing
from model import Transformer

# -----------------------------------------------------------------------------
# distributed setup


def init_distributed():
    """(rank, world_size, device). torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; the
    backend is NCCL on CUDA and gloo on CPU, so every mode runs on a laptop too."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world_size, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, world_size, device


def rank_token(world_size):
    """A token from rank 0, the same on every rank; call it when all ranks start a job
    that ends in wait_for_ranks."""
    token = [os.urandom(8).hex()]
    if world_size > 1:
        dist.broadcast_object_list(token, src=0)
    return token[0]


def wait_for_ranks(folder, token, rank, world_size, poll_s=2.0):
    """Let rank 0 go on once every rank has reached this point, with no timeout: a rank
    of an evaluation may wait hours for the others, and a collective barrier would time
    out (NCCL's default is 10 minutes). Each rank leaves a file holding the job's token;
    rank 0 polls for them, then removes them. Other ranks return at once (torchrun stops
    every rank if one of them fails, so rank 0 never waits for a dead one)."""
    if world_size == 1:
        return
    marks = [os.path.join(folder, f".rank{r}.done") for r in range(world_size)]
    with open(marks[rank], "w") as f:
        f.write(token)
    if rank != 0:
        return

    def done(path):
        with contextlib.suppress(OSError), open(path) as f:
            return f.read() == token
        return False

    while not all(done(p) for p in marks):
        time.sleep(poll_s)
    for p in marks:
        os.remove(p)


def print0(*args, rank=0, **kwargs):
    if rank == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(x, world_size):
    if world_size > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier(world_size):
    if world_size > 1:
        dist.barrier()


# -----------------------------------------------------------------------------
# the schedule


def get_lr(step, cfg, total_steps):
    """LR at optimizer step `step` (0-based): linear warmup from 0 to cfg.lr over
    warmup_steps, then cosine (AMBER) or linear (CrystalCoder) decay to min_lr at
    total_steps, and min_lr after that."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= total_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    if cfg.lr_schedule == "cosine":
        return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
    return cfg.lr - progress * (cfg.lr - cfg.min_lr)


def chunk_steps(manifest, chunk, global_batch_size):
    return manifest["chunks"][chunk]["sequences"] // global_batch_size


def stage_dirs(config):
    """The data dirs a run trains on, in order: its stages, or its one data_dir (a Config or its dict)."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k)
    return list(get("stages") or [get("data_dir")])


def chunk_table(dirs):
    """[(data dir, manifest, chunk inside it)] for every chunk of every stage. The run's
    schedule counts chunks over all stages: stage 2's first chunk follows stage 1's last."""
    table = []
    for d in dirs:
        manifest = data.load_manifest(d)
        table += [(d, manifest, c) for c in range(len(manifest["chunks"]))]
    return table


def check_data_config(cfg, manifest):
    """Refuse a config whose sources, tokenizer, val_fraction, seq_len, n_chunks or seed
    differ from those its data_dir was prepared with (data.py refuses it alike)."""
    saved, wanted = manifest.get("config", {}), data.data_config(cfg)
    if "sources" not in saved or saved == wanted:  # converted releases record no sources
        return
    changed = [k for k in wanted if saved.get(k) != wanted[k]]
    shown = ", ".join(f"{k}={saved.get(k)!r} there, {wanted[k]!r} here" if k != "sources" else "sources differ"
                      for k in changed)
    raise ConfigError(f"{cfg.data_dir} was prepared with another data config ({shown}); set another data_dir to "
                      "prepare this one, or drop the changed keys to train on it as it is")


def grad_accum(cfg, world_size):
    per_step = cfg.micro_batch_size * world_size
    if cfg.global_batch_size % per_step:
        raise ConfigError(f"global_batch_size={cfg.global_batch_size} is not divisible by micro_batch_size x world "
                          f"size = {cfg.micro_batch_size} x {world_size}; change global_batch_size or micro_batch_size")
    return cfg.global_batch_size // per_step


# -----------------------------------------------------------------------------
# checkpoints


def _fault(kind, n):
    """Tests: SIGKILL this process at a given point (LLM360_FAULT="step:N" or "save:N")."""
    if os.environ.get("LLM360_FAULT") == f"{kind}:{n}":
        os.kill(os.getpid(), signal.SIGKILL)


def full_state_dict(raw_model, fsdp):
    """Float32 CPU tensors of every parameter; the tied output head is stored once."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = raw_model.state_dict()
    if raw_model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.detach().to(device="cpu", dtype=torch.float32).contiguous() for k, v in sd.items()}


def save_checkpoint(path, raw_model, optimizer, state, cfg, rank, world_size, fsdp, n_saved):
    """Write a checkpoint folder atomically: everything into path.tmp, then one rename."""
    tmp = path + ".tmp"
    check_free_space(os.path.dirname(path), 12 * raw_model.num_params(), rank, world_size)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier(world_size)
    try:
        with writing(tmp):
            _write_checkpoint(tmp, path, raw_model, optimizer, state, cfg, rank, world_size, fsdp, n_saved)
    except OSError:
        if rank == 0:  # a full disk: give back what the unfinished checkpoint took
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_checkpoint(tmp, path, raw_model, optimizer, state, cfg, rank, world_size, fsdp, n_saved):
    from safetensors.torch import save_file

    model_sd = full_state_dict(raw_model, fsdp)  # collective under FSDP
    if rank == 0:
        save_file(model_sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    if fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        dcp.save(get_optimizer_state_dict(raw_model, optimizer), checkpoint_id=os.path.join(tmp, "optimizer"))
    elif rank == 0:
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
               os.path.join(tmp, f"rng_rank{rank}.pt"))
    _fault("save", n_saved)
    barrier(world_size)
    files = hash_files(tmp, rank, world_size)  # collective: each rank hashes a share
    if rank == 0:
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(state | {"config": config_to_dict(cfg), "world_size": world_size, "files": files}, f, indent=1)
        if os.path.exists(path):  # the rolling checkpoint: replace the previous one
            shutil.rmtree(path)
        os.rename(tmp, path)
    barrier(world_size)


class CheckpointError(data.DataError):
    pass


def read_state(path):
    """The state.json of a checkpoint folder, or None when it is missing or unreadable."""
    try:
        with open(os.path.join(path, "state.json")) as f:
            state = json.load(f)
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8
        return None
    return state if isinstance(state, dict) and {"pos", "step", "config"} <= set(state) else None


def checkpoint_names(out_dir):
    """ckpt_NNN and ckpt_rolling folders of a run dir; never *.tmp (being written) or
    *.damaged-TIME (moved aside)."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(n for n in os.listdir(out_dir) if (n[5:].isdigit() or n == "ckpt_rolling") and n.startswith("ckpt_")
                  and os.path.isdir(os.path.join(out_dir, n)))


def _size(n):
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.2f} MiB"


def check_free_space(folder, needed, rank=0, world_size=1):
    """Stop before writing a checkpoint that cannot fit (float32 weights and both AdamW
    moments: 12 bytes a parameter, 84 GB at 7B), rather than fail in the middle of it.
    Rank 0 looks and every rank stops alike."""
    free = [shutil.disk_usage(folder).free if rank == 0 else 0]
    if world_size > 1:
        dist.broadcast_object_list(free, src=0)
    if free[0] < needed * 1.01:
        newest = find_checkpoint(folder)
        raise CheckpointError(f"{folder}: {_size(free[0])} free, a checkpoint needs about {_size(needed)}; free space "
                              "and run the same command again (it resumes from "
                              f"{os.path.basename(newest) if newest else 'the start'})")


def find_checkpoint(out_dir, chunk_ends_only=False):
    """The newest complete checkpoint of a run dir, or None. Folders without a readable
    state.json are left out (resume_point moves the newer of them aside). chunk_ends_only:
    leave out the rolling mid-chunk checkpoint."""
    best, best_key = None, None
    for name in checkpoint_names(out_dir):
        st = read_state(os.path.join(out_dir, name))
        if st is None or (chunk_ends_only and name == "ckpt_rolling"):
            continue
        key = (st["pos"], st["step"])  # positions only grow; a rolling checkpoint is ahead of the last chunk's
        if best_key is None or key > best_key:
            best, best_key = os.path.join(out_dir, name), key
    return best


def hash_files(folder, rank=0, world_size=1):
    """{relative path: {"bytes", "sha256"}} of every file under a checkpoint folder but
    state.json. Collective: rank r hashes files r, r + world_size, ... (a 7B checkpoint is
    80 GB; sha256 runs at about 1.4 GB/s a core)."""
    names = [sorted(os.path.relpath(os.path.join(root, f), folder) for root, _, fs in os.walk(folder) for f in fs
                    if f != "state.json" or root != folder)]
    if world_size > 1:
        dist.broadcast_object_list(names, src=0)  # rank 0's listing: every rank hashes from the same list
    mine = {n: {"bytes": os.path.getsize(os.path.join(folder, n)), "sha256": data.sha256_file(os.path.join(folder, n))}
            for n in names[0][rank::world_size]}
    if world_size > 1:
        parts = [None] * world_size
        dist.all_gather_object(parts, mine)
        mine = {k: v for part in parts for k, v in part.items()}
    return dict(sorted(mine.items()))


def verify_checkpoint(path, rank=0, world_size=1):
    """What is wrong with a checkpoint folder: [] when every file its state.json records is
    there with its size and sha256. Collective when the sizes match (the hashing is shared).
    Checkpoints written before files were recorded are taken as they are."""
    state = read_state(path)
    if state is None:
        return ["state.json is missing or not valid JSON"]
    files = state.get("files")
    if files is None:
        return []
    problems = []
    for name, rec in files.items():
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            problems.append(f"{name} is missing")
        elif os.path.getsize(p) != rec["bytes"]:
            problems.append(f"{name} has {os.path.getsize(p):,} bytes, {rec['bytes']:,} were written")
    if problems:
        return problems
    got = hash_files(path, rank, world_size)
    return [f"{n}: sha256 differs from the one written" for n, rec in files.items() if got[n]["sha256"] != rec["sha256"]]


def resume_point(out_dir, log, rank=0, world_size=1):
    """The newest intact checkpoint of a run dir, or None. A damaged one that is newer (a
    file missing, truncated or changed since it was written; state.json unreadable) is
    moved aside as NAME.damaged-TIME, said in one line and in the ledger, and the next
    newest is tried. Older checkpoints are not read past state.json: a damaged one of them
    never blocks a resume (python train.py verify RUN_DIR finds it)."""
    while True:
        best = find_checkpoint(out_dir)
        best_pos = read_state(best)["pos"] if best else -1
        damaged = {}
        for name in checkpoint_names(out_dir):  # unreadable state.json: newer than best by its name?
            path = os.path.join(out_dir, name)
            if read_state(path) is None and (name == "ckpt_rolling" or int(name[5:]) + 1 > best_pos):
                damaged[path] = ["state.json is missing or not valid JSON"]
        if best and not damaged:
            problems = verify_checkpoint(best, rank, world_size)
            if not problems:
                return best
            damaged[best] = problems
        if not damaged:
            return None
        if rank == 0:
            for path, problems in damaged.items():
                aside = f"{path}.damaged-{time.strftime('%Y%m%dT%H%M%S')}"
                os.rename(path, aside)
                log.event("damaged_checkpoint", checkpoint=os.path.basename(path), moved_to=os.path.basename(aside),
                          problems=problems)
                print(f"{path} is damaged ({'; '.join(problems[:3])}{'; ...' if len(problems) > 3 else ''}): "
                      f"moved aside to {os.path.basename(aside)}; resuming from the newest intact checkpoint",
                      flush=True)
        barrier(world_size)


def verify_run(out_dir):
    """python train.py verify RUN_DIR: every checkpoint against the sizes and sha256 its
    state.json recorded, metrics.jsonl line by line, and every chunk of the data dirs
    against its manifest; one line each. Returns the number of problems (the exit status
    is 1 when there are any). Nothing is changed."""
    bad = 0
    if not os.path.isdir(out_dir):
        raise CheckpointError(f"{out_dir}: no such run dir")
    names = checkpoint_names(out_dir)
    for name in names:
        path = os.path.join(out_dir, name)
        problems = verify_checkpoint(path)
        st = read_state(path)
        if problems:
            bad += 1
            print(f"{name:14s} DAMAGED: {'; '.join(problems)}")
        elif "files" not in st:
            print(f"{name:14s} not checked: written before checkpoints recorded their files")
        else:
            print(f"{name:14s} ok ({len(st['files'])} files, {sum(r['bytes'] for r in st['files'].values()) / 1e6:,.1f} MB)")
    newest = find_checkpoint(out_dir)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if os.path.exists(metrics_path):
        n, broken = 0, []
        with open(metrics_path, "rb") as f:
            for n, line in enumerate(f, 1):
                try:
                    json.loads(line)
                except ValueError:
                    broken.append(n)
        need = read_state(newest).get("metrics_lines", 0) if newest else 0
        if broken or n < need:
            bad += 1
            print(f"metrics.jsonl  DAMAGED: {f'lines {broken[:5]} are not JSON; ' if broken else ''}{n} lines, "
                  f"the newest checkpoint counted {need}")
        else:
            print(f"metrics.jsonl  ok ({n} lines)")
    config_path = os.path.join(out_dir, "config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            dirs = stage_dirs(json.load(f))
        for d in dirs:
            try:
                manifest = data.load_manifest(d)
                for entry in manifest["chunks"] + ([manifest["val"]] if manifest.get("val") else []):
                    data.open_split(d, entry, verify=True)
                print(f"{d}  ok ({len(manifest['chunks'])} chunks)")
            except data.DataError as e:
                bad += 1
                print(f"{d}  DAMAGED: {e}")
    if not names:
        print(f"{out_dir} holds no checkpoints")
    return bad


def load_model(ckpt_dir, device="cpu"):
    """The Transformer of a checkpoint folder (for evaluate.py and memorize.py)."""
    from safetensors.torch import load_file

    from config import config_from_dict

    state = read_state(ckpt_dir)
    if state is None:
        raise CheckpointError(f"{ckpt_dir}/state.json is missing or not valid JSON: the checkpoint is damaged")
    weights = os.path.join(ckpt_dir, "model.safetensors")
    written = state.get("files", {}).get("model.safetensors")
    if written and (not os.path.exists(weights) or data.sha256_file(weights) != written["sha256"]):
        raise CheckpointError(f"{weights} is missing or differs from the file written (sha256 in state.json): the "
                              f"checkpoint is damaged; `python train.py verify {os.path.dirname(ckpt_dir) or '.'}` "
                              "checks the whole run")
    model = Transformer(config_from_dict(state["config"]).model)
    _load_weights(model, load_file(weights), ckpt_dir)
    return model.to(device)


def _load_weights(model, sd, where):
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings)]:
        raise ConfigError(f"{where}: weights do not fit this model (missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}); it was saved by a model of another shape")


def load_init_from(cfg, raw_model, optimizer, data_sha, rank, fsdp):
    """Start a new run from cfg.init_from: a checkpoint of ours (its weights, and its AdamW
    state when cfg.init_optimizer) or a Hugging Face folder (weights: AMBER's release)."""
    path = cfg.init_from
    if os.path.exists(os.path.join(path, "state.json")):
        problems = verify_checkpoint(path, rank, dist.get_world_size() if dist.is_initialized() else 1)
        if problems:
            raise CheckpointError(f"init_from={path!r} is damaged ({'; '.join(problems)}); start from another checkpoint")
        check_resumable(read_state(path) | {"data_manifest_sha256": data_sha}, cfg, data_sha, path)
        load_checkpoint(path, raw_model, optimizer, rank, fsdp, load_optimizer=cfg.init_optimizer)
        return
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ConfigError(f"init_from={path!r} is neither a checkpoint of ours (state.json) nor a Hugging Face "
                          "folder (config.json)")
    from model import load_hf

    sd = load_hf(path).state_dict()
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(raw_model, sd, options=StateDictOptions(full_state_dict=True))
    else:
        with torch.no_grad():
            _load_weights(raw_model, sd, path)


def shard(model, dtype):
    """FSDP2 on every block, then on the whole model; parameters in `dtype` for compute,
    gradients reduced in float32, master weights float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def load_checkpoint(path, raw_model, optimizer, rank, fsdp, load_optimizer=True):
    from safetensors.torch import load_file

    sd = load_file(os.path.join(path, "model.safetensors"))
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if raw_model.config.tie_embeddings:
            sd["lm_head.weight"] = sd["tok_emb.weight"]
        set_model_state_dict(raw_model, sd, options=StateDictOptions(full_state_dict=True))
    else:
        with torch.no_grad():
            _load_weights(raw_model, sd, path)
    if load_optimizer:
        if fsdp:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

            osd = get_optimizer_state_dict(raw_model, optimizer)
            dcp.load(osd, checkpoint_id=os.path.join(path, "optimizer"))
            set_optimizer_state_dict(raw_model, optimizer, osd)
        else:
            optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=True))
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    rng_path = os.path.join(path, f"rng_rank{rank}.pt")
    if not os.path.exists(rng_path):
        if state["world_size"] == (dist.get_world_size() if dist.is_initialized() else 1):
            raise CheckpointError(f"{rng_path} is missing: the checkpoint is damaged")
        # another world size: this rank had no RNG state then (its stream starts from the seed)
        print(f"rank {rank}: {path} was written by {state['world_size']} ranks and holds no RNG state for this one",
              flush=True)
    else:
        rng = torch.load(rng_path, weights_only=True)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state


def check_resumable(state, cfg, data_sha, path):
    """Refuse to resume with another model shape or another data manifest."""
    saved = state["config"]
    changed = [f.name for f in fields(cfg.model) if saved.get(f.name) != getattr(cfg.model, f.name)]
    if changed:
        raise ConfigError(f"{path} was trained with another model shape ({', '.join(f'{k}={saved.get(k)!r}' for k in changed)}); "
                          "use another out_dir, or init_from to start a new run from it")
    if state["data_manifest_sha256"] != data_sha:
        raise ConfigError(f"{path} was trained on other data (manifest sha256 {state['data_manifest_sha256'][:12]}..., "
                          f"now {data_sha[:12]}...); use another out_dir, or init_from to continue on new data")


# -----------------------------------------------------------------------------
# metrics and the ledger


class RunLog:
    """metrics.jsonl and ledger.jsonl of the run dir, written by rank 0, line by line."""

    def __init__(self, out_dir, rank, wandb_project="", cfg=None):
        self.rank = rank
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        self.ledger_path = os.path.join(out_dir, "ledger.jsonl")
        self.wandb = None
        if rank == 0 and wandb_project:
            import wandb  # optional: only when asked for

            self.wandb = wandb.init(project=wandb_project, config=config_to_dict(cfg))

    def _append(self, path, record):
        if self.rank == 0:
            with writing(path), open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()

    def metric(self, record):
        self._append(self.metrics_path, record)
        if self.wandb:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def event(self, event, **fields):
        self._append(self.ledger_path, {"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields})

    def metrics_lines(self):
        if not os.path.exists(self.metrics_path):
            return 0
        with open(self.metrics_path) as f:
            return sum(1 for _ in f)

    def truncate_metrics(self, n_lines):
        """On resume: keep the lines the checkpoint had seen, drop those written after it."""
        if self.rank != 0 or not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path) as f:
            lines = f.readlines()[:n_lines]
        tmp = self.metrics_path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(lines)
        os.replace(tmp, self.metrics_path)


# -----------------------------------------------------------------------------
# figures: matplotlib's object API on the Agg canvas (headless, no pyplot state), each
# PNG written atomically; training.png is redrawn at every checkpoint in ~0.12 s


_WARM = []  # the warm-up thread, joined before the first figure: matplotlib is not thread-safe


def warm_figures():
    """Import matplotlib and draw a training figure off-screen (fonts, glyph caches, the
    "1e6" offset's mathtext): train.py runs it in a thread at start, so the first
    checkpoint's figure costs what the others do."""
    import io

    x = [float(i) * 4096 for i in range(1, 300)]
    series = {"tokens": x, "loss": [8.0 / i for i in range(1, 300)], "lr": [1e-3] * 299, "grad_norm": [0.5] * 299,
              "tok_per_s": [6000.0] * 299}
    draw_run(series, (x[::40], series["loss"][::40]), "warm-up", io.BytesIO())


def new_figure(rows, cols, size):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    return fig, fig.subplots(rows, cols, squeeze=False)


def save_figure(fig, path, dpi=80):
    tmp = path[: -len(".png")] + ".tmp.png"
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)


def _binned(x, y, n=2000):
    """At most n points: means over equal runs of steps (AMBER logs ~300k steps)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) <= n:
        return x, y
    edges = np.linspace(0, len(x), n + 1).astype(int)
    return np.add.reduceat(x, edges[:-1]) / np.diff(edges), np.add.reduceat(y, edges[:-1]) / np.diff(edges)


def plot_run(out_dir):
    """training.png of a run from its metrics.jsonl (read line by line): training and
    validation loss, learning rate, gradient norm and tokens/s, against tokens seen."""
    for t in _WARM:
        t.join()
    keys = ("loss", "lr", "grad_norm", "tok_per_s")
    series, val = {k: [] for k in ("tokens",) + keys}, ([], [])
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "val_loss" in r:
                val[0].append(r["tokens"])
                val[1].append(r["val_loss"])
            elif "loss" in r:
                for k in series:
                    series[k].append(r.get(k, float("nan")))
    draw_run(series, val, os.path.basename(os.path.normpath(out_dir)), os.path.join(out_dir, "training.png"))


def draw_run(series, val, title, out):
    """The four panels of training.png from series {tokens, loss, lr, grad_norm, tok_per_s}
    and validation points val (tokens, losses), to a path (atomically) or a file object."""
    keys = ("loss", "lr", "grad_norm", "tok_per_s")
    fig, axes = new_figure(2, 2, (10, 6))
    fig.subplots_adjust(left=0.07, right=0.98, top=0.94, bottom=0.09, hspace=0.4, wspace=0.22)
    titles = {"loss": "loss", "lr": "learning rate", "grad_norm": "gradient norm (before clipping)",
              "tok_per_s": "tokens / s (all devices)"}
    for ax, k in zip(axes.flat, keys):
        ax.plot(*_binned(series["tokens"], series[k]), lw=0.8, label="train")
        if k == "loss" and val[0]:
            ax.plot(val[0], val[1], "o-", ms=3, label="validation")
            ax.legend(fontsize=8)
        ax.set_title(titles[k], fontsize=9)
        ax.set_xlabel("tokens seen", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.locator_params(nbins=4)  # ticks are most of a draw's time
    fig.suptitle(title, fontsize=10)
    if isinstance(out, str):
        save_figure(fig, out)
    else:
        fig.savefig(out, format="png", dpi=80)


def run_info(device, world_size):
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    import sentencepiece

    return {"git_commit": commit, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "sentencepiece": sentencepiece.__version__, "world_size": world_size,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "host": platform.node()}


GPU_BF16_PEAK = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "A10G": 125e12, "L4": 121e12}


def peak_flops(cfg, device, dtype, measured=None):
    """FLOP/s of one device for MFU, in the dtype the run computes in: the config's, a known
    GPU's bf16 peak, or this machine's measured matmul rate in that dtype (CPU)."""
    if cfg.peak_flops:
        return cfg.peak_flops
    if device.type == "cuda" and dtype == torch.bfloat16:
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_BF16_PEAK.items():
            if key in name:
                return flops
    name = str(dtype).removeprefix("torch.")
    if measured and name in measured:
        return measured[name] * 1e9
    return matmul_rate(device, dtype)


def make_optimizer(groups, cfg, device):
    """AdamW over param groups; the fused kernel on CUDA and on a CPU (a third of the
    for-loop's time there: 4 ms against 13 ms a step on the tiny model)."""
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=device.type in ("cuda", "cpu"))


def matmul_rate(device, dtype=torch.float32, n=1024, tries=3, min_s=0.05, budget_s=1.0):
    """FLOP/s of an n x n matmul in `dtype` on `device`: the best of `tries` timings of at
    least min_s each. The inputs come from a private generator (the run's RNG is never
    touched). A dtype this device emulates slowly (bf16 on a CPU without AVX512-BF16 or
    AMX: 5-300x slower) is timed once and given up on after budget_s."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device=device, dtype=dtype) for _ in range(2))

    def run(reps):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    one = run(1)  # warm-up, and the scale of the timing
    if one > budget_s:
        return 2 * n**3 / one
    reps = max(1, math.ceil(min_s / max(one, 1e-6)))
    return 2 * n**3 * reps / min(run(reps) for _ in range(tries))


BF16_CPU_MARGIN = 1.5  # dtype="auto" takes bf16 on a CPU when its measured matmul rate is this much faster


def choose_dtype(cfg, device, rank=0, world_size=1):
    """(dtype, {"reason", "matmul_gflops"}) of the run's matmuls. dtype="auto": bf16 on a
    GPU that has it; on a CPU, bf16 only where its matmul measures BF16_CPU_MARGIN times
    float32's (Intel AMX: 4-7x; elsewhere bf16 is emulated and 5-300x slower). Rank 0
    measures and broadcasts, so every rank decides alike. Weights, optimizer state and
    checkpoints stay float32 whatever this says."""
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype), {"reason": f"dtype={cfg.dtype!r} in the config", "matmul_gflops": {}}
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return (torch.bfloat16 if ok else torch.float32), {
            "reason": "a GPU with bf16" if ok else "a GPU without bf16", "matmul_gflops": {}}
    rates = [None]
    if rank == 0:
        rates[0] = {"float32": matmul_rate(device, torch.float32) / 1e9,
                    "bfloat16": matmul_rate(device, torch.bfloat16) / 1e9}
    if world_size > 1:
        dist.broadcast_object_list(rates, src=0)
    r = rates[0]
    ratio = r["bfloat16"] / r["float32"]
    dtype = torch.bfloat16 if ratio >= BF16_CPU_MARGIN else torch.float32
    return dtype, {"reason": f"measured on this CPU: bf16 matmul {ratio:.2f}x float32 (bf16 from "
                             f"{BF16_CPU_MARGIN}x)", "matmul_gflops": {k: round(v, 1) for k, v in r.items()}}


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux


# -----------------------------------------------------------------------------
# the objectives: next-token loss, or DPO on pairs (finetune.py)

DPO_STATS = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy", "ref_preference")


def sequence_logps(logits, targets):
    """Per row, the sum of log p(target) over the counted targets (not -1): (B,)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return (picked * (targets != -1)).sum(-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), mean
    over pairs, from log-probabilities summed over each response; and its statistics (per
    pair): the implicit rewards, their margin, whether it is positive, and whether the
    reference already prefers the chosen response."""
    chosen, rejected = beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
    margin = chosen - rejected
    stats = {"reward_chosen": chosen, "reward_rejected": rejected, "reward_margin": margin,
             "reward_accuracy": (margin > 0).float(), "ref_preference": (ref_chosen > ref_rejected).float()}
    return -F.logsigmoid(margin).mean(), {k: v.detach() for k, v in stats.items()}


def objective(model, ref_model, x, y, cfg):
    """(loss, {stat: per-row values}) of one micro-batch. "lm": the mean next-token loss over
    counted targets. "dpo": each stored row is a pair, [chosen | rejected], each seq_len + 1
    tokens with its prompt and padding uncounted; the frozen reference model (the starting
    checkpoint) scores both without gradients, in the same forward shape."""
    if cfg.objective == "lm":
        _, loss = model(x, y)
        return loss, {}
    n, L = x.shape[0], cfg.seq_len
    xs, ys = torch.cat([x[:, :L], x[:, L + 1 :]]), torch.cat([y[:, :L], y[:, L + 1 :]])  # chosen rows, then rejected
    policy = sequence_logps(model(xs)[0], ys)
    with torch.no_grad():
        ref = sequence_logps(ref_model(xs)[0], ys)
    return dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], cfg.dpo_beta)


_VAL_VERIFIED = set()


@torch.no_grad()
def validation_loss(model, data_dir, manifest, cfg, rank, world_size, device, autocast, ref_model=None):
    """{"val_loss": mean loss (the counted tokens' mean for "lm", the pairs' for "dpo"), and for
    "dpo" the mean of each statistic as "val_<stat>"} over the first val_sequences rows of
    the held-out split, split over ranks; None without one."""
    if not manifest.get("val") or manifest["val"]["sequences"] == 0:
        return None
    # the split's sha256 is checked once per process (a damaged val.npy gives wrong numbers silently)
    tokens, _ = data.open_split(data_dir, manifest["val"], verify=data_dir not in _VAL_VERIFIED)
    _VAL_VERIFIED.add(data_dir)
    per_round = world_size * cfg.micro_batch_size  # every rank runs the same number of forwards (FSDP)
    n = min(cfg.val_sequences, len(tokens)) // per_round * per_round
    if n == 0:
        return None
    rows = np.arange(n)[rank::world_size]
    names = DPO_STATS if cfg.objective == "dpo" else ()
    total = torch.zeros(2 + len(names), dtype=torch.float64, device=device)  # loss sum, count, stat sums
    model.eval()
    for i in range(0, len(rows), cfg.micro_batch_size):
        x, y = (t.to(device) for t in data.rows_to_xy(tokens[rows[i : i + cfg.micro_batch_size]]))
        with autocast:
            loss, stats = objective(model, ref_model, x, y, cfg)
        counted = int((y != -1).sum()) if cfg.objective == "lm" else len(x)  # tokens, or pairs
        total += torch.tensor([loss.item() * counted, counted] + [stats[k].sum().item() for k in names],
                              dtype=torch.float64, device=device)
    model.train()
    all_reduce_sum(total, world_size)
    pairs = n if names else 1
    return {"val_loss": (total[0] / total[1]).item()} | {f"val_{k}": (total[2 + i] / pairs).item()
                                                         for i, k in enumerate(names)}


# -----------------------------------------------------------------------------
# the plan


def plan(cfg, world_size):
    """--dry_run: what the run will cost, from the meta-device model and the config."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    n = model.num_params()
    G, T = cfg.global_batch_size, cfg.seq_len
    manifest_path = os.path.join(cfg.data_dir, "manifest.json")
    if os.path.exists(manifest_path):
        manifest = data.load_manifest(cfg.data_dir)
        steps = [chunk_steps(manifest, c, G) for c in range(len(manifest["chunks"]))]
        source = f"from {manifest_path}"
    elif cfg.dry_run_sequences_per_chunk:
        steps = [cfg.dry_run_sequences_per_chunk // G] * cfg.n_chunks
        source = f"from dry_run_sequences_per_chunk={cfg.dry_run_sequences_per_chunk:,}"
    else:
        raise ConfigError(f"{manifest_path} not found: prepare the data, or set dry_run_sequences_per_chunk")
    # the world size the config is laid out for; by default one micro-batch per device, no accumulation
    planned_world = cfg.dry_run_world_size or (world_size if world_size > 1 else max(1, G // cfg.micro_batch_size))
    grad_accum(cfg, planned_world)
    accum = G // (cfg.micro_batch_size * planned_world)
    fsdp = cfg.parallel == "fsdp"
    d, L = cfg.model.dim, cfg.model.n_layer
    states = 16 * n / (planned_world if fsdp else 1)  # fp32 weights, grads, AdamW exp_avg and exp_avg_sq
    # activations in bf16, about 34 s b h bytes per layer (Korthikanti et al. 2022); checkpointing keeps each
    # block's input (2 s b h) and recomputes one block at a time
    sbh = cfg.micro_batch_size * T * d
    act = (2 * L + 34) * sbh if cfg.activation_checkpointing else 34 * L * sbh
    fpt = model.flops_per_token(T)
    total_tokens = sum(steps) * G * T
    gb = 2**30
    lines = [
        f"model            {n:,} parameters, {fpt / 1e9:.2f} GFLOP per token (training)",
        f"batch            {G:,} sequences x {T:,} tokens = {G * T:,} tokens per step; micro-batch "
        f"{cfg.micro_batch_size} on {planned_world} devices, {accum} accumulation step(s)",
        f"data             {len(steps)} chunks, {min(steps):,}-{max(steps):,} steps per chunk ({source}), "
        f"{sum(steps):,} steps, {total_tokens / 1e9:,.2f}B tokens",
        f"memory/device    weights + grads + AdamW {states / gb:.1f} GiB ({'sharded by FSDP' if fsdp else 'replicated'}), "
        f"activations ~{act / gb:.1f} GiB ({'checkpointed' if cfg.activation_checkpointing else 'all kept'}, "
        "an upper estimate after Korthikanti et al. 2022)",
    ]
    for name, flops in [("A100 bf16", 312e12), ("H100 bf16", 989e12)]:
        seconds = total_tokens * fpt / (planned_world * flops * 0.36)
        lines.append(f"time at 36% MFU  {seconds / 86400:,.1f} days on {planned_world} x {name}")
    # disk: the chunks as stored (seq_len + 1 ids a row, and a source id), and a checkpoint per chunk
    # with fp32 weights and both AdamW moments (12 bytes a parameter; gradients are not saved)
    sequences = manifest["totals"]["train_sequences"] if os.path.exists(manifest_path) else \
        cfg.dry_run_sequences_per_chunk * cfg.n_chunks
    data_bytes = sequences * ((T + 1) * np.dtype(data.token_dtype(cfg.model.vocab_size)).itemsize + 1)
    ckpt_bytes = 12 * n
    cores = os.cpu_count() or 1
    hours = sequences * (T + 1) / data.CONVERT_TOKENS_PER_S_PER_WORKER / 3600
    lines += [
        f"disk, data       {data_bytes / 1e12:,.3f} TB of chunks ({sequences:,} rows of {T + 1:,} ids)",
        f"disk, ckpts      {ckpt_bytes / 1e9:,.1f} GB per checkpoint (fp32 weights + AdamW moments), "
        f"{len(steps) * ckpt_bytes / 1e12:,.2f} TB for all {len(steps)}",
        f"conversion       {hours / 64:,.1f} h on 64 cores ({hours / cores:,.1f} h on this machine's {cores}) from "
        f"a JSON-lines release like AMBER's, at {data.CONVERT_TOKENS_PER_S_PER_WORKER / 1e6:.1f}M tokens/s per "
        "worker (python bench.py convert)",
    ]
    print("\n".join(lines))
    return {"params": n, "steps_per_chunk": steps, "tokens_per_step": G * T, "planned_world": planned_world}


# -----------------------------------------------------------------------------
# the run


def main(cfg):
    rank, world_size, device = init_distributed()
    try:
        return _run(cfg, rank, world_size, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg, rank, world_size, device):
    if cfg.dry_run:
        return plan(cfg, world_size) if rank == 0 else None
    accum = grad_accum(cfg, world_size)
    fsdp = cfg.parallel == "fsdp" and world_size > 1
    for key, folder in [("out_dir", cfg.out_dir), ("data_dir", cfg.data_dir)] + [("stages", d) for d in cfg.stages]:
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise ConfigError(f"{key}={folder!r} is a file, not a folder; give a folder")
    if rank == 0:  # one writer per run dir: a second train.py on it (a requeued job) stops here, changing nothing
        data.hold_lock(os.path.join(cfg.out_dir, ".lock"), "a train.py run")
    dtype, precision = choose_dtype(cfg, device, rank, world_size)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 and not fsdp else nullcontext()

    # data: the main job prepares the built-in corpus when it is not there yet
    if rank == 0 and not cfg.stages and not os.path.exists(os.path.join(cfg.data_dir, "manifest.json")):
        if not cfg.sources:
            raise data.DataError(f"{cfg.data_dir} is not prepared and the config has no sources; "
                                 "run `python data.py CONFIG` with a config that has them")
        data.prepare(cfg)
    barrier(world_size)
    dirs = stage_dirs(cfg)
    for d in dirs:
        if not os.path.exists(os.path.join(d, "manifest.json")):
            raise data.DataError(f"stage {d} is not prepared: run `python data.py CONFIG --data_dir={d}` with its "
                                 "sources first")
    table = chunk_table(dirs)
    for d, manifest in {d: m for d, m, _ in table}.items():
        data.check_vocab(manifest, cfg.model, where=f"{d}: ")
        if manifest["seq_len"] != cfg.seq_len:
            raise ConfigError(f"{d} holds sequences of {manifest['seq_len']} tokens, the config asks for "
                              f"seq_len={cfg.seq_len}; prepare another data dir")
    if cfg.sources and not cfg.stages:  # a config that names its data must train on that data
        check_data_config(cfg, table[0][1])
    tokenizers = {m["tokenizer"].get("sha256") or m["tokenizer"].get("name") for _, m, _ in table}
    if len(tokenizers) > 1:
        raise ConfigError(f"the stages {dirs} were tokenized with different tokenizers; prepare every stage with "
                          "the first one's (tokenizer='STAGE1_DIR/tokenizer.model')")
    shas = [data.manifest_sha256(d) for d in dirs]
    data_sha = shas[0] if len(shas) == 1 else hashlib.sha256(" ".join(shas).encode()).hexdigest()

    # the run dir and what it already holds
    os.makedirs(cfg.out_dir, exist_ok=True)
    barrier(world_size)
    log = RunLog(cfg.out_dir, rank, cfg.wandb_project, cfg)
    if rank == 0:  # import matplotlib and draw once while the first chunk trains (0.5 s, once)
        _WARM.append(threading.Thread(target=warm_figures, daemon=True))
        _WARM[0].start()
    resume = resume_point(cfg.out_dir, log, rank, world_size)  # the newest intact checkpoint
    if resume:
        saved = read_state(resume)
        check_resumable(saved, cfg, data_sha, resume)
        if saved.get("finished") or (cfg.max_steps and saved["step"] >= cfg.max_steps):
            print0(f"{cfg.out_dir} has reached {'the end of its schedule' if saved.get('finished') else 'max_steps'} "
                   f"({saved['step']} steps); nothing to do", rank=rank)
            return saved

    # model: built on the meta device, sharded (FSDP) before it is materialized
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    with torch.device("meta"):
        raw_model = Transformer(cfg.model)
    if fsdp:
        shard(raw_model, dtype)
    raw_model.to_empty(device=device)
    raw_model.init_weights(cfg.seed)
    if cfg.activation_checkpointing:
        from functools import partial

        from torch.utils.checkpoint import checkpoint

        for block in raw_model.layers:  # parameter names stay as they are
            block.forward = partial(checkpoint, block.forward, use_reentrant=False)
    model = raw_model
    if world_size > 1 and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:  # block by block: one compile serves every layer (~10 s on a CPU), and FSDP2 shards stay per block
        for block in raw_model.layers:
            block.compile()
    groups = raw_model.param_groups(cfg.weight_decay)
    optimizer = make_optimizer(groups, cfg, device)
    ref_model = None
    if cfg.objective == "dpo":  # the frozen reference: the starting checkpoint, sharded alike under FSDP
        if not cfg.init_from:
            raise ConfigError("objective='dpo' needs init_from: the checkpoint it starts from is its reference model")
        with torch.device("meta"):
            ref_model = Transformer(cfg.model)
        if fsdp:
            shard(ref_model, dtype)
        ref_model.to_empty(device=device)
        ref_model.init_weights(cfg.seed)  # re-ties tied embeddings; the weights are replaced next
        load_init_from(replace(cfg, init_optimizer=False), ref_model, None, data_sha, rank, fsdp)
        ref_model.eval().requires_grad_(False)
    params = [p for g in groups for p in g["params"]]

    # the state of the run: where in the schedule, and what happened
    state = {"step": 0, "tokens": 0, "pos": 0, "schedule": list(range(len(table))),
             "skipped": [], "reader": None, "data_manifest_sha256": data_sha, "metrics_lines": 0}
    if not cfg.stages and cfg.n_chunks != len(table):
        raise ConfigError(f"n_chunks={cfg.n_chunks} but {cfg.data_dir} has {len(table)} chunks")
    if resume:
        state = load_checkpoint(resume, raw_model, optimizer, rank, fsdp)
        log.truncate_metrics(state["metrics_lines"])
        log.event("resume", checkpoint=os.path.basename(resume), step=state["step"], pos=state["pos"],
                  dtype=str(dtype).removeprefix("torch."), **precision)  # the machine may have changed
        print0(f"resuming from {resume}: step {state['step']}, schedule position {state['pos']}", rank=rank)
    else:
        log.truncate_metrics(0)  # lines of a run killed before its first checkpoint: they are redone
        if cfg.init_from:
            load_init_from(cfg, raw_model, optimizer, data_sha, rank, fsdp)
            log.event("init_from", checkpoint=os.path.abspath(cfg.init_from), optimizer=cfg.init_optimizer)
            first_dir, first_manifest, _ = table[state["schedule"][0]]
            vals = validation_loss(model, first_dir, first_manifest, cfg, rank, world_size, device, autocast,
                                   ref_model)  # where fine-tuning starts from
            if vals:
                log.metric({"step": 0, "pos": 0, "chunk": state["schedule"][0], "tokens": 0, **vals})
        if rank == 0:
            save_config(cfg, os.path.join(cfg.out_dir, "config.json"))
            with open(os.path.join(cfg.out_dir, "run.json"), "w") as f:
                json.dump(run_info(device, world_size) | {"dtype": str(dtype).removeprefix("torch."), **precision},
                          f, indent=1)
        log.event("start", world_size=world_size, parallel="fsdp" if fsdp else "ddp" if world_size > 1 else "single",
                  dtype=str(dtype).removeprefix("torch."), **precision)
    info = run_info(device, world_size)
    print0(f"git {info['git_commit'][:12]} | torch {info['torch']} | {world_size} x {info['device']} | "
           f"{'FSDP2' if fsdp else 'DDP' if world_size > 1 else 'one process'} | {dtype} ({precision['reason']}"
           + (f"; matmul GFLOP/s {precision['matmul_gflops']}" if precision["matmul_gflops"] else "") + ")", rank=rank)
    print0(format_config(cfg), rank=rank)
    # the LR schedule spans the planned chunks; replacement chunks fill the steps of skipped ones
    total_steps = sum(chunk_steps(m, c, cfg.global_batch_size) for _, m, c in table)
    flops_per_token = raw_model.flops_per_token(cfg.seq_len)
    peak = peak_flops(cfg, device, dtype, precision["matmul_gflops"])
    tokens_per_step = cfg.global_batch_size * cfg.seq_len
    n_saved = 0
    from tqdm import tqdm

    # -------------------------------------------------------------------------
    while state["pos"] < len(state["schedule"]):
        pos, chunk = state["pos"], state["schedule"][state["pos"]]
        data_dir, manifest, local = table[chunk]  # `chunk` counts over all stages
        reader = data.ChunkReader(data_dir, local, cfg.seed, cfg.global_batch_size, cfg.micro_batch_size,
                                  rank, world_size, manifest=manifest)
        if state["reader"]:
            reader.load_state_dict(state["reader"])
        bar = tqdm(total=reader.steps, initial=reader.step, desc=f"chunk {chunk} ({pos + 1}/{len(state['schedule'])})",
                   disable=rank != 0, leave=False, dynamic_ncols=True)
        nonfinite = None
        while reader.step < reader.steps:
            t0 = time.perf_counter()
            lr = get_lr(state["step"], cfg, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_mult"]
            loss_sum = torch.zeros((), device=device)
            stat_sums = torch.zeros(len(DPO_STATS) if cfg.objective == "dpo" else 0, device=device)
            for micro in range(accum):
                x, y = next(reader)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                last = micro == accum - 1  # gradients are reduced across ranks on the last micro-batch only
                if fsdp:
                    model.set_requires_gradient_sync(last)
                sync = model.no_sync() if (world_size > 1 and not fsdp and not last) else nullcontext()
                with sync, autocast:
                    loss, stats = objective(model, ref_model, x, y, cfg)
                    if chunk in cfg.nan_test_chunks:
                        loss = loss * float("nan")  # tests: this chunk diverges wherever it is placed
                    (loss / accum).backward()
                loss_sum += loss.detach()
                if stats:
                    stat_sums += torch.stack([stats[k].mean() for k in DPO_STATS])
            # the true global gradient norm (DTensor-aware under FSDP), clipped when grad_clip > 0
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            loss_avg = (all_reduce_sum(loss_sum, world_size) / (accum * world_size)).item()
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            if not (math.isfinite(loss_avg) and math.isfinite(norm)):  # the same values on every rank
                nonfinite = {"step": state["step"], "loss": loss_avg, "grad_norm": norm}
                optimizer.zero_grad(set_to_none=True)
                break
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            state["step"] += 1
            state["tokens"] += tokens_per_step
            record = {"step": state["step"], "pos": pos, "chunk": chunk, "stage": dirs.index(data_dir),
                      "chunk_step": reader.step,
                      "tokens": state["tokens"], "loss": loss_avg, "grad_norm": norm, "lr": lr,
                      "step_time": dt, "tok_per_s": tokens_per_step / dt,
                      "tok_per_s_device": tokens_per_step / dt / world_size,
                      "mfu": tokens_per_step / dt / world_size * flops_per_token / peak,
                      "peak_mem_gb": peak_memory_gb(device)}
            if len(stat_sums):
                stat_avg = all_reduce_sum(stat_sums, world_size) / (accum * world_size)
                record.update({k: v.item() for k, v in zip(DPO_STATS, stat_avg)})
            if cfg.val_interval and state["step"] % cfg.val_interval == 0:
                record.update(validation_loss(model, data_dir, manifest, cfg, rank, world_size, device, autocast,
                                              ref_model) or {})
            log.metric(record)
            bar.update(1)
            if rank == 0:
                bar.write(f"step {state['step']:6d} | chunk {chunk} | loss {loss_avg:.4f} | lr {lr:.2e} | "
                          f"norm {norm:.3f} | tok/s {record['tok_per_s']:,.0f} | mfu {100 * record['mfu']:.0f}%"
                          + (f" | val {record['val_loss']:.4f}" if record.get("val_loss") else ""))
            _fault("step", state["step"])
            if cfg.max_steps and state["step"] >= cfg.max_steps:
                break
            if cfg.ckpt_interval and state["step"] % cfg.ckpt_interval == 0 and reader.step < reader.steps:
                state["reader"], state["metrics_lines"] = reader.state_dict(), log.metrics_lines()
                n_saved += 1
                save_checkpoint(os.path.join(cfg.out_dir, "ckpt_rolling"), raw_model, optimizer, state, cfg, rank,
                                world_size, fsdp, n_saved)
        bar.close()

        if nonfinite:
            log.event("nonfinite", chunk=chunk, pos=pos, **nonfinite)
            last_good = find_checkpoint(cfg.out_dir, chunk_ends_only=True)  # a state without this chunk
            where = os.path.basename(last_good) if last_good else "the initial weights"
            if cfg.nan_policy == "stop":
                raise SystemExit(f"error: non-finite loss {nonfinite['loss']} / grad norm {nonfinite['grad_norm']} "
                                 f"at step {nonfinite['step']} in chunk {chunk}; stopped. The last good checkpoint is "
                                 f"{where}. Set nan_policy='skip_chunk' to skip such chunks automatically.")
            # skip_chunk: roll back to the last good state, record the chunk, append a replacement
            if rank == 0 and os.path.exists(os.path.join(cfg.out_dir, "ckpt_rolling")):
                shutil.rmtree(os.path.join(cfg.out_dir, "ckpt_rolling"))  # it holds part of this chunk
            barrier(world_size)
            skipped = state["skipped"] + [{"chunk": chunk, "pos": pos, "step": nonfinite["step"],
                                           "reason": f"non-finite loss {nonfinite['loss']} or grad norm "
                                                     f"{nonfinite['grad_norm']}"}]
            schedule = state["schedule"]
            if last_good:
                state = load_checkpoint(last_good, raw_model, optimizer, rank, fsdp)
            else:  # no checkpoint yet: back to the seeded initial weights and a fresh optimizer
                raw_model.init_weights(cfg.seed)
                optimizer.state.clear()
                state = state | {"step": 0, "tokens": 0}
            state["skipped"], state["reader"] = skipped, None
            bad = {s["chunk"] for s in skipped}
            used = len(schedule) - len(table)  # replacements appended so far
            candidates = [c for c in range(len(table)) if c not in bad]
            state["schedule"] = schedule + ([candidates[used % len(candidates)]] if candidates else [])
            state["pos"] = pos + 1
            log.event("skip_chunk", chunk=chunk, pos=pos, step=nonfinite["step"], rolled_back_to=where,
                      replacement=state["schedule"][-1] if candidates else None)
            print0(f"chunk {chunk} gave a non-finite loss at step {nonfinite['step']}: skipped, rolled back to "
                   f"{where}, chunk {state['schedule'][-1]} appended to finish the LR schedule", rank=rank)
            continue
        if reader.step < reader.steps:  # stopped by max_steps inside the chunk: a resumable checkpoint
            state["reader"], state["metrics_lines"] = reader.state_dict(), log.metrics_lines()
            n_saved += 1
            save_checkpoint(os.path.join(cfg.out_dir, "ckpt_rolling"), raw_model, optimizer, state, cfg, rank,
                            world_size, fsdp, n_saved)
            log.event("max_steps", step=state["step"], checkpoint="ckpt_rolling")
            return state

        # the chunk is done: validation loss, then the checkpoint of this schedule position
        vals = validation_loss(model, data_dir, manifest, cfg, rank, world_size, device, autocast, ref_model)
        val = vals["val_loss"] if vals else None
        if vals:
            log.metric({"step": state["step"], "pos": pos, "chunk": chunk, "tokens": state["tokens"], **vals})
        state["pos"], state["reader"] = pos + 1, None
        state["finished"] = state["pos"] >= len(state["schedule"])
        state["metrics_lines"] = log.metrics_lines()
        t0 = time.perf_counter()
        n_saved += 1
        save_checkpoint(os.path.join(cfg.out_dir, f"ckpt_{pos:03d}"), raw_model, optimizer, state, cfg, rank,
                        world_size, fsdp, n_saved)
        if rank == 0 and os.path.exists(os.path.join(cfg.out_dir, "ckpt_rolling")):
            shutil.rmtree(os.path.join(cfg.out_dir, "ckpt_rolling"))  # older than this checkpoint now
        seconds = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        if rank == 0:
            try:
                plot_run(cfg.out_dir)
            except Exception as e:  # a figure never stops a run
                log.event("figure_failed", error=f"{type(e).__name__}: {e}")
        log.event("checkpoint", name=f"ckpt_{pos:03d}", chunk=chunk, step=state["step"], tokens=state["tokens"],
                  val_loss=val, seconds=seconds, figure_seconds=round(time.perf_counter() - t0, 3))
        print0(f"chunk {chunk} done: step {state['step']}, val loss {val if val is None else round(val, 4)}, "
               f"ckpt_{pos:03d} written in {seconds:.2f} s", rank=rank)
        if cfg.max_steps and state["step"] >= cfg.max_steps and not state["finished"]:
            log.event("max_steps", step=state["step"], checkpoint=f"ckpt_{pos:03d}")
            return state
    if len(state["skipped"]) == len(state["schedule"]):
        log.event("failed", reason="every chunk was skipped", skipped=[s["chunk"] for s in state["skipped"]])
        raise SystemExit(f"error: every chunk of the schedule ({len(state['schedule'])}) gave a non-finite loss and was "
                         "skipped; nothing was trained and no checkpoint written. Lower lr, or look at the data with "
                         "`python data.py inspect CONFIG --chunk=C --step=S`")
    log.event("finish", step=state["step"], tokens=state["tokens"], skipped=[s["chunk"] for s in state["skipped"]])
    return state


def cli(argv):
    """The command line: every error the user can fix is one line, not a traceback."""
    try:
        if argv[:1] == ["verify"]:
            if len(argv) != 2:
                raise ConfigError("usage: python train.py verify RUN_DIR")
            sys.exit(1 if verify_run(argv[1]) else 0)
        main(load_config(argv))
    except (ConfigError, data.DataError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a read-only or full disk: what and where
        sys.exit(f"error: {os_error_line(e)}")


if __name__ == "__main__":
    cli(sys.argv[1:])
