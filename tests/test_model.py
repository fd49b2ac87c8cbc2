"""model.py against the Hugging Face reference implementations, and its own invariants."""

import math
import os

import pytest
import torch

from hf_format import load_hf, save_hf
from model import Transformer
from model_config import PRESETS, ModelConfig

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=128, dim=64, n_layer=2, n_head=4, intermediate_size=96, max_seq_len=64)
# LayerNorm + biases + 25% partial rotary: CrystalCoder without muP, the StableLM layout
STABLELM = dict(SMALL, norm="layernorm", norm_eps=1e-5, norm_bias=True, qkv_bias=True, rotary_pct=0.25)
# CrystalCoder's full architecture at a tiny width: muP on, biases everywhere, tied
CRYSTAL = dict(STABLELM, proj_bias=True, tie_embeddings=True, init_std=0.073, mup=True,
               mup_width_scale=0.25, mup_embeddings_scale=14.6, mup_output_alpha=2.22)


def build(seed=0, **kw):
    model = Transformer(ModelConfig(**kw))
    model.init_weights(seed)
    return model.eval()


def perturb_(model, seed=0, std=0.05):
    """Random values in every parameter (biases and norms too), so every path is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def assert_close(a, b, tol=1e-5):
    diff = (a - b).abs()
    assert diff.max().item() <= tol, f"max abs diff {diff.max().item():.3g}, mean {diff.mean().item():.3g}"


def idx_batch(vocab, B=3, T=20, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def hf_logits(hf_model, idx):
    with torch.no_grad():
        return hf_model(input_ids=idx).logits


def load_reference(path, cls):
    return cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


# -----------------------------------------------------------------------------
# equality with Hugging Face, both directions of conversion


@pytest.mark.parametrize("n_kv_head,tie", [(None, False), (2, True)], ids=["mha-untied", "gqa-tied"])
def test_llama_equals_hf_both_directions(tmp_path, n_kv_head, tie):
    kw = dict(SMALL, n_kv_head=n_kv_head, tie_embeddings=tie)
    ours = perturb_(build(**kw))
    idx = idx_batch(kw["vocab_size"])

    # ours -> HF
    save_hf(ours, tmp_path / "out")
    ref = load_reference(tmp_path / "out", transformers.LlamaForCausalLM)
    assert type(ref).__name__ == "LlamaForCausalLM"
    assert_close(ours(idx)[0], hf_logits(ref, idx))

    # HF (its own random init) -> ours
    hf_cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=n_kv_head or 4,
                                      tie_word_embeddings=tie, rms_norm_eps=1e-6)
    torch.manual_seed(3)
    ref2 = transformers.LlamaForCausalLM(hf_cfg).eval()
    ref2.save_pretrained(tmp_path / "hf")
    back = load_hf(tmp_path / "hf").eval()
    assert back.config.kv_heads == (n_kv_head or 4) and back.config.tie_embeddings == tie
    assert_close(back(idx)[0], hf_logits(ref2, idx))


def test_amber_release_layout_loads_shard_by_shard(tmp_path, monkeypatch):
    import weakref

    import checkpoint
    from conftest import save_like_amber

    hf_cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=4, rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(4)
    ref = transformers.LlamaForCausalLM(hf_cfg).eval()
    n_shards = save_like_amber(ref.state_dict(), ref.config.to_dict(), tmp_path / "ckpt_000",
                               max_shard_bytes=40_000, dtype=torch.float16)  # float16, as released
    assert n_shards >= 4
    # the reference reads the same folder: our fixture is the format transformers knows
    theirs = load_reference(tmp_path / "ckpt_000", transformers.LlamaForCausalLM)
    loads, alive, real_load = [], [], torch.load

    def watched_load(path, *args, **kwargs):
        assert kwargs.get("weights_only") is True  # a pickle never runs code
        # shard by shard: every tensor of the previous shard is gone before the next is read
        assert not any(r() is not None for r in alive), f"{len(alive)} tensors of the last shard still held"
        sd = real_load(path, *args, **kwargs)
        alive[:] = [weakref.ref(t) for t in sd.values()]
        loads.append(os.path.basename(path))
        return sd

    monkeypatch.setattr(checkpoint.torch, "load", watched_load)
    ours = load_hf(tmp_path / "ckpt_000").eval()
    assert len(loads) == n_shards and all(p.dtype == torch.float32 for p in ours.parameters())
    idx = idx_batch(128)
    assert_close(ours(idx)[0], hf_logits(theirs, idx))
    # a shard that does not fit the config is named
    sd = real_load(tmp_path / "ckpt_000" / loads[0], weights_only=True)
    name = next(iter(sd))
    sd[name] = sd[name][:1]
    torch.save(sd, tmp_path / "ckpt_000" / loads[0])
    with pytest.raises(ValueError, match=f"{loads[0]}: tensor '{name}' has shape"):
        load_hf(tmp_path / "ckpt_000")


def test_stablelm_partial_rotary_equals_hf_both_directions(tmp_path):
    ours = perturb_(build(**STABLELM))
    assert ours.config.rot_dim == 4  # 25% of a 16-dim head
    idx = idx_batch(128)
    save_hf(ours, tmp_path / "out")
    ref = load_reference(tmp_path / "out", transformers.StableLmForCausalLM)
    assert_close(ours(idx)[0], hf_logits(ref, idx))

    hf_cfg = transformers.StableLmConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, use_qkv_bias=True,
                                         partial_rotary_factor=0.25, layer_norm_eps=1e-5)
    torch.manual_seed(4)
    ref2 = perturb_(transformers.StableLmForCausalLM(hf_cfg), seed=5).eval()  # nonzero biases and norms
    ref2.save_pretrained(tmp_path / "hf")
    back = load_hf(tmp_path / "hf").eval()
    assert back.config.rotary_pct == 0.25 and back.config.norm == "layernorm"
    assert_close(back(idx)[0], hf_logits(ref2, idx))


def test_mup_forward_equals_stablelm_with_folded_multipliers(tmp_path):
    """muP's three multipliers, folded into the weights of a plain model, give the same logits:
    embedding x 14.6, lm_head x (2.22 * width_scale), and q_proj / sqrt(d_head) turns
    1/sqrt(d) attention scaling into muP's 1/d."""
    mup = perturb_(build(**dict(CRYSTAL, proj_bias=False, tie_embeddings=False)))
    cfg = mup.config
    plain = Transformer(ModelConfig(**dict(STABLELM)))
    sd = {k: v.clone() for k, v in mup.state_dict().items()}
    sd["tok_emb.weight"] *= cfg.mup_embeddings_scale
    sd["lm_head.weight"] *= cfg.mup_output_alpha * cfg.mup_width_scale
    q_rows = cfg.n_head * cfg.head_dim  # wqkv holds q, then k, then v
    for k in sd:
        if ".attn.wqkv." in k:
            sd[k][:q_rows] /= math.sqrt(cfg.head_dim)
    plain.load_state_dict(sd)
    idx = idx_batch(128)
    assert_close(mup(idx)[0], plain.eval()(idx)[0], tol=1e-4)
    # and the multipliers matter: without them the logits differ
    plain.load_state_dict(mup.state_dict())
    assert (mup(idx)[0] - plain(idx)[0]).abs().max() > 1e-2


def test_crystalcoder_refuses_hf_export(tmp_path):
    model = build(**CRYSTAL)
    with pytest.raises(ValueError, match="muP"):
        save_hf(model, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")  # nothing written


# -----------------------------------------------------------------------------
# shapes and counts


def test_amber_7b_on_meta_has_exact_param_count_and_no_memory():
    with torch.device("meta"):
        model = Transformer(PRESETS["amber_7b"])
    assert model.num_params() == 6_738_415_616  # paper / LLaMA-7B
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_crystalcoder_param_count_by_hand():
    V, d, L, ff = 32032, 4096, 32, 10922
    attn = 4 * d * d + 4 * d  # q, k, v, o with biases
    mlp = 3 * d * ff + 2 * ff + d  # gate, up, down with biases
    norms = 2 * 2 * d  # two LayerNorms with gain and bias
    expected = V * d + L * (attn + mlp + norms) + 2 * d  # tied embedding, final LayerNorm
    with torch.device("meta"):
        model = Transformer(PRESETS["crystalcoder_7b"])
    assert model.num_params() == expected == 6_575_278_720


def test_an_mfu_over_one_is_unknown_not_data():
    import train

    assert train.mfu(3e11, 1.0, 1, 1e12) == pytest.approx(0.3)
    assert train.mfu(1.5e12, 1.0, 1, 1e12) is None  # a peak measured too low on a busy machine


def test_flops_give_the_papers_mfu():
    """AMBER: 582.4k tokens/s on 224 A100s (312 TFLOP/s bf16) is about 36% MFU (paper)."""
    with torch.device("meta"):
        model = Transformer(PRESETS["amber_7b"])
    mfu = 582.4e3 / 224 * model.flops_per_token(2048) / 312e12
    assert 0.35 < mfu < 0.37, mfu


def test_init_on_meta_equals_init_on_cpu_and_follows_the_std_table():
    cfg = ModelConfig(**dict(CRYSTAL, n_layer=4))
    a = Transformer(cfg)
    a.init_weights(seed=7)
    with torch.device("meta"):
        b = Transformer(cfg)
    b.to_empty(device="cpu")
    b.init_weights(seed=7)
    assert b.lm_head.weight is b.tok_emb.weight  # to_empty unties; init_weights ties again
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    c = Transformer(cfg)
    c.init_weights(seed=8)
    assert not torch.equal(a.tok_emb.weight, c.tok_emb.weight)
    # truncated normal at +-2 std has std 0.8796 of the untruncated one
    t = 0.8796
    hidden = cfg.init_std * math.sqrt(cfg.mup_width_scale)
    for w, std in [(a.tok_emb.weight, cfg.init_std), (a.layers[0].attn.wqkv.weight, hidden),
                   (a.layers[0].mlp.w_down.weight, hidden / math.sqrt(2 * cfg.n_layer))]:
        assert abs(w.std().item() / (std * t) - 1) < 0.1, (w.std().item(), std * t)
    assert a.layers[0].attn.wqkv.bias.abs().sum() == 0 and torch.all(a.layers[0].attn_norm.weight == 1)


def test_param_groups_mup_multipliers_and_no_decay():
    model = build(**CRYSTAL)
    groups = {g["name"]: g for g in model.param_groups(weight_decay=0.1)}
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    assert groups["hidden"]["lr_mult"] == 0.25 and groups["hidden"]["weight_decay"] == 0.1
    assert groups["embedding"]["lr_mult"] == 1.0 and groups["embedding"]["params"] == [model.tok_emb.weight]
    assert groups["no_decay"]["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("bias") or "norm" in names[id(p)] for p in groups["no_decay"]["params"])
    assert all(p.ndim == 2 for p in groups["hidden"]["params"])
    plain = build(**SMALL)
    assert all(g["lr_mult"] == 1.0 for g in plain.param_groups(0.1))


# -----------------------------------------------------------------------------
# forward invariants


@pytest.mark.parametrize("kw", [SMALL, CRYSTAL], ids=["amber", "crystalcoder"])
def test_causality(kw):
    model = perturb_(build(**kw))
    idx = idx_batch(128, B=2, T=16)
    t = 9
    changed = idx.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 1) % 128
    a, b = model(idx)[0], model(changed)[0]
    assert torch.equal(a[:, : t + 1], b[:, : t + 1])
    assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().max() > 1e-4  # the later positions do see it


@pytest.mark.parametrize("chunk", [2**21, 300], ids=["one-chunk", "uneven-chunks"])
def test_fused_steps_equal_the_plain_ones_in_values_and_gradients(chunk):
    """fused.py's SwiGLU and chunked loss give the loss and every gradient of model.py's plain
    F.silu(gate) * up and F.cross_entropy (muP logit multiplier and tied head included);
    -1 targets never count; nothing counted gives 0, not NaN."""
    import fused

    plain = perturb_(build(**CRYSTAL))
    fast = fused.apply(perturb_(build(**CRYSTAL)), torch.device("cpu"))
    if chunk != 2**21:
        fast.loss = lambda x, t: fused.chunked_loss(fast, chunk, x, t)  # 300 // 128 = 2 rows a chunk
    idx = idx_batch(128, B=2, T=11)
    targets = idx_batch(128, B=2, T=11, seed=2)
    targets[0, 3:] = -1
    losses = []
    for model in (plain, fast):
        _, loss = model(idx, targets)
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], atol=1e-6), [x.item() for x in losses]
    grads = dict(plain.named_parameters())
    for n, p in fast.named_parameters():
        assert_close(p.grad, grads[n].grad, tol=1e-6)
    targets[:] = -1
    assert fast(idx, targets)[1].item() == 0.0 and plain(idx, targets)[1].item() == 0.0


def test_the_chunked_loss_computes_no_gradients_without_autograd(monkeypatch):
    """Under no_grad (validation, evaluation) the chunked loss does the forward matmuls only:
    one matmul a chunk, where training does three."""
    import fused

    model = fused.apply(build(**SMALL), torch.device("cpu"))
    idx = idx_batch(128, B=2, T=11)
    calls = []
    real = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: calls.append(1) or real(a, b))
    with torch.no_grad():
        _, loss = model(idx, idx)
    assert len(calls) == 1
    calls.clear()
    model(idx, idx)[1].backward()
    assert len(calls) == 3


def test_linear_cross_entropy_gradcheck():
    from fused import LinearCrossEntropy

    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.tensor([1, -1, 3, 10, 0, -1, 4])
    assert torch.autograd.gradcheck(lambda x, w: LinearCrossEntropy.apply(x, w, t, 0.7, 3, True), (x, w))


@pytest.mark.parametrize("kw", [SMALL, CRYSTAL], ids=["amber", "crystalcoder"])
def test_bf16_autocast_stays_close_to_float32(kw):
    model = perturb_(build(**dict(kw, n_layer=1)))
    idx = idx_batch(128, B=2, T=12)
    with torch.no_grad():
        ref = model(idx)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(idx)[0]
            _, loss = model(idx, idx)
    assert low.dtype == torch.bfloat16 and loss.dtype == torch.float32
    rel = (low.float() - ref).abs().max() / ref.abs().max()
    assert rel < 0.03, f"bf16 relative error {rel:.3g}"


def test_rope_tables_and_rotation_stay_float32_under_autocast():
    """bf16 has 8 bits of mantissa: an angle of position 2000 stored in bf16 is off by up
    to 4 radians. The tables are float32 and the rotation runs in float32 even under
    autocast; only its result is rounded to the input's dtype."""
    from model import apply_rope, rope_tables

    cfg = ModelConfig(**SMALL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos, sin = rope_tables(cfg, torch.arange(1990, 2010))
        assert cos.dtype == sin.dtype == torch.float32
        q = torch.randn(2, 4, 20, cfg.head_dim).to(torch.bfloat16)
        out = apply_rope(q, cos, sin)
    exact = apply_rope(q.float(), cos, sin)
    assert out.dtype == torch.bfloat16 and torch.equal(out, exact.to(torch.bfloat16))
    # the rotation preserves each pair's norm: a check on the tables themselves
    assert_close(exact.norm(dim=-1), q.float().norm(dim=-1), tol=1e-4)


# -----------------------------------------------------------------------------
# generation


def sharpened(kw, seed=0):
    """Random init gives nearly tied logits, where argmax flips on 1e-7 noise; scale the
    head up so that greedy choices are well separated."""
    model = perturb_(build(seed=seed, **kw))
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model


def greedy_without_cache(model, idx, n):
    for _ in range(n):
        logits, _ = model(idx)
        idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx


@pytest.mark.parametrize("kw", [dict(SMALL, n_kv_head=2), CRYSTAL], ids=["amber-gqa", "crystalcoder"])
def test_cached_greedy_equals_uncached(kw):
    model = sharpened(kw)
    idx = idx_batch(128, B=4, T=7, seed=9)  # four different prompts
    out = model.generate(idx, 15)
    assert out.shape == (4, 22) and torch.equal(out[:, :7], idx)
    assert torch.equal(out, greedy_without_cache(model, idx, 15))
    assert torch.equal(model.generate(idx, 15, temperature=0.7, top_k=1), out)  # top-1 sampling is greedy
    assert len({tuple(r) for r in out[:, 7:].tolist()}) > 1  # the prompts do lead to different text


def test_cached_greedy_equals_hf_generate(tmp_path):
    kw = dict(SMALL, n_kv_head=2)
    model = sharpened(kw)
    save_hf(model, tmp_path / "m")
    ref = load_reference(tmp_path / "m", transformers.LlamaForCausalLM)
    idx = idx_batch(128, B=4, T=7, seed=9)
    ours = model.generate(idx, 15)
    with torch.no_grad():
        theirs = ref.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, max_new_tokens=15,
                              min_new_tokens=15, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_cache_chunked_prefill_matches_full_forward():
    """Feeding a prompt through the cache in two chunks (T > 1 after cached keys) gives the
    logits of one full forward: the explicit mask path."""
    from model import KVCache

    model = perturb_(build(**CRYSTAL))
    cfg = model.config
    idx = idx_batch(128, B=2, T=12)
    cache = KVCache(cfg, 2, 12)
    with torch.no_grad():
        first, _ = model(idx[:, :5], cache=cache, pos=0)
        second, _ = model(idx[:, 5:], cache=cache, pos=5)
        full, _ = model(idx)
    assert_close(torch.cat((first, second), 1), full, tol=1e-5)
