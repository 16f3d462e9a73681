"""Inference-time weight formats (int8, and a transposed float32 layout), kept beside `model.py` so the
Transformer stays plain.

CPU: dynamic int8 through fbgemm (`torch.ao.quantization.quantize_dynamic`): int8 weights and per-batch int8
activations; the fastest CPU decode path for models whose weight reads dominate a step (100M-class), slower
than float32 on small ones (docs/results.md#inference-speed). CUDA: weight-only int8 with a per-output-channel
scale, dequantized into the activation dtype inside the matmul. float32 on a CPU: weights stored transposed for
decoding (InputMajorLinear).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import LlmctlError


class InputMajorLinear(nn.Module):
    """y = x W^T + b with W stored transposed, (in, out) contiguous.

    On a CPU, MKL runs the matrix-vector products of batch-1 decoding faster in float32 from this layout than
    from nn.Linear's (out, in) (docs/results.md#inference-speed); in bfloat16 oneDNN is faster from the usual layout, so
    this is used for float32 only.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)  # (in, out)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_t.t()  # (out, in) view, for readers of `.weight`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # exported for the compiled decode step: inductor packs the frozen weight itself, and does better from
            # nn.Linear's pattern
            return F.linear(x, self.weight_t.t(), self.bias)
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        y = torch.mm(x2, self.weight_t) if self.bias is None else torch.addmm(self.bias, x2, self.weight_t)
        return y.view(*x.shape[:-1], self.out_features)


def input_major(model: nn.Module) -> nn.Module:
    """Swap every nn.Linear for an InputMajorLinear (in place). An embedding tied to a swapped layer is re-pointed
    at a view of the transposed weight, so tied weights stay stored once."""
    names = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    for name in names:  # one layer at a time, so at most one extra weight is alive at once
        module = model.get_submodule(name)
        new = InputMajorLinear(module)
        for emb in model.modules():
            if isinstance(emb, nn.Embedding) and emb.weight is module.weight:
                emb.weight = nn.Parameter(new.weight_t.t(), requires_grad=False)  # (vocab, C) view, no copy
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        del module
    return model


def convert(model: nn.Module, dtype: str, quantize_mode: str) -> nn.Module:
    """The model in an inference precision: `dtype` float32 or bfloat16 weights, `quantize_mode` none or int8.
    float32 on a CPU also gets the transposed layout (InputMajorLinear), which exports as nn.Linear for a compiled
    decode step."""
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    model = quantize(model, quantize_mode)
    device = next(model.parameters()).device
    if dtype == "float32" and quantize_mode in (None, "none") and device.type == "cpu":
        model = input_major(model)
    return model


class Int8WeightOnlyLinear(nn.Module):
    """y = x (scale * W_int8)^T + b, with W quantized symmetrically per output channel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()  # (out, in)
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # (out,)
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_int8.to(x.dtype) * self.scale.to(x.dtype)[:, None]
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


def cpu_int8_available() -> bool:
    """Whether this torch build has fbgemm, the x86 engine behind dynamic int8 (ARM builds have only qnnpack)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def quantize(model: nn.Module, mode: str) -> nn.Module:
    """Return the model with its linear layers in int8 (`mode` = "int8"; "none" returns it unchanged)."""
    if mode in (None, "none"):
        return model
    if mode != "int8":
        raise LlmctlError(f"--quantize must be none or int8 (got {mode})")
    device = next(model.parameters()).device
    if device.type == "cpu":
        if not cpu_int8_available():
            raise LlmctlError("int8 on this CPU needs the fbgemm engine, which this torch build lacks; "
                              "use --quantize none")
        torch.backends.quantized.engine = "fbgemm"
        with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao; the API still works
            warnings.simplefilter("ignore")
            from torch.ao.quantization import quantize_dynamic

            return quantize_dynamic(model.float(), {nn.Linear}, dtype=torch.qint8)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, Int8WeightOnlyLinear(module))
    return model
