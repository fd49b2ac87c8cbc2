"""
A branch: a new run that goes on with another run's schedule from one of its
checkpoints, as the paper's §5 proposes ("starting from an intermediate checkpoint,
and either increasing or decreasing a specific data ratio"; "resume the pre-training
to obtain a domain-specific LLM").

    python train.py configs/tiny.py --branch_from=runs/tiny/ckpt_003 --out_dir=runs/b
    python train.py configs/tiny.py --branch_from=runs/tiny/ckpt_003 --data_dir=data/remix \
        --out_dir=runs/b
    python train.py configs/amber_7b.py --branch_from=amber/ckpt_179 --out_dir=runs/amber_b
        (from AMBER's release)

A branch starts exactly where its checkpoint stands: step, tokens, schedule position,
the LR's place in warmup and decay, AdamW and every RNG. With the parent's config
unchanged it is the parent: its later checkpoints equal the parent's bit for bit. It
may change:
  - the data of the remaining schedule: a data dir (or stages) other than the
    parent's, such as `remix.py` writes; its chunks are then the rest of the
    schedule, after the parent's chunks up to the branch point;
  - the LR schedule's remainder (lr, min_lr, warmup_steps, lr_schedule), and whatever
    else a resume would refuse, but the model's shape.
A Hugging Face folder of AMBER's release (weights only: LLM360 released no optimizer
states) branches at the position its name gives (ckpt_i has trained chunks 0..i of
the converted release) with a fresh AdamW, recorded as such.

The branch's run dir is complete and its own: the parent's checkpoints up to the branch
point are hard links (a copy where links fail, its size printed), so the branch survives
its parent's deletion; the branch point is linked first and verified there, so what is
loaded is what was checked, even from a parent still training; metrics.jsonl starts with
the parent's lines up to it; the ledger's first event, "branch", names the parent, the
checkpoint and its sha256, the stages and every change. evaluate.py, memorize.py,
release.py, plot.py and tracing.py read it as any run. Running the same command again
resumes the branch, however the branch point is written (the path is resolved once). A
branch never writes into its parent's run dir: an out_dir inside it is refused. From a
Hugging Face folder nothing is linked: the release folder is that series.
"""

import os
import re
import shutil
from dataclasses import dataclass, replace

import checkpoint
import data
import runlog
import runstate
from common import atomic_write, barrier, link_tree, print0, sha256_file, size_text
from config import ConfigError, config_to_dict, saved_config


@dataclass
class Parent:
    ckpt: str  # the checkpoint folder branched from (resolved)
    run_dir: str  # the run dir holding it
    state: dict | None  # its state.json; None for a Hugging Face folder (weights only)
    pos: int  # the schedule position the branch starts at
    dirs: list  # the data dirs the parent trained on (for a Hugging Face folder: the branch's)
    # the data dirs of the remaining schedule when they change; [] when the data goes on
    new_dirs: list
    # the sha256 of its state.json as read (a Hugging Face folder: of its config.json)
    fingerprint: str


def resolved(cfg):
    """cfg with branch_from resolved once (absolute, symbolic links followed), so that
    every spelling of the same checkpoint is the same branch point; an out_dir inside the
    parent's run dir is refused before anything is written there."""
    path = os.path.realpath(cfg.branch_from)
    out, home = os.path.realpath(cfg.out_dir), os.path.dirname(path)
    if out == home or out.startswith(home + os.sep):
        raise ConfigError(f"out_dir={cfg.out_dir!r} is inside the parent's run dir {home}; a "
                          "branch writes a run dir of its own: give an out_dir outside it")
    return replace(cfg, branch_from=path)


def parent_of(cfg):
    """The checkpoint cfg.branch_from names, checked from its state.json: one line for a
    branch point that is not there, of another model shape, or mid-chunk with other data.
    Its files are verified in start(), once linked."""
    path = cfg.branch_from
    kind = checkpoint.kind(path) if os.path.isdir(path) else None
    if kind is None:
        raise ConfigError(f"branch_from={cfg.branch_from!r}: no checkpoint there (a ckpt_NNN "
                          "folder of a run, or a Hugging Face folder ckpt_NNN of AMBER's release)")
    wanted = data.stage_dirs(cfg)
    if kind == "hf":
        m = re.fullmatch(r"ckpt_(\d+)", os.path.basename(path))
        if not m:
            raise ConfigError(f"branch_from={path!r}: a Hugging Face folder holds no schedule "
                              "position; name it ckpt_NNN as AMBER's release does (ckpt_i has "
                              "trained chunks 0..i)")
        shape = checkpoint.model_config(path)
        parent = Parent(path, os.path.dirname(path), None, int(m[1]) + 1, wanted, [],
                        sha256_file(os.path.join(path, "config.json")))
    else:
        state = checkpoint.read_state(path)
        if state is None:
            raise ConfigError(f"branch_from={path!r}: its state.json is missing or not valid JSON "
                              "(damaged)")
        state_sha = sha256_file(os.path.join(path, "state.json"))
        # replaced between the two reads: a parent still training
        if checkpoint.read_state(path) != state:
            raise ConfigError(f"branch_from={path!r} changed while it was read; run this again")
        shape = saved_config(state["config"]).model
        dirs = data.stage_dirs(state["config"])
        same = [os.path.realpath(d) for d in wanted] == [os.path.realpath(d) for d in dirs]
        parent = Parent(path, os.path.dirname(path), runstate.upgraded(state), state["pos"],
                        dirs, [] if same else wanted, state_sha)
        if parent.new_dirs and state["reader"]:
            raise ConfigError(f"branch_from={path!r} is a mid-chunk checkpoint; a branch with "
                              "other data starts at a chunk's end: give a ckpt_NNN")
    # None means n_head
    shape, wanted_shape = (replace(m, n_kv_head=m.kv_heads) for m in (shape, cfg.model))
    if shape != wanted_shape:
        changed = [f"{k}={getattr(shape, k)!r}" for k in shape.__dataclass_fields__
                   if getattr(shape, k) != getattr(wanted_shape, k)]
        raise ConfigError(f"branch_from={path!r} has another model shape ({', '.join(changed)}); a "
                          "branch keeps the parent's model: use its shape (or init_from to start a "
                          "new run from its weights)")
    return parent


def branch_config(cfg, parent):
    """The branch's config: with other data, its stages are the parent's data dirs and then
    the new ones, so that chunk ids, and every tool that reads them, cover the whole schedule."""
    return replace(cfg, stages=tuple(parent.dirs + parent.new_dirs)) if parent.new_dirs else cfg


def started(cfg):
    """The ledger's "branch" event when out_dir is this branch's run dir (the same command
    again: it resumes), None when out_dir is new; anything else is refused."""
    out = cfg.out_dir
    names = [n for n in os.listdir(out) if n != ".lock"] if os.path.isdir(out) else []
    first = runlog.first_event(out)
    if first.get("event") == "branch" and first.get("from") == cfg.branch_from:
        return first
    if names:
        raise ConfigError(f"out_dir={out!r} is not empty and is not this branch's run dir; a "
                          "branch writes a new run dir: give another out_dir")
    return None


def own_checkpoint(resume, first):
    """Whether a checkpoint was written by the branch (past its start), not linked from its
    parent."""
    return (resume is not None and first is not None
            and checkpoint.read_state(resume)["step"] > first["step"])


def config_of_started(cfg, first):
    """A started branch's config without its parent: the stages it recorded when it began
    (its parent may be gone since; its run dir holds every file a resume needs)."""
    return replace(cfg, stages=tuple(first["stages"])) if first.get("stages") else cfg


def start(run, parent, data_sha, precision):
    """The state a branch starts from. First the ledger's first event, which records where
    the branch comes from and every change; then the parent's checkpoints and metrics,
    linked into the run dir; then its weights, AdamW and RNG (a Hugging Face folder: its
    weights and a fresh AdamW, at the step its position gives)."""
    cfg, rank = run.cfg, run.rank
    if parent.state is None and parent.pos > len(run.table):
        raise ConfigError(f"{parent.ckpt} has trained {parent.pos} chunks; the data has "
                          f"{len(run.table)}")
    if parent.state and not parent.new_dirs and parent.state["data_manifest_sha256"] != data_sha:
        raise ConfigError(f"the data of {parent.run_dir} changed since {parent.ckpt} was written "
                          f"(manifest sha256 {parent.state['data_manifest_sha256'][:12]}..., now "
                          f"{data_sha[:12]}...); restore it, or branch with a data dir of your own")
    if parent.state is None:
        step = sum(data.chunk_steps(m, c, cfg.global_batch_size)
                   for _, m, c in run.table[: parent.pos])
        start_at = {"step": step, "tokens": step * cfg.global_batch_size * cfg.seq_len,
                    "pos": parent.pos}
        changes, optimizer = {}, "fresh: the folder holds weights only"
    else:
        start_at = {k: parent.state[k] for k in ("step", "tokens", "pos")}
        before = config_to_dict(saved_config(parent.state["config"]))
        changes = {k: [before.get(k), v] for k, v in config_to_dict(cfg).items()
                   if before.get(k) != v and k not in ("out_dir", "branch_from")}
        optimizer = "the parent's"
    run.log.event("branch", **{"from": cfg.branch_from}, parent_run=parent.run_dir,
                  checkpoint=os.path.basename(parent.ckpt), checkpoint_sha256=parent.fingerprint,
                  **start_at, optimizer=optimizer, data=parent.new_dirs or "the parent's",
                  stages=list(cfg.stages), changes=changes, world_size=run.world_size, **precision,
                  checkpoint_format=checkpoint.run_format(parent.run_dir) if parent.state
                  else runstate.FORMAT_VERSION)
    here = parent.ckpt
    # the branch point, linked first, then verified: what is loaded is what was checked
    if parent.state is not None:
        here = os.path.join(cfg.out_dir, os.path.basename(parent.ckpt))
    if rank == 0:
        if parent.state is not None:
            _link_branch_point(parent, here)
        copied = _link_parent(cfg.out_dir, parent)
        if copied:
            print(f"{parent.run_dir}: hard links failed, {size_text(copied)} of checkpoints copied",
                  flush=True)
    barrier(run.world_size)

    if parent.state is None:
        checkpoint.load_init_from(replace(cfg, init_from=parent.ckpt, branch_from=""),
                                  run.raw_model, None, data_sha, rank, run.fsdp)
        state = runstate.new_state(cfg, run.table, data_sha, **start_at)
    else:
        state = checkpoint.load_checkpoint(here, run.raw_model, run.optimizer, rank, run.fsdp)
        state["total_steps"] = cfg.lr_steps or parent.state["total_steps"]  # its LR curve goes on
        if parent.new_dirs:  # the rest of the schedule: every chunk of the new data, in order
            n_parent = len(data.chunk_table(parent.dirs))
            new_chunks = list(range(n_parent, len(run.table)))
            state["schedule"] = state["schedule"][: state["pos"]] + new_chunks
            state["data_manifest_sha256"], state["reader"] = data_sha, None
    print0(f"branching from {parent.ckpt}: step {state['step']}, schedule position {state['pos']}"
           + (f", then {len(state['schedule']) - state['pos']} chunks of "
              f"{', '.join(parent.new_dirs)}" if parent.new_dirs else ""), rank=rank)
    return state


def _link_branch_point(parent, here):
    """The branch point hard-linked to `here` and verified there: a parent still training
    may replace its ckpt_rolling meanwhile, and the links keep the files they were made to."""
    shutil.rmtree(here, ignore_errors=True)
    link_tree(parent.ckpt, here)
    problems = checkpoint.verify_checkpoint(here)
    if not problems and sha256_file(os.path.join(here, "state.json")) != parent.fingerprint:
        problems = ["its state.json is another than the one read a moment before"]
    if problems:
        shutil.rmtree(here)
        raise ConfigError(f"branch_from={parent.ckpt!r} is damaged or changed while it was linked "
                          f"({'; '.join(problems[:3])}); if its run is still training, run this "
                          "again; else branch from another checkpoint")


def _link_parent(out_dir, parent):
    """The parent's checkpoints before the branch point, hard-linked into out_dir, and its
    metrics.jsonl lines up to it, copied (the branch appends to its own); the bytes copied.
    A Hugging Face parent's folders stay where they are: the release is that series."""
    names = checkpoint.checkpoint_names(parent.run_dir) if parent.state else []
    point = os.path.basename(parent.ckpt)  # linked on its own; after it: not the branch's past
    names = names[: names.index(point)] if point in names else names
    copied = sum(link_tree(os.path.join(parent.run_dir, n), os.path.join(out_dir, n))
                 for n in names)
    lines = parent.state["metrics_lines"] if parent.state else 0
    src = os.path.join(parent.run_dir, "metrics.jsonl")

    def keep(tmp):
        with open(tmp, "w") as dst:
            if lines and os.path.exists(src):
                with open(src) as f:
                    for _, line in zip(range(lines), f):
                        dst.write(line)

    atomic_write(os.path.join(out_dir, "metrics.jsonl"), keep)
    return copied


def plan(cfg, steps):
    """For the dry run, from the steps of each chunk of the branch's data: (the step it
    starts at, steps left, its LR schedule's length, where it starts)."""
    path = os.path.realpath(cfg.branch_from)
    if checkpoint.kind(path) == "ours":
        parent = parent_of(resolved(cfg))
        left = sum(steps if parent.new_dirs else steps[parent.pos :])
        return parent.state["step"], left, parent.state["total_steps"], \
            f"{path} (step {parent.state['step']:,}, schedule position {parent.pos})"
    m = re.fullmatch(r"ckpt_(\d+)", os.path.basename(path))
    if not m:
        raise ConfigError(f"branch_from={cfg.branch_from!r}: a ckpt_NNN folder of a run or of "
                          "AMBER's release")
    pos = int(m[1]) + 1
    return sum(steps[:pos]), sum(steps[pos:]), sum(steps), \
        f"{path} (a Hugging Face folder: chunks 0..{pos - 1} trained, a fresh AdamW)"
