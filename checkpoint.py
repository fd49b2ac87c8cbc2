"""
Checkpoints and run dirs: what they hold, and every read and write of them.

A run dir (train.py's out_dir) holds:

    config.json, run.json      the resolved config; git commit, versions, devices, precision
    metrics.jsonl              one line per optimizer step (+ validation lines)
    ledger.jsonl               events: start, resume, checkpoint, skipped chunk, finish
    training.png               the curves (plot.py)
    ckpt_000 ... ckpt_N        one checkpoint after each schedule position (a chunk)
    ckpt_rolling               the newest mid-chunk checkpoint (ckpt_interval > 0, max_steps)
    ckpt_stepSSSSSS            permanent ones at the steps of ckpt_steps (step 0: the init)

A checkpoint folder holds:

    model.safetensors          every parameter in float32 (a tied output head stored once);
                               under FSDP a checkpoint that stops a run mid-chunk (a signal,
                               max_steps, ckpt_interval) holds a torch.distributed.checkpoint
                               folder model/ instead: each rank writes its own shard, nothing
                               is gathered (the stop must fit a scheduler's grace period);
                               the chunk-end checkpoints that evaluation reads have both
    optimizer.pt               the AdamW state; under FSDP a torch.distributed.checkpoint
                               folder optimizer/ instead, one shard per rank
    rng_rank{r}.pt             each rank's torch, Python (and CUDA) RNG state
    state.json                 the run's state (runstate.py: step, tokens, schedule position
                               `pos`, the schedule, ...) with the config, the world size,
                               `files`: the size and sha256 of every other file,
                               `state_sha256`: of state.json itself (but that key), and
                               `format_version` (FORMAT_VERSION; none: 1, written before
                               checkpoints recorded files and digests, read as it is)

A checkpoint is written into NAME.tmp and renamed into place, so a folder named
ckpt_NNN is always complete; a resume verifies the newest against `files` and
`state_sha256`, moves a damaged one aside as NAME.damaged-TIME and takes the newest
intact one, and refuses metrics.jsonl lines that are not those it recorded, and a
checkpoint that is a symbolic link (checkpoints are folders of their run dir). A Hugging
Face folder (config.json + safetensors or .bin shards, LLM360's release format) is
read and written by hf_format.py, and read through here like one of ours.
"""

import hashlib
import itertools
import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import MISSING, fields

import torch
import torch.distributed as dist

import data
import runlog
from common import barrier, broadcast0, read_json, sha256_file, size_text, writing
from config import ConfigError, config_to_dict, saved_config
from hf_format import CheckpointError, hf_model_config, hf_shards, load_hf
from model import Transformer
from runstate import FORMAT_VERSION, INTEGRITY, upgraded


# what the dry run plans a rank's checkpoint with: writing its shard (torch.distributed.checkpoint,
# fsync'd) and hashing it. `python bench.py ckpt` measured 0.77 and 1.65 GB/s on this project's
# 2-core machine; planned at about 2/3 of that, a margin for a file system shared by every rank
WRITE_BYTES_PER_S = 0.5e9
HASH_BYTES_PER_S = 1.0e9


# -----------------------------------------------------------------------------
# listing and reading state.json


def checkpoint_names(run_dir, rolling=False):
    """The checkpoint folders of a run dir in training order: ckpt_NNN (the end of schedule
    position NNN) and ckpt_stepSSSSSS (an extra one at step S, ckpt_steps) by the (position,
    step) their state.json records, and ckpt_rolling last when rolling=True; never *.tmp
    (being written) or *.damaged-TIME (moved aside)."""
    if not os.path.isdir(run_dir):
        return []
    names = [n for n in os.listdir(run_dir)
             if (re.fullmatch(r"ckpt_[0-9]+", n) or STEP_NAME.fullmatch(n)
                 or rolling and n == "ckpt_rolling")
             and os.path.isdir(os.path.join(run_dir, n))
             and not os.path.islink(os.path.join(run_dir, n))]
    return sorted(names, key=lambda n: training_order(run_dir, n))


STEP_NAME = re.compile(r"ckpt_step([0-9]+)")


def step_name(step):
    return f"ckpt_step{step:06d}"


def training_order(run_dir, name):
    """(schedule position, step) of a checkpoint name, for sorting: read from the name for
    ckpt_NNN (the end of position NNN comes before any step of position NNN + 1), from
    state.json for a step checkpoint (unreadable: by its step, first)."""
    if name == "ckpt_rolling":
        return (math.inf, math.inf)
    step = STEP_NAME.fullmatch(name)
    if step is None:
        return (int(name[5:]) + 1, -1)
    state = read_state(os.path.join(run_dir, name))
    return (state["pos"], state["step"]) if state else (-1, int(step[1]))


def linked_checkpoints(run_dir):
    """Checkpoint names of a run dir that are symbolic links: never followed (another run's
    checkpoint, or one of this run's under a second name)."""
    return sorted(n for n in os.listdir(run_dir) if n.startswith("ckpt_")
                  and os.path.islink(os.path.join(run_dir, n)))




def integrity_problems(path, state):
    """[] when a state.json holds what its format version promises; a current-version state
    missing a field, or a state of an older version in a run dir started by code that
    writes the current one (its ledger's first event says so), is damaged. The one place
    that knows the older formats: version 1 records no files and no digests, and is read
    as it is (its total_steps is planned again from the data)."""
    version = state.get("format_version", 1)
    started = run_format(os.path.dirname(os.path.abspath(path)))
    if version < started:
        return [f"state.json says format {version}, but its run dir was started by code that "
                f"writes format {started} (edited?)"]
    missing = [k for k in INTEGRITY if k not in state] if version >= 2 else []
    return [f"state.json lacks {', '.join(missing)}, which format {version} records "
            "(edited?)"] if missing else []


def run_format(out_dir):
    """The checkpoint format the code that started a run dir writes: its ledger's first
    event records it (1 for a run dir started before it did)."""
    try:
        return runlog.first_event(out_dir).get("checkpoint_format", 1)
    except ConfigError:  # a damaged ledger: the checkpoints are judged by what they hold
        return 1


def state_digest(state):
    """The sha256 of a state as state.json holds it, leaving out its own digest."""
    return hashlib.sha256(json.dumps({k: v for k, v in state.items() if k != "state_sha256"},
                                     indent=1).encode()).hexdigest()


def metrics_digest(path, n_lines=None):
    """(lines, sha256) of the first n_lines lines of a metrics.jsonl (all when None)."""
    h, n = hashlib.sha256(), 0
    if os.path.exists(path):
        with open(path, "rb") as f:
            for line in itertools.islice(f, n_lines):
                h.update(line)
                n += 1
    return n, h.hexdigest()


def kind(path):
    """"ours" (state.json), "hf" (a Hugging Face folder: config.json) or None."""
    if os.path.exists(os.path.join(path, "state.json")):
        return "ours"
    return "hf" if os.path.exists(os.path.join(path, "config.json")) else None


def read_state(path):
    """The state.json of a checkpoint folder, or None when it is missing or unreadable."""
    try:
        with open(os.path.join(path, "state.json")) as f:
            state = json.load(f)
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8
        return None
    return state if isinstance(state, dict) and {"pos", "step", "config"} <= set(state) else None


# -----------------------------------------------------------------------------
# writing a checkpoint


def full_state_dict(raw_model, fsdp):
    """Float32 CPU tensors of every parameter; the tied output head is stored once."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(raw_model,
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = raw_model.state_dict()
    if raw_model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.detach().to(device="cpu", dtype=torch.float32).contiguous() for k, v in sd.items()}


def save_checkpoint(path, raw_model, optimizer, state, cfg, *, rank, world_size, fsdp,
                    consolidated=True):
    """Write a checkpoint folder atomically: everything into path.tmp, then one rename.
    consolidated=False under FSDP: the weights as each rank's shard (model/), not gathered
    into model.safetensors. Returns the seconds each part took and the bytes written."""
    tmp = path + ".tmp"
    per_rank = 12 * raw_model.num_params() / (world_size if fsdp and not consolidated else 1)
    check_free_space(os.path.dirname(path), per_rank, rank, world_size)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier(world_size)
    try:
        with writing(tmp):
            return _write_checkpoint(tmp, path, raw_model, optimizer, state, cfg, rank=rank,
                                     world_size=world_size, fsdp=fsdp, consolidated=consolidated
                                     or not fsdp)
    except OSError:
        if rank == 0:  # a full disk: give back what the unfinished checkpoint took
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_checkpoint(tmp, path, raw_model, optimizer, state, cfg, *, rank, world_size, fsdp,
                      consolidated):
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    if consolidated:
        model_sd = full_state_dict(raw_model, fsdp)  # collective under FSDP
        if rank == 0:
            save_file(model_sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        # rank 0 held every weight in float32 (27 GB at 7B): gone before the optimizer's turn
        del model_sd
    else:
        import torch.distributed.checkpoint as dcp

        dcp.save(sharded_state_dict(raw_model), checkpoint_id=os.path.join(tmp, "model"))
    t1 = time.perf_counter()
    if fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        dcp.save(get_optimizer_state_dict(raw_model, optimizer),
                 checkpoint_id=os.path.join(tmp, "optimizer"))
    elif rank == 0:
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
               os.path.join(tmp, f"rng_rank{rank}.pt"))
    barrier(world_size)
    t2 = time.perf_counter()
    files = hash_files(tmp, rank, world_size)  # collective: each rank hashes a share
    t3 = time.perf_counter()
    if rank == 0:
        full = state | {"config": config_to_dict(cfg), "world_size": world_size, "files": files,
                        "format_version": FORMAT_VERSION}
        with open(os.path.join(tmp, "state.json"), "w") as f:
            f.write(json.dumps(full | {"state_sha256": state_digest(full)}, indent=1))
        if os.path.exists(path):  # the rolling checkpoint: replace the previous one
            shutil.rmtree(path)
        os.rename(tmp, path)
    barrier(world_size)
    return {"weights_s": round(t1 - t0, 3), "optimizer_s": round(t2 - t1, 3),
            "hash_s": round(t3 - t2, 3), "bytes": sum(f["bytes"] for f in files.values()),
            "consolidated": consolidated}


def sharded_state_dict(raw_model):
    """The model's state dict as it lies on the ranks (DTensor shards under FSDP), for
    torch.distributed.checkpoint; a tied output head once, under tok_emb.weight."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(raw_model)
    if raw_model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def check_free_space(folder, needed, rank=0, world_size=1):
    """Stop before writing a checkpoint that cannot fit (float32 weights and both AdamW
    moments: 12 bytes a parameter, 84 GB at 7B), rather than fail in the middle of it.
    Rank 0 looks and every rank stops alike."""
    free = broadcast0(shutil.disk_usage(folder).free if rank == 0 else 0, world_size)
    if free < needed * 1.01:
        newest = find_checkpoint(folder)
        start = os.path.basename(newest) if newest else "the start"
        raise CheckpointError(f"{folder}: {size_text(free)} free, a checkpoint needs about "
                              f"{size_text(needed)}; free space and run the same command again (it "
                              f"resumes from {start})")


def hash_files(folder, rank=0, world_size=1):
    """{relative path: {"bytes", "sha256"}} of every file under a checkpoint folder but
    state.json. Collective: the files are dealt out by size, largest first, each to the
    rank with the fewest bytes so far (a 7B checkpoint is 80 GB: one 27 GB weights file and
    a shard of the optimizer per rank; sha256 runs at about 1.4 GB/s a core)."""
    names = sorted(os.path.relpath(os.path.join(root, f), folder)
                   for root, _, fs in os.walk(folder) for f in fs if f != "state.json"
                   or root != folder)
    sizes = broadcast0({n: os.path.getsize(os.path.join(folder, n)) for n in names} if rank == 0
                       else None,
                       world_size)  # rank 0's listing: every rank deals from the same one
    load, owner = [0] * world_size, {}
    for n in sorted(sizes, key=lambda n: (-sizes[n], n)):
        owner[n] = load.index(min(load))
        load[owner[n]] += sizes[n]
    mine = {n: {"bytes": sizes[n], "sha256": sha256_file(os.path.join(folder, n))} for n in sizes
            if owner[n] == rank}
    if world_size > 1:
        parts = [None] * world_size
        dist.all_gather_object(parts, mine)
        mine = {k: v for part in parts for k, v in part.items()}
    return dict(sorted(mine.items()))


# -----------------------------------------------------------------------------
# verifying, and the point a run resumes from


def find_checkpoint(out_dir, chunk_ends_only=False):
    """The newest complete checkpoint of a run dir, or None. Folders without a readable
    state.json are left out (resume_point moves the newer of them aside). chunk_ends_only:
    leave out the mid-chunk checkpoints (ckpt_rolling, ckpt_stepSSSSSS)."""
    best, best_key = None, None
    for name in checkpoint_names(out_dir, rolling=True):
        st = read_state(os.path.join(out_dir, name))
        if st is None or chunk_ends_only and (name == "ckpt_rolling" or STEP_NAME.fullmatch(name)):
            continue
        # positions only grow; a rolling checkpoint is ahead of the last chunk's
        key = (st["pos"], st["step"])
        if best_key is None or key > best_key:
            best, best_key = os.path.join(out_dir, name), key
    return best


def verify_checkpoint(path, rank=0, world_size=1):
    """What is wrong with a checkpoint folder: [] when every file its state.json records is
    there with its size and sha256. Collective when the sizes match (the hashing is shared).
    Checkpoints written before files were recorded are taken as they are."""
    state = read_state(path)
    if state is None:
        return ["state.json is missing or not valid JSON"]
    problems = integrity_problems(path, state)
    if problems:
        return problems
    if "state_sha256" in state and state_digest(state) != state["state_sha256"]:
        return ["state.json was changed after it was written (not the sha256 it records)"]
    files = state.get("files")
    if files is None:  # format 1
        return []
    problems = []
    for name, rec in files.items():
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            problems.append(f"{name} is missing")
        elif os.path.getsize(p) != rec["bytes"]:
            problems.append(f"{name} has {os.path.getsize(p):,} bytes, not {rec['bytes']:,}")
    if problems:
        return problems
    got = hash_files(path, rank, world_size)
    return [f"{n}: sha256 differs from the one written" for n, rec in files.items()
            if got[n]["sha256"] != rec["sha256"]]


def resume_point(out_dir, log, rank=0, world_size=1):
    """The newest intact checkpoint of a run dir, or None. A damaged one that is newer (a
    file missing, truncated or changed since it was written; state.json unreadable or
    edited) is moved aside as NAME.damaged-TIME, said in one line and in the ledger, and
    the next newest is tried. Older checkpoints are not read past state.json: a damaged one
    of them never blocks a resume (python train.py verify RUN_DIR finds it). A checkpoint
    name that is a symbolic link stops the resume."""
    linked = linked_checkpoints(out_dir) if os.path.isdir(out_dir) else []
    if linked:
        raise CheckpointError(f"{os.path.join(out_dir, linked[0])} is a symbolic link (to "
                              f"{os.readlink(os.path.join(out_dir, linked[0]))}), not a checkpoint "
                              "folder of this run; remove it (or put the folder itself there), "
                              "then run this again")
    while True:
        best = find_checkpoint(out_dir)
        state = read_state(best) if best else {"pos": -1, "step": -1}
        best_key, best_step = (state["pos"], state["step"]), state["step"]
        damaged = {}
        for name in checkpoint_names(out_dir, rolling=True):  # unreadable: newer by its name?
            path, step = os.path.join(out_dir, name), STEP_NAME.fullmatch(name)
            newer = int(step[1]) > best_step if step else \
                training_order(out_dir, name) > best_key
            if read_state(path) is None and newer:
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
                log.event("damaged_checkpoint", checkpoint=os.path.basename(path),
                          moved_to=os.path.basename(aside), problems=problems)
                shown = "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
                print(f"{path} is damaged ({shown}): moved aside to {os.path.basename(aside)}; "
                      "resuming from the newest intact checkpoint", flush=True)
        barrier(world_size)


def check_metrics(out_dir, state, path, rank=0, world_size=1):
    """A resume refuses a metrics.jsonl whose first lines are not those its checkpoint
    recorded. Rank 0 reads the file (300k lines at AMBER's size) and tells the others."""
    if state.get("format_version", 1) < 2:  # format 1 recorded no metrics digest
        return
    n, sha = broadcast0(metrics_digest(os.path.join(out_dir, "metrics.jsonl"),
                                       state["metrics_lines"])
                        if rank == 0 else None, world_size)
    if (n, sha) != (state["metrics_lines"], state["metrics_sha256"]):
        raise CheckpointError(f"{os.path.join(out_dir, 'metrics.jsonl')}: its first "
                              f"{state['metrics_lines']:,} lines are not those {path} recorded "
                              "(edited or cut since); restore the file, or move the checkpoints it "
                              "no longer matches out of the run dir to retrain from an older one "
                              f"(python train.py verify {out_dir} names them)")


# -----------------------------------------------------------------------------
# loading into a training run: resume, or init_from


def load_weights(model, sd, where, assign=False):
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=assign)
    if unexpected or [k for k in missing if not (k == "lm_head.weight"
                                                 and model.config.tie_embeddings)]:
        raise ConfigError(f"{where}: weights do not fit this model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); it was saved by a model of another shape")


def load_checkpoint_weights(path, raw_model, rank, fsdp):
    """A checkpoint's weights into the training model, each rank reading what it needs: its
    own shard of model/ (torch.distributed.checkpoint reshards to any world size), or under
    FSDP model.safetensors read by rank 0 alone and broadcast shard by shard."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if os.path.isdir(os.path.join(path, "model")):
        import torch.distributed.checkpoint as dcp

        sd = sharded_state_dict(raw_model)
        dcp.load(sd, checkpoint_id=os.path.join(path, "model"))
        set_model_state_dict(raw_model, sd, options=StateDictOptions(strict=False))  # tied head
    elif fsdp:
        sd = load_file(os.path.join(path, "model.safetensors")) if rank == 0 else {}
        if rank == 0 and raw_model.config.tie_embeddings:
            sd["lm_head.weight"] = sd["tok_emb.weight"]
        set_model_state_dict(raw_model, sd, options=StateDictOptions(full_state_dict=True,
                                                                     broadcast_from_rank0=True))
    else:
        with torch.no_grad():
            load_weights(raw_model, load_file(os.path.join(path, "model.safetensors")), path)


def load_checkpoint(path, raw_model, optimizer, rank, fsdp, load_optimizer=True):
    load_checkpoint_weights(path, raw_model, rank, fsdp)
    if load_optimizer:
        load_optimizer_state(path, raw_model, optimizer, fsdp)
    with open(os.path.join(path, "state.json")) as f:
        state = upgraded(json.load(f))
    rng_path = os.path.join(path, f"rng_rank{rank}.pt")
    if not os.path.exists(rng_path):
        if state["world_size"] == (dist.get_world_size() if dist.is_initialized() else 1):
            raise CheckpointError(f"{rng_path} is missing: the checkpoint is damaged")
        # another world size: this rank had no RNG state then (its stream starts from the seed)
        print(f"rank {rank}: {path} was written by {state['world_size']} ranks and holds no RNG "
              "state for this one",
              flush=True)
    else:
        rng = torch.load(rng_path, map_location="cpu", weights_only=True)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state


def load_optimizer_state(path, raw_model, optimizer, fsdp):
    """The AdamW state in whichever form the checkpoint holds it, into a run sharded or not
    (a resume may change `parallel` and the number of processes): DCP shards (optimizer/,
    written under FSDP), resharded by DCP; or one process's optimizer.pt, parameters by
    index, which under FSDP is renamed by parameter and each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    if os.path.isdir(os.path.join(path, "optimizer")):
        import torch.distributed.checkpoint as dcp

        osd = get_optimizer_state_dict(raw_model, optimizer)
        dcp.load(osd, checkpoint_id=os.path.join(path, "optimizer"))
        set_optimizer_state_dict(raw_model, optimizer, osd)
        return
    # onto this rank's own device (a checkpoint written on cuda:0 holds cuda:0 tensors)
    device = next(raw_model.parameters()).device
    osd = torch.load(os.path.join(path, "optimizer.pt"), map_location=device, weights_only=True)
    if not fsdp:
        optimizer.load_state_dict(osd)
        return
    names = {id(p): n for n, p in raw_model.named_parameters()}
    by_index = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    osd = {"state": {by_index[i]: s for i, s in osd["state"].items()},
           "param_groups": [g | {"params": [by_index[i] for i in g["params"]]}
                            for g in osd["param_groups"]]}
    set_optimizer_state_dict(raw_model, optimizer, osd,
                             options=StateDictOptions(full_state_dict=True))


# what a resume may change: where things are (the data's content is checked by its manifest's
# sha256), when it stops, saves and validates, and how the machine computes; anything else
# (the schedule, the data, the optimizer, the seed) makes another run: a branch
RESUME_MAY_CHANGE = {"out_dir", "data_dir", "stages", "num_workers", "max_steps", "ckpt_interval",
                     "val_interval", "val_sequences", "wandb_project", "peak_flops", "dry_run",
                     "dry_run_sequences_per_chunk", "dry_run_world_size", "plan_gpu",
                     "plan_gpu_memory_gb", "stop_grace_s", "micro_batch_size", "parallel",
                     "compile", "activation_checkpointing", "dtype", "deterministic",
                     "layer_stats_interval", "ckpt_steps"}


def config_changes(saved, cfg):
    """{key: (saved value, new value)} of every key whose value differs (as JSON); a key
    the saved config lacks (added to Config since) counts as its default."""
    now = json.loads(json.dumps(config_to_dict(cfg)))
    default = json.loads(json.dumps({f.name: f.default_factory() if f.default is MISSING
                                     else f.default for f in fields(cfg) if f.name != "model"}))
    return {k: (saved.get(k, default.get(k)), v) for k, v in now.items()
            if saved.get(k, default.get(k)) != v}


def check_shape(saved, cfg, path):
    changed = [f.name for f in fields(cfg.model) if saved.get(f.name) != getattr(cfg.model, f.name)]
    if changed:
        raise ConfigError(f"{path} was trained with another model shape "
                          f"({', '.join(f'{k}={saved.get(k)!r}' for k in changed)}); use another "
                          "out_dir, or init_from to start a new run from it")


def check_resumable(state, cfg, data_sha, path):
    """Refuse to resume with another model shape, another data manifest, or a config that
    changes what the run computes (one line: every difference, and the branch that makes it
    an experiment). Returns the changes a resume may make, for the ledger."""
    saved = state["config"]
    check_shape(saved, cfg, path)
    if state["data_manifest_sha256"] != data_sha:
        raise ConfigError(f"{path} was trained on other data (manifest sha256 "
                          f"{state['data_manifest_sha256'][:12]}..., now {data_sha[:12]}...); use "
                          "another out_dir, or init_from to continue on new data")
    changes = config_changes(saved, cfg)
    refused = {k: v for k, v in changes.items() if k not in RESUME_MAY_CHANGE}
    if refused:
        diff = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ConfigError(f"{path}: a resume is the same run, and this config changes {diff}; run "
                          "the command the run was started with, or make the change an "
                          f"experiment: add --branch_from={path} --out_dir=NEW_DIR to this command")
    return {k: list(v) for k, v in changes.items()}


def check_tokenizer(path, cfg):
    """A checkpoint of ours goes on only with data of its own tokenizer: another of the same
    vocabulary size gives its token ids other meanings, and the run would train on
    silently (from a validation loss of 4.9 back to 8.2)."""
    theirs = identity(path)["tokenizer"]
    for d in data.stage_dirs(cfg):
        tok = data.load_manifest(d)["tokenizer"]
        mine = tok.get("sha256") or tok.get("name")
        if theirs and mine and mine != theirs:
            raise CheckpointError(f"init_from={path!r} was trained with another tokenizer (sha256 "
                                  f"{theirs[:12]}...) than {d} holds ({mine[:12]}...); prepare the "
                                  "data with its tokenizer (tokenizer = '<its data dir>/"
                                  "tokenizer.model'), or start from another checkpoint")


def load_init_from(cfg, raw_model, optimizer, data_sha, rank, fsdp):
    """Start a new run from cfg.init_from: a checkpoint of ours (its weights, and its AdamW
    state when cfg.init_optimizer) or a Hugging Face folder (weights: AMBER's release)."""
    path = cfg.init_from
    if os.path.exists(os.path.join(path, "state.json")):
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        problems = verify_checkpoint(path, rank, world_size)
        if problems:
            raise CheckpointError(f"init_from={path!r} is damaged ({'; '.join(problems)}); "
                                  "start from another checkpoint")
        check_shape(read_state(path)["config"], cfg, path)
        check_tokenizer(path, cfg)
        load_checkpoint(path, raw_model, optimizer, rank, fsdp, load_optimizer=cfg.init_optimizer)
        return
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ConfigError(f"init_from={path!r} is neither a checkpoint of ours (state.json) nor a "
                          "Hugging Face folder (config.json)")
    sd = load_hf(path).state_dict()
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(raw_model, sd, options=StateDictOptions(full_state_dict=True))
    else:
        with torch.no_grad():
            load_weights(raw_model, sd, path)


# -----------------------------------------------------------------------------
# reading a checkpoint to use it: ours or a Hugging Face folder, with its tokenizer


def load_model(ckpt_dir, device="cpu"):
    """The Transformer of a checkpoint folder of ours, its weights checked against the
    sha256 written with them."""
    from safetensors.torch import load_file

    state = read_state(ckpt_dir)
    if state is None:
        raise CheckpointError(f"{ckpt_dir}/state.json is missing or not valid JSON: the checkpoint "
                              "is damaged")
    with torch.device("meta"):  # read straight onto the device: no second copy on the host
        model = Transformer(saved_config(state["config"]).model)
    if os.path.isdir(os.path.join(ckpt_dir, "model")):  # an FSDP run's stop checkpoint: shards
        model.to_empty(device="cpu")
        problems = verify_checkpoint(ckpt_dir)
        if problems:
            raise CheckpointError(f"{ckpt_dir} is damaged ({'; '.join(problems[:3])}); `python "
                                  f"train.py verify {os.path.dirname(ckpt_dir) or '.'}` checks the "
                                  "whole run")
        import torch.distributed.checkpoint as dcp

        sd = sharded_state_dict(model)
        dcp.load(sd, checkpoint_id=os.path.join(ckpt_dir, "model"), no_dist=True)  # whole, on CPU
        load_weights(model, sd, ckpt_dir)
        return model.to(device)
    weights = os.path.join(ckpt_dir, "model.safetensors")
    written = state.get("files", {}).get("model.safetensors")
    if written and (not os.path.exists(weights) or sha256_file(weights) != written["sha256"]):
        raise CheckpointError(f"{weights} is missing or differs from the file written (sha256 in "
                              "state.json): the checkpoint is damaged; `python train.py verify "
                              f"{os.path.dirname(ckpt_dir) or '.'}` checks the whole run")
    load_weights(model, load_file(weights, device=str(device)), ckpt_dir, assign=True)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight  # stored once, under tok_emb
    return model


def identity(path):
    """{step, tokens, data_dir, tokenizer, weights} of a checkpoint, read without its
    weights: `tokenizer` is the sha256 of what encodes text for it (the manifest's
    tokenizer, or a Hugging Face folder's tokenizer.model and tokenizer_config.json),
    `weights` a fingerprint of its weights (the sha256 state.json recorded when they were
    written, else the file's; for a Hugging Face folder the weight files' names, sizes and
    modification times, as hashing AMBER's 360 x 27 GB on every rerun would cost hours).
    Both are part of the cache key of every evaluation and memorization result."""
    if kind(path) == "ours":
        state = read_state(path)
        if state is None:
            raise CheckpointError(f"{path}/state.json is missing or not valid JSON: the checkpoint "
                                  "is damaged")
        dirs = data.stage_dirs(state["config"])
        last = state["schedule"][max(0, state["pos"] - 1)]
        # the stage trained last
        data_dir = data.chunk_table(dirs)[last][0] if len(dirs) > 1 else dirs[0]
        tok = data.load_manifest(data_dir)["tokenizer"]
        files = state.get("files", {})
        shards = sorted(f"{n} {r['sha256']}" for n, r in files.items() if n.startswith("model/"))
        written = files.get("model.safetensors", {}).get("sha256")
        if not written and shards:  # a sharded checkpoint
            written = hashlib.sha256("\n".join(shards).encode()).hexdigest()
        return {"step": state["step"], "tokens": state["tokens"], "data_dir": data_dir,
                "tokenizer": tok.get("sha256") or tok.get("name"),
                "weights": written or sha256_file(os.path.join(path, "model.safetensors"))}
    if kind(path) == "hf":
        h = hashlib.sha256()
        for name in ("tokenizer.model", "tokenizer_config.json"):
            if os.path.exists(os.path.join(path, name)):
                with open(os.path.join(path, name), "rb") as f:
                    h.update(name.encode() + f.read())
        return {"step": None, "tokens": None, "data_dir": None, "tokenizer": h.hexdigest(),
                "weights": _files_fingerprint(hf_shards(path))}
    raise CheckpointError(f"{path} is neither a checkpoint of ours (state.json) nor a Hugging Face "
                          "folder (config.json)")


def _files_fingerprint(paths):
    """sha256 of files' names, sizes and modification times: cheap, and changed when a file is
    replaced."""
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.basename(p)} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def model_config(path):
    """The ModelConfig of a checkpoint of ours or a Hugging Face folder, without its weights."""
    identity(path)  # neither kind, or a damaged state.json: one line that says so
    if kind(path) == "ours":
        return saved_config(read_state(path)["config"]).model
    return hf_model_config(path)


def load_tokenizer(path, info=None, required=True):
    """The tokenizer of a checkpoint: ours, through its data dir's manifest; a Hugging Face
    folder's tokenizer.model with the BOS conventions of its tokenizer_config.json. With
    required=False (memorization reads token ids only) a missing one is None."""
    info = info or identity(path)
    if info["data_dir"]:
        tok_info = data.load_manifest(info["data_dir"])["tokenizer"]
        # converted AMBER data may have none
        has_tok = tok_info["kind"] == "tiktoken" or tok_info.get("file")
        return data.load_tokenizer(info["data_dir"]) if has_tok or required else None
    tok_file = os.path.join(path, "tokenizer.model")
    if not os.path.exists(tok_file):
        if required:
            raise CheckpointError(f"{path}: no tokenizer.model (SentencePiece) beside the weights")
        return None
    with open(tok_file, "rb") as f:
        tok = data.Tokenizer("sentencepiece", f.read())
    _hf_special_tokens(path, tok)
    return tok


def _hf_special_tokens(path, tok):
    """Take a Hugging Face folder's BOS conventions from its tokenizer_config.json, as
    lm-evaluation-harness sees them: the prefix of an empty context is bos_token (else
    EOS), and add_bos_token puts BOS in front of every encoded text (LLaMA, AMBER)."""
    cfg_path = os.path.join(path, "tokenizer_config.json")
    if not os.path.exists(cfg_path):
        return
    cfg = read_json(cfg_path)
    bos = cfg.get("bos_token") if isinstance(cfg, dict) else None
    bos = bos.get("content") if isinstance(bos, dict) else bos
    bos_id = tok.sp.piece_to_id(bos) if bos else None
    if bos_id is not None and tok.sp.id_to_piece(bos_id) == bos:
        tok.prefix_id = bos_id
        tok.add_bos = bool(cfg.get("add_bos_token",
                                   cfg.get("tokenizer_class", "").startswith("Llama")))


def load(path, device="cpu", need_tokenizer=True):
    """(model in eval mode, tokenizer, identity) of a checkpoint of ours or a Hugging Face
    folder: what evaluate.py, memorize.py, sample.py and the export read."""
    info = identity(path)
    model = load_model(path, device) if kind(path) == "ours" else load_hf(path, device=device)
    return model.eval(), load_tokenizer(path, info, required=need_tokenizer), info
