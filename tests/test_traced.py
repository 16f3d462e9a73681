"""Traced one-row decode steps (llmctl.traced): the engine's output equals the eager step's, in float32 and CPU
int8, at every position of the cache from one trace; a trace that disagrees with the eager step is dropped."""

import pytest
import torch

from llmctl import aot
from llmctl.config import ModelConfig
from llmctl.generate import Engine
from llmctl.model import Transformer
from llmctl.quantize import cpu_int8_available, quantize
from llmctl.rows import Request
from llmctl.sampling import Sampling


def model(arch: str, int8: bool = False) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, n_layer=2, n_head=4, n_kv_head=2 if arch == "llama" else None, n_embd=32,
                      block_size=160, vocab_size=40, init_std=0.5)
    m = Transformer(cfg).eval()
    return quantize(m, "int8") if int8 else m


def run(engine: Engine, prompts: list[list[int]], new: int, slots: int = 1) -> list[list[int]]:
    reqs = [Request(p, Sampling(new, temperature=0)) for p in prompts]
    rows = {id(r.request): r for r in engine.run(reqs, slots=slots) if r.done}
    return [rows[id(q)].tokens[len(q.prompt):] for q in reqs]


@pytest.mark.parametrize("arch,int8", [("gpt2", False), ("llama", False), ("gpt2", True)])
def test_one_trace_gives_the_eager_tokens_at_every_position(arch, int8, tmp_path):
    if int8 and not cpu_int8_available():
        pytest.skip("no fbgemm in this torch build")
    m = model(arch, int8)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [7] * 60]  # the second row runs to position 150 (the trace saw 100)
    eager = run(Engine(m), prompts, 90)
    traced = Engine(m, compile="auto", store=aot.StepStore(m, root=tmp_path))
    assert run(traced, prompts, 90) == eager
    assert traced.traced.built == 1 and not traced.traced._bad  # one trace for the whole cache
    # with two rows busy the engine decodes eagerly (the trace is of one row): same tokens as one at a time
    assert run(traced, prompts, 20, slots=2) == run(Engine(m), prompts, 20, slots=2)


def test_a_trace_that_disagrees_with_the_eager_step_is_dropped(tmp_path, monkeypatch):
    m = model("gpt2")
    eager = run(Engine(m), [[5, 6, 7]], 12)
    engine = Engine(m, compile="auto", store=aot.StepStore(m, root=tmp_path))

    class Wrong(torch.nn.Module):
        def forward(self, tok, pos, *caches):
            return torch.zeros(1, 40)

    monkeypatch.setattr(engine.traced, "_trace", lambda caches: Wrong())
    assert run(engine, [[5, 6, 7]], 12) == eager
    assert engine.traced._bad and not engine.traced._steps


def test_a_server_engine_traces_when_it_opens_and_no_compile_means_eager(tmp_path):
    m = model("gpt2")
    engine = Engine(m, compile="auto", store=aot.StepStore(m, root=tmp_path))
    engine.open(2, build_all_sizes=True)  # (what serve does)
    assert engine.traced.built == 1
    assert run(engine, [[4, 2]], 30) == run(Engine(m), [[4, 2]], 30)
    assert Engine(m, compile=False).traced is None


def test_traces_are_for_float32_weights_and_share_few_cache_lengths(tmp_path):
    m = model("gpt2")
    store = aot.StepStore(m, root=tmp_path)
    assert Engine(m.to(torch.bfloat16), compile="auto", store=store).traced is None  # (attention dtype varies)
    m = model("gpt2", int8=cpu_int8_available())
    e = Engine(m, compile="auto", store=aot.StepStore(m, root=tmp_path))
    assert e.traced is not None and {e.cache_length(n) for n in (20, 90, 150)} == {160}  # one trace for all
