"""Language-modelling batches from a token sequence: random training blocks and evaluation blocks that cover it.

torch is imported inside the functions that make tensors, so `llmctl prepare` (which imports this package) starts
without it.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np

from ..errors import LlmctlError


class LMBatches:
    """Random contiguous blocks for language modelling, a pure function of (seed, step, micro-step, rank).

    Each optimizer step draws one global batch of `batch_size * grad_accum * world_size` block offsets from
    `numpy.random.default_rng([seed, step])`; a rank takes its own slice. The data a run sees therefore does not
    depend on the world size, and resuming at step k needs nothing but k.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, grad_accum: int, seed: int,
                 rank: int = 0, world_size: int = 1, labels: Optional[np.ndarray] = None):
        if len(tokens) < block_size + 2:
            raise LlmctlError(
                f"the training split has {len(tokens)} tokens, fewer than one block of "
                f"model.block_size={block_size} + 1; "
                "use more text or a smaller model.block_size"
            )
        self.tokens, self.T, self.B, self.accum = tokens, block_size, batch_size, grad_accum
        self.seed, self.rank, self.world = seed, rank, world_size
        self.labels = labels  # per-token labels aligned with tokens (packed instruct data); None: the tokens

    def offsets(self, step: int) -> np.ndarray:
        """Block start offsets of the whole global batch for `step`: (grad_accum, world_size, batch_size)."""
        rng = np.random.default_rng([self.seed, step])
        n = self.accum * self.world * self.B
        return rng.integers(0, len(self.tokens) - self.T - 1, size=n).reshape(self.accum, self.world, self.B)

    def get(self, step: int) -> list[dict]:
        """The micro-batches of this rank for `step`, each {'input_ids': (B, T), 'labels': (B, T)}."""
        import torch  # (here, not at the top: `llmctl prepare` starts without torch)
        out = []
        for micro in self.offsets(step)[:, self.rank]:
            rows = np.stack([self.tokens[o : o + self.T + 1] for o in micro]).astype(np.int64)  # (B, T+1)
            t = torch.from_numpy(rows)
            labels = t[:, 1:]
            if self.labels is not None:
                labels = torch.from_numpy(
                    np.stack([self.labels[o + 1 : o + self.T + 1] for o in micro]).astype(np.int64))
            out.append({"input_ids": t[:, :-1], "labels": labels})
        return out


def eval_blocks(tokens: np.ndarray, block_size: int, batch_size: int,
                max_batches: Optional[int] = None) -> Iterator[dict]:
    """Non-overlapping blocks covering every token once (the last, shorter block included).

    Yields {'input_ids': (b, t), 'labels': (b, t)}; every token but the first is predicted exactly once.
    With `max_batches`, an evenly spaced subset of the full blocks is used (a cheaper estimate).
    """
    import torch  # (here, not at the top: `llmctl prepare` starts without torch)
    n = len(tokens) - 1  # number of predictions
    if n < 1:
        return
    n_full = n // block_size
    starts = np.arange(n_full) * block_size
    if max_batches is not None and n_full > max_batches * batch_size:
        starts = starts[np.linspace(0, n_full - 1, max_batches * batch_size).round().astype(np.int64)]
        tail = False
    else:
        tail = n % block_size > 0
    for i in range(0, len(starts), batch_size):
        rows = np.stack([tokens[s : s + block_size + 1] for s in starts[i : i + batch_size]]).astype(np.int64)
        t = torch.from_numpy(rows)
        yield {"input_ids": t[:, :-1], "labels": t[:, 1:]}
    if tail:
        rest = torch.from_numpy(np.asarray(tokens[n_full * block_size :]).astype(np.int64))[None]
        yield {"input_ids": rest[:, :-1], "labels": rest[:, 1:]}
