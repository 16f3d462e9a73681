import pytest
import torch

from conftest import Recorder, generate_uncached
from llmctl.config import ModelConfig
from llmctl.generate import generate
from llmctl.logits import sample
from llmctl.model import Transformer
from llmctl.sampling import Sampling


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


def test_a_row_ends_at_any_of_the_tokenizers_end_ids():
    # generation_config.json may list several (Llama 3.1: <|end_of_text|>, <|eom_id|>, <|eot_id|>)
    from llmctl.generate import Engine, Request
    from llmctl.tokenizer import Tokenizer

    tok = Tokenizer.train_char(["abcdefghij klmnop"])
    torch.manual_seed(1)
    m = Transformer(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=tok.vocab_size,
                                init_std=0.5)).eval()
    free = list(generate(m, tok.encode("ab"), 12, temperature=0))
    k = next(k for k in range(1, len(free)) if free[k] not in free[:k] and free[k] != tok.eos_id)
    end = free[k]
    ends = Tokenizer(tok.tk, end_ids=[end])
    assert ends.end_ids == (tok.eos_id, end)
    rows = list(Engine(m, ends).run([Request(tok.encode("ab"), Sampling(12, temperature=0))]))
    assert rows[-1].tokens[2:] == free[:k] and rows[-1].produced == k and rows[-1].finish_reason == "eos"


def test_top_k_and_top_p_restrict_choices():
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.9, -2.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(sample(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert picks == {2, 3}
    picks = {int(sample(logits, 1.0, top_p=0.3, generator=g)) for _ in range(200)}
    assert picks == {2}
    assert int(sample(logits, 0.0)) == 2


def tokens_by_request(engine, reqs, slots=None, on_row=None):
    out = {id(q): [] for q in reqs}
    for row in engine.run(reqs, slots=slots):
        out[id(row.request)] += row.new_tokens
        if on_row:
            on_row(row, out[id(row.request)])
    return [out[id(q)] for q in reqs]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("slots", [1, 2, 4])
def test_continuous_batching_greedy_equals_one_by_one(arch, slots):
    from llmctl.generate import Engine, Request

    m = model(arch)
    prompts = [[5, 9, 3, 17], [1], [7, 7, 7, 7, 7, 7, 7, 2, 4], [30, 31]]
    budgets = [30, 3, 12, 20]  # 30 new tokens slide past the context; short rows leave and free their slots early
    single = [list(generate(m, p, n, temperature=0)) for p, n in zip(prompts, budgets)]
    reqs = [Request(p, Sampling(n, temperature=0)) for p, n in zip(prompts, budgets)]
    assert tokens_by_request(Engine(m), reqs, slots) == single


def test_a_waiting_row_joins_when_a_slot_frees_before_the_long_row_ends():
    from llmctl.generate import Engine, Request

    m = model("gpt2")
    engine = Engine(m)
    order = []
    greedy = [Sampling(n, temperature=0) for n in (20, 2, 2)]
    reqs = [Request([1, 2], greedy[0]), Request([3], greedy[1]), Request([4], greedy[2])]
    for row in engine.run(reqs, slots=2):
        if row.done:
            order.append(reqs.index(row.request))
    assert order == [1, 2, 0]  # the third request ran in the short one's slot while the first still decoded


def test_rows_keep_their_own_settings_and_can_be_cancelled():
    from llmctl.generate import Engine, Request

    m = model("gpt2")
    reqs = [Request([1, 2], Sampling(5, temperature=0)),
            Request([3, 4], Sampling(9, temperature=1.0, top_k=5, seed=7)),
            Request([5], Sampling(12, temperature=0))]
    alone = list(generate(m, [3, 4], 9, temperature=1.0, top_k=5, seed=7))

    def cancel_third(row, so_far):
        if row.request is reqs[2] and len(so_far) == 3:
            row.cancel()

    out = tokens_by_request(Engine(m), reqs, on_row=cancel_third)
    assert len(out[0]) == 5 and out[1] == alone and len(out[2]) == 3


def test_stop_strings_end_a_row_and_are_never_released():
    from llmctl.generate import Engine, Request
    from llmctl.tokenizer import Tokenizer

    tok = Tokenizer.train_char(["abcdefghij klmnop"])
    torch.manual_seed(1)
    m = Transformer(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=tok.vocab_size,
                                init_std=0.5)).eval()
    engine = Engine(m, tok, eos_id=None)
    free = tok.decode(list(generate(m, tok.encode("ab"), 40, temperature=0)))
    stop = free[5:8]
    streamed, rows = [], []
    for row in engine.run([Request(tok.encode("ab"), Sampling(40, temperature=0, stop=(stop,)))]):
        streamed.append(row.take_text())
        rows.append(row)
    want = free[: free.index(stop)]
    assert "".join(streamed) == rows[-1].text == want and rows[-1].finish_reason == "stop"
    assert rows[-1].produced < 40


def test_held_back_is_the_longest_stop_prefix_at_the_end():
    from llmctl.rows import held_back

    assert held_back("hello wor", ("world",)) == 3
    assert held_back("hello", ("xyz", "lo!")) == 2
    assert held_back("hello", ()) == 0 and held_back("abc", ("q",)) == 0


def test_compiled_decode_equals_eager_and_is_reused_from_the_cache(tmp_path):
    from llmctl.aot import StepStore
    from llmctl.generate import Engine, Request
    from llmctl.quantize import InputMajorLinear, convert

    m = convert(model("llama"), "float32", "none")  # as `infer` runs it: float32 weights stored transposed
    assert isinstance(m.lm_head, InputMajorLinear)

    def run(engine, prompts, n, slots=None):
        reqs = [Request(p, Sampling(n, temperature=0)) for p in prompts]
        return tokens_by_request(engine or Engine(m), reqs, slots)

    # rows that slide past the context at different times, and a row joining a freed slot
    prompts = [[5, 9, 3, 17], [1], [7, 7, 7, 7, 7, 7, 7, 2, 4]]
    eager = run(None, prompts, 30)
    assert eager == [list(generate(m, p, 30, temperature=0)) for p in prompts]
    events = Recorder()
    store = StepStore(m, root=tmp_path, events=events)
    built = Engine(m, compile=True, store=store)
    assert run(built, prompts, 30) == eager
    assert store.builds == 1 and any("compiling the decode step" in n for n in events.logs)  # the step of its 3 slots
    # another job of the same shape reuses the loaded step; a new engine (a later run) loads the package; a job of
    # one row builds the 1-slot step, which a 3-slot job then uses when only its first slot is busy
    assert run(built, [[3], [4, 5], [6]], 8) == run(None, [[3], [4, 5], [6]], 8)
    assert run(built, [[3]], 8) == run(None, [[3]], 8) and store.builds == 2
    later = StepStore(m, root=tmp_path)
    assert run(Engine(m, compile="auto", store=later), prompts, 30) == eager
    assert store.builds == 2 and later.builds == 0 and len(list(tmp_path.rglob("*.pt2"))) == 2
    # idle slots are masked: 3 slots, 5 requests of uneven length, compiled, equal the eager one-by-one tokens; when
    # only the first slot is busy the 1-slot step runs
    calls: dict[int, int] = {}
    real_get = later.get

    def counting_get(batch, length, build_missing):
        step = real_get(batch, length, build_missing)

        def counted(*args):
            calls[batch] = calls.get(batch, 0) + 1
            return step(*args)
        return counted if step is not None else None

    later.get = counting_get
    five = [Request(p, Sampling(n, temperature=0)) for p, n in zip(prompts + [[2, 2], [9]], [30, 4, 6, 5, 3])]
    compiled = tokens_by_request(Engine(m, compile="auto", store=later), five, 3)
    assert compiled == tokens_by_request(Engine(m), five, 1)
    assert calls.get(3, 0) > 0 and calls.get(1, 0) > 0, calls  # (the long first row ends alone in slot 0)
    # other weights are another package: auto finds none and decodes eagerly
    with torch.no_grad():
        m.lm_head.weight.mul_(2)
    other = Engine(m, compile="auto", store=StepStore(m, root=tmp_path))
    assert run(other, prompts, 5) == run(None, prompts, 5) and other.store.builds == 0


def test_a_failed_compile_is_one_clear_error(tmp_path, monkeypatch):
    from llmctl.aot import StepStore
    from llmctl.errors import LlmctlError
    from llmctl.generate import Engine

    def broken(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n  target: mkl._mkl_linear")

    monkeypatch.setattr(torch.export, "export", broken)
    m = model("gpt2")
    engine = Engine(m, compile=True, store=StepStore(m, root=tmp_path))
    with pytest.raises(LlmctlError, match=r"could not compile the decode step \(RuntimeError: InvalidCxxCompiler: "
                                          r"No working C\+\+ compiler found\); run with --no-compile"):
        list(generate(m, [1, 2, 3], 5, temperature=0, engine=engine))
    assert engine.cache is None and not list(tmp_path.rglob("*.pt2*"))  # no half-written package left behind


def test_an_unreadable_cached_package_is_dropped(tmp_path):
    from llmctl.aot import StepStore
    from llmctl.generate import Engine

    m = model("gpt2")
    events = Recorder()
    store = StepStore(m, root=tmp_path, events=events)
    bad = store.path(1, 24)
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"PK\x03\x04 not really a package")
    engine = Engine(m, compile="auto", store=store)
    assert (list(generate(m, [1, 2, 3], 5, temperature=0, engine=engine))
            == list(generate(m, [1, 2, 3], 5, temperature=0)))
    assert not bad.exists() and any("unreadable" in n for n in events.logs)


def test_cache_lengths_are_bucketed_only_with_compiled_steps(tmp_path):
    from llmctl.aot import StepStore
    from llmctl.generate import Engine

    m = Transformer(ModelConfig(arch="llama", n_layer=1, n_head=2, n_embd=8, block_size=1024, vocab_size=10))
    assert Engine(m).cache_length(216) == 216
    auto = Engine(m, compile="auto", store=StepStore(m, root=tmp_path))
    assert [auto.cache_length(n) for n in (5, 64, 65, 256, 900, 2000)] == [256, 256, 256, 256, 1024, 1024]
    auto.open(1, auto.cache_length(10))  # nothing cached: eager, and the weights are not even hashed
    assert auto.compiled == {} and auto.store._digest is None and auto.cache.length == 256
    auto.close()


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
    from llmctl.logits import penalize

    logits = torch.tensor([2.0, -1.0, 0.5])
    out = penalize(logits, torch.tensor([0, 1]), 2.0)
    assert out.tolist() == [1.0, -2.0, 0.5]


def test_compiled_steps_cover_the_busy_slots_with_the_smallest_size():
    from llmctl.generate import step_sizes

    assert step_sizes(1) == [1] and step_sizes(3) == [1, 3] and step_sizes(16) == [1, 4, 16]
    assert step_sizes(17) == [1, 4, 16, 17] and step_sizes(64) == [1, 4, 16, 64]


def test_a_prompt_is_fitted_to_the_context_by_one_rule():
    from llmctl.errors import LlmctlError
    from llmctl.rows import fit_prompt
    from llmctl.tokenizer import Tokenizer

    tok = Tokenizer.train_char(["abcdef"])
    assert fit_prompt(tok, "", 4, truncate=False) == [tok.eos_id] == fit_prompt(tok, [], 4, truncate=False)
    assert fit_prompt(tok, "abcdef", 4, truncate=True) == tok.encode("cdef")  # the last tokens stay
    assert fit_prompt(tok, [1, 2, 3], 4, truncate=False) == [1, 2, 3]
    with pytest.raises(LlmctlError, match="the prompt is 6 tokens but the model's context is 4 tokens; shorten it "
                                          "or pass --truncate to keep its last tokens"):
        fit_prompt(tok, "abcdef", 4, truncate=False)


def test_compiled_decode_of_the_open_model_switches_equals_eager(tmp_path):
    """Sliding windows, soft-caps, QK-norm, scaled RoPE: the compiled step (which reads the whole cache) masks what
    each row may read exactly as eager decoding does, also once rows pass the window."""
    from llmctl.aot import StepStore
    from llmctl.generate import Engine, Request
    from tests.test_model import SHAPES

    torch.manual_seed(0)
    m = Transformer(SHAPES["open-switches"]).eval()
    reqs = lambda: [Request(p, Sampling(12, temperature=0)) for p in ([5, 9, 3, 17], [1], [7, 7, 2])]  # noqa: E731
    eager = tokens_by_request(Engine(m), reqs(), 3)
    compiled = tokens_by_request(Engine(m, compile=True, store=StepStore(m, root=tmp_path)), reqs(), 3)
    assert compiled == eager and eager == [list(generate(m, r.prompt, 12, temperature=0)) for r in reqs()]


# ------------------------------------------------------------------------------------------------------------------
# OpenAI's penalties, logit_bias and log-probabilities


def _reference_penalized(m, prompt, n, presence=0.0, frequency=0.0, bias=None):
    """Greedy with OpenAI's penalties and logit_bias written out directly: full forward passes, the counts of the
    generated tokens, the biases added, the argmax; and each pick's log-softmax of those logits."""
    window, out, lps = list(prompt), [], []
    with torch.no_grad():
        for _ in range(n):
            logits = m(torch.tensor([window]))[0, -1].float().clone()
            for t in set(out):
                logits[t] -= presence + frequency * out.count(t)
            for t, b in (bias or {}).items():
                logits[t] += b
            t = int(logits.argmax())
            lps.append(float(torch.log_softmax(logits, -1)[t]))
            out.append(t)
            window.append(t)
    return out, lps


@pytest.mark.parametrize("presence, frequency, bias", [(1.5, 0.0, None), (0.0, 2.0, None), (-0.5, 0.7, None),
                                                        (0.0, 0.0, {3: 100.0}), (0.4, 0.3, {7: -100, 11: 2.5})])
def test_penalties_and_logit_bias_match_a_direct_computation(presence, frequency, bias):
    from llmctl.generate import Engine, Request

    m = model("llama")
    prompt = [5, 9, 3, 17]
    want, lps = _reference_penalized(m, prompt, 12, presence, frequency, bias)
    s = Sampling(12, temperature=0, presence_penalty=presence, frequency_penalty=frequency, logit_bias=bias)
    (row,) = [r for r in Engine(m).run([Request(prompt, s, logprobs=0)]) if r.done]
    assert row.tokens[len(prompt):] == want
    assert [t for t, _, _ in row.logprobs] == want
    assert [lp for _, lp, _ in row.logprobs] == pytest.approx(lps, abs=1e-5)
    if bias and 3 in bias:
        assert set(want) == {3}  # a bias of 100 all but forces the token
    plain = list(generate(m, prompt, 12, temperature=0))
    assert want != plain  # (each setting changes this model's greedy output)


def test_prompt_and_generated_logprobs_equal_a_full_forward_pass():
    from llmctl.generate import Engine, Request

    m = model("gpt2")
    prompt = [5, 9, 3, 17, 2, 8]
    reqs = [Request(prompt, Sampling(3, temperature=0), logprobs=4, prompt_logprobs=True),
            Request(prompt, Sampling(1), logprobs=2, prompt_logprobs=True, generate=False)]
    done = {id(r.request): r for r in Engine(m).run(reqs) if r.done}
    rows = [done[id(q)] for q in reqs]
    full = rows[0].tokens
    with torch.no_grad():
        lp = torch.log_softmax(m(torch.tensor([full]))[0].float(), -1)
    want = [float(lp[i, full[i + 1]]) for i in range(len(full) - 1)]
    for row in rows:
        got = [x for _, x, _ in row.prompt_logprobs + row.logprobs]
        assert got == pytest.approx(want[: len(got)], abs=1e-5)
        assert [t for t, _, _ in row.prompt_logprobs] == prompt[1:]
    assert len(rows[0].logprobs) == 3 and rows[1].logprobs == [] and rows[1].produced == 0
    top = rows[0].logprobs[0][2]
    assert len(top) == 4 and top[0][0] == rows[0].tokens[len(prompt)]  # greedy: the top alternative is the pick
    assert [x for _, x in top] == sorted((x for _, x in top), reverse=True)
    assert top[0][1] == pytest.approx(float(lp[len(prompt) - 1].max()), abs=1e-5)


def test_a_logit_bias_outside_the_vocabulary_is_refused_naming_it():
    from llmctl.errors import LlmctlError
    from llmctl.generate import Engine, Request

    with pytest.raises(LlmctlError, match="logit_bias names token id 40, outside the model's vocabulary of 40"):
        Engine(model("gpt2")).new_row(Request([1], Sampling(2, logit_bias={40: 1})))


def test_the_n_choices_of_a_prompt_share_one_prefill_and_each_equals_itself_alone(monkeypatch):
    from llmctl.generate import Engine, Request

    m = model("llama")
    prompt = [5, 9, 3, 17, 2, 8, 11]
    greedy = [Request(prompt, Sampling(14, temperature=0), logprobs=2, prompt_logprobs=True) for _ in range(4)]
    seeded = [Request(prompt, Sampling(14, temperature=1.0, seed=7 + j)) for j in range(3)]
    other = Request([4, 4], Sampling(14, temperature=0))
    engine = Engine(m)
    calls = []
    real = engine._prefill
    monkeypatch.setattr(engine, "_prefill", lambda row, keep=None: (calls.append(len(row.tokens)), real(row, keep)))
    together = engine._prefill_group  # (prompts without prompt log-probabilities are prefilled in one forward)
    monkeypatch.setattr(engine, "_prefill_group",
                        lambda group: (calls.extend(len(row.tokens) for row, _ in group), together(group)))
    reqs = greedy + [other] + seeded
    done = {id(r.request): r for r in engine.run(reqs) if r.done}
    # one prefill per distinct (prompt, prompt log-probabilities asked): the greedy four, the other, the seeded three
    assert calls == [len(prompt), 2, len(prompt)]
    monkeypatch.undo()
    alone = [Engine(m).run([q]) for q in (greedy[0], other, *seeded)]
    alone = [next(r for r in rows if r.done) for rows in alone]
    for q in greedy:
        row = done[id(q)]
        assert row.tokens == alone[0].tokens and row.finish_reason == alone[0].finish_reason
        assert row.prompt_logprobs == alone[0].prompt_logprobs  # (the very prefill: exactly)
        assert [x for _, x, _ in row.logprobs] == pytest.approx([x for _, x, _ in alone[0].logprobs], abs=1e-5)
    assert done[id(other)].tokens == alone[1].tokens
    assert [done[id(q)].tokens for q in seeded] == [r.tokens for r in alone[2:]]
    assert len({tuple(done[id(q)].tokens) for q in seeded}) == 3  # each choice its own stream


def test_rows_that_join_together_are_prefilled_in_one_padded_forward(monkeypatch):
    from llmctl import generate as gen
    from llmctl.generate import Engine, Request

    m = model("llama")
    prompts = [[5, 9, 3, 17], [1], [7, 7, 7, 7, 7, 7, 7, 2, 4], [30, 31]]
    reqs = [Request(p, Sampling(8, temperature=0)) for p in prompts]
    alone = [tokens_by_request(Engine(m), [q], 1)[0] for q in reqs]
    shapes = []
    real = m.forward
    monkeypatch.setattr(m, "forward", lambda idx, *a, **k: (shapes.append(tuple(idx.shape)), real(idx, *a, **k))[1])
    # slots in another order than the rows (slot 0 busy first), so row b is not slot b
    assert tokens_by_request(Engine(m), reqs, 4) == alone
    assert shapes[0] == (4, 9)  # the four prompts, padded to the longest, in one forward
    assert all(s[1] == 1 for s in shapes[1:])  # then decode steps only
    shapes.clear()
    monkeypatch.setattr(gen, "PREFILL_TOKENS", 18)  # at most 18 padded tokens per forward
    assert tokens_by_request(Engine(m), reqs, 4) == alone
    assert shapes[:2] == [(2, 4), (2, 9)]


def test_a_row_joining_into_a_middle_slot_is_prefilled_with_others_into_its_own_slot():
    from llmctl.generate import Engine, Request

    m = model("gpt2")
    first = Request([3, 4, 5], Sampling(2, temperature=0))
    long = Request([8, 9], Sampling(12, temperature=0))
    late = [Request([11, 12, 13, 14, 15], Sampling(6, temperature=0)), Request([6], Sampling(6, temperature=0))]
    alone = [tokens_by_request(Engine(m), [q], 1)[0] for q in late]
    e = Engine(m)
    e.open(3)
    rows = [e.new_row(q) for q in (first, long)]
    for r in rows:
        e.submit(r)
    while not rows[0].done:
        e.step()
    late_rows = [e.new_row(q) for q in late]
    for r in late_rows:
        e.submit(r)
    while not e.idle:
        e.step()
    assert [r.slot for r in late_rows] == [0, 2]  # slot 1 still holds the long row: slots 0 and 2, together
    assert [r.tokens[len(r.request.prompt):] for r in late_rows] == alone


def test_a_rows_first_token_comes_back_from_the_step_that_prefilled_it(monkeypatch):
    from llmctl.generate import Engine, Request

    m = model("gpt2")
    e = Engine(m)
    e.open(2)
    forwards = []
    real = m.forward
    monkeypatch.setattr(m, "forward", lambda idx, *a, **k: (forwards.append(tuple(idx.shape)), real(idx, *a, **k))[1])
    row = e.new_row(Request([3, 4, 5], Sampling(3, temperature=0)))
    e.submit(row)
    assert e.step() == [row] and len(row.new_tokens) == 1
    assert forwards == [(1, 3)]  # the prefill alone: the token is back before it goes through the model
    e.step()
    assert forwards == [(1, 3), (1, 1)] and len(row.new_tokens) == 2
    while not e.idle:
        e.step()
    assert row.tokens[3:] == list(generate(m, [3, 4, 5], 3, temperature=0))


def test_a_row_slides_within_a_cache_shorter_than_its_slide():
    from llmctl.generate import Engine, Request

    m = model("gpt2")  # a 24-token context: a slide keeps 18 tokens, more than this 10-position cache holds
    e = Engine(m)
    e.open(1, 10)
    row = e.new_row(Request([1, 2, 3], Sampling(20, temperature=0)))
    e.submit(row)
    while not e.idle:
        e.step()
    assert row.finish_reason == "length" and len(row.tokens) == 23
