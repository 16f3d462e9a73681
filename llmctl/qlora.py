"""QLoRA: the frozen base weights of the linear layers that LoRA adapters wrap (llmctl.lora), stored as 4-bit
NormalFloat (NF4) with double-quantized block scalers, through torchao's `NF4Tensor` (the optional `qlora` extra).

torchao rather than bitsandbytes: its NF4 is a pure-PyTorch tensor subclass that runs on the CPU as on CUDA (so it
is tested here), and it is maintained by the PyTorch team (torchtune's QLoRA uses it). A weight is quantized in
blocks of 64 values, and the blocks' scalers again in blocks of 256, so a weight qualifies when its size is a
multiple of 64 x 256; a layer that does not keeps its weight in full precision.

Only training holds NF4 weights (`quantize_base`); a checkpoint holds the adapter alone and references its base in
full precision, like a LoRA run's. Loading such an adapter (`round_trip_base`) gives each quantized layer the weight
the adapter was trained against, dequant(NF4(W)), as a plain tensor: inference, evaluation and a merged export
(`export --merge-lora`: W' = dequant(NF4(W)) + scale * B A) compute what the trained model computed.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

import torch
import torch.nn as nn

from .errors import LlmctlError
from .lora import LoRALinear

BLOCK, SCALER_BLOCK = 64, 256  # torchao's defaults, the QLoRA paper's


def _torchao() -> ModuleType:
    """torchao's quantization module (which holds `to_nf4`), or the error that names the extra."""
    quiet = logging.getLogger("torchao")  # its import warns about CUDA kernels (fp8, cutlass) NF4 does not use
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        importlib.import_module("torchao")
        return importlib.import_module("torchao.quantization")
    except ImportError:
        raise LlmctlError("finetune.method=qlora stores the base weights in NF4 through torchao, which is not "
                          "installed; install the extra (pip install 'llmctl[qlora]') or use finetune.method=lora"
                          ) from None
    finally:
        quiet.setLevel(level)


def quantizable(weight: torch.Tensor) -> bool:
    """Whether torchao's NF4 takes this weight (blocks of 64 values, their scalers in blocks of 256)."""
    return weight.dim() == 2 and weight.numel() % (BLOCK * SCALER_BLOCK) == 0


def _layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """The adapted linear layers whose base weight NF4 takes; none is an error that says why."""
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    layers = [(n, m) for n, m in wrapped if quantizable(m.weight)]
    if not layers:
        raise LlmctlError(
            f"finetune.method=qlora: none of the {len(wrapped)} adapted linear layers has a weight NF4 can store "
            f"(its size must be a multiple of {BLOCK} x {SCALER_BLOCK} = {BLOCK * SCALER_BLOCK} values, e.g. "
            "model.n_embd a multiple of 128); use finetune.method=lora for this model")
    return layers


def quantize_base(model: nn.Module) -> list[str]:
    """Replace the frozen base weight of every adapted linear layer NF4 takes by its NF4 form (in place);
    the adapters stay in their precision. Returns the quantized layers' names."""
    ao = _torchao()
    names = []
    for name, layer in _layers(model):
        layer.weight = nn.Parameter(ao.to_nf4(layer.weight.detach().contiguous(), BLOCK, SCALER_BLOCK),
                                    requires_grad=False)
        names.append(name)
    return names


@torch.no_grad()
def round_trip_base(model: nn.Module) -> None:
    """Give every adapted linear layer NF4 takes the weight a QLoRA run trained against: dequant(NF4(W)), kept as a
    plain tensor in W's dtype (in place)."""
    ao = _torchao()
    for _, layer in _layers(model):
        w = layer.weight
        layer.weight.copy_(ao.to_nf4(w.detach().contiguous(), BLOCK, SCALER_BLOCK).get_original_weight().to(w.dtype))


def is_nf4(t: torch.Tensor) -> bool:
    """Whether `t` is an NF4 weight, or FSDP2's shard of one (without importing torchao when it is not in use)."""
    return type(getattr(t, "_local_tensor", t)).__name__ == "NF4Tensor"


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds: an NF4 weight's 4-bit codes, block scalers and factors (about 0.52 a value); any other
    tensor numel x element size. (The memory estimate's rules for NF4: this and `dequant_bytes`.)"""
    if not is_nf4(t):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in names)


def dequant_bytes(t: torch.Tensor) -> int:
    """Peak bytes torchao allocates while it dequantizes NF4 weight `t` (0 for any other tensor): every matmul
    through it, forward, backward and a checkpointed block's recompute, calls `NF4Tensor.get_original_weight`,
    which holds at once, per value, both halves' 4-bit codes as int64 indices (8 bytes) and, in the weight's dtype
    (e bytes), the looked-up levels and the levels times their block scalers (2e over both halves) and the stacked
    result (e): 8 + 3e, 20 bytes a value for a float32 weight, 14 for bfloat16 (as measured: the peak resident
    growth of one NF4 linear's forward and of its backward). An FSDP shard counts whole: it is gathered first."""
    return t.numel() * (8 + 3 * t.dtype.itemsize) if is_nf4(t) else 0


def check_shardable(model: nn.Module, ranks: int) -> None:
    """FSDP2 shards an NF4 weight by splitting its codes, block scalers and their factors into `ranks` equal
    pieces (torchao's split: no padding), so each weight needs rows and scaler blocks (64 x 256 values) that divide
    by the ranks; the first weight that does not is an error naming it and the alternative."""
    for name, p in model.named_parameters():
        if not is_nf4(p):
            continue
        blocks = p.numel() // (BLOCK * SCALER_BLOCK)
        if blocks % ranks or p.shape[0] % ranks:
            raise LlmctlError(
                f"train.parallel=fsdp shards each NF4 weight over the {ranks} ranks in whole blocks of {BLOCK} x "
                f"{SCALER_BLOCK} values, but {name} {tuple(p.shape)} has {blocks}; use train.parallel=ddp for this "
                "model (or fewer ranks)")

