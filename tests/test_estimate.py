"""The dry-run report and the estimator behind it (no timing assertions: timings on a shared CPU are noise)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, invoke, sets
from llmctl import estimate, hardware
from llmctl.commands import training as training_cmd
from llmctl.config import Config, ModelConfig
from llmctl.lora import apply_lora
from llmctl.model import Transformer
from llmctl.qlora import is_nf4, quantize_base


def test_dry_run_report_fields(tmp_path):
    out = tmp_path / "never"
    r = training_cmd.pretrain(None, TINY, out, dry_run=True)
    assert not out.exists() and r["out_exists"] is False  # nothing written
    assert r["kind"] == "pretrain" and r["config"]["model"]["n_layer"] == 2 and r["config"]["train"]["max_steps"] == 30
    p = r["parameters"]
    assert p["head_tied"] and p["head"] == 0
    assert sum(p[k] for k in estimate.PARTS) == p["total"] == p["trainable"]
    assert p["attention"] == 2 * (32 * 96 + 96 + 32 * 32 + 32)  # gpt2: fused qkv and proj, with biases
    assert p["embeddings"] == r["config"]["model"]["vocab_size"] * 32 + 32 * 32
    assert r["flops_per_token"] == 3 * r["flops_per_token_forward"] > 0
    assert r["tokens_per_step"] == 4 * 32
    m = r["memory"]
    assert m["weights"] == 4 * p["total"] and m["gradients"] == m["weights"] and m["optimizer"] == 2 * m["weights"]
    assert m["autocast_copies"] == 0  # TINY trains in float32
    assert m["total"] == m["weights"] + m["gradients"] + m["optimizer"] + m["activations"]
    assert 0 < m["activations_checkpointed"] < m["activations"]
    t = r["time"]
    assert {"step_seconds", "tokens_per_sec", "mfu", "train_seconds", "eval_seconds", "run_seconds"} <= set(t)
    assert t["steps"] == 30 and t["steps_timed"] == 5 and t["evals"] == 2 and t["eval_batches"] == 4
    assert t["run_seconds"] == pytest.approx(t["train_seconds"] + t["eval_seconds"])
    assert isinstance(t["measured_peak_memory"], int) and t["measured_peak_memory"] > 0  # resident growth (Linux)
    s = r["sample"]
    assert s["tokens"] == 32 and s["trained_tokens"] == 32
    assert [sp["trained"] for sp in s["spans"]] == [False, True]  # the first token is context only
    assert sum(sp["tokens"] for sp in s["spans"]) == 32 and all(sp["text"] for sp in s["spans"])
    json.dumps(r)  # JSON-ready


def test_dry_run_cli_json_and_touches_no_existing_run(runner, tiny_run):
    before = sorted(p.name for p in tiny_run.iterdir())
    r = invoke(runner, "pretrain", *sets(*TINY, "train.dtype=bfloat16"), "--out", tiny_run, "--overwrite", "--dry-run",
               "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["precision"] == "bfloat16 autocast" and report["memory"]["autocast_copies"] > 0
    assert report["out_exists"] is True
    assert sorted(p.name for p in tiny_run.iterdir()) == before  # --overwrite did not delete anything
    r = invoke(runner, "finetune", "--from", tiny_run, *sets(*TINY[-1:], "train.max_steps=3"), "--out", tiny_run / "ft",
               "--dry-run")
    assert r.exit_code == 0, r.output
    for words in ("parameters", "memory per device", "activations", "whole run", "sample batch", "resolved config"):
        assert words in r.stdout
    assert not (tiny_run / "ft").exists()


def test_timed_steps_leave_weights_and_rng_untouched():
    cfg = Config()
    cfg.model = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=40, dropout=0.1)
    cfg.train.batch_size = 2
    model = Transformer(cfg.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    tokens = torch.randint(0, 40, (500,)).numpy().astype("uint16")
    torch.manual_seed(7)
    from llmctl.data import TokenData
    from llmctl.tasks import lm_task

    task = lm_task(cfg, TokenData(None, tokens, tokens[:100], None, {}), model, torch.device("cpu"), None)
    r = estimate.time_steps(model, cfg, task, torch.device("cpu"), None, steps=2, warmup=1)
    assert r["steps_timed"] == 2 and r["step_seconds"] > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.rand(3), expected)  # the RNG is where it was


def _saved_bytes(cfg: ModelConfig, batch: int, amp, model=None) -> int:
    """Bytes of every tensor autograd saves for backward, excluding the parameters themselves (an NF4 weight is one)."""
    model = model or Transformer(cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters() if not is_nf4(p)}
    seen: dict[int, int] = {}

    def pack(t):
        if is_nf4(t):
            return t
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            F.cross_entropy(model(x).float().flatten(0, 1), x.flatten())
    return sum(seen.values())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_activation_model_matches_what_autograd_saves(arch, amp):
    cfg = ModelConfig(arch=arch, n_layer=2, n_head=4, n_kv_head=2 if arch == "llama" else None, n_embd=64,
                      block_size=48, vocab_size=70)
    full = Config(model=cfg)
    full.train.batch_size = 3
    mem = estimate.memory_estimate(Transformer(cfg), full, torch.device("cpu"), amp)
    measured = _saved_bytes(cfg, 3, amp)  # under autocast this includes the bf16 weight copies
    assert mem["activations"] + mem["autocast_copies"] == pytest.approx(measured, rel=0.03)


def test_activation_model_of_masked_language_modelling_counts_the_masked_positions_head():
    """MLM runs the head on the masked positions alone (forward(only=)): its logits are kept for mask_rate of them."""
    cfg = ModelConfig(arch="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=48, vocab_size=700)
    full = Config(model=cfg)
    full.train.batch_size, full.train.objective = 3, "mlm"
    torch.manual_seed(0)
    model = Transformer(cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randint(0, cfg.vocab_size, (3, 48))
    keep = torch.zeros(3 * 48, dtype=torch.bool)
    keep[torch.randperm(3 * 48)[: round(0.15 * 3 * 48)]] = True
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(x, only=keep.view(3, 48)).float(), x.flatten()[keep])
    mlm = estimate.memory_estimate(model, full, torch.device("cpu"), None)["activations"]
    full.train.objective = "clm"
    clm = estimate.memory_estimate(model, full, torch.device("cpu"), None)["activations"]
    assert mlm == pytest.approx(sum(seen.values()), rel=0.03) and mlm < 0.9 * clm


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_activation_model_matches_what_autograd_saves_under_lora(method):
    """Frozen gains, head and embedding keep less; adapters keep their rank-r intermediates; an NF4 weight keeps
    no autocast copy (torchao dequantizes it again in the backward pass)."""
    if method == "qlora":
        pytest.importorskip("torchao")
    cfg = ModelConfig(arch="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=128, mlp_hidden=256, block_size=48,
                      vocab_size=70)
    full = Config(model=cfg)
    full.train.batch_size = 3
    torch.manual_seed(0)
    model = Transformer(cfg).requires_grad_(False)
    apply_lora(model, ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"], rank=4, alpha=8, dropout=0.0)
    if method == "qlora":
        quantize_base(model)
    mem = estimate.memory_estimate(model, full, torch.device("cpu"), torch.bfloat16)
    # 2 layers x float32 x rank 4 x (in + out) of qkv, proj, fc (gate and up) and mlp.proj
    assert mem["adapters"] == mem["gradients"] == 2 * 4 * 4 * ((128 + 256) + (128 + 128) + (128 + 512) + (256 + 128))
    assert mem["weights_trainable"] == 0 and mem["optimizer"] == 2 * mem["adapters"]
    if method == "qlora":  # 4-bit codes and int8 block scalers: about 0.52 bytes a value where NF4 took the weight
        quantized = 2 * (256 * 128 + 128 * 128 + 512 * 128 + 128 * 256)
        rest = 4 * (2 * 70 * 128 + 5 * 128) + sum(b.numel() * 4 for b in model.buffers())  # wte, head, norms, RoPE
        assert 0.5 * quantized < mem["weights_frozen"] - rest < 0.53 * quantized
        # torchao dequantizes one weight at a time: int64 codes and 3 float32 copies a value of the largest (fc)
        assert mem["nf4_dequant"] == 512 * 128 * (8 + 3 * 4)
    else:
        assert mem["nf4_dequant"] == 0
    measured = _saved_bytes(cfg, 3, torch.bfloat16, model)
    assert mem["activations"] + mem["autocast_copies"] == pytest.approx(measured, rel=0.03)


def test_memory_per_device_follows_the_layout():
    from llmctl.distributed import DistContext

    cfg = ModelConfig(arch="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=32, vocab_size=70)
    model = Transformer(cfg)
    full = Config(model=cfg)
    one = estimate.memory_estimate(model, full, torch.device("cpu"), None)
    split = sum(p.numel() * 4 for n, p in model.named_parameters() if n.split(".", 2)[-1].rsplit(".", 1)[0] in
                ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"))
    layouts = {"tp": DistContext(world_size=2, parallel="tp", tp_size=2),
               "fsdp": DistContext(world_size=2, parallel="fsdp"),
               "fsdp_tp": DistContext(world_size=4, parallel="fsdp_tp", tp_size=2)}
    tp, fsdp, both = (estimate.memory_estimate(model, full, torch.device("cpu"), None, layouts[k]) for k in layouts)
    assert tp["weights"] == one["weights"] - split // 2  # the block matrices are halved, the rest stays whole
    assert fsdp["gradients"] == one["gradients"] // 2 and fsdp["optimizer"] == one["optimizer"] // 2
    assert both["gradients"] == (one["gradients"] - split // 2) // 2
    assert tp["activations"] < one["activations"] and fsdp["activations"] == one["activations"]


def test_flops_per_token_counts_matmuls_and_attention():
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50)
    model = Transformer(cfg)
    per_layer = 32 * 96 + 32 * 32 + 32 * 128 * 2
    f = estimate.flops_per_token(model, cfg)
    assert f["forward"] == 2 * (2 * per_layer + 50 * 32) + 4 * 2 * 16 * 32
    assert f["train"] == 3 * f["forward"]


def test_gpu_peak_table():
    assert hardware.gpu_peak("NVIDIA H100 PCIe", torch.bfloat16) == 756.5e12
    assert hardware.gpu_peak("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.4e12
    assert hardware.gpu_peak("NVIDIA A100-SXM4-80GB", torch.float16) == 312e12
    assert (hardware.gpu_peak("Tesla T4", torch.bfloat16) is None
            and hardware.gpu_peak("Tesla T4", torch.float16) == 65e12)
    assert hardware.gpu_peak("NVIDIA A10G", torch.bfloat16) is None  # not an A10: unknown rather than wrong
    assert hardware.gpu_peak("NVIDIA L40S", torch.bfloat16) == 362.1e12


def test_cpu_peak_is_measured_a_few_times_then_cached(tmp_path, monkeypatch):
    values = {torch.bfloat16: iter([100e9, 300e9, 200e9]), torch.float32: iter([50e9, 80e9, 60e9, 999e9])}
    calls = []
    monkeypatch.setattr(hardware, "measure_matmul_flops", lambda dtype: calls.append(dtype) or next(values[dtype]))
    seen = [hardware.cpu_peak(torch.bfloat16, str(tmp_path)) for _ in range(5)]
    assert seen == [100e9, 300e9, 300e9, 300e9, 300e9]  # the best of three measurements, then cached
    assert calls == [torch.bfloat16, torch.float32] * 3  # float32's own peak is measured beside it
    table = json.loads((tmp_path / "peak_flops.json").read_text())
    assert sorted(e["flops"] for e in table.values()) == [80e9, 300e9] and all(e["n"] == 3 for e in table.values())
    assert hardware.cpu_peak(None, str(tmp_path)) == 80e9 and len(calls) == 6  # float32 has its own, cached key
    assert hardware.mfu(1000.0, 1e6, 1e10) == pytest.approx(0.1)


def test_cpu_peak_under_emulated_bf16_is_float32s_and_mfu_stays_a_fraction(tmp_path, monkeypatch):
    # an AVX2-only CPU: bf16 matmuls emulated at ~1 GFLOP/s, float32 at 200
    monkeypatch.setattr(hardware, "measure_matmul_flops", lambda dtype: 1e9 if dtype == torch.bfloat16 else 200e9)
    peak = hardware.cpu_peak(torch.bfloat16, str(tmp_path))
    assert peak == 200e9
    assert hardware.mfu(30_000, 6e6, 1e9) == 1.0  # an under-measured peak never shows more than 100%
    assert hardware.mfu(30_000, 6e6, peak) == pytest.approx(0.9)
    assert hardware.mfu(None, 6e6, peak) is None and hardware.mfu(1.0, 6e6, None) is None


@pytest.mark.slow
def test_peak_measurement_is_bounded_where_bf16_is_emulated():
    # oneDNN capped at AVX2 emulates bf16 as an AVX2-only CPU does (a 2048 product then takes about a minute): the
    # measurement must stop at small products, whatever the load (the sizes it tried are recorded, not its time)
    code = ("import torch; from llmctl import hardware; sizes = []; randn = torch.randn\n"
            "def record(*shape, **kw):\n    sizes.append(shape[0]); return randn(*shape, **kw)\n"
            "torch.randn = record; f = hardware.measure_matmul_flops(torch.bfloat16)\n"
            "print(hardware.cpu_has_fast_bf16(), f, max(sizes))")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    native, flops, largest = r.stdout.split()
    assert native == "False" and float(flops) > 0
    assert int(largest) < 2048  # the unbounded measurement went on to 2048 (minutes per product when emulated)
