"""
How train.py builds the model and lays it onto its devices, from outside the model
(model.py knows nothing of this): built on the meta device and initialized where it
lives, FSDP2 sharding with its mixed-precision policy, fused.py's versions of two steps,
activation checkpointing, and torch.compile block by block. The dry run (memory.py),
the benchmarks and the GPU check (gpu_check.py) apply the same.
"""

from functools import partial

import torch
from torch.utils.checkpoint import checkpoint as activation_checkpoint

import fused
from model import Transformer


def build_model(cfg, device, dtype, fsdp, init=True):
    """The Transformer built on the meta device, sharded (FSDP2) before it is materialized,
    then initialized from the seed on the device: a 7B model never exists whole on one
    rank. init=False (a resume: the checkpoint overwrites every weight) draws nothing."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    if fsdp:
        shard(model, dtype)
    model.to_empty(device=device)
    if cfg.model.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight  # to_empty() unties shared parameters
    if init:
        model.init_weights(cfg.seed)
    return model


def shard(model, dtype):
    """FSDP2 on every block, then on the whole model; parameters in `dtype` for compute,
    gradients reduced in float32, master weights float32. A block's inputs are left as
    they come (cast_forward_inputs=False): the hidden states are already in `dtype`, and
    the rotary tables stay float32 (the paper's lesson; FSDP2 would cast them)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    for block in model.layers:
        fully_shard(block, mp_policy=MixedPrecisionPolicy(param_dtype=dtype,
                                                          reduce_dtype=torch.float32,
                                                          cast_forward_inputs=False))
    fully_shard(model, mp_policy=MixedPrecisionPolicy(param_dtype=dtype,
                                                      reduce_dtype=torch.float32))


def speed_up(raw_model, cfg, device):
    """What the step runs on, applied from outside the model: fused.py's versions (the
    SwiGLU on a CPU in eager mode only: it breaks a compiled graph), activation
    checkpointing from inside each block's forward (so that torch.compile traces the
    recomputation: a checkpoint wrapped around the compiled call compiles nothing), and
    torch.compile block by block (one compile serves every layer, ~10 s on a CPU)."""
    fused.apply(raw_model, device, swiglu=device.type == "cpu" and not cfg.compile)
    for block in raw_model.layers:
        if cfg.activation_checkpointing:  # parameter names stay as they are
            block.forward = partial(recompute, block.forward)
        if cfg.compile:
            block.compile()


def recompute(forward, *args):
    return activation_checkpoint(forward, *args, use_reentrant=False)
