"""The optimizer and the schedule: Muon on the blocks' matrices against a reference Newton-Schulz step, the
parameter groups and their learning rates, and warmup-stable-decay."""

from __future__ import annotations

import math

import pytest
import torch

from llmctl.config import ModelConfig, TrainConfig
from llmctl.errors import LlmctlError
from llmctl.model import Transformer
from llmctl.optim import MuonAdamW, build_optimizer, check_continuation, lr_at, newton_schulz_dtype, role_groups

MUON = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.05, muon_momentum=0.9, head_lr=4e-3, embed_lr=2e-3)


def _model(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(arch="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=16,
                                   vocab_size=40, tie_embeddings=False, **kw))


def reference_newton_schulz(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Keller Jordan's quintic iteration, written out: in `dtype` throughout (in bfloat16 each product rounded as
    one fused multiply-add, as on any bfloat16 kernel), the short side first, Frobenius-normalised."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(steps):
        s = x @ x.T
        x = torch.addmm(x, torch.addmm(s, s, s, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def test_groups_by_role_and_their_learning_rates():
    model = _model()
    roles = {r: {id(p) for p in ps} for r, ps in role_groups(model, MUON).items()}
    names = {id(p): n for n, p in model.named_parameters()}
    by_role = {r: sorted(names[i] for i in ids) for r, ids in roles.items()}
    assert by_role["embed"] == ["wte.weight"] and by_role["head"] == ["lm_head.weight"]
    assert by_role["muon"] == sorted(f"blocks.{i}.{m}.weight" for i in range(2)
                                     for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"))
    assert all("norm" in n for n in by_role["no_decay"]) and "decay" not in by_role
    opt = build_optimizer(model, MUON, "cpu")
    assert isinstance(opt, MuonAdamW)
    assert [g["lr_scale"] for g in opt.param_groups] == pytest.approx([50.0, 2.0, 4.0, 1.0])
    # adamw without the per-group settings: AdamW's two groups of old (earlier checkpoints resume)
    plain = build_optimizer(model, TrainConfig(), "cpu")
    assert [len(g["params"]) for g in plain.param_groups] == [10, 5]


def _muon_step(ns_dtype: torch.dtype) -> tuple[Transformer, dict]:
    """One MuonAdamW step (Newton-Schulz in `ns_dtype`) on random gradients; returns the model and, for qkv and
    fc, (weight before, gradient)."""
    model = _model()
    opt = build_optimizer(model, MUON, "cpu")
    opt.ns_dtype = ns_dtype
    torch.manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    qkv, fc = model.blocks[0].attn.qkv.weight, model.blocks[0].mlp.fc.weight
    before = {"qkv": (qkv.detach().clone(), qkv.grad.clone()), "fc": (fc.detach().clone(), fc.grad.clone())}
    for g in opt.param_groups:
        g["lr"] = 1e-3 * g["lr_scale"]  # as the loop sets it
    opt.step()
    return model, before


@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float32])
def test_a_muon_step_orthogonalises_each_fused_matrix_whole_like_the_reference(ns_dtype):
    """qkv ((4 + 2 x 2) x 8 = 64 rows) and gate/up (2 x 128 rows) are one matrix each: Newton-Schulz of the whole
    matrix (in bfloat16 against the bfloat16 reference; in float32, against the same iteration in float64), the
    step scaled by sqrt(rows / columns)."""
    model, before = _muon_step(ns_dtype)
    mu = MUON.muon_momentum
    for name, w in (("qkv", model.blocks[0].attn.qkv.weight), ("fc", model.blocks[0].mlp.fc.weight)):
        w0, grad = before[name]
        buffer = torch.zeros_like(grad).lerp(grad, 1 - mu)  # momentum as an average (torch's form)
        nesterov = grad.lerp(buffer, mu)
        ortho = (reference_newton_schulz(nesterov) if ns_dtype == torch.bfloat16
                 else reference_newton_schulz(nesterov.double(), dtype=torch.float64))
        rows, cols = w.shape
        expected = w0 - 0.05 * math.sqrt(max(1, rows / cols)) * ortho.float()
        rel = (w.detach() - expected).norm() / (expected - w0).norm()
        assert rel < (1e-3 if ns_dtype == torch.bfloat16 else 1e-5), (name, float(rel))


def test_muon_in_bfloat16_is_torchs_muon_bit_for_bit():
    """llmctl's Muon is torch.optim.Muon's update with the iteration's dtype chosen by the hardware: in bfloat16
    (torch's fixed choice) three steps give the same weights and momentum, bit for bit."""
    torch_muon = getattr(torch.optim, "Muon", None)
    if torch_muon is None:
        pytest.skip("this torch has no torch.optim.Muon to compare with")
    ours, theirs = _model(), _model()
    opt = build_optimizer(ours, MUON, "cpu")
    opt.ns_dtype = torch.bfloat16
    mats = [p for n, p in theirs.named_parameters() if p.dim() == 2 and "blocks." in n]
    ref = torch_muon(mats, lr=MUON.muon_lr, momentum=MUON.muon_momentum, nesterov=True,
                     weight_decay=MUON.muon_weight_decay)
    for step in range(3):
        torch.manual_seed(step)
        grads = [torch.randn_like(p) for p in ours.parameters()]
        for a, b, g in zip(ours.parameters(), theirs.parameters(), grads):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        if "blocks." in name and a.dim() == 2:
            assert torch.equal(a, b), name
            assert torch.equal(opt.state[a]["momentum_buffer"], ref.state[b]["momentum_buffer"]), name


def test_newton_schulz_runs_in_bfloat16_only_where_it_is_native(monkeypatch):
    import llmctl.optim as optim

    assert newton_schulz_dtype("cuda") == torch.bfloat16
    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(optim, "cpu_has_fast_bf16", lambda native=native: native)
        assert newton_schulz_dtype("cpu") == dtype
        assert build_optimizer(_model(), MUON, "cpu").ns_dtype == dtype


def test_muon_state_round_trips_through_state_dict():
    model = _model()
    opt = build_optimizer(model, MUON, "cpu")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    again = build_optimizer(model, MUON, "cpu")
    again.load_state_dict(opt.state_dict())
    qkv, wte = model.blocks[0].attn.qkv.weight, model.wte.weight
    assert torch.equal(again.state[qkv]["momentum_buffer"], opt.state[qkv]["momentum_buffer"])
    assert torch.equal(again.state[wte]["exp_avg"], opt.state[wte]["exp_avg"])
    assert again.adamw.state is again.state and again.adamw.param_groups[0] is again.param_groups[1]


def test_muon_needs_no_torch_optim_muon(monkeypatch):
    """The update is llmctl's own, so a torch without torch.optim.Muon (before 2.9) trains with Muon too."""
    monkeypatch.delattr(torch.optim, "Muon", raising=False)
    model, before = _muon_step(torch.float32)
    assert not torch.equal(model.blocks[0].attn.qkv.weight, before["qkv"][0])


def test_wsd_is_stable_then_decays_over_its_last_steps():
    cfg = TrainConfig(lr=1e-2, min_lr=0.0, warmup_steps=10, max_steps=100, lr_schedule="wsd", decay_steps=20)
    assert lr_at(9, cfg) == pytest.approx(1e-2 * 10 / 11)
    assert lr_at(10, cfg) == lr_at(79, cfg) == pytest.approx(1e-2)
    assert lr_at(80, cfg) == pytest.approx(1e-2) and lr_at(90, cfg) == pytest.approx(5e-3)
    assert lr_at(99, cfg) == pytest.approx(5e-4)
    sqrt = TrainConfig(lr=1e-2, min_lr=0.0, warmup_steps=0, max_steps=100, lr_schedule="wsd", decay_shape="sqrt")
    assert sqrt.decay_len == 20 and lr_at(85, sqrt) == pytest.approx(1e-2 * (1 - 0.5))


def test_a_wsd_decay_must_fit_in_the_steps_after_the_checkpoint_it_continues():
    stable = TrainConfig(lr_schedule="wsd", max_steps=1000, decay_steps=200)  # the run the checkpoint came from
    check_continuation(600, TrainConfig(lr_schedule="wsd", max_steps=700, decay_steps=100), stable)  # cools down
    check_continuation(950, stable, stable)  # an interrupted run resumes mid-decay with its own schedule
    with pytest.raises(LlmctlError) as e:
        check_continuation(600, TrainConfig(lr_schedule="wsd", max_steps=650, decay_steps=100), stable)
    assert e.value.message == ("train.decay_steps: the WSD decay of 100 steps is longer than the 50 steps left after "
                               "the checkpoint at step 600; raise train.max_steps to 700 or shorten "
                               "train.decay_steps")
