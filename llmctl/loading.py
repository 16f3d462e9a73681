"""From a checkpoint to a model ready for use: verified weights (full, or base + LoRA adapter, plus a task head)
in the Transformer its config describes, its tokenizer, and for generation the engine in the chosen precision."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from . import checkpoint as ckpt_io
from . import quantize as quantize_mod
from .config import Config, from_dict, merge_settings, user_settings
from .errors import LlmctlError
from .events import SILENT, Events
from .generate import Engine
from .hardware import slow_precision_warning
from .heads import Classifier
from .lora import LORA_MODULES, apply_lora, lora_state
from .model import Transformer
from .precision import inference_choices, resolve_device
from .qlora import round_trip_base
from .tokenizer import Tokenizer


def vocab_for(cfg: Config, tok: Tokenizer) -> int:
    m = cfg.model
    if m.vocab_size is not None:
        if m.vocab_size < tok.vocab_size:
            raise LlmctlError(
                f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's {tok.vocab_size} tokens; "
                "raise it or leave it unset"
            )
        return m.vocab_size
    return m.vocab_multiple * math.ceil(tok.vocab_size / m.vocab_multiple)


def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict strictly, except for the output head when it is tied to the embedding."""
    own = model.state_dict()
    missing = [k for k in own if k not in tensors and not (k == "lm_head.weight" and model.cfg.tied)
               and not k.endswith((".lora_a", ".lora_b"))]  # adapters come from their own file
    unexpected = [k for k in tensors if k not in own]
    wrong = [k for k in tensors if k in own and tensors[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}")
        if wrong:
            parts.append(f"shape of {wrong[0]} is {tuple(tensors[wrong[0]].shape)}, expected "
                         f"{tuple(own[wrong[0]].shape)}")
        raise LlmctlError(f"weights in {source} do not match the model config ({'; '.join(parts)})")
    model.load_state_dict(tensors, strict=False)


@dataclass
class Loaded:
    """A model restored from a checkpoint, with everything needed to use it."""

    ckpt: ckpt_io.Checkpoint
    cfg: Config
    tokenizer: Optional[Tokenizer]  # None only when loaded with require_tokenizer=False
    model: Transformer  # the backbone (with LoRA adapters applied when the checkpoint is an adapter)
    device: torch.device
    classifier: Optional[Classifier] = None  # set for classification checkpoints
    labels: Optional[list[str]] = None
    engine: Optional[Engine] = None  # set by `for_inference`
    precision: str = "float32"  # what `for_inference` chose, for reports


def build_backbone(cfg: Config, device: torch.device) -> Transformer:
    """An uninitialised-then-reset Transformer on `device`, without paying for a random init on the CPU first."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    _materialize(model, device)
    if cfg.model.tied:  # each module's parameters are materialised separately: tie them again
        model.lm_head.weight = model.wte.weight
    model.reset_parameters()
    return model


def _materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Module.to_empty, with factory calls: empty_like on meta tensors runs through Python references that import
    sympy (~0.5 s of every `infer` and `eval` start). Buffers already real (RoPE tables) move to `device`."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = (torch.empty(b.shape, dtype=b.dtype, device=device) if b.is_meta
                                         else b.to(device))


def adapter_base(ck: ckpt_io.Checkpoint, base: Optional[Path] = None) -> ckpt_io.Checkpoint:
    """The base checkpoint an adapter was trained on, checked against the checksum the adapter recorded."""
    info = ck.meta.get("base") or {}
    where = base or info.get("path")
    if not where:
        raise LlmctlError(f"{ck.path} is a LoRA adapter without a recorded base checkpoint; pass --base")
    try:
        base_ck = ckpt_io.load(where)
    except LlmctlError as e:
        raise LlmctlError(f"the base checkpoint of adapter {ck.path} cannot be used: {e}") from None
    got = base_ck.meta["files"].get(ckpt_io.WEIGHTS)
    if info.get("sha256") and got != info["sha256"]:
        raise LlmctlError(
            f"base checkpoint {base_ck.path} does not match adapter {ck.path} (its weights' sha256 differs from the "
            "one recorded at training time); point to the checkpoint the adapter was trained on"
        )
    return base_ck


def restore(backbone: Transformer, classifier: Optional[Classifier], ck: ckpt_io.Checkpoint, cfg: Config,
            base: Optional[Path] = None) -> None:
    """Load whatever a checkpoint holds into the modules: full weights, or base + LoRA adapter; and a task head."""
    files = ck.meta["files"]
    if ckpt_io.ADAPTER in files:
        base_ck = adapter_base(ck, base)
        load_weights(backbone, base_ck.weights(), str(base_ck.path))
        if not any(isinstance(m, LORA_MODULES) for m in backbone.modules()):
            f = cfg.finetune
            apply_lora(backbone, f.lora_targets, f.lora_rank, f.lora_alpha, f.lora_dropout)
            if f.method == "qlora":  # the base the adapter was trained against: dequantized NF4
                round_trip_base(backbone)
        adapter = ck.weights(ckpt_io.ADAPTER)
        expected = lora_state(backbone)
        if set(adapter) != set(expected) or any(adapter[k].shape != expected[k].shape for k in adapter):
            raise LlmctlError(f"adapter in {ck.path} does not match the model's LoRA layers "
                              "(finetune.lora_* settings differ)")
        backbone.load_state_dict(adapter, strict=False)
    else:
        load_weights(backbone, ck.weights(), str(ck.path))
    if classifier is not None:
        if ckpt_io.HEAD not in files:
            raise LlmctlError(f"{ck.path} has no classification head; it is not a classification checkpoint")
        head = ck.weights(ckpt_io.HEAD)
        if tuple(head.get("weight", torch.empty(0)).shape) != tuple(classifier.head.weight.shape):
            raise LlmctlError(f"the classification head in {ck.path} does not match finetune.labels")
        if set(head) != set(classifier.head_state()):
            raise LlmctlError(f"the classification head in {ck.path} does not match model.pooler")
        classifier.load_head_state(head)


def load_tokenizer(ck: ckpt_io.Checkpoint, cfg: Config, tokenizer: Optional[Path] = None) -> Tokenizer:
    """The checkpoint's tokenizer, or `tokenizer` (a tokenizer.json) when given: imported checkpoints may lack one;
    with the model's settings of the config's `tokenizer:` section (special tokens, end ids)."""
    tok = Tokenizer.from_file(tokenizer) if tokenizer is not None else Tokenizer.from_str(ck.tokenizer_json())
    tok = tok.configured(cfg.tokenizer)
    if cfg.model.vocab_size is not None and tok.vocab_size > cfg.model.vocab_size:
        raise LlmctlError(f"the tokenizer has {tok.vocab_size} tokens but the model in {ck.path} only "
                          f"{cfg.model.vocab_size} embeddings; give the tokenizer that belongs to this model")
    return tok


def load_model(path: str | Path, device: str = "auto", dtype: Optional[torch.dtype] = None,
               base: Optional[Path] = None, tokenizer: Optional[Path] = None, require_tokenizer: bool = True) -> Loaded:
    """Verify and load a checkpoint (run directory, step directory, or its latest/best pointer) for use.

    `tokenizer` (a tokenizer.json) replaces the checkpoint's, or supplies one that an imported checkpoint lacks;
    with `require_tokenizer=False` a checkpoint without one loads with `Loaded.tokenizer` None."""
    ck = ckpt_io.load(path)
    try:
        cfg = from_dict(ck.config)
    except LlmctlError as e:
        raise LlmctlError(f"{ck.path}/config.yaml does not describe a valid model: {e}") from None
    tok = load_tokenizer(ck, cfg, tokenizer) if require_tokenizer or tokenizer or ck.has_tokenizer else None
    dev = resolve_device(device)
    model = build_backbone(cfg, dev)
    labels = cfg.finetune.labels if ckpt_io.HEAD in ck.meta["files"] else None
    classifier = Classifier(model, len(labels), cfg.finetune.pooling) if labels else None
    restore(model, classifier, ck, cfg, base)
    if dtype is not None:
        model.to(dtype)
        if classifier is not None:
            classifier.to(dtype)
    model.eval()
    if classifier is not None:
        classifier.eval()
    return Loaded(ck, cfg, tok, model, dev, classifier, labels)


def for_inference(loaded: Loaded, dtype: Optional[str] = None, quantize_mode: Optional[str] = None,
                  compile: Optional[bool | str] = None, events: Events = SILENT) -> Loaded:
    """Give a loaded model its generation engine, in the requested precision (in place). None takes the
    checkpoint's (or the user's) `generate` setting, and `auto` is resolved by `precision.inference_choices`;
    `events` hears about an emulated (slow) precision and about compiling."""
    if not loaded.cfg.model.causal:
        raise LlmctlError(f"{loaded.ckpt.path} is an encoder (model.causal=false): encoders classify, they do not "
                          "generate; finetune it with finetune.task=classification, then infer or serve that")
    n_params = sum(p.numel() for p in loaded.model.parameters())
    dtype, quantize_mode, compile = inference_choices(loaded.cfg.generate, dtype, quantize_mode, compile,
                                                      loaded.device, n_params)
    slow = slow_precision_warning(getattr(torch, dtype), loaded.device, "--dtype")
    if slow:
        events.warn(slow)
    loaded.model = quantize_mod.convert(loaded.model, dtype, quantize_mode)
    loaded.engine = Engine(loaded.model, loaded.tokenizer, compile=compile, events=events)
    loaded.precision = dtype + (" + int8" if quantize_mode == "int8" else "")
    return loaded


def apply_settings(loaded: Loaded, config: Optional[Path], overrides: list[str], sections: tuple[str, ...],
                   command: str) -> Config:
    """The checkpoint's config with the user's settings of `sections` over it (the YAML `config`, then each
    `--set`), checked like any config; the rest (the model above all) comes from the checkpoint, so a setting of
    another section is refused. Sets them on `loaded.cfg` and returns it."""
    raw = user_settings(config, overrides)
    other = [k for k in raw if k not in sections]
    if other:
        raise LlmctlError(f"llmctl {command} takes only {' and '.join(s + '.*' for s in sections)} settings; "
                          f"{', '.join(other)} come from the checkpoint")
    cfg = from_dict(merge_settings(loaded.cfg.to_dict(), raw))
    for name in sections:
        setattr(loaded.cfg, name, getattr(cfg, name))
    return loaded.cfg
