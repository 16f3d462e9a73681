import pytest
import torch

from llmctl.config import ModelConfig
from llmctl.model import Transformer

SHAPES = {
    "gpt2": ModelConfig(arch="gpt2", n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=50),
    "gpt2-nobias-untied": ModelConfig(arch="gpt2", n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50,
                                      bias=False, tie_embeddings=False, activation="gelu_tanh"),
    "llama-gqa": ModelConfig(arch="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=16, vocab_size=50,
                             mlp_hidden=72),
    "llama-tied-bias": ModelConfig(arch="llama", n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50,
                                   tie_embeddings=True, bias=True, rope_theta=500.0),
    # every open-model switch at once (Gemma-, Qwen- and Phi-style), a window shorter than the test sequences
    "open-switches": ModelConfig(arch="llama", n_layer=3, n_head=4, n_kv_head=2, n_embd=32, head_dim=12,
                                 block_size=16, vocab_size=50, qkv_bias=True, qk_norm=True, norm_offset=True,
                                 gate_activation="gelu_tanh", embed_scale=True, post_norms=True, attn_softcap=20.0,
                                 final_softcap=15.0, query_scale=10.0, sliding_window=3,
                                 layer_types=["sliding", "full", "sliding"], rope_local_theta=100.0,
                                 rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                               "original_max_position_embeddings": 8},
                                 rotary_fraction=0.5),
    "mistral-like": ModelConfig(arch="llama", n_layer=2, n_head=4, n_kv_head=1, n_embd=32, block_size=16,
                                vocab_size=50, sliding_window=5,
                                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 4}),
}


@pytest.mark.parametrize("name", SHAPES)
def test_shapes_and_parameter_count(name):
    cfg = SHAPES[name]
    torch.manual_seed(0)
    m = Transformer(cfg)
    x = torch.randint(0, 50, (3, 10))
    assert m(x).shape == (3, 10, 50)
    assert m.hidden(x).shape == (3, 10, cfg.n_embd)
    assert (m.lm_head.weight is m.wte.weight) == cfg.tied
    assert (m.wpe is not None) == (cfg.arch == "gpt2")
    hd = cfg.head_size
    assert m.blocks[0].attn.qkv.weight.shape == ((cfg.n_head + 2 * cfg.kv_heads) * hd, cfg.n_embd)
    assert m.num_params() == sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", SHAPES)
def test_causal(name):
    """Changing a later token never changes earlier logits."""
    torch.manual_seed(0)
    m = Transformer(SHAPES[name]).eval()
    x = torch.randint(0, 50, (1, 12))
    y = x.clone()
    y[0, 8] = (y[0, 8] + 1) % 50
    assert torch.allclose(m(x)[:, :8], m(y)[:, :8], atol=1e-6)
    assert not torch.allclose(m(x)[:, 8:], m(y)[:, 8:])


@pytest.mark.parametrize("name", SHAPES)
def test_cache_prefill_and_decode_match_full_forward(name):
    from llmctl.model import KVCache

    torch.manual_seed(0)
    m = Transformer(SHAPES[name]).eval()
    x = torch.randint(0, 50, (2, 12))
    full = m(x)
    cache = KVCache.empty(m.cfg, 2, 16, torch.float32, "cpu")
    pre = [m(x[b : b + 1, :7], cache=cache, slot=b) for b in range(2)]  # each slot prefilled on its own
    steps = [m(x[:, i : i + 1], cache=cache, pos=torch.tensor([i, i]), kv_len=i + 1) for i in range(7, 12)]
    assert torch.allclose(torch.cat([torch.cat(pre), *steps], 1), full, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "open-switches", "mistral-like"])
def test_slots_at_different_positions_decode_independently(name):
    from llmctl.model import KVCache

    torch.manual_seed(0)
    m = Transformer(SHAPES[name]).eval()
    a, b = torch.randint(3, 50, (1, 9)), torch.randint(3, 50, (1, 4))
    cache = KVCache.empty(m.cfg, 3, 16, torch.float32, "cpu")
    m(a[:, :8], cache=cache, slot=0)
    m(b[:, :3], cache=cache, slot=1)
    tok = torch.tensor([[a[0, 8]], [b[0, 3]], [0]])  # slot 2 is idle: a dummy token at position 0
    got = m(tok, cache=cache, pos=torch.tensor([8, 3, 0]))[:, -1]  # the whole cache read (as when compiled)
    assert torch.allclose(got[0], m(a)[0, -1], atol=1e-5) and torch.allclose(got[1], m(b)[0, -1], atol=1e-5)


def test_dropout_only_in_training():
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20, dropout=0.5)
    m = Transformer(cfg)
    x = torch.randint(0, 20, (2, 8))
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    assert not torch.equal(m(x), m(x))


def test_a_sliding_layer_reads_only_its_window():
    """In a model whose every layer slides over 4 positions, a token more than 4 * n_layer - n_layer positions back
    cannot reach the last logits; the same change inside the receptive field does."""
    cfg = ModelConfig(arch="llama", n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=50, sliding_window=4)
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    x = torch.randint(0, 50, (1, 14))
    reach = 2 * (4 - 1)  # each layer looks 3 positions back: position 13 sees 7..13 after two layers
    far, near = x.clone(), x.clone()
    far[0, 13 - reach - 1] = (far[0, 13 - reach - 1] + 1) % 50
    near[0, 13 - reach] = (near[0, 13 - reach] + 1) % 50
    assert torch.equal(m(x)[0, -1], m(far)[0, -1])
    assert not torch.allclose(m(x)[0, -1], m(near)[0, -1])
    full = Transformer(ModelConfig(**{**cfg.__dict__, "sliding_window": None})).eval()
    full.load_state_dict(m.state_dict())
    assert not torch.allclose(full(x)[0, -1], full(far)[0, -1])  # without the window it would


def test_offset_norms_start_as_identity_scales_and_softcaps_bound_logits():
    cfg = SHAPES["open-switches"]
    torch.manual_seed(0)
    m = Transformer(cfg)
    norms = [p for n, p in m.named_parameters() if "norm" in n]
    assert norms and all(torch.count_nonzero(p) == 0 for p in norms)  # (1 + w) with w = 0
    assert m.blocks[0].attn.q_norm.weight.shape == (12,) and m.blocks[0].attn.qkv.bias is not None
    assert m.blocks[0].attn.proj.bias is None  # q/k/v bias only (Qwen2's layout)
    with torch.no_grad():
        m.lm_head.weight.mul_(1000)
    x = torch.randint(0, 50, (1, 8))
    assert m(x).abs().max() <= 15.0 and m.lm_head(m.hidden(x)).abs().max() > 100  # capped, and it had to be


# two rows of packed documents (ids in contiguous runs), lengths 5 + 11 and 7 + 2 + 7
DOCS = [[5, 11], [7, 2, 7]]


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "mistral-like", "open-switches"])
def test_document_masked_rows_equal_each_document_alone(name):
    """With `segments`, a packed row's logits are each document's own (positions restart, no attention across)."""
    torch.manual_seed(0)
    m = Transformer(SHAPES[name]).eval()
    x = torch.randint(0, 50, (2, 16))
    segments = torch.tensor([sum(([d] * n for d, n in enumerate(row)), []) for row in DOCS])
    packed = m(x, segments=segments)
    for b, row in enumerate(DOCS):
        start = 0
        for n in row:
            alone = m(x[b : b + 1, start : start + n])
            torch.testing.assert_close(packed[b : b + 1, start : start + n], alone, rtol=1e-5, atol=1e-5)
            start += n
    assert not torch.allclose(packed, m(x), atol=1e-3)  # (the documents did read across without segments)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_segment_positions_and_flex_masks_match_the_sdpa_masks():
    from llmctl.model import segment_masks, segment_positions

    segments = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [4, 4, 4, 4, 4, 4, 9, 9]])
    assert segment_positions(segments).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1]]
    full, sliding = segment_masks(segments, window=2)
    assert full[0, 0, 4].tolist() == [False, False, False, True, True, False, False, False]
    assert sliding[1, 0, 5].tolist() == [False, False, False, False, True, True, False, False]
    pytest.importorskip("torch.nn.attention.flex_attention")
    from llmctl.model import flex_attention

    q, k, v = torch.randn(3, 2, 2, 8, 16).unbind(0)
    for dense, block in zip((full, sliding), segment_masks(segments, window=2, flex=True)):
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        torch.testing.assert_close(flex_attention(q, k, v, block, None, False), want, rtol=1e-5, atol=1e-5)


def test_relu2_is_an_ungated_mlp_of_relu_squared_in_either_flavour():
    for arch in ("gpt2", "llama"):
        cfg = ModelConfig(arch=arch, n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20, activation="relu2")
        torch.manual_seed(0)
        mlp = Transformer(cfg).blocks[0].mlp
        assert not mlp.gated and mlp.fc.weight.shape == (64, 16)  # 4 x n_embd, one projection
        x = torch.randn(2, 3, 16)
        expected = mlp.proj(torch.relu(mlp.fc(x)) ** 2)
        assert torch.allclose(mlp(x), expected, atol=1e-6), arch


def test_zero_initialised_projections_make_every_block_the_identity_at_the_start():
    cfg = ModelConfig(arch="llama", n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=20, zero_init_proj=True)
    torch.manual_seed(0)
    m = Transformer(cfg)
    assert all(not b.attn.proj.weight.any() and not b.mlp.proj.weight.any() for b in m.blocks)
    x = torch.randint(0, 20, (2, 8))
    assert torch.equal(m.hidden(x), m.norm(m.wte(x)))  # the residual stream passes through untouched
    assert m.blocks[0].attn.qkv.weight.std() > 0.01  # the rest keeps its normal initialisation


def test_a_llama_with_relu2_has_no_transformers_architecture_and_export_says_so():
    from llmctl.errors import LlmctlError
    from llmctl.hf.configs import model_config_json

    cfg = ModelConfig(arch="llama", n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20, activation="relu2")
    with pytest.raises(LlmctlError, match='model.activation="relu2": LlamaForCausalLM has no such setting'):
        model_config_json(cfg)
    gpt2 = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20, activation="relu2")
    assert model_config_json(gpt2)["activation_function"] == "relu2"
