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

    With `starts` (document starts, `Tokens.doc_starts`) rows pack whole documents: an offset moves back to the
    start of its document (its <eos>, which then begins the row as a BOS would) when that lies within one block, and
    each micro-batch carries 'segments' (B, T), the document of every input token (see `segments`).
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, grad_accum: int, seed: int,
                 rank: int = 0, world_size: int = 1, labels: Optional[np.ndarray] = None,
                 starts: Optional[np.ndarray] = None):
        if len(tokens) < block_size + 2:
            raise LlmctlError(
                f"the training split has {len(tokens)} tokens, fewer than one block of "
                f"model.block_size={block_size} + 1; "
                "use more text or a smaller model.block_size"
            )
        self.tokens, self.T, self.B, self.accum = tokens, block_size, batch_size, grad_accum
        self.seed, self.rank, self.world = seed, rank, world_size
        self.labels = labels  # per-token labels aligned with tokens (packed instruct data); None: the tokens
        self.starts = starts

    def offsets(self, step: int) -> np.ndarray:
        """Block start offsets of the whole global batch for `step`: (grad_accum, world_size, batch_size)."""
        rng = np.random.default_rng([self.seed, step])
        n = self.accum * self.world * self.B
        offsets = rng.integers(0, len(self.tokens) - self.T - 1, size=n)
        if self.starts is not None:  # back to the document's start, unless a long document holds it a block on
            doc = self.starts[np.searchsorted(self.starts, offsets, side="right") - 1]
            offsets = np.where(offsets - doc <= self.T, doc, offsets)
        return offsets.reshape(self.accum, self.world, self.B)

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
            if self.starts is not None:
                out[-1]["segments"] = torch.from_numpy(segments(self.starts, micro, self.T))
        return out


def segments(starts: np.ndarray, offsets: np.ndarray, T: int) -> np.ndarray:
    """(B, T) int64 document ids of the rows of T input tokens at `offsets` (B,): 0 from each row's first token,
    one more at each document start inside the row. `starts`: document starts, ascending."""
    out = np.zeros((len(offsets), T), dtype=np.int64)
    for b, o in enumerate(offsets):
        inside = starts[np.searchsorted(starts, o, side="right"): np.searchsorted(starts, o + T, side="left")]
        out[b, inside - o] = 1
    return out.cumsum(axis=1)


def eval_blocks(tokens: np.ndarray, block_size: int, batch_size: int,
                max_batches: Optional[int] = None, starts: Optional[np.ndarray] = None) -> Iterator[dict]:
    """Non-overlapping blocks covering every token once (the last, shorter block included).

    Yields {'input_ids': (b, t), 'labels': (b, t)}; every token but the first is predicted exactly once.
    With `max_batches`, an evenly spaced subset of the full blocks is used (a cheaper estimate). With `starts`
    (document starts) each batch also carries 'segments' (b, t), as `LMBatches` does.
    """
    import torch  # (here, not at the top: `llmctl prepare` starts without torch)
    n = len(tokens) - 1  # number of predictions
    if n < 1:
        return
    n_full = n // block_size
    firsts = np.arange(n_full) * block_size  # each block's first token
    if max_batches is not None and n_full > max_batches * batch_size:
        firsts = firsts[np.linspace(0, n_full - 1, max_batches * batch_size).round().astype(np.int64)]
        tail = False
    else:
        tail = n % block_size > 0
    for i in range(0, len(firsts), batch_size):
        rows = np.stack([tokens[s : s + block_size + 1] for s in firsts[i : i + batch_size]]).astype(np.int64)
        t = torch.from_numpy(rows)
        yield _with_segments({"input_ids": t[:, :-1], "labels": t[:, 1:]}, starts, firsts[i : i + batch_size])
    if tail:
        last = n_full * block_size
        rest = torch.from_numpy(np.asarray(tokens[last:]).astype(np.int64))[None]
        yield _with_segments({"input_ids": rest[:, :-1], "labels": rest[:, 1:]}, starts, np.array([last]))


def _with_segments(batch: dict, starts: Optional[np.ndarray], offsets: np.ndarray) -> dict:
    import torch

    if starts is not None:
        batch["segments"] = torch.from_numpy(segments(starts, offsets, batch["input_ids"].shape[1]))
    return batch
