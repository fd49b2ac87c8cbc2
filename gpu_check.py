"""
The GPU check: one command for the first session that is lent a GPU (planned to fit in 8
minutes on one H100), runnable end to end on a CPU first:

    python bench.py gpu [CONFIG] [--out=FILE]    default configs/one_gpu_1b.py, on cuda
    python bench.py gpu --device=cpu --smoke     the same steps at the tiny shape

Each figure is printed on a line, and all of them go to one JSON file (default
runs/gpu_check.json):
1. training-shaped attention (bf16, causal) runs under sdpa_kernel(FLASH_ATTENTION)
   alone, and the profiler names the flash kernel;
2. STEPS training steps on random tokens at the config's shape, set up as train.py sets
   it up (parallelize.speed_up: fused.py, activation checkpointing, compile; bf16 autocast, or
   FSDP2's bf16 policy on one rank; float32 AdamW): plain eager and compiled, each with
   and without activation checkpointing, and FSDP2 eager and compiled: tok/s, MFU
   against the bf16 peak, peak memory, and the dry run's memory for the same run;
3. the FSDP2 model and AdamW saved and loaded with torch.distributed.checkpoint, timed,
   and compared with what was saved;
4. memorization decoding, k = l = 32: sequences/s eager and compiled.
Each model is built on the meta device and initialized once, on the device.
"""

import dataclasses
import json
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist

from common import parse_options
from config import ConfigError, load_config
from machine import peak_flops, peak_memory_gb
from memory import per_rank
from model import Transformer
from parallelize import build_model, speed_up
from step import make_optimizer

VARIANTS = [(False, False, False), (False, True, False), (False, False, True), (False, True, True),
            (True, False, False), (True, True, False)]  # (FSDP2, compile, activation checkpointing)


def say(line):
    print(line, flush=True)


def flash_kernel(cfg, device):
    """The name of the flash kernel that training-shaped attention runs (an error without one)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    B, T = cfg.micro_batch_size, cfg.seq_len
    q = torch.randn(B, cfg.model.n_head, T, cfg.model.head_dim, device=device, dtype=torch.bfloat16)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), \
            profile(activities=[ProfilerActivity.CPU]) as prof:
        # raises without flash
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    kernels = sorted({e.key for e in prof.key_averages() if "flash" in e.key.lower()})
    assert kernels, "the flash kernel did not run"
    return kernels[0]


def train_variant(cfg, device, fsdp, x, y, peak, steps):
    """(figures, model, optimizer) of `steps` timed training steps after 2 warm-up steps."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(cfg, device, torch.bfloat16, fsdp)
    speed_up(model, cfg, device)
    opt = make_optimizer(model.param_groups(cfg.weight_decay), cfg, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=not fsdp)

    def step():
        with autocast:
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    step(), step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss = loss.item()
    dt = (time.perf_counter() - t0) / steps
    tok_s = x.numel() / dt
    with torch.device("meta"):
        meta_model = Transformer(cfg.model)
    planned = per_rank(dataclasses.replace(cfg, dtype="bfloat16"), meta_model, 1, False,
                       1.0)[2]["memory_gib"]
    row = {"fsdp": fsdp, "compile": cfg.compile,
           "activation_checkpointing": cfg.activation_checkpointing, "tok_s": tok_s,
           "mfu": tok_s * model.flops_per_token(x.shape[1]) / peak,
           "peak_memory_gib": peak_memory_gb(device), "planned_memory_gib": sum(planned.values()),
           "warm_up_s": warm, "loss": loss}
    return row, model, opt


def checkpoint_round_trip(model, opt, folder):
    """Save the FSDP2 model and its AdamW with torch.distributed.checkpoint, zero the
    weights, load them back: bytes, seconds each way, and whether the weights came back."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    before = {k: v.full_tensor().clone() for k, v in msd.items()}
    t0 = time.perf_counter()
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=folder)
    save_s = time.perf_counter() - t0
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    for p in model.parameters():
        p.detach().zero_()
    msd, osd = get_state_dict(model, opt)
    t0 = time.perf_counter()
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=folder)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    load_s = time.perf_counter() - t0
    same = all(torch.equal(before[k], v.full_tensor())
               for k, v in get_state_dict(model, opt)[0].items())
    return {"bytes": size, "save_s": save_s, "load_s": load_s, "weights_equal": same}


def decoding(cfg, device, batch, g):
    """Memorization decoding as memorize.py runs it (k = l = 32, bf16): eager and compiled."""
    model = build_model(cfg, device, torch.bfloat16, fsdp=False).eval()
    prompts = torch.randint(0, cfg.model.vocab_size, (batch, 32), generator=g).to(device)
    rows, outs = [], {}
    for compiled in (False, True):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            t0 = time.perf_counter()
            model.generate(prompts, 32, compile=compiled)  # warm-up (and the compile)
            warm = time.perf_counter() - t0
            t0 = time.perf_counter()
            outs[compiled] = model.generate(prompts, 32, compile=compiled)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        rows.append({"compile": compiled, "sequences_s": batch / dt, "warm_up_s": warm})
    return rows, (outs[False] == outs[True]).float().mean().item()


def init_one_rank(device):
    """A process group of one rank, for FSDP2 and distributed checkpoint."""
    if not dist.is_initialized():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def main(argv):
    smoke = "--smoke" in argv
    opts = parse_options([a for a in argv if a.startswith("--") and a != "--smoke"],
                         error=ConfigError)
    device = torch.device(opts.pop("device", "cuda"))
    out_path = opts.pop("out", "runs/gpu_check.json")
    args = [a for a in argv if not a.startswith("--")] or ["configs/tiny.py" if smoke
                                                           else "configs/one_gpu_1b.py"]
    cfg = load_config(args + [f"--{k}={v}" for k, v in opts.items()])
    if smoke:
        cfg = dataclasses.replace(cfg, seq_len=64, micro_batch_size=2)
    steps, decode_batch = (2, 8) if smoke else (8, 1024)
    B, T = cfg.micro_batch_size, cfg.seq_len
    t_start = time.perf_counter()
    name = (torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)" if smoke
            else "CPU")
    report = {"device": name, "torch": torch.__version__, "config": args[0], "micro_batch": B,
              "seq_len": T, "model": {"n_layer": cfg.model.n_layer, "dim": cfg.model.dim},
              "training": []}
    say(f"GPU check on {name}: model {cfg.model.n_layer}L x {cfg.model.dim}, micro-batch {B} x "
        f"{T}, bf16, torch {torch.__version__}")

    report["flash_kernel"] = flash_kernel(cfg, device)
    say(f"1. attention (bf16, causal) runs the flash kernel: {report['flash_kernel']}")

    init_one_rank(device)
    peak = peak_flops(cfg, device, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, cfg.model.vocab_size, (B, T + 1), generator=g).to(device)
    say(f"2. {steps} training steps each (after 2 warm-up steps), bf16 peak {peak / 1e12:.1f} "
        "TFLOP/s; 'planned' is the dry run's memory for the same run (python train.py CONFIG "
        "--dry_run=True)")
    kept = None
    for fsdp, compiled, checkpointing in VARIANTS:
        vcfg = dataclasses.replace(cfg, compile=compiled, activation_checkpointing=checkpointing)
        row, model, opt = train_variant(vcfg, device, fsdp, batch[:, :-1], batch[:, 1:], peak,
                                        steps)
        report["training"].append(row)
        say(f"   {'FSDP2, 1 rank' if fsdp else 'plain        '} compile "
            f"{'on ' if compiled else 'off'} AC {'on ' if checkpointing else 'off'}: "
            f"{row['tok_s']:10,.0f} tok/s  MFU {100 * row['mfu']:5.1f}%  peak memory "
            f"{row['peak_memory_gib']:6.2f} GiB (planned {row['planned_memory_gib']:6.2f})  "
            f"(warm-up {row['warm_up_s']:.1f} s, loss {row['loss']:.3f})")
        kept = (model, opt) if fsdp and not compiled else kept
        model = opt = None  # freed before the next variant

    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(out_path) or ".") as folder:
        report["dcp"] = d = checkpoint_round_trip(*kept, folder)
    say(f"3. distributed checkpoint of the FSDP2 model and AdamW: {d['bytes'] / 1e9:.2f} GB saved "
        f"in {d['save_s']:.1f} s ({d['bytes'] / d['save_s'] / 1e9:.2f} GB/s), loaded in "
        f"{d['load_s']:.1f} s; weights {'equal' if d['weights_equal'] else 'DIFFERENT'}")
    kept = None
    dist.destroy_process_group()

    say(f"4. memorization decoding, k = l = 32, batch {decode_batch}:")
    report["decoding"], report["decoding_agreement"] = decoding(cfg, device, decode_batch, g)
    for r in report["decoding"]:
        say(f"   compile {'on ' if r['compile'] else 'off'}: {r['sequences_s']:10,.1f} sequences/s "
            f"({r['sequences_s'] * 32:,.0f} new tok/s; warm-up {r['warm_up_s']:.1f} s)")
    say(f"   compiled and eager tokens agree on {100 * report['decoding_agreement']:.2f}% (bf16)")
    report["seconds"] = time.perf_counter() - t_start
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)
    say(f"GPU check done in {report['seconds']:.0f} s; every figure in {out_path}")
    return 0
