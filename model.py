"""
The network: AMBER (the LLaMA-7B architecture) and CrystalCoder in one module.

Both families are one decoder-only Transformer; config fields, not subclasses,
pick the variant:

    AMBER          RMSNorm, no biases, rotary on the whole head, untied embeddings
    CrystalCoder   LayerNorm with biases, biases in every projection, rotary on the
                   first 25% of each head, tied embeddings, muP multipliers

The module knows nothing of DDP, FSDP or torch.compile: train.py applies them
from outside. Weights convert both ways to the Hugging Face LlamaForCausalLM
layout (the format of LLM360's AMBER release) and to StableLmForCausalLM (the
closest Hugging Face layout to CrystalCoder without muP); hf_format.py reads
and writes those folders. Its config (ModelConfig, the named shapes in PRESETS, and
the Hugging Face config.json both ways) is model_config.py's, which needs no torch.
It imports nothing of the project.
"""

import math
import re
from dataclasses import fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, distribute_tensor

# -----------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x / sqrt(mean(x^2) + eps) * weight; PyTorch's fused kernel keeps the statistics in
        # float32 for bf16 inputs, as LLaMA and Hugging Face do
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def make_norm(cfg):
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.dim, cfg.norm_eps)
    # autocast runs it in float32
    return nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, bias=cfg.norm_bias)


def rope_tables(cfg, positions):
    """Rotary tables (cos, sin), each (T, rot_dim) float32, for integer positions (T,).

    Hugging Face Llama's convention (rotate_half): dims i and i + rot_dim/2 form a
    pair rotated by angle position * theta^(-2i / rot_dim). The sign of the rotation
    is folded into sin: its first half is negated, so apply_rope needs no negation.
    Computed on the fly and never stored as a module buffer, so neither
    model.to(bfloat16) nor autocast lowers their precision (AMBER's lesson).
    """
    d = cfg.rot_dim
    exponents = torch.arange(0, d, 2, device=positions.device, dtype=torch.int64).float() / d
    inv_freq = 1.0 / (cfg.rope_theta ** exponents)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, d/2)
    return torch.cat((freqs, freqs), dim=-1).cos(), torch.cat((-freqs.sin(), freqs.sin()), dim=-1)


def apply_rope(x, cos, sin):
    """Rotate the first rot_dim dims of every head of x (B, nh, T, hs), in float32:
    x * cos + rotate_half(x) * sin, with rotate_half(x1, x2) = (-x2, x1)."""
    d = cos.shape[-1]
    xr = x[..., :d].float()
    out = torch.addcmul(xr * cos, xr.roll(d // 2, dims=-1), sin).to(x.dtype)  # roll: (x2, x1)
    return out if d == x.shape[-1] else torch.cat((out, x[..., d:]), dim=-1)


class KVCache:
    """Keys and values of every layer for positions [0, max_len), filled as generation
    goes, and the rotary tables of those positions, computed once."""

    def __init__(self, cfg, batch, max_len, device=None):
        self.shape = (batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.k, self.v = [None] * cfg.n_layer, [None] * cfg.n_layer  # allocated on first use
        self.cos, self.sin = rope_tables(cfg, torch.arange(max_len, device=device))

    def write(self, layer, k, v, pos):
        """Store k, v (B, nkv, 1, hs) at position pos (a 0-dim long tensor) and return the
        whole cache: shapes that never change, as torch.compile and CUDA graphs need."""
        self.k[layer].index_copy_(2, pos.view(1), k)
        self.v[layer].index_copy_(2, pos.view(1), v)
        return self.k[layer], self.v[layer]

    def update(self, layer, k, v, pos):
        """Store k, v (B, nkv, T, hs) at [pos, pos + T); return all keys and values up to
        pos + T."""
        if self.k[layer] is None:  # in the dtype of the keys: bf16 under autocast
            self.k[layer] = torch.zeros(self.shape, dtype=k.dtype, device=k.device)
            self.v[layer] = torch.zeros(self.shape, dtype=v.dtype, device=v.device)
        T = k.shape[2]
        self.k[layer][:, :, pos : pos + T] = k
        self.v[layer][:, :, pos : pos + T] = v
        return self.k[layer][:, :, : pos + T], self.v[layer][:, :, : pos + T]


class Attention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.layer = layer  # which slot of a KVCache is ours
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        # query, key and value projections fused in one matmul (rows: q, then k, then v)
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim,
                              bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.dim, bias=cfg.proj_bias)
        # muP scales attention logits by 1/d_head instead of 1/sqrt(d_head) (Yang et al. 2022, §4)
        self.scale = 1.0 / cfg.head_dim if cfg.mup else 1.0 / math.sqrt(cfg.head_dim)

    def forward(self, x, cos, sin, cache=None, pos=0, mask=None):
        B, T, _ = x.shape
        heads = self.n_head + 2 * self.n_kv_head
        qkv = self.wqkv(x).view(B, T, heads, self.head_dim).transpose(1, 2)
        # split: one cat in backward
        qk, v = qkv.split([self.n_head + self.n_kv_head, self.n_kv_head], dim=1)
        qk = apply_rope(qk, cos, sin)  # queries and keys in one go
        # (B, nh, T, hs), (B, nkv, T, hs); v (B, nkv, T, hs)
        q, k = qk.split([self.n_head, self.n_kv_head], dim=1)
        causal = T > 1
        # one decoding step (Transformer.decode): the whole cache, masked past pos
        if mask is not None:
            k, v = cache.write(self.layer, k, v, pos)  # (B, nkv, max_len, hs)
        elif cache is not None:
            k, v = cache.update(self.layer, k, v, pos)  # (B, nkv, pos + T, hs)
        # causal mask: the flag when queries and keys start together (flash attention on a GPU);
        # an explicit mask when a chunk of T > 1 queries follows cached keys
        if mask is None and pos > 0 and T > 1:
            mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
            causal = False
        gqa = self.n_kv_head != self.n_head
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           scale=self.scale, enable_gqa=gqa)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.wo(y)


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): w_down(silu(gate x) * up x), gate and up fused in one matmul."""

    def __init__(self, cfg):
        super().__init__()
        # rows: gate, then up
        self.w_gate_up = nn.Linear(cfg.dim, 2 * cfg.intermediate_size, bias=cfg.proj_bias)
        self.w_down = nn.Linear(cfg.intermediate_size, cfg.dim, bias=cfg.proj_bias)

    def forward(self, x):
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)  # (B, T, 2 ff) -> 2 x (B, T, ff)
        return self.w_down(F.silu(gate) * up)  # (B, T, C)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg, layer):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache=None, pos=0, mask=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, pos, mask)
        return x + self.mlp(self.mlp_norm(x))


# -----------------------------------------------------------------------------
# The Transformer


class Transformer(nn.Module):
    def __init__(self, config):  # a model_config.ModelConfig
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # muP multipliers (CrystalCoder: 14.6 on the embeddings, 2.22 * 0.0625 on the logits)
        self.emb_mult = config.mup_embeddings_scale if config.mup else 1.0
        self.logit_mult = config.mup_output_alpha * config.mup_width_scale if config.mup else 1.0

    def forward(self, idx, targets=None, cache=None, pos=0, last_only=False):
        """idx (B, T) token ids -> (logits (B, T, V), loss or None).

        targets (B, T): return (None, the mean cross-entropy over positions whose target
        is not -1) without materializing the logits; call without targets for logits.
        cache: a KVCache holding positions [0, pos); this call appends positions [pos, pos + T).
        last_only: compute the logits of the last position only (generation).
        """
        B, T = idx.shape
        if cache is not None:
            cos, sin = cache.cos[pos : pos + T], cache.sin[pos : pos + T]  # (T, rot_dim) float32
        else:
            cos, sin = rope_tables(self.config, torch.arange(T, device=idx.device))
        x = self.tok_emb(idx)  # (B, T, C)
        if self.emb_mult != 1.0:
            x = x * self.emb_mult
        for layer in self.layers:
            x = layer(x, cos, sin, cache, pos)
        x = self.norm(x)
        if last_only:
            x = x[:, -1:, :]
        if targets is not None:
            return None, self.loss(x, targets)
        logits = self.lm_head(x)  # (B, T, V)
        if self.logit_mult != 1.0:
            logits = logits * self.logit_mult
        return logits, None

    def loss(self, x, targets):
        """Mean cross-entropy of the logits of hidden states x (B, T, C) against targets
        (B, T), over the targets that are not -1 (0 when none counts), in float32.
        fused.py swaps in a chunked version that never holds the (B, T, V) logits whole."""
        logits = self.lm_head(x)
        if self.logit_mult != 1.0:
            logits = logits * self.logit_mult
        total = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1), ignore_index=-1,
                                reduction="sum")
        return total / (targets != -1).sum().clamp(min=1)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0, top_k=None, generator=None,
                 compile=False, cache_len=None):
        """Continue a batch of prompts idx (B, T) by exactly max_new_tokens tokens each.

        temperature 0 is greedy. No early stop at EOS: memorization scores compare
        continuations of an exact length. Returns (B, T + max_new_tokens).
        """
        out = list(self.stream(idx, max_new_tokens, temperature, top_k, generator, compile,
                               cache_len))
        return torch.cat([idx] + [t[:, None] for t in out], dim=1)

    @torch.no_grad()
    def stream(self, idx, max_new_tokens, temperature=0.0, top_k=None, generator=None,
               compile=False, cache_len=None):
        """Yield the next tokens (B,) of prompts idx (B, T) one step at a time: the prompt
        runs once into a preallocated KV cache, then each step is `decode`, whose shapes
        never change. compile=True runs that step through torch.compile (CUDA graphs on a
        GPU): worth its compile time (tens of seconds) over thousands of steps, and the
        cache length is then rounded up to a multiple of 64 so that other prompt lengths
        reuse the compiled step (cache_len fixes it: one shape for prompts of any length)."""
        B, T = idx.shape
        max_len = T + max_new_tokens
        if cache_len is not None:
            if cache_len < max_len:
                raise ValueError(f"cache_len={cache_len} < prompt {T} + max_new_tokens "
                                 f"{max_new_tokens}")
            max_len = cache_len
        elif compile:
            max_len = -(-max_len // 64) * 64
        cache = KVCache(self.config, B, max_len, idx.device)
        # prefill the whole prompt at once
        logits, _ = self(idx, cache=cache, pos=0, last_only=True)
        logits = logits[:, -1]
        step = self.compiled_decode() if compile else self.decode
        pos = torch.tensor(T, device=idx.device)
        for i in range(max_new_tokens):
            next_token = sample(logits, temperature, top_k, generator)
            yield next_token
            if i + 1 < max_new_tokens:
                # clone: CUDA graphs reuse their output
                logits = step(next_token, cache, pos).clone()
                pos += 1

    def decode(self, token, cache, pos):
        """Logits (B, V) of the position after `token` (B,), which sits at position pos (a
        0-dim long tensor) of a filled KV cache: the whole cache is attended, masked past
        pos, so no shape depends on pos."""
        cos, sin = cache.cos.index_select(0, pos.view(1)), cache.sin.index_select(0, pos.view(1))
        mask = (torch.arange(cache.shape[2], device=pos.device) <= pos).view(1, 1, 1, -1)
        x = self.tok_emb(token[:, None])
        if self.emb_mult != 1.0:
            x = x * self.emb_mult
        for layer in self.layers:
            x = layer(x, cos, sin, cache, pos, mask)
        logits = self.lm_head(self.norm(x)[:, -1])
        return logits * self.logit_mult if self.logit_mult != 1.0 else logits

    def compiled_decode(self):
        """`decode` through torch.compile, once per model (a new batch size or cache length
        compiles again): CUDA graphs on a GPU ("reduce-overhead"), fused kernels on a CPU."""
        if getattr(self, "_compiled_decode", None) is None:
            mode = "reduce-overhead" if self.tok_emb.weight.is_cuda else None
            self._compiled_decode = torch.compile(self.decode, mode=mode, fullgraph=True,
                                                  dynamic=False)
        return self._compiled_decode

    # -------------------------------------------------------------------------
    # init, parameter groups, counts

    @torch.no_grad()
    def init_weights(self, seed):
        """Initialise every parameter from `seed`; works after building on the meta device
        (call model.to_empty(device=...) first) and on parameters sharded by FSDP2. The
        values are drawn on the parameters' device, tensor by tensor, each rank keeping its
        shard: the same under any sharding and world size on one kind of device (a GPU's
        generator draws other numbers than a CPU's; a CPU draws a 7B model in minutes).
        Truncated normal at +-2 std, std by tensor:

            tensor                                   std
            tok_emb (and the tied head)              init_std
            lm_head, untied                          init_std
            wqkv, w_gate_up                          init_std * sqrt(mup_width_scale) (muP)
            wo, w_down (write into the residual)     the above / sqrt(2 * n_layer)
            biases                                   0
            norm gains / norm biases                 1 / 0

        CrystalCoder (init_std 0.073, width scale 0.0625, 32 layers) gives
        0.073, 0.01825 and 0.00228125, its released values.
        """
        if self.config.tie_embeddings and self.lm_head.weight is not self.tok_emb.weight:
            self.lm_head.weight = self.tok_emb.weight  # module.to_empty() unties shared parameters
        params = dict(self.named_parameters())
        for name, full in self.init_values(seed, self.tok_emb.weight.device):
            w = params[name]
            if isinstance(w, DTensor):  # sharded: each rank keeps its shard of the same full tensor
                full = distribute_tensor(full, w.device_mesh, w.placements, src_data_rank=None)
            w.copy_(full)

    def init_values(self, seed, device):
        """(name, full tensor) of every parameter as init_weights draws it, one at a time and
        in its order, on `device`: a model on the meta device gives a run's initialization
        tensor by tensor (dynamics.py), at most 0.5 GB at a time at 7B."""
        cfg = self.config
        g = torch.Generator(device=device).manual_seed(seed)
        hidden_std = cfg.init_std * math.sqrt(cfg.mup_width_scale if cfg.mup else 1.0)
        out_std = hidden_std / math.sqrt(2 * cfg.n_layer)

        def normal(shape, std):
            full = torch.empty(shape, device=device)
            return nn.init.trunc_normal_(full, mean=0.0, std=std, a=-2 * std, b=2 * std,
                                         generator=g)

        yield "tok_emb.weight", normal(self.tok_emb.weight.shape, cfg.init_std)
        if not cfg.tie_embeddings:
            yield "lm_head.weight", normal(self.lm_head.weight.shape, cfg.init_std)
        for name, p in self.layers.named_parameters():
            if "norm" in name:
                fill = torch.ones if name.endswith("weight") else torch.zeros
                value = fill(p.shape, device=device)
            elif name.endswith("bias"):
                value = torch.zeros(p.shape, device=device)
            elif name.endswith(("wo.weight", "w_down.weight")):
                value = normal(p.shape, out_std)
            else:
                value = normal(p.shape, hidden_std)
            yield f"layers.{name}", value
        yield "norm.weight", torch.ones(self.norm.weight.shape, device=device)
        if getattr(self.norm, "bias", None) is not None:
            yield "norm.bias", torch.zeros(self.norm.bias.shape, device=device)

    def param_groups(self, weight_decay):
        """AdamW parameter groups, each with an `lr_mult` that train.py applies to the LR.

        Embeddings (and the output head) train at the base LR with decay; the hidden
        weight matrices at base LR * mup_width_scale under muP (CrystalCoder: 0.0625)
        with decay; norm gains and all biases at the base LR without decay.
        """
        hidden_mult = self.config.mup_width_scale if self.config.mup else 1.0
        groups = {
            "embedding": dict(params=[], weight_decay=weight_decay, lr_mult=1.0),
            "hidden": dict(params=[], weight_decay=weight_decay, lr_mult=hidden_mult),
            "no_decay": dict(params=[], weight_decay=0.0, lr_mult=1.0),
        }
        for name, p in self.named_parameters():  # a tied weight is listed once
            if p.ndim < 2:
                groups["no_decay"]["params"].append(p)
            elif name.startswith("layers."):
                groups["hidden"]["params"].append(p)
            else:
                groups["embedding"]["params"].append(p)
        return [dict(name=k, **g) for k, g in groups.items() if g["params"]]

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # a tied weight counts once

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward), as used for MFU (PaLM, Appendix B):

        6 * N for the weight matmuls, where N leaves out the input embedding table (a
        lookup, not a matmul) unless the output head shares it, plus
        12 * n_layer * dim * seq_len for attention scores and values.
        """
        cfg = self.config
        n = self.num_params() - (0 if cfg.tie_embeddings else self.tok_emb.weight.numel())
        return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len


def sample(logits, temperature=0.0, top_k=None, generator=None):
    """Next token ids (B,) from logits (B, V): argmax at temperature 0, else softmax sampling."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


# -----------------------------------------------------------------------------
# Conversion to and from the Hugging Face layouts

# our module -> the Hugging Face modules it holds, inside model.layers.{i}; a fused
# matrix of ours is the row-wise concatenation of theirs, in this order
_HF_LAYER = {
    "attn_norm": ["input_layernorm"], "mlp_norm": ["post_attention_layernorm"],
    "attn.wqkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "attn.wo": ["self_attn.o_proj"], "mlp.w_gate_up": ["mlp.gate_proj", "mlp.up_proj"],
    "mlp.w_down": ["mlp.down_proj"],
}
_HF_TOP = {"tok_emb": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}


def hf_parts(cfg, name):
    """Our tensor name -> [(HF tensor name, rows)], the HF tensors it concatenates."""
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if not m:
        module, param = name.rsplit(".", 1)
        return [(f"{_HF_TOP[module]}.{param}", None)]
    layer, module, param = m.groups()
    rows = {"attn.wqkv": [cfg.n_head * cfg.head_dim] + [cfg.kv_heads * cfg.head_dim] * 2,
            "mlp.w_gate_up": [cfg.intermediate_size] * 2}.get(module, [None])
    return [(f"model.layers.{layer}.{hf}.{param}", r) for hf, r in zip(_HF_LAYER[module], rows)]


def to_hf_state_dict(model):
    """Our weights under Hugging Face names, fused matrices split, float32 on the CPU."""
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue  # HF re-ties it from embed_tokens
        parts = hf_parts(model.config, name)
        pieces = t.split([r for _, r in parts]) if len(parts) > 1 else [t]
        for (hf_name, _), piece in zip(parts, pieces):
            out[hf_name] = piece.detach().to(device="cpu", dtype=torch.float32).contiguous()
    return out


# -----------------------------------------------------------------------------
# what a config's model is, without allocating it (train.py --dry_run prints it)


def summary(cfg, seq_len):
    with torch.device("meta"):  # 7B builds in milliseconds and allocates nothing
        model = Transformer(cfg)
    n = model.num_params()
    emb = model.tok_emb.weight.numel()
    lines = [f"{f.name:22s} {getattr(cfg, f.name)}" for f in fields(cfg)]
    lines += [
        f"{'parameters':22s} {n:,} ({n - emb:,} without the input embedding)",
        f"{'flops per token':22s} {model.flops_per_token(seq_len):,} (training, seq_len {seq_len})",
        f"{'fp32 weights + AdamW':22s} {16 * n / 2**30:.1f} GiB (weights, grads, two moments)",
    ]
    return "\n".join(lines)
