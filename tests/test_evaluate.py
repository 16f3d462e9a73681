import math

import pytest
import torch

from llmctl.config import ModelConfig
from llmctl.data import eval_blocks
from llmctl.evaluate import classification_metrics, lm_metrics
from llmctl.model import Transformer


def test_classification_metrics_golden():
    gold = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 2, 2]
    m = classification_metrics(pred, gold, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion"]["matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    pc = m["per_class"]
    assert pc["a"]["precision"] == 1.0 and pc["a"]["recall"] == pytest.approx(2 / 3)
    assert pc["b"]["precision"] == 0.5 and pc["b"]["recall"] == 0.5
    assert pc["c"]["precision"] == 0.5 and pc["c"]["recall"] == 1.0
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_lm_metrics_match_a_direct_computation():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20)).eval()
    tokens = torch.randint(0, 20, (50,)).numpy()
    r = lm_metrics(m, eval_blocks(tokens, 8, 3), torch.device("cpu"), n_bytes=100)
    total = 0.0
    for s in range(0, 49, 8):
        x = torch.tensor(tokens[s : min(s + 8, 49)])[None]
        y = torch.tensor(tokens[s + 1 : min(s + 9, 50)])
        total += torch.nn.functional.cross_entropy(m(x)[0], y, reduction="sum").item()
    assert r["tokens"] == 49 and r["loss"] == pytest.approx(total / 49, rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    assert r["bits_per_byte"] == pytest.approx(total / math.log(2) / 100, rel=1e-5)
