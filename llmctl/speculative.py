"""Speculative decoding of one row (`infer --prompt --draft`): a draft proposes k tokens, the target checks them all in
one forward over k + 1 positions, and the row keeps the longest accepted prefix plus one token of the target's own.
`serve --draft` uses `Speculation.engine_step` instead: greedy only, in the row's slot of the server's engine, while
the row decodes alone (the docstring there says how it hands the row back to plain batched steps).

Drafts: `PromptLookup` (the continuation of the latest earlier occurrence of the row's last n tokens, n from
`generate.lookup_ngram` down to 1, in the prompt and the text generated so far: no second model) and `DraftModel`
(a small model with the same vocabulary, sampled like the target).

Each model keeps a one-slot KV cache over the row's tokens (`_Window`); the target's forward extends it from the
last cached position (`Transformer.forward(start=...)`), and after the check it is rolled back to the tokens kept:
positions past them are overwritten by the next extension and never read before (the extension's mask reads only up
to its own last position).

The rule (`Speculation.verify`), position by position, p being the target's distribution at that position exactly as
normal decoding forms it (`logits.processed` with the row's tokens so far, then `logits.distribution` or argmax):
- greedy: the draft token is kept when it is the target's argmax; the first one that is not is replaced by the
  argmax. The output is the target's own greedy output.
- sampling, draft distribution q: keep the draft token x with probability min(1, p(x) / q(x)); else draw from
  norm(max(0, p - q)) and stop. Then P(out = y) = q(y) min(1, p(y)/q(y)) + (1 - sum_x min(q(x), p(x))) *
  max(0, p(y) - q(y)) / sum_x max(0, p(x) - q(x)) = min(q(y), p(y)) + max(0, p(y) - q(y)) = p(y), since
  sum_x max(0, p - q) = 1 - sum_x min(p, q).
- prompt lookup is deterministic: q is one-hot at its token d, so d is kept with probability p(d), and otherwise the
  token is drawn from max(0, p - onehot(d)) normalised: p with d removed, p(y) / (1 - p(d)) for y != d. Then
  P(out = d) = p(d) and P(out = y) = (1 - p(d)) p(y) / (1 - p(d)) = p(y): the target's distribution again.
When every draft token is kept, one more token is drawn from the target's distribution after the last one (free:
the forward computed it). Sampled output with a seed is reproducible, but not the same tokens as without a draft
(the random numbers are used differently); its distribution is the same. Exactness holds while the row fits the
context: past it the window slides (`generate.slide_keep`) at other tokens than `Engine`'s, so outputs may part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from .errors import LlmctlError
from .generate import Engine, slide_keep
from .logits import distribution, processed
from .model import KVCache, Transformer
from .rows import Request, Row
from .sampling import Sampling

PROMPT_LOOKUP = "prompt-lookup"


@dataclass
class Stats:
    """What the drafts achieved: tokens proposed, tokens kept, target forwards."""

    drafted: int = 0
    accepted: int = 0
    forwards: int = 0
    produced: int = 0

    @property
    def acceptance(self) -> float:
        """The share of drafted tokens the target kept (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    def as_dict(self) -> dict:
        return {"drafted": self.drafted, "accepted": self.accepted, "acceptance_rate": round(self.acceptance, 4),
                "target_forwards": self.forwards,
                "tokens_per_forward": round(self.produced / self.forwards, 3) if self.forwards else 0.0}


class _Window:
    """One model's one-slot KV cache over a row's tokens: it holds tokens[start : start + n]."""

    def __init__(self, model: Transformer, length: int):
        p = model.wte.weight
        self.model = model
        self.cache = KVCache.empty(model.cfg, 1, min(length, model.cfg.block_size), p.dtype, p.device)
        self.start = self.n = 0

    def logits(self, seq: list[int]) -> torch.Tensor:
        """Logits (T, V) after each token of `seq` the cache does not hold yet (at least its last one); when `seq`
        outgrows the cache the window slides to its newest `slide_keep` tokens, prefilled again."""
        if len(seq) - self.start > self.cache.length:
            keep = min(slide_keep(self.model.cfg.block_size), self.cache.length)
            self.start, self.n = len(seq) - keep, 0
        new = seq[self.start + self.n:]
        idx = torch.tensor([new], device=self.model.wte.weight.device)
        out = self.model(idx, cache=self.cache, slot=0, start=self.n)[0]
        self.n = len(seq) - self.start
        return out

    def keep(self, upto: int) -> None:
        """Roll back to tokens[:upto] (what is cached past them is overwritten later)."""
        self.n = max(0, min(self.n, upto - self.start))


def lookup(tokens: list[int], k: int, ngram: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the last n tokens of `tokens` (n from `ngram`
    down to 1); [] when none occurred before."""
    end = len(tokens)
    for n in range(min(ngram, end - 1), 0, -1):
        tail = tokens[end - n:]
        first = tail[0]
        for i in range(end - n - 1, -1, -1):  # a match ending before the tail, so something follows it
            if tokens[i] == first and tokens[i:i + n] == tail:
                return tokens[i + n:i + n + k]
    return []


class PromptLookup:
    """Drafts from the row's own tokens (n-gram lookup); deterministic, so its q is one-hot (None)."""

    name = PROMPT_LOOKUP

    def __init__(self, ngram: int = 3):
        if ngram < 1:
            raise LlmctlError(f"generate.lookup_ngram must be at least 1 (got {ngram})")
        self.ngram = ngram

    def reset(self, length: int) -> None:
        pass

    def propose(self, tokens: list[int], k: int, s: Sampling, n_prompt: int,
                generator: Optional[torch.Generator]) -> tuple[list[int], Optional[torch.Tensor]]:
        return lookup(tokens, k, self.ngram), None

    def keep(self, upto: int) -> None:
        pass


class DraftModel:
    """Drafts sampled from a small model with the target's vocabulary, at the row's own settings; q (k, V) is the
    distribution each token was drawn from (None when greedy)."""

    def __init__(self, model: Transformer, vocab_size: int, name: str = "draft"):
        if model.cfg.vocab_size != vocab_size:
            raise LlmctlError(f"the draft {name} has a vocabulary of {model.cfg.vocab_size} tokens but the model has "
                              f"{vocab_size}; give a draft trained with the model's tokenizer")
        self.model, self.name = model, name
        self.window: Optional[_Window] = None

    def reset(self, length: int) -> None:
        self.window = _Window(self.model, length)

    def propose(self, tokens: list[int], k: int, s: Sampling, n_prompt: int,
                generator: Optional[torch.Generator]) -> tuple[list[int], Optional[torch.Tensor]]:
        seq, qs = list(tokens), []
        for _ in range(k):
            logits = processed(self.window.logits(seq)[-1], s, seq, n_prompt)
            if s.temperature == 0:
                seq.append(int(logits.argmax()))
                continue
            q = distribution(logits[None], s.temperature, s.top_k, s.top_p)[0]
            seq.append(int(torch.multinomial(q, 1, generator=generator)))
            qs.append(q)
        return seq[len(tokens):], torch.stack(qs) if qs else None

    def keep(self, upto: int) -> None:
        self.window.keep(upto)


class Speculation:
    """A draft (`PromptLookup` or `DraftModel`) proposing up to `k` tokens per target forward, and what it achieved
    (`stats`, over every row it ran)."""

    def __init__(self, drafter, k: int = 4):
        if k < 1:
            raise LlmctlError(f"generate.draft_tokens must be at least 1 (got {k})")
        self.drafter, self.k, self.stats = drafter, k, Stats()
        self._row: Optional[Row] = None  # the row `engine_step` last drafted for

    @property
    def name(self) -> str:
        return self.drafter.name

    @torch.inference_mode()
    def run(self, engine: Engine, request: Request) -> Iterator[Row]:
        """Generate for one request on `engine`'s model (its tokenizer, end ids and checks), yielding the row after
        each target forward (read `row.new_tokens`, `row.take_text()`, `row.finish_reason`), as `Engine.run` does."""
        if request.format is not None or request.logprobs is not None or request.prompt_logprobs:
            raise LlmctlError("--draft does not go with --json-schema or log-probabilities; drop one of them")
        row = engine.new_row(request)
        s, n_prompt = request.sampling, len(request.prompt)
        length = n_prompt + s.max_new_tokens
        target = _Window(engine.model, length)
        self.drafter.reset(length)
        engine.model.eval()
        while not row.done:
            k = min(self.k, s.max_new_tokens - row.produced - 1)
            drafts, q = self.drafter.propose(row.tokens, k, s, n_prompt, row.generator) if k > 0 else ([], None)
            before = row.produced
            logits = target.logits(row.tokens + drafts)[-(len(drafts) + 1):]
            self.verify(row, logits, drafts, q, engine.end_ids)
            self.stats.drafted += len(drafts)
            self.stats.forwards += 1
            self.stats.produced += row.produced - before + (row.finish_reason == "eos")
            target.keep(len(row.tokens) - 1)
            self.drafter.keep(len(row.tokens) - 1)
            yield row
            row.new_tokens.clear()

    @torch.inference_mode()
    def engine_step(self, engine: Engine) -> Optional[list[Row]]:
        """A server's step (`serve --draft`) when one greedy row decodes alone and nothing waits: the token plain
        decoding picks now, then one forward of it and up to k draft tokens in the row's own slot, keeping the
        drafts that are the model's argmax after the tokens before them. It first runs the engine's pending forward
        (`Engine.flush`) and leaves the row with every token cached and the logits after the last one in the
        engine, a state the next plain step starts from as well, so the next step may be either kind. None when the
        step is not one for a draft (several rows, a waiting one, a sampled or constrained row, one asking for
        log-probabilities): the caller steps the engine as usual."""
        engine.flush()  # (the last step's tokens through the model: the logits after them, each row's true pos)
        row = self._lone(engine)
        if row is None:
            return None
        if row is not self._row:  # a new row: the draft model's window starts over
            self._row = row
            self.drafter.reset(len(row.request.prompt) + row.request.sampling.max_new_tokens)
        engine._pick([row])  # the plain step's token, from the logits after the row's last token
        if not row.done:
            s = row.request.sampling
            k = min(self.k, s.max_new_tokens - row.produced, engine.cache.length - row.pos - 1)
            drafts = self.drafter.propose(row.tokens, k, s, len(row.request.prompt), None)[0] if k > 0 else []
            idx = torch.tensor([row.tokens[-1:] + drafts], device=engine.model.wte.weight.device)
            logits = engine.model(idx, cache=engine.cache, slot=row.slot, start=row.pos)[0]  # (1 + len(drafts), V)
            kept = self._keep_greedy(row, drafts, logits, engine.end_ids)
            engine._logits[row.slot] = logits[kept]
            row.pos += 1 + kept
            self.drafter.keep(len(row.tokens))
            self.stats.drafted += len(drafts)
            self.stats.accepted += kept
            self.stats.forwards += 1
            self.stats.produced += 1 + kept
        if row.done:
            engine.rows[row.slot] = None
        return [row]

    @staticmethod
    def _lone(engine: Engine) -> Optional[Row]:
        busy = [r for r in engine.rows if r is not None]
        if engine.waiting or len(busy) != 1:
            return None
        r = busy[0]
        ok = r.request.sampling.greedy and r.matcher is None and r.request.logprobs is None and not r.cancelled
        return r if ok and r.pos < engine.cache.length else None

    def _keep_greedy(self, row: Row, drafts: list[int], logits: torch.Tensor, end_ids: frozenset) -> int:
        """Push the drafts that equal the argmax of `logits` (V after each token before them) as the plain steps
        would (an end id ends the row); how many were kept."""
        kept = 0
        for d, x in zip(drafts, logits):
            if int(x.argmax()) != d:
                break
            kept += 1
            row._take(d, end_ids)
            if row.done:
                break
        return kept

    def verify(self, row: Row, logits: torch.Tensor, drafts: list[int], q: Optional[torch.Tensor],
               end_ids: frozenset) -> None:
        """Keep the drafts the target accepts and add one token of its own (the rule in the module's docstring):
        `logits` (len(drafts) + 1, V) are the target's after the row's last token and after each draft token."""
        s, n_prompt = row.request.sampling, len(row.request.prompt)
        for i in range(len(drafts) + 1):
            x = processed(logits[i], s, row.tokens, n_prompt)
            d = drafts[i] if i < len(drafts) else None
            if s.temperature == 0:
                t = int(x.argmax())
            else:
                t = self._draw(distribution(x[None], s.temperature, s.top_k, s.top_p)[0], d,
                               q[i] if q is not None and d is not None else None, row.generator)
            kept = d is not None and t == d
            self.stats.accepted += kept
            row._take(t, end_ids)
            if row.done or not kept:
                return

    @staticmethod
    def _draw(p: torch.Tensor, d: Optional[int], q: Optional[torch.Tensor],
              generator: Optional[torch.Generator]) -> int:
        """The token at one position: `d` kept with probability min(1, p(d) / q(d)) (q None: one-hot, q(d) = 1),
        else drawn from norm(max(0, p - q)); with no draft token, drawn from p."""
        if d is None:
            return int(torch.multinomial(p, 1, generator=generator))
        qd = float(q[d]) if q is not None else 1.0
        if float(torch.rand((), generator=generator, device=p.device)) * qd < float(p[d]):
            return d
        rest = (p - q).clamp(min=0) if q is not None else p.clone()
        rest[d] = 0.0  # (max(0, p(d) - q(d)) is 0 here: d was rejected, so p(d) < q(d))
        if float(rest.sum()) <= 0:  # (rounding only: p and q equal)
            rest = p
        return int(torch.multinomial(rest, 1, generator=generator))
