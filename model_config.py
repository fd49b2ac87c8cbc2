"""
The model's config: ModelConfig, the named shapes (PRESETS), and the Hugging Face
config.json of a shape, both ways. Apart from model.py (the network), so that what only
reads a config (config.py, data.py, prepare.py and its worker processes) never loads torch. It
imports nothing of the project.
"""

from dataclasses import dataclass


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

        need(self.dim % self.n_head == 0,
             f"dim={self.dim} is not divisible by n_head={self.n_head}")
        need(self.n_head % self.kv_heads == 0, f"n_head={self.n_head} is not a multiple of "
             f"n_kv_head={self.kv_heads}")
        need(self.norm in ("rmsnorm", "layernorm"), f"norm={self.norm!r} must be 'rmsnorm' or "
             "'layernorm'")
        need(not (self.norm_bias and self.norm == "rmsnorm"), "norm_bias=True needs "
             "norm='layernorm'")
        need(0.0 < self.rotary_pct <= 1.0, f"rotary_pct={self.rotary_pct} must be in (0, 1]")
        need(self.rot_dim > 0 and self.rot_dim % 2 == 0,
             f"rotary_pct={self.rotary_pct} of head_dim={self.head_dim} gives {self.rot_dim} "
             "rotary dims; it must be even and > 0")

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
    "tiny": ModelConfig(vocab_size=4096, dim=256, n_layer=4, n_head=8, intermediate_size=704,
                        max_seq_len=256),
    # CrystalCoder's architecture at the same size; width 256 is CrystalCoder's muP base width
    "tiny_crystalcoder": ModelConfig(
        vocab_size=4096, dim=256, n_layer=4, n_head=8, intermediate_size=704, max_seq_len=256,
        norm="layernorm", norm_eps=1e-5, norm_bias=True, qkv_bias=True, proj_bias=True,
        rotary_pct=0.25, tie_embeddings=True, init_std=0.073, mup=True, mup_width_scale=1.0,
        mup_embeddings_scale=14.6, mup_output_alpha=2.22,
    ),
}


# -----------------------------------------------------------------------------
# the Hugging Face config.json of a shape, both ways (the weights: model.to_hf_state_dict)


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
            problems.append("qkv_bias != proj_bias (Llama has one attention_bias for q, k, v and "
                            "o)")
    else:
        arch, model_type = "StableLmForCausalLM", "stablelm"
        if not cfg.norm_bias:
            problems.append("LayerNorm without bias")
        if cfg.proj_bias:
            problems.append("biases on the attention output and MLP (proj_bias=True)")
    if problems:
        raise ValueError(f"cannot export this model to the Hugging Face {arch} layout: it has "
                         + "; ".join(problems) + ". Save it with train.py's checkpoint format "
                         "instead.")
    out = {
        "architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads, "max_position_embeddings": cfg.max_seq_len,
        "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default",
                                                          "rope_theta": cfg.rope_theta},
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
        raise ValueError(f"model_type {kind!r} is not supported: load_hf reads 'llama' and "
                         "'stablelm' folders")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"rope scaling {rope!r} is not supported; only the default rotary "
                         "embedding is")
    n_head = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // n_head):
        raise ValueError(f"head_dim={hf['head_dim']} != hidden_size / num_attention_heads is not "
                         "supported")
    common = dict(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layer=hf["num_hidden_layers"],
        n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
        intermediate_size=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    if kind == "llama":
        if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
            raise ValueError("attention_bias != mlp_bias is not supported (our o_proj and MLP "
                             "share proj_bias)")
        return ModelConfig(**common, norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
                           qkv_bias=hf.get("attention_bias", False),
                           proj_bias=hf.get("mlp_bias", False))
    if hf.get("qk_layernorm") or hf.get("use_parallel_residual"):
        raise ValueError("StableLM with qk_layernorm or use_parallel_residual is not supported")
    pct = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.25))
    return ModelConfig(**common, norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-5),
                       norm_bias=True, qkv_bias=hf.get("use_qkv_bias", False), proj_bias=False,
                       rotary_pct=pct)
