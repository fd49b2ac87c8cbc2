"""
Training dynamics over a checkpoint series, what the paper releases its 360
checkpoints for ("understand what happens during LLM pre-training"): how each weight
tensor moves from checkpoint to checkpoint, and where AdamW's state sits.

    python dynamics.py RUN_DIR [--checkpoints=ckpt_000,...] [--power_iters=10]
    torchrun --nproc_per_node=8 dynamics.py RUN_DIR      the tensors split over the ranks
    python dynamics.py spikes RUN_DIR ...      loss spikes traced to their rows (spikes.py)

RUN_DIR is a run of ours or a folder of Hugging Face checkpoints ckpt_000 ... (AMBER's
release, weights only). For every checkpoint, every weight tensor (by its state-dict
name) and, summed, every layer and kind (`layer.3.attn_qkv`, `layer.3`, `embed`, ...):

    norm             ||W|| (Frobenius)
    init_distance    ||W - W_init|| / ||W_init||; W_init is re-drawn from the run's seed
                     as train.py draws it (for a Hugging Face series: its first checkpoint)
    update           ||W - W_prev|| / ||W||, W_prev the checkpoint before (for the first
                     of a run: the initialization)
    update_cos       the cosine between this update and the one before
    stable_rank      ||W||^2 / sigma_max^2 of a matrix, sigma_max by power iteration
                     (a summary: the mean over its matrices)
    adam_m, adam_v   ||m|| and ||v||, AdamW's moments (our checkpoints: optimizer.pt, or
                     an FSDP run's sharded optimizer/)
    eps_share        the share of entries whose bias-corrected sqrt(v) is below AdamW's
                     eps: there the step is m / eps rather than m / sqrt(v)

Written to RUN_DIR/dynamics.csv in long form, one line per value (checkpoint, step,
tokens, tensor, stat, value: pandas reads it as it is), with RUN_DIR/dynamics.png
(plot.py draws it: per statistic, layers x checkpoints).

Streamed: the tensors in the order the initialization draws them, and for each tensor
the checkpoints in turn, each read from its file on its own (safetensors; optimizer.pt
through torch.load's memory map, one checkpoint at a time): memory holds a few copies of
one tensor (at 7B at most 0.5 GB each), whatever the number of checkpoints. The raw
sums behind each checkpoint's values are cached in RUN_DIR/dynamics/NAME.json, keyed on
its weights' fingerprint and those it is compared with (the checkpoint before, the one
before that, the initialization) and on this code: a rerun after a new checkpoint reads
that one and the two before it.
"""

import csv
import dataclasses
import math
import os
import sys
import warnings

import torch
from safetensors import safe_open

import checkpoint
import plot
import sweeping
from common import (UserError, atomic_write, broadcast0, gather, init_distributed, one_line_errors,
                    parse_options, print0, read_json, write_json_atomic)
from config import saved_config
from model import Transformer

CODE = (__file__, os.path.join(os.path.dirname(os.path.abspath(__file__)), "model.py"))
KINDS = [  # (substring of a tensor's name, its kind): ours, then Hugging Face's names
    ("attn.wqkv", "attn_qkv"), ("attn.wo", "attn_o"), ("mlp.w_gate_up", "mlp_in"),
    ("mlp.w_down", "mlp_out"), ("q_proj", "attn_qkv"), ("k_proj", "attn_qkv"),
    ("v_proj", "attn_qkv"), ("o_proj", "attn_o"), ("gate_proj", "mlp_in"), ("up_proj", "mlp_in"),
    ("down_proj", "mlp_out"), ("norm", "norm")]


class DynamicsError(UserError):
    pass


# -----------------------------------------------------------------------------
# the series: checkpoints, their weights one tensor at a time, the initialization


def series(run_dir, wanted=None):
    """[(name, path, identity)] of a run's checkpoints in training order (chunk ends and
    extra permanent checkpoints, not ckpt_rolling)."""
    names = [n for n in checkpoint.checkpoint_names(run_dir)
             if checkpoint.kind(os.path.join(run_dir, n))]
    if not names:
        raise DynamicsError(f"{run_dir} holds no checkpoints (ckpt_NNN folders); train first")
    names = sweeping.pick(run_dir, names, wanted, DynamicsError)
    return [(n, os.path.join(run_dir, n), checkpoint.identity(os.path.join(run_dir, n)))
            for n in names]


def weight_files(path):
    """{tensor name: the file that holds it} of a checkpoint folder."""
    if checkpoint.kind(path) == "ours":
        files = [os.path.join(path, "model.safetensors")]
    else:
        files = checkpoint.hf_shards(path)
    where = {}
    for f in files:
        if f.endswith(".safetensors"):
            with safe_open(f, "pt") as handle:
                where |= dict.fromkeys(handle.keys(), f)
        else:
            where |= dict.fromkeys(torch.load(f, mmap=True, weights_only=True), f)
    return where


def read_tensor(where, name):
    """One tensor from its file, in float32; the file is closed again (nothing stays mapped)."""
    f = where[name]
    if f.endswith(".safetensors"):
        with safe_open(f, "pt") as handle:
            return handle.get_tensor(name).float()
    return torch.load(f, mmap=True, weights_only=True)[name].float().clone()


def initialization(cfg):
    """(name, W_init) of every parameter of a run of ours, one at a time: the model on the
    meta device, its values drawn from the run's seed as train.py's init_weights draws them."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    return model.init_values(cfg.seed, torch.device("cpu"))


# -----------------------------------------------------------------------------
# the raw sums of one tensor; values and summaries are ratios of them


def power_sigma(w, iters):
    """The largest singular value of a matrix by `iters` power iterations from a fixed start
    (a lower bound that converges fast when sigma_1 stands out)."""
    v = torch.ones(w.shape[1], dtype=w.dtype) / math.sqrt(w.shape[1])
    sigma = 0.0
    for _ in range(iters):
        u = w @ v
        v = w.T @ u
        sigma = math.sqrt(v.norm().item())
        if sigma == 0:
            return 0.0
        v = v / v.norm()
    return sigma


def squared(t):
    """The squared norm, without a squared copy of the tensor."""
    return torch.linalg.vector_norm(t).item() ** 2


def raw_sums(w, init, prev, prev_update, iters):
    """{w2, init2, dinit2, u2, pu2, uu, sigma2} of one tensor at one checkpoint: squared norms
    of W, W_init, W - W_init, the update and the one before, their dot product, and
    sigma_max^2 of a matrix. Those that have no reference are left out."""
    out = {"w2": squared(w)}
    if init is not None:
        out |= {"init2": squared(init), "dinit2": squared(w - init)}
    update = None
    if prev is not None:
        update = w - prev
        out["u2"] = squared(update)
        if prev_update is not None:
            out |= {"pu2": squared(prev_update), "uu": torch.dot(update.view(-1),
                                                                prev_update.view(-1)).item()}
    if w.ndim == 2 and iters:
        out["sigma2"] = power_sigma(w, iters) ** 2
    return out, update


def values(raw):
    """The statistics of one tensor or group from its (summed) raw sums."""
    out = {"norm": math.sqrt(raw["w2"])}
    if raw.get("init2"):
        out["init_distance"] = math.sqrt(raw["dinit2"] / raw["init2"])
    if "u2" in raw and raw["w2"]:
        out["update"] = math.sqrt(raw["u2"] / raw["w2"])
    if raw.get("pu2") and raw.get("u2"):
        out["update_cos"] = raw["uu"] / math.sqrt(raw["u2"] * raw["pu2"])
    if raw.get("sigma2"):
        out["stable_rank"] = raw["w2"] / raw["sigma2"]
    elif raw.get("ranks"):
        out["stable_rank"] = sum(raw["ranks"]) / len(raw["ranks"])
    if raw.get("n_adam"):
        out |= {"adam_m": math.sqrt(raw["m2"]), "adam_v": math.sqrt(raw["v2"]),
                "eps_share": raw["below_eps"] / raw["n_adam"]}
    return out


def groups_of(name):
    """The summaries a tensor counts in: its layer and its layer's kind, or its own kind."""
    parts = name.split(".")
    layer = next((parts[i + 1] for i, p in enumerate(parts[:-1]) if p == "layers"), None)
    if layer is None:
        if "emb" in name:
            return ["embed"]
        return ["head"] if "head" in name else ["final_norm"]
    kind = next((k for s, k in KINDS if s in name), "other")
    return [f"layer.{layer}", f"layer.{layer}.{kind}"]


def summed(tensors):
    """{group: summed raw} over the tensors of one checkpoint."""
    out = {}
    for name, raw in tensors.items():
        for g in groups_of(name):
            acc = out.setdefault(g, {"ranks": []})
            for k, v in raw.items():
                if k == "sigma2":
                    acc["ranks"].append(raw["w2"] / v if v else 0.0)
                else:
                    acc[k] = acc.get(k, 0.0) + v
    return out


# -----------------------------------------------------------------------------
# AdamW's moments, one checkpoint at a time


def moments(path, names, wanted):
    """(name, exp_avg, exp_avg_sq, step) of each tensor of `wanted`, one at a time: from
    optimizer.pt (memory-mapped, `names` in its index order), or from an FSDP run's
    torch.distributed.checkpoint shards (optimizer/, each tensor loaded whole on its own);
    nothing for a Hugging Face folder."""
    f, folder = os.path.join(path, "optimizer.pt"), os.path.join(path, "optimizer")
    if checkpoint.kind(path) != "ours":
        return
    if os.path.exists(f):
        osd = torch.load(f, mmap=True, weights_only=True, map_location="cpu")
        if sum(len(g["params"]) for g in osd["param_groups"]) == len(names):
            for i, s in osd["state"].items():
                if names[i] in wanted:
                    yield names[i], s["exp_avg"], s["exp_avg_sq"], float(s["step"])
        return
    if not os.path.isdir(folder):
        return
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    for name in names:
        keys = [f"state.{name}.{k}" for k in ("exp_avg", "exp_avg_sq", "step")]
        if name not in wanted or not all(k in meta for k in keys):
            continue
        sd = {k: torch.empty(meta[k].size, dtype=meta[k].properties.dtype) for k in keys}
        with warnings.catch_warnings():  # "torch.distributed is disabled...": one process reads
            warnings.simplefilter("ignore")
            dcp.load(sd, checkpoint_id=folder, no_dist=True)
        yield name, sd[keys[0]], sd[keys[1]], float(sd[keys[2]])


def adam_sums(m, v, step, beta2, eps):
    v_hat = v.float() / (1 - beta2 ** step)
    return {"m2": m.float().square().sum().item(), "v2": v.float().square().sum().item(),
            "below_eps": (v_hat.sqrt() < eps).sum().item(), "n_adam": v.numel()}


def optimizer_names(cfg):
    """Parameter names in the order AdamW's state indexes them (train.py's param groups)."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for g in model.param_groups(cfg.weight_decay) for p in g["params"]]


# -----------------------------------------------------------------------------
# the analysis: the checkpoints not cached yet, in one pass over the tensors


def chain_of(entries):
    """The series as it is compared: for a run of ours the initialization first (step 0),
    re-drawn from the seed; for a Hugging Face series its checkpoints, the first the
    reference. Each entry: (name, path or None, identity, the cache key's reference)."""
    first = entries[0][1]
    if checkpoint.kind(first) != "ours":
        return [(n, p, ident, entries[0][2]["weights"]) for n, p, ident in entries], None
    cfg = saved_config(checkpoint.read_state(first)["config"])
    init = {"step": 0, "tokens": 0, "weights": sweeping.result_key(
        {"model": dataclasses.asdict(cfg.model), "seed": cfg.seed})}
    chain = [("init", None, init, init["weights"])]
    return chain + [(n, p, ident, init["weights"]) for n, p, ident in entries], cfg


def cache_key(chain, i, iters):
    weights = [chain[j][2]["weights"] if j >= 0 else None for j in (i, i - 1, i - 2)]
    return sweeping.result_key({"weights": weights, "reference": chain[i][3], "iters": iters},
                               *CODE)


def analyse(chain, cfg, todo, iters, rank=0, world_size=1):
    """{index: {tensor: raw sums}} of the chain's entries `todo`: the tensors in the order
    the initialization draws them, and for each the entries it needs in turn (each of
    `todo`, and the two before it). Under torchrun each rank takes every world_size-th
    tensor (every rank draws the whole initialization, to keep its generator in step), and
    the ranks' results are gathered."""
    needed = sorted({j for i in todo for j in (i - 2, i - 1, i) if j >= 0})
    where = {j: weight_files(chain[j][1]) for j in needed if chain[j][1]}
    if cfg is not None:
        draws = initialization(cfg)
    else:
        draws = ((name, read_tensor(where[0], name)) for name in where[0])
    out, order = {i: {} for i in todo}, {}
    for k, (name, init) in enumerate(draws):
        order[name] = k
        if k % world_size != rank:
            continue
        prev = prev_update = prev_j = None
        for j in needed:
            if chain[j][1] is None:
                w = init
            elif name in where[j]:
                w = read_tensor(where[j], name)
            else:  # a tied head, stored once as the embedding
                break
            contiguous = prev_j == j - 1
            raw, update = raw_sums(w, init, prev if contiguous else None,
                                   prev_update if contiguous else None, iters)
            if j in out:
                out[j][name] = raw
            prev, prev_update, prev_j = w, update, j
    for i in todo:
        name, path = chain[i][:2]
        if path is None or checkpoint.kind(path) != "ours":
            continue
        saved = saved_config(checkpoint.read_state(path)["config"])
        for tensor, m, v, step in moments(path, optimizer_names(saved), set(out[i])):
            out[i][tensor] |= adam_sums(m, v, step, saved.beta2, saved.eps)
    merged = {i: {} for i in todo}
    for part in gather(out, world_size):
        for i, tensors in part.items():
            merged[i] |= tensors
    return {i: dict(sorted(t.items(), key=lambda kv: order[kv[0]])) for i, t in merged.items()}


def run(run_dir, wanted=None, iters=10, rank=0, world_size=1):
    """dynamics.csv and dynamics.png of a run dir (written by rank 0); returns the csv's
    path."""
    chain, cfg = chain_of(series(run_dir, wanted))
    cache = os.path.join(run_dir, "dynamics")
    os.makedirs(cache, exist_ok=True)
    keys = [cache_key(chain, i, iters) for i in range(len(chain))]

    def cached(i):
        path = os.path.join(cache, f"{chain[i][0]}.json")
        return os.path.exists(path) and read_json(path).get("key") == keys[i]

    todo = broadcast0([i for i in range(len(chain)) if not cached(i)], world_size)
    if todo:
        print0(f"{run_dir}: {len(todo)} of {len(chain)} checkpoints to analyse "
               f"({', '.join(chain[i][0] for i in todo[:5])}{' ...' if len(todo) > 5 else ''})"
               f"{f' on {world_size} ranks' if world_size > 1 else ''}", rank=rank)
        results = analyse(chain, cfg, todo, iters, rank, world_size)
        for i, tensors in results.items() if rank == 0 else ():
            name, _, ident, _ = chain[i]
            write_json_atomic(os.path.join(cache, f"{name}.json"),
                              {"key": keys[i], "checkpoint": name, "step": ident["step"],
                               "tokens": ident["tokens"], "tensors": tensors})
    if rank != 0:
        return None
    out = os.path.join(run_dir, "dynamics.csv")
    write_csv(out, [os.path.join(cache, f"{entry[0]}.json") for entry in chain])
    plot.plot_dynamics(run_dir)
    return out


def write_csv(path, cache_files):
    """The long form, one checkpoint's cache file in memory at a time."""
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["checkpoint", "step", "tokens", "tensor", "stat", "value"])
            for cache_file in cache_files:
                rec = read_json(cache_file)
                tensors = rec["tensors"]
                rows = list(tensors.items()) + sorted(summed(tensors).items())
                for tensor, raw in rows:
                    for stat, value in values(raw).items():
                        w.writerow([rec["checkpoint"], rec["step"], rec["tokens"], tensor, stat,
                                    f"{value:.6g}"])

    atomic_write(path, write)


def main(argv):
    if argv and argv[0] == "spikes":
        import spikes

        return spikes.main(argv[1:])
    if not argv or argv[0].startswith("--"):
        sys.exit("usage: python dynamics.py RUN_DIR [--checkpoints=ckpt_000,...] "
                 "[--power_iters=10]")
    with one_line_errors():
        opts = parse_options(argv[1:], {"checkpoints": str, "power_iters": int}, DynamicsError)
        if not os.path.isdir(argv[0]):
            raise DynamicsError(f"{argv[0]}: no such folder; give a run dir or a folder of "
                                "Hugging Face checkpoints")
        wanted = opts["checkpoints"].split(",") if "checkpoints" in opts else None
        rank, world_size, _ = init_distributed()
        out = run(argv[0], wanted, opts.get("power_iters", 10), rank, world_size)
        if rank == 0:
            print(f"wrote {out} and {os.path.join(argv[0], 'dynamics.png')}")


if __name__ == "__main__":
    main(sys.argv[1:])
