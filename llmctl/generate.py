"""Token generation with continuous batching: one `Engine` owns the model, its KV cache of slots and the decode step.

Every generation in llmctl runs here: `infer --prompt` (one slot), `infer --input` and `--chat`, and `serve`. A
request waits until a slot is free; it then joins: its prompt is prefilled into the slot (eagerly, together with
the other prompts joining in that step, in forwards padded to the longest: `_prefill_many` says when one goes
alone; rows joining with the same prompt, such as a request's `n` choices, share one prefill, copied slot to slot;
with a prefix cache, the prompt's cached first blocks are copied in and only the rest is computed), and from then
on it decodes together with the other busy slots, one token per step each; a step returns each token as soon as it
is picked and runs it through the model at the start of the next step (`flush`). A row that ends
(end of text, its token budget, a stop string, a cancel) frees its slot at once, so a waiting request never waits
for a long one to finish. Each row has its own position in its own slot and attends only to its own slot, so its
tokens do not depend on which other rows share the batch (exactly so in float32; the dynamic int8 of a CPU
quantizes activations per batch, see docs/serving.md#how-it-works).

The decode step is compiled ahead of time (llmctl.aot), traced for one busy row on a CPU (llmctl.traced), or
eager. It runs the slots up to the last busy one (busy rows stay packed at the start: a joining row takes the
lowest free slot): eagerly exactly those, compiled the smallest compiled slot count that covers them
(`step_sizes`: 1, 4, 16, ... and all slots), since a compiled step's shapes are fixed. Idle slots in it take a
dummy token at position 0 of their own slot, which the next prefill of that slot overwrites.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterator, Optional

import torch

from . import aot
from .errors import LlmctlError
from .events import SILENT, Events
from .logits import processed, sample, top_logprobs
from .model import KVCache, Transformer
from .prefix_cache import PrefixCache
from .rows import MAX_LOGPROBS, Request, Row, bias_problem
from .sampling import Sampling
from .structured import Masks, Matcher
from .tokenizer import StreamDecoder, Tokenizer
from .traced import TracedSteps

# padded tokens per prefill forward of joining rows: a burst of short prompts goes through the weights once, while
# one forward's attention scores, (B, heads, T, restored + T) floats, stay bounded
PREFILL_TOKENS = 1024


def slide_keep(block_size: int) -> int:
    """Tokens kept when generation runs past the context: the newest three quarters of it."""
    return max(1, block_size - block_size // 4)


def step_sizes(slots: int) -> list[int]:
    """Slot counts a decode step is compiled for: 1, 4, 16, ... below `slots`, and `slots` itself; with few rows
    busy a smaller step does less work (a small model's step costs about as much per slot as its weights)."""
    sizes, n = [], 1
    while n < slots:
        sizes.append(n)
        n *= 4
    return sizes + [slots]


class Engine:
    """The model, its compile policy and (while open) a KV cache of `slots` rows with the rows in them.

    `compile`: "auto" uses a compiled decode step when the cache holds one for this model, precision and shape
    (loading it takes ~0.05 s, so it pays off even for a short generation), True also builds a missing one first
    (half a minute to a minute on a CPU, once per model, precision and shape; see llmctl.aot), False always
    decodes eagerly. `events` hears about builds and dropped cache files. `prefix` (None unless set: `serve` sets
    one) keeps prompt prefixes' keys and values across rows (llmctl.prefix_cache). `tokenizer` gives rows their text
    and stop strings, and its end ids (`Tokenizer.end_ids`: end-of-text and the model's other end-of-turn ids) end a
    row; `eos_id` given instead is the one id that does.

    Use `run(requests, slots)` for a job, or `open(slots, length)`, then `submit` and `step` from one thread (the
    server's engine thread), then `close`.
    """

    def __init__(self, model: Transformer, tokenizer: Optional[Tokenizer] = None, compile: bool | str = False,
                 events: Events = SILENT, store: Optional[aot.StepStore] = None,
                 eos_id: Optional[int] = None):
        if compile not in (True, False, "auto"):
            raise ValueError(f"compile must be True, False or 'auto' (got {compile!r})")
        self.model, self.tokenizer = model, tokenizer
        self.eos_id = eos_id if eos_id is not None or tokenizer is None else tokenizer.eos_id
        # every id that ends a row: the tokenizer's end ids (end-of-text and generation_config.json's eos ids)
        self.end_ids = frozenset([eos_id] if eos_id is not None else tokenizer.end_ids if tokenizer else [])
        self.mode = compile
        exports = compile is not False and aot.exportable(model)
        self.store = (store or aot.StepStore(model, events=events)) if exports else None
        # one busy row on a CPU without a compiled step: its step traced (llmctl.traced); float32 weights only (int8's
        # linears included), since bfloat16's attention dtype depends on the key length, which a trace holds fixed
        w = model.wte.weight
        self.traced = TracedSteps(model) if compile is not False and w.device.type == "cpu" and \
            w.dtype == torch.float32 else None
        self.compiled: dict[int, aot.CompiledStep] = {}  # slot count -> compiled step, for the open cache length
        self.cache: Optional[KVCache] = None
        self._pending: list[Row] = []  # rows whose newest token was picked but not yet run through the model
        self.rows: list[Optional[Row]] = []  # by slot
        self.waiting: deque[Row] = deque()  # rows queued by `submit`, oldest first
        self.steps = 0  # decode steps run since open (the server's metrics read it)
        self._logits: Optional[torch.Tensor] = None  # (slots, V): each busy row's next-token logits
        self._masks: Optional[Masks] = None  # the constrained rows' next-token masks, by slot (made when needed)
        self.prefix: Optional[PrefixCache] = None  # prompt prefixes kept across rows (the server sets one)

    # -- shapes ----------------------------------------------------------------------------------------------------
    def cache_length(self, needed: int) -> int:
        """Positions per slot for `needed` tokens: exactly that when eager, else the next power of two (>= 256), so
        few compiled or traced shapes exist (at most three for a 1024-token context and one slot count)."""
        block = self.model.cfg.block_size
        if self.store is None and self.traced is None:
            return min(needed, block)
        return min(block, max(256, 1 << (max(needed, 1) - 1).bit_length()))

    def open(self, slots: int, length: Optional[int] = None, build: bool = False,
             build_all_sizes: bool = False) -> None:
        """Allocate the cache for `slots` rows of `length` positions (default the context) and find the compiled
        steps of that shape: the one for all slots (built when compile is True or `build`), and those for fewer
        slots (`step_sizes`), used when cached and built too with `build_all_sizes` (a server, whose load varies;
        a job's rows are mostly all busy; with it the one-row traced step is made at once too). A cache of the
        same shape is reused."""
        length = min(length or self.model.cfg.block_size, self.model.cfg.block_size)
        p = self.model.wte.weight  # (the output head may be swapped for a quantized layer)
        if self.cache is None or (self.cache.slots, self.cache.length) != (slots, length) \
                or self.cache.layers[0][0].dtype != p.dtype:
            self.cache = KVCache.empty(self.model.cfg, slots, length, p.dtype, p.device)
        self.rows, self.waiting, self.steps, self._pending = [None] * slots, deque(), 0, []
        self.compiled = {}
        self._logits, self._masks = None, None
        build = self.mode is True or build
        self._find_steps(build=build, sizes=[slots])
        self._find_steps(build=build and build_all_sizes, sizes=step_sizes(slots)[:-1])
        if build_all_sizes and self.traced is not None and 1 not in self.compiled:
            self.traced.prepare(self.cache)  # (a server: no request waits for a trace)

    def _find_steps(self, build: bool, sizes: list[int]) -> None:
        if self.store is None:
            return
        for n in sizes:
            step = self.store.get(n, self.cache.length, build_missing=build)
            if step is not None:
                self.compiled[n] = step

    def build_compiled(self) -> None:
        """Build (if missing) and use the compiled step of all the open slots from the next step on (auto mode's
        choice for a long job). No-op when compiling is off."""
        if self.store is not None and self.cache is not None and self.cache.slots not in self.compiled:
            self._find_steps(build=True, sizes=[self.cache.slots])

    def close(self) -> None:
        """Free the cache (rows still in it are dropped)."""
        self.cache, self.compiled, self.rows, self._logits, self._pending = None, {}, [], None, []
        self.waiting = deque()

    # -- rows ------------------------------------------------------------------------------------------------------
    def new_row(self, request: Request) -> Row:
        """A row for `request`. Its settings were checked when built; its prompt must fit (`fit_prompt` does that:
        a prompt that does not is a caller's bug, hence ValueError)."""
        block, s = self.model.cfg.block_size, request.sampling
        if not request.prompt:
            raise ValueError("a prompt must hold at least one token")
        if len(request.prompt) > block:
            raise ValueError(f"prompt of {len(request.prompt)} tokens exceeds the context of {block}")
        if s.stop and self.tokenizer is None:
            raise ValueError("stop strings need the engine's tokenizer")
        why = bias_problem(s, self.model.cfg.vocab_size)
        if why:
            raise LlmctlError(f"logit_bias {why}")
        if request.logprobs is not None and not 0 <= request.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_LOGPROBS} (got {request.logprobs})")
        fmt = request.format
        if fmt is not None and fmt.vocab_size != self.model.cfg.vocab_size:
            raise ValueError(f"the format was compiled for {fmt.vocab_size} tokens, the model has "
                             f"{self.model.cfg.vocab_size}")
        g = None
        if not s.greedy:
            g = torch.Generator(device=self.model.wte.weight.device)
            g.manual_seed(s.seed) if s.seed is not None else g.seed()
        dec = StreamDecoder(self.tokenizer) if self.tokenizer is not None else None
        return Row(request, list(request.prompt), generator=g, decoder=dec,
                   matcher=Matcher(fmt) if fmt is not None else None)

    def submit(self, row: Row) -> None:
        """Queue a row (from `new_row`); it joins at the next step with a free slot. Safe to call from another
        thread: deque appends are atomic, and only the engine's thread pops."""
        self.waiting.append(row)

    @property
    def busy(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def idle(self) -> bool:
        return not self.waiting and self.busy == 0

    # -- the loop --------------------------------------------------------------------------------------------------
    @torch.inference_mode()  # lighter than no_grad: no version counters (~30% of a small model's step)
    def step(self) -> list[Row]:
        """Free cancelled rows, run the decode forward of the tokens picked in the last step (`flush`), let waiting
        rows join (prefill), and pick every busy row's next token. Returns the rows that got tokens or finished in
        this step (each once; read `row.new_tokens`, `row.take_text()`, `row.finish_reason`, then clear
        `row.new_tokens`). A token is returned as soon as it is picked and run through the model at the next step,
        so a joining row's first token does not wait for a decode forward."""
        touched: list[Row] = []
        for s, row in enumerate(self.rows):
            if row is not None and row.cancelled:
                row._finish("cancelled")
                self.rows[s] = None
                touched.append(row)
        self.flush()
        self._join(touched)
        busy = [r for r in self.rows if r is not None]
        if not busy:
            return touched
        self._pick(busy)
        for row in busy:
            touched.append(row)
            if row.done:
                self.rows[row.slot] = None
            elif row.pos == self.cache.length:  # the slot is full: keep the newest tokens and prefill them again
                self._prefill(row, slide_keep(self.model.cfg.block_size))
            else:
                self._pending.append(row)
        return touched

    def flush(self) -> None:
        """Run the decode forward of the tokens picked in the last step, for the rows still in their slots, so every
        busy row has the logits after its newest token."""
        going = [r for r in self._pending if r.slot is not None and self.rows[r.slot] is r]
        self._pending = []
        if going:
            self._decode(going)

    def _join(self, touched: list[Row]) -> None:
        """Give waiting rows the free slots and prefill them: rows with the same prompt share one prefill (a
        request's n choices: computed once, copied slot to slot), the others are prefilled together
        (`_prefill_many`). A scoring-only row ends here."""
        fresh: list[Row] = []
        copies: list[tuple[Row, Row]] = []
        first: dict[tuple, Row] = {}  # this step's prefills by what they compute
        while self.waiting and None in self.rows:
            row = self.waiting.popleft()
            if row.cancelled:
                row._finish("cancelled")
                touched.append(row)
                continue
            row.slot = self.rows.index(None)  # the lowest free slot: busy slots stay packed at the start
            self.rows[row.slot] = row
            key = (tuple(row.tokens), row.request.logprobs if row.request.prompt_logprobs else None)
            if key in first:
                copies.append((first[key], row))
            else:
                first[key] = row
                fresh.append(row)
        self._prefill_many(fresh)
        for src, row in copies:
            self._copy_prefill(src, row)
        for row in fresh + [row for _, row in copies]:
            if not row.request.generate:  # scoring only: the prompt's log-probabilities are all it asked for
                row._finish("length")
                self.rows[row.slot] = None
                touched.append(row)

    def _prefill_many(self, rows: list[Row]) -> None:
        """Prefill joining rows, several prompts per forward (padded to the longest: one pass over the weights
        instead of one per row), at most PREFILL_TOKENS padded tokens each. A row asking for its prompt's
        log-probabilities is prefilled alone. With a prefix cache each row starts from its cached blocks, and a
        row that shares more of its prompt with a row waiting to be computed than the cache holds waits for that
        row's blocks (the batch so far is computed first): a shared system prompt is computed once."""
        group: list[tuple[Row, int]] = []  # (row, positions restored from the prefix cache)
        for row in rows:
            if row.request.prompt_logprobs or len(row.tokens) > self.cache.length:
                self._prefill(row)
                continue
            ahead = self.prefix.cached(row.tokens) if self.prefix else 0
            if group and (self._would_share(group, row, ahead) or not self._fits(group, row, ahead)):
                self._prefill_group(group)
                group = []
            group.append((row, self.prefix.restore(self.cache, row.slot, row.tokens) if self.prefix else 0))
        if group:
            self._prefill_group(group)

    def _would_share(self, group: list[tuple[Row, int]], row: Row, start: int) -> bool:
        """Whether `row` would restore more than `start` positions once the rows of `group` are stored."""
        if self.prefix is None:
            return False
        block = self.prefix.block
        for other, _ in group:
            same = next((i for i, (a, b) in enumerate(zip(row.tokens, other.tokens)) if a != b),
                        min(len(row.tokens), len(other.tokens)))
            if min(same, len(row.tokens) - 1) // block * block > start:
                return True
        return False

    def _fits(self, group: list[tuple[Row, int]], row: Row, start: int) -> bool:
        """Whether `row` can join `group`'s forward: the padded batch stays within PREFILL_TOKENS and every row's
        padded positions within the cache."""
        T = max([len(r.tokens) - s for r, s in group] + [len(row.tokens) - start])
        starts = [s for _, s in group] + [start]
        return len(starts) * T <= PREFILL_TOKENS and max(starts) + T <= self.cache.length

    def _prefill_group(self, group: list[tuple[Row, int]]) -> None:
        """One forward over the rows of `group`, each continuing its slot from its restored positions; only each
        row's last position goes through the output head."""
        device = self.model.wte.weight.device
        todo = [row.tokens[start:] for row, start in group]
        T = max(map(len, todo))
        idx = torch.tensor([t + [0] * (T - len(t)) for t in todo], device=device)  # (B, T), pads at the end
        last = torch.zeros(len(todo), T, dtype=torch.bool, device=device)
        last[torch.arange(len(todo)), torch.tensor([len(t) - 1 for t in todo])] = True
        if len(group) == 1:  # (the single-slot path: no gather of the slot's keys)
            row, start = group[0]
            logits = self.model(idx, cache=self.cache, slot=row.slot, start=start, only=last)  # (1, V)
        else:
            slots = torch.tensor([row.slot for row, _ in group], device=device)
            starts = torch.tensor([start for _, start in group], device=device)
            logits = self.model(idx, cache=self.cache, slot=slots, pos=starts, kv_len=int(starts.max()) + T,
                                only=last)  # (B, V)
        self._keep_logits(logits)
        for b, (row, _) in enumerate(group):
            if self.prefix is not None:
                self.prefix.store(self.cache, row.slot, row.tokens)
            self._logits[row.slot] = logits[b]
            row.pos = len(row.tokens)

    def _keep_logits(self, logits: torch.Tensor) -> None:
        if self._logits is None:  # (slots, V): each busy row's next-token logits
            self._logits = torch.zeros(self.cache.slots, logits.shape[-1], dtype=logits.dtype, device=logits.device)

    def _prefill(self, row: Row, keep: Optional[int] = None) -> None:
        """Prefill the row's newest tokens (all of them, or the `keep` newest after a slide) into its slot. With a
        prefix cache, a prompt that fits the slot whole (from position 0) starts from its cached blocks, unless it
        asked for its prompt's log-probabilities (which need every position), and leaves its blocks there."""
        # (after a slide, at most length - 1 tokens: the next decode needs a free position)
        window = row.tokens[-min(keep, self.cache.length - 1):] if keep else row.tokens[-self.cache.length:]
        idx = torch.tensor([window], device=self.model.wte.weight.device)
        prefix = self.prefix if keep is None and len(window) == len(row.tokens) else None
        start = prefix.restore(self.cache, row.slot, window) if prefix and not row.request.prompt_logprobs else 0
        every = self.model(idx[:, start:], cache=self.cache, slot=row.slot, start=start)  # (1, T - start, V)
        if prefix is not None:
            prefix.store(self.cache, row.slot, window)
        logits = every[:, -1]
        if keep is None and row.request.prompt_logprobs and len(window) > 1:
            k = row.request.logprobs or 0
            row.prompt_logprobs = top_logprobs(every[0, :-1], idx[0, 1:], k)
        self._keep_logits(logits)
        self._logits[row.slot] = logits[0]
        row.pos = len(window)

    def _copy_prefill(self, src: Row, row: Row) -> None:
        """Give `row` the prefill `src` ran this step on the same tokens: its cache positions, logits and prompt
        log-probabilities (one prefill shared by a prompt's n choices)."""
        for k, v in self.cache.layers:
            k[row.slot, :, : src.pos] = k[src.slot, :, : src.pos]
            v[row.slot, :, : src.pos] = v[src.slot, :, : src.pos]
        self._logits[row.slot] = self._logits[src.slot]
        row.prompt_logprobs, row.pos = list(src.prompt_logprobs), src.pos

    def _pick(self, busy: list[Row]) -> None:
        """Sample each busy row's next token from its logits (a constrained row's masked by its format, all such
        rows in one call); an end id ends a row without being added, and so does a complete JSON."""
        logits, dead, raw = self._masked(busy)
        picks: dict[int, int] = {}
        greedy = [r for r in busy if r.request.sampling.greedy and r.slot not in dead]
        if greedy:
            top = logits[: max(r.slot for r in greedy) + 1].argmax(-1).tolist()  # one call for every row
            picks.update({r.slot: top[r.slot] for r in greedy})
        for r in busy:
            if r.slot in dead:  # the format allows no token of this tokenizer: the row cannot go on
                continue
            q = r.request.sampling
            mine = raw.get(r.slot)
            if mine is None:
                mine = processed(self._logits[r.slot], q, r.tokens, len(r.request.prompt))
            if r.slot not in picks:
                pick_from = mine if r.matcher is None else logits[r.slot]
                picks[r.slot] = int(sample(pick_from[None], q.temperature, q.top_k, q.top_p, r.generator))
            if r.request.logprobs is not None:
                chosen = torch.tensor([picks[r.slot]], device=mine.device)
                r.logprobs += top_logprobs(mine[None], chosen, r.request.logprobs)
        pushed = []
        for r in busy:
            t = picks.get(r.slot)
            if t is None or (r.matcher is not None and not r.matcher.accept(t)):
                r._finish("length")  # (a rejected token cannot happen: the mask allowed it)
            else:
                r._take(t, self.end_ids)
                if not r.done and r.matcher is not None:
                    pushed.append(r)
        if pushed:
            for r, done in zip(pushed, self._masks.complete([(r.slot, r.matcher) for r in pushed])):
                if done:
                    r._finish("eos")

    def _masked(self, busy: list[Row]) -> tuple[torch.Tensor, set[int], dict[int, torch.Tensor]]:
        """The logits the busy rows pick from (by slot): the engine's own when no row is constrained, else a float32
        copy with each constrained row's processed logits masked by its format (`structured.Masks`, one call);
        the slots whose format allows no token; the constrained rows' processed logits before the mask."""
        bound = [r for r in busy if r.matcher is not None]
        if not bound:
            return self._logits, set(), {}
        if self._masks is None:
            self._masks = Masks(self.cache.slots, self._logits.shape[-1])
        logits = self._logits[: max(r.slot for r in busy) + 1].to(torch.float32, copy=True)
        raw = {r.slot: processed(self._logits[r.slot], r.request.sampling, r.tokens, len(r.request.prompt))
               for r in bound}
        for r in bound:
            if r.request.sampling.processed:
                logits[r.slot] = raw[r.slot]
        alive = self._masks.mask(logits, [(r.slot, r.matcher) for r in bound])
        return logits, {r.slot for r, ok in zip(bound, alive) if not ok}, raw

    def _decode(self, going: list[Row]) -> None:
        """One token for every slot up to the last busy one (compiled: up to the smallest compiled slot count that
        covers them), at each row's position. Slots not going on (idle, or just prefilled again) take a dummy token
        at a position their next write overwrites: 0 for an idle slot, `pos` for a row that was just prefilled; their
        logits are not kept."""
        last = max(r.slot for r in self.rows[: self.cache.slots] if r is not None) + 1
        S = min((n for n in self.compiled if n >= last), default=last)  # a compiled step covering the busy slots
        step = self.compiled.get(S)
        device = self.model.wte.weight.device
        toks, pos = [0] * S, [0] * S
        for r in self.rows[:S]:
            if r is not None:
                pos[r.slot] = r.pos
        for r in going:
            toks[r.slot] = r.tokens[-1]
        tok_t = torch.tensor(toks, device=device)[:, None]  # (S, 1)
        pos_t = torch.tensor(pos, device=device)  # (S,)
        if step is not None:  # (the first S slots of each cache tensor: a contiguous view)
            logits = step(tok_t, pos_t, [t[:S] for t in self.cache.flat()])
        else:
            logits = self.traced(tok_t, pos_t, self.cache) if self.traced is not None and S == 1 else None
            if logits is None:
                logits = self.model(tok_t, cache=self.cache, pos=pos_t, kv_len=max(pos) + 1)[:, -1]  # (S, V)
        if len(going) == S:
            self._logits[:S] = logits
        else:
            slots = torch.tensor([r.slot for r in going], device=device)
            self._logits[slots] = logits[slots]
        for r in going:
            r.pos += 1
        self.steps += 1

    # -- jobs ------------------------------------------------------------------------------------------------------
    def run(self, requests: list[Request], slots: Optional[int] = None,
            on_step: Optional[Callable[["Engine"], None]] = None) -> Iterator[Row]:
        """Generate for every request, `slots` at a time (default all), rows joining as others finish. Yields each
        row that got tokens (`row.new_tokens`, this step's) or finished in a step, as the steps run; a row's text
        and finish reason stay on it. `on_step` runs after each step (a long job may call `build_compiled`)."""
        if not requests:
            return
        rows = [self.new_row(r) for r in requests]  # every request is checked before any work
        slots = min(slots or len(rows), len(rows))
        needed = max(len(r.prompt) + r.sampling.max_new_tokens for r in requests)
        self.model.eval()
        try:
            self.open(slots, self.cache_length(needed))
            for row in rows:
                self.submit(row)
            while not self.idle:
                for row in self.step():
                    yield row
                    row.new_tokens.clear()
                if on_step is not None:
                    on_step(self)
        finally:
            self.close()

    def complete(self, request: Request) -> Iterator[int]:
        """Yield the new token ids of one request (a job of one row)."""
        for row in self.run([request]):
            yield from row.new_tokens


def generate(model: Transformer, prompt: list[int], max_new_tokens: int, eos_id: Optional[int] = None,
             engine: Optional[Engine] = None, **sampling) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids for one prompt, sampled by `Sampling(max_new_tokens, **sampling)`:
    on `engine` (which has its own end-of-text id), or on an eager engine made here that stops at `eos_id`."""
    engine = engine or Engine(model, eos_id=eos_id)
    return engine.complete(Request(prompt, Sampling(max_new_tokens, **sampling)))
