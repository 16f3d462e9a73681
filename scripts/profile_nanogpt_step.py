#!/usr/bin/env python
"""nanoGPT's CPU config, one training step profiled in both programs: where llmctl's float32 step and nanoGPT's go.

    python scripts/profile_nanogpt_step.py --nanogpt ../peers/nanoGPT --steps 50 --rounds 3

Builds nanoGPT's own `GPT` (its model.py, imported from the clone, never copied) and llmctl's Transformer in the
same shape (configs/shakespeare-char-gpt2.yaml: gpt2 flavour, 4 layers x 128, 4 heads, context 64, the 65
characters, no dropout), each with the optimizer its program trains with (nanoGPT's `configure_optimizers`,
llmctl's `build_optimizer`), and trains both on the same random batches of 12 x 64 in float32, alternating by round
in one process. Prints tokens/s (median step) for each and torch.profiler's operators by self CPU time, grouped:
matrix products (mm, addmm, bmm, linear), attention (SDPA forward and backward), the optimizer, the rest. The
matrix products of the two programs are the same shapes, so their time is the floor both share.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmctl.config import ModelConfig, TrainConfig  # noqa: E402
from llmctl.hardware import cpu_isa, cpu_name  # noqa: E402
from llmctl.model import Transformer  # noqa: E402
from llmctl.optim import build_optimizer  # noqa: E402

B, T, V = 12, 64, 65
GROUPS = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
          "attention": ("scaled_dot_product", "flash_attention"),
          "optimizer": ("adam", "_foreach", "lerp", "addcdiv", "addcmul")}


def nanogpt_model(path: Path):
    sys.path.insert(0, str(path))
    from model import GPT, GPTConfig  # nanoGPT's model.py

    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False))
    return m, m.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.99), device_type="cpu")


def llmctl_model():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(arch="gpt2", n_layer=4, n_head=4, n_embd=128, block_size=T, vocab_size=V,
                                dropout=0.0, bias=False))
    return m, build_optimizer(m, TrainConfig(lr=1e-3, weight_decay=0.1), "cpu")


def step(name: str, model, opt, x: torch.Tensor, y: torch.Tensor) -> None:
    if name == "nanoGPT":
        _, loss = model(x, y)
    else:
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def timed(name: str, model, opt, steps: int, seed: int, profile: bool):
    gen = torch.Generator().manual_seed(seed)
    times, prof = [], None
    for i in range(steps + 2):
        x = torch.randint(0, V, (B, T + 1), generator=gen)
        x, y = x[:, :-1].contiguous(), x[:, 1:].contiguous()  # as each program batches
        if profile and i == 2:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            prof.__enter__()
        t0 = time.perf_counter()
        step(name, model, opt, x, y)
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t0)
    if prof is not None:
        prof.__exit__(None, None, None)
    return times, prof


def shares(prof) -> dict:
    """Self CPU time by group, as fractions of the total."""
    total, by = 0.0, {g: 0.0 for g in (*GROUPS, "other")}
    for e in prof.key_averages():
        t = e.self_cpu_time_total
        total += t
        group = next((g for g, keys in GROUPS.items() if any(k in e.key.lower() for k in keys)), "other")
        by[group] += t
    return {g: round(t / total, 3) for g, t in by.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanogpt", type=Path, default=ROOT.parent / "nanoGPT", help="a clone of karpathy/nanoGPT")
    ap.add_argument("--steps", type=int, default=50, help="timed steps per program and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    programs = {"nanoGPT": nanogpt_model(args.nanogpt), "llmctl": llmctl_model()}
    times: dict[str, list[float]] = {n: [] for n in programs}
    profiles = {}
    for r in range(args.rounds):
        for name, (model, opt) in programs.items():
            t, prof = timed(name, model, opt, args.steps, seed=r, profile=r == 0)
            times[name] += t
            if prof is not None:
                profiles[name] = prof
    out = {"cpu": cpu_name(), "isa": cpu_isa(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "shape": f"4 layers x 128, batch {B} x {T}, float32", "programs": {}}
    print(f"CPU: {out['cpu']} ({out['isa']}), torch {out['torch']}, {out['threads']} threads; {out['shape']}")
    for name, t in times.items():
        s = statistics.median(t)
        out["programs"][name] = {"tokens_per_sec": round(B * T / s, 1), "ms_per_step": round(1000 * s, 2),
                                 "self_cpu_shares": shares(profiles[name])}
        print(f"{name:8s} {B * T / s:8.0f} tok/s  {1000 * s:6.2f} ms/step  {out['programs'][name]['self_cpu_shares']}")
    for name, prof in profiles.items():
        print(f"--- {name}: top operators by self CPU time ({args.steps} steps)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
