#!/usr/bin/env python
"""One training step at GPT-2's context, profiled: where forward, backward and AdamW spend their time.

    python scripts/profile_step.py --block-size 1024 --variants fp32 bf16 bf16-attn-fp32 --rounds 3

Builds llmctl's Transformer (gpt2 flavour, 6 layers x 256, 8 heads, the 65-character vocabulary of Tiny Shakespeare)
and trains it on random tokens (speed does not depend on the data) with llmctl's loss and fused AdamW, batch 4.
Variants, run interleaved in one process so their ratios hold on a busy machine:
  fp32            float32, attention through SDPA with is_causal (llmctl's path)
  fp32-mask       float32, SDPA given an explicit boolean causal mask instead of is_causal
  fp32-math       float32, SDPA restricted to its math backend (no flash kernel)
  bf16            bf16 autocast, attention as llmctl runs it (`llmctl.model.attention_dtype`: float32 in training)
  bf16-attn-bf16  bf16 autocast, attention in bf16 at every length (before 2026-12-07: from kv length 512 on)
  bf16-attn-fp32  bf16 autocast, attention in float32 at every length
  fp32-docs / bf16-docs  rows of 4 packed documents (`segments`): the block-diagonal mask
Prints tokens/s per variant (median over the timed steps of all rounds) and, with --profile, torch.profiler's top
operators by self CPU time for each variant. `--attention` times attention alone instead (SDPA forward + backward on
the model's shapes, 4 x 8 heads x T x 32): float32 and bfloat16, is_causal, an explicit causal mask, the math backend.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmctl import model as model_mod  # noqa: E402
from llmctl.config import ModelConfig  # noqa: E402
from llmctl.hardware import cpu_isa, cpu_name  # noqa: E402
from llmctl.model import Transformer  # noqa: E402

ORIGINAL_ATTENTION_DTYPE = model_mod.attention_dtype


def setting(variant: str, T: int):
    """(autocast dtype or None, attention_dtype replacement or None, context manager, segments or None)."""
    amp = torch.bfloat16 if variant.startswith("bf16") else None
    attn = {"bf16-attn-bf16": lambda *a: a[1], "bf16-attn-fp32": lambda *a: torch.float32}.get(variant)
    ctx = contextlib.nullcontext()
    if variant == "fp32-math":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        ctx = sdpa_kernel([SDPBackend.MATH])
    segments = torch.arange(T).div(T // 4, rounding_mode="floor").expand(4, T) if variant.endswith("docs") else None
    return amp, attn, ctx, segments


def explicit_mask_sdpa():
    """SDPA as llmctl calls it, but a causal call is given the boolean mask instead of is_causal."""
    sdpa = F.scaled_dot_product_attention

    def patched(q, k, v, attn_mask=None, is_causal=False, **kw):
        if is_causal:
            attn_mask, is_causal = model_mod.causal(q.shape[2], q.device), False
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    return patched


def run(variant: str, model, opt, T: int, steps: int, profile: bool) -> tuple[list[float], str]:
    amp, attn, ctx, segments = setting(variant, T)
    model_mod.attention_dtype = attn or ORIGINAL_ATTENTION_DTYPE
    sdpa = F.scaled_dot_product_attention
    if variant == "fp32-mask":
        model_mod.F.scaled_dot_product_attention = explicit_mask_sdpa()
    gen = torch.Generator().manual_seed(0)
    times, table = [], ""
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile else None
    try:
        with ctx:
            for i in range(steps + 1):
                x = torch.randint(0, 65, (4, T + 1), generator=gen)
                if prof is not None and i == 1:
                    prof.__enter__()
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=amp) if amp else contextlib.nullcontext():
                    logits = model(x[:, :-1], segments=segments)
                    loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i:  # the first step warms up
                    times.append(time.perf_counter() - t0)
        if prof is not None:
            prof.__exit__(None, None, None)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    finally:
        model_mod.attention_dtype = ORIGINAL_ATTENTION_DTYPE
        model_mod.F.scaled_dot_product_attention = sdpa
    return times, table


def attention_alone(T: int, repeats: int, dtypes: list[str]) -> dict:
    """Seconds per SDPA forward + backward (median of `repeats`) per dtype and way of asking for causality."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    mask = model_mod.causal(T, "cpu")
    for dtype in (getattr(torch, d) for d in dtypes):
        for how in ("is_causal", "mask", "math"):
            q, k, v = (torch.randn(4, 8, T, 32, dtype=dtype, requires_grad=True) for _ in range(3))
            ctx = sdpa_kernel([SDPBackend.MATH]) if how == "math" else contextlib.nullcontext()
            times = []
            with ctx:
                for _ in range(repeats + 1):
                    t0 = time.perf_counter()
                    y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if how == "is_causal" else mask,
                                                       is_causal=how == "is_causal")
                    y.sum().backward()
                    times.append(time.perf_counter() - t0)
            name = f"{str(dtype).removeprefix('torch.')} {how}"
            out[name] = round(statistics.median(times[1:]), 4)
            print(f"{name:20s} {out[name] * 1000:8.1f} ms  (forward + backward, 6 layers: x6)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--variants", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's top ops (first round)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--attention", action="store_true", help="time attention alone (see above)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="with --attention")
    args = ap.parse_args()
    T = args.block_size
    if args.attention:
        print(f"CPU: {cpu_name()} ({cpu_isa()}), torch {torch.__version__}, {torch.get_num_threads()} threads")
        attention_alone(T, args.steps, args.dtypes)
        return
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=6, n_head=8, n_embd=256, block_size=T, vocab_size=65, dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    for r in range(args.rounds):
        for v in args.variants:
            t, table = run(v, model, opt, T, args.steps, args.profile and r == 0)
            times[v] += t
            if table:
                print(f"--- {v}: top ops by self CPU time ({args.steps} steps)\n{table}", flush=True)
    print(f"CPU: {cpu_name()} ({cpu_isa()}), torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"6 layers x 256, batch 4 x {T}")
    out = {}
    for v, t in times.items():
        s = statistics.median(t)
        out[v] = {"tokens_per_sec": round(4 * T / s, 1), "s_per_step": round(s, 3), "steps": len(t)}
        print(f"{v:16s} {4 * T / s:8.0f} tok/s   {s:.3f} s/step   ({len(t)} steps)")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "isa": cpu_isa(), "torch": torch.__version__,
                                         "block_size": T, "results": out}, indent=2))


if __name__ == "__main__":
    main()
