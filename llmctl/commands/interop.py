"""import / export: move checkpoints between llmctl and Hugging Face transformers (logic in `llmctl.hf`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .. import checkpoint as ckpt_io
from .. import hf
from ..errors import LlmctlError
from ..events import SILENT, Events
from ..fileio import atomic_dir, atomic_path
from ..loading import load_model
from ..lora import merge_lora
from ..rundir import check_out_dir, clear_run, write_run_files

FORMATS = ("hf", "gguf")


def import_hf(source: str, out: Path, tokenizer: Optional[Path] = None, overwrite: bool = False,
              events: Events = SILENT) -> dict:
    """`llmctl import hf`: a transformers directory (or `hf:NAME` from the hub) -> an llmctl run directory whose
    one checkpoint (step 0) `finetune --from`, `infer --ckpt` and `eval --ckpt` take."""
    out = Path(out)
    if not overwrite and out.exists() and (not out.is_dir() or any(out.iterdir())):  # refuse before any download
        raise LlmctlError(f"--out {out} already exists and is not empty; pass --overwrite to replace the run there, "
                          "or choose another directory")
    src = hf.download(source[3:], events.log) if source.startswith("hf:") else Path(source)
    imported = hf.load_dir(src, tokenizer)
    check_out_dir(out, resume=False, overwrite=overwrite)
    if overwrite and out.is_dir():  # deleted only once the import is known to be sound
        clear_run(out)
    for w in imported.warnings:
        events.warn(w)
    cfg, tok = imported.cfg, imported.tokenizer
    config_yaml = cfg.to_yaml()
    tok_json = tok.to_str() if tok is not None else None
    meta = {"kind": "import", "imported_from": source, "hf_architectures": imported.hf_config.get("architectures")}
    out.mkdir(parents=True, exist_ok=True)
    extra = {ckpt_io.HEAD: imported.head} if imported.head is not None else None  # an encoder classifier
    path = ckpt_io.save(out, 0, imported.weights, config_yaml, tok_json, meta=meta, extra_files=extra)
    write_run_files(out, config_yaml, tok_json)  # the run-level copies a trained run has too
    m = cfg.model
    events.log(f"imported {source} ({m.hf_architecture}): {m.n_layer} layers, width {m.n_embd}, {m.n_head} heads "
               f"({m.kv_heads} key/value), vocabulary {m.vocab_size}, context {m.block_size}")
    return {
        "checkpoint": str(path),
        "source": source,
        "arch": m.arch,
        "architecture": m.hf_architecture,
        "parameters": sum(t.numel() for t in imported.weights.values()),
        "vocab_size": m.vocab_size,
        "block_size": m.block_size,
        "tokenizer": tok.kind if tok is not None else None,
    }


def export(ckpt: Path, fmt: str, out: Path, tokenizer: Optional[Path] = None, overwrite: bool = False,
           events: Events = SILENT, base: Optional[Path] = None, merge_lora_adapter: bool = False,
           outtype: str = "f16") -> dict:
    """`llmctl export --format hf`: a checkpoint -> a directory transformers loads with from_pretrained;
    `--format gguf`: a single GGUF file for llama.cpp (`outtype` f32, f16 or q8_0; llmctl.gguf_export).

    A LoRA adapter is exported with `merge_lora_adapter` (--merge-lora): folded into its base's weights (`base`
    overrides the recorded base checkpoint). The directory or file is written next to `out` under a temporary name
    and renamed into place, so a failed export leaves nothing half-written."""
    if fmt not in FORMATS:
        raise LlmctlError(f"--format {fmt!r} is not supported; choose one of: {', '.join(FORMATS)}")
    out = Path(out)
    if fmt == "gguf":
        return _export_gguf(ckpt, out, tokenizer, overwrite, events, base, merge_lora_adapter, outtype)
    if out.exists():
        if not out.is_dir():
            raise LlmctlError(f"--out {out} is a file; give a directory for the export")
        if any(out.iterdir()):
            if not overwrite:
                raise LlmctlError(f"--out {out} is not empty; pass --overwrite to replace an earlier export")
            if not (out / "config.json").exists():
                raise LlmctlError(f"--overwrite refuses to delete {out}: it does not look like an exported model "
                                  "(no config.json)")
    loaded = _exportable(ckpt, base, tokenizer, merge_lora_adapter, "hf")
    ck, cfg, tok = loaded.ckpt, loaded.cfg, loaded.tokenizer
    if tok is None:
        events.warn(f"{ck.path} has no tokenizer, so the export has none; pass --tokenizer FILE to include one")
    weights = merge_lora(loaded.model).state_dict()  # LoRA adapters folded into the weights they adapt
    head = loaded.classifier.head_state() if loaded.classifier is not None else None
    with atomic_dir(out, replace=True) as tmp:
        files = hf.write_dir(tmp, cfg, weights, tok, str(ck.path), head)
    hf_arch = json.loads((out / "config.json").read_text())["architectures"][0]
    events.log(f"exported {ck.path} to {out} ({cfg.model.arch} -> {hf_arch})")
    return {"checkpoint": str(ck.path), "out": str(out), "format": fmt, "files": files}


def _exportable(ckpt: Path, base: Optional[Path], tokenizer: Optional[Path], merge_lora_adapter: bool, fmt: str):
    """The loaded checkpoint, refused when it is an unmerged LoRA adapter or a classifier."""
    loaded = load_model(ckpt, "cpu", base=base, tokenizer=tokenizer, require_tokenizer=False)
    ck = loaded.ckpt
    if ckpt_io.ADAPTER in ck.meta["files"] and not merge_lora_adapter:
        raise LlmctlError(f"{ck.path} is a LoRA adapter; "
                          "pass --merge-lora to fold it into its base's weights and export that")
    if fmt == "gguf" and not loaded.cfg.model.causal:
        raise LlmctlError(f"{ck.path} is an encoder (model.causal=false); GGUF files are for llama.cpp's decoders: "
                          "export --format hf")
    if loaded.classifier is not None and (fmt != "hf" or loaded.cfg.model.causal):
        raise LlmctlError(f"{ck.path} is a classification checkpoint; export --format {fmt} writes language models "
                          "and encoder classifiers only (export the checkpoint it was finetuned from)")
    return loaded


def _export_gguf(ckpt: Path, out: Path, tokenizer: Optional[Path], overwrite: bool, events: Events,
                 base: Optional[Path], merge_lora_adapter: bool, outtype: str) -> dict:
    from .. import gguf_export

    gguf_export.require()
    if out.is_dir():
        raise LlmctlError(f"--out {out} is a directory; GGUF is one file: give a path such as model.gguf")
    if out.exists() and not overwrite:
        raise LlmctlError(f"--out {out} exists; pass --overwrite to replace it")
    loaded = _exportable(ckpt, base, tokenizer, merge_lora_adapter, "gguf")
    ck, cfg, tok = loaded.ckpt, loaded.cfg, loaded.tokenizer
    gguf_export.check(cfg, tok, outtype)
    weights = merge_lora(loaded.model).state_dict()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        gguf_export.write(tmp, cfg, weights, tok, outtype, ck.run_dir.name)
    events.log(f"exported {ck.path} to {out} (GGUF, llama.cpp architecture {cfg.model.arch}, {outtype})")
    return {"checkpoint": str(ck.path), "out": str(out), "format": "gguf", "outtype": outtype,
            "bytes": out.stat().st_size, "files": [out.name]}
