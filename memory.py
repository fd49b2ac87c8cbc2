"""
What one rank of a run holds in memory, measured on this CPU rather than taken from a
textbook constant (train.py's dry run prints it; bench.py gpu sets it beside a GPU's
own count):

    weights, gradients, AdamW   from the real model, sharded by FSDP2 at the config's world
                                size: one process stands in for rank 0 of N through a fake
                                process group, on the meta device (nothing is allocated)
    activations                 what autograd saves for one block at the real width,
                                counted with saved-tensor hooks on real tensors at two small
                                token counts (a part per token and a fixed part: autocast's
                                bf16 copies of the weights), scaled to the micro-batch; with
                                activation checkpointing every block keeps its input and
                                one block at a time is recomputed
    the loss                    fused.py's chunked loss keeps d x (the hidden states' size)
                                and d W of the output head (float32), and one chunk of logits

A CPU saves more than a GPU in one place: its RMSNorm keeps a float32 copy of its input
where CUDA's fused kernel keeps the bf16 input and one float32 number a row. The
activations are an upper bound for a GPU by that much (shown by `python bench.py gpu`).
"""

import math
import warnings
from contextlib import nullcontext
from functools import lru_cache

import torch

import fused
from checkpoint import HASH_BYTES_PER_S, WRITE_BYTES_PER_S
from machine import GPU_BF16_PEAK
from model import Block, rope_tables
from parallelize import shard


def rank0_shard_elements(model_cfg, world_size, dtype=torch.bfloat16):
    """Elements of rank 0's shard of every parameter under FSDP2 at world_size (rank 0 has
    the most: FSDP2 gives each rank ceil(rows / world_size) rows), sharded as train.py shards."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from model import Transformer

    with torch.device("meta"):
        model = Transformer(model_cfg)
    if world_size == 1:
        return model.num_params()
    if dist.is_initialized():  # a dry run under torchrun: the same count, from FSDP2's rule
        return sum(math.ceil(p.shape[0] / world_size) * p[0].numel() for p in model.parameters())
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        shard(model, dtype)
        return sum(p.to_local().numel() for p in model.parameters())
    finally:
        dist.destroy_process_group()


def saved_by_block(block, tokens, dtype, param_dtype):
    """Bytes autograd saves in one block's forward of `tokens` tokens (real tensors, this
    CPU's kernels), leaving out the parameters and the rotary tables (shared by all blocks)."""
    x = torch.zeros(1, tokens, block.attn_norm.weight.shape[0], dtype=dtype, requires_grad=True)
    cos, sin = rope_tables(block.config, torch.arange(tokens))
    skip = {t.untyped_storage().data_ptr() for t in [*block.parameters(), cos, sin]}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    autocast = torch.autocast("cpu", dtype=dtype) if param_dtype != dtype else nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack,
                                                  lambda t: t), autocast, warnings.catch_warnings():
        # a CPU's RMSNorm under autocast: "Cannot dispatch to fused implementation"
        warnings.simplefilter("ignore")
        block(x, cos, sin)
    return sum(seen.values())


@lru_cache(maxsize=8)  # a process that plans several configs of one shape measures it once
def block_activations(model_cfg, dtype, param_dtype):
    """(bytes per token, fixed bytes) that one block saves: measured at 16 and 48 tokens."""
    with torch.device("meta"):
        block = Block(model_cfg, 0).to(param_dtype)
    block.to_empty(device="cpu")  # the values do not change what is saved: zeros, at memset speed
    for p in block.parameters():
        p.detach().zero_()
    block.config = model_cfg
    a, b = (saved_by_block(block, n, dtype, param_dtype) for n in (16, 48))
    per_token = (b - a) / 32
    return per_token, max(0.0, a - 16 * per_token)


def activations(model_cfg, tokens, dtype, param_dtype, checkpointing, loss_chunk):
    """{"blocks", "loss", "per_token_per_hidden"}: the bytes saved for backward by a micro-batch of
    `tokens` tokens, at its peak (with checkpointing: while the last block is recomputed)."""
    per_token, fixed = block_activations(model_cfg, dtype, param_dtype)
    one_block = fixed + per_token * tokens
    size = torch.tensor([], dtype=dtype).element_size()
    if checkpointing:  # every block's input, kept; one block's saved tensors at a time
        blocks = model_cfg.n_layer * tokens * model_cfg.dim * size + one_block
    else:
        blocks = model_cfg.n_layer * one_block
    loss = tokens * model_cfg.dim * size + model_cfg.vocab_size * model_cfg.dim * 4 + min(
        loss_chunk, tokens * model_cfg.vocab_size) * 4
    return {"blocks": blocks, "loss": loss, "per_token_per_hidden": per_token / model_cfg.dim}


def per_rank(cfg, model, world, fsdp, flops_per_step):
    """(lines, problems, figures) of one rank for train.py's dry run: its memory (measured as
    above, at the config's width and world size), its checkpoints' bytes and seconds, and
    the stop after a scheduler's signal against the grace period; `problems` refuse the plan."""
    n, L, gib = model.num_params(), cfg.model.n_layer, 2**30
    # what "auto" gives on a GPU
    dtype = torch.float32 if cfg.dtype == "float32" else torch.bfloat16
    local = rank0_shard_elements(cfg.model, world if fsdp else 1, dtype)
    act = activations(cfg.model, cfg.micro_batch_size * cfg.seq_len, dtype, dtype if fsdp
                      else torch.float32,
                      cfg.activation_checkpointing, fused.LOSS_CHUNK["cuda"])
    # FSDP2 gathers whole units for compute: the root's (embedding, head) for the whole step and two
    # blocks at a time (one prefetched) in the compute dtype, and reduces a unit's gradients in
    # float32
    block = sum(p.numel() for p in model.layers[0].parameters())
    gathered = ((n - L * block + 2 * block) * dtype.itemsize + (n - L * block + block)
                * 4) if fsdp else 0
    parts = {"weights": 4 * local, "gradients": 4 * local, "AdamW": 8 * local,
             "activations": act["blocks"], "loss": act["loss"], "gathered units": gathered}
    total, capacity = sum(parts.values()), cfg.plan_gpu_memory_gb * gib
    # checkpoints: a stop (mid-chunk) one under FSDP is each rank's shard of the float32 weights and
    # both AdamW moments; a chunk-end one adds the weights gathered into model.safetensors by rank 0
    stop_bytes, end_bytes = 12 * local, (4 * n + 8 * local if fsdp else 12 * n)
    write_s = lambda b: b / WRITE_BYTES_PER_S + b / HASH_BYTES_PER_S  # noqa: E731
    step_s = flops_per_step / (world * GPU_BF16_PEAK[cfg.plan_gpu] * 0.36)
    stop_s = step_s + write_s(stop_bytes)
    held = f"rank 0 of {world} under FSDP2: {local:,} elements" if fsdp else "replicated"
    kept = "all kept"
    if cfg.activation_checkpointing:
        kept = "checkpointed: each block keeps its input, one is recomputed"
    lines = [
        f"memory/rank      {total / gib:.1f} GiB of the {cfg.plan_gpu}'s "
        f"{cfg.plan_gpu_memory_gb:g} GiB ({100 * total / capacity:.0f}%): "
        + ", ".join(f"{k} {v / gib:.1f}" for k, v in parts.items()) + f" GiB ({held})",
        f"activations      {act['per_token_per_hidden']:.1f} bytes per token per hidden unit saved "
        f"by a block (measured here with saved-tensor hooks; {kept}); a GPU's fused RMSNorm saves "
        "less",
        f"checkpoint/rank  a stop {stop_bytes / 1e9:,.2f} GB "
        f"({'its own shard' if fsdp else 'all, from rank 0'}), {write_s(stop_bytes):,.1f} s; a "
        f"chunk end {end_bytes / 1e9:,.1f} GB from rank 0, {write_s(end_bytes):,.0f} s (at "
        f"{WRITE_BYTES_PER_S / 1e9:g} GB/s written and {HASH_BYTES_PER_S / 1e9:g} GB/s hashed, "
        "python bench.py ckpt)",
        f"stop             {stop_s:,.1f} s from a signal to exit (a step, {step_s:,.1f} s at 36% "
        f"MFU on the {cfg.plan_gpu}, and the stop checkpoint), against a grace of "
        f"{cfg.stop_grace_s:g} s (stop_grace_s)",
    ]
    if cfg.ckpt_interval:
        every = cfg.ckpt_interval * step_s
        lines.append(f"rolling ckpt     every {cfg.ckpt_interval} steps ({every / 60:,.1f} min): "
                     f"{100 * write_s(stop_bytes) / every:.2f}% of the time; a crash without "
                     "warning loses at most that")
    problems = []
    if total > 0.9 * capacity:
        problems.append(f"{total / gib:.1f} GiB per rank is more than 90% of the {cfg.plan_gpu}'s "
                        f"{cfg.plan_gpu_memory_gb:g} GiB (plan_gpu_memory_gb): set "
                        "activation_checkpointing=True, a smaller micro_batch_size, or "
                        "parallel='fsdp'")
    if stop_s > cfg.stop_grace_s:
        problems.append(f"a stop takes {stop_s:,.0f} s and the grace period is "
                        f"{cfg.stop_grace_s:g} s (stop_grace_s): ask the scheduler for an earlier "
                        "warning (SLURM: --signal=USR1@SECONDS) and set stop_grace_s, or use "
                        "parallel='fsdp' so that every rank writes its own shard")
    return lines, problems, {"memory_gib": {k: v / gib for k, v in parts.items()}, "stop_s": stop_s,
                             "step_s": step_s, "stop_ckpt_bytes_per_rank": stop_bytes}
