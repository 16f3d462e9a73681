"""One rule set for generation settings (llmctl.sampling), and every surface that takes them refusing or accepting
the same values by it, each in its own words: --set generate.* (config), the flags of infer, serve and eval, the
rows of `infer --input`, and lm-eval's generation kwargs. The HTTP surface is in tests/test_server.py (same table)."""

from __future__ import annotations

import json

import pytest

from conftest import BAD_SAMPLING, invoke
from llmctl import sampling
from llmctl.config import load_config
from llmctl.errors import LlmctlError
from llmctl.sampling import MAX_STOPS, Sampling

IDS = [c[0] for c in BAD_SAMPLING]


def test_the_stop_limit_leaves_room_for_lm_evals_end_of_text():
    assert MAX_STOPS >= 16 and len(BAD_SAMPLING[-1][1]) == MAX_STOPS + 1


@pytest.mark.parametrize("field, value, words", BAD_SAMPLING, ids=IDS)
def test_the_carrier_refuses_each_bad_value_naming_its_field(field, value, words):
    (p,) = sampling.problems({field: value})
    assert p.field == field and words in p.message
    with pytest.raises(sampling.SamplingError, match=field) as e:
        Sampling(**{"max_new_tokens": 4, field: value})
    assert e.value.problems == [p] and e.value.status == 2
    base = Sampling(4)
    with pytest.raises(LlmctlError) as e:
        sampling.replace(base, {field: value}, name=sampling.flag)
    assert e.value.message.startswith(sampling.flag(field) + " " + words.split(" (got")[0])


def test_one_meaning_for_each_value():
    s = Sampling(4, top_k=-1, stop="\n")
    assert s.top_k is None and s.stop == ("\n",)  # vLLM's -1 and 0 are "no limit", like null
    assert Sampling(4, top_k=0).top_k is None and Sampling(4, top_k=5).top_k == 5
    assert Sampling(4, stop=["", "x"]).stop == ("x",)  # an empty stop string stops nothing
    assert Sampling(4, temperature=3).temperature == 3.0  # no cap at 2 (OpenAI's), on every surface
    assert Sampling(4.0).max_new_tokens == 4  # JSON and YAML may write an integer as 4.0
    assert Sampling(4, temperature=0).greedy and not Sampling(4, temperature=0, repetition_penalty=1.2).greedy
    assert not Sampling(4, temperature=0, presence_penalty=0.5).greedy  # (penalties change the logits)
    # logit_bias: JSON's string keys, the CLI's ID=BIAS strings and a mapping all mean the same sorted pairs
    for given in ({"7": -100, 3: 2}, ["7=-100", "3=2"], {3: 2.0, 7: -100.0}):
        assert Sampling(4, logit_bias=given).logit_bias == ((3, 2.0), (7, -100.0))
    assert Sampling(4, logit_bias=None).logit_bias == () and Sampling(4, logit_bias={}).logit_bias == ()
    s = sampling.replace(Sampling(4), {"temperature": 0, "seed": 3})
    assert (s.temperature, s.seed, s.max_new_tokens) == (0.0, 3, 4)


@pytest.mark.parametrize("field, value, words", [
    ("temperature", "hot", "must be a number (got 'hot')"),
    ("max_new_tokens", "ten", "must be an integer (got 'ten')"),
    ("max_new_tokens", 2.5, "must be an integer"),
    ("top_k", True, "must be an integer (got True)"),
    ("stop", 5, "must be a string or a list of strings"),
    ("seed", 1 << 64, "must be between"),
    ("temperature", float("nan"), "must be a finite number"),
    ("repetition_penalty", 0, "must be positive"),
    ("logit_bias", {"5": 101}, "values must be numbers between -100 and 100 (got 101 for token 5)"),
    ("logit_bias", {"x": 1}, "keys must be token ids"),
    ("logit_bias", {-1: 1}, "keys must be token ids"),
    ("logit_bias", ["5:3"], "must map token ids to numbers"),
    ("logit_bias", 5, "must map token ids to numbers"),
    ("presence_penalty", "high", "must be a number"),
])
def test_values_of_the_wrong_kind(field, value, words):
    (p,) = sampling.problems({field: value})
    assert words in p.message


def test_the_config_checks_by_the_same_rules_and_reports_them_all():
    bad = [f"generate.{f}={'[' + ','.join(v) + ']' if isinstance(v, list) else v}" for f, v, _ in BAD_SAMPLING]
    with pytest.raises(LlmctlError) as e:
        load_config(None, bad)
    for field, _, words in BAD_SAMPLING:
        assert f"generate.{field}: {words}" in e.value.message
    g = load_config(None, ["generate.top_k=-1", "generate.temperature=3", "generate.stop=[a,b]",
                           "generate.presence_penalty=0.5", "generate.logit_bias={7: -100}"]).generate
    s = Sampling.from_config(g)
    assert (s.top_k, s.temperature, s.stop) == (None, 3.0, ("a", "b"))
    assert (s.presence_penalty, s.logit_bias) == (0.5, ((7, -100.0),))
    with pytest.raises(LlmctlError, match="generate.logit_bias: values must be numbers between -100 and 100"):
        load_config(None, ["generate.logit_bias={7: 300}"])
    s = Sampling.from_config(g, given := {"logit_bias": ["7=5"], "frequency_penalty": -1.0})
    assert (s.logit_bias, s.frequency_penalty) == (((7, 5.0),), -1.0) and given


# ------------------------------------------------------------------------------------------------------------------
# Every CLI surface: exit 2, one line naming the key as that surface knows it, no traceback


def _set(field, value) -> list[str]:
    v = "[" + ",".join(value) + "]" if isinstance(value, list) else value
    return ["--set", f"generate.{field}={v}"]


def _flag(field, value) -> list[str]:
    if field == "stop":
        return [a for s in value for a in ("--stop", s)]
    return [sampling.flag(field), str(value)]


def _refused(r, line: str) -> None:
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    errors = [x for x in r.stderr.splitlines() if x.startswith("error: ")]  # (infer --input may say what it starts)
    assert len(errors) == 1 and r.stderr.strip().endswith(errors[0]), r.stderr
    assert line in errors[0], (line, errors[0])


SURFACES = [
    # (id, extra arguments, how the surface gives the value, how it names the field)
    ("infer-set", ["infer", "--prompt", "hi"], _set, lambda f: f"generate.{f}:"),
    ("infer-flag", ["infer", "--prompt", "hi"], _flag, sampling.flag),
    ("serve-set", ["serve", "--port", "0"], _set, lambda f: f"generate.{f}:"),
    ("serve-flag", ["serve", "--port", "0"], _flag, sampling.flag),
    ("eval-set", ["eval", "--tasks", "shakespeare_complete"], _set, lambda f: f"generate.{f}:"),
    ("eval-flag", ["eval", "--tasks", "shakespeare_complete"], _flag, sampling.flag),
]


@pytest.mark.parametrize("surface", SURFACES, ids=[s[0] for s in SURFACES])
@pytest.mark.parametrize("field, value, words", BAD_SAMPLING, ids=IDS)
def test_every_command_refuses_the_same_bad_values(surface, field, value, words, runner, tiny_run):
    _, args, give, name = surface
    r = invoke(runner, args[0], "--ckpt", tiny_run, *args[1:], *give(field, value))
    _refused(r, f"{name(field)} {words}")


@pytest.mark.parametrize("field, value, words", BAD_SAMPLING, ids=IDS)
def test_a_jsonl_row_is_refused_by_the_same_rule(field, value, words, runner, tiny_run, tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps({"prompt": "ROMEO:"}) + "\n" + json.dumps({"prompt": "hi", field: value}) + "\n")
    r = invoke(runner, "infer", "--ckpt", tiny_run, "--input", f, "--output", tmp_path / "out.jsonl")
    _refused(r, f"--input row 2: {field} {words}")
    assert not (tmp_path / "out.jsonl").exists()


def test_temperature_3_is_accepted_on_every_surface(runner, tiny_run, tmp_path):
    for args in (["--set", "generate.temperature=3"], ["--temperature", "3"]):
        r = invoke(runner, "infer", "--ckpt", tiny_run, "--prompt", "hi", "-n", "3", "--seed", "1", *args)
        assert r.exit_code == 0, r.output
    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps({"prompt": "hi", "temperature": 3, "max_new_tokens": 3, "top_k": -1}) + "\n")
    r = invoke(runner, "infer", "--ckpt", tiny_run, "--input", f)
    assert r.exit_code == 0 and json.loads(r.stdout)["completion_tokens"] <= 3, r.output
    # serve and eval --tasks: what their commands build before they serve or load lm-eval (HTTP: test_server.py)
    from llmctl.commands import evaluation, serving
    from llmctl.loading import load_model

    _, s = serving.settings(load_model(tiny_run), None, ["generate.temperature=3"], {"top_k": -1})
    assert (s.temperature, s.top_k) == (3.0, None)
    assert evaluation.generation_changes(["generate.temperature=3"], {"top_k": -1}) == {"temperature": 3.0,
                                                                                          "top_k": None}


def test_flags_win_over_set_and_set_over_the_checkpoint(tiny_run):
    from llmctl.commands.inference import sampling_settings
    from llmctl.loading import load_model

    loaded = load_model(tiny_run)
    s = sampling_settings(loaded, ["generate.temperature=0.5", "generate.top_p=0.9"], {"temperature": 0.0})
    assert (s.temperature, s.top_p, s.top_k, s.max_new_tokens) == (0.0, 0.9, 200, 256)


@pytest.mark.parametrize("args, words", [
    (["infer", "--prompt", "hi", "--set", "model.n_layer=3"],
     "llmctl infer takes only generate.* settings; model come from the checkpoint"),
    (["eval", "--tasks", "x", "--set", "generate.dtype=bfloat16"],
     "takes only the sampling settings generate.{max_new_tokens,"),
    (["eval", "--temperature", "0"], "go with --tasks"),
])
def test_settings_a_command_does_not_take(args, words, runner, tiny_run):
    _refused(invoke(runner, args[0], "--ckpt", tiny_run, *args[1:]), words)


def test_an_lm_eval_task_becomes_a_sampling_that_the_users_settings_override():
    pytest.importorskip("lm_eval")
    from llmctl.harness import task_sampling

    greedy = task_sampling({"until": ["\n"], "max_gen_toks": 16, "do_sample": False, "temperature": 0.7}, "<eos>", {})
    assert greedy == Sampling(16, temperature=0, stop=("\n", "<eos>"))
    sampled = task_sampling({"until": "\n\n", "do_sample": True, "temperature": 0.7, "top_p": 0.9}, "<eos>",
                            {"temperature": 3.0, "seed": 1})
    assert (sampled.temperature, sampled.top_p, sampled.seed, sampled.max_new_tokens) == (3.0, 0.9, 1, 256)
    with pytest.raises(LlmctlError, match=r"the task's generation_kwargs: until \(with the end-of-text token\) "
                                          r"takes at most 16 strings \(got 17\)"):
        task_sampling({"until": [f"s{i}" for i in range(16)]}, "<eos>", {})
    with pytest.raises(LlmctlError, match="generation_kwargs: max_gen_toks must be at least 1"):
        task_sampling({"max_gen_toks": 0}, "<eos>", {})


def test_an_exported_generation_config_has_no_limit_where_llmctl_has_none():
    from llmctl.hf import generation_config

    for k in ("0", "-1", "null"):
        assert "top_k" not in generation_config(load_config(None, [f"generate.top_k={k}"]), None)
    assert generation_config(load_config(None, ["generate.top_k=5"]), None)["top_k"] == 5


def test_the_penalty_and_bias_flags_reach_infer(runner, tiny_run):
    from llmctl.tokenizer import Tokenizer

    e = Tokenizer.from_file(tiny_run / "tokenizer.json").encode("e")[0]
    r = invoke(runner, "infer", "--ckpt", tiny_run, "--prompt", "ROMEO:", "-n", "6", "-t", "0", "--logit-bias",
               f"{e}=100", "--presence-penalty", "0.5", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["completion"] == "e" * 6  # (+100 outweighs the presence penalty)
    r = invoke(runner, "infer", "--ckpt", tiny_run, "--prompt", "ROMEO:", "-n", "6", "-t", "0", "--logit-bias",
               "99999=1")
    _refused(r, "logit_bias names token id 99999, outside the model's vocabulary")
