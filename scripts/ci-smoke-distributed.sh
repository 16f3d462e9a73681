#!/usr/bin/env bash
# Smoke test of distributed training without a GPU: 2 CPU processes (gloo) run a few steps with DDP and with
# FSDP2 (bf16 autocast, activation checkpointing, global batch), then one process evaluates the checkpoint and
# continues it. Exits non-zero on any failure. Takes about a minute on 2 cores.
#
#   scripts/ci-smoke-distributed.sh [TEXT_FILE]      (default: ../shared/data/tinyshakespeare.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data/tinyshakespeare.txt}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export LLMCTL_CACHE_DIR=${LLMCTL_CACHE_DIR:-$work/cache}
py=${PYTHON:-python}
tiny=(--set model.n_layer=2 --set model.n_head=2 --set model.n_embd=32 --set model.block_size=32
      --set train.batch_size=4 --set train.global_batch_size=16 --set train.max_steps=6 --set train.warmup_steps=2
      --set train.log_interval=2 --set train.eval_interval=3 --set train.eval_batches=2 --set train.save_interval=3
      --set train.dtype=bfloat16 --set train.activation_checkpointing=true --set "data.path=$data")
for parallel in ddp fsdp; do
  echo "== 2 processes, $parallel" >&2
  "$py" -m torch.distributed.run --standalone --nproc_per_node=2 -m llmctl pretrain "${tiny[@]}" \
    --set train.parallel=$parallel --out "$work/$parallel" --json > "$work/$parallel.json"
  "$py" - "$work/$parallel.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
assert s["steps"] == 6 and s["world_size"] == 2 and s["tokens"] == 6 * 16 * 32, s
print(f"   ok: {s['steps']} steps, val_loss {s['val_loss']:.4f}, {s['tokens_per_sec']:.0f} tok/s "
      f"({s['tokens_per_sec_per_device']:.0f} per device)", file=sys.stderr)
PY
done
echo "== the FSDP checkpoint in one process: eval, then continue to step 8" >&2
"$py" -m llmctl eval --ckpt "$work/fsdp" --json > /dev/null
"$py" -m llmctl pretrain --resume-from "$work/fsdp/step-0000003" --set train.max_steps=8 \
  --out "$work/one" --quiet --json > /dev/null
echo "distributed smoke test passed" >&2
