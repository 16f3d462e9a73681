"""transformers config.json <-> ModelConfig, one `Family` per architecture.

A family says which of ModelConfig's open-model switches its architecture always has (`fixed`: Gemma's (1 + w)
norms, Qwen2's q/k/v bias, ...), which its config.json carries (`free`: Gemma's soft-caps, Phi-3's partial
rotary, ...), how to read its own fields and how to write them back. `unsupported` is the one rule of what a family
can hold: import runs it on what it read (a combination transformers computes differently is refused there) and
export runs it to pick or check the architecture it writes. Every field that cannot be represented exactly is an
error naming it, never an approximation.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

from ..config import ModelConfig, from_dict
from ..config.model import HF_ARCHITECTURES
from ..errors import LlmctlError
from . import encoders, rope
from .fields import Reader, unrepresentable

GPT2_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu2": "relu2"}
EXPORT_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu2": "relu2"}
SILU = ("silu", "swish")
GELU_TANH = "gelu_pytorch_tanh"
# the open-model switches and their values in a plain Llama (ModelConfig's defaults)
SWITCHES = ("bias", "qkv_bias", "qk_norm", "activation", "gate_activation", "norm_offset", "embed_scale", "post_norms",
            "attn_softcap", "final_softcap", "query_scale", "sliding_window", "layer_types", "rope_scaling",
            "rope_local_theta", "rotary_fraction")
PLAIN = {**{k: getattr(ModelConfig(), k) for k in SWITCHES}, "bias": False, "qkv_bias": False}
LAYER_TYPE = {True: "sliding_attention", False: "full_attention"}


def switch(m: ModelConfig, name: str) -> Any:
    """A switch's effective value (bias and qkv_bias resolved from their nulls)."""
    return {"bias": m.has_bias, "qkv_bias": m.has_qkv_bias}.get(name, getattr(m, name))


@dataclass(frozen=True)
class Family:
    """One transformers architecture of the llama flavour (GPT-2 is `GPT2`)."""

    name: str
    model_type: str
    read: Callable[[Reader, int], dict]
    """Its own fields -> ModelConfig values (given the reader and the number of layers)."""
    write: Callable[[ModelConfig], dict]
    """ModelConfig -> its own config.json fields."""
    fixed: dict = field(default_factory=dict)
    """Switch values the architecture always has."""
    free: frozenset = frozenset()
    """Switches its config.json carries."""
    defaults: dict = field(default_factory=dict)
    """transformers' defaults of the common fields where its config class has its own (max_position_embeddings,
    num_key_value_heads, head_dim, rms_norm_eps, tie_word_embeddings): what a config.json without them means."""
    head_dim_always: bool = True
    """Its config class has a head_dim field (written always); else head_dim is written only when it differs."""
    fused: bool = False
    """Phi-3: q/k/v in one qkv_proj, gate and up in one gate_up_proj."""
    gemma_norms: bool = False
    """Gemma 2/3's four norms per layer (input, post-attention, pre- and post-feedforward)."""
    extra_check: Callable[[ModelConfig], Optional[str]] = lambda m: None

    def unsupported(self, m: ModelConfig) -> Optional[str]:
        """What of `m` this architecture cannot hold (a phrase naming the field), or None."""
        for k in SWITCHES:
            v = switch(m, k)
            if k in self.fixed and v != self.fixed[k]:
                return f"model.{k}={json.dumps(v)}: {self.name} always has {json.dumps(self.fixed[k])}"
            if k not in self.fixed and k not in self.free and v != PLAIN[k]:
                return f"model.{k}={json.dumps(v)}: {self.name} has no such setting"
        return self.extra_check(m)

    def to_model_config(self, hf: dict, source: str) -> ModelConfig:
        r = Reader(hf, source)
        d = self.defaults
        hidden, heads = r("hidden_size", int), r("num_attention_heads", int)
        head_dim = r("head_dim", int, d.get("head_dim"))
        kv = r("num_key_value_heads", int, d.get("num_key_value_heads"))
        n_layer = r("num_hidden_layers", int)
        m = ModelConfig(
            arch="llama", n_layer=n_layer, n_head=heads, n_embd=hidden,
            n_kv_head=None if kv == heads else kv,
            head_dim=None if head_dim is not None and head_dim * heads == hidden else head_dim,
            block_size=r("max_position_embeddings", int, d.get("max_position_embeddings", 2048)),
            vocab_size=r("vocab_size", int), mlp_hidden=r("intermediate_size", int),
            tie_embeddings=r("tie_word_embeddings", bool, d.get("tie_word_embeddings", False)),
            norm_eps=r("rms_norm_eps", float, d.get("rms_norm_eps", 1e-6)),
            dropout=r("attention_dropout", float, 0.0), init_std=r("initializer_range", float, 0.02),
            hf_architecture=self.name, **{**self.fixed, **self.read(r, n_layer)},
        )
        return checked(m, self, source)

    def to_hf_config(self, m: ModelConfig) -> dict:
        out = {
            "architectures": [self.name], "model_type": self.model_type, "vocab_size": m.vocab_size,
            "hidden_size": m.n_embd, "intermediate_size": m.hidden, "num_hidden_layers": m.n_layer,
            "num_attention_heads": m.n_head, "num_key_value_heads": m.kv_heads,
            "max_position_embeddings": m.block_size, "rms_norm_eps": m.norm_eps, "attention_dropout": m.dropout,
        }
        if self.head_dim_always or m.head_size * m.n_head != m.n_embd:
            out["head_dim"] = m.head_size
        return {**out, **self.write(m)}


def checked(m: ModelConfig, family: Family, source: str) -> ModelConfig:
    """`m` through llmctl's own validation (which names the model key) and the family's `unsupported`."""
    try:
        m = from_dict({"model": asdict(m)}).model
    except LlmctlError as e:
        raise LlmctlError(f"{source} describes a model llmctl cannot build: {e.message}") from None
    why = family.unsupported(m)
    if why:
        raise LlmctlError(f"{source} describes a {family.name} llmctl cannot represent exactly ({why})")
    return m


# ------------------------------------------------------------------------------------------------------------------
# Pieces the families share


def _silu(r: Reader) -> None:
    r.require("hidden_act", SILU, "silu", "this architecture's MLP is SwiGLU (silu) in llmctl")


def _no_attention_bias(r: Reader) -> None:
    r.require("attention_bias", (False,), False, "llmctl has a bias on the output projection only together with "
              "MLP biases, which this architecture lacks")


def _sliding(window: Optional[int], types: list[bool]) -> dict:
    """sliding_window and layer_types in ModelConfig's form: layer_types null when every layer slides."""
    if window is None or not any(types):
        return {"sliding_window": None, "layer_types": None}
    return {"sliding_window": window, "layer_types": None if all(types) else
            ["sliding" if s else "full" for s in types]}


def _layer_types(r: Reader, n_layer: int, default: Callable[[int], bool]) -> list[bool]:
    """Per layer: sliding or not, from `layer_types` when given, else `default(i)`."""
    given = r.hf.get("layer_types")
    if given is None:
        return [default(i) for i in range(n_layer)]
    if not isinstance(given, list) or len(given) != n_layer or any(t not in LAYER_TYPE.values() for t in given):
        raise unrepresentable(r.source, "layer_types", given,
                              f"expected {n_layer} entries, each " + " or ".join(LAYER_TYPE.values()))
    return [t == LAYER_TYPE[True] for t in given]


def _rope(r: Reader, **kw) -> dict:
    p = rope.read(r.hf, r.source, **kw)
    return {"rope_theta": p.theta, "rope_scaling": p.scaling, "rope_local_theta": p.local_theta,
            "rotary_fraction": p.fraction}


def _all_or_none_sliding(m: ModelConfig) -> Optional[str]:
    if len(set(m.sliding)) > 1:
        return "model.layer_types: this architecture's sliding window applies to every layer or none"
    return None


def _written_layer_types(m: ModelConfig) -> list[str]:
    return [LAYER_TYPE[s] for s in m.sliding]


def _num(x: float) -> int | float:
    """A whole number as an int (transformers' strict config classes type some such fields int)."""
    return int(x) if float(x).is_integer() else x


# ------------------------------------------------------------------------------------------------------------------
# The families


def _read_llama(r: Reader, n_layer: int) -> dict:
    _silu(r)
    attention_bias, mlp_bias = r("attention_bias", bool, False), r("mlp_bias", bool, False)
    if attention_bias != mlp_bias:
        raise unrepresentable(r.source, "mlp_bias", mlp_bias,
                              f"llmctl has one bias switch, and attention_bias={json.dumps(attention_bias)}")
    return {"bias": attention_bias, **_rope(r)}


def _write_llama(m: ModelConfig) -> dict:
    return {"hidden_act": "silu", "attention_bias": m.has_bias, "mlp_bias": m.has_bias, "pretraining_tp": 1,
            **rope.write(m.rope_theta, m.rope_scaling)}


def _llama_check(m: ModelConfig) -> Optional[str]:
    if m.has_qkv_bias != m.has_bias:
        return f"model.qkv_bias={json.dumps(m.has_qkv_bias)}: LlamaForCausalLM's attention_bias covers the output " \
               "projection too, and mlp_bias must equal it"
    return None


def _read_qwen(r: Reader, n_layer: int) -> dict:
    _silu(r)
    window = r("sliding_window", int, None) if r("use_sliding_window", bool, False) else None
    first = r("max_window_layers", int, 28)
    types = _layer_types(r, n_layer, lambda i: window is not None and i >= first)
    return {**_sliding(window, types), **_rope(r)}


def _read_qwen3(r: Reader, n_layer: int) -> dict:
    _no_attention_bias(r)
    return _read_qwen(r, n_layer)


def _write_qwen(m: ModelConfig) -> dict:
    sliding = m.sliding
    out = {"hidden_act": "silu", "use_sliding_window": any(sliding),
           "sliding_window": m.sliding_window if any(sliding) else None,
           "layer_types": _written_layer_types(m), **rope.write(m.rope_theta, m.rope_scaling)}
    if any(sliding):  # (layer_types decides; max_window_layers is what 4.x reads, left at its default otherwise)
        out["max_window_layers"] = sliding.index(True)
    return out


def _write_qwen3(m: ModelConfig) -> dict:
    return {**_write_qwen(m), "attention_bias": False}


def _read_mistral(r: Reader, n_layer: int) -> dict:
    _silu(r)
    return {**_sliding(r("sliding_window", int, None), [True] * n_layer), **_rope(r)}


def _write_mistral(m: ModelConfig) -> dict:
    return {"hidden_act": "silu", "sliding_window": m.sliding_window if all(m.sliding) else None,
            **rope.write(m.rope_theta, m.rope_scaling)}


def _read_gemma(r: Reader, n_layer: int, pattern: int, caps: tuple, per_layer_rope: bool) -> dict:
    act = r.hf.get("hidden_activation", r.hf.get("hidden_act", GELU_TANH))
    if act != GELU_TANH:
        raise unrepresentable(r.source, "hidden_activation", act, f"llmctl's Gemma MLP is GeGLU with {GELU_TANH}")
    _no_attention_bias(r)
    r.require("use_bidirectional_attention", (None, False), None, "llmctl's attention is causal")
    window = r("sliding_window", int, 4096)
    pattern = r("sliding_window_pattern", int, pattern)
    types = _layer_types(r, n_layer, lambda i: (i + 1) % pattern != 0)
    rope_kw = {"per_layer_type": True, "default_theta": 1_000_000.0} if per_layer_rope else {}
    return {"query_scale": r("query_pre_attn_scalar", float, 256.0),
            "attn_softcap": r("attn_logit_softcapping", float, caps[0]),
            "final_softcap": r("final_logit_softcapping", float, caps[1]),
            **_sliding(window, types), **_rope(r, **rope_kw)}


def _write_gemma(m: ModelConfig) -> dict:
    out = {"hidden_activation": GELU_TANH, "attention_bias": False,
           "query_pre_attn_scalar": _num(m.query_scale or m.head_size),
           "attn_logit_softcapping": m.attn_softcap, "final_logit_softcapping": m.final_softcap,
           "sliding_window": m.sliding_window, "layer_types": _written_layer_types(m)}
    if m.rope_local_theta is not None:  # Gemma 3
        return {**out, **rope.write(m.rope_theta, m.rope_scaling, local_theta=m.rope_local_theta)}
    return {**out, **rope.write(m.rope_theta, m.rope_scaling)}


def _gemma3_check(m: ModelConfig) -> Optional[str]:
    if m.rope_local_theta is None:
        return "model.rope_local_theta=null: Gemma3ForCausalLM has a RoPE base for its sliding layers"
    return None


def _read_phi3(r: Reader, n_layer: int) -> dict:
    _silu(r)
    dropout = r("attention_dropout", float, 0.0)
    for name in ("resid_pdrop", "embd_pdrop"):
        if r(name, float, 0.0) != dropout:
            raise unrepresentable(r.source, name, r.hf[name],
                                  f"llmctl has one dropout, and attention_dropout={dropout}")
    return {**_sliding(r("sliding_window", int, None), [True] * n_layer), **_rope(r)}


def _write_phi3(m: ModelConfig) -> dict:
    # original_max_position_embeddings only matters to longrope scaling, which llmctl refuses: the context it is
    return {"hidden_act": "silu", "sliding_window": m.sliding_window if all(m.sliding) else None,
            "resid_pdrop": m.dropout, "embd_pdrop": m.dropout, "original_max_position_embeddings": m.block_size,
            **rope.write(m.rope_theta, m.rope_scaling, fraction=m.rotary_fraction)}


def _phi3_check(m: ModelConfig) -> Optional[str]:
    if int(m.head_size * m.rotary_fraction) % 2:
        return f"model.rotary_fraction={m.rotary_fraction}: transformers rotates int(head_dim x fraction) rounded " \
               "up to even channels, llmctl rounded down; pick a fraction that gives an even count"
    return _all_or_none_sliding(m)


SLIDING = frozenset({"sliding_window", "layer_types"})
GEMMA = {"norm_offset": True, "embed_scale": True, "post_norms": True, "gate_activation": "gelu_tanh",
         "bias": False, "qkv_bias": False}
GEMMA_FREE = SLIDING | {"attn_softcap", "final_softcap", "query_scale", "rope_scaling"}
NO_BIAS = {"bias": False, "qkv_bias": False}

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("LlamaForCausalLM", "llama", _read_llama, _write_llama, free=frozenset({"bias", "qkv_bias",
           "rope_scaling"}), extra_check=_llama_check),
    Family("Qwen2ForCausalLM", "qwen2", _read_qwen, _write_qwen, fixed={"bias": False, "qkv_bias": True},
           free=SLIDING | {"rope_scaling"}, defaults={"max_position_embeddings": 32768, "num_key_value_heads": 32},
           head_dim_always=False),
    Family("Qwen3ForCausalLM", "qwen3", _read_qwen3, _write_qwen3, fixed={**NO_BIAS, "qk_norm": True},
           free=SLIDING | {"rope_scaling"}, defaults={"max_position_embeddings": 32768, "num_key_value_heads": 32,
                                                  "head_dim": 128}),
    Family("MistralForCausalLM", "mistral", _read_mistral, _write_mistral, fixed=NO_BIAS,
           free=SLIDING | {"rope_scaling"}, defaults={"max_position_embeddings": 131072, "num_key_value_heads": 8},
           extra_check=_all_or_none_sliding),
    Family("Gemma2ForCausalLM", "gemma2", lambda r, n: _read_gemma(r, n, 2, (50.0, 30.0), False), _write_gemma,
           fixed=GEMMA, free=GEMMA_FREE, gemma_norms=True,
           defaults={"max_position_embeddings": 8192, "head_dim": 256, "tie_word_embeddings": True,
                     "num_key_value_heads": 4}),
    Family("Gemma3ForCausalLM", "gemma3_text", lambda r, n: _read_gemma(r, n, 6, (None, None), True), _write_gemma,
           fixed={**GEMMA, "qk_norm": True}, free=GEMMA_FREE | {"rope_local_theta"}, gemma_norms=True,
           defaults={"max_position_embeddings": 131072, "head_dim": 256, "tie_word_embeddings": True,
                     "num_key_value_heads": 4},
           extra_check=_gemma3_check),
    Family("Phi3ForCausalLM", "phi3", _read_phi3, _write_phi3, fixed=NO_BIAS, free=SLIDING | {"rotary_fraction"},
           defaults={"max_position_embeddings": 4096, "rms_norm_eps": 1e-5}, head_dim_always=False, fused=True,
           extra_check=_phi3_check),
)}


# ------------------------------------------------------------------------------------------------------------------
# GPT-2, and the choice of family


def _gpt2_to_model_config(hf: dict, source: str) -> ModelConfig:
    r = Reader(hf, source)
    act = r.require("activation_function", tuple(GPT2_ACTIVATIONS), "gelu_new",
                    "supported: " + ", ".join(GPT2_ACTIVATIONS))
    for name, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                       ("add_cross_attention", False)):
        r.require(name, (want,), want, f"llmctl's GPT-2 needs {name}={json.dumps(want)}")
    n_embd = r("n_embd", int)
    m = ModelConfig(
        arch="gpt2", n_layer=r("n_layer", int), n_head=r("n_head", int), n_embd=n_embd,
        block_size=r("n_positions", int, hf.get("n_ctx", 1024)), vocab_size=r("vocab_size", int),
        mlp_hidden=r("n_inner", int, None) or 4 * n_embd, bias=True,
        tie_embeddings=r("tie_word_embeddings", bool, True), activation=GPT2_ACTIVATIONS[act],
        norm_eps=r("layer_norm_epsilon", float, 1e-5), dropout=r("resid_pdrop", float, 0.0),
        init_std=r("initializer_range", float, 0.02), hf_architecture="GPT2LMHeadModel",
    )
    try:
        return from_dict({"model": asdict(m)}).model
    except LlmctlError as e:
        raise LlmctlError(f"{source} describes a model llmctl cannot build: {e.message}") from None


def _gpt2_to_hf_config(m: ModelConfig) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": m.vocab_size, "n_positions": m.block_size, "n_embd": m.n_embd, "n_layer": m.n_layer,
        "n_head": m.n_head, "n_inner": m.hidden, "activation_function": EXPORT_ACTIVATIONS[m.activation],
        "layer_norm_epsilon": m.norm_eps, "resid_pdrop": m.dropout, "embd_pdrop": m.dropout,
        "attn_pdrop": m.dropout, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "add_cross_attention": False,
    }


GPT2 = "GPT2LMHeadModel"
MODEL_TYPES = {"gpt2": GPT2, **{f.model_type: f.name for f in FAMILIES.values()}, **encoders.MODEL_TYPES}
assert set(FAMILIES) | {GPT2} | set(encoders.MODEL_TYPES.values()) == set(HF_ARCHITECTURES), \
    "llmctl.config.model.HF_ARCHITECTURES and the families differ"
# the encoder switches a decoder architecture has none of, with their plain values
ENCODER_SWITCHES = {"causal": True, "norm_position": "pre", "embed_norm": False, "type_vocab_size": 0,
                    "mlm_head": False}


def architecture(hf: dict, source: str = "config.json") -> str:
    """The architecture of a config.json that llmctl imports (from `architectures`, else `model_type`).

    Only architectures whose code is in transformers itself are taken: one that is not would need
    trust_remote_code (running the model repository's own Python), which llmctl never does. That is judged by the
    name, not by an `auto_map` entry (real Phi-3 configs carry one, for a class transformers has natively)."""
    archs = hf.get("architectures") or []
    if not isinstance(archs, list):
        archs = [archs]
    for a in archs:
        if a in HF_ARCHITECTURES or a in encoders.ENCODER_ARCHS:
            return a
    mt = hf.get("model_type")
    if not archs and mt in MODEL_TYPES:
        return MODEL_TYPES[mt]
    named = ", ".join(map(str, archs)) or f"model_type {mt!r}"
    supported = "llmctl imports " + ", ".join(HF_ARCHITECTURES)
    if hf.get("auto_map"):
        raise LlmctlError(f"{source}: unsupported architecture {named}: its code is not in transformers (auto_map "
                          f"points at the repository's own Python, which would need trust_remote_code, and llmctl "
                          f"runs none); {supported}")
    hint = "; for Gemma 3 import the text-only Gemma3ForCausalLM" if "Gemma3ForConditionalGeneration" in archs else ""
    raise LlmctlError(f"{source}: unsupported architecture {named}; {supported}{hint}")


def to_model_config(hf: dict, source: str = "config.json") -> ModelConfig:
    """A transformers config (parsed config.json) -> our ModelConfig; anything we cannot represent is an error."""
    name = architecture(hf, source)
    if name in encoders.ENCODER_ARCHS:
        return encoders.to_model_config(hf, name, source)
    if name == GPT2:
        return _gpt2_to_model_config(hf, source)
    return FAMILIES[name].to_model_config(hf, source)


def family_of(m: ModelConfig) -> Optional[Family]:
    """The family export writes for `m` (None: GPT-2): model.hf_architecture, else the first family that holds
    every switch `m` uses. A family that cannot hold them is refused, naming the field."""
    odd = [k for k, v in ENCODER_SWITCHES.items() if getattr(m, k) != v]
    if m.norm is not None and m.norm != ("layernorm" if m.arch == "gpt2" else "rmsnorm"):
        odd.append("norm")
    if odd:
        raise LlmctlError(f"model.{odd[0]}={json.dumps(getattr(m, odd[0]))}: no decoder architecture llmctl writes "
                          "has it (encoders are written as BERT or ModernBERT, with model.causal=false)")
    if m.arch == "gpt2":
        return None
    if m.hf_architecture is not None:
        fam = FAMILIES[m.hf_architecture]
        why = fam.unsupported(m)
        if why:
            raise LlmctlError(f"the model cannot be written as {fam.name} ({why}); set model.hf_architecture to an "
                              "architecture that has it, or null to let export pick one")
        return fam
    for fam in FAMILIES.values():
        if fam.unsupported(m) is None:
            return fam
    raise LlmctlError("no transformers architecture llmctl writes has this combination of switches "
                      f"({FAMILIES['LlamaForCausalLM'].unsupported(m)}); export --format hf cannot write it")


def model_config_json(m: ModelConfig) -> dict:
    """The architecture part of config.json for `m` (token ids and common keys are the caller's)."""
    if not m.causal:
        return encoders.to_hf_config(m)
    fam = family_of(m)
    return _gpt2_to_hf_config(m) if fam is None else fam.to_hf_config(m)
