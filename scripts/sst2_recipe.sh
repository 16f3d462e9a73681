#!/usr/bin/env bash
# SST-2 sentiment recipe, on one machine, no download:
#   1. pretrain a small LLaMA language model on the SST-2 training sentences (text only)   configs/sst2-lm.yaml
#   2. finetune it as a classifier, fully                                                     configs/sst2-classify.yaml
#   3. finetune it as a classifier with LoRA                                                  configs/sst2-classify-lora.yaml
#   4. report accuracy, macro F1 and wall time on dev.tsv (never used for training or model selection)
# Usage: scripts/sst2_recipe.sh [SST2_DIR] [RUNS_DIR]      (defaults: ../shared/data/sst2 runs/sst2)
set -euo pipefail
SST2=${1:-../shared/data/sst2}
RUNS=${2:-runs/sst2}
mkdir -p "$RUNS"
start=$(date +%s)
llmctl pretrain -c configs/sst2-lm.yaml --set data.path="$SST2/train.tsv" --out "$RUNS/lm" --overwrite
lm_done=$(date +%s)
llmctl finetune -c configs/sst2-classify.yaml --from "$RUNS/lm" --set data.path="$SST2/train.tsv" --out "$RUNS/full" --overwrite
full_done=$(date +%s)
llmctl finetune -c configs/sst2-classify-lora.yaml --from "$RUNS/lm" --set data.path="$SST2/train.tsv" --out "$RUNS/lora" --overwrite
lora_done=$(date +%s)
llmctl eval --ckpt "$RUNS/full/best" --data "$SST2/dev.tsv" --json > "$RUNS/full-dev.json"
llmctl eval --ckpt "$RUNS/lora/best" --data "$SST2/dev.tsv" --json > "$RUNS/lora-dev.json"
end=$(date +%s)
python - "$RUNS" $((lm_done - start)) $((full_done - lm_done)) $((lora_done - full_done)) $((end - start)) <<'PY'
import json, sys
runs, lm, full, lora, total = sys.argv[1], *map(int, sys.argv[2:])
rows = {"full finetune": json.load(open(f"{runs}/full-dev.json")), "LoRA": json.load(open(f"{runs}/lora-dev.json"))}
print(f"\nSST-2 dev ({rows['LoRA']['examples']} sentences)  pretrain {lm}s, full finetune {full}s, LoRA {lora}s, total {total}s")
print(f"{'method':15s} {'accuracy':>9s} {'macro F1':>9s}")
for name, r in rows.items():
    print(f"{name:15s} {r['accuracy']:>9.4f} {r['macro_f1']:>9.4f}")
summary = {name: {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"]} for name, r in rows.items()}
summary["seconds"] = {"pretrain": lm, "full": full, "lora": lora, "total": total}
json.dump(summary, open(f"{runs}/summary.json", "w"), indent=2)
PY
