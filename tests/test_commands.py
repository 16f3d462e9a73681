"""How commands resolve `auto`: training precision and inference precision, per device and CPU."""

import pytest
import torch
import yaml

from conftest import Recorder
from llmctl import loading, precision, quantize
from llmctl.errors import LlmctlError


def test_training_precision_auto_follows_the_cpu(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    assert precision.resolve_amp("auto", cpu) is torch.bfloat16
    assert precision.resolve_amp("float32", cpu) is None
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)  # emulated bf16 would be slower than float32
    assert precision.resolve_amp("auto", cpu) is None
    assert precision.resolve_amp("bfloat16", cpu) is torch.bfloat16  # asked for explicitly: honoured


def test_inference_precision_auto(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(quantize, "cpu_int8_available", lambda: True)
    assert precision.inference_precision("auto", "auto", cpu) == ("float32", "int8")
    assert precision.inference_precision("bfloat16", "auto", cpu) == ("bfloat16", "none")
    assert precision.inference_precision("auto", "none", cpu) == ("float32", "none")
    # a small model decodes faster in float32: its steps are overhead, not weight reads
    assert precision.inference_precision("auto", "auto", cpu, n_params=4_000_000) == ("float32", "none")
    assert precision.inference_precision("auto", "auto", cpu, n_params=124_000_000) == ("float32", "int8")
    monkeypatch.setattr(quantize, "cpu_int8_available", lambda: False)  # e.g. an ARM build of torch
    assert precision.inference_precision("auto", "auto", cpu) == ("float32", "none")


def test_auto_means_one_thing_wherever_it_is_written(monkeypatch):
    """--dtype/--quantize/--compile are shorthand for their generate.* keys (None: not given); `auto`, from the
    config or the flag, is the hardware's choice."""
    from llmctl.config import GenerateConfig

    cpu = torch.device("cpu")
    monkeypatch.setattr(quantize, "cpu_int8_available", lambda: True)
    choose = precision.inference_choices
    # int8 on a CPU: no compiled step, but "auto" (its one-row step traced)
    assert choose(GenerateConfig(), None, None, None, cpu) == ("float32", "int8", "auto")
    assert choose(GenerateConfig(), "auto", "auto", None, cpu) == ("float32", "int8", "auto")
    assert choose(GenerateConfig(), None, None, None, cpu, n_params=1000) == ("float32", "none", "auto")
    asked = GenerateConfig(dtype="bfloat16", quantize="none", compile=True)
    assert choose(asked, None, None, None, cpu) == ("bfloat16", "none", True)  # the config's keys
    assert choose(asked, "auto", "auto", False, cpu) == ("float32", "int8", False)  # the flags win; auto = hardware
    with pytest.raises(LlmctlError, match="--compile does not apply to int8 on a CPU"):
        choose(GenerateConfig(quantize="int8"), None, None, True, cpu)
    with pytest.raises(LlmctlError, match="--dtype must be auto, float32 or bfloat16"):
        choose(GenerateConfig(), "fp8", None, None, cpu)


def test_auto_compile_builds_only_for_a_job_long_enough_to_pay(tiny_run, monkeypatch):
    from llmctl.commands import inference

    class Store:  # records what the engine asks for instead of building (a real build is tested in test_generate)
        def __init__(self):
            self.asked = []

        def get(self, batch, length, build_missing):
            self.asked.append((batch, build_missing))
            return None

    def job(threshold: float) -> list:
        loaded = loading.for_inference(loading.load_model(tiny_run), compile="auto")
        loaded.engine.store = Store()
        monkeypatch.setattr(inference, "AUTO_BUILD_AFTER_S", threshold)
        rows = [{"prompt": "ab" * (i + 1), "max_new_tokens": 20, "temperature": 0} for i in range(5)]
        s = inference.sampling_settings(loaded)
        inference.complete_rows(loaded, rows, s, batch_size=2)
        return loaded.engine.store.asked

    # the job opens its 2 slots (cached steps for 2 and 1 slots would be used), decodes eagerly and times itself;
    # when what is left would take longer than the threshold it builds the step of all its slots, once
    assert job(0.0) == [(2, False), (1, False), (2, True)]
    assert job(1e9) == [(2, False), (1, False)]  # a short job never builds
    loaded = loading.for_inference(loading.load_model(tiny_run), compile=False)
    assert loaded.engine.store is None  # --no-compile: no cache lookups at all


def test_a_long_cpu_run_ends_by_compiling_its_decode_step(tiny_run, monkeypatch):
    from llmctl import aot
    from llmctl.commands.decode_step import COMPILE_AFTER_S, DecodeStep
    from llmctl.config import from_dict
    from llmctl.errors import LlmctlError
    from llmctl.recipe import FinishedRun

    asked = []

    def build(model, batch, length, path):  # a real build is tested in test_generate; here only who asks for one
        asked.append((batch, length))
        raise LlmctlError("no C++ compiler (stub)")

    monkeypatch.setattr(aot, "build", build)
    cfg = from_dict(yaml.safe_load((tiny_run / "config.yaml").read_text()))
    cpu, events = torch.device("cpu"), Recorder()

    def finished(task: str, seconds: float, device: torch.device = cpu) -> FinishedRun:
        return FinishedRun(tiny_run, cfg, task, device, seconds, "llmctl pretrain --resume", events)

    DecodeStep()(finished("lm", 5.0))  # a short run: not worth it
    assert asked == []
    DecodeStep()(finished("lm", COMPILE_AFTER_S))
    assert asked == [(1, 32)]  # batch 1, the whole 32-token context: the shape of `infer --prompt`
    assert "not compiled (no C++ compiler (stub))" in events.logs[-1]  # reported; the finished run stays finished
    DecodeStep()(finished("classification", 1e9))
    DecodeStep()(finished("lm", 1e9, torch.device("cuda")))  # a GPU run: `infer` compiles there when asked
    cfg.generate.compile = False
    DecodeStep()(finished("lm", 1e9))
    assert asked == [(1, 32)]
