"""The CUDA paths, checked on a GPU: every test here carries the `cuda` marker and is skipped, with its reason
shown by `pytest -rs`, where torch sees no CUDA device (tests/conftest.py). `scripts/gpu_check.sh` runs them on
a GPU machine (`python -m pytest -m cuda -rs tests/test_cuda.py`) before it measures anything.

What they prove, each against a reference that would catch a broken CUDA path:
- parity: float32 on the GPU equals the CPU; bf16 autocast and bf16 weights stay close to float32;
- attention: the training attention (causal, no mask; GQA too) runs on flash attention through SDPA;
- generation: cached greedy decoding equals the uncached reference, continuous batching equals one by one;
- training: a bf16 autocast step of the real loop with the fused CUDA AdamW (finite loss, every weight moved,
  loss falling), and the fused step equals the reference for-loop AdamW on the same gradients;
- int8: weight-only int8 layers on the GPU, logits and greedy decoding close to float;
- compiled decode: the ahead-of-time compiled step (AOTInductor on CUDA) gives the eager tokens;
- nccl: `torchrun -m llmctl pretrain` on the GPUs, DDP over nccl;
- MFU: this GPU is in llmctl's peak table, so MFU is reported on it.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from conftest import generate_uncached
from llmctl.config import ModelConfig, TrainConfig
from llmctl.generate import Engine, Request, generate
from llmctl.model import Transformer
from llmctl.sampling import Sampling
from llmctl.train import Hooks, LoopState, fit, lm_loss

pytestmark = pytest.mark.cuda

DEV = torch.device("cuda")
VOCAB = 96


def tiny(arch: str, init_std: float = 0.2, **kw) -> Transformer:
    """A small model on the CPU. init_std 0.2 makes logits sharp, so greedy picks are far from ties and
    numerically different but correct paths still agree token for token."""
    torch.manual_seed(0)
    shape = dict(arch=arch, n_layer=2, n_head=4, n_kv_head=2 if arch == "llama" else None, n_embd=128, block_size=64,
                 vocab_size=VOCAB, init_std=init_std)
    return Transformer(ModelConfig(**{**shape, **kw})).eval()


def tokens(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Size of the difference relative to the reference's (Frobenius norms). For scale, on these models on a CPU:
    bf16 autocast 0.013-0.022, bf16 weights 0.016-0.026, weight-only int8 0.03; a broken path is near 1 or more."""
    return float((a.float() - b.float()).norm() / b.float().norm())


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of positions whose top logit is the same token."""
    return float((a.argmax(-1) == b.argmax(-1)).float().mean())


# ------------------------------------------------------------------------------------------------------------------
# Parity and attention


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_float32_on_the_gpu_equals_the_cpu_and_bf16_stays_close(arch):
    cpu = tiny(arch)
    gpu = copy.deepcopy(cpu).to(DEV)
    idx = tokens(4, 64)
    with torch.no_grad():
        ref = cpu(idx)
        f32 = gpu(idx.to(DEV)).cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):  # how training runs
            amp = gpu(idx.to(DEV)).float().cpu()
        bf16 = copy.deepcopy(gpu).to(torch.bfloat16)(idx.to(DEV)).float().cpu()  # how `infer` runs on CUDA
    assert rel_err(f32, ref) < 1e-4, "float32 on CUDA differs from the CPU (TF32 or a wrong kernel?)"
    for name, out in (("bf16 autocast", amp), ("bf16 weights", bf16)):
        assert torch.isfinite(out).all(), name
        assert rel_err(out, ref) < 0.08, f"{name}: logits far from float32"
        assert agreement(out, ref) > 0.85, f"{name}: top tokens differ from float32"
    targets = tokens(4, 64, seed=1)
    loss = lambda logits: float(nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()))  # noqa: E731
    assert abs(loss(amp) - loss(ref)) < 0.02 * loss(ref)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_training_attention_runs_on_flash_attention(arch):
    """The training forward (causal, no mask; llama with grouped-query attention) qualifies for SDPA's flash
    kernel under bf16 autocast: restricted to flash alone, it must run (else 'No available kernel'), forward and
    backward, and agree with the math reference."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    idx = tokens(2, 64).to(DEV)
    grads = {}
    outs = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        m = tiny(arch, init_std=0.02).to(DEV).train()
        with sdpa_kernel([backend]), torch.autocast("cuda", dtype=torch.bfloat16):
            logits = m(idx)
            loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), idx.roll(-1, 1).flatten())
        loss.backward()
        outs[backend] = logits.float()
        grads[backend] = m.blocks[0].attn.qkv.weight.grad.float()
        assert torch.isfinite(loss) and torch.isfinite(grads[backend]).all()
    assert rel_err(outs[SDPBackend.FLASH_ATTENTION], outs[SDPBackend.MATH]) < 0.03
    assert rel_err(grads[SDPBackend.FLASH_ATTENTION], grads[SDPBackend.MATH]) < 0.1


# ------------------------------------------------------------------------------------------------------------------
# Generation


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cached_greedy_decoding_equals_uncached(arch):
    m = tiny(arch).to(DEV)
    prompt = [5, 9, 3, 17]
    cached = list(generate(m, prompt, 56, temperature=0))  # 60 of the 64 slots: no slide (the reference has none)
    assert len(cached) == 56
    assert cached == generate_uncached(m, prompt, 56, temperature=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_continuous_batching_greedy_equals_one_by_one(arch):
    m = tiny(arch).to(DEV)
    prompts = [[5, 9, 3, 17], [1], [7, 7, 7, 7, 7, 7, 7, 2, 4], [30, 31]]
    single = [list(generate(m, p, 70, temperature=0)) for p in prompts]
    reqs = [Request(p, Sampling(70, temperature=0)) for p in prompts]
    assert tokens_by_request(Engine(m), reqs, slots=3) == single


def tokens_by_request(engine, reqs, slots=None):
    out = {id(q): [] for q in reqs}
    for row in engine.run(reqs, slots=slots):
        out[id(row.request)] += row.new_tokens
    return [out[id(q)] for q in reqs]


# ------------------------------------------------------------------------------------------------------------------
# Training


def test_bf16_autocast_training_with_the_fused_adamw():
    """The real loop (`fit`) on CUDA under bf16 autocast with the optimizer llmctl builds: the fused AdamW."""
    from llmctl.optim import build_optimizer

    m = tiny("llama", init_std=0.02).to(DEV).train()
    cfg = TrainConfig(max_steps=30, warmup_steps=0, lr=3e-3, eval_interval=0, save_interval=0, log_interval=1)
    opt = build_optimizer(m, cfg, "cuda")
    assert all(g["fused"] for g in opt.param_groups), "llmctl builds the fused AdamW on CUDA"
    idx = tokens(8, 64)
    batch = {"input_ids": idx, "labels": idx.roll(-1, 1)}  # one batch, learned by heart
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    rows: list[dict] = []
    fit(m, opt, cfg, Hooks(batches=lambda step: [batch], loss=lm_loss, log_metrics=rows.append), LoopState(),
        device=DEV, amp_dtype=torch.bfloat16)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0], f"the loss did not fall: {losses[0]:.3f} -> {losses[-1]:.3f}"
    for n, p in m.named_parameters():
        assert p.dtype == torch.float32 and p.is_cuda, n  # master weights stay float32 under autocast
        assert not torch.equal(p.detach(), before[n]), f"{n} was not updated"
    state = opt.state[m.wte.weight]
    assert state["exp_avg"].is_cuda and torch.isfinite(state["exp_avg_sq"]).all()


def test_the_fused_adamw_step_equals_the_reference_step():
    from llmctl.optim import build_optimizer, param_groups

    a = tiny("gpt2", init_std=0.02).to(DEV).train()
    b = copy.deepcopy(a)
    cfg = TrainConfig(lr=1e-3, weight_decay=0.1)
    fused = build_optimizer(a, cfg, "cuda")
    reference = torch.optim.AdamW(param_groups(b, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.eps, foreach=False, fused=False)
    idx = tokens(4, 64).to(DEV)
    for step in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = lm_loss(a, {"input_ids": idx, "labels": idx.roll(-1 - step, 1)})
        loss.backward()
        for pa, pb in zip(a.parameters(), b.parameters()):  # the same gradients for both (tied weights listed once)
            pb.grad = pa.grad.detach().clone()
        fused.step()
        reference.step()
        fused.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa, pb, rtol=1e-5, atol=1e-6), n


# ------------------------------------------------------------------------------------------------------------------
# int8 and the compiled decode step


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_weight_only_decoding_is_close_to_float(dtype):
    from llmctl.quantize import Int8WeightOnlyLinear, convert

    ref = convert(tiny("gpt2").to(DEV), dtype, "none")
    q = convert(tiny("gpt2").to(DEV), dtype, "int8")  # what `infer --quantize int8` runs on CUDA
    layers = [m for m in q.modules() if isinstance(m, Int8WeightOnlyLinear)]
    assert len(layers) == 2 * 4 + 1 and not any(type(m) is nn.Linear for m in q.modules())  # 4 per block + head
    assert all(lin.weight_int8.dtype == torch.int8 and lin.weight_int8.is_cuda for lin in layers)
    idx = tokens(4, 64).to(DEV)
    with torch.no_grad():
        a, b = ref(idx).float(), q(idx).float()
    assert rel_err(b, a) < 0.08 and agreement(b, a) > 0.85
    prompt = [5, 9, 3, 17]
    got = list(generate(q, prompt, 24, temperature=0))
    want = list(generate(ref, prompt, 24, temperature=0))
    assert len(got) == 24 and got[:6] == want[:6]
    if dtype == "float32":
        assert got == generate_uncached(q, prompt, 24, temperature=0)  # the int8 model's cache path is exact too


def test_compiled_decode_step_on_cuda_equals_eager(tmp_path):
    from llmctl.aot import StepStore
    m = tiny("llama").to(DEV)

    def run(engine, prompts, n):
        reqs = [Request(p, Sampling(n, temperature=0)) for p in prompts]
        return tokens_by_request(engine or Engine(m), reqs, slots=2)

    prompts = [[5, 9, 3, 17], [1], [7, 7, 7, 7, 7, 7, 7, 2, 4]]  # rows that slide past the context, one joins late
    eager = run(None, prompts, 70)
    store = StepStore(m, root=tmp_path)
    compiled = Engine(m, compile=True, store=store)
    assert run(compiled, prompts, 70) == eager
    assert store.builds == 1 and len(list(tmp_path.rglob("*.pt2"))) == 1
    # a later run loads the package (no build) and decodes the same
    later = StepStore(m, root=tmp_path)
    assert run(Engine(m, compile="auto", store=later), prompts, 70) == eager and later.builds == 0


# ------------------------------------------------------------------------------------------------------------------
# nccl and the MFU table


def corpus(path, n_chars: int = 60_000) -> None:
    rng = random.Random(0)
    words = ["the", "sea", "a", "ship", "sails", "north", "and", "wind", "rises", "over", "grey", "water", "night"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + "." for _ in range(n_chars // 30)]
    path.write_text("\n".join(lines) + "\n")


def test_torchrun_trains_with_ddp_over_nccl(tmp_path):
    n = min(2, torch.cuda.device_count())
    corpus(tmp_path / "corpus.txt")
    sets = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64", "tokenizer.kind=char",
            f"data.path={tmp_path / 'corpus.txt'}", "train.device=cuda", "train.dtype=bfloat16", "train.batch_size=4",
            "train.max_steps=10", "train.warmup_steps=2", "train.eval_interval=0", "train.eval_batches=2",
            "train.log_interval=1", "generate.compile=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m", "llmctl",
           "pretrain", *[a for s in sets for a in ("--set", s)], "--out", str(tmp_path / "run"), "--json", "--quiet"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                       env={**os.environ, "LLMCTL_CACHE_DIR": str(tmp_path / "cache")})
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout[p.stdout.index("{"):])
    assert summary["steps"] == 10 and summary["world_size"] == n
    assert math.isfinite(summary["val_loss"]) and summary["tokens_per_sec"] > 0


def test_this_gpu_is_in_the_mfu_table():
    from llmctl import hardware

    name = torch.cuda.get_device_name(DEV)
    peak = hardware.gpu_peak(name, torch.bfloat16)
    assert peak, (f"{name} is not in llmctl.hardware.GPU_PEAKS, so training shows no MFU on it: add its datasheet "
                  "dense bf16 peak (or set LLMCTL_PEAK_TFLOPS)")
    if not os.environ.get("LLMCTL_PEAK_TFLOPS"):
        assert hardware.peak_flops(DEV, torch.bfloat16)["flops"] == peak
