"""Rewards you write, for GRPO (`finetune.reward`) and `llmctl eval --reward`: a spec string becomes a function, and
every call of it is checked.

A spec is one of:
  module:function       an importable module's function (the working directory is searched first, as `python`
                        does for a script there);
  path.py:function      a function of a Python file, its path relative to the working directory; only that file
                        is imported;
  classifier:RUN:LABEL  the probability of LABEL under an llmctl classifier checkpoint (a run directory or a step),
                        read in batches; it reads a plain prompt followed by its completion (a conversation's
                        completion alone).
A function is called as TRL calls reward functions: `fn(prompts=[...], completions=[...], **columns)`, one entry per
completion in each list (the prompt as the row gives it, a string or a list of messages; the completion as text, or
for a conversation `[{"role": "assistant", "content": text}]`; each other column of the row repeated for each of its
completions), and returns one number per completion. An exception, a list of the wrong length, or a value that is
not a finite number (None included) is one clear error naming the function and the row.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .data import Examples, classification_ids, eval_batches
from .errors import LlmctlError
from .evaluate import classify
from .loading import load_model

CLASSIFIER = "classifier:"
FORMS = "module:function, path.py:function or classifier:RUN:LABEL"


@dataclass
class Reward:
    """One reward function and the spec it came from (its name in messages and metrics)."""

    name: str
    fn: Callable[..., Any]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _import_file(path: Path, spec: str, key: str):
    if not path.is_file():
        raise LlmctlError(f"{key} {spec!r}: no file {path} (a path is relative to the working directory {Path.cwd()})")
    name = f"llmctl_reward_{path.stem}_{abs(hash(str(path.resolve()))):x}"
    if name in sys.modules:
        return sys.modules[name]
    found = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(found)
    sys.modules[name] = module  # (dataclasses and pickling look the module up by name)
    try:
        found.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise LlmctlError(f"{key} {spec!r}: importing {path} failed: {_first_line(e)}") from None
    return module


def _import_module(name: str, spec: str, key: str):
    cwd = str(Path.cwd())
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise LlmctlError(f"{key} {spec!r}: no module named {e.name!r}; give {FORMS}") from None
    except Exception as e:
        raise LlmctlError(f"{key} {spec!r}: importing {name} failed: {_first_line(e)}") from None
    finally:
        if added:
            sys.path.remove(cwd)


def import_function(spec: str, key: str = "finetune.reward") -> Callable[..., Any]:
    """The function a `module:function` or `path.py:function` spec names."""
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise LlmctlError(f"{key} {spec!r} is not a reward spec; give {FORMS}")
    module = (_import_file(Path(where), spec, key) if where.endswith(".py")
              else _import_module(where, spec, key))
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise LlmctlError(f"{key} {spec!r}: {where} has no function {attr!r}")
    return fn


def classifier_reward(spec: str, device: str | torch.device = "cpu", key: str = "finetune.reward",
                      batch_size: int = 32) -> Callable[..., list[float]]:
    """`classifier:RUN:LABEL` as a reward function: the classifier's probability of LABEL for each completion."""
    run, sep, label = spec[len(CLASSIFIER):].rpartition(":")
    if not sep or not run or not label:
        raise LlmctlError(f"{key} {spec!r}: give classifier:RUN:LABEL (a classifier run directory and one of its "
                          "labels)")
    try:
        loaded = load_model(run, str(device))
    except LlmctlError as e:
        raise LlmctlError(f"{key} {spec!r}: {e.message}") from None
    if loaded.classifier is None:
        raise LlmctlError(f"{key} {spec!r}: {loaded.ckpt.path} is not a classification checkpoint (finetune.task="
                          f"{loaded.cfg.finetune.task})")
    if label not in loaded.labels:
        raise LlmctlError(f"{key} {spec!r}: the classifier has no label {label!r}; its labels are "
                          f"{', '.join(loaded.labels)}")
    k, tok, block = loaded.labels.index(label), loaded.tokenizer, loaded.cfg.model.block_size
    encoder = not loaded.cfg.model.causal

    def probability(prompts: list, completions: list, **columns) -> list[float]:
        texts = [p + c if isinstance(p, str) and isinstance(c, str) else c if isinstance(c, str) else c[-1]["content"]
                 for p, c in zip(prompts, completions)]
        ids, _ = classification_ids(tok, texts, block, encoder=encoder)
        batches = eval_batches(Examples(ids, [0] * len(ids)), list(range(len(ids))), "classification", tok.pad_id,
                               batch_size)
        rows, _, probs, _ = classify(loaded.classifier, batches, loaded.device)
        out = [0.0] * len(ids)
        for r, p in zip(rows.tolist(), probs[:, k].tolist()):
            out[r] = p
        return out

    return probability


def load_reward(spec: str, device: str | torch.device = "cpu", key: str = "finetune.reward") -> Reward:
    if not isinstance(spec, str) or not spec.strip():
        raise LlmctlError(f"{key}: a reward spec must be a non-empty string ({FORMS})")
    spec = spec.strip()
    fn = classifier_reward(spec, device, key) if spec.startswith(CLASSIFIER) else import_function(spec, key)
    return Reward(spec, fn)


class Rewards:
    """Several rewards and their weights: `score` calls each one on a batch of completions, checks what it returns,
    and adds them up."""

    def __init__(self, rewards: list[Reward], weights: Optional[Sequence[float]] = None, key: str = "finetune.reward"):
        self.rewards, self.key = rewards, key
        self.weights = list(weights) if weights is not None else [1.0] * len(rewards)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards]

    def score(self, prompts: list, completions: list, columns: dict[str, list], rows: list[str]
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the weighted sum per completion (N,) float64, {name: its own rewards (N,)}); `rows` names each
        completion's row in messages."""
        each = {r.name: torch.tensor(self._call(r, prompts, completions, columns, rows), dtype=torch.float64)
                for r in self.rewards}
        total = torch.zeros(len(completions), dtype=torch.float64)
        for w, r in zip(self.weights, self.rewards):
            total += w * each[r.name]
        return total, each

    def _call(self, r: Reward, prompts: list, completions: list, columns: dict[str, list], rows: list[str]
              ) -> list[float]:
        try:
            got = r.fn(prompts=prompts, completions=completions, **columns)
        except Exception as e:
            row = self._culprit(r, prompts, completions, columns, rows)
            raise LlmctlError(f"{self.key} {r.name} raised {_first_line(e)} on row {row}") from None
        n = len(completions)
        try:
            values = list(got)
        except TypeError:
            values = None
        if values is None or len(values) != n:
            size = "no list" if values is None else f"{len(values)} values"
            raise LlmctlError(f"{self.key} {r.name} returned {size} for the {n} completions of rows {rows[0]} .. "
                              f"{rows[-1]}; return one float per completion")
        out = []
        for i, v in enumerate(values):
            x = None if isinstance(v, bool) or v is None else _as_float(v)
            if x is None or not math.isfinite(x):
                raise LlmctlError(f"{self.key} {r.name} returned {v!r} for a completion of row {rows[i]}; return a "
                                  "finite float for every completion (None is not allowed)")
            out.append(x)
        return out

    @staticmethod
    def _culprit(r: Reward, prompts: list, completions: list, columns: dict[str, list], rows: list[str]) -> str:
        """The first row whose completions alone make the function raise (all of the batch's rows when none does)."""
        starts = [i for i in range(len(rows)) if i == 0 or rows[i] != rows[i - 1]] + [len(rows)]
        for a, b in zip(starts, starts[1:]):
            try:
                r.fn(prompts=prompts[a:b], completions=completions[a:b], **{k: v[a:b] for k, v in columns.items()})
            except Exception:
                return rows[a]
        return f"{rows[0]} .. {rows[-1]}"


def _as_float(v: Any) -> Optional[float]:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def load_rewards(specs: Sequence[str] | str, weights: Optional[Sequence[float]] = None,
                 device: str | torch.device = "cpu", key: str = "finetune.reward") -> Rewards:
    """Every spec loaded (and checked) now, before any work: a bad one fails at once."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise LlmctlError(f"{key}: name at least one reward ({FORMS})")
    if weights is not None and len(weights) != len(specs):
        raise LlmctlError(f"{key}: {len(specs)} rewards but {len(weights)} weights; give one weight per reward")
    return Rewards([load_reward(s, device, key) for s in specs], weights, key)
