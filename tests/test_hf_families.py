"""The open-model families against transformers itself: Llama 3.2 and 3.1, Qwen2.5, Qwen3, Mistral, Gemma 2,
Gemma 3 (text), Phi-3 and Phi-4-mini.

Each family's model is built here by transformers from that family's own config class, keeping what sets the family
apart (RoPE scaling, q/k/v bias, QK-norm, a decoupled head size, sliding windows shorter than the test sequences,
soft-caps, query_pre_attn_scalar, partial rotary, the fused Phi-3 layout) at small widths, with every 1-D parameter
(norm weights, biases) moved away from its initial value; saved with save_pretrained and imported with
`llmctl import hf`. Checked: float32 logits of a full forward, cached decoding of several rows at different positions
(prefill into slots, then batched steps), 32 greedy tokens from llmctl's engine against transformers' `generate`,
bfloat16 logits, and export -> transformers -> import being bit-identical (weights and config values).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import SHARED, invoke
from llmctl import checkpoint as ckpt_io
from llmctl import hf
from llmctl.generate import Engine, Request
from llmctl.loading import load_model
from llmctl.model import KVCache
from llmctl.sampling import Sampling

transformers = pytest.importorskip("transformers")

TOL = 1e-4  # max abs logit difference in float32
BF16_TOL = 2e-2  # max abs difference over max abs logit, in bfloat16
VOCAB, CONTEXT, WINDOW = 96, 96, 8
# weights wide enough for sharp, varied greedy text (Gemma's embeddings are scaled by sqrt(width) already)
GEMMA_INIT = 0.06
SEQ = 24  # longer than every window below
COMMON = dict(vocab_size=VOCAB, max_position_embeddings=CONTEXT, hidden_size=64, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=80, num_hidden_layers=2, initializer_range=0.15,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}  # 64: all three bands of head size 16's frequencies at base 5e5


def _llama32():
    return transformers.LlamaConfig(**COMMON, tie_word_embeddings=True, rms_norm_eps=1e-5,
                                    rope_parameters={**LLAMA3, "rope_theta": 500000.0})


def _llama31():
    return transformers.LlamaConfig(**{**COMMON, "num_hidden_layers": 3}, tie_word_embeddings=False,
                                    rope_parameters={**LLAMA3, "factor": 8.0, "rope_theta": 500000.0})


def _qwen25():
    return transformers.Qwen2Config(**COMMON, tie_word_embeddings=True, rope_parameters={"rope_theta": 1e6})


def _qwen3():  # head_dim 32 with 4 heads on width 64: decoupled
    return transformers.Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=True,
                                    rope_parameters={"rope_theta": 1e6})


def _mistral():
    return transformers.MistralConfig(**COMMON, sliding_window=WINDOW, tie_word_embeddings=False)


def _gemma2():  # soft-caps small enough to bite at this width; query_pre_attn_scalar != head_dim
    return transformers.Gemma2Config(**{**COMMON, "num_hidden_layers": 3, "initializer_range": GEMMA_INIT},
                                     head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                                     final_logit_softcapping=3.0, sliding_window=WINDOW)


def _gemma3():  # sliding and full layers, each with its own RoPE base; linear scaling on the full ones (4B's)
    return transformers.Gemma3TextConfig(**{**COMMON, "num_hidden_layers": 3, "initializer_range": GEMMA_INIT},
                                         head_dim=16, query_pre_attn_scalar=24,
                                         sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention",
                                                                             "sliding_attention"],
                                         rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                             "rope_theta": 1e6},
                                                          "sliding_attention": {"rope_type": "default",
                                                                                "rope_theta": 1e4}})


def _phi3():  # Phi-3-mini's window (2047 of 4096) shrunk below the test sequences
    return transformers.Phi3Config(**{**COMMON, "num_key_value_heads": 4}, sliding_window=12,
                                   original_max_position_embeddings=CONTEXT, tie_word_embeddings=False)


def _phi4_mini():  # partial rotary 0.75, tied, a window past the context (as Phi-4-mini's 262144), no longrope
    return transformers.Phi3Config(**COMMON, partial_rotary_factor=0.75, sliding_window=262144,
                                   original_max_position_embeddings=CONTEXT, tie_word_embeddings=True)


FAMILIES = {
    "llama3.2": (_llama32, "LlamaForCausalLM"), "llama3.1": (_llama31, "LlamaForCausalLM"),
    "qwen2.5": (_qwen25, "Qwen2ForCausalLM"), "qwen3": (_qwen3, "Qwen3ForCausalLM"),
    "mistral": (_mistral, "MistralForCausalLM"), "gemma2": (_gemma2, "Gemma2ForCausalLM"),
    "gemma3": (_gemma3, "Gemma3ForCausalLM"), "phi3": (_phi3, "Phi3ForCausalLM"),
    "phi4-mini": (_phi4_mini, "Phi3ForCausalLM"),
}


def perturb_1d(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Move norm weights and biases away from their init (ones or zeros), so a swapped norm or a lost bias shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


class Pair:
    """A family's transformers model (float32), where it was saved, and llmctl's import of it."""

    def __init__(self, theirs, src: Path, run: Path):
        self.theirs, self.src, self.run = theirs, src, run
        self.ours = load_model(run, "cpu", require_tokenizer=False).model.eval()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, runner):
    cache: dict[str, Pair] = {}

    def get(family: str) -> Pair:
        if family not in cache:
            build, arch = FAMILIES[family]
            config = build()
            config.architectures = [arch]
            torch.manual_seed(len(cache))
            model = getattr(transformers, arch)(config)
            perturb_1d(model, seed=100 + len(cache))
            root = tmp_path_factory.mktemp(family)
            model.save_pretrained(root / "hf")
            r = invoke(runner, "import", "hf", root / "hf", "--out", root / "run")
            assert r.exit_code == 0, r.output
            cache[family] = Pair(model, root / "hf", root / "run")
        return cache[family]

    return get


def ids(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_reads_the_family(family, pairs):
    p = pairs(family)
    m, c = p.ours.cfg, p.theirs.config
    assert m.hf_architecture == FAMILIES[family][1]
    head_dim = p.theirs.model.layers[0].self_attn.head_dim
    assert (m.n_layer, m.vocab_size, m.tied, m.head_size) == (c.num_hidden_layers, c.vocab_size,
                                                              c.tie_word_embeddings, head_dim)
    types = getattr(c, "layer_types", None)
    window = getattr(c, "sliding_window", None)
    sliding = [t == "sliding_attention" for t in types] if types and window else [window is not None] * m.n_layer
    assert m.sliding == sliding


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_forward_logits_equal_transformers(family, pairs):
    p = pairs(family)
    x = ids(2, SEQ)
    with torch.no_grad():
        theirs, ours = p.theirs(x).logits, p.ours(x)
    assert theirs.abs().max() > 0.5  # not a comparison of near-zero logits
    assert (theirs - ours).abs().max().item() < TOL


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_decoding_of_rows_at_different_positions(family, pairs):
    """Three rows prefilled into their own slots with prompts of 5, 11 and 17 tokens, then decoded together one
    token per step, each at its own position: every step's logits equal transformers' on the row's whole text."""
    p = pairs(family)
    m = p.ours.cfg
    lengths, steps = (5, 11, 17), 8
    seqs = [ids(1, n + steps, seed=10 + n)[0] for n in lengths]
    cache = KVCache.empty(m, len(lengths), CONTEXT, torch.float32, "cpu")
    with torch.no_grad():
        full = [p.theirs(s[None]).logits[0] for s in seqs]  # (T, V) each
        for slot, (s, n) in enumerate(zip(seqs, lengths)):
            got = p.ours(s[None, :n], cache=cache, slot=slot)[0, -1]
            assert (got - full[slot][n - 1]).abs().max().item() < TOL
        for k in range(steps):
            pos = torch.tensor([n + k for n in lengths])
            tok = torch.stack([s[n + k] for s, n in zip(seqs, lengths)])[:, None]
            got = p.ours(tok, cache=cache, pos=pos, kv_len=int(pos.max()) + 1)[:, -1]  # (rows, V)
            want = torch.stack([f[n + k] for f, n in zip(full, lengths)])
            assert (got - want).abs().max().item() < TOL, f"step {k}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_32_greedy_tokens_equal_transformers_generate(family, pairs):
    """llmctl's engine (rows decoding together) against transformers' generate, one prompt at a time."""
    p = pairs(family)
    prompts = [ids(1, n, seed=20 + n)[0].tolist() for n in (3, 9, 14)]
    engine = Engine(p.ours, eos_id=None)
    rows = {}
    for row in engine.run([Request(q, Sampling(32, temperature=0)) for q in prompts]):
        rows[id(row)] = row
    ours = {tuple(r.request.prompt): r.tokens[len(r.request.prompt):] for r in rows.values()}
    p.theirs.generation_config.eos_token_id = None
    for q in prompts:
        with torch.no_grad():
            got = p.theirs.generate(torch.tensor([q]), attention_mask=torch.ones(1, len(q), dtype=torch.long),
                                    max_new_tokens=32, min_new_tokens=32, do_sample=False)
        theirs = got[0, len(q):].tolist()
        assert len(theirs) == 32 and ours[tuple(q)] == theirs
    assert len({t for r in ours.values() for t in r}) > 4  # varied text, not one token repeated


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bfloat16_logits_close_to_transformers(family, pairs):
    p = pairs(family)
    x = ids(2, SEQ, seed=3)
    theirs = getattr(transformers, FAMILIES[family][1]).from_pretrained(p.src, dtype=torch.bfloat16).eval()
    ours = load_model(p.run, "cpu", require_tokenizer=False).model.to(torch.bfloat16).eval()
    with torch.no_grad():
        a, b = theirs(x).logits.float(), ours(x).float()
    assert (a - b).abs().max().item() / a.abs().max().item() < BF16_TOL


# config.json keys whose values come from elsewhere (the tokenizer side writes the token ids) or describe the file
NOT_ARCHITECTURE = {"bos_token_id", "eos_token_id", "pad_token_id", "transformers_version", "dtype", "torch_dtype",
                    "use_cache", "_name_or_path"}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_transformers_import_round_trip_is_bit_identical(family, pairs, runner, tmp_path):
    p = pairs(family)
    r = invoke(runner, "export", "--ckpt", p.run, "--format", "hf", "--out", tmp_path / "exported")
    assert r.exit_code == 0, r.output
    cls = getattr(transformers, FAMILIES[family][1])
    reloaded, info = cls.from_pretrained(tmp_path / "exported", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    want = {k: v for k, v in p.theirs.config.to_dict().items() if k not in NOT_ARCHITECTURE}
    got = {k: v for k, v in reloaded.config.to_dict().items() if k not in NOT_ARCHITECTURE}
    assert got == want
    for k, t in reloaded.state_dict().items():
        assert torch.equal(t, p.theirs.state_dict()[k]), k
    reloaded.save_pretrained(tmp_path / "again")
    r = invoke(runner, "import", "hf", tmp_path / "again", "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    a, b = ckpt_io.load(p.run), ckpt_io.load(tmp_path / "b")
    assert a.config == b.config
    wa, wb = a.weights(), b.weights()
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_every_family_is_one_export_writes():
    from llmctl.config.model import HF_ARCHITECTURES

    encoders = {"BertForMaskedLM", "ModernBertForMaskedLM"}  # (tests/test_hf_encoders.py)
    assert set(hf.FAMILIES) | {"GPT2LMHeadModel"} | encoders == set(HF_ARCHITECTURES)
    assert {arch for _, arch in FAMILIES.values()} == set(hf.FAMILIES)


# ----------------------------------------------------------------------------------------------------------------
# config.json in the hub's form (transformers 4.x: rope_theta, rope_scaling, rope_local_base_freq, no layer_types)

# public hub configs, shrunk (widths, layers, vocabulary) with each family's own keys and values kept
SHRINK = {"hidden_size": 64, "intermediate_size": 80, "num_hidden_layers": 4, "vocab_size": 96,
          "num_attention_heads": 4}
HUB = {
    "llama-3.2-1b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
                     "head_dim": 16, "hidden_act": "silu", "max_position_embeddings": 131072, "mlp_bias": False,
                     "num_key_value_heads": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
                     "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                     "tie_word_embeddings": True},
    "qwen2.5-0.5b": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
                     "max_position_embeddings": 32768, "max_window_layers": 24, "num_key_value_heads": 2,
                     "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
                     "tie_word_embeddings": True, "use_sliding_window": False},
    "qwen2-window": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "max_window_layers": 2,
                     "num_key_value_heads": 2,
                     "sliding_window": 16, "use_sliding_window": True, "rope_theta": 1e6,
                     "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
    "mistral-7b-v0.1": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu",
                        "max_position_embeddings": 32768, "num_key_value_heads": 2, "rms_norm_eps": 1e-05,
                        "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False},
    "gemma-2-2b": {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "attention_bias": False,
                   "attn_logit_softcapping": 50.0, "cache_implementation": "hybrid", "final_logit_softcapping": 30.0,
                   "head_dim": 16, "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
                   "max_position_embeddings": 8192, "num_key_value_heads": 2, "query_pre_attn_scalar": 256,
                   "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096},
    "gemma-3-4b-text": {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "head_dim": 16,
                        "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131072,
                        "num_key_value_heads": 2, "query_pre_attn_scalar": 256, "rope_local_base_freq": 10000.0,
                        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "rope_theta": 1000000.0,
                        "sliding_window": 1024, "sliding_window_pattern": 6, "num_hidden_layers": 7,
                        "attn_logit_softcapping": None, "final_logit_softcapping": None},
    "phi-3-mini-4k": {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "attention_dropout": 0.0,
                      "auto_map": {"AutoConfig": "configuration_phi3.Phi3Config",
                                   "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"},
                      "embd_pdrop": 0.0, "hidden_act": "silu", "max_position_embeddings": 4096,
                      "original_max_position_embeddings": 4096, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
                      "rope_scaling": None, "rope_theta": 10000.0, "sliding_window": 2047,
                      "tie_word_embeddings": False},
}


def _hub(name: str) -> dict:
    return {**SHRINK, **HUB[name]}


@pytest.mark.parametrize("name", list(HUB))
def test_hub_form_reads_as_transformers_5_form(name, tmp_path):
    """The hub's config.json and what transformers 5 makes of it (to_dict: rope_parameters, layer_types) import
    as the same model; export writes what transformers reads back to the same values."""
    (tmp_path / "config.json").write_text(json.dumps(_hub(name)))
    loaded = transformers.AutoConfig.from_pretrained(tmp_path)
    m = hf.to_model_config(_hub(name))
    assert hf.to_model_config(loaded.to_dict()) == m
    (tmp_path / "config.json").write_text(json.dumps(hf.to_hf_config(m, None)))
    again = transformers.AutoConfig.from_pretrained(tmp_path)
    skip = NOT_ARCHITECTURE | {"auto_map", "cache_implementation", "hidden_act", "sliding_window_pattern",
                               "max_window_layers", "_sliding_window_pattern"}
    assert _values(again, skip) == _values(loaded, skip)


def _values(config, skip: set) -> dict:
    """A config's values but `skip`, without the legacy `type` transformers keeps beside `rope_type`."""
    out = {k: v for k, v in config.to_dict().items() if k not in skip}
    rope = out.get("rope_parameters") or {}
    for p in [rope, *(v for v in rope.values() if isinstance(v, dict))]:
        p.pop("type", None)
    return out


def test_hub_values_land_in_model_config():
    m = hf.to_model_config(_hub("llama-3.2-1b"))
    assert m.rope_scaling["rope_type"] == "llama3" and m.rope_theta == 500000.0 and m.tied
    m = hf.to_model_config(_hub("qwen2.5-0.5b"))
    assert (m.has_qkv_bias, m.has_bias, m.sliding_window) == (True, False, None)
    m = hf.to_model_config(_hub("qwen2-window"))
    assert m.layer_types == ["full", "full", "sliding", "sliding"] and m.sliding_window == 16
    assert m.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    m = hf.to_model_config(_hub("gemma-2-2b"))
    assert m.layer_types == ["sliding", "full"] * 2 and (m.attn_softcap, m.final_softcap, m.query_scale) == \
        (50.0, 30.0, 256.0)
    m = hf.to_model_config(_hub("gemma-3-4b-text"))
    assert m.layer_types == ["sliding"] * 5 + ["full", "sliding"] and (m.rope_theta, m.rope_local_theta) == (1e6, 1e4)
    assert m.rope_scaling == {"rope_type": "linear", "factor": 8.0} and m.qk_norm and m.norm_offset
    m = hf.to_model_config(_hub("phi-3-mini-4k"))  # auto_map or not, Phi3ForCausalLM is transformers' own
    assert (m.sliding_window, m.layer_types, m.hf_architecture) == (2047, None, "Phi3ForCausalLM")


def test_real_qwen3_config_imports():
    path = SHARED / "tokenizers" / "qwen3" / "config.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared data is not checked out beside the repository)")
    m = hf.to_model_config(json.loads(path.read_text()))
    assert (m.hf_architecture, m.head_size, m.n_embd, m.kv_heads, m.qk_norm, m.tied, m.rope_theta) == \
        ("Qwen3ForCausalLM", 128, 2560, 8, True, True, 1e6)


# ----------------------------------------------------------------------------------------------------------------
# What is refused, with the field named

REFUSED = [
    ("phi-4-mini longrope", {**_hub("phi-3-mini-4k"), "partial_rotary_factor": 0.75, "rope_scaling": {
        "type": "longrope", "long_factor": [1.0] * 6, "short_factor": [1.0] * 6}}, ["rope_scaling", "'longrope'"]),
    ("dynamic", {**_hub("llama-3.2-1b"), "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, ["'dynamic'"]),
    ("llama3 key missing", {**_hub("llama-3.2-1b"), "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     ["rope_scaling", "llama3 needs high_freq_factor"]),
    ("gemma 3 multimodal", {**_hub("gemma-3-4b-text"), "architectures": ["Gemma3ForConditionalGeneration"]},
     ["Gemma3ForConditionalGeneration", "Gemma3ForCausalLM"]),
    ("remote code", {**_hub("phi-3-mini-4k"), "architectures": ["Phi3SmallForCausalLM"]},
     ["Phi3SmallForCausalLM", "trust_remote_code"]),
    ("qwen3 attention bias", {**_hub("qwen2.5-0.5b"), "architectures": ["Qwen3ForCausalLM"], "attention_bias": True},
     ["attention_bias"]),
    ("gemma exact gelu", {**_hub("gemma-2-2b"), "hidden_activation": "gelu"}, ["hidden_activation", "gelu"]),
    ("gemma bidirectional", {**_hub("gemma-3-4b-text"), "use_bidirectional_attention": True},
     ["use_bidirectional_attention"]),
    ("partial rotary outside phi3", {**_hub("qwen2.5-0.5b"), "partial_rotary_factor": 0.5}, ["rotary_fraction"]),
    ("phi3 dropouts differ", {**_hub("phi-3-mini-4k"), "resid_pdrop": 0.1}, ["resid_pdrop"]),
    ("layer_types length", {**_hub("gemma-2-2b"), "layer_types": ["full_attention"]}, ["layer_types", "4 entries"]),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_with_the_field_named(case):
    from llmctl.errors import LlmctlError

    _, config, words = case
    with pytest.raises(LlmctlError) as e:
        hf.to_model_config(config)
    assert "\n" not in e.value.message and all(w in e.value.message for w in words), e.value.message


def test_export_refuses_what_the_recorded_architecture_cannot_hold():
    from llmctl.config import from_dict
    from llmctl.errors import LlmctlError

    m = hf.to_model_config(_hub("llama-3.2-1b"))
    m.qk_norm = True
    with pytest.raises(LlmctlError, match="model.qk_norm=true: LlamaForCausalLM has no such setting"):
        hf.to_hf_config(m, None)
    m.hf_architecture = None  # export picks the first family that has every switch used
    assert hf.to_hf_config(m, None)["architectures"] == ["Qwen3ForCausalLM"]
    with pytest.raises(LlmctlError, match="model.hf_architecture: 'FalconForCausalLM' is not one export writes"):
        from_dict({"model": {"arch": "llama", "hf_architecture": "FalconForCausalLM"}})
    with pytest.raises(LlmctlError, match="needs model.arch=llama"):
        from_dict({"model": {"arch": "gpt2", "hf_architecture": "Qwen2ForCausalLM"}})
