"""RoPE settings of a transformers config, read in both forms that exist and written back in both.

The hub's form (transformers 4.x): `rope_theta`, `rope_scaling` (null or {"rope_type"/"type": ..., keys}),
Gemma 3's `rope_local_base_freq`, Phi-3's `partial_rotary_factor`. transformers 5's form: `rope_parameters`, one
mapping {"rope_type", "rope_theta", scaling keys, "partial_rotary_factor"}, or one per layer type
({"full_attention": {...}, "sliding_attention": {...}}) where the family has local and global layers (Gemma 3).
Precedence follows transformers: a `rope_scaling` mapping replaces `rope_parameters` (Gemma 3: updates its
full-attention entry), and values inside the mapping win over the top-level ones.

The legal scaling types and keys have one home, `llmctl.config.model.check_rope_scaling`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..config.model import check_rope_scaling
from .fields import field, unrepresentable

LAYER_TYPES = ("full_attention", "sliding_attention")
# keys of a transformers RoPE mapping that are not scaling parameters
NOT_SCALING = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
# scaling types whose original context defaults to max_position_embeddings (transformers' standardize_rope_params)
ORIGINAL_CONTEXT = ("llama3", "yarn")


@dataclass
class Rope:
    """A config's RoPE, in ModelConfig's terms."""

    theta: float
    scaling: Optional[dict] = None
    local_theta: Optional[float] = None
    fraction: float = 1.0


def read(hf: dict, source: str, *, per_layer_type: bool = False, default_theta: float = 10000.0,
         default_local_theta: float = 10000.0) -> Rope:
    """The RoPE of config `hf`; `per_layer_type`: the family has separate full and sliding RoPE (Gemma 3)."""
    legacy = hf.get("rope_scaling")
    if legacy is not None and not isinstance(legacy, dict):
        raise unrepresentable(source, "rope_scaling", legacy, "expected a mapping or null")
    params = hf.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise unrepresentable(source, "rope_parameters", params, "expected a mapping")
    nested = params is not None and any(k in LAYER_TYPES for k in params)
    if per_layer_type:
        return _read_per_layer_type(hf, source, legacy, params if nested else None, nested or params is None,
                                    default_theta, default_local_theta)
    name = "rope_scaling" if legacy else "rope_parameters"
    if nested:  # one RoPE for every layer written per layer type: the entries must agree
        entries = [params[k] for k in LAYER_TYPES if k in params]
        if any(e != entries[0] for e in entries):
            raise unrepresentable(source, "rope_parameters", params,
                                  "this architecture has one RoPE for all layers")
        params = entries[0]
    p = dict(legacy or params or {})
    theta = _theta(p, name, source, field(hf, "rope_theta", float, default_theta, source))
    fraction = p.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise unrepresentable(source, "partial_rotary_factor", fraction, "expected a number")
    return Rope(theta, _scaling(p, name, hf, source), fraction=float(fraction))


def _read_per_layer_type(hf: dict, source: str, legacy: Optional[dict], params: Optional[dict], ok: bool,
                         default_theta: float, default_local_theta: float) -> Rope:
    if not ok:
        raise unrepresentable(source, "rope_parameters", hf["rope_parameters"],
                              "this architecture needs one entry per layer type: " + ", ".join(LAYER_TYPES))
    params = params or {}
    full = dict(params.get("full_attention") or {"rope_type": "default"})
    if legacy:
        full.update(legacy)
    local = dict(params.get("sliding_attention") or {"rope_type": "default"})
    theta = _theta(full, "rope_parameters.full_attention", source,
                   field(hf, "rope_theta", float, default_theta, source))
    local_theta = _theta(local, "rope_parameters.sliding_attention", source,
                         field(hf, "rope_local_base_freq", float, default_local_theta, source))
    if _kind(local) != "default":
        raise unrepresentable(source, "rope_parameters.sliding_attention", local,
                              "llmctl scales the RoPE of full-attention layers only")
    name = "rope_scaling" if legacy else "rope_parameters.full_attention"
    return Rope(theta, _scaling(full, name, hf, source), local_theta=local_theta)


def _kind(p: dict) -> Any:
    return p.get("rope_type", p.get("type", "default"))


def _theta(p: dict, name: str, source: str, fallback: float) -> float:
    return field(p, "rope_theta", float, fallback, f"{source} {name}")


def _scaling(p: dict, name: str, hf: dict, source: str) -> Optional[dict]:
    """The scaling mapping in ModelConfig's form (rope_type and its keys), or None for plain RoPE."""
    kind = _kind(p)
    if kind == "default":
        return None
    scaling = {"rope_type": kind, **{k: v for k, v in p.items() if k not in NOT_SCALING}}
    if kind in ORIGINAL_CONTEXT and "original_max_position_embeddings" not in scaling:
        scaling["original_max_position_embeddings"] = hf.get("max_position_embeddings")
    problems = check_rope_scaling(scaling)
    if problems:
        raise unrepresentable(source, name, p, problems[0].removeprefix("model.rope_scaling").lstrip(".: "))
    return scaling


def write(theta: float, scaling: Optional[dict], *, local_theta: Optional[float] = None,
          fraction: Optional[float] = None) -> dict:
    """config.json keys for this RoPE, in both forms (equal): transformers 5 reads `rope_parameters`, 4.x and
    other tools (llama.cpp's converter, vLLM) read `rope_theta` / `rope_scaling` / `rope_local_base_freq`.
    `local_theta` given: the per-layer-type form (Gemma 3); `fraction` given: partial rotary (Phi-3)."""
    main = {"rope_type": "default", "rope_theta": theta}
    if scaling:
        main.update({k: v for k, v in scaling.items() if k != "type"})
    out: dict[str, Any] = {"rope_theta": theta, "rope_scaling": dict(scaling) if scaling else None}
    if local_theta is not None:
        out["rope_local_base_freq"] = local_theta
        out["rope_parameters"] = {"full_attention": main,
                                  "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}}
    else:
        out["rope_parameters"] = main
    if fraction is not None:  # inside rope_parameters always (as transformers 5 writes it), top-level where not 1
        main["partial_rotary_factor"] = fraction
        if fraction != 1.0:
            out["partial_rotary_factor"] = fraction
    return out
