#!/usr/bin/env bash
# Pretrain on several machines: run this same command on every node, changing only NODE_RANK.
#
#   MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NNODES=2 NODE_RANK=0 scripts/pretrain-multi-node.sh configs/llama-small.yaml \
#       --set data.path=/shared/corpus.txt --out /shared/runs/llama-small
#   (and NODE_RANK=1 on the second node)
#
# MASTER_ADDR / MASTER_PORT: an address of node 0 that every node can reach, and a free port on it.
# NNODES: number of machines; NODE_RANK: this machine's index (0 .. NNODES-1).
# NPROC_PER_NODE: processes per machine (default: its GPU count).
# --out (and --resume-from, --from) must be on a filesystem every node sees: rank 0 alone writes the run
# directory, but every rank reads the checkpoint it resumes or finetunes from. The token cache (data.cache_dir)
# may be shared or per node; data.path must be readable on every node.
# See docs/pretraining.md#nccl-settings for NCCL settings (NCCL_SOCKET_IFNAME, NCCL_DEBUG) and train.dist_timeout.
set -euo pipefail
if command -v torchrun >/dev/null; then torchrun=(torchrun); else torchrun=("${PYTHON:-python}" -m torch.distributed.run); fi
config=${1:?usage: MASTER_ADDR=.. MASTER_PORT=.. NNODES=.. NODE_RANK=.. $0 CONFIG [llmctl pretrain options...]}
shift
: "${MASTER_ADDR:?set MASTER_ADDR to node 0's address}"
: "${MASTER_PORT:=29500}"
: "${NNODES:?set NNODES to the number of machines}"
: "${NODE_RANK:?set NODE_RANK to this machine's index, 0 .. NNODES-1}"
nproc=${NPROC_PER_NODE:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
if [ "${nproc:-0}" -lt 1 ]; then
  echo "no GPU found (nvidia-smi -L); set NPROC_PER_NODE=N" >&2
  exit 2
fi
exec "${torchrun[@]}" --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$nproc" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
  -m llmctl pretrain -c "$config" "$@"
