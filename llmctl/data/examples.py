"""Supervised examples: classification rows, instruction pairs and conversations tokenized, split, padded and batched.

torch is imported inside the functions that make tensors, so `llmctl prepare` (which imports this package) starts
without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from ..chat import render_prompt
from ..config import DataConfig
from ..corpus import resolve_source
from ..errors import LlmctlError
from ..fileio import read_jsonl
from ..tokenizer import Tokenizer
from .conversations import FIELDS, ChatExamples, conversation
from .tables import load_table, require_columns


@dataclass
class Examples:
    """Tokenized examples. `targets[i]` is a class id (classification) or per-token labels (instruct, -100 = masked)."""

    ids: list[list[int]]
    targets: list
    truncated: int = 0  # examples cut to the context
    rejected: Optional["Examples"] = None  # preference pairs: `ids`/`targets` are the chosen answers, these the others
    dropped: int = 0  # examples left out (nothing to learn once cut to the context)


def _label_key(v) -> tuple:
    s = str(v)
    return (0, int(s), s) if s.lstrip("-").isdigit() else (1, 0, s)


def classification_examples(
    path: str, data: DataConfig, tokenizer: Tokenizer, block_size: int, text_column: str, label_column: str,
    labels: Optional[list[str]] = None, key: str = "data.path",
) -> tuple[Examples, list[str]]:
    """Read text/label rows; texts become ids + <eos> (the token the classifier reads), cut to the context.

    Texts longer than the context keep their first `block_size - 1` tokens and the <eos>; how many were cut is
    counted. Labels may be names or integers; the label set is `labels` or the sorted values found here.
    """
    ds = load_table(resolve_source(path, data, key), data, key)
    settings = "data" if key == "data.path" else "eval"
    require_columns(ds, {f"{settings}.text_column": text_column, f"{settings}.label_column": label_column}, key)
    texts, raw = ds[text_column], ds[label_column]
    if not texts:
        raise LlmctlError(f"{key}: {path} has no rows")
    for i, (t, y) in enumerate(zip(texts, raw)):
        if t is None or not str(t).strip():
            raise LlmctlError(f"{key}: row {i + 1} of {path} has an empty text in column '{text_column}'; "
                              "remove or fill it")
        if y is None or str(y).strip() == "":
            raise LlmctlError(f"{key}: row {i + 1} of {path} has no label in column '{label_column}'")
    values = [str(y).strip() for y in raw]
    if labels is None:
        labels = sorted(set(values), key=_label_key)
        if len(labels) < 2:
            raise LlmctlError(f"{key}: column '{label_column}' has a single label ({labels[0]}); "
                              "a classifier needs two or more")
    index = {name: i for i, name in enumerate(labels)}
    unseen = sorted({v for v in values if v not in index}, key=_label_key)
    if unseen:
        raise LlmctlError(
            f"{key}: label {unseen[0]!r} in column '{label_column}' is not one the model was trained on "
            f"({', '.join(labels)})"
        )
    ids, truncated = classifier_ids(tokenizer, [str(t) for t in texts], block_size)
    return Examples(ids, [index[v] for v in values], truncated), labels


def classifier_ids(tokenizer: Tokenizer, texts: list[str], block_size: int) -> tuple[list[list[int]], int]:
    """What a classifier reads of each text: its first block_size - 1 tokens and <eos> (the head reads that final
    token's state); and how many texts were cut."""
    ids, truncated = [], 0
    for enc in tokenizer.encode_batch(texts):
        if len(enc) > block_size - 1:
            enc, truncated = enc[: block_size - 1], truncated + 1
        ids.append(enc + [tokenizer.eos_id])
    return ids, truncated


def instruct_pairs(row: dict, ft, where: str) -> list[tuple[str, str, str]]:
    """(instruction, input, response) of one JSONL row in any of the accepted instruction layouts."""
    if ft.instances_field in row and ft.instruction_field in row:  # seed_tasks.jsonl
        return [(row[ft.instruction_field], inst.get(ft.input_field) or "", inst.get(ft.output_field) or "")
                for inst in row[ft.instances_field] or []]
    if ft.instruction_field in row and ft.output_field in row:  # instruction / input / output
        return [(row[ft.instruction_field], row.get(ft.input_field) or "", row[ft.output_field] or "")]
    if ft.prompt_field in row and ft.response_field in row:  # prompt / response
        return [(row[ft.prompt_field], "", row[ft.response_field] or "")]
    raise LlmctlError(
        f"{where}: expected fields {ft.instruction_field}/{ft.output_field} (optionally {ft.input_field} or "
        f"{ft.instances_field}), {ft.prompt_field}/{ft.response_field}, or a conversation in "
        f"{' or '.join(FIELDS)}; found {', '.join(row)}. Set the finetune.*_field names"
    )


def _pair_examples(row: dict, tokenizer: Tokenizer, ft, chat: Optional[ChatExamples],
                   where: str) -> Iterator[tuple[list[int], list[int]]]:
    """Per pair of the row: prompt + response + <eos> in llmctl's prompt template, labels -100 on the prompt; or,
    where the model has a chat template of its own, one user turn (instruction, blank line, input) and its answer."""
    for instruction, input_text, response in instruct_pairs(row, ft, where):
        if not response.strip():
            raise LlmctlError(f"{where}: an empty response; remove the example or fill it")
        if chat is not None and chat.pairs:
            question = instruction + (f"\n\n{input_text}" if input_text.strip() else "")
            yield chat.example("pair", [{"role": "user", "content": question},
                                        {"role": "assistant", "content": response}], where)
            continue
        p = tokenizer.encode(render_prompt(instruction, input_text, ft))
        r = tokenizer.encode(response) + [tokenizer.eos_id]
        yield p + r, [-100] * len(p) + r


def instruct_examples(path: str, data: DataConfig, tokenizer: Tokenizer, block_size: int, ft,
                      key: str = "data.path", chat: Optional[ChatExamples] = None) -> Examples:
    """Instruction pairs and conversations, detected per row: conversations (and, with a model's own template,
    pairs) rendered by `chat` (see `conversations`), other pairs as prompt + response + <eos>. Labels are -100
    outside the responses and answers, so only those are learned. An example longer than the context keeps its
    start; one left with nothing to learn is dropped; both are counted as truncated."""
    source = resolve_source(path, data, key)
    if source.builder != "json":
        raise LlmctlError(f"{key}: instruction tuning reads JSONL (one object per line), not {source.suffix} files")
    ids, targets, truncated = [], [], 0
    for f in source.files:
        for n, row in read_jsonl(f, f"{key}:"):
            where = f"{key}: {f}:{n}"
            found = conversation(row, where)
            if found is not None and chat is None:
                raise LlmctlError(f"{where}: a conversation row needs the model's chat template to render it")
            rows = [chat.example(*found, where)] if found else _pair_examples(row, tokenizer, ft, chat, where)
            for seq, lab in rows:
                if len(seq) > block_size + 1:  # keep the start of the response; drop the tail
                    seq, lab, truncated = seq[: block_size + 1], lab[: block_size + 1], truncated + 1
                    if all(x == -100 for x in lab[1:]):
                        continue  # the prompt alone fills the context: nothing to learn from
                ids.append(seq)
                targets.append(lab)
    if not ids:
        raise LlmctlError(f"{key}: {path} has no usable examples")
    return Examples(ids, targets, truncated)


def holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of n examples into (train, val) indices; val is `fraction` of them (at least 1)."""
    order = np.random.default_rng([seed, 0x5EED]).permutation(n)
    n_val = max(1, int(round(n * fraction))) if fraction > 0 and n > 1 else 0
    return np.sort(order[: n - n_val]), np.sort(order[n - n_val :])


def pad_batch(ex: Examples, rows: list[int] | np.ndarray, pad_id: int, kind: str) -> dict:
    """Right-pad the chosen examples to the longest one.

    classification: input_ids (B, T), lengths (B,), labels (B,)
    instruct:       input_ids (B, T), labels (B, T) shifted by one, -100 on prompt and padding
    preference:     as instruct for 2B rows: the B chosen sequences, then the B rejected ones in the same order
    """
    import torch  # (here, not at the top: `llmctl prepare` starts without torch)
    seqs = [ex.ids[i] for i in rows]
    if kind == "classification":
        T = max(len(s) for s in seqs)
        x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
        for j, s in enumerate(seqs):
            x[j, : len(s)] = torch.tensor(s)
        return {"input_ids": x, "lengths": torch.tensor([len(s) for s in seqs]),
                "labels": torch.tensor([ex.targets[i] for i in rows])}
    labs = [ex.targets[i] for i in rows]
    if kind == "preference":
        seqs, labs = seqs + [ex.rejected.ids[i] for i in rows], labs + [ex.rejected.targets[i] for i in rows]
    T = max(len(s) for s in seqs) - 1
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), T), -100, dtype=torch.long)
    for j, (s, lab) in enumerate(zip(seqs, labs)):
        x[j, : len(s) - 1] = torch.tensor(s[:-1])
        y[j, : len(s) - 1] = torch.tensor(lab[1:])
    return {"input_ids": x, "labels": y}


class ExampleBatches:
    """Padded batches of examples, a pure function of (seed, step, rank).

    Each epoch is a seeded permutation of the training examples. To pad little, every pool of `POOL` global batches
    is sorted by length, cut into global batches, and those are shuffled: a step's examples have similar lengths,
    yet the order stays random. Everything depends on the global batch (not on how it is split over ranks and
    micro-batches), so every example is seen once per epoch, resuming needs only the step, and the data do not
    depend on the world size.
    """

    POOL = 50

    def __init__(self, ex: Examples, indices: np.ndarray, kind: str, pad_id: int, batch_size: int, grad_accum: int,
                 seed: int, rank: int = 0, world_size: int = 1):
        self.ex, self.idx, self.kind, self.pad = ex, np.asarray(indices), kind, pad_id
        self.B, self.accum, self.seed, self.rank, self.world = batch_size, grad_accum, seed, rank, world_size
        other = ex.rejected.ids if ex.rejected is not None else ex.ids  # (a pair is as long as its longer answer)
        self.lengths = np.array([max(len(ex.ids[i]), len(other[i])) for i in self.idx])
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        """Positions into `indices` in the order epoch `epoch` visits them."""
        if epoch not in self._orders:
            rng = np.random.default_rng([self.seed, epoch])
            g = self.accum * self.world * self.B
            perm = rng.permutation(len(self.idx))
            groups = []
            for start in range(0, len(perm), g * self.POOL):
                pool = perm[start : start + g * self.POOL]
                pool = pool[np.argsort(self.lengths[pool], kind="stable")]
                groups += [pool[i : i + g] for i in range(0, len(pool), g)]
            if len(self._orders) > 1:  # a step spans at most two epochs
                self._orders.clear()
            self._orders[epoch] = np.concatenate([groups[j] for j in rng.permutation(len(groups))])
        return self._orders[epoch]

    def rows(self, step: int) -> np.ndarray:
        """Example indices of the whole global batch of `step`: (grad_accum, world_size, batch_size)."""
        n, g = len(self.idx), self.accum * self.world * self.B
        pos = step * g + np.arange(g)
        out = np.empty(g, dtype=np.int64)
        for epoch in np.unique(pos // n):
            sel = pos // n == epoch
            out[sel] = self.idx[self.order(int(epoch))[pos[sel] % n]]
        return out.reshape(self.accum, self.world, self.B)

    def get(self, step: int) -> list[dict]:
        return [pad_batch(self.ex, micro, self.pad, self.kind) for micro in self.rows(step)[:, self.rank]]

    def epochs(self, steps: int) -> float:
        return steps * self.accum * self.world * self.B / max(1, len(self.idx))


def packed_tokens(ex: Examples, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Instruct packing: all examples end to end as one token stream and its labels (for LM-style blocks)."""
    ids = np.fromiter((t for s in ex.ids for t in s), dtype=np.int64)
    labels = np.fromiter((t for s in ex.targets for t in s), dtype=np.int64)
    return ids, labels


def eval_batches(ex: Examples, indices, kind: str, pad_id: int, batch_size: int) -> Iterator[dict]:
    """Every chosen example once, in batches of similar length (less padding); order does not change the metrics."""
    import torch  # (here, not at the top: `llmctl prepare` starts without torch)
    order = sorted(indices, key=lambda i: len(ex.ids[i]))
    for i in range(0, len(order), batch_size):
        rows = order[i : i + batch_size]
        yield {**pad_batch(ex, rows, pad_id, kind), "rows": torch.tensor(rows)}
