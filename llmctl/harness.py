"""EleutherAI's lm-evaluation-harness on llmctl's own model: an lm-eval `LM` over a loaded checkpoint, no conversion.

The three request types follow lm-eval's HF backend, so the numbers are the same (tests/test_harness.py):
  - `loglikelihood`: lm-eval's `TemplateLM` splits each (context, continuation) pair (trailing whitespace of the
    context moves into the continuation; the whole string is encoded, then split; an empty context is the end-of-text
    token); the pairs are scored in batches, longest first, right-padded, on at most `block_size` + 1 tokens (the
    oldest dropped), in float32 log-softmax.
  - `loglikelihood_rolling`: lm-eval's disjoint rolling windows of `block_size` tokens, the first predicted from the
    end-of-text token, summed.
  - `generate_until`: greedy (or sampled, as the task asks) on the generation engine: the context keeps its last
    `block_size - max_gen_toks` tokens, the text ends before the first stop sequence or the end of text. The task's
    generation kwargs become a `Sampling` by llmctl.sampling's rules, and the user's own settings (`eval --set
    generate.*` and the sampling flags) override them, as lm-eval's `--gen_kwargs` does.
lm-eval is an optional extra (`llmctl[eval]`), imported only here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from . import sampling
from .errors import LlmctlError
from .loading import Loaded
from .rows import Request, fit_prompt
from .sampling import Sampling


def require() -> Any:
    """The lm_eval package, or one clear error naming the extra."""
    try:
        import lm_eval
        import lm_eval.api.model  # noqa: F401
    except ImportError as e:
        raise LlmctlError(f"--tasks needs lm-evaluation-harness ({e.name} is not installed): "
                          "pip install 'llmctl[eval]'") from None
    return lm_eval


def task_sampling(kw: dict, eos: str, changes: dict) -> Sampling:
    """The sampling of one generate_until request: lm-eval's generation kwargs (`until` and the end-of-text token
    as stop strings, `max_gen_toks`, and temperature, top_p, top_k, seed when the task samples), then the user's
    `changes` (field -> value, already checked) over them."""
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

    kw = normalize_gen_kwargs(kw, 256)
    given = {"stop": handle_stop_sequences(kw.pop("until", None), eos=eos), "max_new_tokens": kw.pop("max_gen_toks"),
             "temperature": 0.0}
    if kw.get("do_sample") and kw.get("temperature", 0) > 0:
        given.update({k: kw[k] for k in ("temperature", "top_p", "top_k", "seed") if kw.get(k) is not None})
    lm_eval_name = {"max_new_tokens": "max_gen_toks", "stop": "until (with the end-of-text token)"}
    try:
        s = sampling.replace(Sampling(1), given, name=lambda f: lm_eval_name.get(f, f))
    except sampling.SamplingError as e:
        raise LlmctlError(f"the task's generation_kwargs: {e.message}") from None
    return sampling.replace(s, changes)


def make_lm(loaded: Loaded, batch_size: int, changes: Optional[dict] = None) -> Any:
    """An lm-eval LM for a loaded language model (given its generation engine by `for_inference`); `changes`
    (sampling field -> value) override every generation task's own settings."""
    require()
    from lm_eval.api.model import TemplateLM

    class LlmctlLM(TemplateLM):
        backend = "causal"

        def __init__(self) -> None:
            super().__init__()
            self.loaded, self.tok, self.model = loaded, loaded.tokenizer, loaded.model
            self.max_length = loaded.cfg.model.block_size
            self.batch_size = batch_size

        @property
        def eot_token_id(self) -> int:
            return self.tok.eos_id

        def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
            return self.tok.encode(string)  # llmctl adds no special tokens, in training or here

        def tok_decode(self, tokens, **kwargs) -> str:
            return self.tok.decode(tokens if isinstance(tokens, list) else [tokens])

        @torch.inference_mode()
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None, **kwargs):
            # requests: ((context, continuation) or None, context ids, continuation ids)
            order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
            out: list = [None] * len(requests)
            bs = override_bs or self.batch_size
            for start in range(0, len(order), bs):
                group = order[start : start + bs]
                rows = [(requests[i][1] + requests[i][2])[-(self.max_length + 1):][:-1] for i in group]
                conts = [requests[i][2] for i in group]
                T = max(len(r) for r in rows)
                idx = torch.full((len(rows), T), self.tok.pad_id, dtype=torch.long)
                for j, r in enumerate(rows):
                    idx[j, : len(r)] = torch.tensor(r)  # right padding: causal attention keeps it out of the rows
                logits = self.model(idx.to(self.loaded.device))  # (B, T, V)
                for j, (r, cont) in enumerate(zip(rows, conts)):
                    n = len(cont)
                    logp = F.log_softmax(logits[j, len(r) - n : len(r)].float(), dim=-1)  # (n, V)
                    want = torch.tensor(cont, device=logp.device)
                    greedy = bool((logp.argmax(-1) == want).all())
                    out[group[j]] = (float(logp.gather(1, want[:, None]).sum()), greedy)
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            result = []
            for (text,) in [r.args for r in requests]:
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.eot_token_id, max_seq_len=self.max_length,
                    context_len=1)]
                scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
                result.append(sum(s for s, _ in scores))
            return result

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            jobs = []
            for context, gen_kwargs in [r.args for r in requests]:
                s = task_sampling(gen_kwargs, self.tok.eos_token, changes or {})
                n = s.max_new_tokens
                if n >= self.max_length:
                    raise LlmctlError(f"the task asks for {n} new tokens (max_gen_toks) but the model's context is "
                                      f"{self.max_length}; lower generation_kwargs.max_gen_toks")
                ids = self.tok.encode(context)  # as tok_encode: no special tokens added
                jobs.append(Request(fit_prompt(self.tok, ids, self.max_length - n, truncate=True), s))
            texts: dict[int, str] = {}
            index = {id(q): i for i, q in enumerate(jobs)}
            for row in self.loaded.engine.run(jobs, slots=self.batch_size):
                if row.done:
                    texts[index[id(row.request)]] = row.text
            return [texts[i] for i in range(len(jobs))]

    return LlmctlLM()


_MANAGERS: dict[Optional[str], Any] = {}  # include path (resolved) -> lm-eval TaskManager


def task_manager(include_path: Optional[str] = None) -> Any:
    """lm-eval's TaskManager of its own tasks and those under `include_path`, made once per process and folder:
    it reads every task YAML lm-eval ships (some 15,000, many seconds) to index them. (A task file added under the
    folder later in the same process is not seen.)"""
    key = str(Path(include_path).resolve()) if include_path else None
    if key not in _MANAGERS:
        from lm_eval.tasks import TaskManager

        _MANAGERS[key] = TaskManager(include_path=key) if key else TaskManager()
    return _MANAGERS[key]


def evaluate(loaded: Loaded, tasks: list[str], num_fewshot: Optional[int], limit: Optional[float],
             include_path: Optional[str], batch_size: int, log_samples: bool, changes: Optional[dict] = None) -> dict:
    """Run lm-eval's `simple_evaluate` on `tasks` with the model as an LM; returns lm-eval's results dict.
    `changes` (sampling field -> value) override the generation tasks' own settings."""
    lm_eval = require()
    manager = task_manager(include_path)
    known = set(manager.all_tasks)
    for t in tasks:
        if t not in known:
            close = _closest(t, known)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            where = (f" or in --include-path {include_path}" if include_path
                     else " (add --include-path DIR for local tasks)")
            raise LlmctlError(f"--tasks: lm-eval has no task named {t!r}{where}{hint}")
    lm = make_lm(loaded, batch_size, changes)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                   task_manager=manager, log_samples=log_samples, batch_size=batch_size)


def plain(results: dict) -> dict:
    """lm-eval's results as plain JSON values (its configs hold functions and the like)."""
    import json

    from lm_eval.utils import handle_non_serializable

    keep = {k: results[k] for k in ("results", "groups", "group_subtasks", "versions", "n-shot", "higher_is_better",
                                    "n-samples", "samples", "config") if k in results}
    return json.loads(json.dumps(keep, default=handle_non_serializable))


def table(results: dict) -> list[dict]:
    """Rows of (task, metric, value, stderr) from lm-eval's `results` section."""
    rows = []
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            # metrics are "name,filter" ("acc,none"); lm-eval also reports alias and sample_len
            if not isinstance(value, (int, float)) or "_stderr" in key or "," not in key:
                continue
            metric, _, filt = key.partition(",")
            err = metrics.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "metric": metric, "filter": filt, "value": value,
                         "stderr": err if isinstance(err, (int, float)) else None})
    return rows


def _closest(name: str, known: set[str]) -> list[str]:
    import difflib

    return difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
