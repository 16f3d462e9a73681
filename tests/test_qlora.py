"""QLoRA: NF4 base weights through torchao (the qlora extra), adapters beside them; finetune, load and merged export."""

import copy
import json
import sys

import pytest
import torch
from typer.testing import CliRunner

from conftest import ROOT, SHAKESPEARE, invoke, sets
from llmctl import checkpoint as ckpt_io
from llmctl.config import ModelConfig
from llmctl.errors import LlmctlError
from llmctl.loading import load_model
from llmctl.lora import LoRALinear, apply_lora, lora_state, merge_lora
from llmctl.model import Transformer
from llmctl.qlora import quantize_base, round_trip_base, stored_bytes

torchao = pytest.importorskip("torchao")
from torchao.quantization import NF4Tensor, to_nf4  # noqa: E402

TARGETS = ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"]


def model(n_embd=256) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(arch="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=n_embd, mlp_hidden=2 * n_embd,
                                   block_size=16, vocab_size=100)).eval()


def adapted(m: Transformer) -> Transformer:
    apply_lora(m, TARGETS, rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_b.normal_(0, 0.05)  # a trained-looking adapter (B starts at zero)
    return m


def test_nf4_forward_equals_the_dequantized_model():
    nf4 = adapted(model())
    dequantized = copy.deepcopy(nf4)
    full = copy.deepcopy(nf4)
    names = quantize_base(nf4)
    round_trip_base(dequantized)
    assert len(names) == 8 and all(isinstance(nf4.get_submodule(n).weight, NF4Tensor) for n in names)
    assert set(lora_state(nf4)) == set(lora_state(full))  # the adapters are the same tensors, not quantized
    x = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b, c = nf4(x), dequantized(x), full(x)
    # the NF4 layer computes with dequant(NF4(W)), which is what round_trip_base stores: float rounding only
    assert (a - b).abs().max().item() < 1e-5
    # ... and the quantization is real: NF4's 4-bit error shows against the full-precision base
    assert (a - c).abs().max().item() > 1e-3
    w = full.blocks[0].attn.qkv.weight
    assert (to_nf4(w.detach()).get_original_weight() - w).abs().max() < w.abs().max() / 4  # 16 levels per block
    q = nf4.blocks[0].attn.qkv.weight  # 4 bits a value, one int8 scaler per 64 values, a float per 256 scalers
    assert q.numel() // 2 + q.numel() // 64 < stored_bytes(q) < 0.52 * q.numel() < stored_bytes(w) / 7


def test_gradients_reach_only_the_adapters():
    m = adapted(model())
    quantize_base(m)
    m.train()
    loss = m(torch.randint(0, 100, (2, 16))).float().pow(2).mean()
    loss.backward()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state(m))
    assert all(m.get_submodule(n[: -len(".lora_a")]).lora_a.grad is not None for n in trainable if n.endswith("a"))


def test_a_model_nf4_cannot_store_is_an_error():
    m = model(n_embd=32)  # at most 128 x 32 values: less than 64 x 256
    apply_lora(m, TARGETS, rank=4, alpha=8, dropout=0.0)
    with pytest.raises(LlmctlError, match="none of the 8 adapted linear layers has a weight NF4 can store"):
        quantize_base(m)


def test_without_torchao_the_error_names_the_extra(monkeypatch):
    m = adapted(model())
    monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao` now raises ImportError
    with pytest.raises(LlmctlError, match=r"pip install 'llmctl\[qlora\]'"):
        quantize_base(m)


def losses(run) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# the smallest Llama 3.2-shaped model whose every adapted weight NF4 takes: 128 wide, 4 heads of 32, 2 key/value
# heads, MLP 256, tied embeddings, llama3 RoPE scaling; its vocabulary a byte-level BPE of 512 tokens (what QLoRA
# quantizes is the blocks' linears, whatever the vocabulary: Llama 3's 128,256 tokens made each step ~250x dearer
# here; tests/test_open_models.py takes the real tokenizers through import, finetune and export)
WIDTH, CONTEXT, VOCAB = 128, 32, 512
SENTENCE = "Hello from llmctl, said the model. "  # a text the random model learns in a dozen LoRA steps


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "hello.txt"
    path.write_text(SENTENCE * 1500)
    return path


def hub_dir(out):
    """A random-weight Llama 3.2-shaped model as the hub holds it (scripts/tiny_open_model.py's config) with a
    byte-level BPE tokenizer of VOCAB tokens trained on the sentence and Tiny Shakespeare (the sentence is 10
    tokens, as in Llama 3's: a prompt and 16 generated tokens fit the context)."""
    import importlib.util

    transformers = pytest.importorskip("transformers")
    from llmctl.tokenizer import Tokenizer

    spec = importlib.util.spec_from_file_location("tiny_open_model", ROOT / "scripts" / "tiny_open_model.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    tok = Tokenizer.train_bpe([SENTENCE * 100, SHAKESPEARE.read_text()[:100_000]], VOCAB)
    cfg = tiny.config("llama3.2", WIDTH, 2, CONTEXT)
    cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.vocab_size, None, tok.eos_id, None
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save(out / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, text):
    """`import hf` of a random-weight Llama 3.2-shaped model as the hub holds it, then a qlora finetune of it on a
    repeated sentence: (imported run, qlora run)."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"needs {SHAKESPEARE} (the shared data directory)")
    runner = CliRunner()
    tmp = tmp_path_factory.mktemp("qlora")
    hub = hub_dir(tmp / "hub")
    base = tmp / "base"
    r = invoke(runner, "import", "hf", hub, "--out", base, "--quiet")
    assert r.exit_code == 0, r.output
    run = tmp / "qlora"
    r = invoke(runner, "finetune", "--from", base, *sets(*FT(text), "train.max_steps=12", "train.batch_size=2"),
               "--out", run, "--quiet")
    assert r.exit_code == 0, r.output
    return base, run


def FT(text) -> list[str]:  # noqa: N802  (the finetune settings every test here shares)
    return [f"data.path={text}", "finetune.method=qlora", "finetune.lora_rank=16", "train.lr=2e-2",
            "train.warmup_steps=2", "train.log_interval=1", "train.dtype=float32", "train.eval_interval=0"]


def test_qlora_finetune_trains_and_saves_only_the_adapter(qlora_run):
    base, run = qlora_run
    loss = losses(run)
    assert len(loss) == 12 and sum(loss[-4:]) / 4 < sum(loss[:4]) / 4 - 5, loss  # (16.7 -> 0.3 here)
    ck = ckpt_io.load(run)
    assert ck.config["model"]["tie_embeddings"] and ck.config["model"]["rope_scaling"]["rope_type"] == "llama3"
    assert ck.meta["method"] == "qlora" and ckpt_io.ADAPTER in ck.meta["files"]
    assert ckpt_io.WEIGHTS not in ck.meta["files"]  # the base is referenced, never re-saved in NF4
    assert set(ck.weights(ckpt_io.ADAPTER)) == {f"blocks.{i}.{t}.{ab}" for i in range(2) for t in TARGETS
                                               for ab in ("lora_a", "lora_b")}
    assert ck.config["train"]["activation_checkpointing"] is True  # on by default for qlora


def test_loaded_qlora_adapter_sits_on_the_dequantized_base_and_merges(qlora_run, tmp_path):
    base, run = qlora_run
    loaded = load_model(run, "cpu").model
    plain = ckpt_io.load(base).weights()
    w = loaded.blocks[1].mlp.fc.weight
    assert not isinstance(w, NF4Tensor)
    assert torch.equal(w, to_nf4(plain["blocks.1.mlp.fc.weight"]).get_original_weight())
    ids = torch.randint(0, loaded.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        unmerged = loaded(ids)
        merged = merge_lora(loaded)(ids)
    assert (merged - unmerged).abs().max().item() < 1e-4 * unmerged.abs().max().item()  # float rounding


def test_merged_export_of_a_qlora_run_generates_llmctls_greedy_tokens_in_transformers(qlora_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    from llmctl.generate import generate

    _, run = qlora_run
    r = invoke(CliRunner(), "export", "--ckpt", run, "--format", "hf", "--merge-lora", "--out", tmp_path / "hf")
    assert r.exit_code == 0, r.output
    loaded = load_model(run, "cpu", dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = loaded.tokenizer.encode_prompt(SENTENCE + "Hello from")
    ours = list(generate(loaded.model, ids, 16, temperature=0))  # no end id: 16 tokens either way
    with torch.no_grad():
        out = theirs.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
        logits = theirs(out).logits
    assert out[0, len(ids):].tolist() == ours
    assert (logits - loaded.model(out)).abs().max().item() < 1e-4 * logits.abs().max().item()


def test_dry_run_counts_nf4_and_checkpointing_and_sizes_a_gpu(qlora_run, text):
    base, _ = qlora_run
    r = invoke(CliRunner(), "finetune", "--from", base, *sets(*FT(text), "train.max_steps=3"), "--out",
               base / "never", "--dry-run", "--gpu-memory", "1MB", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    m = report["memory"]
    assert m["checkpointing"] is True and m["needed"] == m["total_checkpointed"] < m["total"]
    assert m["device_capacity"] == 10**6 and m["fits"] is False and report["fits"] is False
    assert report["memory_for"].startswith("a CUDA GPU of 1,000,000 bytes")
    assert m["weights_trainable"] == 0 and m["gradients"] == m["adapters"] and m["optimizer"] == 2 * m["adapters"]
    m_cfg = report["config"]["model"]
    head = m_cfg["n_embd"] // m_cfg["n_head"]
    blocks = 2 * (256 * 128 + 128 * 128 + 512 * 128 + 128 * 256)  # every adapted weight of the 2 blocks is NF4
    rope = 2 * m_cfg["block_size"] * head * 4  # the cos and sin tables, float32
    plain = 4 * (report["parameters"]["total"] - m["adapters"] // 4 - blocks)  # embedding (tied) and norms
    assert 0.5 * blocks < m["weights_frozen"] - rope - plain < 0.53 * blocks


def test_qlora_interrupted_then_resumed_equals_uninterrupted(qlora_run, text, tmp_path):
    """SIGTERM mid-run saves the adapter and the optimizer; the resumed run on the same NF4 base continues
    bit-identically (the NF4 base is quantized again from the same base weights, deterministically)."""
    import os
    import signal

    from llmctl.commands import training as training_cmd
    from llmctl.rundir import read_status

    base, _ = qlora_run
    cfg = [*FT(text), "finetune.lora_dropout=0.1", "train.max_steps=4", "train.batch_size=2",
           "train.save_interval=2"]
    full, part = tmp_path / "full", tmp_path / "part"
    training_cmd.finetune(None, cfg, base, full)

    def stop_at_2(state):
        if state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # finish this step, save, exit 143

    with pytest.raises(LlmctlError) as e:
        training_cmd.finetune(None, cfg, base, part, on_step=stop_at_2)
    assert e.value.status == 143 and (part / "step-0000002").is_dir()
    training_cmd.finetune(None, cfg, base, part, resume=True)
    assert read_status(part)["status"] == "finished"
    assert losses(part) == losses(full) and len(losses(full)) == 4
    a, b = ckpt_io.load(full).weights(ckpt_io.ADAPTER), ckpt_io.load(part).weights(ckpt_io.ADAPTER)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def one_process(qlora_run, text, tmp_path_factory):
    """The reference for the torchrun tests: one process, batch 4."""
    from llmctl.commands import training as training_cmd

    base, _ = qlora_run
    out = tmp_path_factory.mktemp("qlora-one") / "one"
    training_cmd.finetune(None, [*FT(text), *DIST, "train.batch_size=4"], base, out)
    return out


DIST = ["train.max_steps=2", "train.eval_interval=2", "train.eval_batches=2"]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_qlora_in_two_processes_logs_the_losses_of_one(qlora_run, text, one_process, tmp_path, parallel):
    """DDP leaves the frozen NF4 weights alone (same base, same quantization on every rank) and logs one process's
    losses; FSDP2 shards them in whole scaler blocks, which this model's smallest weight cannot be split into."""
    from test_distributed import TOL, assert_same_losses, rows, torchrun
    from test_distributed import losses as dist_losses

    base, _ = qlora_run
    out = tmp_path / parallel
    r = torchrun("finetune", "--from", str(base), *sets(*FT(text), *DIST, "train.batch_size=2",
                                                              f"train.parallel={parallel}"),
                 "--out", str(out), "--quiet")
    if parallel == "fsdp":  # attn.proj (128 x 128) is one block of 64 x 256 values: no half for each rank
        assert r.returncode != 0 and "error: train.parallel=fsdp shards each NF4 weight over the 2 ranks" in r.stderr
        assert "blocks.0.attn.proj.weight (128, 128) has 1; use train.parallel=ddp" in r.stderr
        return
    assert r.returncode == 0, r.stderr[-3000:]
    assert "unwaited collective" not in r.stderr  # (the frozen NF4 weights are never gathered for a checkpoint)
    assert_same_losses(dist_losses(one_process), dist_losses(out), range(1, 3))
    val = [[row["val_loss"] for row in rows(run) if "val_loss" in row] for run in (one_process, out)]
    assert len(val[0]) == 1 and abs(val[0][0] - val[1][0]) < TOL
    a, b = ckpt_io.load(one_process).weights(ckpt_io.ADAPTER), ckpt_io.load(out).weights(ckpt_io.ADAPTER)
    assert sorted(a) == sorted(b)
    # Adam divides by the root of the squared gradient: where a gradient is ~0, float rounding of the all-reduce
    # moves a weight by up to lr; everywhere else the adapters agree closely
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 2e-2 * 0.1
