"""
The pre-training run: a loop over data chunks, one checkpoint after each.

    python train.py CONFIG [--key=value ...]      one process (CPU or one GPU)
    torchrun --nproc_per_node=N train.py CONFIG   data parallel: DDP, or FSDP2 (parallel="fsdp")
    python train.py CONFIG --dry_run=True         the plan, without allocating the model
    python train.py verify RUN_DIR                check checkpoints, metrics, data; change nothing

Running the same command again resumes from the newest intact checkpoint, bitwise
as if the run had not stopped (on a CPU with one thread: docs/reproducibility.md).
What a run dir and a checkpoint hold is written in checkpoint.py.

Read step.py first (the schedule, AdamW, the objectives, one optimizer step), then this
top to bottom: validation, the dry-run plan, setup() and train(), the loop. The machine
(devices, the dtype, FLOP/s, memory) is machine.py's; how the model is laid onto the
devices (FSDP2, checkpointing, compile) parallelize.py's; what a rank holds memory.py's;
a branch's start is branch.py's.
"""

import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import replace

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import branch
import convert_amber
import data
import memory
import plot
import prepare
from checkpoint import (check_metrics, check_resumable, find_checkpoint, load_checkpoint,
                        load_init_from, metrics_digest, read_state, resume_point, save_checkpoint,
                        step_name)
from common import (all_reduce_sum, barrier, broadcast0, close_distributed, gather, hold_lock,
                    init_distributed, one_line_errors, print0, write_json_atomic)
from config import ConfigError, format_config, load_config, save_config
from machine import choose_dtype, determinism, peak_flops, peak_memory_gb, run_info
from model import Transformer, summary
from model_config import hf_config
from parallelize import build_model, speed_up
from runlog import RunLog
from runstate import FORMAT_VERSION, new_state
from step import Run, get_lr, grad_accum, make_optimizer, objective_of, train_step
from verify import verify_run

# the data dirs whose held-out split this process has checked (a collective: not a cache of
# a value, so a set rather than functools.cache, whose key would hold the rank)
_VAL_CHECKED = set()


@torch.no_grad()
def validation_loss(model, data_dir, manifest, cfg, *, rank, world_size, device, autocast,
                    ref_model=None):
    """{"val_loss": mean loss over a seeded sample of val_sequences rows of the whole held-out
    split (the counted tokens' mean for "lm", the pairs' for "dpo"), "val_loss/<source>":
    over val_sequences rows of each source (data.validation_rows), and for "dpo" each
    statistic's mean over the sample as "val_<stat>"}; None without a held-out split.
    Micro-batches hold rows of one source and one set (sample or extra), and are dealt to
    the ranks in turn; a rank with fewer runs a zero-weight batch, so every rank runs the
    same number of forwards (FSDP)."""
    if not manifest.get("val") or manifest["val"]["sequences"] == 0 or cfg.val_sequences == 0:
        return None
    if data_dir not in _VAL_CHECKED:  # a damaged val.npy would give wrong numbers silently
        data.check_split(data_dir, manifest["val"], rank, world_size)
        _VAL_CHECKED.add(data_dir)
    tokens, sources = data.open_split(data_dir, manifest["val"], verify=False)
    mix, extra = data.validation_rows(sources, cfg.val_sequences, cfg.seed)
    groups = [(s, True, mix[sources[mix] == s]) for s in extra] + [(s, False, rows)
                                                                   for s, rows in extra.items()]
    batches = [(g, rows[i : i + cfg.micro_batch_size]) for g, (_, _, rows) in enumerate(groups)
               for i in range(0, len(rows), cfg.micro_batch_size)]
    objective, names = objective_of(cfg, ref_model)
    total = torch.zeros(len(groups), 2 + len(names), dtype=torch.float64, device=device)  # loss, n
    model.eval()
    for i in range(rank, -(-len(batches) // world_size) * world_size, world_size):
        g, rows = batches[i] if i < len(batches) else batches[0]
        x, y = (t.to(device) for t in data.rows_to_xy(tokens[rows]))
        with autocast:
            loss, stats = objective(model, x, y)
        counted = int((y != -1).sum()) if cfg.objective == "lm" else len(x)  # tokens, or pairs
        if i < len(batches):
            total[g] += torch.tensor([loss.item() * counted, counted]
                                     + [stats[k].sum().item() for k in names],
                                     dtype=torch.float64, device=device)
    model.train()
    all_reduce_sum(total, world_size)
    in_mix = torch.tensor([m for _, m, _ in groups], device=device)
    sample = total[in_mix].sum(0)
    out = {"val_loss": (sample[0] / sample[1]).item()}
    names_of = [s["name"] for s in manifest["sources"]]
    for s in extra:
        both = total[[g for g, (src, _, _) in enumerate(groups) if src == s]].sum(0)
        out[f"val_loss/{names_of[s]}"] = (both[0] / both[1]).item()
    return out | {f"val_{k}": (sample[2 + i] / sample[1]).item() for i, k in enumerate(names)}


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
        steps = [data.chunk_steps(manifest, c, G) for c in range(len(manifest["chunks"]))]
        source = f"from {manifest_path}"
    elif cfg.dry_run_sequences_per_chunk:
        steps = [cfg.dry_run_sequences_per_chunk // G] * cfg.n_chunks
        source = f"from dry_run_sequences_per_chunk={cfg.dry_run_sequences_per_chunk:,}"
    else:
        raise ConfigError(f"{manifest_path} not found: prepare the data, or set "
                          "dry_run_sequences_per_chunk")
    # the world size the config is laid out for; by default one micro-batch per device
    planned_world = cfg.dry_run_world_size or (world_size if world_size > 1
                                               else max(1, G // cfg.micro_batch_size))
    grad_accum(cfg, planned_world)
    accum = G // (cfg.micro_batch_size * planned_world)
    fsdp = cfg.parallel == "fsdp" and planned_world > 1
    fpt = model.flops_per_token(T)
    mem_lines, problems, mem = memory.per_rank(cfg, model, planned_world, fsdp, fpt * G * T)
    print(summary(cfg.model, T))
    try:
        print(f"{'hugging face layout':22s} {hf_config(cfg.model)['architectures'][0]}")
    except ValueError:
        print(f"{'hugging face layout':22s} none (muP or biases that no HF layout holds)")
    total_tokens = sum(steps) * G * T
    lines = [
        f"model            {n:,} parameters, {fpt / 1e9:.2f} GFLOP per token (training)",
        f"batch            {G:,} sequences x {T:,} tokens = {G * T:,} tokens per step; micro-batch "
        f"{cfg.micro_batch_size} on {planned_world} devices, {accum} accumulation step(s)",
        f"data             {len(steps)} chunks, {min(steps):,}-{max(steps):,} steps per chunk "
        f"({source}), {sum(steps):,} steps, {total_tokens / 1e9:,.2f}B tokens",
    ]
    lines += mem_lines
    for name, flops in [("A100 bf16", 312e12), ("H100 bf16", 989e12)]:
        seconds = total_tokens * fpt / (planned_world * flops * 0.36)
        lines.append(f"time at 36% MFU  {seconds / 86400:,.1f} days on {planned_world} x {name}")
    # disk: the chunks as stored (seq_len + 1 ids a row, and a source id), and a checkpoint per
    # chunk with fp32 weights and both AdamW moments (12 bytes a parameter; no gradients)
    sequences = cfg.dry_run_sequences_per_chunk * cfg.n_chunks
    if os.path.exists(manifest_path):
        sequences = manifest["totals"]["train_sequences"]
    id_bytes = np.dtype(data.token_dtype(cfg.model.vocab_size)).itemsize
    data_bytes, ckpt_bytes = sequences * ((T + 1) * id_bytes + 1), 12 * n
    chunk_ends = set(np.cumsum(steps).tolist())
    n_ckpts = len(steps) + len({s for s in checkpoint_steps(cfg)
                                if s <= sum(steps) and s not in chunk_ends})
    cores, rate = os.cpu_count() or 1, convert_amber.CONVERT_TOKENS_PER_S_PER_WORKER
    hours = sequences * (T + 1) / rate / 3600
    lines += [
        f"disk, data       {data_bytes / 1e12:,.3f} TB of chunks ({sequences:,} rows of "
        f"{T + 1:,} ids)",
        f"disk, ckpts      {ckpt_bytes / 1e9:,.1f} GB per checkpoint (fp32 weights + AdamW "
        f"moments), {n_ckpts * ckpt_bytes / 1e12:,.2f} TB for all {n_ckpts}"
        + (f" ({n_ckpts - len(steps)} of them at ckpt_steps)" if n_ckpts > len(steps) else ""),
        f"conversion       {hours / 64:,.1f} h on 64 cores ({hours / cores:,.1f} h on this "
        f"machine's {cores}) from a JSON-lines release like AMBER's, at {rate / 1e6:.1f}M "
        "tokens/s per worker (python bench.py convert)",
    ]
    out = {"params": n, "steps_per_chunk": steps, "tokens_per_step": G * T,
           "planned_world": planned_world, **mem}
    if cfg.branch_from:  # where the branch starts, and what is left of its schedule
        first, left, total, where = branch.plan(cfg, steps)
        seconds = left * G * T * fpt / (planned_world * 312e12 * 0.36)
        lines.append(f"branch           from {where}: {left:,} steps left (step {first + left:,} "
                     "at the end), LR at the branch point "
                     f"{get_lr(first, cfg, cfg.lr_steps or total):.3g} of a schedule of "
                     f"{cfg.lr_steps or total:,} steps, {seconds / 86400:,.1f} days on "
                     f"{planned_world} x A100 bf16 at 36% MFU")
        out |= {"branch_step": first, "steps_left": left}
    print("\n".join(lines))
    if problems:
        raise ConfigError("the plan does not fit: " + "; and ".join(problems))
    return out


# -----------------------------------------------------------------------------
# setting up a run: the data, the model, the state it starts from


def check_folders(cfg):
    folders = [("out_dir", cfg.out_dir), ("data_dir", cfg.data_dir)]
    for key, folder in folders + [("stages", d) for d in cfg.stages]:
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise ConfigError(f"{key}={folder!r} is a file, not a folder; give a folder")


def prepare_data(cfg, rank, world_size):
    """(dirs, chunk table, data sha256): the main job prepares the built-in corpus when it
    is not there yet (rank 0, the others wait; never for a branch, whose data must be its
    parent's or prepared), then every check of data.training_data."""
    prepared = os.path.exists(os.path.join(cfg.data_dir, "manifest.json"))
    if rank == 0 and not cfg.stages and not cfg.branch_from and not prepared:
        if not cfg.sources:
            raise data.DataError(f"{cfg.data_dir} is not prepared and the config has no sources; "
                                 "run `python prepare.py CONFIG` with a config that has them")
        prepare.prepare(cfg)
    barrier(world_size)
    return data.training_data(cfg)


def reference_model(cfg, device, dtype, fsdp, data_sha, rank):
    """DPO's frozen reference: the starting checkpoint, sharded like the policy under FSDP."""
    if not cfg.init_from:
        raise ConfigError("objective='dpo' needs init_from, the checkpoint that is its reference")
    ref = build_model(cfg, device, dtype, fsdp)
    load_init_from(replace(cfg, init_optimizer=False), ref, None, data_sha, rank, fsdp)
    return ref.eval().requires_grad_(False)


def setup(cfg, rank, world_size, device):
    """(Run, state) of a run from its config, or (None, state) when its run dir has already
    reached the end of its schedule or max_steps."""
    check_folders(cfg)
    if cfg.branch_from:
        cfg = branch.resolved(cfg)  # before the lock: it never writes into its parent's run dir
    accum = grad_accum(cfg, world_size)
    fsdp = cfg.parallel == "fsdp" and world_size > 1
    if rank == 0:  # one writer per run dir: a second train.py (a requeued job) stops here
        hold_lock(os.path.join(cfg.out_dir, ".lock"), "a train.py run")
    repeat = determinism(cfg, device)  # before the first matmul
    dtype, precision = choose_dtype(cfg, device, rank, world_size)
    autocast = nullcontext()  # float32, or FSDP2, whose policy casts
    if dtype != torch.float32 and not fsdp:
        autocast = torch.autocast(device.type, dtype=dtype)
    parent = first = None
    if cfg.branch_from:  # a branch: the parent's schedule goes on, with the data of the config
        first = branch.started(cfg)
        if first and branch.own_checkpoint(find_checkpoint(cfg.out_dir, chunk_ends_only=False),
                                           first):
            # it resumes: the parent is not read (it may be gone)
            cfg = branch.config_of_started(cfg, first)
        else:
            parent = branch.parent_of(cfg)
            cfg = branch.branch_config(cfg, parent)
    dirs, table, data_sha = prepare_data(cfg, rank, world_size)

    os.makedirs(cfg.out_dir, exist_ok=True)
    barrier(world_size)
    log = RunLog(cfg.out_dir, rank)
    resume = resume_point(cfg.out_dir, log, rank, world_size)  # the newest intact checkpoint
    if cfg.branch_from and not branch.own_checkpoint(resume, first):
        resume = None  # only the parent's checkpoints, linked: the branch starts (again)
        parent = parent or branch.parent_of(cfg)
    changes = {}
    if resume:
        saved = read_state(resume)
        changes = check_resumable(saved, cfg, data_sha, resume)  # what may change: recorded
        check_metrics(cfg.out_dir, saved, resume, rank, world_size)
        if saved.get("finished") or (cfg.max_steps and saved["step"] >= cfg.max_steps):
            print0(f"{cfg.out_dir} has reached "
                   f"{'the end of its schedule' if saved.get('finished') else 'max_steps'} "
                   f"({saved['step']} steps); nothing to do", rank=rank)
            return None, saved

    if rank == 0:
        plot.warm_up_in_background()  # matplotlib's import and first draw, while chunk 1 trains
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    raw_model = build_model(cfg, device, dtype, fsdp, init=resume is None)
    speed_up(raw_model, cfg, device)
    model = raw_model
    if world_size > 1 and not fsdp:
        model = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    groups = raw_model.param_groups(cfg.weight_decay)
    optimizer = make_optimizer(groups, cfg, device)
    ref_model = None
    if cfg.objective == "dpo":
        ref_model = reference_model(cfg, device, dtype, fsdp, data_sha, rank)
    objective, stat_names = objective_of(cfg, ref_model)
    run = Run(cfg=cfg, rank=rank, world_size=world_size, device=device, fsdp=fsdp,
              autocast=autocast, log=log, dirs=dirs, table=table, raw_model=raw_model, model=model,
              optimizer=optimizer, params=[p for g in groups for p in g["params"]],
              ref_model=ref_model, objective=objective, stat_names=stat_names, accum=accum,
              total_steps=0, peak=peak_flops(cfg, device, dtype, precision["matmul_gflops"]))

    info = run_info(device, world_size) | {"dtype": str(dtype).removeprefix("torch."),
                                           **precision, **repeat}
    log.open_wandb(cfg, parent.run_dir if parent else first["parent_run"] if first else None)
    state = start(run, resume, parent, data_sha, info, changes)
    run.total_steps = state["total_steps"]
    layout = "FSDP2" if fsdp else "DDP" if world_size > 1 else "one process"
    rate = f"; matmul GFLOP/s {precision['matmul_gflops']}" if precision["matmul_gflops"] else ""
    print0(f"git {info['git_commit'][:12]} | torch {info['torch']} | {world_size} x "
           f"{info['device']} | {layout} | {dtype} ({precision['reason']}{rate})", rank=rank)
    print0(format_config(cfg), rank=rank)
    return run, state


def mfu(flops_per_step, seconds, world_size, peak):
    """Model FLOPs utilization of a step, or None when it would be over 1: the peak was
    measured too low (on a CPU busy when train.py timed its matmuls), and a figure that
    cannot be true is not written as data."""
    value = flops_per_step / seconds / world_size / peak
    return value if value <= 1.0 else None


def start(run, resume, parent, data_sha, info, changes):
    """The state the run starts from: its newest intact checkpoint's (weights, AdamW, RNG),
    its parent's (a branch, branch.py), or a fresh one (with init_from's weights); a run
    that starts writes config.json and run.json. A resume records the config keys it
    changed ({key: [saved, new]}: max_steps, micro_batch_size, ...)."""
    cfg, log, rank = run.cfg, run.log, run.rank
    precision = {k: info[k] for k in ("dtype", "reason", "matmul_gflops")}
    if resume:
        state = load_checkpoint(resume, run.raw_model, run.optimizer, rank, run.fsdp)
        log.truncate_metrics(state["metrics_lines"])
        log.event("resume", checkpoint=os.path.basename(resume), step=state["step"],
                  pos=state["pos"], changes=changes, **precision)  # the machine may have changed
        print0(f"resuming from {resume}: step {state['step']}, schedule position {state['pos']}",
               rank=rank)
        return state
    if parent:
        state = branch.start(run, parent, data_sha, precision)
    else:
        state = new_state(cfg, run.table, data_sha)
        log.truncate_metrics(0)  # lines of a run killed before its first checkpoint: redone
        if cfg.init_from:
            load_init_from(cfg, run.raw_model, run.optimizer, data_sha, rank, run.fsdp)
            log.event("init_from", checkpoint=os.path.abspath(cfg.init_from),
                      optimizer=cfg.init_optimizer)
            first_dir, first_manifest, _ = run.table[state["schedule"][0]]
            vals = validate(run, first_dir, first_manifest)  # where fine-tuning starts from
            if vals:
                log.metric({"step": 0, "pos": 0, "chunk": state["schedule"][0], "tokens": 0,
                            **vals})
    if rank == 0:
        save_config(cfg, os.path.join(cfg.out_dir, "config.json"))
        write_json_atomic(os.path.join(cfg.out_dir, "run.json"), info)
    if not parent:
        log.event("start", world_size=run.world_size, checkpoint_format=FORMAT_VERSION,
                  parallel="fsdp" if run.fsdp else "ddp" if run.world_size > 1 else "single",
                  **precision)
    return state


# -----------------------------------------------------------------------------
# the steps of the loop


def validate(run, data_dir, manifest):
    return validation_loss(run.model, data_dir, manifest, run.cfg, rank=run.rank,
                           world_size=run.world_size, device=run.device, autocast=run.autocast,
                           ref_model=run.ref_model)


def save(run, state, name, reader=None, consolidated=None):
    """Checkpoint `name` of the run dir at this state; `reader` for a mid-chunk one (its
    position inside the chunk is saved with it; under FSDP each rank writes its own shard
    of the weights unless `consolidated`, so a stop fits a scheduler's grace period).
    Returns what the ledger records of it: the seconds of each part, the bytes, and every
    rank's peak memory so far."""
    state["reader"] = reader.state_dict() if reader else None
    # the metrics up to this checkpoint
    digest = metrics_digest(run.log.metrics_path) if run.rank == 0 else None
    state["metrics_lines"], state["metrics_sha256"] = broadcast0(digest, run.world_size)
    info = save_checkpoint(os.path.join(run.cfg.out_dir, name), run.raw_model, run.optimizer, state,
                           run.cfg, rank=run.rank, world_size=run.world_size, fsdp=run.fsdp,
                           consolidated=reader is None if consolidated is None else consolidated)
    peaks = gather(peak_memory_gb(run.device), run.world_size)
    return info | {"peak_mem_gb": [round(m, 2) for m in peaks]}


def progress_line(record):
    mfu = f"{100 * record['mfu']:.0f}%" if record["mfu"] is not None else "?"
    val = f" | val {record['val_loss']:.4f}" if record.get("val_loss") else ""
    return (f"step {record['step']:6d} | chunk {record['chunk']} | loss {record['loss']:.4f} | "
            f"lr {record['lr']:.2e} | norm {record['grad_norm']:.3f} | tok/s "
            f"{record['tok_per_s']:,.0f} | mfu {mfu}{val}")


def checkpoint_steps(cfg):
    """The steps of cfg.ckpt_steps: its list, or for "log" 0 (the initialization) and the
    powers of two up to 512, Pythia's early checkpoints."""
    return {0, *(2**i for i in range(10))} if cfg.ckpt_steps == "log" else set(cfg.ckpt_steps)


def save_step(run, state, reader=None):
    """An extra permanent checkpoint at this step (ckpt_steps): whole (model.safetensors, as
    evaluation reads it) and resumable, its reader's place inside the chunk with it."""
    name = step_name(state["step"])
    info = save(run, state, name, reader, consolidated=True)
    run.log.event("checkpoint", name=name, step=state["step"], tokens=state["tokens"], **info)


def remove_rolling(run):
    """The rolling checkpoint goes once a chunk ends (it is older) or is skipped (it holds
    part of it)."""
    if run.rank == 0 and os.path.exists(os.path.join(run.cfg.out_dir, "ckpt_rolling")):
        shutil.rmtree(os.path.join(run.cfg.out_dir, "ckpt_rolling"))
    barrier(run.world_size)


def end_chunk(run, state, pos, chunk, data_dir, manifest):
    """A chunk is done: its validation loss, the checkpoint of schedule position pos, the figure."""
    vals = validate(run, data_dir, manifest)
    val = vals["val_loss"] if vals else None
    if vals:
        run.log.metric({"step": state["step"], "pos": pos, "chunk": chunk,
                        "tokens": state["tokens"], **vals})
    state["pos"] = pos + 1
    state["finished"] = state["pos"] >= len(state["schedule"])
    t0 = time.perf_counter()
    info = save(run, state, f"ckpt_{pos:03d}")
    remove_rolling(run)
    seconds = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    if run.rank == 0:
        try:
            plot.plot_run(run.cfg.out_dir)
        except Exception as e:  # a figure never stops a run
            run.log.event("figure_failed", error=f"{type(e).__name__}: {e}")
    run.log.event("checkpoint", name=f"ckpt_{pos:03d}", chunk=chunk, step=state["step"],
                  tokens=state["tokens"], val_loss=val, seconds=seconds,
                  figure_seconds=round(time.perf_counter() - t0, 3), **info)
    print0(f"chunk {chunk} done: step {state['step']}, val loss "
           f"{val if val is None else round(val, 4)}, ckpt_{pos:03d} written in {seconds:.2f} s",
           rank=run.rank)


def skip_step(run, state, reader, chunk):
    """A step of skip_steps: its batch is read and not trained on; the schedule goes on."""
    for _ in range(run.accum):
        next(reader)
    state["step"] += 1
    state["tokens"] += run.cfg.global_batch_size * run.cfg.seq_len
    run.log.event("skip_step", step=state["step"], chunk=chunk, chunk_step=reader.step)


def skip_chunk(run, state, pos, chunk, nonfinite):
    """The NaN policy (the paper's four NaN chunks, skipped by hand there): "stop" ends the
    run naming the last good checkpoint; "skip_chunk" rolls back to the last chunk-end
    checkpoint (or the seeded initial weights), records the chunk as skipped and appends
    a replacement chunk, so the LR schedule still runs to its end. Returns the new state."""
    cfg, log = run.cfg, run.log
    log.event("nonfinite", chunk=chunk, pos=pos, **nonfinite)
    last_good = find_checkpoint(cfg.out_dir, chunk_ends_only=True)  # a state without this chunk
    where = os.path.basename(last_good) if last_good else "the initial weights"
    if cfg.nan_policy == "stop":
        raise SystemExit(f"error: non-finite loss {nonfinite['loss']} / grad norm "
                         f"{nonfinite['grad_norm']} at step {nonfinite['step']} in chunk {chunk}; "
                         f"stopped. The last good checkpoint is {where}. Set "
                         "nan_policy='skip_chunk' to skip such chunks automatically.")
    remove_rolling(run)
    skipped = state["skipped"] + [{"chunk": chunk, "pos": pos, "step": nonfinite["step"],
                                   "reason": f"non-finite loss {nonfinite['loss']} or grad norm "
                                             f"{nonfinite['grad_norm']}"}]
    schedule = state["schedule"]
    if last_good:
        state = load_checkpoint(last_good, run.raw_model, run.optimizer, run.rank, run.fsdp)
    else:  # no checkpoint yet: back to the seeded initial weights and a fresh optimizer
        run.raw_model.init_weights(cfg.seed)
        run.optimizer.state.clear()
        state = state | {"step": 0, "tokens": 0}
    state["skipped"], state["reader"] = skipped, None
    bad = {s["chunk"] for s in skipped}
    used = len(skipped) - 1  # replacements appended so far: one for each chunk skipped before
    # the planned chunks, in their order
    candidates = [c for c in dict.fromkeys(schedule) if c not in bad]
    state["schedule"] = schedule + ([candidates[used % len(candidates)]] if candidates else [])
    state["pos"] = pos + 1
    log.event("skip_chunk", chunk=chunk, pos=pos, step=nonfinite["step"], rolled_back_to=where,
              replacement=state["schedule"][-1] if candidates else None)
    print0(f"chunk {chunk} gave a non-finite loss at step {nonfinite['step']}: skipped, rolled "
           f"back to {where}, chunk {state['schedule'][-1]} appended to finish the LR schedule",
           rank=run.rank)
    return state


# -----------------------------------------------------------------------------
# the run


def main(cfg):
    rank, world_size, device = init_distributed()
    try:
        if cfg.dry_run:
            return plan(cfg, world_size) if rank == 0 else None
        run, state = setup(cfg, rank, world_size, device)
        return train(run, state) if run else state
    finally:
        close_distributed()


class Preemption:
    """SIGUSR1 (SLURM's early warning, `--signal=USR1@600`: minutes before the time limit),
    SIGTERM (a scheduler's preemption, 30 s before its SIGKILL) or SIGINT (Ctrl-C) asks the
    run to stop: the step in flight finishes, every rank agrees on the step to stop after
    (any rank's signal stops all: one all-reduce of a flag per step), and the run writes its
    checkpoint (under FSDP each rank its own shard) and exits. A second signal while it
    saves is noted and changes nothing."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal = None
        self.previous = {s: signal.signal(s, self._note) for s in self.SIGNALS}

    def _note(self, signum, frame):
        if self.signal is None:
            self.signal = signal.Signals(signum).name
            print(f"{self.signal}: stopping after this step, with a checkpoint", file=sys.stderr,
                  flush=True)

    def requested(self, run):
        flag = torch.tensor([1.0 if self.signal else 0.0], device=run.device)
        return bool(all_reduce_sum(flag, run.world_size).item())

    def stop(self, run, state, name):
        run.log.event("preempted", signal=self.signal or "another rank's", step=state["step"],
                      checkpoint=name)
        raise SystemExit(f"stopped by {self.signal or 'a signal to another rank'} after step "
                         f"{state['step']}: {name} written; run the same command to resume")

    def close(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def train(run, state):
    """The loop over the schedule's chunks and their optimizer steps; returns the final state."""
    preemption = Preemption()
    try:
        return _train(run, state, preemption)
    finally:
        preemption.close()


def _train(run, state, preemption):
    cfg, log, rank = run.cfg, run.log, run.rank
    tokens_per_step = cfg.global_batch_size * cfg.seq_len
    # the work of a step, for tok/s and MFU: DPO trains two sequences a row (chosen and rejected)
    # and runs the frozen reference forward on both (a third of a training step's FLOPs)
    seqs_per_row = 2 if cfg.objective == "dpo" else 1
    flops_per_step = run.raw_model.flops_per_token(cfg.seq_len) * tokens_per_step * seqs_per_row * \
        (4 / 3 if cfg.objective == "dpo" else 1)
    extra_steps = checkpoint_steps(cfg)
    first = os.path.join(cfg.out_dir, step_name(0))
    if 0 in extra_steps and state["step"] == 0 and not os.path.isdir(first):  # initialization
        save_step(run, state)
    while state["pos"] < len(state["schedule"]):
        pos, chunk = state["pos"], state["schedule"][state["pos"]]
        data_dir, manifest, local = run.table[chunk]  # `chunk` counts over all stages
        data.check_split(data_dir, manifest["chunks"][local], rank, run.world_size)
        reader = data.ChunkReader(data_dir, local, cfg.seed, cfg.global_batch_size,
                                  cfg.micro_batch_size, rank=rank, world_size=run.world_size,
                                  verify=False, manifest=manifest)
        if state["reader"]:
            reader.load_state_dict(state["reader"])
        bar = tqdm(total=reader.steps, initial=reader.step,
                   desc=f"chunk {chunk} ({pos + 1}/{len(state['schedule'])})", disable=rank != 0,
                   leave=False, dynamic_ncols=True)
        nonfinite = stopping = None
        while reader.step < reader.steps:
            if state["step"] + 1 in cfg.skip_steps:
                skip_step(run, state, reader, chunk)
                bar.update(1)
                continue
            # one optimizer step
            t0 = time.perf_counter()
            lr = get_lr(state["step"], cfg, run.total_steps)
            every = cfg.layer_stats_interval
            loss, norm, stats = train_step(run, reader, lr,
                                           layers=bool(every) and (state["step"] + 1) % every == 0)
            if not (math.isfinite(loss) and math.isfinite(norm)):  # the same values on every rank
                nonfinite = {"step": state["step"], "loss": loss, "grad_norm": norm}
                break
            dt = time.perf_counter() - t0
            state["step"] += 1
            state["tokens"] += tokens_per_step

            # log it: metrics.jsonl, the progress line, validation every val_interval steps
            record = {"step": state["step"], "pos": pos, "chunk": chunk,
                      "stage": run.dirs.index(data_dir), "chunk_step": reader.step,
                      "tokens": state["tokens"], "loss": loss, "grad_norm": norm, "lr": lr,
                      "step_time": dt, "tok_per_s": tokens_per_step * seqs_per_row / dt,
                      "tok_per_s_device": tokens_per_step * seqs_per_row / dt / run.world_size,
                      "mfu": mfu(flops_per_step, dt, run.world_size, run.peak),
                      "peak_mem_gb": peak_memory_gb(run.device)} | stats
            if cfg.val_interval and state["step"] % cfg.val_interval == 0:
                record.update(validate(run, data_dir, manifest) or {})
            log.metric(record)
            bar.update(1)
            if rank == 0:
                bar.write(progress_line(record))

            # stop at max_steps or on a signal; a rolling checkpoint every ckpt_interval steps
            stopping = preemption.requested(run)
            if stopping or (cfg.max_steps and state["step"] >= cfg.max_steps):
                break
            mid_chunk = reader.step < reader.steps
            if state["step"] in extra_steps and mid_chunk:  # ckpt_steps (a chunk end has its own)
                save_step(run, state, reader)
            if cfg.ckpt_interval and state["step"] % cfg.ckpt_interval == 0 and mid_chunk:
                save(run, state, "ckpt_rolling", reader)
        bar.close()

        # a non-finite loss: roll back and skip the chunk, or stop (nan_policy)
        if nonfinite:
            state = skip_chunk(run, state, pos, chunk, nonfinite)
            continue
        # stopped inside the chunk (max_steps, a signal): a resumable checkpoint
        if reader.step < reader.steps:
            save(run, state, "ckpt_rolling", reader)
            if stopping:
                preemption.stop(run, state, "ckpt_rolling")
            log.event("max_steps", step=state["step"], checkpoint="ckpt_rolling")
            return state
        # the chunk is done: validation loss, then the checkpoint of this schedule position
        end_chunk(run, state, pos, chunk, data_dir, manifest)
        stopping = stopping or preemption.requested(run)  # a signal during end_chunk
        if stopping and not state["finished"]:
            preemption.stop(run, state, f"ckpt_{pos:03d}")
        if cfg.max_steps and state["step"] >= cfg.max_steps and not state["finished"]:
            log.event("max_steps", step=state["step"], checkpoint=f"ckpt_{pos:03d}")
            return state

    if len(state["skipped"]) == len(state["schedule"]):
        log.event("failed", reason="every chunk was skipped",
                  skipped=[s["chunk"] for s in state["skipped"]])
        raise SystemExit(f"error: every chunk of the schedule ({len(state['schedule'])}) gave a "
                         "non-finite loss and was skipped; nothing was trained and no checkpoint "
                         "written. Lower lr, or look at the data with `python data.py inspect "
                         "CONFIG --chunk=C --step=S`")
    log.event("finish", step=state["step"], tokens=state["tokens"],
              skipped=[s["chunk"] for s in state["skipped"]])
    return state


def cli(argv):
    """The command line: every error the user can fix is one line, not a traceback."""
    with one_line_errors():
        if argv[:1] == ["verify"]:
            if len(argv) != 2:
                raise ConfigError("usage: python train.py verify RUN_DIR")
            sys.exit(1 if verify_run(argv[1]) else 0)
        main(load_config(argv))


if __name__ == "__main__":
    cli(sys.argv[1:])
