"""llmctl.tokenizer_files: a model's tokenizer_config.json, chat template and end ids travel from import through
finetune, infer and serve to export (hf and GGUF)."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest

from conftest import SHAKESPEARE, SHARED, invoke, sets
from llmctl import tokenizer_files
from llmctl.errors import LlmctlError
from llmctl.tokenizer import EOS, Tokenizer

REAL = SHARED / "tokenizers"
TEXT = SHAKESPEARE.read_text()[:20000]


def test_imported_settings_of_qwen3_and_llama3():
    if not (REAL / "qwen3").is_dir():
        pytest.skip(f"no shared tokenizers at {REAL}")
    d = REAL / "qwen3"
    tok, settings = tokenizer_files.read(d, Tokenizer.from_file(d / "tokenizer.json"), {})
    # generation_config.json lists <|im_end|> and <|endoftext|>; <|im_end|> is the end-of-text token (tokenizer_config)
    assert tok.end_ids == (151645, 151643) and settings["end_ids"] == [151643]
    assert tok.eos_token == "<|im_end|>" and tok.bos_id is None and tok.pad_id == 151643
    assert settings["special_tokens"] == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    assert settings["chat_template"] == json.loads((d / "tokenizer_config.json").read_text())["chat_template"]
    # Llama 3.1's generation_config.json lists three end ids; the template file wins over tokenizer_config's
    d = REAL / "llama3"
    tok, settings = tokenizer_files.read(d, Tokenizer.from_file(d / "tokenizer.json"),
                                         {"eos_token_id": [128001, 128008, 128009]})
    assert tok.end_ids == (128009, 128001, 128008) and tok.bos_id == 128000


def test_a_chat_template_file_wins_and_end_ids_come_from_generation_config(tmp_path):
    tok = Tokenizer.train_bpe([TEXT], 300)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "old", "eos_token": EOS}))
    (tmp_path / "chat_template.jinja").write_text("new {{ messages }}")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 5]}))
    got, settings = tokenizer_files.read(tmp_path, tok, {"eos_token_id": 7})
    assert settings == {"chat_template": "new {{ messages }}", "special_tokens": {"eos_token": EOS}, "end_ids": [5]}
    assert got.end_ids == (0, 5)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 999]}))
    with pytest.raises(LlmctlError, match="end_ids: 999 is not a token id"):
        tokenizer_files.read(tmp_path, tok, {})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(LlmctlError, match="eos_token '<|nope|>' is not a token"):
        tokenizer_files.read(tmp_path, tok, {})


@pytest.mark.parametrize("name, flags, before, after", [
    ("llama2", {"add_bos_token": False}, [], []),  # its post-processor adds <s>: the flag takes it away
    ("mistral", {"add_bos_token": True, "add_eos_token": True}, [1], [2]),
    ("phi3", {"add_bos_token": True}, [1], []),
])
def test_add_bos_and_add_eos_flags_rewrite_the_post_processor(tmp_path, name, flags, before, after):
    transformers = pytest.importorskip("transformers")
    src = REAL / name
    if not src.is_dir():
        pytest.skip(f"no {src}")
    shutil.copy(src / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", **flags}))
    tok, _ = tokenizer_files.read(tmp_path, Tokenizer.from_file(tmp_path / "tokenizer.json"), {})
    assert tok.added_specials() == (before, after)
    ids = tok.encode("Hello world")
    assert tok.encode_prompt("Hello world") == before + ids + after
    # the export says so in both places, and transformers (which reads the post-processor) agrees
    out = tmp_path / "export"
    out.mkdir()
    tokenizer_files.write(out, tok, 64, None)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (cfg["add_bos_token"], cfg["add_eos_token"]) == (bool(before), bool(after))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert transformers.AutoTokenizer.from_pretrained(str(out))("Hello world")["input_ids"] == before + ids + after


# ------------------------------------------------------------------------------------------------------------------
# import -> finetune -> infer/serve -> export: a tiny Llama with a ChatML template and two end ids

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Who are you?"}]


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    """A transformers directory: a random tiny Llama, a byte-level BPE with <|im_start|>/<|im_end|>, its
    tokenizer_config.json (eos <|im_end|>, the template) and a generation_config.json listing two end ids."""
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("chatml")
    tok = Tokenizer.train_bpe([TEXT], 300)
    tok.tk.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(d / "tokenizer.json")
    cfg = transformers.LlamaConfig(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                                   num_hidden_layers=2, vocab_size=304, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<pad>", "bos_token": None,
         "chat_template": CHATML}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [301, 0]}))
    return d


def test_the_template_and_end_ids_travel_from_import_to_export(chatml_dir, runner, tmp_path):
    transformers = pytest.importorskip("transformers")
    from llmctl.chat import render_messages
    from llmctl.loading import load_model

    r = invoke(runner, "import", "hf", chatml_dir, "--out", tmp_path / "imp")
    assert r.exit_code == 0, r.output
    loaded = load_model(tmp_path / "imp", "cpu")
    tc, tok = loaded.cfg.tokenizer, loaded.tokenizer
    assert (tc.chat_template, tc.special_tokens, tc.end_ids) == (CHATML, {"eos_token": "<|im_end|>",
                                                                          "pad_token": "<pad>"}, [0])
    assert tok.end_ids == (301, 0) and tok.eos_token == "<|im_end|>" and tok.bos_id is None
    want = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
            "Hello.<|im_end|>\n<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n")
    assert render_messages(loaded.cfg, tok, TURNS) == want
    # a finetune keeps them (the model's tokenizer settings come from its checkpoint)
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT[:4000])
    r = invoke(runner, "finetune", "--from", tmp_path / "imp", *sets(f"data.path={corpus}", "train.max_steps=2",
               "train.batch_size=2", "train.dtype=float32", "train.eval_interval=0"),
               "--out", tmp_path / "ft", "--quiet")
    assert r.exit_code == 0, r.output
    tuned = load_model(tmp_path / "ft", "cpu")
    assert tuned.cfg.tokenizer.chat_template == CHATML and tuned.tokenizer.end_ids == (301, 0)
    # the export carries the template (both places transformers reads) and every end id
    r = invoke(runner, "export", "--ckpt", tmp_path / "ft", "--out", tmp_path / "exp")
    assert r.exit_code == 0, r.output
    exp = tmp_path / "exp"
    assert (exp / "chat_template.jinja").read_text() == CHATML
    assert json.loads((exp / "tokenizer_config.json").read_text())["chat_template"] == CHATML
    assert json.loads((exp / "generation_config.json").read_text())["eos_token_id"] == [301, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.AutoTokenizer.from_pretrained(str(exp))
    assert theirs.apply_chat_template(TURNS, tokenize=False, add_generation_prompt=True) == want
    assert theirs.apply_chat_template(TURNS, add_generation_prompt=True, return_dict=False) == tok.encode(want)
    assert theirs.eos_token == "<|im_end|>" and theirs.bos_token is None
    assert transformers.GenerationConfig.from_pretrained(str(exp)).eos_token_id == [301, 0]
    # and the export imports back to the same settings
    r = invoke(runner, "import", "hf", exp, "--out", tmp_path / "again")
    assert r.exit_code == 0, r.output
    again = load_model(tmp_path / "again", "cpu")
    assert again.cfg.tokenizer.chat_template == CHATML and again.tokenizer.end_ids == (301, 0)


def test_a_finetune_may_give_a_model_a_template(chatml_dir, runner, tmp_path):
    from llmctl.loading import load_model

    assert invoke(runner, "import", "hf", chatml_dir, "--out", tmp_path / "imp").exit_code == 0
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT[:4000])
    other = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    r = invoke(runner, "finetune", "--from", tmp_path / "imp", *sets(
        f"data.path={corpus}", "train.max_steps=1", "train.batch_size=2", "train.dtype=float32",
        "train.eval_interval=0"), "--set", f"tokenizer.chat_template={other}",
        "--out", tmp_path / "ft", "--quiet")
    assert r.exit_code == 0, r.output
    assert load_model(tmp_path / "ft", "cpu").cfg.tokenizer.chat_template == other


def test_chat_and_serve_render_with_the_models_template(chatml_dir, runner, tmp_path):
    from llmctl import openai_api as api
    from llmctl.commands.inference import ChatSession
    from llmctl.loading import for_inference, load_model
    from llmctl.sampling import Sampling

    assert invoke(runner, "import", "hf", chatml_dir, "--out", tmp_path / "imp").exit_code == 0
    loaded = for_inference(load_model(tmp_path / "imp", "cpu"), "float32", compile=False)
    tok = loaded.tokenizer
    limits = api.Limits(64, 16, Sampling(8, temperature=0))
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."},
             {"role": "user", "content": "?"}]
    job = api.parse_chat({"messages": turns}, tok, limits, loaded.cfg)
    want = tok.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo.<|im_end|>\n<|im_start|>user\n?"
                      "<|im_end|>\n<|im_start|>assistant\n")
    assert job.requests[0].prompt == want  # no special token added: the template wrote them
    assert loaded.engine.end_ids == {301, 0}
    # a template that refuses: its message, one line, as a 400 on messages
    loaded.cfg.tokenizer.chat_template = "{{ raise_exception('Conversation roles must alternate\\nuser/assistant') }}"
    with pytest.raises(api.ApiError) as e:
        api.parse_chat({"messages": turns}, tok, limits, loaded.cfg)
    assert e.value.param == "messages" and e.value.message == (
        "the chat template refused the conversation: Conversation roles must alternate user/assistant")
    loaded.cfg.tokenizer.chat_template = CHATML
    # infer --chat: the same rendering, encoded as it is
    seen = []
    run = loaded.engine.run
    loaded.engine.run = lambda requests, **kw: (seen.extend(requests), run(requests, **kw))[1]
    session = ChatSession(loaded, Sampling(4, temperature=0))
    answer = "".join(session.reply("Hi"))
    assert seen[0].prompt == tok.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert session.messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": answer}]


def test_gguf_carries_the_models_template(chatml_dir, runner, tmp_path):
    gguf = pytest.importorskip("gguf")
    assert invoke(runner, "import", "hf", chatml_dir, "--out", tmp_path / "imp").exit_code == 0
    r = invoke(runner, "export", "--ckpt", tmp_path / "imp", "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert r.exit_code == 0, r.output
    field = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == CHATML
