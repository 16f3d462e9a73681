"""Structured pruning: exactness when nothing (or only zero weights) is removed, the importance ranking, shapes for a
parameter budget, and the pruned checkpoint used by infer, eval, finetune and export like any other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import SHAKESPEARE, TINY, invoke, sets
from llmctl import checkpoint as ckpt_io
from llmctl import prune as P
from llmctl.config import ModelConfig
from llmctl.errors import LlmctlError
from llmctl.loading import load_model
from llmctl.model import Transformer

LLAMA = ModelConfig(arch="llama", n_layer=3, n_head=4, n_kv_head=2, n_embd=32, block_size=16, vocab_size=37)
GPT2 = ModelConfig(arch="gpt2", n_layer=3, n_head=4, n_embd=32, block_size=16, vocab_size=37, mlp_hidden=50)
SHAPES = {"llama-gqa": LLAMA, "gpt2": GPT2}


def _model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a misplaced slice shows in the logits
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _tokens(cfg: ModelConfig, n: int = 6) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (n, cfg.block_size), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(SHAPES))
def test_nothing_removed_gives_the_parents_logits_exactly(name):
    cfg = SHAPES[name]
    model, x = _model(cfg), _tokens(cfg)
    small, kept = P.prune(model, P.child_config(cfg, {}), P.importance(model, x))
    assert torch.equal(small(x), model(x))
    assert kept.removed(cfg)["layers"] == [] and small.num_params() == model.num_params()


def _zero_head(m: Transformer, layer: int, head: int) -> None:
    """Every weight of one query head (its q rows and its columns of attn.proj), and, where the head is the only one
    of its group, the group's k and v rows."""
    cfg, hd = m.cfg, m.cfg.head_size
    attn = m.blocks[layer].attn
    with torch.no_grad():
        attn.qkv.weight[head * hd:(head + 1) * hd] = 0
        if attn.qkv.bias is not None:
            attn.qkv.bias[head * hd:(head + 1) * hd] = 0
        attn.proj.weight[:, head * hd:(head + 1) * hd] = 0
        if cfg.kv_heads == cfg.n_head:
            for base in (cfg.n_head * hd, (cfg.n_head + cfg.kv_heads) * hd):
                attn.qkv.weight[base + head * hd: base + (head + 1) * hd] = 0
                if attn.qkv.bias is not None:
                    attn.qkv.bias[base + head * hd: base + (head + 1) * hd] = 0


def _zero_channel(m: Transformer, layer: int, ch: int) -> None:
    mlp = m.blocks[layer].mlp
    with torch.no_grad():
        rows = [ch, mlp.hidden + ch] if mlp.gated else [ch]
        mlp.fc.weight[rows] = 0
        if mlp.fc.bias is not None:
            mlp.fc.bias[rows] = 0
        mlp.proj.weight[:, ch] = 0


def _zero_layer(m: Transformer, layer: int) -> None:
    """A block whose output projections are zero adds nothing to the residual stream: an identity."""
    b = m.blocks[layer]
    with torch.no_grad():
        for lin in (b.attn.proj, b.mlp.proj):
            lin.weight.zero_()
            if lin.bias is not None:
                lin.bias.zero_()


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("unit", ["head", "mlp_channel", "layer"])
def test_removing_a_zero_unit_leaves_the_logits_unchanged_and_it_ranks_last(name, unit):
    cfg = SHAPES[name]
    model, x = _model(cfg), _tokens(cfg)
    # a head or channel count applies to every layer, so the zero unit is planted in every layer
    if unit == "head":
        for layer in range(cfg.n_layer):
            if cfg.n_kv_head:  # grouped-query attention: a whole group (its query heads and its k, v) is the unit
                for h in (2, 3):
                    _zero_head(model, layer, h)
                with torch.no_grad():
                    hd, nh, nkv = cfg.head_size, cfg.n_head, cfg.kv_heads
                    for base in (nh * hd, (nh + nkv) * hd):
                        model.blocks[layer].attn.qkv.weight[base + hd: base + 2 * hd] = 0
            else:
                _zero_head(model, layer, 2)
        changes = {"n_head": 2, "n_kv_head": 1} if cfg.n_kv_head else {}
    elif unit == "mlp_channel":
        for layer in range(cfg.n_layer):
            _zero_channel(model, layer, 7)
        changes = {"mlp_hidden": cfg.hidden - 1}
    else:
        _zero_layer(model, 1)
        changes = {"n_layer": cfg.n_layer - 1}
    imp = P.importance(model, x)
    if unit == "head" and cfg.arch == "gpt2":
        # GPT-2 removes heads only with n_embd, and removing embedding channels is never exact (the norms average
        # over them): here only the ranking is checked
        assert all(int(torch.argmin(imp.heads[i])) == 2 and float(imp.heads[i, 2]) == 0.0 for i in range(cfg.n_layer))
        return
    child = P.child_config(cfg, changes)
    small, kept = P.prune(model, child, imp)
    assert (small(x) - model(x)).abs().max() < 1e-6
    if unit == "head":
        assert all(g.tolist() == [0] for g in kept.groups) and float(imp.groups(cfg)[1, 1]) == 0.0
    elif unit == "mlp_channel":
        assert all(7 not in m.tolist() for m in kept.mlp) and int(torch.argmin(imp.mlp[0])) == 7
    else:
        assert kept.layers == [0, 2] and int(torch.argmin(imp.layers)) == 1


def test_shapes_for_a_parameter_budget():
    parent = ModelConfig(arch="llama", n_layer=4, n_head=4, n_embd=256, block_size=128, vocab_size=4096)
    total = P.non_embedding_params(parent)
    assert total == 4 * (4 * 256 * 256 + 3 * 256 * 704 + 2 * 256) + 256  # blocks and the final norm
    half = total // 2
    depth, width, both = (P.fit_shape(parent, half, axis) for axis in ("depth", "width", "both"))
    assert (depth.n_layer, depth.n_head, depth.hidden) == (2, 4, 704)
    assert (width.n_layer, width.n_embd, width.n_head, width.head_size) == (4, 256, 2, 64)
    assert width.head_dim == 64 and P.non_embedding_params(width) <= half
    assert both.n_layer == 3 and P.non_embedding_params(both) <= half
    for shape in (width, both):  # balanced: within a few percent of the budget
        assert P.non_embedding_params(shape) > 0.97 * half
    with pytest.raises(LlmctlError, match="below what one layer needs"):
        P.fit_shape(parent, 1000, "width")
    with pytest.raises(LlmctlError, match="not smaller"):
        P.fit_shape(parent, total, "depth")


def test_child_configs_that_pruning_cannot_reach_are_refused():
    with pytest.raises(LlmctlError, match="larger than the parent"):
        P.child_config(LLAMA, {"n_embd": 64})
    with pytest.raises(LlmctlError, match="not divisible"):
        P.child_config(LLAMA, {"n_head": 3, "n_kv_head": 2})
    with pytest.raises(LlmctlError, match="whole groups"):
        P.child_config(ModelConfig(arch="llama", n_head=4, n_embd=32), {"n_head": 4, "n_kv_head": 2})
    with pytest.raises(LlmctlError, match="GPT-2 flavour"):
        P.child_config(GPT2, {"n_head": 2})
    # a grouped-query parent asked for fewer heads drops whole groups
    assert P.child_config(LLAMA, {"n_head": 2}).kv_heads == 1


# ------------------------------------------------------------------------------------------------------------------
# The command


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, runner) -> Path:
    """A tiny grouped-query LLaMA trained for 30 steps: the parent of the pruning commands below."""
    out = tmp_path_factory.mktemp("prune") / "llama"
    r = invoke(runner, "pretrain", *sets(*TINY, "model.arch=llama", "model.n_head=4", "model.n_kv_head=2",
                                         "model.n_layer=3"), "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    return out


def _prune(runner, *args):
    r = invoke(runner, "prune", "--data", SHAKESPEARE, "--samples", "32", *args, "--json", "--quiet")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_dry_run_ranks_a_planted_dead_head_last_and_writes_nothing(runner, llama_run, tmp_path):
    dead = tmp_path / "dead"
    loaded = load_model(llama_run, "cpu")
    _zero_head(loaded.model, 2, 1)
    ck = ckpt_io.load(llama_run)
    ckpt_io.save(dead, 0, loaded.model.state_dict(), (ck.path / "config.yaml").read_text(), ck.tokenizer_json())
    r = _prune(runner, "--ckpt", dead, "--set", "model.n_head=2", "--dry-run")
    assert r["ranking"]["heads"]["2"][0][0] == 1 and r["ranking"]["heads"]["2"][0][1] == 0.0
    assert r["pruned"]["n_head"] == 2 and r["pruned"]["n_kv_head"] == 1 and r["pruned"]["head_dim"] == 8
    assert r["parameters_non_embedding"]["after"] < r["parameters_non_embedding"]["before"]
    assert r["out"] is None and not (tmp_path / "never").exists()
    text = invoke(runner, "prune", "--ckpt", dead, "--data", SHAKESPEARE, "--samples", "8", "--set",
                  "model.n_layer=2", "--dry-run")
    assert text.exit_code == 0 and "least important first" in text.stdout and "non-embedding" in text.stdout


def test_the_pruned_checkpoint_works_everywhere(runner, llama_run, tmp_path):
    """Heads (with model.head_dim), MLP channels, an embedding channel and a layer removed at once; the checkpoint
    then loads in infer, eval, finetune and export, and transformers' logits equal ours."""
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "small"
    r = _prune(runner, "--ckpt", llama_run, "--out", out, "--set", "model.n_head=2", "--set", "model.n_embd=28",
               "--set", "model.mlp_hidden=40", "--set", "model.n_layer=2")
    assert r["pruned"] == {"n_layer": 2, "n_head": 2, "n_kv_head": 1, "n_embd": 28, "head_dim": 8, "mlp_hidden": 40}
    meta = json.loads((ckpt_io.read_latest(out) / "meta.json").read_text())
    assert meta["kind"] == "prune" and meta["parent"]["sha256"] == ckpt_io.load(llama_run).meta["files"][
        ckpt_io.WEIGHTS] and len(meta["removed"]["layers"]) == 1
    assert invoke(runner, "infer", "--ckpt", out, "--prompt", "ROMEO:", "-n", "5", "--no-compile").exit_code == 0
    ev = invoke(runner, "eval", "--ckpt", out, "--data", SHAKESPEARE, "--json")
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout)["loss"] == pytest.approx(r["calibration_loss"]["after"], abs=0.5)
    ft = invoke(runner, "finetune", "--from", out, "--out", tmp_path / "ft", *sets(
        f"data.path={SHAKESPEARE}", "train.max_steps=3", "train.eval_interval=0", "train.eval_batches=2"), "--quiet")
    assert ft.exit_code == 0, ft.output
    ex = invoke(runner, "export", "--ckpt", out, "--format", "hf", "--out", tmp_path / "hf")
    assert ex.exit_code == 0, ex.output
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = load_model(out, "cpu").model
    x = torch.randint(0, 60, (2, 32))
    with torch.no_grad():
        assert (theirs(x).logits - ours(x)).abs().max() < 1e-4


def test_gpt2_width_pruning_by_target_params(runner, tiny_run, tmp_path):
    parent = load_model(tiny_run, "cpu").model
    target = parent.num_params(embeddings=False) // 2
    r = _prune(runner, "--ckpt", tiny_run, "--out", tmp_path / "w", "--target-params", str(target))
    assert r["parameters_non_embedding"]["after"] <= target
    assert r["pruned"]["n_embd"] == r["pruned"]["n_head"] * r["parent"]["head_dim"]  # heads with n_embd
    assert invoke(runner, "infer", "--ckpt", tmp_path / "w", "--prompt", "A", "-n", "3").exit_code == 0
