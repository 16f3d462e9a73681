"""Reading and writing transformers checkpoint directories, and fetching them from the hub.

Import reads `config.json`; `model.safetensors`, sharded safetensors with `model.safetensors.index.json`, or
`pytorch_model.bin` through `torch.load(weights_only=True)`; `tokenizer.json` when present. Export writes such a
directory, so `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load it as is.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import tokenizer_files
from ..chat import exported_template
from ..config import Config, ModelConfig
from ..errors import LlmctlError
from ..tokenizer import Tokenizer
from . import encoders
from .configs import architecture, model_config_json, to_model_config
from .fields import read_json
from .layouts import from_hf_weights, head_to_hf, split_head, to_hf_weights
from .tokens import generation_config, token_ids

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# what `hf:NAME` downloads: top-level files only (repos often also hold onnx/, original/, flax weights)
DOWNLOAD_PATTERNS = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "chat_template.jinja",
                     SAFETENSORS, "model-*.safetensors", SAFETENSORS_INDEX]
DOWNLOAD_BIN_PATTERNS = [TORCH_BIN, "pytorch_model-*.bin", TORCH_BIN_INDEX]


def to_hf_config(m: ModelConfig, tok: Optional[Tokenizer], labels: Optional[list[str]] = None,
                 pooling: Optional[str] = None) -> dict:
    """Our ModelConfig -> a transformers config.json that loads with no manual step (the architecture:
    model.hf_architecture, see `configs.family_of`; an encoder classifier with `labels`: *ForSequenceClassification
    with them as id2label)."""
    arch = model_config_json(m) if not labels else {
        **encoders.to_hf_config(m, len(labels), pooling or "cls"),
        "id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}
    return {
        **arch, "tie_word_embeddings": m.tied, "initializer_range": m.init_std, "use_cache": True,
        "dtype": "float32", "torch_dtype": "float32", **token_ids(tok),
    }


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
    head: Optional[dict[str, torch.Tensor]] = None
    """An encoder classifier's head (`heads.Classifier.head_state` form); None: a language model."""


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
    head, labels = None, None
    if architecture(hf_cfg).endswith("ForSequenceClassification"):  # an encoder classifier: the head apart
        tensors, head = split_head(tensors, m)
        id2label = hf_cfg.get("id2label") or {}
        labels = [str(id2label.get(str(i), id2label.get(i, i))) for i in range(len(head["bias"]))]
    weights = from_hf_weights(tensors, m, where)
    warnings = [f"{src}: the pooler ({name.removesuffix('.weight')}) is not imported: it serves only a classifier, "
                "and one finetuned from this import starts a fresh one"
                for name in encoders.unused(m)[:1] if any(k.endswith(name.removeprefix("bert.")) for k in tensors)]
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
    if head is not None:
        cfg.finetune.task, cfg.finetune.labels = "classification", labels
        cfg.finetune.pooling = hf_cfg.get("classifier_pooling", "cls")
    cfg.tokenizer.kind = "bpe" if tok is not None and tok.kind == "bpe" else cfg.tokenizer.kind
    for name, value in settings.items():
        setattr(cfg.tokenizer, name, value)
    return Imported(cfg, weights, tok, str(src), hf_cfg, warnings, head)


def write_dir(out: Path, cfg: Config, weights: dict[str, torch.Tensor], tok: Optional[Tokenizer],
              source: str, head: Optional[dict[str, torch.Tensor]] = None) -> list[str]:
    """Write a transformers directory into `out` (which must exist and be empty). Returns the file names. `head`:
    an encoder classifier's (`heads.Classifier.head_state`), written as *ForSequenceClassification."""
    m = cfg.model
    labels = cfg.finetune.labels if head is not None else None
    files: dict[str, Any] = {
        "config.json": to_hf_config(m, tok, labels, cfg.finetune.pooling),
        "generation_config.json": generation_config(cfg, tok),
    }
    if tok is not None:  # with the chat template the model was tuned in (or imported with), if any
        tokenizer_files.write(out, tok, m.block_size, exported_template(cfg, tok))
    for name, obj in files.items():
        (out / name).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    tensors = to_hf_weights(weights, m, source)
    if head is not None:
        tensors.update(head_to_hf(head, m))
    save_file(tensors, str(out / SAFETENSORS), metadata={"format": "pt"})
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
