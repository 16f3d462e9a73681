import torch

from llmctl.config import ModelConfig
from llmctl.heads import Classifier
from llmctl.model import Transformer


def test_classifier_reads_the_last_real_token_and_ignores_padding():
    torch.manual_seed(0)
    clf = Classifier(Transformer(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=30)), 3).eval()
    a = torch.tensor([[5, 6, 7, 2]])
    padded = torch.tensor([[5, 6, 7, 2, 1, 1, 1], [9, 9, 2, 1, 1, 1, 1]])
    out = clf(padded, torch.tensor([4, 3]))
    assert out.shape == (2, 3)
    assert torch.allclose(out[0], clf(a, torch.tensor([4]))[0], atol=1e-6)
    assert torch.allclose(out[1], clf(torch.tensor([[9, 9, 2]]), torch.tensor([3]))[0], atol=1e-6)
