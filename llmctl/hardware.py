"""What this CPU can do: its name, its instruction-set flags, and whether 16-bit matmuls run natively.

One home for the facts that precision choice (`precision.resolve_amp`), the peak FLOP/s measurement
(`estimate.cpu_peak`) and their warnings read.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from typing import Optional

import torch

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
