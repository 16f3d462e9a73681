"""Hugging Face interoperability: transformers checkpoint directories <-> llmctl checkpoints.

Import reads a local transformers directory (`config.json`; `model.safetensors`, sharded safetensors with
`model.safetensors.index.json`, or `pytorch_model.bin` through `torch.load(weights_only=True)`; `tokenizer.json`
when present) for `GPT2LMHeadModel` and `LlamaForCausalLM`. Export writes such a directory from one of our
checkpoints, so `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load it as is.

Only JSON and safetensors are read and written here: transformers is never imported (it is an optional extra,
used by the tests to check parity). Every field of a config we cannot represent exactly is an error that names it,
never a silent approximation.

Parameter correspondence (ours <- theirs), per block i:
  gpt2:  attn.qkv = c_attn^T (Conv1D stores (in, out)); attn.proj = attn.c_proj^T; mlp.fc = c_fc^T;
         mlp.proj = mlp.c_proj^T; norm1/norm2/norm = ln_1/ln_2/ln_f; wte, wpe
  llama: attn.qkv = [q_proj; k_proj; v_proj] (rows); attn.proj = o_proj; mlp.fc = [gate_proj; up_proj] (rows);
         mlp.proj = down_proj; norm1/norm2/norm = input_layernorm/post_attention_layernorm/norm; wte = embed_tokens
Our llama RoPE uses the same rotate-half layout as transformers, so q/k rows need no permutation.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import tokenizer_files
from .chat import exported_template
from .config import Config, ModelConfig, from_dict
from .errors import LlmctlError
from .model import Transformer
from .sampling import Sampling
from .tokenizer import Tokenizer

ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama"}
MODEL_TYPES = {"gpt2": "gpt2", "llama": "llama"}
GPT2_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
EXPORT_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
# buffers that old transformers versions saved with the weights; they hold no learned values
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# what `hf:NAME` downloads: top-level files only (repos often also hold onnx/, original/, flax weights)
DOWNLOAD_PATTERNS = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "chat_template.jinja",
                     SAFETENSORS, "model-*.safetensors", SAFETENSORS_INDEX]
DOWNLOAD_BIN_PATTERNS = [TORCH_BIN, "pytorch_model-*.bin", TORCH_BIN_INDEX]


# ------------------------------------------------------------------------------------------------------------------
# Parameter layout: one table per architecture, read in both directions


@dataclass(frozen=True)
class Pair:
    """One of our tensors and the transformers tensor(s) it corresponds to.

    `theirs` holds one name, or several pieces concatenated along dim 0 (q, k, v / gate, up) with `sizes` rows.
    `transpose`: GPT-2's Conv1D stores (in, out), the transpose of our nn.Linear (out, in).
    `zero_shape`: ours may lack this tensor (GPT-2 flavour with bias=False) while transformers needs it: export
    writes zeros of this shape.
    """

    ours: str
    theirs: tuple[str, ...]
    sizes: tuple[int, ...] = ()
    transpose: bool = False
    zero_shape: Optional[tuple[int, ...]] = None


def layout(m: ModelConfig) -> list[Pair]:
    """Every tensor of a model of config `m`, with its transformers name(s)."""
    C, H, nh, nkv, hd = m.n_embd, m.hidden, m.n_head, m.kv_heads, m.head_size
    pairs: list[Pair] = []
    if m.arch == "gpt2":
        zero = lambda *shape: None if m.has_bias else shape  # noqa: E731
        pairs += [Pair("wte.weight", ("transformer.wte.weight",)), Pair("wpe.weight", ("transformer.wpe.weight",))]
        for i in range(m.n_layer):
            ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
            for norm, ln in (("norm1", "ln_1"), ("norm2", "ln_2")):
                pairs.append(Pair(f"{ours}{norm}.weight", (f"{theirs}{ln}.weight",)))
                pairs.append(Pair(f"{ours}{norm}.bias", (f"{theirs}{ln}.bias",), zero_shape=zero(C)))
            for mod, conv, out in (("attn.qkv", "attn.c_attn", 3 * C), ("attn.proj", "attn.c_proj", C),
                                   ("mlp.fc", "mlp.c_fc", H), ("mlp.proj", "mlp.c_proj", C)):
                pairs.append(Pair(f"{ours}{mod}.weight", (f"{theirs}{conv}.weight",), transpose=True))
                pairs.append(Pair(f"{ours}{mod}.bias", (f"{theirs}{conv}.bias",), zero_shape=zero(out)))
        pairs += [Pair("norm.weight", ("transformer.ln_f.weight",)),
                  Pair("norm.bias", ("transformer.ln_f.bias",), zero_shape=zero(C))]
    else:
        pairs.append(Pair("wte.weight", ("model.embed_tokens.weight",)))
        for i in range(m.n_layer):
            ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
            attn, mlp = f"{theirs}self_attn.", f"{theirs}mlp."
            params = ("weight", "bias") if m.has_bias else ("weight",)
            pairs.append(Pair(f"{ours}norm1.weight", (f"{theirs}input_layernorm.weight",)))
            pairs.append(Pair(f"{ours}norm2.weight", (f"{theirs}post_attention_layernorm.weight",)))
            for p in params:
                pairs.append(Pair(f"{ours}attn.qkv.{p}", tuple(f"{attn}{x}_proj.{p}" for x in "qkv"),
                                  sizes=(nh * hd, nkv * hd, nkv * hd)))
                pairs.append(Pair(f"{ours}attn.proj.{p}", (f"{attn}o_proj.{p}",)))
                pairs.append(Pair(f"{ours}mlp.fc.{p}", (f"{mlp}gate_proj.{p}", f"{mlp}up_proj.{p}"), sizes=(H, H)))
                pairs.append(Pair(f"{ours}mlp.proj.{p}", (f"{mlp}down_proj.{p}",)))
        pairs.append(Pair("norm.weight", ("model.norm.weight",)))
    if not m.tied:  # a tied head is the embedding: stored once, on both sides
        pairs.append(Pair("lm_head.weight", ("lm_head.weight",)))
    return pairs


def expected_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of our parameters for config `m` (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        model = Transformer(m)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if m.tied:
        shapes.pop("lm_head.weight", None)
    return shapes


def from_hf_weights(theirs: dict[str, torch.Tensor], m: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """transformers state dict -> ours (float32), checking that every tensor is there with the right shape."""
    theirs = _canonical_names(theirs, m.arch)
    pairs = layout(m)
    needed = [n for p in pairs for n in p.theirs]
    missing = [n for n in needed if n not in theirs]
    if missing:
        raise LlmctlError(f"{source} lacks tensor {missing[0]}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                          + "; the weights do not match config.json or are incomplete")
    known = set(needed) | ({"lm_head.weight"} if m.tied else set())  # a tied head saved anyway is the embedding
    extra = [n for n in theirs if n not in known and not n.endswith(IGNORED_SUFFIXES)]
    if extra:
        raise LlmctlError(f"{source} has tensor {extra[0]} that config.json does not account for"
                          + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                          + "; the architecture has parts llmctl cannot represent")
    expected = expected_shapes(m)
    ours = {}
    for p in pairs:
        for name, shape in zip(p.theirs, _their_shapes(p, expected[p.ours])):
            if tuple(theirs[name].shape) != shape:
                raise LlmctlError(f"{source}: tensor {name} has shape {tuple(theirs[name].shape)} but config.json "
                                  f"implies {shape}")
        pieces = [theirs[n] for n in p.theirs]
        t = torch.cat(pieces, 0) if len(pieces) > 1 else pieces[0]
        ours[p.ours] = (t.t() if p.transpose else t).to(torch.float32).contiguous()
    return ours


def _their_shapes(p: Pair, ours: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Shapes of the transformers tensor(s) of a pair, given the shape of ours."""
    if p.transpose:
        return [tuple(reversed(ours))]
    if p.sizes:
        return [(n, *ours[1:]) for n in p.sizes]
    return [ours]


def to_hf_weights(ours: dict[str, torch.Tensor], m: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """Our state dict -> transformers names and layouts (biases GPT-2 needs but we lack are written as zeros)."""
    check_shapes(ours, m, source)
    out = {}
    for p in layout(m):
        if p.ours in ours:
            t = ours[p.ours]
        elif p.zero_shape is not None:
            t = torch.zeros(p.zero_shape, dtype=ours["wte.weight"].dtype)
        else:  # check_shapes has seen every tensor of the model, so only a tensor we never store ends here
            raise LlmctlError(f"{source} lacks tensor {p.ours}")
        if p.transpose:
            t = t.t()
        pieces = t.split(list(p.sizes), 0) if p.sizes else (t,)
        for name, piece in zip(p.theirs, pieces):
            out[name] = piece.contiguous()
    return out


def check_shapes(ours: dict[str, torch.Tensor], m: ModelConfig, source: str) -> None:
    expected = expected_shapes(m)
    missing = [k for k in expected if k not in ours]
    if missing:
        raise LlmctlError(f"{source} lacks tensor {missing[0]}; the weights do not match the model config")
    for k, shape in expected.items():
        if tuple(ours[k].shape) != shape:
            raise LlmctlError(f"{source}: tensor {k} has shape {tuple(ours[k].shape)} but the config implies {shape}")


def _canonical_names(theirs: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """Add the `transformer.` / `model.` prefix that checkpoints saved from the base model (GPT2Model, the
    original gpt2 repository, LlamaModel) leave out."""
    prefix = "transformer." if arch == "gpt2" else "model."
    return {(k if k.startswith(prefix) or k == "lm_head.weight" else prefix + k): v for k, v in theirs.items()}


# ------------------------------------------------------------------------------------------------------------------
# Configs


def _field(hf: dict, name: str, kind: type, default: Any = ..., source: str = "config.json") -> Any:
    """One field of a transformers config, type-checked; a missing required field is an error that names it."""
    value = hf.get(name, default)
    if value is ...:
        raise LlmctlError(f"{source} lacks the field {name}, which {hf.get('model_type', 'the model')} needs")
    if value is None and default is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise LlmctlError(f"{source}: field {name} must be {kind.__name__} (got {value!r})")
    return value


def unrepresentable(source: str, name: str, value: Any, why: str) -> LlmctlError:
    return LlmctlError(f"{source}: {name}={json.dumps(value)} cannot be represented in llmctl ({why}); "
                       "only GPT-2 and plain Llama models import exactly")


def architecture(hf: dict, source: str = "config.json") -> str:
    """'gpt2' or 'llama' from `architectures` (or `model_type` when that is absent)."""
    archs = hf.get("architectures") or []
    if not isinstance(archs, list):
        archs = [archs]
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    mt = hf.get("model_type")
    if not archs and mt in MODEL_TYPES:
        return MODEL_TYPES[mt]
    named = ", ".join(map(str, archs)) or f"model_type {mt!r}"
    raise LlmctlError(f"{source}: unsupported architecture {named}; llmctl imports "
                      + " and ".join(ARCHITECTURES) + " only")


def to_model_config(hf: dict, source: str = "config.json") -> ModelConfig:
    """A transformers config (parsed config.json) -> our ModelConfig; anything we cannot represent is an error."""
    arch = architecture(hf, source)
    f = lambda name, kind, default=...: _field(hf, name, kind, default, source)  # noqa: E731
    if arch == "gpt2":
        act = f("activation_function", str, "gelu_new")
        if act not in GPT2_ACTIVATIONS:
            raise unrepresentable(source, "activation_function", act, "supported: " + ", ".join(GPT2_ACTIVATIONS))
        for name, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                           ("add_cross_attention", False)):
            if hf.get(name, want) != want:
                raise unrepresentable(source, name, hf[name], f"llmctl's GPT-2 needs {name}={json.dumps(want)}")
        n_embd = f("n_embd", int)
        m = ModelConfig(
            arch="gpt2", n_layer=f("n_layer", int), n_head=f("n_head", int), n_embd=n_embd,
            block_size=f("n_positions", int, hf.get("n_ctx", 1024)), vocab_size=f("vocab_size", int),
            mlp_hidden=f("n_inner", int, None) or 4 * n_embd, bias=True,
            tie_embeddings=f("tie_word_embeddings", bool, True), activation=GPT2_ACTIVATIONS[act],
            norm_eps=f("layer_norm_epsilon", float, 1e-5), dropout=f("resid_pdrop", float, 0.0),
            init_std=f("initializer_range", float, 0.02),
        )
    else:
        act = f("hidden_act", str, "silu")
        if act not in ("silu", "swish"):
            raise unrepresentable(source, "hidden_act", act, "llmctl's Llama MLP is SwiGLU (silu)")
        attention_bias, mlp_bias = f("attention_bias", bool, False), f("mlp_bias", bool, False)
        if attention_bias != mlp_bias:
            raise unrepresentable(source, "mlp_bias", mlp_bias,
                                  f"llmctl has one bias switch, and attention_bias={json.dumps(attention_bias)}")
        hidden, heads = f("hidden_size", int), f("num_attention_heads", int)
        head_dim = f("head_dim", int, None)
        if head_dim is not None and heads and head_dim * heads == hidden:
            head_dim = None  # the default: stored only when it differs (a pruned model's)
        m = ModelConfig(
            arch="llama", n_layer=f("num_hidden_layers", int), n_head=heads, n_embd=hidden,
            n_kv_head=f("num_key_value_heads", int, None), head_dim=head_dim,
            block_size=f("max_position_embeddings", int, 2048),
            vocab_size=f("vocab_size", int), mlp_hidden=f("intermediate_size", int), bias=attention_bias,
            tie_embeddings=f("tie_word_embeddings", bool, False), norm_eps=f("rms_norm_eps", float, 1e-6),
            rope_theta=_rope_theta(hf, source), dropout=f("attention_dropout", float, 0.0),
            init_std=f("initializer_range", float, 0.02),
        )
        if m.n_kv_head == m.n_head:
            m.n_kv_head = None
    try:  # our own validation (divisibility, even head size for RoPE, ...) names the offending model key
        return from_dict({"model": asdict(m)}).model
    except LlmctlError as e:
        raise LlmctlError(f"{source} describes a model llmctl cannot build: {e.message}") from None


def _rope_theta(hf: dict, source: str) -> float:
    """RoPE base from `rope_parameters` (transformers 5) or `rope_theta` (4.x); any rope scaling is an error."""
    scaling = hf.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        if kind != "default":
            raise unrepresentable(source, "rope_scaling", scaling, "llmctl's RoPE has no scaling")
    params = hf.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise unrepresentable(source, "rope_parameters", params, "expected a mapping")
        if params.get("rope_type", "default") != "default":
            raise unrepresentable(source, "rope_parameters.rope_type", params["rope_type"],
                                  "llmctl's RoPE has no scaling")
        if "rope_theta" in params:  # transformers 5 prefers it over a top-level rope_theta
            return _field(params, "rope_theta", float, source=f"{source} rope_parameters")
    return _field(hf, "rope_theta", float, 10000.0, source)


def to_hf_config(m: ModelConfig, tok: Optional[Tokenizer]) -> dict:
    """Our ModelConfig -> a transformers config.json (gpt2 or llama) that loads with no manual step."""
    ids = token_ids(tok)
    if m.arch == "gpt2":
        out: dict[str, Any] = {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": m.vocab_size, "n_positions": m.block_size, "n_embd": m.n_embd, "n_layer": m.n_layer,
            "n_head": m.n_head, "n_inner": m.hidden, "activation_function": EXPORT_ACTIVATIONS[m.activation],
            "layer_norm_epsilon": m.norm_eps, "resid_pdrop": m.dropout, "embd_pdrop": m.dropout,
            "attn_pdrop": m.dropout, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "add_cross_attention": False,
        }
    else:
        out = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": m.vocab_size, "hidden_size": m.n_embd, "intermediate_size": m.hidden,
            "num_hidden_layers": m.n_layer, "num_attention_heads": m.n_head, "num_key_value_heads": m.kv_heads,
            "head_dim": m.head_size, "hidden_act": "silu", "max_position_embeddings": m.block_size,
            "rms_norm_eps": m.norm_eps, "attention_bias": m.has_bias, "mlp_bias": m.has_bias,
            "attention_dropout": m.dropout, "pretraining_tp": 1,
            # transformers 5 reads rope_parameters, 4.x reads rope_theta: write both, equal
            "rope_theta": m.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        }
    out.update({
        "tie_word_embeddings": m.tied, "initializer_range": m.init_std, "use_cache": True,
        "dtype": "float32", "torch_dtype": "float32", **ids,
    })
    return out


# ------------------------------------------------------------------------------------------------------------------
# Tokenizer files


def token_ids(tok: Optional[Tokenizer]) -> dict[str, Optional[int]]:
    """bos/eos/pad ids for config.json and generation_config.json (which lists every end id: tokenizer_files).
    Unconditional sampling starts from <eos> where no BOS is added, so BOS is the tokenizer's own BOS token if it has
    one, else <eos>."""
    if tok is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    bos = tok.bos_id if tok.bos_id is not None else tok.eos_id
    return {"bos_token_id": bos, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


def generation_config(cfg: Config, tok: Optional[Tokenizer]) -> dict:
    """Our `generate` defaults as a generation_config.json (sampling parameters only when sampling; top_k 0 and -1,
    "no limit" in llmctl, are left out as the carrier stores them: None)."""
    g = Sampling.from_config(cfg.generate)
    out: dict[str, Any] = {**token_ids(tok), "eos_token_id": tokenizer_files.generation_eos(tok),
                           "do_sample": g.temperature > 0}
    if g.temperature > 0:
        out["temperature"] = g.temperature
        if g.top_k is not None:
            out["top_k"] = g.top_k
        if g.top_p is not None:
            out["top_p"] = g.top_p
    return out


# ------------------------------------------------------------------------------------------------------------------
# Reading and writing directories


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LlmctlError(f"{path} is not a readable JSON {what} ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(data, dict):
        raise LlmctlError(f"{path} must hold a JSON object ({what})")
    return data


def read_weights(src: Path) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of a transformers directory and a description of where they came from.

    Prefers safetensors (single file, then sharded); falls back to pytorch_model.bin (single or sharded), which is
    loaded with weights_only=True, so a pickle holding code is refused rather than run.
    """
    if (src / SAFETENSORS).is_file():
        return _load_safetensors(src / SAFETENSORS), str(src / SAFETENSORS)
    if (src / SAFETENSORS_INDEX).is_file():
        return _load_sharded(src, SAFETENSORS_INDEX, _load_safetensors), str(src / SAFETENSORS_INDEX)
    if (src / TORCH_BIN).is_file():
        return _load_torch(src / TORCH_BIN), str(src / TORCH_BIN)
    if (src / TORCH_BIN_INDEX).is_file():
        return _load_sharded(src, TORCH_BIN_INDEX, _load_torch), str(src / TORCH_BIN_INDEX)
    raise LlmctlError(f"{src} has no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX} (sharded) or {TORCH_BIN}")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LlmctlError(f"{path} cannot be read as safetensors ({str(e).splitlines()[0][:160]})") from None


def _load_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a refused pickle or a damaged file: both mean "do not trust it"
        detail = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines()[0].split(". ")[0][:160]
        raise LlmctlError(f"{path} cannot be loaded safely ({detail}): it holds objects other than tensors, or is "
                          "damaged; use the model's safetensors files instead") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LlmctlError(f"{path} does not hold a plain state dict of tensors")
    return state


def _load_sharded(src: Path, index_name: str, load: Callable[[Path], dict]) -> dict[str, torch.Tensor]:
    index = read_json(src / index_name, "weight index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise LlmctlError(f"{src / index_name} has no weight_map; the sharded checkpoint is damaged")
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        p = src / shard
        if not p.is_file():
            raise LlmctlError(f"shard {p} named in {index_name} is missing; download it too")
        out.update(load(p))
    missing = [k for k in weight_map if k not in out]
    if missing:
        raise LlmctlError(f"{src / index_name} lists {missing[0]} but no shard holds it; the download is incomplete")
    return out


@dataclass
class Imported:
    """A transformers checkpoint turned into our terms."""

    cfg: Config
    weights: dict[str, torch.Tensor]
    tokenizer: Optional[Tokenizer]
    source: str
    hf_config: dict
    warnings: list[str] = field(default_factory=list)


def load_dir(src: Path, tokenizer_path: Optional[Path] = None) -> Imported:
    """Read a local transformers directory (see the module docstring). `tokenizer_path` overrides or supplies
    the tokenizer.json."""
    src = Path(src).expanduser()
    if not src.is_dir():
        raise LlmctlError(f"{src} is not a directory; give a transformers checkpoint directory or hf:NAME")
    if not (src / "config.json").is_file():
        raise LlmctlError(f"{src} has no config.json, so it is not a transformers checkpoint directory")
    hf_cfg = read_json(src / "config.json", "model config")
    m = to_model_config(hf_cfg, str(src / "config.json"))
    tensors, where = read_weights(src)
    weights = from_hf_weights(tensors, m, where)
    warnings = []
    if tokenizer_path is not None:
        tok: Optional[Tokenizer] = Tokenizer.from_file(tokenizer_path)
    elif (src / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(src / "tokenizer.json")
    else:
        tok = None
        other = [n for n in ("tokenizer.model", "vocab.json") if (src / n).exists()]
        warnings.append(f"{src} has no tokenizer.json"
                        + (f" (llmctl does not read {', '.join(other)})" if other else "")
                        + ": the checkpoint is imported without a tokenizer; give one with --tokenizer FILE")
    if tok is not None and tok.vocab_size > m.vocab_size:
        raise LlmctlError(f"the tokenizer has {tok.vocab_size} tokens but the model only {m.vocab_size} embeddings; "
                          "give the tokenizer that belongs to this model")
    tok, settings = tokenizer_files.read(src, tok, hf_cfg)  # chat template, special tokens, end ids
    cfg = Config(model=m)
    cfg.tokenizer.kind = "bpe" if tok is not None and tok.kind == "bpe" else cfg.tokenizer.kind
    for name, value in settings.items():
        setattr(cfg.tokenizer, name, value)
    return Imported(cfg, weights, tok, str(src), hf_cfg, warnings)


def write_dir(out: Path, cfg: Config, weights: dict[str, torch.Tensor], tok: Optional[Tokenizer],
              source: str) -> list[str]:
    """Write a transformers directory into `out` (which must exist and be empty). Returns the file names."""
    m = cfg.model
    files: dict[str, Any] = {
        "config.json": to_hf_config(m, tok),
        "generation_config.json": generation_config(cfg, tok),
    }
    if tok is not None:  # with the chat template the model was tuned in (or imported with), if any
        tokenizer_files.write(out, tok, m.block_size, exported_template(cfg, tok))
    for name, obj in files.items():
        (out / name).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    save_file(to_hf_weights(weights, m, source), str(out / SAFETENSORS), metadata={"format": "pt"})
    return sorted(p.name for p in out.iterdir())


def download(name: str, log: Callable[[str], None] = lambda s: None) -> Path:
    """`hf:NAME`: fetch the files import needs from the Hugging Face hub (huggingface_hub, imported lazily) and
    return the local snapshot directory. Safetensors are preferred; pytorch_model.bin only when a repo has none."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise LlmctlError("hf:NAME needs huggingface_hub (pip install 'llmctl[hf]'); or download the model "
                          "yourself and give its directory") from None
    if not name or name.count("/") > 1:
        raise LlmctlError(f"hf:{name} is not a hub model name; write hf:OWNER/NAME, e.g. hf:openai-community/gpt2")
    log(f"downloading {name} from the Hugging Face hub")
    try:
        path = Path(snapshot_download(repo_id=name, allow_patterns=DOWNLOAD_PATTERNS))
        if not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(repo_id=name, allow_patterns=DOWNLOAD_PATTERNS + DOWNLOAD_BIN_PATTERNS))
    except Exception as e:  # network, authentication, unknown repository: all are the user's to fix
        raise LlmctlError(f"cannot download {name} from the Hugging Face hub ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else 'no detail'}); check the name and the "
                          "network, or give a local directory") from None
    return path
