"""Traced decode steps: the eager decode step of one busy row, recorded once with `torch.jit.trace`, so later steps
run the same kernels without Python in between.

Why: at batch 1 on a CPU, Python and operator dispatch take about a third of a GPT-2-124M decode step (int8: 32 ms
eager, 20 ms traced; float32: 68 and 50 ms; docs/inference.md#the-compiled-decode-step). AOTInductor (llmctl.aot)
removes that too, but it cannot take the CPU's dynamic int8 linears (fbgemm's packed weights do not export), takes
a minute to build, and its static shapes read the whole cache at every step; a trace takes about a second, calls
the very kernels of the eager step and reads the keys and values of the row's own positions only: the number of
positions read (`pos + 1`) is computed inside the trace, so one trace serves every position of a cache.

A trace holds the rest of what it saw as constants: one row (slot 0), one token, and the cache's shapes; so there
is one per cache length. It is checked on its first call against the eager step on the same inputs (both write the
same keys and values into the cache): a trace whose logits differ is dropped and the steps stay eager, as they do
when this torch cannot trace at all (TorchScript is deprecated upstream; torch.compile's dynamo cannot take the
int8 linears either).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn

from .model import KVCache, Transformer


class _Step(nn.Module):
    """One decode step of one row, the cache tensors as inputs."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tok, pos, *caches):
        # tok (1, 1), pos (1,), caches k0, v0, k1, v1, ... each (1, nkv, L, hd), written in place; kv_len a tensor,
        # so the positions read follow pos in the trace
        return self.model(tok, cache=KVCache.of(list(caches)), pos=pos, kv_len=pos.max() + 1)[:, -1]  # (1, V)


class TracedSteps:
    """The traced one-row decode steps of one model, by cache length; made and checked on first use."""

    def __init__(self, model: Transformer):
        self.model = model
        self._steps: dict[int, torch.jit.ScriptModule] = {}  # cache length -> trace
        self._bad: set[int] = set()  # cache lengths whose steps stay eager
        self.built = 0  # traces made (tests read it)

    def __call__(self, tok: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> Optional[torch.Tensor]:
        """Logits (1, V) of the row in slot 0 after `tok` (1, 1) at `pos` (1,), its keys and values written to the
        cache; None where no trace serves (the caller decodes eagerly)."""
        if cache.length in self._bad:
            return None
        caches = [t[:1] for t in cache.flat()]  # slot 0's positions: a contiguous view
        step = self._steps.get(cache.length)
        if step is not None:
            return step(tok, pos, *caches)
        step = self._trace(caches)
        if step is None:
            self._bad.add(cache.length)
            return None
        logits = step(tok, pos, *caches)
        eager = self.model(tok, cache=KVCache.of(caches), pos=pos, kv_len=int(pos[0]) + 1)[:, -1]  # (writes the same)
        if not torch.allclose(logits.float(), eager.float(), rtol=1e-4, atol=1e-4):
            self._bad.add(cache.length)
            return eager
        self._steps[cache.length] = step
        return logits

    def prepare(self, cache: KVCache) -> None:
        """Make (and check) the trace for `cache` now rather than on first use: a server does this at start, so no
        request waits for it. Writes into slot 0 at position 0, which the next prefill there overwrites."""
        device = cache.layers[0][0].device
        with torch.inference_mode():
            self(torch.zeros(1, 1, dtype=torch.long, device=device), torch.zeros(1, dtype=torch.long, device=device),
                 cache)

    def _trace(self, caches: list[torch.Tensor]) -> Optional[torch.jit.ScriptModule]:
        device = caches[0].device
        try:
            with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (the tracer's notes on the Python values it holds constant)
                like = [torch.zeros(t.shape, dtype=t.dtype, device=device) for t in caches]  # (not inference tensors)
                tok = torch.zeros(1, 1, dtype=torch.long, device=device)
                pos = torch.full((1,), min(100, caches[0].shape[2] - 1), dtype=torch.long, device=device)
                step = torch.jit.trace(_Step(self.model).eval(), (tok, pos, *like), check_trace=False)
                step = torch.jit.freeze(step)
        except Exception:  # a torch without TorchScript, or an operator it cannot record: decode eagerly
            return None
        self.built += 1
        return step
