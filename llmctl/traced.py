"""Traced decode steps: the eager decode step of one busy row, recorded with `torch.jit.trace` once per cache span,
so later steps run the same kernels without Python in between.

Why: at batch 1 on a CPU, Python and operator dispatch take about a third of a GPT-2-124M decode step (int8: 32 ms
eager, 22 ms traced; float32: 68 and 50 ms; docs/serving.md#vs-llamacpps-server). AOTInductor (llmctl.aot) removes
that too, but it cannot take the CPU's dynamic int8 linears (fbgemm's packed weights do not export) and takes a
minute to build; a trace takes about a second and calls the very kernels of the eager step. With several rows the
matmuls dominate and the engine decodes eagerly.

A trace holds what it saw as constants: the row count (1), the cache span it reads (`span`: the positions 0..span-1
of the slot) and the shapes. A job (`infer`) traces one span, its whole cache, on first use (its cache is as long as
the job needs, or the next power of two with compiled steps on); a server traces at start (`prepare`) a span for
every power of two from 64 up to its cache length and runs each step with the smallest that covers the row, since
its slots hold a full context whose keys and values a short row should not read. Each trace is
checked on its first call against the eager step on the same inputs (both write the same keys and values into the
cache): a trace whose logits differ is dropped and that span stays eager, and so does every span when this torch
cannot trace at all.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn

from .model import KVCache, Transformer

MIN_SPAN = 64  # the shortest cache span traced: below it a step's attention costs little either way


class _Step(nn.Module):
    """One decode step of one row over the first `span` positions of its cache, the cache tensors as inputs."""

    def __init__(self, model: Transformer, span: int):
        super().__init__()
        self.model, self.span = model, span

    def forward(self, tok, pos, *caches):
        # tok (1, 1), pos (1,), caches k0, v0, k1, v1, ... each (1, nkv, L, hd), written in place
        return self.model(tok, cache=KVCache.of(list(caches)), pos=pos, kv_len=self.span)[:, -1]  # (1, V)


def span_for(needed: int, length: int) -> int:
    """The traced span covering `needed` positions of a slot of `length`: a power of two from MIN_SPAN, at most
    `length`."""
    return min(length, max(MIN_SPAN, 1 << (max(needed, 1) - 1).bit_length()))


class TracedSteps:
    """The traced one-row decode steps of one model, by cache span; built and checked on first use."""

    def __init__(self, model: Transformer):
        self.model = model
        self._steps: dict[tuple[int, int], torch.jit.ScriptModule] = {}  # (span, cache length) -> trace
        self._bad: set[tuple[int, int]] = set()  # spans that stay eager
        self.by_span = False  # one trace per power-of-two span (after `prepare`), else one per cache length
        self.built = 0  # traces made (tests read it)

    def __call__(self, tok: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> Optional[torch.Tensor]:
        """Logits (1, V) of the row in slot 0 after `tok` (1, 1) at `pos` (1,), its keys and values written to the
        cache; None where no trace serves (the caller decodes eagerly)."""
        key = (span_for(int(pos[0]) + 1, cache.length) if self.by_span else cache.length, cache.length)
        if key in self._bad:
            return None
        caches = [t[:1] for t in cache.flat()]  # slot 0's positions: a contiguous view
        step = self._steps.get(key)
        if step is not None:
            return step(tok, pos, *caches)
        step = self._trace(key[0], caches)
        if step is None:
            self._bad.add(key)
            return None
        logits = step(tok, pos, *caches)
        eager = self.model(tok, cache=KVCache.of(caches), pos=pos, kv_len=key[0])[:, -1]  # (writes the same)
        if not torch.allclose(logits.float(), eager.float(), rtol=1e-4, atol=1e-4):
            self._bad.add(key)
            return eager
        self._steps[key] = step
        return logits

    def prepare(self, cache: KVCache) -> None:
        """Trace (and check) every span of `cache`'s slots now rather than on first use: a server does this at start,
        so no request waits a second for a trace. Writes into slot 0, which the next prefill there overwrites."""
        device = cache.layers[0][0].device
        self.by_span, span = True, MIN_SPAN
        with torch.inference_mode():
            while True:
                span = min(span, cache.length)
                self(torch.zeros(1, 1, dtype=torch.long, device=device), torch.tensor([span - 1], device=device), cache)
                if span == cache.length:
                    return
                span *= 2

    def _trace(self, span: int, caches: list[torch.Tensor]) -> Optional[torch.jit.ScriptModule]:
        device = caches[0].device
        try:
            with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (the tracer's notes on Python values it holds constant)
                like = [torch.zeros(t.shape, dtype=t.dtype, device=device) for t in caches]  # (not inference tensors)
                tok = torch.zeros(1, 1, dtype=torch.long, device=device)
                pos = torch.zeros(1, dtype=torch.long, device=device)
                step = torch.jit.trace(_Step(self.model, span).eval(), (tok, pos, *like), check_trace=False)
                step = torch.jit.freeze(step)
        except Exception:  # a torch without TorchScript, or an operator it cannot record: decode eagerly
            return None
        self.built += 1
        return step
