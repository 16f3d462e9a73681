"""Structured output (llmctl.structured through xgrammar): sampled at temperature 1 from a random-weight byte-level
BPE model, every constrained row ends by itself with JSON that follows its schema; constrained and free rows share a
batch without changing each other; `response_format` over HTTP and `infer --json-schema`; the extra missing."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import SHAKESPEARE, invoke

SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z ]{1,8}$"},  # (not maxLength: xgrammar 0.2.9 lets control
        # characters into length-bounded strings, which strict JSON parsers refuse)
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[a-z]{0,8}$"},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]}},
        "required": ["name", "age", "address"]},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
             "required": ["color", "ok"]},
    "array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 2,
              "maxItems": 4},
}
VOCAB = 320  # the model's vocabulary: the tokenizer's 300 tokens and 20 padding ids no text uses


def _by_hand(name: str, obj) -> None:
    """The checks jsonschema would make, where it is not installed."""
    if name == "nested":
        assert set(obj) <= {"name", "age", "address"} and {"name", "age", "address"} <= set(obj)
        assert isinstance(obj["name"], str) and 1 <= len(obj["name"]) <= 8
        assert isinstance(obj["age"], int) and 0 <= obj["age"] <= 120
        a = obj["address"]
        assert set(a) == {"city", "zip"} and len(a["city"]) <= 8 and len(a["zip"]) == 5 and a["zip"].isdigit()
    elif name == "enum":
        assert set(obj) == {"color", "ok"} and obj["color"] in ("red", "green", "blue") and isinstance(obj["ok"], bool)
    else:
        assert isinstance(obj, list) and 2 <= len(obj) <= 4 and all(isinstance(x, int) and 0 <= x <= 99 for x in obj)


def validate(name: str, text: str):
    obj = json.loads(text)
    try:
        import jsonschema
    except ImportError:
        _by_hand(name, obj)
    else:
        jsonschema.validate(obj, SCHEMAS[name])
    return obj


@pytest.fixture(scope="module")
def xgr():
    return pytest.importorskip("xgrammar")


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A random-weight llama over a byte-level BPE tokenizer of 300 tokens, saved as a checkpoint: (model, tokenizer,
    its run directory)."""
    import torch

    from llmctl import checkpoint as ckpt_io
    from llmctl.config import Config
    from llmctl.config.model import ModelConfig
    from llmctl.model import Transformer
    from llmctl.tokenizer import Tokenizer

    tok = Tokenizer.train_bpe([SHAKESPEARE.read_text()[:50_000]], 300)
    cfg = Config(model=ModelConfig(arch="llama", n_layer=2, n_head=2, n_embd=32, block_size=128, vocab_size=VOCAB))
    cfg.tokenizer.kind = "bpe"
    torch.manual_seed(0)
    model = Transformer(cfg.model).eval()
    out = tmp_path_factory.mktemp("structured") / "bpe"
    ckpt_io.save(out, 0, model.state_dict(), cfg.to_yaml(), tok.to_str())
    return model, tok, out


def _format(tok, name: str):
    from llmctl import structured

    return structured.compile_schema(json.dumps(SCHEMAS[name]), tok, VOCAB)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_sampled_rows_all_end_by_themselves_with_json_that_follows_the_schema(xgr, bpe, name):
    from llmctl.generate import Engine, Request
    from llmctl.sampling import Sampling

    model, tok, _ = bpe
    fmt = _format(tok, name)
    prompts = [tok.encode(SHAKESPEARE.read_text()[i * 50: i * 50 + 20]) for i in range(30)]
    reqs = [Request(p, Sampling(200, temperature=1.0, seed=i), format=fmt) for i, p in enumerate(prompts)]
    rows = {}
    for row in Engine(model, tok).run(reqs, slots=8):
        if row.done:
            rows[id(row)] = row
    assert len(rows) == 30
    for row in rows.values():
        assert row.finish_reason == "eos", row.text
        obj = validate(name, row.text)
        if name != "nested":  # no free strings: the compact form is the one text
            assert row.text == json.dumps(obj, separators=(",", ":"))
    assert len({r.text for r in rows.values()}) > 3  # sampled: not one answer for all


def test_a_constrained_and_a_free_row_share_a_batch_and_each_equals_itself_alone(xgr, bpe):
    from llmctl.generate import Engine, Request
    from llmctl.sampling import Sampling

    model, tok, _ = bpe
    prompt = tok.encode("ROMEO: speak")
    free = Request(prompt, Sampling(30, temperature=0))
    bound = Request(prompt, Sampling(60, temperature=0), format=_format(tok, "enum"))
    seeded = Request(prompt, Sampling(60, temperature=1.0, seed=3), format=_format(tok, "array"))
    engine = Engine(model, tok)

    def texts(reqs):
        done = {}
        for row in engine.run(reqs):
            if row.done:
                done[id(row.request)] = (row.text, row.finish_reason)
        return [done[id(r)] for r in reqs]

    together = texts([free, bound, seeded])
    alone = [texts([r])[0] for r in (free, bound, seeded)]
    assert together == alone
    assert together[0][1] == "length" and together[1][1] == "eos" and together[2][1] == "eos"
    validate("enum", together[1][0])
    validate("array", together[2][0])


def test_a_length_bounded_string_allows_no_raw_control_character(xgr, bpe):
    """xgrammar 0.2.9 compiles minLength/maxLength into a class that lets raw control characters in (invalid JSON);
    llmctl.structured rewrites such a string as a pattern of plain characters, which keeps its bounds."""
    from llmctl.structured import Matcher

    _, tok, _ = bpe
    control = [i for i in range(tok.vocab_size) if any(ord(c) < 32 for c in tok.decode([i], skip_special=False))]
    quote, a = tok.encode('"'), tok.encode("a")
    assert control and len(quote) == len(a) == 1
    for schema, empty_ok in (({"type": "string", "maxLength": 5}, True), ({"type": "string", "minLength": 2}, False)):
        m = Matcher(_compile(tok, schema))
        assert m.accept(quote[0])
        allowed = m.allowed()
        assert not any(bool(allowed[i]) for i in control) and bool(allowed[a[0]])
        assert bool(allowed[quote[0]]) == empty_ok
    m = Matcher(_compile(tok, {"type": "string", "maxLength": 2}))
    assert all(m.accept(t) for t in quote + a + a)
    assert not bool(m.allowed()[a[0]]) and bool(m.allowed()[quote[0]])  # two characters: only the end is left


def _compile(tok, schema: dict):
    from llmctl import structured

    return structured.compile_schema(json.dumps(schema), tok, VOCAB)


def test_response_format_over_http_and_infer_json_schema(xgr, bpe, runner, tmp_path):
    pytest.importorskip("openai")
    from test_server import Server

    _, _, ckpt = bpe
    with Server(ckpt, "--dtype", "float32", "--no-compile") as s:
        client = s.client()
        for name, schema in SCHEMAS.items():  # 10 sampled answers per schema through the real server
            rf = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
            chat = client.chat.completions.create(model="bpe", messages=[{"role": "user", "content": "a colour?"}],
                                                  max_tokens=200, temperature=1.0, seed=1, response_format=rf, n=10)
            assert len(chat.choices) == 10 and len({c.message.content for c in chat.choices}) > 1
            for c in chat.choices:
                assert c.finish_reason == "stop", c.message.content
                validate(name, c.message.content)
        r = s.post("/v1/completions", {"prompt": "To be", "max_tokens": 60, "temperature": 1.0,
                                       "response_format": {"type": "json_schema",
                                                           "json_schema": {"schema": SCHEMAS["array"]}}})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] == "stop"
        validate("array", r.json()["choices"][0]["text"])
        obj = s.post("/v1/completions", {"prompt": "To be", "max_tokens": 60, "temperature": 0,
                                         "response_format": {"type": "json_object"}})
        assert obj.status_code == 200, obj.text
        assert obj.json()["choices"][0]["text"].startswith("{")
        assert s.stop() == 0
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMAS["nested"]))
    r = invoke(runner, "infer", "--ckpt", ckpt, "--prompt", "To be", "--max-new-tokens", "200", "--temperature",
               "1", "--seed", "4", "--json-schema", schema, "--json")
    assert r.exit_code == 0, r.output
    validate("nested", json.loads(r.stdout)["completion"])
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "foo"}')
    r = invoke(runner, "infer", "--ckpt", ckpt, "--prompt", "To be", "--json-schema", bad)
    assert r.exit_code == 2
    assert "the schema cannot be compiled" in " ".join(r.output.split()) and 'Unsupported type "foo"' in r.output


def test_the_extra_missing_is_one_line_naming_it(monkeypatch):
    from llmctl import openai_api as api
    from llmctl.sampling import Sampling
    from llmctl.tokenizer import Tokenizer

    tok = Tokenizer.train_bpe(["to be or not to be"], 300)  # (a new tokenizer: no compiler made for it yet)
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import xgrammar now raises ImportError
    limits = api.Limits(64, 100, Sampling(16), vocab_size=300)
    with pytest.raises(api.ApiError) as e:
        api.parse_completion({"prompt": "a", "response_format": {"type": "json_object"}}, tok, limits)
    assert e.value.status == 400 and e.value.param == "response_format"
    assert "xgrammar" in e.value.message and "llmctl[structured]" in e.value.message
    # plain text asks for nothing
    assert api.parse_completion({"prompt": "a", "response_format": {"type": "text"}}, tok, limits).requests[0] \
        .format is None
