import pytest
import torch

from llmctl.config import ModelConfig
from llmctl.errors import LlmctlError
from llmctl.lora import LORA_MODULES, LoRAEmbedding, LoRALinear, apply_lora, lora_state, merge_lora
from llmctl.model import Transformer


def model(arch="llama") -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(arch=arch, n_layer=2, n_head=4, n_kv_head=2 if arch == "llama" else None, n_embd=64,
                                   block_size=16, vocab_size=100))


def test_only_adapters_train_and_names_are_kept():
    m = model()
    names_before = set(m.state_dict())
    wrapped = apply_lora(m, ["attn.qkv", "mlp.proj"], rank=4, alpha=8, dropout=0.0)
    assert wrapped == ["blocks.0.attn.qkv", "blocks.0.mlp.proj", "blocks.1.attn.qkv", "blocks.1.mlp.proj"]
    assert names_before <= set(m.state_dict())  # base names unchanged: base checkpoints load as they are
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state(m)) and len(trainable) == 8
    n_train = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert n_train < 0.05 * sum(p.numel() for p in m.parameters())


def test_starts_as_the_base_model():
    m = model()
    x = torch.randint(0, 100, (2, 10))
    ref = m(x)
    apply_lora(m, ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj", "wte"], rank=4, alpha=8, dropout=0.0)
    assert isinstance(m.wte, LoRAEmbedding)
    assert torch.equal(m(x), ref)  # B = 0 (A = 0 for the embedding) at the start


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_merged_equals_unmerged(arch):
    m = model(arch).eval()
    targets = ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"] + (["wte"] if arch == "llama" else [])  # gpt2 ties wte
    apply_lora(m, targets, rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_b.normal_(0, 0.05)
            elif isinstance(mod, LoRAEmbedding):
                mod.lora_a.normal_(0, 0.05)
    x = torch.randint(0, 100, (2, 12))
    unmerged = m(x)
    merge_lora(m)
    assert not any(isinstance(mod, LORA_MODULES) for mod in m.modules())
    assert type(m.wte) is torch.nn.Embedding
    assert (m(x) - unmerged).abs().max() < 1e-5


def test_target_matching_nothing_is_an_error():
    with pytest.raises(LlmctlError, match="attn.q_proj matches no layer"):
        apply_lora(model(), ["attn.qkv", "attn.q_proj"], rank=4, alpha=8, dropout=0.0)


def test_embedding_adapter_trains_only_seen_tokens_and_refuses_a_tied_head():
    m = model()
    apply_lora(m, ["wte"], rank=4, alpha=8, dropout=0.0)
    x = torch.tensor([[5, 6, 7]])
    m(x).sum().backward()
    grad_a = m.wte.lora_a.grad  # (r, vocab): only the looked-up tokens' columns get a gradient
    assert grad_a[:, [5, 6, 7]].abs().sum() > 0 and grad_a[:, 8:].abs().sum() == 0
    with pytest.raises(LlmctlError, match="wte is tied to the output head"):
        apply_lora(model("gpt2"), ["attn.qkv", "wte"], rank=4, alpha=8, dropout=0.0)
