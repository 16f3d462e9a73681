#!/usr/bin/env bash
# SST-2 sentiment recipe, on one machine, no download:
#   1. pretrain a small LLaMA language model on the SST-2 training sentences (text only)   configs/sst2-lm.yaml
#      (ROUTE mlm: the same size as a ModernBERT-style encoder, masked-language modelling)    configs/sst2-mlm.yaml
#   2. finetune it as a classifier, fully                                                     configs/sst2-classify.yaml
#   3. finetune it as a classifier with LoRA                                                  configs/sst2-classify-lora.yaml
#   4. report accuracy, macro F1 and wall time on dev.tsv (never used for training or model selection)
# Usage: scripts/sst2_recipe.sh [SST2_DIR] [RUNS_DIR] [SEED] [ROUTE]   (defaults: ../shared/data/sst2 runs/sst2 1337 lm)
# SEED is train.seed of all three runs (initialisation, dropout, batch order); docs/results.md reports several.
# ROUTE lm pretrains a decoder (causal language model), mlm an encoder (docs/encoders.md#sst-2); the finetunes are
# the same configs for both.
set -euo pipefail
SST2=${1:-../shared/data/sst2}
RUNS=${2:-runs/sst2}
SEED=${3:-1337}
ROUTE=${4:-lm}
case "$ROUTE" in lm|mlm) ;; *) echo "ROUTE must be lm or mlm, not '$ROUTE'" >&2; exit 2 ;; esac
mkdir -p "$RUNS"
start=$(date +%s)
llmctl pretrain -c "configs/sst2-$ROUTE.yaml" --set data.path="$SST2/train.tsv" --set train.seed="$SEED" --out "$RUNS/lm" --overwrite
lm_done=$(date +%s)
llmctl finetune -c configs/sst2-classify.yaml --from "$RUNS/lm" --set data.path="$SST2/train.tsv" --set train.seed="$SEED" --out "$RUNS/full" --overwrite
full_done=$(date +%s)
llmctl finetune -c configs/sst2-classify-lora.yaml --from "$RUNS/lm" --set data.path="$SST2/train.tsv" --set train.seed="$SEED" --out "$RUNS/lora" --overwrite
lora_done=$(date +%s)
llmctl eval --ckpt "$RUNS/full/best" --data "$SST2/dev.tsv" --json > "$RUNS/full-dev.json"
llmctl eval --ckpt "$RUNS/lora/best" --data "$SST2/dev.tsv" --json > "$RUNS/lora-dev.json"
end=$(date +%s)
python - "$RUNS" "$SEED" "$ROUTE" $((lm_done - start)) $((full_done - lm_done)) $((lora_done - full_done)) $((end - start)) <<'PY'
import json, math, os, sys
from safetensors import safe_open
runs, seed, route, (lm, full, lora, total) = sys.argv[1], int(sys.argv[2]), sys.argv[3], map(int, sys.argv[4:])

def numel(path):
    with safe_open(path, "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())

full_dir, lora_dir = (f"{runs}/{x}/" + open(f"{runs}/{x}/best").read().strip() for x in ("full", "lora"))  # RUN/best names it
base = numel(f"{full_dir}/model.safetensors")
adapter, head = numel(f"{lora_dir}/adapter.safetensors"), numel(f"{lora_dir}/head.safetensors")
lora_info = {"trainable_parameters": adapter + head, "model_parameters": base + adapter + head,
             "trainable_fraction": round((adapter + head) / (base + adapter + head), 4),
             "adapter_bytes": os.path.getsize(f"{lora_dir}/adapter.safetensors"),
             "full_model_bytes": os.path.getsize(f"{full_dir}/model.safetensors")}
lora_info["adapter_size_fraction"] = round(lora_info["adapter_bytes"] / lora_info["full_model_bytes"], 4)
rows = {"full finetune": json.load(open(f"{runs}/full-dev.json")), "LoRA": json.load(open(f"{runs}/lora-dev.json"))}
print(f"\nSST-2 dev ({rows['LoRA']['examples']} sentences), {route} route, seed {seed}: pretrain {lm}s, full finetune {full}s, LoRA {lora}s, total {total}s")
print(f"{'method':15s} {'accuracy':>9s} {'macro F1':>9s} {'minutes (pretrain + finetune)':>30s}")
for (name, r), t in zip(rows.items(), (lm + full, lm + lora)):
    print(f"{name:15s} {r['accuracy']:>9.4f} {r['macro_f1']:>9.4f} {t / 60:>30.1f}")
print(f"LoRA: {lora_info['trainable_parameters']:,} trainable parameters ({100 * lora_info['trainable_fraction']:.1f}%), "
      f"adapter file {lora_info['adapter_bytes']:,} bytes ({100 * lora_info['adapter_size_fraction']:.1f}% of the full model's)")
summary = {name: {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"]} for name, r in rows.items()}
summary["seed"] = seed
summary["route"] = route
summary["seconds"] = {"pretrain": lm, "full": full, "lora": lora, "total": total}
summary["lora"] = lora_info
json.dump(summary, open(f"{runs}/summary.json", "w"), indent=2)
PY
