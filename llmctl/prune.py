"""Structured pruning: rank a trained Transformer's units by their activations on calibration text and keep the most
important ones, giving a plain smaller Transformer of the same flavour.

Units and their importance (Minitron's activation-based width importance, measured where a unit writes to the
residual stream, so a unit whose output weights are zero scores 0; ShortGPT's block influence for depth):
  - MLP channel: mean |activation| entering mlp.proj times the norm of its column of mlp.proj, per layer.
  - attention head: mean L2 norm of the head's contribution through attn.proj, per layer; a key/value group is the
    sum of its query heads (grouped-query attention keeps or drops whole groups, and the same number of query heads in
    every kept group).
  - embedding channel: mean |value| of the channel in every normalised residual stream input (all norms), summed.
  - layer: block influence, 1 - mean cosine similarity between a block's input and output.
A unit whose weights are zero has importance 0 and ranks last. Heads, MLP channels and layers whose weights are zero
are removed exactly; an embedding channel never is (the norms average over all channels).

`importance` measures, `fit_shape` picks a shape for a parameter budget, `prune` builds the smaller model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .config import ModelConfig
from .errors import LlmctlError
from .model import Transformer

SHAPE_KEYS = ("n_layer", "n_head", "n_kv_head", "n_embd", "mlp_hidden")  # what `llmctl prune --set` may change
AXES = ("width", "depth", "both")


@dataclass
class Importance:
    """Importance scores of every prunable unit of one model (higher = keep)."""

    heads: torch.Tensor  # (n_layer, n_head)
    mlp: torch.Tensor  # (n_layer, hidden)
    embd: torch.Tensor  # (n_embd,)
    layers: torch.Tensor  # (n_layer,)

    def groups(self, cfg: ModelConfig) -> torch.Tensor:
        """(n_layer, n_kv_head): the sum of each key/value group's query heads."""
        return self.heads.view(cfg.n_layer, cfg.kv_heads, -1).sum(-1)


@torch.no_grad()
def importance(model: Transformer, blocks: torch.Tensor, batch_size: int = 16) -> Importance:
    """Run `blocks` (N, T) of token ids through `model` (float32, eval mode) and average each unit's activation."""
    cfg = model.cfg
    L, hd = cfg.n_layer, cfg.head_size
    heads = torch.zeros(L, cfg.n_head, dtype=torch.float64)
    mlp = torch.zeros(L, cfg.hidden, dtype=torch.float64)
    embd = torch.zeros(cfg.n_embd, dtype=torch.float64)
    layers = torch.zeros(L, dtype=torch.float64)
    hooks = []

    def on(module, fn, pre=False):
        hooks.append(module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn))

    for i, block in enumerate(model.blocks):
        def head_hook(mod, args, i=i):
            y = args[0].float()  # (B, T, nh * hd): the heads' outputs, concatenated
            w = mod.weight.float().view(-1, cfg.n_head, hd)  # (C, nh, hd): each head's columns of attn.proj
            out = torch.einsum("btnd,cnd->btnc", y.view(*y.shape[:2], cfg.n_head, hd), w)  # (B, T, nh, C)
            heads[i] += out.norm(dim=-1).mean((0, 1)).double()

        def mlp_hook(mod, args, i=i):
            a = args[0].float().abs().mean((0, 1))  # (B, T, H) -> (H,)
            mlp[i] += (a * mod.weight.float().norm(dim=0)).double()  # times each channel's column norm

        def block_hook(mod, args, out, i=i):
            layers[i] += (1 - F.cosine_similarity(args[0].float(), out.float(), dim=-1)).mean().double()

        on(block.attn.proj, head_hook, pre=True)
        on(block.mlp.proj, mlp_hook, pre=True)
        on(block, block_hook)
    def embd_hook(mod, args, out):
        embd.add_(out.float().abs().mean((0, 1)).double())  # (B, T, C) -> (C,)

    for norm in [m for b in model.blocks for m in (b.norm1, b.norm2)] + [model.norm]:
        on(norm, embd_hook)
    was_training = model.training
    model.eval()
    try:
        batches = blocks.split(batch_size)
        for b in batches:
            model(b)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    n = len(batches)
    return Importance(heads / n, mlp / n, embd / n, layers / n)


def calibration_blocks(tokens: np.ndarray, block_size: int, samples: int) -> torch.Tensor:
    """`samples` blocks (N, block_size) at evenly spaced offsets over the whole token stream (overlapping when the
    stream is short)."""
    if len(tokens) < block_size:
        raise LlmctlError(f"--data: the calibration text has {len(tokens)} tokens, fewer than one block of "
                          f"model.block_size={block_size}; give more text")
    starts = np.linspace(0, len(tokens) - block_size, num=max(1, samples)).astype(np.int64)
    starts = np.unique(starts)
    return torch.from_numpy(np.stack([np.asarray(tokens[s:s + block_size], dtype=np.int64) for s in starts]))


# ------------------------------------------------------------------------------------------------------------------
# Shapes


def non_embedding_params(cfg: ModelConfig) -> int:
    """Parameters of the blocks and the final norm (what pruning removes), counted on the meta device."""
    with torch.device("meta"):
        return Transformer(dataclasses.replace(cfg, vocab_size=cfg.vocab_size or 1)).num_params(embeddings=False)


# open-model switches whose extra weights (per-head or per-width norms) or per-layer patterns pruning does not cut
UNPRUNABLE = ("qk_norm", "post_norms", "sliding_window", "norm_offset")


def check_parent(parent: ModelConfig) -> None:
    """Refuse, in one line, a model with a switch that pruning cannot carry over."""
    if not parent.causal:
        raise LlmctlError("llmctl prune cannot prune an encoder (model.causal=false): its calibration is next-token "
                          "loss and its cutting knows only llmctl's plain GPT-2 and Llama blocks")
    on = [k for k in UNPRUNABLE if getattr(parent, k) not in (None, False)]
    if on:
        raise LlmctlError(f"llmctl prune cannot prune a model with model.{on[0]} (an imported Qwen3, Gemma or "
                          "Mistral): its ranking and cutting know only llmctl's plain GPT-2 and Llama blocks")


def child_config(parent: ModelConfig, changes: dict) -> ModelConfig:
    """The pruned model's config: the parent's with `changes` (SHAPE_KEYS only), its head size kept and its MLP width
    written out (the default would follow n_embd). Raises LlmctlError for what removing units cannot reach."""
    unknown = [k for k in changes if k not in SHAPE_KEYS]
    if unknown:
        raise LlmctlError(f"llmctl prune changes only the shape: model.{unknown[0]} is not one of "
                          + ", ".join(f"model.{k}" for k in SHAPE_KEYS))
    n_head = changes.get("n_head", parent.n_head)
    kv = changes.get("n_kv_head")
    if kv is None and parent.n_kv_head is not None:  # grouped-query parent: fewer heads drop whole groups
        kv = max(1, n_head // (parent.n_head // parent.kv_heads)) if "n_head" in changes else parent.n_kv_head
    n_embd = changes.get("n_embd", parent.n_embd)
    child = dataclasses.replace(parent, n_layer=changes.get("n_layer", parent.n_layer), n_head=n_head,
                                n_kv_head=kv, n_embd=n_embd, mlp_hidden=changes.get("mlp_hidden", parent.hidden),
                                head_dim=None)
    for key, mine, theirs in (("n_layer", child.n_layer, parent.n_layer), ("n_head", child.n_head, parent.n_head),
                              ("n_kv_head", child.kv_heads, parent.kv_heads), ("n_embd", child.n_embd, parent.n_embd),
                              ("mlp_hidden", child.hidden, parent.hidden)):
        if mine < 1:
            raise LlmctlError(f"model.{key}={mine}: a pruned model keeps at least one of each unit")
        if mine > theirs:
            raise LlmctlError(f"model.{key}={mine} is larger than the parent's {theirs}; pruning only removes units "
                              f"(give at most {theirs})")
    if child.n_head % child.kv_heads:
        raise LlmctlError(f"model.n_head={child.n_head} is not divisible by model.n_kv_head={child.kv_heads}; "
                          "every key/value group needs the same number of query heads")
    group, parent_group = child.n_head // child.kv_heads, parent.n_head // parent.kv_heads
    if group > parent_group:
        raise LlmctlError(f"model.n_head / model.n_kv_head = {group} query heads per key/value group, but the parent "
                          f"has {parent_group}; pruning keeps whole groups: set model.n_kv_head to at least "
                          f"{-(-child.n_head // parent_group)}")
    hd = parent.head_size
    if child.n_embd != child.n_head * hd:
        if parent.arch == "gpt2":
            raise LlmctlError(
                f"the GPT-2 flavour has no separate head size (transformers' GPT-2 has no head_dim), so heads are "
                f"pruned only together with n_embd in proportion: model.n_embd = model.n_head x {hd} "
                f"(here {child.n_head * hd}, not {child.n_embd})")
        child.head_dim = hd  # the kept heads keep their size
    if child.n_kv_head == child.n_head:
        child.n_kv_head = None
    return child


def _width(parent: ModelConfig, layers: int, target: int) -> Optional[ModelConfig]:
    """The widest balanced shape of `layers` layers within `target` non-embedding parameters: for each number of
    key/value groups (query heads per group kept), the MLP width that fills the rest; the candidate whose head and
    MLP fractions are closest wins. n_embd stays (llama), or follows the heads (gpt2). None when nothing fits."""
    best, best_gap = None, None
    g = parent.n_head // parent.kv_heads
    for groups in range(parent.kv_heads, 0, -1):
        heads = groups * g
        changes = {"n_layer": layers, "n_head": heads, "n_kv_head": groups if parent.n_kv_head else None}
        if parent.arch == "gpt2":
            changes["n_embd"] = heads * parent.head_size
        changes = {k: v for k, v in changes.items() if v is not None}
        one = non_embedding_params(child_config(parent, {**changes, "mlp_hidden": 1}))
        two = non_embedding_params(child_config(parent, {**changes, "mlp_hidden": 2}))
        hidden = min(parent.hidden, (target - one) // (two - one) + 1)
        if hidden < 1:
            continue
        gap = abs(heads / parent.n_head - hidden / parent.hidden)
        if best_gap is None or gap < best_gap:
            best, best_gap = child_config(parent, {**changes, "mlp_hidden": hidden}), gap
    return best


def _narrowest(parent: ModelConfig, layers: int) -> ModelConfig:
    """One key/value group (its query heads), one MLP channel, `layers` layers."""
    g = parent.n_head // parent.kv_heads
    changes = {"n_layer": layers, "n_head": g, "mlp_hidden": 1}
    if parent.n_kv_head is not None:
        changes["n_kv_head"] = 1
    if parent.arch == "gpt2":
        changes["n_embd"] = g * parent.head_size
    return child_config(parent, changes)


def fit_shape(parent: ModelConfig, target: int, axis: str) -> ModelConfig:
    """The shape for `--target-params` (non-embedding parameters) along `axis`:
    depth drops whole layers (the count nearest the target); width keeps every layer and
    shrinks the heads and MLP in balance; both takes layers in proportion to the square root of the kept fraction
    and widths for the rest."""
    if axis not in AXES:
        raise LlmctlError(f"--by must be one of {', '.join(AXES)} (got {axis!r})")
    total = non_embedding_params(parent)
    if target >= total:
        raise LlmctlError(f"--target-params {target:,} is not smaller than the parent's {total:,} non-embedding "
                          "parameters; give a smaller target")
    floor = non_embedding_params(child_config(parent, {"n_layer": 1}) if axis == "depth"
                                 else _narrowest(parent, parent.n_layer if axis == "width" else 1))
    if target < (floor // 2 if axis == "depth" else floor):  # (depth rounds to the nearest layer count)
        raise LlmctlError(f"--target-params {target:,} is below what one layer needs ({floor:,} non-embedding "
                          f"parameters with --by {axis}); give at least that")
    if axis == "depth":  # the layer count nearest the target (layers come in large steps)
        shapes = [child_config(parent, {"n_layer": n}) for n in range(1, parent.n_layer)]
        return min(shapes, key=lambda c: (abs(non_embedding_params(c) - target), -c.n_layer))
    layers = parent.n_layer if axis == "width" else max(1, round(parent.n_layer * (target / total) ** 0.5))
    for n in range(layers, 0, -1):  # fewer layers when even the narrowest width does not fit
        child = _width(parent, n, target)
        if child is not None:
            return child
    raise LlmctlError(f"--target-params {target:,} is below what one layer needs; give a larger target")


# ------------------------------------------------------------------------------------------------------------------
# Building the smaller model


@dataclass
class Kept:
    """Indices of the units kept, in their original order (per kept layer where units are per layer)."""

    layers: list[int]
    embd: torch.Tensor  # (n_embd',)
    groups: list[torch.Tensor]  # per kept layer: (n_kv',)
    heads: list[torch.Tensor]  # per kept layer: (n_head',) query heads, group by group
    mlp: list[torch.Tensor]  # per kept layer: (hidden',)

    def removed(self, parent: ModelConfig) -> dict:
        """What was taken out, for the checkpoint's meta."""
        out = {"layers": [i for i in range(parent.n_layer) if i not in self.layers],
               "embd_channels": parent.n_embd - len(self.embd)}
        out["heads"] = {str(i): [h for h in range(parent.n_head) if h not in set(heads.tolist())]
                        for i, heads in zip(self.layers, self.heads)}
        out["mlp_channels"] = {str(i): parent.hidden - len(m) for i, m in zip(self.layers, self.mlp)}
        return out


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the k largest scores, in ascending index order (ties: the lower index is kept)."""
    order = torch.argsort(-scores, stable=True)[:k]
    return torch.sort(order).values


def select(parent: ModelConfig, child: ModelConfig, imp: Importance) -> Kept:
    layers = _top(imp.layers, child.n_layer).tolist()
    embd = _top(imp.embd, child.n_embd)
    g, g_child = parent.n_head // parent.kv_heads, child.n_head // child.kv_heads
    groups, heads, mlp = [], [], []
    for i in layers:
        kept_groups = _top(imp.groups(parent)[i], child.kv_heads)
        groups.append(kept_groups)
        heads.append(torch.cat([grp * g + _top(imp.heads[i, grp * g:(grp + 1) * g], g_child)
                                for grp in kept_groups.tolist()]))
        mlp.append(_top(imp.mlp[i], child.hidden))
    return Kept(layers, embd, groups, heads, mlp)


def _rows(units: torch.Tensor, size: int, offset: int = 0) -> torch.Tensor:
    """Row indices of `units` of `size` rows each, starting at `offset`."""
    return (offset + units[:, None] * size + torch.arange(size)[None]).flatten()


def prune_state(state: dict[str, torch.Tensor], parent: ModelConfig, kept: Kept) -> dict[str, torch.Tensor]:
    """The parent's state dict restricted to the kept units, with the kept layers renumbered."""
    hd, nh, nkv, H = parent.head_size, parent.n_head, parent.kv_heads, parent.hidden
    e = kept.embd
    out: dict[str, torch.Tensor] = {}

    def put(name: str, t: torch.Tensor) -> None:
        out[name] = t.contiguous().clone()

    for name in ("wte.weight", "wpe.weight", "lm_head.weight"):
        if name in state:
            put(name, state[name][:, e])  # (V, C) / (block_size, C)
    for name in ("norm.weight", "norm.bias"):
        if name in state:
            put(name, state[name][e])
    for new, old in enumerate(kept.layers):
        src, dst = f"blocks.{old}.", f"blocks.{new}."
        get = lambda n: state.get(src + n)  # noqa: E731
        heads, groups, mlp = kept.heads[new], kept.groups[new], kept.mlp[new]
        qkv_rows = torch.cat([_rows(heads, hd), _rows(groups, hd, nh * hd), _rows(groups, hd, (nh + nkv) * hd)])
        head_cols = _rows(heads, hd)
        fc_rows = torch.cat([mlp, H + mlp]) if parent.arch == "llama" else mlp  # gate and up, or the one fc
        for norm in ("norm1", "norm2"):
            for p in ("weight", "bias"):
                if get(f"{norm}.{p}") is not None:
                    put(f"{dst}{norm}.{p}", get(f"{norm}.{p}")[e])
        put(f"{dst}attn.qkv.weight", get("attn.qkv.weight")[qkv_rows][:, e])
        put(f"{dst}attn.proj.weight", get("attn.proj.weight")[e][:, head_cols])
        put(f"{dst}mlp.fc.weight", get("mlp.fc.weight")[fc_rows][:, e])
        put(f"{dst}mlp.proj.weight", get("mlp.proj.weight")[e][:, mlp])
        for mod, rows in (("attn.qkv", qkv_rows), ("attn.proj", e), ("mlp.fc", fc_rows), ("mlp.proj", e)):
            if get(f"{mod}.bias") is not None:
                put(f"{dst}{mod}.bias", get(f"{mod}.bias")[rows])
    return out


def prune(model: Transformer, child: ModelConfig, imp: Importance) -> tuple[Transformer, Kept]:
    """A new Transformer of shape `child` holding `model`'s most important units (the same weights, sliced)."""
    kept = select(model.cfg, child, imp)
    state = prune_state(model.state_dict(), model.cfg, kept)
    if child.tied:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        small = Transformer(child)
    small.load_state_dict(state, strict=False, assign=True)
    if child.tied:
        small.lm_head.weight = small.wte.weight
    if child.arch == "llama":  # RoPE tables are buffers, not in the state dict
        small.rope_cos, small.rope_sin = model.rope_cos.clone(), model.rope_sin.clone()
    return small, kept


def ranking(cfg: ModelConfig, imp: Importance, show: int = 8) -> dict:
    """The importance ranking, least important first, for --dry-run and --json."""
    def least(scores: torch.Tensor) -> list:
        order = torch.argsort(scores, stable=True)[:show].tolist()
        return [[i, round(float(scores[i]), 6)] for i in order]

    return {
        "layers": least(imp.layers),
        "heads": {str(i): least(imp.heads[i]) for i in range(cfg.n_layer)},
        "kv_groups": {str(i): least(imp.groups(cfg)[i]) for i in range(cfg.n_layer)} if cfg.n_kv_head else None,
        "mlp_channels": {str(i): least(imp.mlp[i]) for i in range(cfg.n_layer)},
        "embd_channels": least(imp.embd),
    }
