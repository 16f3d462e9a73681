"""Inference weight formats: the transposed float32 layout computes what nn.Linear does, with tied weights kept once."""

import torch

from llmctl.config import ModelConfig
from llmctl.generate import Engine, Request
from llmctl.model import Transformer
from llmctl.quantize import InputMajorLinear, convert
from llmctl.sampling import Sampling


def _model(arch: str) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(arch=arch, n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=97)).eval()


def test_input_major_layout_matches_linear_and_keeps_tied_weights_once():
    for arch in ("gpt2", "llama"):
        ref, m = _model(arch), convert(_model(arch), "float32", "none")
        assert all(type(x) is not torch.nn.Linear for x in m.modules())
        assert isinstance(m.lm_head, InputMajorLinear)
        if arch == "gpt2":  # tied: the embedding reads a view of the head's transposed weight, no second copy
            assert m.wte.weight.data_ptr() == m.lm_head.weight_t.data_ptr()
        idx = torch.randint(0, 97, (2, 20))
        with torch.no_grad():
            assert (ref(idx) - m(idx)).abs().max() < 1e-5
        reqs = [Request(list(range(3, 9)), Sampling(20, temperature=0))]
        assert list(Engine(ref).complete(reqs[0])) == list(Engine(m).complete(reqs[0]))


def test_bfloat16_keeps_the_usual_layout():
    m = convert(_model("llama"), "bfloat16", "none")
    assert m.lm_head.weight.dtype == torch.bfloat16 and type(m.lm_head) is torch.nn.Linear
