import pytest
import torch

from llmctl.config import ModelConfig
from llmctl.generate import generate, generate_uncached, sample
from llmctl.model import Transformer


def model(arch: str) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, n_layer=2, n_head=4, n_kv_head=2 if arch == "llama" else None, n_embd=32,
                      block_size=24, vocab_size=40, init_std=0.2)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cached_greedy_equals_uncached(arch):
    m = model(arch)
    prompt = [5, 9, 3, 17]
    cached = list(generate(m, prompt, 18, temperature=0))
    assert cached == generate_uncached(m, prompt, 18, temperature=0)
    assert len(cached) == 18


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sampling_is_reproducible_and_matches_uncached(arch):
    m = model(arch)
    a = list(generate(m, [1, 2, 3], 15, temperature=1.0, top_k=10, seed=123))
    b = list(generate(m, [1, 2, 3], 15, temperature=1.0, top_k=10, seed=123))
    assert a == b == generate_uncached(m, [1, 2, 3], 15, temperature=1.0, top_k=10, seed=123)


def test_generation_slides_past_the_context():
    m = model("llama")
    out = list(generate(m, [1, 2, 3], 60, temperature=0))
    assert len(out) == 60 and all(0 <= t < 40 for t in out)


def test_stops_at_eos():
    m = model("gpt2")
    first = list(generate(m, [1, 2], 5, temperature=0))
    out = list(generate(m, [1, 2], 5, temperature=0, eos_id=first[2]))
    assert out == first[:2]


def test_top_k_and_top_p_restrict_choices():
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.9, -2.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(sample(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert picks == {2, 3}
    picks = {int(sample(logits, 1.0, top_p=0.3, generator=g)) for _ in range(200)}
    assert picks == {2}
    assert int(sample(logits, 0.0)) == 2
