"""What this machine can do: the CPU's name and flags, whether 16-bit matmuls run natively, and the device's
peak FLOP/s (a datasheet table for GPUs, a bounded measurement cached per CPU) with MFU against it.

One home for the facts that precision choice (`precision.resolve_amp`), the dry run (`estimate`), the training
summary and progress bar, and their warnings read.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from .config import default_cache_dir
from .fileio import write_atomic

# what oneDNN needs for native 16-bit matmuls: bf16 all of AVX-512's core (avx512_bf16 and AMX make it faster
# still); fp16 one of avx512_fp16 or AMX-FP16
BF16_NEEDS_ALL = ("avx512f", "avx512bw", "avx512vl", "avx512dq")
FP16_NEEDS_ONE = ("avx512_fp16", "amx_fp16")


@lru_cache(maxsize=1)
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def cpu_flags() -> Optional[frozenset]:
    """The CPU's feature flags from /proc/cpuinfo (Linux), or None where they cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN runs bfloat16 matmuls natively here (AVX-512 or AMX); on older CPUs it emulates them slowly."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_has_fast_fp16() -> bool:
    """Whether oneDNN runs float16 matmuls natively here (AVX512-FP16 or AMX-FP16)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_isa() -> str:
    """What decides this CPU's matmul speed: ATen's vector ISA and whether oneDNN has native bf16 / fp16."""
    return (f"{torch.backends.cpu.get_cpu_capability()}|bf16={'native' if cpu_has_fast_bf16() else 'emulated'}"
            f"|fp16={'native' if cpu_has_fast_fp16() else 'emulated'}")


def slow_precision_warning(dtype: Optional[torch.dtype], device: torch.device, setting: str) -> Optional[str]:
    """A warning when `dtype` (asked for through `setting`) is emulated on this CPU, naming what is missing."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return None
    if cpu_has_fast_bf16() if dtype == torch.bfloat16 else cpu_has_fast_fp16():
        return None
    name = "bfloat16" if dtype == torch.bfloat16 else "float16"
    flags = cpu_flags()
    if flags is not None and dtype == torch.bfloat16 and any(f not in flags for f in BF16_NEEDS_ALL):
        why = "it lacks AVX-512 (" + ", ".join(f for f in BF16_NEEDS_ALL if f not in flags) + ")"
    elif flags is not None and dtype == torch.float16 and not any(f in flags for f in FP16_NEEDS_ONE):
        why = "it lacks " + " and ".join(FP16_NEEDS_ONE)
    elif os.environ.get("ONEDNN_MAX_CPU_ISA"):
        why = f"ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']} keeps oneDNN from its {name} kernels"
    else:
        why = f"oneDNN has no native {name} kernels for it"
    return (f"{setting}={name} on this CPU ({cpu_name()}) is emulated, since {why}: matmuls run far slower than in "
            f"float32 (often 10-100x); use {setting}=float32 or auto")


# ------------------------------------------------------------------------------------------------------------------
# Peak FLOP/s of the device, for MFU

# Dense tensor-core peaks from the vendors' datasheets, TFLOP/s: (name pattern, bf16, fp16, fp32). First match wins.
GPU_PEAKS: list[tuple[str, Optional[float], Optional[float], Optional[float]]] = [
    (r"GH200|H200", 989.4, 989.4, 66.9),
    (r"H100.*PCIe", 756.5, 756.5, 51.2),
    (r"H100.*NVL", 835.5, 835.5, 60.0),
    (r"H100|H800", 989.4, 989.4, 66.9),
    (r"B200", 2250.0, 2250.0, None),
    (r"A100|A800", 312.0, 312.0, 19.5),
    (r"\bA10\b", 125.0, 125.0, 31.2),
    (r"\bA30\b", 165.0, 165.0, 10.3),
    (r"\bA40\b", 149.7, 149.7, 37.4),
    (r"L40S", 362.1, 362.1, 91.6),
    (r"\bL40\b", 181.0, 181.0, 90.5),
    (r"\bL4\b", 121.0, 121.0, 30.3),
    (r"RTX 4090", 165.2, 165.2, 82.6),
    (r"RTX 3090", 71.0, 71.0, 35.6),
    (r"V100", None, 125.0, 15.7),
    (r"\bT4\b", None, 65.0, 8.1),
    (r"MI300X", 1307.4, 1307.4, 163.4),
    (r"MI250X", 383.0, 383.0, 47.9),
]


def gpu_peak(name: str, amp: Optional[torch.dtype]) -> Optional[float]:
    """Peak FLOP/s of a GPU by its name for the precision in use, or None when it is not in the table."""
    column = {torch.bfloat16: 1, torch.float16: 2}.get(amp, 3)
    for row in GPU_PEAKS:
        if re.search(row[0], name):
            return row[column] * 1e12 if row[column] else None
    return None


def measure_matmul_flops(dtype: torch.dtype, budget: float = 0.3) -> float:
    """Best FLOP/s of square matmuls in `dtype` on this CPU, measured in about `budget` seconds.

    The size doubles from 128 to 2048 while the next one still fits the time left, so a CPU that emulates the
    dtype (bf16 without AVX-512: ~1 GFLOP/s, where one 2048 product takes a minute) is measured on small
    products in a fraction of a second instead of for minutes.
    """
    deadline = time.perf_counter() + budget
    n, best = 128, 0.0
    gen = torch.Generator().manual_seed(0)  # its own stream: measuring never shifts a run's random numbers
    while True:
        a, b = torch.randn(n, n, generator=gen).to(dtype), torch.randn(n, n, generator=gen).to(dtype)
        a @ b  # the first call creates the kernels
        k, t0 = 0, time.perf_counter()
        while True:
            a @ b
            k += 1
            dt = time.perf_counter() - t0
            if dt >= budget / 8 or time.perf_counter() >= deadline:
                break
        best = max(best, 2 * n**3 * k / dt)
        # the next size costs 8x per product, and at least two of them (kernel creation, one timed)
        if n >= 2048 or time.perf_counter() + 16 * dt / k + budget / 8 > deadline:
            return best
        n *= 2


def cpu_peak(amp: Optional[torch.dtype], cache_dir: Optional[str] = None, measurements: int = 3) -> float:
    """This CPU's matmul peak for the precision in use, cached in <cache>/peak_flops.json.

    Keyed by CPU model, vector ISA, thread count, torch version and dtype. The first `measurements` uses each
    measure again (a fraction of a second) and keep the best, so one measurement taken while other processes load
    the machine does not stay the peak for good; after that the cached value is used. Delete the file to start
    over. Under a 16-bit autocast the peak is at least float32's: where the CPU emulates bf16 / fp16 the model's
    matmuls still reach float32 speed in places (its float32 parts, oneDNN's own conversions), and MFU must stay
    a fraction of what the hardware can do.
    """
    dtype = amp or torch.float32
    peak = _cached_peak(dtype, cache_dir, measurements)
    return max(peak, _cached_peak(torch.float32, cache_dir, measurements)) if dtype != torch.float32 else peak


def _cached_peak(dtype: torch.dtype, cache_dir: Optional[str], measurements: int) -> float:
    key = (f"{cpu_name()}|{cpu_isa()}|threads={torch.get_num_threads()}|torch={torch.__version__}"
           f"|{str(dtype).replace('torch.', '')}")
    path = Path(cache_dir or default_cache_dir()).expanduser() / "peak_flops.json"
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    entry = table.get(key) if isinstance(table, dict) else None
    if not isinstance(table, dict):
        table = {}
    if not (isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float))
            and isinstance(entry.get("n"), int)):
        entry = {"flops": 0.0, "n": 0}
    if entry["n"] >= measurements:
        return float(entry["flops"])
    entry = {"flops": max(float(entry["flops"]), measure_matmul_flops(dtype)), "n": entry["n"] + 1}
    table[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(table, indent=2))
    except OSError:
        pass  # a read-only cache only costs a new measurement next time
    return entry["flops"]


def peak_flops(device: torch.device, amp: Optional[torch.dtype], cache_dir: Optional[str] = None) -> dict:
    """{"flops": peak FLOP/s or None, "source": where it came from}. LLMCTL_PEAK_TFLOPS overrides."""
    env = os.environ.get("LLMCTL_PEAK_TFLOPS")
    if env:
        try:
            return {"flops": float(env) * 1e12, "source": "LLMCTL_PEAK_TFLOPS"}
        except ValueError:
            pass
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        value = gpu_peak(name, amp)
        return {"flops": value,
                "source": f"datasheet ({name})" if value else f"unknown GPU {name}: set LLMCTL_PEAK_TFLOPS"}
    if device.type == "cpu":
        return {"flops": cpu_peak(amp, cache_dir),
                "source": f"{cpu_name()}, {torch.get_num_threads()} threads: best measured matmul"}
    return {"flops": None, "source": f"no peak known for {device.type}: set LLMCTL_PEAK_TFLOPS"}


def mfu(tokens_per_sec: Optional[float], flops_per_token: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOP utilisation: achieved training FLOP/s over the device's peak, at most 1.

    Above 1 the peak was under-measured (a loaded machine during the measurement): the run is at the peak as far
    as anyone can tell, and 100% says so without claiming more than the hardware can do."""
    if not tokens_per_sec or not peak or not flops_per_token:
        return None
    return min(1.0, tokens_per_sec * flops_per_token / peak)
