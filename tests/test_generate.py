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
    # the reference: full forward passes over the window the decoder keeps, which slides to its newest
    # slide_keep(block_size) tokens whenever it outgrows the context
    from llmctl.generate import slide_keep

    window, ref = [1, 2, 3], []
    with torch.no_grad():
        for _ in range(60):
            t = int(m(torch.tensor([window]))[0, -1].argmax())
            ref.append(t)
            window.append(t)
            if len(window) > m.cfg.block_size:
                window = window[-slide_keep(m.cfg.block_size):]
    assert out == ref and len(set(out)) > 1


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


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_left_padded_greedy_equals_one_by_one(arch):
    from llmctl.generate import Request, generate_batch

    m = model(arch)
    prompts = [[5, 9, 3, 17], [1], [7, 7, 7, 7, 7, 7, 7, 2, 4], [30, 31]]
    single = [list(generate(m, p, 30, temperature=0)) for p in prompts]  # 30 new tokens: slides past the context
    out = [[] for _ in prompts]
    for row, t in generate_batch(m, [Request(p, 30, temperature=0) for p in prompts]):
        out[row].append(t)
    assert out == single


def test_batch_rows_keep_their_own_settings_and_can_be_cancelled():
    from llmctl.generate import Request, generate_batch

    m = model("gpt2")
    reqs = [Request([1, 2], 5, temperature=0), Request([3, 4], 9, temperature=1.0, top_k=5, seed=7),
            Request([5], 12, temperature=0)]
    alone = list(generate(m, [3, 4], 9, temperature=1.0, top_k=5, seed=7))
    out = {0: [], 1: [], 2: []}
    cancelled: set[int] = set()
    for row, t in generate_batch(m, reqs, cancelled=cancelled):
        out[row].append(t)
        if row == 2 and len(out[2]) == 3:
            cancelled.add(2)
    assert len(out[0]) == 5 and out[1] == alone and len(out[2]) == 3


def test_compiled_decode_equals_eager_and_is_reused_from_the_cache(tmp_path):
    from llmctl.aot import StepStore
    from llmctl.generate import Decoder, Request, generate_batch
    from llmctl.quantize import InputMajorLinear, convert

    m = convert(model("llama"), "float32", "none")  # as `infer` runs it: float32 weights stored transposed
    assert isinstance(m.lm_head, InputMajorLinear)

    def run(decoder, prompts, n):
        out = [[] for _ in prompts]
        for row, t in generate_batch(m, [Request(p, n, temperature=0) for p in prompts], decoder=decoder):
            out[row].append(t)
        return out

    # a left-padded batch whose rows slide past the context at different times (left padding comes and goes)
    prompts = [[5, 9, 3, 17], [1], [7, 7, 7, 7, 7, 7, 7, 2, 4]]
    eager = run(None, prompts, 30)
    assert eager == [list(generate(m, p, 30, temperature=0)) for p in prompts]
    notes = []
    store = StepStore(m, root=tmp_path, notify=notes.append)
    built = Decoder(m, compile=True, store=store)
    assert run(built, prompts, 30) == eager
    assert store.builds == 1 and any("compiling the decode step" in n for n in notes)
    # another call of the same shape reuses the loaded step; a new decoder (a later run) loads the package
    assert run(built, [[3], [4, 5], [6]], 8) == run(None, [[3], [4, 5], [6]], 8)
    later = StepStore(m, root=tmp_path)
    assert run(Decoder(m, compile="auto", store=later), prompts, 30) == eager
    assert store.builds == 1 and later.builds == 0 and len(list(tmp_path.rglob("*.pt2"))) == 1
    assert m.cache_len == 0 and all(b.attn.kv_cache is None for b in m.blocks)  # detached between calls
    # other weights are another package: auto finds none and decodes eagerly
    with torch.no_grad():
        m.lm_head.weight.mul_(2)
    other = Decoder(m, compile="auto", store=StepStore(m, root=tmp_path))
    assert run(other, prompts, 5) == run(None, prompts, 5) and other.store.builds == 0


def test_a_failed_compile_is_one_clear_error(tmp_path, monkeypatch):
    from llmctl.aot import StepStore
    from llmctl.errors import LlmctlError
    from llmctl.generate import Decoder

    def broken(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n  target: mkl._mkl_linear")

    monkeypatch.setattr(torch.export, "export", broken)
    m = model("gpt2")
    decoder = Decoder(m, compile=True, store=StepStore(m, root=tmp_path))
    with pytest.raises(LlmctlError, match=r"could not compile the decode step \(RuntimeError: InvalidCxxCompiler: "
                                          r"No working C\+\+ compiler found\); run with --no-compile"):
        list(generate(m, [1, 2, 3], 5, temperature=0, decoder=decoder))
    assert m.cache_len == 0 and not list(tmp_path.rglob("*.pt2*"))  # no half-written package left behind


def test_an_unreadable_cached_package_is_dropped(tmp_path):
    from llmctl.aot import StepStore
    from llmctl.generate import Decoder

    m = model("gpt2")
    notes = []
    store = StepStore(m, root=tmp_path, notify=notes.append)
    bad = store.path(1, 24)
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"PK\x03\x04 not really a package")
    decoder = Decoder(m, compile="auto", store=store)
    assert (list(generate(m, [1, 2, 3], 5, temperature=0, decoder=decoder))
            == list(generate(m, [1, 2, 3], 5, temperature=0)))
    assert not bad.exists() and any("unreadable" in n for n in notes)


def test_cache_lengths_are_bucketed_only_with_compiled_steps(tmp_path):
    from llmctl.aot import StepStore
    from llmctl.generate import Decoder

    m = Transformer(ModelConfig(arch="llama", n_layer=1, n_head=2, n_embd=8, block_size=1024, vocab_size=10))
    assert Decoder(m).cache_length(216) == 216
    auto = Decoder(m, compile="auto", store=StepStore(m, root=tmp_path))
    assert [auto.cache_length(n) for n in (5, 64, 65, 256, 900, 2000)] == [256, 256, 256, 256, 1024, 1024]
    auto.begin(1, 10)  # nothing cached: eager, and the weights are not even hashed
    assert auto.compiled is None and auto.store._digest is None and m.cache_len == 256
    auto.end()


def test_int8_and_bfloat16_decode_run():
    from llmctl.quantize import quantize

    m = model("gpt2")
    ref = m(torch.tensor([[1, 2, 3]]))
    q = quantize(model("gpt2"), "int8")
    assert (q(torch.tensor([[1, 2, 3]])) - ref).abs().max() < 0.1 * ref.abs().max()
    assert len(list(generate(q, [1, 2, 3], 8, temperature=0))) == 8
    b = model("llama").to(torch.bfloat16)
    assert len(list(generate(b, [1, 2, 3], 8, temperature=0))) == 8


def test_repetition_penalty():
    from llmctl.generate import penalize

    logits = torch.tensor([2.0, -1.0, 0.5])
    out = penalize(logits, torch.tensor([0, 1]), 2.0)
    assert out.tolist() == [1.0, -2.0, 0.5]
