"""QLoRA: NF4 base weights through torchao (the qlora extra), adapters beside them; finetune, load and merged export."""

import copy
import json
import sys

import pytest
import torch
from typer.testing import CliRunner

from conftest import SHAKESPEARE, TINY, invoke, sets
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
# the smallest llama-flavour widths whose every adapted weight NF4 takes (a multiple of 64 x 256 values)
WIDE = ["model.arch=llama", "model.n_layer=2", "model.n_head=4", "model.n_kv_head=2", "model.n_embd=256",
        "model.mlp_hidden=512"]


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


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    if not SHAKESPEARE.exists():
        pytest.skip(f"{SHAKESPEARE} is absent (the shared data directory)")
    runner = CliRunner()
    tmp = tmp_path_factory.mktemp("qlora")
    base = tmp / "base"
    r = invoke(runner, "pretrain", *sets(*TINY, *WIDE, "train.max_steps=2", "train.eval_interval=0"), "--out", base,
               "--quiet")
    assert r.exit_code == 0, r.output
    run = tmp / "qlora"
    r = invoke(runner, "finetune", "--from", base, *sets(f"data.path={SHAKESPEARE}", "finetune.method=qlora",
               "train.max_steps=20", "train.lr=1e-2", "train.warmup_steps=2", "train.log_interval=1",
               "train.batch_size=4", "train.dtype=float32", "train.eval_interval=0"), "--out", run, "--quiet")
    assert r.exit_code == 0, r.output
    return base, run


def test_qlora_finetune_trains_and_saves_only_the_adapter(qlora_run):
    base, run = qlora_run
    loss = losses(run)
    assert len(loss) == 20 and sum(loss[-5:]) / 5 < sum(loss[:5]) / 5 - 0.1  # (seeded: 3.63 -> 3.49 here)
    ck = ckpt_io.load(run)
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
    assert (merged - unmerged).abs().max().item() < 1e-4


def test_merged_export_of_a_qlora_run_equals_llmctl_in_transformers(qlora_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    _, run = qlora_run
    r = invoke(CliRunner(), "export", "--ckpt", run, "--format", "hf", "--merge-lora", "--out", tmp_path / "hf")
    assert r.exit_code == 0, r.output
    ours = load_model(run, "cpu").model
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)).abs().max().item() < 1e-4


def test_dry_run_counts_nf4_and_checkpointing_and_sizes_a_gpu(qlora_run):
    base, _ = qlora_run
    r = invoke(CliRunner(), "finetune", "--from", base, *sets(f"data.path={SHAKESPEARE}", "finetune.method=qlora",
               "train.max_steps=3"), "--out", base / "never", "--dry-run", "--gpu-memory", "1MB", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    m = report["memory"]
    assert m["checkpointing"] is True and m["needed"] == m["total_checkpointed"] < m["total"]
    assert m["device_capacity"] == 10**6 and m["fits"] is False and report["fits"] is False
    assert report["memory_for"].startswith("a CUDA GPU of 1,000,000 bytes")
    assert m["weights_trainable"] == 0 and m["gradients"] == m["adapters"] and m["optimizer"] == 2 * m["adapters"]
    blocks = 2 * (256 * 512 + 256 * 256 + 256 * 1024 + 512 * 256)  # every adapted weight of the 2 blocks is NF4
    rope = 2 * 32 * 64 * 4  # the cos and sin tables: block_size x head_size, float32
    assert 0.5 * blocks < m["weights_frozen"] - rope - 4 * (report["parameters"]["total"] - m["adapters"] // 4 - blocks
                                                            ) < 0.53 * blocks
