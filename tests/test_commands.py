"""How commands resolve `auto`: training precision and inference precision, per device and CPU."""

import torch

from llmctl import quantize
from llmctl.commands import common


def test_training_precision_auto_follows_the_cpu(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(common, "cpu_has_fast_bf16", lambda: True)
    assert common.resolve_amp("auto", cpu) is torch.bfloat16
    assert common.resolve_amp("float32", cpu) is None
    monkeypatch.setattr(common, "cpu_has_fast_bf16", lambda: False)  # emulated bf16 would be slower than float32
    assert common.resolve_amp("auto", cpu) is None
    assert common.resolve_amp("bfloat16", cpu) is torch.bfloat16  # asked for explicitly: honoured


def test_inference_precision_auto(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(quantize, "cpu_int8_available", lambda: True)
    assert common.inference_precision("auto", "auto", cpu) == ("float32", "int8")
    assert common.inference_precision("bfloat16", "auto", cpu) == ("bfloat16", "none")
    assert common.inference_precision("auto", "none", cpu) == ("float32", "none")
    # a small model decodes faster in float32: its steps are overhead, not weight reads
    assert common.inference_precision("auto", "auto", cpu, n_params=4_000_000) == ("float32", "none")
    assert common.inference_precision("auto", "auto", cpu, n_params=124_000_000) == ("float32", "int8")
    monkeypatch.setattr(quantize, "cpu_int8_available", lambda: False)  # e.g. an ARM build of torch
    assert common.inference_precision("auto", "auto", cpu) == ("float32", "none")
