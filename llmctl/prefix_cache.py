"""Prefix caching: the keys and values of prompt prefixes kept in fixed-size token blocks after their prefill, so a
prompt that starts with text the engine has already prefilled (a shared system prompt, few-shot examples, the
history a chat client resends every turn) prefills only the rest.

A copy-in block store, not a paged KV cache: a slot's cache stays one contiguous run of positions (what the compiled
decode step reads), and a hit copies the cached blocks' keys and values into the joining row's slot before its
prefill (`restore`); after a prompt's prefill its full blocks are copied out of the slot into the store (`store`).
Each block is `block` prompt tokens and their keys and values in every layer, (n_layer, 2, n_kv_head, block,
head_dim), addressed by a chain: the key of a block is (the id of the block before it, 0 for the first; its own
token ids), so a block is found only after every block before it, and a dict lookup of that exact key cannot
confuse two prefixes (no hash collisions to guard against). Ids are never reused, so a block whose parent was
evicted cannot be reached by a new one.

The store holds at most `budget` bytes of blocks and evicts the least recently used first. A lookup or store
touches a prompt's chain from its last block to its first, so a block is always more recently used than the blocks
after it: eviction takes the ends of chains first (a shared system prompt outlives the conversations behind it).

Keys and values at positions 0..p depend only on tokens 0..p (causal attention; a sliding-window layer stores every
position too and only reads fewer), so restored blocks are what a prefill of the whole prompt writes there: in
float32 a row's tokens are the same with the cache on or off (up to the rounding of a shorter matmul). Not under
CPU dynamic int8, whose activation scale is one per input tensor: a stored block's values then also depend on the
rest of the prompt that stored it and on the prompts prefilled in the same forward (docs/serving.md says so;
decoding under int8 mixes rows the same way). The engine decides which prefills use the store
(`Engine._prefill_many`). The blocks hold for one model's weights: whoever changes
them (nothing in `serve` does) must `clear` the store.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch

from .model import KVCache

BLOCK = 16  # tokens per cached block


@dataclass(eq=False)
class _Block:
    key: tuple  # (the id of the block before it, or 0; its token ids)
    id: int
    kv: torch.Tensor  # (n_layer, 2, n_kv_head, block, head_dim)


class PrefixCache:
    """Blocks of prompt prefixes and their keys and values, least recently used evicted past `budget` bytes.

    Counters for /metrics: `lookups` (prefills that looked), `hits` (those that found at least one block),
    `lookup_tokens` and `hit_tokens` (prompt tokens looked up, and restored instead of computed), `evictions`
    (blocks evicted); `blocks` and `bytes` are what is held now. Used from one thread (the engine's); others may read
    the counters."""

    def __init__(self, budget: int, block: int = BLOCK):
        if block < 1:
            raise ValueError(f"a prefix block must hold at least one token (got {block})")
        self.budget, self.block = budget, block
        self._blocks: OrderedDict[tuple, _Block] = OrderedDict()  # least recently used first
        self._next_id = 1  # 0 is the parent of a first block
        self._shape: Optional[tuple] = None  # (dtype, device, per-token shape) of the cache the blocks came from
        self.bytes = 0
        self.lookups = self.hits = self.lookup_tokens = self.hit_tokens = self.evictions = 0

    @property
    def blocks(self) -> int:
        return len(self._blocks)

    def clear(self) -> None:
        self._blocks.clear()
        self.bytes = 0

    def restore(self, cache: KVCache, slot: int, tokens: list[int]) -> int:
        """Copy the longest chain of cached blocks that `tokens` (a prompt from position 0) starts with into `slot`
        of `cache`, leaving at least its last token to compute (its logits are the row's first pick). Returns the
        number of positions restored (a multiple of `block`, 0 on a miss)."""
        self._match(cache)
        self.lookups += 1
        self.lookup_tokens += len(tokens)
        chain = self._chain(tokens, (len(tokens) - 1) // self.block)
        if not chain:
            return 0
        self._touch(chain)
        n = len(chain) * self.block
        for j, b in enumerate(chain):  # block by block: no transient copy of the whole chain outside the budget
            t = j * self.block
            for i, (k, v) in enumerate(cache.layers):
                k[slot, :, t : t + self.block] = b.kv[i, 0]
                v[slot, :, t : t + self.block] = b.kv[i, 1]
        self.hits += 1
        self.hit_tokens += n
        return n

    def cached(self, tokens: list[int]) -> int:
        """How many positions `restore` would copy for `tokens` now (nothing copied, touched or counted)."""
        return len(self._chain(tokens, (len(tokens) - 1) // self.block)) * self.block

    def store(self, cache: KVCache, slot: int, tokens: list[int]) -> None:
        """Keep the full blocks of `tokens`, a prompt just prefilled into `slot` of `cache` from position 0 (those
        already held are only touched), as many as the budget holds, evicting the least recently used."""
        self._match(cache)
        size = self._block_bytes(cache)
        room = self.budget // size  # blocks the budget holds
        want = min(len(tokens) // self.block, room)
        chain = self._chain(tokens, want)
        self._touch(chain)  # (now the newest: eviction below takes other blocks first)
        while self._blocks and self.bytes + (want - len(chain)) * size > self.budget:
            self._evict()
        if want == len(chain):
            return
        parent = chain[-1].id if chain else 0
        try:
            for t in range(len(chain) * self.block, want * self.block, self.block):
                # each block its own copy (an evicted one frees its memory), made by stack: (L, 2, H, block, D)
                kv = torch.stack([torch.stack((k[slot, :, t : t + self.block], v[slot, :, t : t + self.block]))
                                  for k, v in cache.layers])
                b = _Block((parent, tuple(tokens[t : t + self.block])), self._next_id, kv)
                self._next_id += 1
                self._blocks[b.key] = b
                self.bytes += size
                chain.append(b)
                parent = b.id
        finally:  # (even after a failed copy: a block stays more recently used than those after it)
            self._touch(chain)

    # -- inside --------------------------------------------------------------------------------------------------
    def _chain(self, tokens: list[int], most: int) -> list[_Block]:
        """The cached blocks `tokens` starts with, up to `most` of them."""
        found: list[_Block] = []
        parent = 0
        for i in range(most):
            b = self._blocks.get((parent, tuple(tokens[i * self.block : (i + 1) * self.block])))
            if b is None:
                break
            found.append(b)
            parent = b.id
        return found

    def _touch(self, chain: list[_Block]) -> None:
        """Mark a chain used, its last block first, so each block stays newer than the blocks after it."""
        for b in reversed(chain):
            self._blocks.move_to_end(b.key)

    def _evict(self) -> None:
        _, b = self._blocks.popitem(last=False)
        self.bytes -= b.kv.numel() * b.kv.element_size()
        self.evictions += 1

    def _block_bytes(self, cache: KVCache) -> int:
        k = cache.layers[0][0]
        return 2 * len(cache.layers) * k.shape[1] * self.block * k.shape[3] * k.element_size()

    def _match(self, cache: KVCache) -> None:
        """Drop every block when the cache's dtype, device or shape per token changed (another precision)."""
        k = cache.layers[0][0]
        shape = (k.dtype, k.device, len(cache.layers), k.shape[1], k.shape[3])
        if shape != self._shape:
            self.clear()
            self._shape = shape
