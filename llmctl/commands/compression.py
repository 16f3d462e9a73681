"""prune: a trained checkpoint -> a smaller checkpoint of the same flavour (logic in `llmctl.prune`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch

from .. import checkpoint as ckpt_io
from .. import prune as prune_mod
from ..config import from_dict, parse_overrides
from ..data import tokenize_file
from ..errors import LlmctlError
from ..events import SILENT, Events
from ..loading import load_model
from ..lora import merge_lora
from ..rundir import check_out_dir, clear_run, write_run_files, write_status
from ..train import lm_loss

DEFAULT_SAMPLES = 256  # calibration blocks: importance ranks settle well before this on small models


def _changes(overrides: list[str]) -> dict:
    raw = parse_overrides(overrides)
    other = [k for k in raw if k != "model"]
    if other:
        raise LlmctlError(f"llmctl prune --set takes model shape keys only (model.n_layer=...), not {other[0]}.*")
    model = raw.get("model") or {}
    bad = [k for k, v in model.items()  # (other keys: child_config names what may change)
           if k in prune_mod.SHAPE_KEYS and (not isinstance(v, int) or isinstance(v, bool))]
    if bad:
        raise LlmctlError(f"--set model.{bad[0]}={model[bad[0]]!r}: must be a whole number")
    return model


def _shape(m) -> dict:
    return {"n_layer": m.n_layer, "n_head": m.n_head, "n_kv_head": m.kv_heads, "n_embd": m.n_embd,
            "head_dim": m.head_size, "mlp_hidden": m.hidden}


@torch.no_grad()
def _loss(model, blocks: torch.Tensor) -> float:
    """Mean next-token loss over the calibration blocks (how much a pruning costs before any training)."""
    total = 0.0
    for b in blocks.split(16):
        total += float(lm_loss(model, {"input_ids": b[:, :-1], "labels": b[:, 1:]})) * len(b)
    return total / len(blocks)


def prune(ckpt: Path, out: Optional[Path], data: Optional[str], overrides: list[str],
          target_params: Optional[int] = None, by: str = "width", samples: int = DEFAULT_SAMPLES,
          dry_run: bool = False, overwrite: bool = False, events: Events = SILENT) -> dict:
    """`llmctl prune`: rank the units of `ckpt` on calibration text, keep the most important, write the smaller model
    to `out` as a normal checkpoint (step 0) that infer, eval, finetune and export take."""
    changes = _changes(overrides)
    if changes and target_params is not None:
        raise LlmctlError("give the shape (--set model.n_layer=... and the like) or --target-params, not both")
    if not changes and target_params is None:
        raise LlmctlError("say what to keep: --set model.n_layer=N (n_head, n_kv_head, n_embd, mlp_hidden) "
                          "or --target-params N")
    if samples < 1:
        raise LlmctlError(f"--samples must be at least 1 (got {samples})")
    if not dry_run:
        if out is None:
            raise LlmctlError("--out is required (the run directory of the pruned model); or pass --dry-run")
        check_out_dir(Path(out), resume=False, overwrite=overwrite)
    loaded = load_model(ckpt, "cpu")
    ck, cfg = loaded.ckpt, loaded.cfg
    if loaded.classifier is not None:
        raise LlmctlError(f"{ck.path} is a classification checkpoint; prune the language model it was finetuned "
                          "from, then finetune the pruned one")
    model = merge_lora(loaded.model).float().eval()  # an adapter is folded into its base first
    parent = cfg.model
    prune_mod.check_parent(parent)
    if target_params is not None:
        child = prune_mod.fit_shape(parent, target_params, by)
    else:
        child = prune_mod.child_config(parent, changes)
    child_cfg = from_dict({**cfg.to_dict(), "model": dataclasses.asdict(child)})  # every usual check of a model
    path = data or cfg.data.path
    if path is None:
        raise LlmctlError(f"--data is needed: {ck.path} records no data.path to calibrate on")
    tokens = tokenize_file(path, cfg.data, loaded.tokenizer, key="--data")
    blocks = prune_mod.calibration_blocks(tokens, parent.block_size, samples)
    events.log(f"measuring importance on {len(blocks)} blocks of {parent.block_size} tokens from {path}")
    imp = prune_mod.importance(model, blocks)
    small, kept = prune_mod.prune(model, child_cfg.model, imp)
    report = {
        "checkpoint": str(ck.path),
        "out": str(out) if out is not None else None,
        "by": by if target_params is not None else "shape",
        "parent": _shape(parent), "pruned": _shape(child_cfg.model),
        "parameters": {"before": model.num_params(), "after": small.num_params()},
        "parameters_non_embedding": {"before": model.num_params(embeddings=False),
                                     "after": small.num_params(embeddings=False)},
        "calibration_loss": {"before": round(_loss(model, blocks), 4), "after": round(_loss(small, blocks), 4)},
        "removed": kept.removed(parent),
        "ranking": prune_mod.ranking(parent, imp),
    }
    if dry_run:
        return report
    out = Path(out)
    if overwrite and out.is_dir():
        clear_run(out)
    config_yaml, tok_json = child_cfg.to_yaml(), loaded.tokenizer.to_str()
    weights_file = ckpt_io.ADAPTER if ckpt_io.ADAPTER in ck.meta["files"] else ckpt_io.WEIGHTS
    meta = {"kind": "prune", "task": "lm", "method": "full",
            "parent": {"path": str(ck.path.resolve()), "sha256": ck.meta["files"].get(weights_file)},
            "removed": report["removed"], "calibration": {"data": str(path), "blocks": len(blocks)}}
    out.mkdir(parents=True, exist_ok=True)
    report["checkpoint_out"] = str(ckpt_io.save(out, 0, small.state_dict(), config_yaml, tok_json, meta=meta))
    write_run_files(out, config_yaml, tok_json)
    write_status(out, "finished", kind="prune", step=0, parent=str(ck.path))
    events.log(f"pruned {ck.path}: {report['parameters_non_embedding']['before']:,} -> "
               f"{report['parameters_non_embedding']['after']:,} non-embedding parameters; wrote {out}")
    return report
