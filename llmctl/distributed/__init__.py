"""Scaling out with PyTorch's own engine: torchrun detection, DDP / FSDP2 / tensor-parallel wrapping, rank-0 output.

`llmctl pretrain` and `finetune` run unchanged in one process; under `torchrun` they join a process group (nccl on
CUDA, gloo on CPU) and wrap the model in DistributedDataParallel, shard it with FSDP2's `fully_shard`, split its
layers with tensor parallelism, or both on a 2-D mesh (`train.parallel`: ddp, fsdp, tp, fsdp_tp). Whatever the
world size, the data (`LMBatches` draws each step's global batch from the seed; every rank takes its slice), the
loss, the validation loss and the checkpoint (one format, written by rank 0) are those of one process.

One job per module, each importing only those above it in this list (never one below, so no cycles):
  launch            where this process stands (`DistContext`), the process group, failures of other ranks
  tensor_parallel   Megatron's layout of a block over a tensor-parallel group
  parallelize       the settings checked against the launch; the model wrapped and unwrapped
  collectives       the training loop's hooks, agreeing on a stop signal, evaluation shared over the ranks
  state             the checkpoint's full state gathered and loaded; each rank's random stream
  output            rank 0 speaks, the others are silent; throughput per device
This file hands on the names the rest of llmctl uses.
"""

from .collectives import agree_all, loop_hooks, polled, sharded_lm_metrics
from .launch import DistContext, finish, init, launch_prefix, local_rank0_first, peer_errors
from .output import Discard, discard, per_device_events, per_device_metrics, rank0_only, speaks
from .parallelize import check, check_layout, checkpoint_blocks, inherited_layout, unwrap, wrap_model
from .state import gather_for_save, load_optimizer_state, restore_rng

__all__ = [
    "DistContext", "Discard", "agree_all", "check", "check_layout", "checkpoint_blocks", "discard", "finish",
    "gather_for_save", "inherited_layout", "init", "launch_prefix", "load_optimizer_state", "local_rank0_first",
    "loop_hooks", "peer_errors", "per_device_events", "per_device_metrics", "polled", "rank0_only", "restore_rng",
    "sharded_lm_metrics", "speaks", "unwrap", "wrap_model",
]
