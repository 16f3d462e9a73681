"""The files beside a transformers model's tokenizer.json: what `import hf` reads from them into the `tokenizer:`
settings (llmctl.config TokenizerConfig) and tokenizer.json itself, and what `export` writes back.

Read on import:
  - the chat template: chat_template.jinja (transformers 5 writes it there, and prefers it), else
    tokenizer_config.json's `chat_template` (a string, or a list of named templates: the one named "default")
    -> tokenizer.chat_template
  - the named special tokens (bos_token, eos_token, unk_token, sep_token, pad_token, cls_token, mask_token; a string
    or an AddedToken object's `content`) of tokenizer_config.json, or of special_tokens_map.json where
    tokenizer_config.json has no added_tokens_decoder (transformers' rule) -> tokenizer.special_tokens
  - add_bos_token / add_eos_token of tokenizer_config.json: where given and not what tokenizer.json's post-processor
    does, the post-processor is replaced by one that adds exactly those (transformers 4's Llama and Gemma tokenizers
    did so; transformers 5 ignores the two flags when a tokenizer.json exists, and reads the post-processor), so the
    tokenizer.json stored with the model is the one home of "which special tokens a plain prompt gets"
  - generation_config.json's eos_token_id (one id or a list; config.json's when there is no generation config) ->
    tokenizer.end_ids
Written on export: tokenizer_config.json (PreTrainedTokenizerFast, so transformers uses tokenizer.json as it is; the
named special tokens; add_bos_token/add_eos_token as the post-processor does; the chat template) and
chat_template.jinja, and the end ids for generation_config.json's eos_token_id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from tokenizers import processors

from .errors import LlmctlError
from .tokenizer import Tokenizer

NAMED = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TOKENIZER_CONFIG, SPECIAL_MAP, CHAT_TEMPLATE = "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"
GENERATION_CONFIG = "generation_config.json"


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LlmctlError(f"{path} is not readable JSON ({str(e).splitlines()[0][:160]}); give the model's own "
                          "file or remove it") from None
    if not isinstance(data, dict):
        raise LlmctlError(f"{path} must hold a JSON object")
    return data


def chat_template(src: Path, tok_cfg: dict) -> Optional[str]:
    """The model's chat template in directory `src` (see the module docstring), or None."""
    if (src / CHAT_TEMPLATE).is_file():
        try:
            return (src / CHAT_TEMPLATE).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LlmctlError(f"{src / CHAT_TEMPLATE} cannot be read as UTF-8 text ({e})") from None
    t = tok_cfg.get("chat_template")
    if t is None or isinstance(t, str):
        return t
    if isinstance(t, list):
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise LlmctlError(f"{src / TOKENIZER_CONFIG}: chat_template must be a string, or a list of named templates with "
                      "one named \"default\"")


def special_tokens(src: Path, tok_cfg: dict) -> dict[str, str]:
    """The named special tokens the model's files give (empty when there are none)."""
    raw = dict(tok_cfg)
    if "added_tokens_decoder" not in tok_cfg and (src / SPECIAL_MAP).is_file():
        raw = {**_json(src / SPECIAL_MAP), **{k: v for k, v in tok_cfg.items() if v is not None}}
    out = {}
    for name in NAMED:
        v = raw.get(name)
        v = v.get("content") if isinstance(v, dict) else v
        if isinstance(v, str) and v:
            out[name] = v
    return out


def end_ids(src: Path, hf_config: dict) -> list[int]:
    """generation_config.json's eos_token_id (config.json's when it has none) as a list."""
    gen = _json(src / GENERATION_CONFIG) if (src / GENERATION_CONFIG).is_file() else {}
    ids = gen.get("eos_token_id", hf_config.get("eos_token_id"))
    ids = [ids] if isinstance(ids, int) and not isinstance(ids, bool) else ids
    if ids is None:
        return []
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise LlmctlError(f"{src / GENERATION_CONFIG}: eos_token_id must be a token id or a list of them (got {ids!r})")
    return ids


def read(src: Path, tok: Optional[Tokenizer], hf_config: dict) -> tuple[Optional[Tokenizer], dict]:
    """The tokenizer with the settings of the files in `src`, and those settings (TokenizerConfig fields:
    chat_template, special_tokens, end_ids). Without a tokenizer only the chat template is kept."""
    src = Path(src)
    tok_cfg = _json(src / TOKENIZER_CONFIG) if (src / TOKENIZER_CONFIG).is_file() else {}
    settings: dict[str, Any] = {"chat_template": chat_template(src, tok_cfg)}
    if tok is None:
        return None, settings
    named = special_tokens(src, tok_cfg)
    # files that name nothing (a bare tokenizer.json): the usual spellings find them, as for llmctl's own
    settings["special_tokens"] = named if tok_cfg or (src / SPECIAL_MAP).is_file() else None
    tok = with_specials_added(tok, tok_cfg.get("add_bos_token"), tok_cfg.get("add_eos_token"), named)
    try:
        tok = Tokenizer(tok.tk, settings["special_tokens"], end_ids(src, hf_config))
    except LlmctlError as e:
        raise LlmctlError(f"{src}: {e.message}") from None
    settings["end_ids"] = list(tok.end_ids[1:]) or None  # besides the end-of-text token
    return tok, settings


def with_specials_added(tok: Tokenizer, add_bos: Any, add_eos: Any, named: dict[str, str]) -> Tokenizer:
    """`tok` whose post-processor adds bos_token when `add_bos` and eos_token when `add_eos` (tokenizer_config.json's
    flags; None: not given). Unchanged when neither is given or the post-processor already does exactly that."""
    if add_bos is None and add_eos is None:
        return tok
    vocab = tok.tk.get_vocab(with_added_tokens=True)
    bos, eos = named.get("bos_token"), named.get("eos_token")
    want_bos = bool(add_bos) and bos in vocab  # as transformers: no named token, nothing added
    want_eos = bool(add_eos) and eos in vocab
    before, after = tok.added_specials()
    if (before, after) == (([vocab[bos]] if want_bos else []), ([vocab[eos]] if want_eos else [])):
        return tok
    single = " ".join(([f"{bos}:0"] if want_bos else []) + ["$A:0"] + ([f"{eos}:0"] if want_eos else []))
    pair = single + " " + " ".join(([f"{bos}:1"] if want_bos else []) + ["$B:1"] + ([f"{eos}:1"] if want_eos else []))
    specials = ([(bos, vocab[bos])] if want_bos else []) + ([(eos, vocab[eos])] if want_eos else [])
    tk = Tokenizer.from_str(tok.to_str()).tk  # a copy: the caller's tokenizer stays as it was
    tk.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    return Tokenizer(tk, tok.named, tok.end_ids[1:])


# ------------------------------------------------------------------------------------------------------------------
# Export


def tokenizer_config(tok: Tokenizer, block_size: int, template: Optional[str]) -> dict:
    """tokenizer_config.json for `tok`: PreTrainedTokenizerFast makes AutoTokenizer use tokenizer.json verbatim (the
    model-specific classes may rebuild the pipeline); no space clean-up, so decode gives back exactly the text;
    add_bos_token/add_eos_token say what the post-processor does (transformers 4 reads them)."""
    before, after = tok.added_specials()
    out: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **tok.special_tokens,
        "model_max_length": block_size,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": tok.bos_id is not None and before == [tok.bos_id],
        "add_eos_token": after == [tok.eos_id],
    }
    if template is not None:
        out["chat_template"] = template
    return out


def write(out: Path, tok: Tokenizer, block_size: int, template: Optional[str]) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and (with a template) chat_template.jinja
    into directory `out`; the file names written."""
    files = {"tokenizer.json": tok.to_str(),
             TOKENIZER_CONFIG: json.dumps(tokenizer_config(tok, block_size, template), indent=2) + "\n",
             SPECIAL_MAP: json.dumps(tok.special_tokens, indent=2) + "\n"}
    if template is not None:
        files[CHAT_TEMPLATE] = template
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
    return list(files)


def generation_eos(tok: Optional[Tokenizer]) -> Optional[int | list[int]]:
    """generation_config.json's eos_token_id: the end-of-text id, or the list of every end id when there are more."""
    if tok is None:
        return None
    return tok.end_ids[0] if len(tok.end_ids) == 1 else list(tok.end_ids)
