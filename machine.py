"""
What this machine is and can do, measured rather than assumed: the devices, the dtype
the run computes in (bf16 only where it is fast here), the FLOP/s that MFU counts
against, peak memory, and the versions a run records in run.json.
"""

import math
import os
import platform
import resource
import subprocess
import time

import numpy as np
import torch

from common import UserError, broadcast0


def determinism(cfg, device):
    """deterministic=True: the same arithmetic in every process. On a CPU, one thread: with
    two, runs of the same command differed from process to process in bf16 (2-3 distinct
    results in 4 runs of 16 steps on an AMX Xeon, whatever MKL_CBWR, MKL_DYNAMIC or
    torch.use_deterministic_algorithms said), and one thread cost 1.8x the time. On a GPU,
    PyTorch's documented switches: torch.use_deterministic_algorithms and cuBLAS's
    workspace setting (set here, before the first cuBLAS call). Returns what run.json records."""
    if cfg.deterministic:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
        else:
            torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
    return {"deterministic": cfg.deterministic, "threads": torch.get_num_threads(),
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}


def run_info(device, world_size):
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, cwd=here).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    import sentencepiece

    return {"git_commit": commit, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "sentencepiece": sentencepiece.__version__,
            "world_size": world_size, "device": torch.cuda.get_device_name(device)
            if device.type == "cuda" else platform.processor() or "cpu",
            "host": platform.node()}


# dense bf16 tensor-core FLOP/s by the name torch reports, the more specific names first
# ("NVIDIA H100 PCIe" is not an SXM H100; "NVIDIA L40S" is not an L4)
GPU_BF16_PEAK = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12,
                 "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12}


def peak_flops(cfg, device, dtype, measured=None):
    """FLOP/s of one device for MFU, in the dtype the run computes in: the config's, a known
    GPU's bf16 peak, or this machine's measured matmul rate in that dtype (CPU)."""
    if cfg.peak_flops:
        return cfg.peak_flops
    if device.type == "cuda" and dtype == torch.bfloat16:
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_BF16_PEAK.items():
            if key in name:
                return flops
    name = str(dtype).removeprefix("torch.")
    if measured and name in measured:
        return measured[name] * 1e9
    return matmul_rate(device, dtype)


def matmul_rate(device, dtype=torch.float32, n=1024, tries=3, min_s=0.05, budget_s=1.0):
    """FLOP/s of an n x n matmul in `dtype` on `device`: the best of `tries` timings of at
    least min_s each. The inputs come from a private generator (the run's RNG is never
    touched). A dtype this device emulates slowly (bf16 on a CPU without AVX512-BF16 or
    AMX: 5-300x slower) is timed once and given up on after budget_s."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device=device, dtype=dtype) for _ in range(2))

    def run(reps):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    one = run(1)  # warm-up, and the scale of the timing
    if one > budget_s:
        return 2 * n**3 / one
    reps = max(1, math.ceil(min_s / max(one, 1e-6)))
    return 2 * n**3 * reps / min(run(reps) for _ in range(tries))


# dtype="auto" takes bf16 on a CPU when its measured matmul rate is this much faster
BF16_CPU_MARGIN = 1.5


def choose_dtype(cfg, device, rank=0, world_size=1):
    """(dtype, {"reason", "matmul_gflops"}) of the run's matmuls. dtype="auto": bf16 on a
    GPU that has it; on a CPU, bf16 only where its matmul measures BF16_CPU_MARGIN times
    float32's (Intel AMX: 4-7x; elsewhere bf16 is emulated and 5-300x slower). Rank 0
    measures and broadcasts, so every rank decides alike. Weights, optimizer state and
    checkpoints stay float32 whatever this says."""
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype), {"reason": f"dtype={cfg.dtype!r} in the config",
                                           "matmul_gflops": {}}
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return (torch.bfloat16 if ok else torch.float32), {
            "reason": "a GPU with bf16" if ok else "a GPU without bf16", "matmul_gflops": {}}
    r = broadcast0({"float32": matmul_rate(device, torch.float32) / 1e9,
                    "bfloat16": matmul_rate(device, torch.bfloat16) / 1e9} if rank == 0 else None,
                   world_size)
    ratio = r["bfloat16"] / r["float32"]
    dtype = torch.bfloat16 if ratio >= BF16_CPU_MARGIN else torch.float32
    return dtype, {"reason": f"measured on this CPU: bf16 matmul {ratio:.2f}x float32 (bf16 from "
                             f"{BF16_CPU_MARGIN}x)",
                   "matmul_gflops": {k: round(v, 1) for k, v in r.items()}}


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux


def torch_device(name):
    """A --device option as a torch.device; a name torch does not know, or a device this
    machine lacks, is a one-line error."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"--device={name!r}: not a device (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"--device={name}: this machine has {torch.cuda.device_count()} CUDA "
                        "GPU(s); use --device=cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device={name}: this machine has no Apple GPU; use --device=cpu")
    return device
