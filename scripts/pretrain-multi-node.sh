#!/usr/bin/env bash
# Pretrain on several machines: run this same command on every node (one torchrun agent per node).
#
#   MASTER_ADDR=10.0.0.1 MASTER_PORT=29400 NNODES=2 scripts/pretrain-multi-node.sh configs/llama-small.yaml \
#       --set data.path=/shared/corpus.txt --out /shared/runs/llama-small
#
# The agents meet through torchrun's c10d rendezvous on MASTER_ADDR:MASTER_PORT (node 0's address, reachable
# from every node, and a free port on it); they number the nodes themselves, so no node rank is given.
# NNODES: number of machines. NPROC_PER_NODE: processes per machine (default: its GPU count).
# RDZV_ID: the job's name, the same on every node (default llmctl-$MASTER_PORT).
# --out (and --resume-from, --from) must be on a filesystem every node sees: rank 0 alone writes the run
# directory, but every rank reads the checkpoint it resumes or finetunes from. The token cache (data.cache_dir)
# may be shared or per node; data.path must be readable on every node.
# See docs/pretraining.md#nccl-settings for NCCL settings (NCCL_SOCKET_IFNAME, NCCL_DEBUG) and train.dist_timeout;
# scripts/pretrain-slurm.sbatch does the same under SLURM.
set -euo pipefail
if command -v torchrun >/dev/null; then torchrun=(torchrun); else torchrun=("${PYTHON:-python}" -m torch.distributed.run); fi
config=${1:?usage: MASTER_ADDR=.. MASTER_PORT=.. NNODES=.. $0 CONFIG [llmctl pretrain options...]}
shift
: "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"
: "${MASTER_PORT:=29400}"
: "${NNODES:?set NNODES to the number of machines}"
nproc=${NPROC_PER_NODE:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
if [ "${nproc:-0}" -lt 1 ]; then
  echo "no GPU found (nvidia-smi -L); set NPROC_PER_NODE=N" >&2
  exit 2
fi
exec "${torchrun[@]}" --nnodes "$NNODES" --nproc-per-node "$nproc" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-llmctl-$MASTER_PORT}" \
  -m llmctl pretrain -c "$config" "$@"
