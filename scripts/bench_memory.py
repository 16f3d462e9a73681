"""Memory of finetuning, measured and estimated: full finetune vs LoRA vs QLoRA (NF4 base).

1. Measured on this CPU: the peak memory of ONE training step (forward, backward, AdamW step, through llmctl's own
   loop `train.fit`) of a model with Llama-3.2-1B's width, heads, key/value heads, MLP width and vocabulary (2048,
   32, 8, 8192, 128256; tied embeddings, llama3 RoPE scaling) and 4 layers, for each method in its own process,
   beside the dry run's estimate for it (`llmctl.estimate.memory_estimate`, the figure `--dry-run` reports).
   Each method trains as `llmctl finetune` would: bf16 autocast, float32 weights, adapters of rank 8 on
   attn.qkv, attn.proj, mlp.fc, mlp.proj, activation checkpointing on for qlora only (its default).

   The figure is the growth of the process's peak resident size (VmHWM, reset after the model and optimizer are
   built, so building the float32 model before quantizing it does not count) over its resident size before the
   model was built: weights, adapters, gradients, optimizer state and the step's activations and temporaries.
   glibc is told to map every allocation over 64 KiB on its own (MALLOC_MMAP_THRESHOLD_=65536), so freed tensors
   go back to the system at once and the figure is the tensors' own peak, not heap the allocator keeps.

2. The dry run's figures for the real Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B shapes (their public config.json
   values, below, read by llmctl's importer) on a CUDA GPU of 24 GB, for the same three methods at batch 1 x 2048
   tokens: the models are built on the meta device (shapes only; NF4 quantizes meta tensors too), so nothing is
   allocated.

    flock /tmp/bench.lock nice -n 5 python scripts/bench_memory.py [--seq 128] [--batch 1] [--out FILE.json]
        [--methods qlora]   # remeasure some methods, keep the others' rows from --out

Linux only (reads /proc/self/status). Peak memory hardly depends on other load on the machine; time does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("full", "lora", "qlora")
TARGETS = ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"]
GPU = 24 * 10**9  # "24 GB": what is left of a 24 GiB card after the CUDA context and allocator slack, roughly

_LLAMA3_ROPE = {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"}
_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
          "attention_bias": False, "mlp_bias": False, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
          "max_position_embeddings": 131072, "vocab_size": 128256, "bos_token_id": 128000,
          "eos_token_id": 128001, "initializer_range": 0.02, "torch_dtype": "bfloat16"}
# the public config.json values of meta-llama's models (the fields llmctl reads)
SHAPES = {
    "Llama-3.2-1B": {**_LLAMA, "hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "num_hidden_layers": 16, "head_dim": 64,
                     "tie_word_embeddings": True, "rope_scaling": _LLAMA3_ROPE},
    "Llama-3.2-3B": {**_LLAMA, "hidden_size": 3072, "intermediate_size": 8192, "num_attention_heads": 24,
                     "num_key_value_heads": 8, "num_hidden_layers": 28, "head_dim": 128,
                     "tie_word_embeddings": True, "rope_scaling": _LLAMA3_ROPE},
    "Llama-3.1-8B": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "num_hidden_layers": 32, "head_dim": 128,
                     "tie_word_embeddings": False, "eos_token_id": [128001, 128008, 128009],
                     "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0}},
}


def status(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def config(hf: dict, method: str, seq: int, batch: int, layers: int | None = None, dtype: str = "bfloat16"):
    """llmctl's Config for finetuning `hf` (a config.json) with `method` at batch x seq tokens."""
    from llmctl.config import Config
    from llmctl.hf import to_model_config

    cfg = Config(model=to_model_config({**hf, **({"num_hidden_layers": layers} if layers else {})}))
    cfg.model.block_size = seq
    cfg.train.batch_size, cfg.train.dtype = batch, dtype
    cfg.finetune.method, cfg.finetune.lora_targets = method, TARGETS
    cfg.train.activation_checkpointing = method == "qlora"  # build_plan's default for a finetune
    return cfg


def trainable(model, cfg) -> None:
    """Freeze the base and add adapters (and NF4 base weights) as a finetune of cfg.finetune.method does."""
    from llmctl.lora import apply_lora
    from llmctl.qlora import quantize_base

    f = cfg.finetune
    if f.method == "full":
        return
    model.requires_grad_(False)
    apply_lora(model, f.lora_targets, f.lora_rank, f.lora_alpha, f.lora_dropout)
    if f.method == "qlora":
        quantize_base(model)


def measure(method: str, seq: int, batch: int, dtype: str) -> dict:
    """One process: build, estimate, reset the peak, train one step; the growth of the peak over the baseline."""
    import torch
    import torch._dynamo  # noqa: F401  (the optimizer imports it lazily: an import, so before the baseline)
    import torchao  # noqa: F401

    from llmctl import estimate
    from llmctl.distributed.parallelize import checkpoint_blocks
    from llmctl.model import Transformer
    from llmctl.optim import build_optimizer
    from llmctl.train import Hooks, LoopState, fit

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cfg = config(SHAPES["Llama-3.2-1B"], method, seq, batch, layers=4, dtype=dtype)
    baseline = status("VmRSS")
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    trainable(model, cfg)
    if cfg.train.activation_checkpointing:
        checkpoint_blocks(model)
    cpu, amp = torch.device("cpu"), (None if dtype == "float32" else torch.bfloat16)
    est = estimate.memory_estimate(model, cfg, cpu, amp)
    optimizer = build_optimizer(model, cfg.train, "cpu")
    ids = torch.randint(0, cfg.model.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(1))
    batches = lambda step: [{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}]  # noqa: E731
    built = estimate._reset_peak_rss()
    loop = cfg.train
    loop.max_steps, loop.eval_interval, loop.save_interval, loop.log_interval, loop.warmup_steps = 1, 0, 0, 10**9, 0
    fit(model, optimizer, loop, Hooks(batches=batches), LoopState(), device=cpu, amp_dtype=amp)
    peak = status("VmHWM")
    return {"method": method, "measured_peak": peak - baseline, "built": built - baseline,
            "estimate": est["needed"], "ratio": round(est["needed"] / (peak - baseline), 3),
            "checkpointing": est["checkpointing"], "estimate_parts": est}


def shapes_on_gpu(seq: int, batch: int) -> dict:
    """The dry run's memory estimate per device for the real shapes and each method, on a CUDA GPU of GPU bytes."""
    import torch

    from llmctl import estimate
    from llmctl.model import Transformer

    out: dict = {}
    for name, hf in SHAPES.items():
        for method in METHODS:
            cfg = config(hf, method, seq, batch)
            with torch.device("meta"):
                model = Transformer(cfg.model)
            trainable(model, cfg)
            mem = estimate.memory_estimate(model, cfg, torch.device("cuda"), torch.bfloat16, capacity=GPU)
            out[f"{name} {method}"] = {"model": name, "method": method, "parameters": sum(
                p.numel() for p in {id(p): p for p in model.parameters()}.values()), **mem}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence of the measured step")
    ap.add_argument("--batch", type=int, default=1, help="sequences of the measured step")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                    help="the measured step's precision (float32: no autocast; faster where bf16 is slow)")
    ap.add_argument("--gpu-seq", type=int, default=2048, help="tokens per sequence of the 24 GB GPU figures")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "memory.json")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                    help="measure only these (the other rows are kept from --out, which must exist)")
    ap.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)  # (the child process)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.seq, args.batch, args.dtype)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    kept = [] if set(args.methods) == set(METHODS) else json.loads(args.out.read_text())["measured"]
    measured = [r for r in kept if r["method"] not in args.methods]
    for method in args.methods:
        r = subprocess.run([sys.executable, __file__, "--one", method, "--seq", str(args.seq), "--batch",
                            str(args.batch), "--dtype", args.dtype], capture_output=True, text=True, env=env, cwd=ROOT)
        if r.returncode != 0:
            sys.exit(f"{method} failed:\n{r.stderr[-3000:]}")
        row = json.loads(r.stdout.strip().splitlines()[-1])
        measured.append(row)
        gib = 2**30
        print(f"{method:6s} measured {row['measured_peak'] / gib:6.2f} GiB  estimate {row['estimate'] / gib:6.2f} GiB"
              f"  ratio {row['ratio']}", flush=True)
    import torch

    from llmctl import hardware

    report = {
        "cpu": hardware.cpu_name(),
        "torch": torch.__version__,
        "measured_model": "Llama-3.2-1B widths, 4 layers", "seq": args.seq, "batch": args.batch,
        "dtype": args.dtype,
        "measured": sorted(measured, key=lambda r: METHODS.index(r["method"])),
        "gpu_bytes": GPU, "gpu_batch": 1, "gpu_seq": args.gpu_seq,
        "gpu": shapes_on_gpu(args.gpu_seq, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for key, m in report["gpu"].items():
        print(f"{key:22s} {m['needed'] / 1e9:7.1f} GB  {'fits' if m['fits'] else 'does NOT fit'} 24 GB")


if __name__ == "__main__":
    main()
