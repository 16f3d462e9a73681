#!/usr/bin/env python
"""Decode speed, side by side: `llmctl` generation vs transformers' `generate` (with its KV cache), same weights.

For each model shape (a GPT-2-124M shape and a small LLaMA shape, random weights from one seed) and setting
(batch 1 and 8; float32, bfloat16, int8; eager and compiled), a fresh subprocess builds the model, converts the
same weights for transformers through llmctl's exporter where needed, and measures greedy decoding of 200 new
tokens after a 16-token prompt:
  - steady-state tokens/s: (200 - 1) new tokens per row over the time after the first token;
  - time to first token (prefill + one step); for compiled runs also the first call with a cold cache (which
    builds the ahead-of-time compiled step) and with a warm one (which loads it);
  - peak RSS of the process;
and the memory-bandwidth floor: weight bytes / measured read bandwidth.

With --ckpt RUN it also measures a trained checkpoint (llmctl's default CPU precision vs transformers' default
float32) and the perplexity of each precision on the run's validation split.

    python scripts/bench_infer.py                       # the shapes, about 25 minutes on 2 cores
    python scripts/bench_infer.py --ckpt runs/shakespeare-bpe
    python scripts/bench_infer.py --ckpt runs/shakespeare-bpe --keep-shapes   # only the trained model's rows

`measure(spec)` is also what scripts/gpu_check.py runs on a GPU: a spec may name `device` (cpu, cuda), a shape as
a dict of ModelConfig fields instead of a name, and `prompt_tokens` / `new_tokens` (default 16 / 200); on CUDA a
row adds `peak_gpu_memory_bytes` (torch.cuda.max_memory_allocated over the measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT, NEW = 16, 200

SHAPES = {
    "gpt2-124M": dict(arch="gpt2", n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257,
                      activation="gelu_tanh"),
    "llama-small": dict(arch="llama", n_layer=8, n_head=8, n_kv_head=4, n_embd=512, block_size=1024, vocab_size=32000),
}


# ----------------------------------------------------------------------------------------------------------------
# One measurement, in its own process


def _build(shape: dict):
    import torch

    from llmctl.config import ModelConfig
    from llmctl.model import Transformer

    torch.manual_seed(0)
    return Transformer(ModelConfig(**shape)).eval()


def _hf_model(model, dtype):
    """The same weights as a transformers model, through llmctl's own exporter (no file round trip)."""
    import transformers

    from llmctl import hf

    cfg = hf.to_hf_config(model.cfg, None)
    conf = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    net = transformers.AutoModelForCausalLM.from_config(conf).eval()
    weights = hf.to_hf_weights({k: v for k, v in model.state_dict().items()}, model.cfg, "bench")
    missing, unexpected = net.load_state_dict(weights, strict=False)
    assert not unexpected and all("lm_head" in k or "bias" in k and "attn" in k for k in missing), (missing, unexpected)
    return net.to(dtype)


def measure(args: dict) -> dict:
    import torch

    device = torch.device(args.get("device", "cpu"))
    cuda = device.type == "cuda"
    prompt_len, new = args.get("prompt_tokens", PROMPT), args.get("new_tokens", NEW)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    if args.get("ckpt"):
        from llmctl.loading import load_model

        model = load_model(args["ckpt"], "cpu").model
        vocab = model.cfg.vocab_size
    else:
        shape = args["shape"]
        model = _build(SHAPES[shape] if isinstance(shape, str) else shape)
        vocab = model.cfg.vocab_size
    B = args["batch"]
    prompts = torch.randint(3, vocab, (B, prompt_len), generator=torch.Generator().manual_seed(1))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args["dtype"]]

    def synced(fn):  # CUDA runs asynchronously: a time is only taken once the GPU is done
        def run(n: int):
            fn(n)
            if cuda:
                torch.cuda.synchronize(device)
        return run

    if args["impl"] == "transformers":
        net = _hf_model(model, dtype).to(device)
        del model
        prompts = prompts.to(device)

        @synced
        def run(n: int):
            with torch.no_grad():
                net.generate(prompts, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                             pad_token_id=0, eos_token_id=None)
    else:
        from llmctl.generate import Engine, Request
        from llmctl.quantize import convert
        from llmctl.sampling import Sampling

        # what `llmctl infer` does for this precision
        model = convert(model.to(device), args["dtype"], args["quantize"])
        # compiled: the ahead-of-time step, built into $LLMCTL_CACHE_DIR if missing (cold) or loaded from it (warm)
        engine = Engine(model, compile=args["compile"])

        @synced
        def run(n: int):
            reqs = [Request(p.tolist(), Sampling(n, temperature=0)) for p in prompts]
            for _ in engine.run(reqs):
                pass

    t0 = time.perf_counter()
    run(2)  # first call: prefill and one decode step, so it includes building or loading a compiled step
    first_call = time.perf_counter() - t0
    ttft, totals = [], []
    for _ in range(args["repeats"]):
        t0 = time.perf_counter()
        run(1)
        ttft.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run(new)
        totals.append(time.perf_counter() - t0)
    t1, tn = statistics.median(ttft), statistics.median(totals)
    row = {
        "tokens_per_sec": B * (new - 1) / max(tn - t1, 1e-9),
        "ms_per_step": (tn - t1) / (new - 1) * 1000,
        "ttft_ms": t1 * 1000,
        "first_call_s": first_call,
        "peak_rss_mb": peak_rss_mb(),
    }
    if cuda:
        row["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return row


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM starts afresh at exec; ru_maxrss would carry over the
    driver's peak (it held a 256 MB buffer and a GPT-2 model) into every measurement."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_bandwidth_gbs() -> float:
    import torch

    x = torch.ones(256 * 1024 * 1024 // 4)  # 256 MB, far past the caches
    x.sum()
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return best


def weight_bytes(shape: dict, bytes_per: float) -> float:
    m = _build(shape)
    n = sum(p.numel() for p in m.parameters())  # tied head counted once: it is read once per step
    return n * bytes_per


# ----------------------------------------------------------------------------------------------------------------
# The driver


def one(spec: dict, env: dict | None = None) -> dict:
    p = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    if p.returncode:
        raise SystemExit(f"measurement failed for {spec}:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def perplexities(ckpt: str) -> dict:
    out = {}
    for name, flags in {"float32": ["--dtype", "float32", "--quantize", "none"],
                        "bfloat16": ["--dtype", "bfloat16", "--quantize", "none"],
                        "int8": ["--dtype", "float32", "--quantize", "int8"],
                        "default": ["--dtype", "auto", "--quantize", "auto"]}.items():
        p = subprocess.run([sys.executable, "-m", "llmctl", "eval", "--ckpt", ckpt, "--json", *flags],
                           capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(p.stderr)
        r = json.loads(p.stdout)
        out[name] = {"perplexity": r["perplexity"], "precision": r.get("precision")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--ckpt", help="also measure this trained run (default precision vs transformers float32)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds for the trained model's settings")
    ap.add_argument("--keep-shapes", action="store_true",
                    help="measure only --ckpt; keep the shape rows of the existing --json file")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks/infer.json")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return

    if args.keep_shapes and not args.json.is_file():
        raise SystemExit(f"--keep-shapes keeps the shape rows of {args.json}, which does not exist; "
                         "run without it first")
    old = json.loads(args.json.read_text()) if args.keep_shapes else None
    from llmctl import hardware  # the CPU class every figure holds for
    bw = old["read_bandwidth_gbs"] if old else read_bandwidth_gbs()
    rows, info = [], {"read_bandwidth_gbs": round(bw, 1), "prompt_tokens": PROMPT, "new_tokens": NEW,
                      "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                  "cpu": hardware.cpu_name(), "isa": hardware.cpu_isa()}}
    settings = [  # (impl, dtype, quantize, compile, batch)
        ("transformers", "float32", "none", False, 1), ("llmctl", "float32", "none", False, 1),
        ("llmctl", "float32", "none", True, 1),
        ("transformers", "bfloat16", "none", False, 1), ("llmctl", "bfloat16", "none", False, 1),
        ("llmctl", "bfloat16", "none", True, 1),
        ("llmctl", "float32", "int8", False, 1),
        ("transformers", "float32", "none", False, 8), ("llmctl", "float32", "none", False, 8),
        ("transformers", "bfloat16", "none", False, 8), ("llmctl", "bfloat16", "none", False, 8),
        ("llmctl", "float32", "int8", False, 8),
    ]
    if old:  # --keep-shapes: the shape rows, floors and bandwidth of the earlier run stay as they were
        rows = [r for r in old["rows"] if not r["model"].startswith("trained:")]
        info["floor_tokens_per_sec"] = old["floor_tokens_per_sec"]
    for shape in [] if args.keep_shapes else args.shapes.split(","):
        floor32 = bw * 1e9 / weight_bytes(SHAPES[shape], 4)
        info.setdefault("floor_tokens_per_sec", {})[shape] = {"float32": round(floor32, 1),
                                                              "bfloat16": round(2 * floor32, 1),
                                                              "int8": round(4 * floor32, 1)}
        for impl, dtype, q, comp, batch in settings:
            spec = dict(shape=shape, impl=impl, dtype=dtype, quantize=q, compile=comp, batch=batch,
                        repeats=args.repeats)
            env = None
            if comp:  # cold cache first (builds the compiled step), then warm (loads it): both first calls reported
                cache = tempfile.mkdtemp(prefix="llmctl-bench-")
                env = {"LLMCTL_CACHE_DIR": cache, "TORCHINDUCTOR_CACHE_DIR": str(Path(cache) / "inductor")}
                cold = one(spec, env)
                r = one(spec, env)
                r["first_call_cold_s"] = cold["first_call_s"]
                shutil.rmtree(cache, ignore_errors=True)
            else:
                r = one(spec)
            row = {"model": shape, "impl": impl, "dtype": dtype, "quantize": q, "compile": comp, "batch": batch, **r}
            rows.append(row)
            print(f"{shape:12s} {impl:12s} {dtype:9s} {q:5s} {'compiled' if comp else 'eager':8s} b{batch}: "
                  f"{r['tokens_per_sec']:8.1f} tok/s  ttft {r['ttft_ms']:7.1f} ms  rss {r['peak_rss_mb']:6.0f} MB",
                  file=sys.stderr, flush=True)
    if args.ckpt:
        # the trained model decodes in a few ms per token, where this machine's drift between processes (+-30%)
        # is as large as the differences measured: its settings run interleaved, round after round, median kept
        trained = (("transformers", "float32", "none", False), ("llmctl", "float32", "int8", False),
                   ("llmctl", "bfloat16", "none", False), ("llmctl", "float32", "none", False),
                   ("llmctl", "float32", "none", True))
        runs: dict = {t: [] for t in trained}
        cache = tempfile.mkdtemp(prefix="llmctl-bench-")  # the compiled step: built in round 1, loaded after
        env = {"LLMCTL_CACHE_DIR": cache, "TORCHINDUCTOR_CACHE_DIR": str(Path(cache) / "inductor")}
        for _ in range(args.rounds):
            for impl, dtype, q, comp in trained:
                spec = dict(ckpt=args.ckpt, impl=impl, dtype=dtype, quantize=q, compile=comp, batch=1,
                            repeats=args.repeats)
                runs[(impl, dtype, q, comp)].append(one(spec, env if comp else None))
        shutil.rmtree(cache, ignore_errors=True)
        for (impl, dtype, q, comp), rs in runs.items():
            r = dict(sorted(rs, key=lambda x: x["tokens_per_sec"])[len(rs) // 2])
            r["tokens_per_sec_rounds"] = [round(x["tokens_per_sec"], 1) for x in rs]
            if comp:
                r["first_call_cold_s"], r["first_call_s"] = (rs[0]["first_call_s"],
                                                             statistics.median(x["first_call_s"] for x in rs[1:]))
            rows.append({"model": f"trained:{args.ckpt}", "impl": impl, "dtype": dtype, "quantize": q, "compile": comp,
                         "batch": 1, **r})
            print(f"trained {impl:12s} {dtype:9s} {q:5s} {'compiled' if comp else 'eager':8s}: "
                  f"{r['tokens_per_sec']:8.1f} tok/s (rounds: {r['tokens_per_sec_rounds']})", file=sys.stderr,
                  flush=True)
        info["trained_perplexity"] = perplexities(args.ckpt)

    # ratios against transformers in the same dtype and batch
    base = {(r["model"], r["dtype"], r["batch"]): r["tokens_per_sec"] for r in rows if r["impl"] == "transformers"}
    hf32 = {(r["model"], r["batch"]): r["tokens_per_sec"] for r in rows
            if r["impl"] == "transformers" and r["dtype"] == "float32"}
    print(f"\n{'model':14s} {'impl':12s} {'dtype':9s} {'quant':5s} {'mode':8s} {'batch':>5s} {'tok/s':>8s} "
          f"{'vs HF same dtype':>16s} {'vs HF fp32':>10s} {'ttft ms':>8s} {'RSS MB':>7s}")
    for r in rows:
        same = base.get((r["model"], r["dtype"], r["batch"]))
        r["ratio_vs_transformers_same_dtype"] = round(r["tokens_per_sec"] / same, 2) if same else None
        r["ratio_vs_transformers_fp32"] = round(r["tokens_per_sec"] / hf32[(r["model"], r["batch"])], 2)
        print(f"{r['model'][:14]:14s} {r['impl']:12s} {r['dtype']:9s} {r['quantize']:5s} "
              f"{'compiled' if r['compile'] else 'eager':8s} {r['batch']:>5d} {r['tokens_per_sec']:>8.1f} "
              f"{(str(r['ratio_vs_transformers_same_dtype']) + 'x') if same else '':>16s} "
              f"{r['ratio_vs_transformers_fp32']:>9.2f}x {r['ttft_ms']:>8.1f} {r['peak_rss_mb']:>7.0f}")
    print(f"\nread bandwidth {bw:.1f} GB/s; floors (tok/s, batch 1): {json.dumps(info['floor_tokens_per_sec'])}")
    if "trained_perplexity" in info:
        print(f"trained model perplexity: {json.dumps(info['trained_perplexity'])}")
    info["rows"] = rows
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
