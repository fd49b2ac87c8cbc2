"""
Fused versions of two steps of model.py, the same numbers by other means, swapped in
from outside (as FSDP and torch.compile are) where they are faster or hold less:

    swiglu        silu(gate) * up whose backward writes both halves of the gradient into
                  one tensor (autograd computes them apart, then concatenates: a copy per
                  layer). Eager only: its out= writes into views break a compiled graph,
                  and a compiled block fuses the plain ops anyway.
    chunked loss  the cross-entropy straight from the hidden states, a chunk of rows at a
                  time, with both gradients computed chunk by chunk in the forward pass:
                  the (B, T, V) logits and their gradient never exist whole (at 7B and a
                  micro-batch of 10: 2.6 GB of float32 logits, and as much again for their
                  gradient). Chunks of LOSS_CHUNK[device type] logits: small on a CPU
                  (the cache), large on a GPU (few, big matmuls).

tests/test_model.py checks both against model.py's plain versions, values and gradients.
What each costs or saves on the main job: `python bench.py fused`.
"""

from functools import partial

import torch
import torch.nn.functional as F

# logits per chunk: 8 MB on a CPU, 1 GiB on a GPU (float32)
LOSS_CHUNK = {"cpu": 2**21, "cuda": 2**28}


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up of h = [gate | up] (..., 2F) -> (..., F)."""

    @staticmethod
    def forward(ctx, h):
        gate, up = h.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(h, act)
        return act * up

    @staticmethod
    def backward(ctx, grad):
        h, act = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        dh = torch.empty_like(h)
        d_gate, d_up = dh.chunk(2, dim=-1)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=d_gate)
        torch.mul(grad, act, out=d_up)
        return dh


def mlp_forward(mlp, x):
    """model.MLP.forward with the fused SwiGLU."""
    return mlp.w_down(SwiGLU.apply(mlp.w_gate_up(x)))


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits = (x @ weight.T) * scale against targets (-1 never
    counts; the loss is 0 when nothing counts), in chunks of `rows` rows. x (N, C), weight
    (V, C), targets (N,). With want_grad, the forward pass also computes both gradients
    (d loss / d logits = softmax - onehot, over the counted targets); backward only scales
    them. Logits, softmax and loss are float32 even under bf16 autocast."""

    @staticmethod
    def forward(ctx, x, weight, targets, scale, rows, want_grad):
        n_counted = (targets != -1).sum().clamp(min=1)
        acc = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 inputs
        dx = torch.empty_like(x) if want_grad else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_grad else None
        total = torch.zeros((), dtype=acc, device=x.device)
        for s in range(0, x.shape[0], rows):
            xs, ts = x[s : s + rows], targets[s : s + rows]
            counted, safe = ts != -1, ts.clamp(min=0)[:, None]
            logits = (xs @ weight.t()).to(acc)  # (r, V); every step below is in place
            if scale != 1.0:
                logits.mul_(scale)
            target_logit = logits.gather(1, safe).squeeze(1)  # (r,)
            peak = logits.amax(dim=-1, keepdim=True)  # (r, 1)
            # logits now hold exp(l - peak)
            sumexp = logits.sub_(peak).exp_().sum(dim=-1, keepdim=True)
            lse = (peak + sumexp.log()).squeeze(1)  # log-sum-exp, (r,)
            total += ((lse - target_logit) * counted).sum()
            if want_grad:
                g = logits.div_(sumexp)  # softmax
                g.scatter_add_(1, safe, -torch.ones_like(safe, dtype=g.dtype))  # - onehot
                g.mul_(counted[:, None] * (scale / n_counted))
                g = g.to(x.dtype)  # the matmuls run in x's precision (or autocast's)
                dx[s : s + rows] = g @ weight
                dw += g.t() @ xs
        ctx.save_for_backward(dx, dw)
        ctx.weight_dtype = weight.dtype
        return total / n_counted

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw = ctx.saved_tensors
        return dx * grad_loss, (dw * grad_loss).to(ctx.weight_dtype), None, None, None, None


def chunked_loss(model, chunk, x, targets):
    """model.Transformer.loss, chunk by chunk. Gradients only when autograd will ask for
    them: validation and evaluation (no_grad) pay the forward pass alone."""
    weight = model.lm_head.weight
    want_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    rows = max(1, chunk // weight.shape[0])
    return LinearCrossEntropy.apply(x.flatten(0, 1), weight, targets.reshape(-1), model.logit_mult,
                                    rows, want_grad)


def apply(model, device, swiglu=True, loss=True):
    """Swap the fused versions into a model.Transformer: the SwiGLU into every MLP (leave
    it out under torch.compile), the chunked loss with the device's chunk."""
    if swiglu:
        for block in model.layers:
            block.mlp.forward = partial(mlp_forward, block.mlp)
    if loss:
        model.loss = partial(chunked_loss, model, LOSS_CHUNK.get(device.type, LOSS_CHUNK["cuda"]))
    return model
