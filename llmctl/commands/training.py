"""pretrain, finetune and prepare: build and check everything, then run the one training loop."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import checkpoint as ckpt_io, estimate, tblog
from ..config import Config, _deep_merge, from_dict, load_config, parse_overrides, read_yaml
from ..data import LMBatches, eval_blocks, prepare as prepare_tokens
from ..errors import LlmctlError
from ..evaluate import lm_metrics
from ..model import Transformer
from ..optim import build_optimizer
from ..tokenizer import Tokenizer
from ..train import Hooks, LoopState, NullReporter, Reporter, fit, rng_state, seed_everything, set_rng_state
from .common import Log, _nolog, load_weights, resolve_amp, resolve_device, unwrap, vocab_for


# ------------------------------------------------------------------------------------------------------------------
# Run directories


def prepare_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber an existing run unless asked; --overwrite only deletes what looks like a run."""
    if not out.exists():
        return
    if not out.is_dir():
        raise LlmctlError(f"--out {out} is a file; give a directory for the run")
    if not any(out.iterdir()):
        return
    if resume:
        return
    if overwrite:
        looks_like_run = (out / "status.json").exists() or (out / "config.yaml").exists() or (out / "latest").exists()
        if not looks_like_run:
            raise LlmctlError(f"--overwrite refuses to delete {out}: it does not look like an llmctl run directory")
        shutil.rmtree(out)
        return
    raise LlmctlError(f"--out {out} already holds a run; pass --resume to continue it or --overwrite to replace it")


def latest_good(run_dir: Path, log: Log) -> Optional[ckpt_io.Checkpoint]:
    """The newest checkpoint of a run that passes verification (a damaged newer one is skipped, with a note)."""
    cands = ckpt_io.list_checkpoints(run_dir)
    latest = ckpt_io.read_latest(run_dir)
    if latest is not None and latest in cands:  # prefer what `latest` names, then older ones
        cands = [c for c in cands if c.name <= latest.name]
    for c in reversed(cands):
        try:
            return ckpt_io.load(c)
        except LlmctlError as e:
            log(f"[yellow]skipping {c.name}: {e}")
    return None


class MetricsFile:
    """metrics.jsonl: one JSON object per logged step and per evaluation, flushed as written."""

    def __init__(self, path: Path, resume_step: Optional[int] = None):
        self.path = path
        if resume_step is not None and path.exists():  # drop rows after the step we resume from
            rows = [ln for ln in path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in rows if _row_step(ln) <= resume_step]
            ckpt_io.write_atomic(path, "".join(r + "\n" for r in kept))
        self.f = open(path, "a", encoding="utf-8")

    def __call__(self, row: dict) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _row_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0


# ------------------------------------------------------------------------------------------------------------------
# Training (pretrain and finetune share this)


@dataclass
class TrainPlan:
    """Everything a training run needs, built and checked before the run directory is touched."""

    cfg: Config
    tokenizer: Tokenizer
    train_tokens: object
    val_tokens: object
    model: Transformer
    device: torch.device
    amp: Optional[torch.dtype]
    init_weights: Optional[dict] = None
    resume_from: Optional[ckpt_io.Checkpoint] = None
    kind: str = "pretrain"
    base: Optional[str] = None


def describe(plan: TrainPlan) -> dict:
    cfg, m = plan.cfg, plan.model
    t = cfg.train
    return {
        "parameters": m.num_params(),
        "parameters_non_embedding": m.num_params(embeddings=False),
        "tokens_per_step": t.batch_size * t.grad_accum * cfg.model.block_size,
        "train_tokens": int(len(plan.train_tokens)),
        "val_tokens": int(len(plan.val_tokens)),
        "vocab_size": cfg.model.vocab_size,
        "device": str(plan.device),
        "precision": "float32" if plan.amp is None else f"{str(plan.amp).replace('torch.', '')} autocast",
        "epochs": round(t.max_steps * t.batch_size * t.grad_accum * cfg.model.block_size / max(1, len(plan.train_tokens)), 2),
    }


def run_training(plan: TrainPlan, out: Path, reporter: Reporter, log: Log, resume_state: Optional[dict] = None,
                 on_step: Optional[Callable[[LoopState], None]] = None) -> dict:
    """Create/continue the run directory, train with `fit`, keep status.json honest. Returns a summary."""
    cfg, model = plan.cfg, plan.model
    t = cfg.train
    out.mkdir(parents=True, exist_ok=True)
    config_yaml = cfg.to_yaml()
    ckpt_io.write_atomic(out / "config.yaml", config_yaml)
    plan.tokenizer.save(out / "tokenizer.json")
    state = LoopState()
    optimizer = build_optimizer(model, t, plan.device.type)
    scaler = torch.amp.GradScaler(plan.device.type) if plan.amp == torch.float16 else None
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        if scaler is not None and resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        state = LoopState(**resume_state["loop"])
        set_rng_state(resume_state["rng"])
        if state.step >= t.max_steps:
            raise LlmctlError(f"the run is already at step {state.step} of train.max_steps={t.max_steps}; raise train.max_steps to train further")
    metrics = tblog.tee(MetricsFile(out / "metrics.jsonl", resume_step=state.step if resume_state is not None else None), out, t.log)
    tokens_per_step = t.batch_size * t.grad_accum * cfg.model.block_size
    batches = LMBatches(plan.train_tokens, cfg.model.block_size, t.batch_size, t.grad_accum, t.seed)

    def evaluate(step: int) -> dict:
        if len(plan.val_tokens) < 2:
            return {}
        r = lm_metrics(model, eval_blocks(plan.val_tokens, cfg.model.block_size, cfg.eval.batch_size, t.eval_batches),
                       plan.device, plan.amp)
        return {"val_loss": r["loss"]}

    def save(st: LoopState, reason: str) -> Path:
        train_state = {
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler else {},
            "loop": {**st.__dict__},
            "rng": rng_state(),
        }
        meta = {"kind": plan.kind, "tokens": st.tokens, "metrics": st.last_eval, "reason": reason}
        if plan.base:
            meta["base"] = plan.base
        path = ckpt_io.save(out, st.step, model.state_dict(), config_yaml, plan.tokenizer.to_str(), train_state, meta)
        best = (ckpt_io.step_name(st.best_step),) if st.best_step else ()
        ckpt_io.prune(out, t.keep_last, protect=tuple(p for p in best if (out / p).exists()))
        log(f"saved {path}")
        return path

    ckpt_io.write_status(out, "running", kind=plan.kind, step=state.step, max_steps=t.max_steps)
    t0 = time.time()
    try:
        state = fit(model, optimizer, t, Hooks(batches=batches.get, evaluate=evaluate, save=save, log_metrics=metrics, on_step=on_step),
                    state, device=plan.device, amp_dtype=plan.amp, scaler=scaler, tokens_per_step=tokens_per_step,
                    reporter=reporter)
    except LlmctlError as e:
        reporter.stop()
        status = {130: "interrupted", 143: "interrupted", 3: "diverged"}.get(e.status, "failed")
        ckpt_io.write_status(out, status, error=e.message, exit_status=e.status, step=_last_step(out))
        raise
    except BaseException as e:
        reporter.stop()
        ckpt_io.write_status(out, "interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                             error=f"{type(e).__name__}: {e}", step=_last_step(out))
        raise
    finally:
        metrics.close()
    wall = time.time() - t0
    summary = {
        "run": str(out),
        "checkpoint": str(ckpt_io.read_latest(out)),
        "steps": state.step,
        "tokens": state.tokens,
        "val_loss": state.last_eval.get("val_loss"),
        "best_val_loss": state.best,
        "train_seconds": round(state.elapsed, 2),
        "wall_seconds": round(wall, 2),
        "tokens_per_sec": round(state.tokens / state.elapsed, 1) if state.elapsed else None,
    }
    ckpt_io.write_status(out, "finished", **{k: v for k, v in summary.items() if k not in ("run",)})
    return summary


def _last_step(out: Path) -> Optional[int]:
    latest = ckpt_io.read_latest(out)
    return int(latest.name.split("-")[1]) if latest else None


def _build_plan(cfg: Config, tokenizer: Optional[Tokenizer], log: Log, kind: str) -> TrainPlan:
    device = resolve_device(cfg.train.device)
    amp = resolve_amp(cfg.train.dtype, device)
    tblog.check(cfg.train.log)
    td = prepare_tokens(cfg.data, cfg.tokenizer, tokenizer=tokenizer, log=log)
    cfg.model.vocab_size = vocab_for(cfg, td.tokenizer)
    if len(td.train) < cfg.model.block_size + 2:
        raise LlmctlError(
            f"data.path: the training split has {len(td.train)} tokens, fewer than one block of "
            f"model.block_size={cfg.model.block_size}; use more text or a smaller block_size"
        )
    seed_everything(cfg.train.seed)
    with torch.device(device):
        model = Transformer(cfg.model)
    if cfg.train.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    return TrainPlan(cfg, td.tokenizer, td.train, td.val, model, device, amp, kind=kind)


def load_train_config(config: Optional[Path], overrides: list[str], base: Optional[dict] = None) -> Config:
    return load_config(config, overrides, base=base)


def pretrain(
    config: Optional[Path],
    overrides: list[str],
    out: Path,
    resume: bool = False,
    overwrite: bool = False,
    resume_from: Optional[Path] = None,
    reporter: Reporter = NullReporter(),
    log: Log = _nolog,
    on_plan: Optional[Callable[[TrainPlan], None]] = None,
    on_step: Optional[Callable[[LoopState], None]] = None,
    dry_run: bool = False,
) -> dict:
    """`llmctl pretrain`: train a model from scratch (or continue one) on `data.path`.

    With `dry_run`, build and check everything, then return `estimate.dry_run`'s report instead of training
    (no run directory is created, touched or deleted)."""
    if resume and overwrite:
        raise LlmctlError("--resume and --overwrite contradict each other; pick one")
    out = Path(out)
    source_ckpt = None
    if resume_from is not None:
        source_ckpt = ckpt_io.load(resume_from)
    elif resume:
        if not out.exists() or not any(out.iterdir()):
            raise LlmctlError(f"--resume: {out} holds no run to continue; drop --resume to start a new run")
        source_ckpt = latest_good(out, log)
        if source_ckpt is None:
            raise LlmctlError(f"--resume: {out} has no complete checkpoint to continue from; use --overwrite to start again")
    if not dry_run:
        prepare_out_dir(out, resume or resume_from is not None, overwrite)
    base = source_ckpt.config if source_ckpt is not None and config is None else None
    cfg = load_train_config(config, overrides, base=base)
    tokenizer = Tokenizer.from_str(source_ckpt.tokenizer_json()) if source_ckpt else None
    if source_ckpt is not None:
        _check_model_matches(cfg, from_dict(source_ckpt.config), source_ckpt.path, explicit=None)
    plan = _build_plan(cfg, tokenizer, log, "pretrain")
    resume_state = None
    if source_ckpt is not None:
        load_weights(unwrap(plan.model), source_ckpt.weights(), str(source_ckpt.path))
        resume_state = source_ckpt.train_state()
        log(f"resuming from {source_ckpt.path} (step {source_ckpt.meta.get('step')})")
    if on_plan:
        on_plan(plan)
    if dry_run:
        return estimate.dry_run(plan, start_step=resume_state["loop"]["step"] if resume_state else 0, out=out)
    return run_training(plan, out, reporter, log, resume_state, on_step)


def _check_model_matches(cfg: Config, ck_cfg: Config, where: Path, explicit: Optional[dict]) -> None:
    """Model shape comes from the checkpoint; a differing key is an error that names it (dropout may change)."""
    bad = []
    for k, v in ck_cfg.model.__dict__.items():
        if k in ("dropout",):
            continue
        mine = getattr(cfg.model, k)
        if explicit is not None and k not in explicit:
            continue
        if k == "vocab_size" and mine is None:
            continue
        if mine != v:
            bad.append(f"model.{k}={mine!r} but the checkpoint has {v!r}")
    if bad:
        raise LlmctlError(f"config disagrees with checkpoint {where}: " + "; ".join(bad) + " (remove these keys from the config)")


def finetune(
    config: Optional[Path],
    overrides: list[str],
    from_: Path,
    out: Path,
    resume: bool = False,
    overwrite: bool = False,
    reporter: Reporter = NullReporter(),
    log: Log = _nolog,
    on_plan: Optional[Callable[[TrainPlan], None]] = None,
    on_step: Optional[Callable[[LoopState], None]] = None,
    dry_run: bool = False,
) -> dict:
    """`llmctl finetune`: continue training a checkpoint's model on new data (same loop, same format).

    The model shape and tokenizer come from the checkpoint; model keys in the config must agree with it.
    """
    if resume and overwrite:
        raise LlmctlError("--resume and --overwrite contradict each other; pick one")
    out = Path(out)
    base_ckpt = ckpt_io.load(from_)
    base_cfg = from_dict(base_ckpt.config)
    user_raw = _deep_merge(read_yaml(config) if config else {}, parse_overrides(overrides))
    user_model = user_raw.get("model", {}) if isinstance(user_raw.get("model", {}), dict) else {}
    cfg = from_dict(_deep_merge({"model": base_cfg.model.__dict__}, user_raw))
    _check_model_matches(cfg, base_cfg, base_ckpt.path, explicit=user_model)
    resume_ckpt = None
    if resume:
        resume_ckpt = latest_good(out, log) if out.exists() else None
        if resume_ckpt is None:
            raise LlmctlError(f"--resume: {out} has no complete checkpoint to continue from; drop --resume or use --overwrite")
    if not dry_run:
        prepare_out_dir(out, resume, overwrite)
    tokenizer = Tokenizer.from_str(base_ckpt.tokenizer_json())
    plan = _build_plan(cfg, tokenizer, log, "finetune")
    plan.base = str(base_ckpt.path)
    src = resume_ckpt or base_ckpt
    load_weights(unwrap(plan.model), src.weights(), str(src.path))
    resume_state = resume_ckpt.train_state() if resume_ckpt else None
    if on_plan:
        on_plan(plan)
    if dry_run:
        return estimate.dry_run(plan, start_step=resume_state["loop"]["step"] if resume_state else 0, out=out)
    return run_training(plan, out, reporter, log, resume_state, on_step)


# ------------------------------------------------------------------------------------------------------------------
# prepare, infer, eval


def prepare(config: Optional[Path], overrides: list[str], log: Log = _nolog) -> dict:
    """`llmctl prepare`: tokenize once into the cache; report what is there."""
    cfg = load_config(config, overrides)
    td = prepare_tokens(cfg.data, cfg.tokenizer, log=log)
    return {"cache": str(td.dir), **td.manifest}



def show_config(config: Optional[Path], overrides: list[str]) -> Config:
    return load_config(config, overrides)
