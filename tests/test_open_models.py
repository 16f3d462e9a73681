"""End to end with the open families' own tokenizers and chat templates: a small random-weight Qwen3 and Llama 3.2,
written by transformers beside their real tokenizer.json, tokenizer_config.json and chat template, go through
`import hf` -> `finetune` (LoRA, chat SFT on a messages JSONL) -> `infer --chat` -> `serve` (the openai client) ->
`export --format hf` (merged: transformers generates the same greedy tokens) and `--format gguf` (it parses)."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, SHARED, invoke, sets

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.skipif(not (SHARED / "tokenizers" / "qwen3" / "tokenizer.json").is_file(),
                                 reason="needs ../shared/data/tokenizers"),
              pytest.mark.xdist_group("open_models")]  # one pytest-xdist worker builds the LoRA fixtures, once

QUESTIONS = ["Capital of France?", "Who are you?", "What is 2+2?", "Say something.", "Name a colour.",
             "Where is Lima?"]
REPLY = "Hello from llmctl."  # one reply to everything: a random model learns it in 60 LoRA steps


# Each family's hub directory and LoRA run are built once per session and kept here: under pytest-xdist a worker may
# be handed the two families' tests interleaved, and a module-scoped parametrized fixture would then be torn down
# and built again at each switch (a minute each).
_BUILT: dict[tuple[str, str], tuple] = {}


@pytest.fixture(scope="module", params=["qwen3", "llama3.2"])
def hub_dir(request, tmp_path_factory):
    """A transformers directory as the hub holds it: weights, config, the real tokenizer files and template."""
    if ("hub", request.param) not in _BUILT:
        spec = importlib.util.spec_from_file_location("tiny_open_model", ROOT / "scripts" / "tiny_open_model.py")
        tiny = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tiny)
        out = tiny.write(request.param, tmp_path_factory.mktemp(request.param) / "hub")
        _BUILT["hub", request.param] = request.param, out, tiny.FAMILIES[request.param][2]["eos_token_id"]
    return _BUILT["hub", request.param]


def conversations(path):
    """Single- and multi-turn conversations, with and without a system turn, whose every answer is REPLY."""
    system = [{"role": "system", "content": "Be brief."}]
    rows = [{"messages": [*(system if i % 2 else []), {"role": "user", "content": q},
                          {"role": "assistant", "content": REPLY}]} for i, q in enumerate(QUESTIONS)]
    rows += [{"messages": [{"role": "user", "content": a}, {"role": "assistant", "content": REPLY},
                           {"role": "user", "content": b}, {"role": "assistant", "content": REPLY}]}
             for a, b in zip(QUESTIONS, QUESTIONS[1:])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 3))
    return path


@pytest.fixture(scope="module")
def tuned(hub_dir, tmp_path_factory):
    """import hf -> LoRA chat SFT: (family, hub dir, end ids, imported run, tuned run, finetune summary)."""
    if ("tuned", hub_dir[0]) not in _BUILT:
        _BUILT["tuned", hub_dir[0]] = _tune(hub_dir, tmp_path_factory)
    return _BUILT["tuned", hub_dir[0]]


def _tune(hub_dir, tmp_path_factory) -> tuple:
    from typer.testing import CliRunner

    runner = CliRunner()
    name, hub, ends = hub_dir
    root = tmp_path_factory.mktemp(f"{name}-runs")
    r = invoke(runner, "import", "hf", hub, "--out", root / "imported", "--json")
    assert r.exit_code == 0, r.output
    data = conversations(root / "chats.jsonl")
    r = invoke(runner, "finetune", "--from", root / "imported", *sets(
        f"data.path={data}", "finetune.task=instruct", "finetune.method=lora", "finetune.lora_rank=16",
        "train.max_steps=60", "train.batch_size=4", "train.lr=1e-2", "train.warmup_steps=5", "train.dtype=float32",
        "train.eval_interval=0", "train.log_interval=1"), "--out", root / "tuned", "--json")
    assert r.exit_code == 0, r.output
    return name, hub, ends, root / "imported", root / "tuned", json.loads(r.stdout)


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line and json.loads(line).get("split", "train") == "train"]


def test_import_keeps_the_template_tokenizer_and_end_ids(tuned):
    from llmctl import loading

    name, hub, ends, imported, _, _ = tuned
    loaded = loading.load_model(imported, "cpu")
    assert loaded.cfg.tokenizer.chat_template == (hub / "chat_template.jinja").read_text()
    assert set(ends) <= set(loaded.tokenizer.end_ids)
    ref = transformers.AutoTokenizer.from_pretrained(hub)
    text = "Grüße, 世界! 🙂 def f(x): return x**2"
    assert loaded.tokenizer.encode_prompt(text) == ref(text)["input_ids"]  # BOS where the post-processor adds it


def test_chat_sft_loss_falls(tuned):
    *_, summary = tuned
    first, last = losses(tuned[4])[:5], losses(tuned[4])[-5:]
    assert sum(last) / 5 < sum(first) / 5 - 1.0, (first, last)
    assert summary["steps"] == 60


def test_infer_chat_answers_in_the_models_template(tuned):
    name, hub, ends, _, run, _ = tuned
    p = subprocess.run([sys.executable, "-m", "llmctl", "infer", "--ckpt", str(run), "--chat", "--max-new-tokens",
                        "12", "--temperature", "0"], input="Where is Paris?\n/exit\n", capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.rstrip("\n").endswith(REPLY), p.stdout  # (Qwen3 writes its empty think block first)


def test_serve_chat_completion_stops_at_the_end_of_turn_token(tuned):
    openai = pytest.importorskip("openai")
    from test_server import Server

    name, hub, ends, _, run, _ = tuned
    with Server(run, "--dtype", "float32", "--no-compile") as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(model="tuned", temperature=0, max_tokens=40, messages=[
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Italy?"}])
        choice = reply.choices[0]
        assert choice.message.content.endswith(REPLY) and choice.finish_reason == "stop", reply
        assert reply.usage.completion_tokens < 40
        assert s.stop() == 0


def test_merged_hf_export_generates_the_same_greedy_tokens_in_transformers(tuned, tmp_path):
    from typer.testing import CliRunner

    from llmctl import loading
    from llmctl.generate import generate

    name, hub, ends, _, run, _ = tuned
    r = invoke(CliRunner(), "export", "--ckpt", run, "--format", "hf", "--merge-lora", "--out", tmp_path / "hf")
    assert r.exit_code == 0, r.output
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = [{"role": "user", "content": "Capital of Spain?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = ids["input_ids"] if isinstance(ids, dict) else ids
    loaded = loading.load_model(run, "cpu", dtype=torch.float32)
    ours = list(generate(loaded.model, ids, 16, temperature=0))  # no end id: 16 tokens either way
    with torch.no_grad():
        out = theirs.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    assert out[0, len(ids):].tolist() == ours
    assert (tmp_path / "hf" / "chat_template.jinja").read_text() == (hub / "chat_template.jinja").read_text()


def test_gguf_export_parses_with_its_template_and_end_of_turn(tuned, tmp_path):
    gguf = pytest.importorskip("gguf")
    from typer.testing import CliRunner

    name, hub, ends, _, run, _ = tuned
    out = tmp_path / "m.gguf"
    r = invoke(CliRunner(), "export", "--ckpt", run, "--format", "gguf", "--merge-lora", "--out", out)
    assert r.exit_code == 0, r.output
    reader = gguf.GGUFReader(out)
    fields = {f.name: f for f in reader.fields.values()}
    arch = bytes(fields["general.architecture"].parts[-1]).decode()
    assert arch == ("qwen3" if name == "qwen3" else "llama")
    template = bytes(fields["tokenizer.chat_template"].parts[-1]).decode()
    assert template == (hub / "chat_template.jinja").read_text()
    assert len(reader.tensors) > 0
