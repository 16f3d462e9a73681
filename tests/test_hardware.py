"""What the CPU can do: the warning for an emulated 16-bit precision, and a bf16 run on such a CPU starting promptly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import TINY, sets
from llmctl import hardware
from llmctl.commands import training as training_cmd

CPU = torch.device("cpu")
AVX2_ONLY = {"avx", "avx2", "fma", "f16c", "sse4_2"}  # an AMD EPYC of the Zen 2/3 kind


def test_emulated_bf16_warning_names_the_missing_flags(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(AVX2_ONLY))
    text = hardware.slow_precision_warning(torch.bfloat16, CPU, "train.dtype")
    assert "train.dtype=bfloat16" in text and "emulated" in text and "train.dtype=float32" in text
    assert "avx512f, avx512bw, avx512vl, avx512dq" in text
    monkeypatch.setattr(hardware, "cpu_has_fast_fp16", lambda: False)
    assert "avx512_fp16 and amx_fp16" in hardware.slow_precision_warning(torch.float16, CPU, "--dtype")


def test_no_warning_where_the_precision_is_native_or_not_16_bit(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)
    assert hardware.slow_precision_warning(torch.bfloat16, CPU, "train.dtype") is None
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    assert hardware.slow_precision_warning(None, CPU, "train.dtype") is None  # float32
    assert hardware.slow_precision_warning(torch.float32, CPU, "--dtype") is None
    assert hardware.slow_precision_warning(torch.bfloat16, torch.device("cuda"), "train.dtype") is None


def test_a_cap_on_onednn_is_named_when_the_flags_are_all_there(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({*AVX2_ONLY, *hardware.BF16_NEEDS_ALL}))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in hardware.slow_precision_warning(torch.bfloat16, CPU, "train.dtype")


@pytest.mark.slow
def test_bf16_on_a_cpu_that_emulates_it_warns_once_and_trains_promptly(tmp_path):
    # oneDNN and ATen capped at AVX2 behave as an AVX2-only CPU: bf16 matmuls at ~1-2 GFLOP/s
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
           "LLMCTL_CACHE_DIR": str(tmp_path / "cache")}  # a fresh cache: the peak is measured in this run
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "llmctl", "pretrain", *sets(*TINY, "train.dtype=bfloat16",
                        "train.max_steps=2", "train.log_interval=1"), "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, env=env, timeout=300)
    took = time.time() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if "warning:" in line and "bfloat16" in line]
    assert len(warnings) == 1 and "emulated" in warnings[0], r.stderr[-3000:]
    assert "MFU" in r.stderr and "pretrain step 1/2" in r.stderr
    assert took < 60, took  # start-up, data, the peak measurement and two steps; minutes before the bound


def test_measuring_the_peak_leaves_the_random_stream_alone():
    # it runs between seeding and the first step of a run: drawing from the global stream would change the run
    before = torch.get_rng_state()
    hardware.measure_matmul_flops(torch.float32, budget=0.05)
    assert torch.equal(before, torch.get_rng_state())


def test_a_run_draws_the_same_dropout_whether_the_caches_are_cold_or_warm(tmp_path, monkeypatch):
    # A cache's first runs measure the CPU's peak (for MFU) and tokenize the corpus. An earlier version drew the
    # measurement's matrices from torch's global generator, so a run's dropout masks depended on the cache's state
    # and the SST-2 recipe's figures moved with it.
    cache = tmp_path / "cache"
    monkeypatch.delenv("LLMCTL_PEAK_TFLOPS", raising=False)
    losses = []
    for name in ("cold", "warm"):
        if name == "warm":
            monkeypatch.setenv("LLMCTL_PEAK_TFLOPS", "1")  # no measurement at all
        out = tmp_path / name
        training_cmd.pretrain(None, [*TINY, "model.dropout=0.2", "train.max_steps=4", "train.log_interval=1",
                                 "train.eval_interval=0", f"data.cache_dir={cache}"], out)
        losses.append([r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                       if "loss" in r])
    assert (cache / "peak_flops.json").is_file()  # the cold run measured
    assert len(losses[0]) == 4 and losses[0] == losses[1]
