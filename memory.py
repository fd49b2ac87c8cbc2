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

from model import Block, rope_tables


def rank0_shard_elements(model_cfg, world_size, shard, dtype=torch.bfloat16):
    """Elements of rank 0's shard of every parameter under FSDP2 at world_size (rank 0 has
    the most: FSDP2 gives each rank ceil(rows / world_size) rows). `shard` is train.shard."""
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
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a CPU's RMSNorm under autocast: "Cannot dispatch to fused implementation"
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
