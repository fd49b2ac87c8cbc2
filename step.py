"""
One optimizer step, what train.py's loop repeats and spikes.py replays: the LR schedule,
AdamW, the objective of a micro-batch (next-token loss, or DPO on pairs for
finetune.py), the Run the step works with, and train_step itself.
"""

import math
from dataclasses import dataclass
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from common import all_reduce_sum
from config import Config, ConfigError
from model import Transformer
from runlog import RunLog

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


def grad_accum(cfg, world_size):
    per_step = cfg.micro_batch_size * world_size
    if cfg.global_batch_size % per_step:
        raise ConfigError(f"global_batch_size={cfg.global_batch_size} is not divisible by "
                          f"micro_batch_size x world size = {cfg.micro_batch_size} x {world_size}; "
                          "change global_batch_size or micro_batch_size")
    return cfg.global_batch_size // per_step


# -----------------------------------------------------------------------------
# the optimizer


def make_optimizer(groups, cfg, device):
    """AdamW over param groups; the fused kernel on CUDA and on a CPU (a third of the
    for-loop's time there: 4 ms against 13 ms a step on the tiny model)."""
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=device.type in ("cuda", "cpu"))


# -----------------------------------------------------------------------------
# the objectives: next-token loss, or DPO on pairs (finetune.py)

DPO_STATS = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy",
             "ref_preference")


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
             "reward_accuracy": (margin > 0).float(),
             "ref_preference": (ref_chosen > ref_rejected).float()}
    return -F.logsigmoid(margin).mean(), {k: v.detach() for k, v in stats.items()}


def lm_objective(model, x, y):
    """(loss, {}) of one micro-batch: the mean next-token loss over counted targets (all of
    them in pre-training; fine-tuning's prompts and padding are -1, uncounted)."""
    _, loss = model(x, y)
    return loss, {}


def dpo_objective(model, x, y, *, ref_model, seq_len, beta):
    """(loss, {stat: per-pair values}) of one micro-batch of pairs: each stored row is
    [chosen | rejected], each seq_len + 1 tokens with its prompt and padding uncounted; the
    frozen reference model (the starting checkpoint) scores both without gradients, in the
    same forward shape."""
    n, L = x.shape[0], seq_len
    xs = torch.cat([x[:, :L], x[:, L + 1 :]])  # chosen rows, then rejected
    ys = torch.cat([y[:, :L], y[:, L + 1 :]])
    policy = sequence_logps(model(xs)[0], ys)
    with torch.no_grad():
        ref = sequence_logps(ref_model(xs)[0], ys)
    return dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], beta)


def objective_of(cfg, ref_model=None):
    """(the objective of one micro-batch, fn(model, x, y) -> (loss, stats), and the names of
    its statistics), chosen once per run: the training step never asks which it is."""
    if cfg.objective == "lm":
        return lm_objective, ()
    return partial(dpo_objective, ref_model=ref_model, seq_len=cfg.seq_len,
                   beta=cfg.dpo_beta), DPO_STATS


# -----------------------------------------------------------------------------
# the step


@dataclass
class Run:
    """What the loop works with, built once by setup()."""
    cfg: Config
    rank: int
    world_size: int
    device: torch.device
    fsdp: bool
    autocast: object  # torch.autocast, or a nullcontext (float32, and FSDP, whose policy casts)
    log: RunLog
    dirs: list  # the data dirs (stages) in order
    table: list  # (data dir, manifest, chunk) of every chunk over all stages: the schedule's ids
    raw_model: Transformer  # what is saved: never a DDP / compile wrapper (no prefix leaks)
    model: torch.nn.Module  # raw_model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    params: list
    ref_model: Transformer | None  # DPO's frozen reference
    objective: object  # fn(model, x, y) -> (loss, stats) of a micro-batch, chosen once
    stat_names: tuple  # the statistics it returns (DPO's), averaged over the step
    accum: int  # micro-batches per optimizer step on each rank
    total_steps: int  # the LR schedule's length (state["total_steps"])
    peak: float  # FLOP/s of one device in the run's dtype, for MFU


def one_process_run(cfg, model, device, autocast, *, dirs=(), table=(), total_steps=1):
    """A Run of one process, no log and no wrapper, training `model` with AdamW and the
    next-token loss as train.py does: what spikes.py replays and bench.py times."""
    groups = model.param_groups(cfg.weight_decay)
    return Run(cfg=cfg, rank=0, world_size=1, device=device, fsdp=False, autocast=autocast,
               log=None, dirs=list(dirs), table=list(table), raw_model=model, model=model,
               optimizer=make_optimizer(groups, cfg, device),
               params=[p for g in groups for p in g["params"]], ref_model=None,
               objective=lm_objective, stat_names=(),
               accum=cfg.global_batch_size // cfg.micro_batch_size, total_steps=total_steps,
               peak=None)


def train_step(run, reader, lr, layers=False):
    """One optimizer step at learning rate lr: accum micro-batches, the true global gradient
    norm (DTensor-aware under FSDP), clipped when grad_clip > 0, then AdamW. Returns (loss,
    grad norm, DPO statistics), the same on every rank; a non-finite loss or norm leaves the
    weights as they were. layers=True adds each layer's gradient, update and weight norms
    (layer_norms)."""
    cfg, model = run.cfg, run.model
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
    loss_sum = torch.zeros((), device=run.device)
    stat_sums = torch.zeros(len(run.stat_names), device=run.device)
    for micro in range(run.accum):
        x, y = next(reader)
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        last = micro == run.accum - 1
        # DDP reduces on the last micro-batch only; FSDP2 reduce-scatters every one (as torchtitan
        # does), so no rank ever holds an unsharded float32 gradient (27 GB at 7B)
        ddp_waits = run.world_size > 1 and not run.fsdp and not last
        sync = model.no_sync() if ddp_waits else nullcontext()
        with sync, run.autocast:
            loss, stats = run.objective(model, x, y)
            (loss / run.accum).backward()
        loss_sum += loss.detach()
        if stats:
            stat_sums += torch.stack([stats[k].mean() for k in run.stat_names])
    if layers:  # the gradient before clipping, as the global norm
        stats = layer_norms(run, "grad_norm", [p.grad for p in run.params])
        before = [local(p).detach().clone() for p in run.params]
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(run.params, max_norm)
    n = run.accum * run.world_size
    loss_avg = (all_reduce_sum(loss_sum, run.world_size) / n).item()
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    stats = stats if layers else {}
    if run.stat_names:
        stats |= dict(zip(run.stat_names, (all_reduce_sum(stat_sums, run.world_size) / n).tolist()))
    if math.isfinite(loss_avg) and math.isfinite(norm):
        run.optimizer.step()
    if layers:
        stats |= layer_norms(run, "update_norm",
                             [local(p).detach() - b for p, b in zip(run.params, before)])
        stats |= layer_norms(run, "weight_norm", run.params)
    run.optimizer.zero_grad(set_to_none=True)
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    return loss_avg, norm, stats


def local(t):
    """This rank's part of a tensor: its shard under FSDP2, the tensor otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


def layer_of(name):
    """The summary a parameter counts in: its block (layer.i), or embed, final_norm, head."""
    first = name.split(".")[0]
    if first == "layers":
        return "layer." + name.split(".")[1]
    return {"tok_emb": "embed", "lm_head": "head"}.get(first, "final_norm")


def layer_norms(run, what, tensors):
    """{"what/layer": norm} of tensors parallel to run.params, per layer_of: each rank's
    squared sums, added over the ranks under FSDP2 (each holds a shard; under DDP each
    holds the whole, the same). Their root sum of squares is the whole model's norm."""
    name_of = {id(p): n for n, p in run.raw_model.named_parameters()}
    names = [layer_of(name_of[id(p)]) for p in run.params]
    keys = list(dict.fromkeys(names))
    sums = torch.zeros(len(keys), dtype=torch.float64, device=run.device)
    for name, t in zip(names, tensors):
        sums[keys.index(name)] += local(t).detach().double().square().sum()
    if run.fsdp:
        sums = all_reduce_sum(sums, run.world_size)
    return {f"{what}/{k}": v for k, v in zip(keys, sums.sqrt().tolist())}
