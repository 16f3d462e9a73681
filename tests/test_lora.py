import pytest
import torch

from llmctl.config import ModelConfig
from llmctl.errors import LlmctlError
from llmctl.lora import LoRALinear, apply_lora, lora_state, merge_lora
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
    apply_lora(m, ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"], rank=4, alpha=8, dropout=0.0)
    assert torch.equal(m(x), ref)  # B = 0 at the start


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_merged_equals_unmerged(arch):
    m = model(arch).eval()
    apply_lora(m, ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"], rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_b.normal_(0, 0.05)
    x = torch.randint(0, 100, (2, 12))
    unmerged = m(x)
    merge_lora(m)
    assert not any(isinstance(mod, LoRALinear) for mod in m.modules())
    assert (m(x) - unmerged).abs().max() < 1e-5


def test_target_matching_nothing_is_an_error():
    with pytest.raises(LlmctlError, match="attn.q_proj matches no linear layer"):
        apply_lora(model(), ["attn.qkv", "attn.q_proj"], rank=4, alpha=8, dropout=0.0)
