#!/usr/bin/env bash
# Pretrain on every GPU of this machine: one process per GPU under torchrun, DDP (or FSDP2 with
# --set train.parallel=fsdp). Everything after the config goes to `llmctl pretrain`.
#
#   scripts/pretrain-multi-gpu.sh configs/gpt2-small.yaml --set data.path=corpus.txt --out runs/gpt2-small
#   NPROC=4 scripts/pretrain-multi-gpu.sh configs/llama-small.yaml --set train.parallel=fsdp
#
# NPROC: processes (default: the number of GPUs nvidia-smi lists). The config's train.batch_size is per GPU;
# set train.global_batch_size to keep the same global batch whatever the number of GPUs.
set -euo pipefail
if command -v torchrun >/dev/null; then torchrun=(torchrun); else torchrun=("${PYTHON:-python}" -m torch.distributed.run); fi
config=${1:?usage: $0 CONFIG [llmctl pretrain options...]}
shift
nproc=${NPROC:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
if [ "${nproc:-0}" -lt 1 ]; then
  echo "no GPU found (nvidia-smi -L); set NPROC=N, or use scripts/ci-smoke-distributed.sh for CPU processes" >&2
  exit 2
fi
# torchrun sets OMP_NUM_THREADS=1 per process unless it is set; data loading here is light, so that is right
exec "${torchrun[@]}" --standalone --nproc_per_node="$nproc" -m llmctl pretrain -c "$config" "$@"
