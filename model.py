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
closest Hugging Face layout to CrystalCoder without muP).

    python model.py CONFIG [--key=value ...]    # summary of the config's model
"""

import json
import math
import os
import re
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Model config and named shapes


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 32000
    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None  # grouped-query attention; None means n_head (plain MHA)
    intermediate_size: int = 11008  # hidden width of the SwiGLU MLP
    max_seq_len: int = 2048  # longest context trained on (rotary itself has no limit)
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    norm_eps: float = 1e-6
    norm_bias: bool = False  # LayerNorm only: learn a bias beside the gain
    qkv_bias: bool = False  # bias on the query, key and value projections
    proj_bias: bool = False  # bias on the attention output and the three MLP projections
    rope_theta: float = 10000.0
    rotary_pct: float = 1.0  # share of each head's dims that rotary rotates (CrystalCoder: 0.25)
    tie_embeddings: bool = False  # output head shares the input embedding matrix
    init_std: float = 0.02  # base std of the init; see Transformer.init_weights
    # maximal update parametrization (muP), as CrystalCoder used it
    mup: bool = False
    mup_width_scale: float = 1.0  # d_base / d: hidden LR and init variance multiplier
    mup_embeddings_scale: float = 1.0  # multiplies the embedding output
    mup_output_alpha: float = 1.0  # logits are multiplied by output_alpha * width_scale

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise ValueError(f"model config: {msg}")

        need(self.dim % self.n_head == 0, f"dim={self.dim} is not divisible by n_head={self.n_head}")
        need(self.n_head % self.kv_heads == 0, f"n_head={self.n_head} is not a multiple of n_kv_head={self.kv_heads}")
        need(self.norm in ("rmsnorm", "layernorm"), f"norm={self.norm!r} must be 'rmsnorm' or 'layernorm'")
        need(not (self.norm_bias and self.norm == "rmsnorm"), "norm_bias=True needs norm='layernorm'")
        need(0.0 < self.rotary_pct <= 1.0, f"rotary_pct={self.rotary_pct} must be in (0, 1]")
        need(self.rot_dim > 0 and self.rot_dim % 2 == 0,
             f"rotary_pct={self.rotary_pct} of head_dim={self.head_dim} gives {self.rot_dim} rotary dims; it must be even and > 0")

    @property
    def head_dim(self):
        return self.dim // self.n_head

    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    @property
    def rot_dim(self):
        return int(self.head_dim * self.rotary_pct)


PRESETS = {
    # LLaMA-7B as trained by AMBER (paper Table 3); 6,738,415,616 parameters
    "amber_7b": ModelConfig(),
    # CrystalCoder (released config.json and modeling code of LLM360/CrystalCoder)
    "crystalcoder_7b": ModelConfig(
        vocab_size=32032, intermediate_size=10922, norm="layernorm", norm_eps=1e-5, norm_bias=True,
        qkv_bias=True, proj_bias=True, rotary_pct=0.25, tie_embeddings=True, init_std=0.073,
        mup=True, mup_width_scale=0.0625, mup_embeddings_scale=14.6, mup_output_alpha=2.22,
    ),
    # the laptop default: AMBER's architecture at 5.3M parameters, trains on a CPU in minutes
    "tiny": ModelConfig(vocab_size=4096, dim=256, n_layer=4, n_head=8, intermediate_size=704, max_seq_len=256),
    # CrystalCoder's architecture at the same size; width 256 is CrystalCoder's muP base width
    "tiny_crystalcoder": ModelConfig(
        vocab_size=4096, dim=256, n_layer=4, n_head=8, intermediate_size=704, max_seq_len=256,
        norm="layernorm", norm_eps=1e-5, norm_bias=True, qkv_bias=True, proj_bias=True, rotary_pct=0.25,
        tie_embeddings=True, init_std=0.073, mup=True, mup_width_scale=1.0, mup_embeddings_scale=14.6,
        mup_output_alpha=2.22,
    ),
}

# -----------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # statistics in float32 even under bf16 autocast, as LLaMA and Hugging Face do
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(cfg):
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.dim, cfg.norm_eps)
    return nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, bias=cfg.norm_bias)  # autocast runs it in float32


def rope_tables(cfg, positions):
    """cos and sin, (T, rot_dim), float32, for integer positions (T,).

    Computed on the fly and never stored as a buffer, so neither model.to(bfloat16)
    nor autocast can lower their precision (AMBER lesson: bf16 RoPE tables lose
    position accuracy). Same convention as Hugging Face Llama: frequencies for the
    first and second half of the rotated dims are the same (rotate_half layout).
    """
    d = cfg.rot_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device=positions.device, dtype=torch.int64).float() / d))
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, d)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """Rotate the first rot_dim dims of every head of x (B, nh, T, hs), in float32."""
    d = cos.shape[-1]
    xr, xpass = x[..., :d].float(), x[..., d:]
    x1, x2 = xr[..., : d // 2], xr[..., d // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    out = (xr * cos + rotated * sin).to(x.dtype)
    return out if xpass.shape[-1] == 0 else torch.cat((out, xpass), dim=-1)


class KVCache:
    """Keys and values of one layer for positions [0, max_len), filled as generation goes."""

    def __init__(self, batch, n_kv_head, max_len, head_dim):
        self.shape = (batch, n_kv_head, max_len, head_dim)
        self.k = self.v = None  # allocated on first use, in the dtype of the keys (bf16 under autocast)

    def update(self, k, v, pos):
        if self.k is None:
            self.k = torch.zeros(self.shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(self.shape, dtype=v.dtype, device=v.device)
        T = k.shape[2]
        self.k[:, :, pos : pos + T] = k
        self.v[:, :, pos : pos + T] = v
        return self.k[:, :, : pos + T], self.v[:, :, : pos + T]


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.dim, bias=cfg.proj_bias)
        # muP scales attention logits by 1/d_head instead of 1/sqrt(d_head) (Yang et al. 2022, §4)
        self.scale = 1.0 / cfg.head_dim if cfg.mup else 1.0 / math.sqrt(cfg.head_dim)

    def forward(self, x, cos, sin, cache=None, pos=0):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, pos)  # (B, nkv, pos + T, hs)
        # causal mask: the flag when queries and keys start together (flash attention on a GPU);
        # an explicit mask when a chunk of T > 1 queries follows cached keys
        mask, causal = None, T > 1
        if pos > 0 and T > 1:
            mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
                                           enable_gqa=self.n_kv_head != self.n_head)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.wo(y)


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): w_down(silu(w_gate x) * w_up x)."""

    def __init__(self, cfg):
        super().__init__()
        self.w_gate = nn.Linear(cfg.dim, cfg.intermediate_size, bias=cfg.proj_bias)
        self.w_up = nn.Linear(cfg.dim, cfg.intermediate_size, bias=cfg.proj_bias)
        self.w_down = nn.Linear(cfg.intermediate_size, cfg.dim, bias=cfg.proj_bias)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache=None, pos=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, pos)
        return x + self.mlp(self.mlp_norm(x))


# -----------------------------------------------------------------------------
# The Transformer


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # muP multipliers (CrystalCoder: 14.6 on the embeddings, 2.22 * 0.0625 on the logits)
        self.emb_mult = config.mup_embeddings_scale if config.mup else 1.0
        self.logit_mult = config.mup_output_alpha * config.mup_width_scale if config.mup else 1.0

    def forward(self, idx, targets=None, cache=None, pos=0, last_only=False):
        """idx (B, T) token ids -> (logits (B, T, V), loss or None).

        targets (B, T): the mean cross-entropy over positions whose target is not -1.
        cache: a list of KVCache, one per layer, holding positions [0, pos).
        last_only: compute the logits of the last position only (generation).
        """
        B, T = idx.shape
        positions = torch.arange(pos, pos + T, device=idx.device)
        cos, sin = rope_tables(self.config, positions)  # (T, rot_dim) float32
        x = self.tok_emb(idx)  # (B, T, C)
        if self.emb_mult != 1.0:
            x = x * self.emb_mult
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache[i] if cache is not None else None, pos)
        x = self.norm(x)
        if last_only:
            x = x[:, -1:, :]
        logits = self.lm_head(x)  # (B, T, V)
        if self.logit_mult != 1.0:
            logits = logits * self.logit_mult
        loss = None
        if targets is not None:
            # in float32 even under autocast; targets of -1 (padding, masked) never count
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0, top_k=None, generator=None):
        """Continue a batch of prompts idx (B, T) by exactly max_new_tokens tokens each.

        temperature 0 is greedy. No early stop at EOS: memorization scores compare
        continuations of an exact length. Returns (B, T + max_new_tokens).
        """
        B, T = idx.shape
        cfg = self.config
        cache = [KVCache(B, cfg.kv_heads, T + max_new_tokens, cfg.head_dim) for _ in self.layers]
        out = torch.empty(B, max_new_tokens, dtype=idx.dtype, device=idx.device)
        logits, _ = self(idx, cache=cache, pos=0, last_only=True)  # prefill the whole prompt at once
        for i in range(max_new_tokens):
            out[:, i] = next_token = sample(logits[:, -1, :], temperature, top_k, generator)
            if i + 1 < max_new_tokens:
                logits, _ = self(next_token[:, None], cache=cache, pos=T + i, last_only=True)
        return torch.cat((idx, out), dim=1)

    # -------------------------------------------------------------------------
    # init, parameter groups, counts

    @torch.no_grad()
    def init_weights(self, seed):
        """Initialise every parameter from `seed`; works after building on the meta device
        (call model.to_empty(device=...) first). Truncated normal at +-2 std, std by tensor:

            tensor                                   std
            tok_emb (and the tied head)              init_std
            lm_head, untied                          init_std
            wq, wk, wv, w_gate, w_up                 init_std * sqrt(mup_width_scale)   (muP; else init_std)
            wo, w_down (write into the residual)     the above / sqrt(2 * n_layer)
            biases                                   0
            norm gains / norm biases                 1 / 0

        CrystalCoder (init_std 0.073, width scale 0.0625, 32 layers) gives
        0.073, 0.01825 and 0.00228125, its released values.
        """
        cfg = self.config
        device = self.tok_emb.weight.device
        g = torch.Generator(device=device).manual_seed(seed)
        hidden_std = cfg.init_std * math.sqrt(cfg.mup_width_scale if cfg.mup else 1.0)
        out_std = hidden_std / math.sqrt(2 * cfg.n_layer)

        def normal(w, std):
            nn.init.trunc_normal_(w, mean=0.0, std=std, a=-2 * std, b=2 * std, generator=g)

        normal(self.tok_emb.weight, cfg.init_std)
        if not cfg.tie_embeddings:
            normal(self.lm_head.weight, cfg.init_std)
        for name, p in self.layers.named_parameters():
            if "norm" in name:
                nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            elif name.endswith(("wo.weight", "w_down.weight")):
                normal(p, out_std)
            else:
                normal(p, hidden_std)
        nn.init.ones_(self.norm.weight)
        if getattr(self.norm, "bias", None) is not None:
            nn.init.zeros_(self.norm.bias)

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

# our module names -> Hugging Face's, inside model.layers.{i}
_HF_LAYER = {
    "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
    "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj",
    "attn.wo": "self_attn.o_proj",
    "mlp.w_gate": "mlp.gate_proj", "mlp.w_up": "mlp.up_proj", "mlp.w_down": "mlp.down_proj",
}
_HF_TOP = {"tok_emb": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}


def to_hf_name(name):
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if m:
        return f"model.layers.{m[1]}.{_HF_LAYER[m[2]]}.{m[3]}"
    module, param = name.rsplit(".", 1)
    return f"{_HF_TOP[module]}.{param}"


def from_hf_name(name):
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if m:
        ours = {v: k for k, v in _HF_LAYER.items()}.get(m[2])
        return ours and f"layers.{m[1]}.{ours}.{m[3]}"
    module, param = name.rsplit(".", 1)
    ours = {v: k for k, v in _HF_TOP.items()}.get(module)
    return ours and f"{ours}.{param}"


def hf_config(cfg: ModelConfig, bos_token_id=None, eos_token_id=None):
    """The config.json of the Hugging Face layout that holds this shape exactly, or a
    ValueError naming what no Hugging Face layout we write can express."""
    problems = []
    if cfg.mup:
        problems.append("muP multipliers (embedding, logit and 1/d attention scaling)")
    if cfg.norm == "rmsnorm":
        arch, model_type = "LlamaForCausalLM", "llama"
        if cfg.rotary_pct != 1.0:
            problems.append(f"partial rotary (rotary_pct={cfg.rotary_pct}) with RMSNorm")
        if cfg.qkv_bias != cfg.proj_bias:
            problems.append("qkv_bias != proj_bias (Llama has one attention_bias for q, k, v and o)")
    else:
        arch, model_type = "StableLmForCausalLM", "stablelm"
        if not cfg.norm_bias:
            problems.append("LayerNorm without bias")
        if cfg.proj_bias:
            problems.append("biases on the attention output and MLP (proj_bias=True)")
    if problems:
        raise ValueError(f"cannot export this model to the Hugging Face {arch} layout: it has "
                         + "; ".join(problems) + ". Save it with train.py's checkpoint format instead.")
    out = {
        "architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads, "max_position_embeddings": cfg.max_seq_len,
        "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "torch_dtype": "float32",
    }
    if model_type == "llama":
        out.update(rms_norm_eps=cfg.norm_eps, attention_bias=cfg.qkv_bias, mlp_bias=cfg.proj_bias)
    else:
        out.update(layer_norm_eps=cfg.norm_eps, use_qkv_bias=cfg.qkv_bias, qk_layernorm=False,
                   use_parallel_residual=False, partial_rotary_factor=cfg.rotary_pct)
        out["rope_parameters"]["partial_rotary_factor"] = cfg.rotary_pct
    return out


def model_config_from_hf(hf):
    """Our ModelConfig from a Hugging Face config.json dict (llama or stablelm)."""
    kind = hf.get("model_type")
    if kind not in ("llama", "stablelm"):
        raise ValueError(f"model_type {kind!r} is not supported: load_hf reads 'llama' and 'stablelm' folders")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"rope scaling {rope!r} is not supported; only the default rotary embedding is")
    n_head = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // n_head):
        raise ValueError(f"head_dim={hf['head_dim']} != hidden_size / num_attention_heads is not supported")
    common = dict(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layer=hf["num_hidden_layers"], n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head, intermediate_size=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    if kind == "llama":
        if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
            raise ValueError("attention_bias != mlp_bias is not supported (our o_proj and MLP share proj_bias)")
        return ModelConfig(**common, norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
                           qkv_bias=hf.get("attention_bias", False), proj_bias=hf.get("mlp_bias", False))
    if hf.get("qk_layernorm") or hf.get("use_parallel_residual"):
        raise ValueError("StableLM with qk_layernorm or use_parallel_residual is not supported")
    pct = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.25))
    return ModelConfig(**common, norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-5), norm_bias=True,
                       qkv_bias=hf.get("use_qkv_bias", False), proj_bias=False, rotary_pct=pct)


def _atomic_write(path, write):
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def save_hf(model, out_dir, max_shard_bytes=5 * 2**30, bos_token_id=None, eos_token_id=None):
    """Write `model` as a Hugging Face folder (config.json + safetensors, float32) that
    LlamaForCausalLM / StableLmForCausalLM.from_pretrained(out_dir) loads.

    Each file is written atomically, config.json last, so an interrupted save never
    leaves a folder that loads. Shards above max_shard_bytes, with an index, as HF does.
    """
    from safetensors.torch import save_file

    config = hf_config(model.config, bos_token_id, eos_token_id)  # refuses before anything is written
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue  # HF re-ties it from embed_tokens
        tensors[to_hf_name(name)] = t.detach().to(torch.float32).contiguous().cpu()
    shards, size = [{}], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    os.makedirs(out_dir, exist_ok=True)
    if len(shards) == 1:
        _atomic_write(os.path.join(out_dir, "model.safetensors"),
                      lambda p: save_file(shards[0], p, metadata={"format": "pt"}))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _atomic_write(os.path.join(out_dir, fname), lambda p: save_file(shard, p, metadata={"format": "pt"}))
            weight_map.update(dict.fromkeys(shard, fname))
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": weight_map}
        _write_json(os.path.join(out_dir, "model.safetensors.index.json"), index)
    _write_json(os.path.join(out_dir, "config.json"), config)


def _write_json(path, obj):
    def write(p):
        with open(p, "w") as f:
            json.dump(obj, f, indent=2)

    _atomic_write(path, write)


def _read_hf_tensors(hf_dir):
    """Yield (name, tensor) from a HF folder: safetensors or .bin, single or sharded."""
    from safetensors.torch import load_file

    for index_name, loader in (("model.safetensors.index.json", load_file),
                               ("pytorch_model.bin.index.json", None)):
        index_path = os.path.join(hf_dir, index_name)
        single = os.path.join(hf_dir, index_name.replace(".index.json", ""))
        if os.path.exists(index_path):
            with open(index_path) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.exists(single):
            files = [os.path.basename(single)]
        else:
            continue
        for fname in files:
            path = os.path.join(hf_dir, fname)
            # a .bin checkpoint is a pickle: weights_only=True so loading never runs code
            sd = loader(path) if loader else torch.load(path, map_location="cpu", weights_only=True)
            yield from sd.items()
        return
    raise FileNotFoundError(f"{hf_dir}: no model.safetensors, pytorch_model.bin or their .index.json; "
                            "is this a Hugging Face model folder?")


def load_hf(hf_dir, dtype=torch.float32, device="cpu"):
    """Build our Transformer from a Hugging Face llama or stablelm folder (e.g. an AMBER checkpoint)."""
    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found; is {hf_dir} a Hugging Face model folder?")
    with open(config_path) as f:
        cfg = model_config_from_hf(json.load(f))
    with torch.device("meta"):
        model = Transformer(cfg)
    state = {}
    for name, t in _read_hf_tensors(hf_dir):
        ours = from_hf_name(name)
        if ours is None:
            if name.endswith("rotary_emb.inv_freq"):
                continue  # older HF checkpoints store the rotary table; we compute it
            raise ValueError(f"{hf_dir}: unexpected tensor {name!r} for a {cfg.norm} model")
        state[ours] = t.to(device=device, dtype=dtype)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
        state["lm_head.weight"] = state["tok_emb.weight"]
    expected = set(model.state_dict())
    missing, extra = expected - set(state), set(state) - expected
    if missing or extra:
        raise ValueError(f"{hf_dir}: tensors do not match the config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(extra)[:5]}")
    model.load_state_dict(state, assign=True, strict=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight  # assign=True replaced the shared Parameter
    return model


# -----------------------------------------------------------------------------
# python model.py CONFIG: what the config's model is, without allocating it


def summary(cfg: ModelConfig, seq_len):
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
    try:
        lines.append(f"{'hugging face layout':22s} {hf_config(cfg)['architectures'][0]}")
    except ValueError:
        lines.append(f"{'hugging face layout':22s} none (muP or biases that no HF layout holds)")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    from config import ConfigError, load_config

    try:
        cfg = load_config(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"error: {e}")
    print(summary(cfg.model, cfg.seq_len))
