"""Prefix caching (llmctl.prefix_cache): greedy rows equal with the cache on and off under continuous batching
(staggered arrivals, shared prefixes, n rows of one prompt, prompt log-probabilities, a row that slides), eviction
under a tight budget, the chain's exactness and LRU order, and the /metrics counters."""

import random

import pytest
import torch

from llmctl.config.model import ModelConfig
from llmctl.generate import Engine, Request
from llmctl.metrics import Metrics, parse
from llmctl.model import KVCache, Transformer
from llmctl.prefix_cache import PrefixCache
from llmctl.sampling import Sampling

VOCAB = 24
CONTEXT = 96
MODELS = {"llama-sliding": ("llama", {"sliding_window": 8, "layer_types": ["full", "sliding"]}), "gpt2": ("gpt2", {})}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request) -> Transformer:
    arch, kw = MODELS[request.param]
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, n_layer=2, n_head=2, n_embd=32, block_size=CONTEXT, vocab_size=VOCAB, **kw)
    return Transformer(cfg).eval()


def chat_requests(n: int = 32, seed: int = 0) -> list[tuple[int, Request]]:
    """(arrival step, request): chats sharing a 21-token system prompt, each turn resending the earlier ones; some
    requests twice in one step (a request's n choices), some asking for prompt log-probabilities, one long enough
    to slide past the context."""
    rng = random.Random(seed)
    system = [rng.randrange(VOCAB) for _ in range(21)]
    chats = [[[rng.randrange(VOCAB) for _ in range(rng.randrange(3, 14))] for _ in range(4)] for _ in range(6)]
    out, step = [], 0
    for i in range(n):
        chat = chats[i % len(chats)]
        prompt = system + sum(chat[: 1 + (i // len(chats)) % 4], [])
        s = Sampling(max_new_tokens=rng.randrange(3, 12), temperature=0)
        req = Request(prompt, s, prompt_logprobs=i % 7 == 3, logprobs=0)
        step += rng.randrange(0, 3)
        out.append((step, req))
        if i % 5 == 0:
            out.append((step, req))  # the same request again, joining in the same step
    long = system + [rng.randrange(VOCAB) for _ in range(60)]
    out.append((step, Request(long, Sampling(max_new_tokens=CONTEXT - len(long) + 20, temperature=0), logprobs=0)))
    return out


def drive(model: Transformer, arrivals: list[tuple[int, Request]], prefix, slots: int = 6, check=None):
    """Each request's generated tokens and the log-probabilities of its prompt and generated tokens,
    submitted to an open engine at its step."""
    e = Engine(model)
    e.prefix = prefix
    e.open(slots)
    rows = [(a, e.new_row(r)) for a, r in arrivals]
    step, i = 0, 0
    while i < len(rows) or not e.idle:
        while i < len(rows) and rows[i][0] <= step:
            e.submit(rows[i][1])
            i += 1
        e.step()
        step += 1
        if check is not None:
            check(prefix)
    e.close()
    return [(r.tokens[len(r.request.prompt):], [(t, lp) for t, lp, _ in r.prompt_logprobs + r.logprobs])
            for _, r in rows]


def same(a: list, b: list) -> bool:
    """The same tokens, and log-probabilities equal up to float32 rounding (a shorter prefill's matmuls)."""
    def one(x: tuple, y: tuple) -> bool:
        (tx, lx), (ty, ly) = x, y
        return tx == ty and [t for t, _ in lx] == [t for t, _ in ly] and all(
            abs(p - q) < 1e-4 for (_, p), (_, q) in zip(lx, ly))

    return len(a) == len(b) and all(one(x, y) for x, y in zip(a, b))


def test_greedy_rows_are_the_same_with_the_cache_on_and_off(model):
    arrivals = chat_requests()
    off = drive(model, arrivals, None)
    cache = PrefixCache(64 << 20, block=4)
    on = drive(model, arrivals, cache)
    assert same(on, off)
    assert any(lps for _, lps in on)  # (prompt log-probabilities were asked for: those rows computed them whole)
    assert cache.hits > 0.7 * cache.lookups and cache.hit_tokens > 0.6 * cache.lookup_tokens
    assert cache.evictions == 0 and cache.blocks > 20


def test_a_tight_budget_evicts_and_never_corrupts_a_row(model):
    arrivals = chat_requests(seed=1)
    per_block = 2 * model.cfg.n_layer * model.cfg.kv_heads * 4 * model.cfg.head_size * 4  # float32, 4 tokens
    cache = PrefixCache(7 * per_block + per_block // 2, block=4)  # seven blocks: the system prompt's five and two

    def within(c: PrefixCache) -> None:
        assert c.bytes <= c.budget and c.blocks <= 7

    assert same(drive(model, arrivals, cache, check=within), drive(model, arrivals, None))
    assert cache.evictions > 0 and cache.hits > 0


def _cache(layers: int = 2, length: int = 32) -> KVCache:
    cfg = ModelConfig(n_layer=layers, n_head=2, n_embd=16, block_size=length, vocab_size=VOCAB)
    c = KVCache.empty(cfg, 2, length, torch.float32, "cpu")
    for k, v in c.layers:
        k.copy_(torch.randn_like(k))
        v.copy_(torch.randn_like(v))
    return c


def test_a_block_is_found_only_after_the_same_blocks_and_the_last_token_is_left_to_prefill():
    c = _cache()
    p = PrefixCache(1 << 20, block=4)
    prompt = list(range(10))
    p.store(c, 0, prompt)
    assert p.blocks == 2  # two full blocks of 4; the last 2 tokens are not a block
    assert p.restore(c, 1, [9, 9, 9, 9] + prompt[4:]) == 0  # the same second block after another first one: a miss
    assert p.restore(c, 1, prompt[:8]) == 4  # 8 tokens: the last must be computed, so one block
    assert p.restore(c, 1, prompt + [5]) == 8
    for k, v in c.layers:
        assert torch.equal(k[1, :, :8], k[0, :, :8]) and torch.equal(v[1, :, :8], v[0, :, :8])
    assert (p.lookups, p.hits, p.hit_tokens) == (3, 2, 12)


def test_lru_evicts_the_ends_of_chains_before_a_shared_start():
    c = _cache()
    size = 2 * 2 * 2 * 4 * 8 * 4  # layers, k/v, kv heads, tokens, head size, float32
    p = PrefixCache(3 * size, block=4)
    system = [1, 2, 3, 4]
    p.store(c, 0, system + [5, 6, 7, 8])
    p.store(c, 0, system + [9, 9, 9, 9])  # full: the older chat's block goes, the shared one stays
    assert p.blocks == 3 and p.evictions == 0
    p.store(c, 0, system + [7, 7, 7, 7])
    assert p.blocks == 3 and p.evictions == 1 and p.bytes == 3 * size
    assert p.restore(c, 1, system + [5, 6, 7, 8, 0]) == 4  # its own block was evicted; the system prompt's was not
    assert p.restore(c, 1, system + [7, 7, 7, 7, 0]) == 8
    p.store(c, 0, list(range(40)))  # more blocks than the budget: only the first three are kept
    assert p.blocks == 3 and p.bytes <= p.budget and p.restore(c, 1, list(range(40))) == 12


def test_another_precision_drops_the_blocks():
    c = _cache()
    p = PrefixCache(1 << 20, block=4)
    p.store(c, 0, list(range(8)))
    half = KVCache([(k.half(), v.half()) for k, v in c.layers])
    assert p.restore(half, 1, list(range(9))) == 0 and p.blocks == 0


def test_metrics_name_the_prefix_cache_counts():
    from llmctl.server import prefix_metrics

    c, p, m = _cache(), PrefixCache(1 << 20, block=4), Metrics()
    prefix_metrics(m, p)
    p.store(c, 0, list(range(8)))
    p.restore(c, 1, list(range(9)))
    got = parse(m.render())
    assert got["llmctl_prefix_cache_lookups_total"] == 1 and got["llmctl_prefix_cache_hits_total"] == 1
    assert got["llmctl_prefix_cache_hit_tokens_total"] == 8 and got["llmctl_prefix_cache_lookup_tokens_total"] == 9
    assert got["llmctl_prefix_cache_blocks"] == 2 and got["llmctl_prefix_cache_bytes"] == p.bytes > 0
    assert m.value("prefix_cache_hits_total") == 1


def test_rows_joining_together_compute_a_shared_prompt_start_once(model, monkeypatch):
    rng = random.Random(3)
    system = [rng.randrange(VOCAB) for _ in range(21)]
    reqs = [Request(system + [rng.randrange(VOCAB) for _ in range(3 + i)], Sampling(5, temperature=0))
            for i in range(4)]
    off = drive(model, [(0, q) for q in reqs], None)
    shapes = []
    real = model.forward
    monkeypatch.setattr(model, "forward", lambda idx, *a, **k: (shapes.append(tuple(idx.shape)), real(idx, *a, **k))[1])
    cache = PrefixCache(64 << 20, block=4)
    assert same(drive(model, [(0, q) for q in reqs], cache), off)
    # the first prompt alone (24 tokens); the other three start from its 20 cached positions, in one forward
    assert shapes[:2] == [(1, 24), (3, 7)]
    assert cache.hit_tokens == 3 * 20
