"""pretrain, finetune and prepare: build and check everything, then run the one training loop."""

from __future__ import annotations

import contextlib
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import checkpoint as ckpt_io
from .. import distributed, estimate, hardware, rundir, tblog
from ..config import Config, from_dict, load_config, merge_settings, read_yaml, user_settings
from ..data import prepare as prepare_tokens
from ..distributed import unwrap
from ..errors import LlmctlError
from ..hardware import slow_precision_warning
from ..interrupt import Stopped, as_stop
from ..loading import build_backbone, for_inference, load_model, load_weights, restore, vocab_for
from ..lora import merge_lora
from ..model import Transformer
from ..optim import build_optimizer
from ..precision import resolve_amp, resolve_device
from ..saver import Saver
from ..tasks import BUILDERS as TASKS
from ..tasks import Layout, Task, count_trainable, distill_task, lm_task, make_trainable
from ..tokenizer import Tokenizer
from ..train import Hooks, Interrupted, LoopState, NullReporter, Reporter, fit, seed_everything
from . import Log, nolog

# ------------------------------------------------------------------------------------------------------------------
# Run directories


@contextlib.contextmanager
def reported_stop(resume_cmd: str):
    """A signal while the run is prepared (data, tokenizer, model): one line with the command that continues it."""
    try:
        yield
    except BaseException as e:
        stop = as_stop(e)
        if stop is None:
            raise
        raise Interrupted(f"interrupted by {stop.name} while preparing the run; nothing was trained. "
                          f"Resume with: {resume_cmd}", stop.status) from None


# ------------------------------------------------------------------------------------------------------------------
# Training (pretrain and finetune share this)


@dataclass
class TrainPlan:
    """Everything a training run needs, built and checked before the run directory is touched."""

    cfg: Config
    tokenizer: Tokenizer
    task: Task
    device: torch.device
    amp: Optional[torch.dtype]
    kind: str = "pretrain"
    base: Optional[ckpt_io.Checkpoint] = None  # the checkpoint a finetune started from
    resume_cmd: str = ""  # the exact command that continues this run
    overwrite: bool = False  # empty the run directory once the lock is held
    dist: distributed.DistContext = field(default_factory=distributed.DistContext)  # torchrun rank and world size
    grad_accum: int = 1  # micro-batches per step (train.grad_accum, or derived from train.global_batch_size)

    @property
    def model(self) -> torch.nn.Module:
        return self.task.module


def describe(plan: TrainPlan) -> dict:
    cfg, t = plan.cfg, plan.cfg.train
    trainable, total = count_trainable(plan.task.module)
    # sequences per optimizer step (a TP group shares)
    global_batch = t.batch_size * plan.grad_accum * plan.dist.dp_size
    out = {
        "task": plan.task.kind,
        "method": cfg.finetune.method if plan.kind == "finetune" else "full",
        "parameters": total,
        "parameters_non_embedding": plan.task.backbone.num_params(embeddings=False),
        "trainable_parameters": trainable,
        "tokens_per_step": plan.task.tokens_per_step,
        "global_batch": global_batch,
        "batch_size": t.batch_size,
        "grad_accum": plan.grad_accum,
        "world_size": plan.dist.world_size,
        "tp_size": plan.dist.tp_size,
        "dp_size": plan.dist.dp_size,
        "parallel": plan.dist.parallel,
        **plan.task.sizes,
        "vocab_size": cfg.model.vocab_size,
        "device": str(plan.device),
        "precision": "float32" if plan.amp is None else f"{str(plan.amp).replace('torch.', '')} autocast",
    }
    if plan.task.tokens_per_step and "train_tokens" in plan.task.sizes:
        out["epochs"] = round(t.max_steps * plan.task.tokens_per_step / max(1, plan.task.sizes["train_tokens"]), 2)
    return out


def run_training(plan: TrainPlan, out: Path, reporter: Reporter, log: Log, resume_state: Optional[dict] = None,
                 on_step: Optional[Callable[[LoopState], None]] = None) -> Optional[dict]:
    """Hold the run lock, create or continue the run directory, train with `fit`, keep status.json honest."""
    if not plan.dist.is_main:  # under torchrun rank 0 owns the run directory; the other ranks only train
        _train_locked(plan, out, reporter, log, resume_state, on_step)
        distributed.finish(plan.dist)
        return None
    estimate.preflight(unwrap(plan.model), plan.cfg, plan.device, plan.amp, plan.dist, plan.task.teacher)
    rundir.preflight(out, plan.model)
    # MFU in the progress bar and the summary: training FLOPs per token over the device's peak
    flops = estimate.task_flops(plan.task, plan.cfg)["train"]
    peak = hardware.peak_flops(plan.device, plan.amp, plan.cfg.data.cache_dir)["flops"]
    getattr(reporter, "set_mfu", lambda *a: None)(flops, peak)
    with rundir.RunLock(out) as lock:
        if lock.stale:
            log(f"cleared a stale lock left by a process that is gone ({lock.stale})")
        if plan.overwrite:
            rundir.clear_run(out)
        stale = ckpt_io.remove_stale_temporaries(out)
        if stale:
            log(f"removed {len(stale)} unfinished checkpoint write{'s' if len(stale) > 1 else ''} of a killed process")
        summary = _train_locked(plan, out, reporter, log, resume_state, on_step)
    distributed.finish(plan.dist)  # torchrun: all ranks leave the process group together
    if summary is not None:
        summary["mfu"] = hardware.mfu(summary.get("tokens_per_sec"), flops, peak)
        compile_decode_step(out, plan.cfg, plan.task.kind, plan.device, summary["train_seconds"], log, plan.resume_cmd)
    return summary


COMPILE_AFTER_S = 300.0  # CPU runs at least this long end by compiling their decode step (~0.5 min, <= 10% of them)


def compile_decode_step(out: Path, cfg: Config, task_kind: str, device: torch.device, train_seconds: float,
                        log: Log, resume_cmd: str = "") -> None:
    """After a CPU run that trained a language model: build the compiled decode step that `llmctl infer` then uses
    by default (generate.compile auto), so the model is fast from its first generation. With generate.compile
    auto only after a run of COMPILE_AFTER_S or more, with true after any run, with false never. Not for int8
    (the CPU default from 10M parameters up) or classifiers. A failed build is reported, not fatal: training is done.
    A signal stops the build (status.json's `decode_step` says "interrupted"); `--resume` then builds it."""
    mode = cfg.generate.compile
    if mode is False or task_kind == "classification" or device.type != "cpu" or not out.is_dir():
        return
    if mode == "auto" and train_seconds < COMPILE_AFTER_S:
        return
    try:
        loaded = for_inference(load_model(out, "cpu"), compile="auto", notify=log)  # what `infer` will run
        if loaded.engine.store is None:  # int8: never compiled
            return
        log("building the compiled decode step `llmctl infer` will use for this run "
            "(--set generate.compile=false skips this)")
        engine = loaded.engine
        engine.open(1, engine.cache_length(1 + loaded.cfg.generate.max_new_tokens), build=True)  # `infer --prompt`
        engine.close()
    except Stopped as e:  # the run is complete and saved: only the build is given up
        rundir.write_status(out, "finished", decode_step="interrupted")
        raise Interrupted(f"interrupted by {e.name} while compiling the decode step; the run is finished and saved "
                          f"({ckpt_io.read_latest(out)}). Build the step with: {resume_cmd}", e.status) from None
    except Exception as e:  # (LlmctlError from a failed build, or anything else: the finished run stays finished)
        why = e.message if isinstance(e, LlmctlError) else f"{type(e).__name__}: {e}"
        log(f"the decode step was not compiled ({why}); `llmctl infer` decodes eagerly until `--compile`")
        rundir.write_status(out, "finished", decode_step="failed")
    else:
        rundir.write_status(out, "finished", decode_step="built")


def finish_build(out: Path, ck: ckpt_io.Checkpoint, cfg: Config, log: Log, resume_cmd: str) -> Optional[dict]:
    """--resume of a finished run whose compiled decode step a signal stopped (and that is not asked to train
    further): build the step; returns the run's summary. None when there is no such build to finish."""
    status = rundir.read_status(out)
    if (status.get("status") != "finished" or status.get("decode_step") != "interrupted"
            or int(ck.meta.get("step") or 0) < cfg.train.max_steps):
        return None
    log("--resume: the run is finished; building the compiled decode step its stop interrupted")
    cfg = from_dict(ck.config)
    compile_decode_step(out, cfg, status.get("task") or "lm", torch.device("cpu"), float("inf"), log, resume_cmd)
    skip = ("status", "updated", "started", "pid", "decode_step", "kind", "task", "max_steps", "step")
    return {"run": str(out), **{k: v for k, v in rundir.read_status(out).items() if k not in skip}}


def _split_weights(plan: TrainPlan, full: dict) -> tuple[dict, str, dict]:
    """(weights, their file name, extra files) from the trained module's full state dict: the whole backbone, or
    only the LoRA adapter; plus a task head (a classifier's state has `backbone.*` and `head.*`)."""
    if plan.task.kind == "classification":
        backbone = {k[len("backbone."):]: v for k, v in full.items() if k.startswith("backbone.")}
        extra = {ckpt_io.HEAD: {k[len("head."):]: v for k, v in full.items() if k.startswith("head.")}}
    else:
        backbone, extra = full, {}
    if plan.kind == "finetune" and plan.cfg.finetune.method == "lora":
        return {k: v for k, v in backbone.items() if k.endswith((".lora_a", ".lora_b"))}, ckpt_io.ADAPTER, extra
    return {k: v for k, v in backbone.items() if not k.endswith((".lora_a", ".lora_b"))}, ckpt_io.WEIGHTS, extra


class Recipe:
    """One training run inside its run directory, in torchtune's recipe shape: `setup` (run files, the wrapped
    model, optimizer, grad scaler), `resume` (their state and the loop's, from a checkpoint), `train` (the loop,
    with status.json kept honest whatever happens) and `finish` (the summary)."""

    def __init__(self, plan: TrainPlan, out: Path, reporter: Reporter, log: Log,
                 on_step: Optional[Callable[[LoopState], None]] = None):
        self.plan, self.out, self.reporter, self.log, self.on_step = plan, out, reporter, log, on_step
        self.write_status = rundir.write_status if plan.dist.is_main else distributed.discard
        self.state = LoopState()
        self.resumed = False

    def setup(self) -> None:
        plan, t = self.plan, self.plan.cfg.train
        if plan.dist.is_main:
            rundir.write_run_files(self.out, plan.cfg.to_yaml(), plan.tokenizer.to_str())
        self.model = distributed.wrap_model(plan.model, t, plan.dist)  # checkpointing, DDP / FSDP / TP, compile
        self.optimizer = build_optimizer(self.model, t, plan.device.type, per_parameter=plan.dist.tp_size > 1)
        self.scaler = torch.amp.GradScaler(plan.device.type) if plan.amp == torch.float16 else None

    def resume(self, resume_state: Optional[dict]) -> None:
        """Continue from a checkpoint's train state (None: a fresh run); every rank gets its RNG stream."""
        plan, t = self.plan, self.plan.cfg.train
        if resume_state is not None:
            distributed.load_optimizer_state(self.model, self.optimizer, resume_state["optimizer"], plan.dist)
            if self.scaler is not None and resume_state.get("scaler"):
                self.scaler.load_state_dict(resume_state["scaler"])
            state = self.state = LoopState(**resume_state["loop"])
            if (state.step >= t.max_steps and not state.eval_due) or state.stopped_early:
                raise LlmctlError(f"the run is already complete at step {state.step} (train.max_steps={t.max_steps}"
                                  f"{', stopped early' if state.stopped_early else ''}); raise train.max_steps to "
                                  "train further")
            self.resumed = True
        distributed.restore_rng(plan.dist, resume_state, t.seed)

    def _saver(self) -> Saver:
        plan, cfg = self.plan, self.plan.cfg
        meta = {"kind": plan.kind, "task": plan.task.kind,
                "method": cfg.finetune.method if plan.kind == "finetune" else "full"}
        if plan.base is not None:
            meta["base"] = {"path": str(plan.base.path.resolve()),
                            "sha256": plan.base.meta["files"].get(ckpt_io.WEIGHTS)}
        if plan.task.teacher is not None:
            meta["teacher"] = str(cfg.finetune.teacher)
        return Saver(self.out, cfg, self.model, self.optimizer, self.scaler, plan.dist, plan.tokenizer.to_str(), meta,
                     lambda full: _split_weights(plan, full), plan.resume_cmd, self.log)

    def train(self) -> None:
        """The one loop. A signal, a failure or a divergence ends with its state in status.json and re-raised."""
        plan, out, t = self.plan, self.out, self.plan.cfg.train
        main = plan.dist.is_main
        metrics = (tblog.tee(rundir.MetricsFile(out / rundir.METRICS,
                                                resume_step=self.state.step if self.resumed else None),
                             out, t.log) if main else distributed.Discard())
        self.write_status(out, "running", kind=plan.kind, task=plan.task.kind, step=self.state.step,
                          max_steps=t.max_steps)
        t0 = time.time()
        try:
            hooks = Hooks(batches=plan.task.batches, loss=plan.task.loss, saver=self._saver(),
                          validate=lambda step: plan.task.validate(self.model, step),
                          log_metrics=distributed.per_device_metrics(metrics, plan.dist), on_step=self.on_step,
                          world_size=plan.dist.dp_size, **distributed.loop_hooks(self.model, plan.dist))
            with distributed.peer_errors(plan.dist):
                self.state = fit(self.model, self.optimizer, t, hooks, self.state, device=plan.device,
                                 amp_dtype=plan.amp, scaler=self.scaler, tokens_per_step=plan.task.tokens_per_step,
                                 reporter=distributed.per_device_reporter(self.reporter, plan.dist))
        except Stopped as e:  # before the loop took over the signals
            message = (f"interrupted by {e.name} before the first step; nothing was trained. "
                       f"Resume with: {plan.resume_cmd}")
            self._ended("interrupted", message, e.status)
            raise Interrupted(message, e.status) from None
        except LlmctlError as e:
            status = rundir.outcome(e.status)
            if status == "interrupted":
                e.message += f". Resume with: {plan.resume_cmd}"
            self._ended(status, e.message, e.status)
            raise
        except BaseException as e:
            self._ended("interrupted" if isinstance(e, KeyboardInterrupt) else "failed", f"{type(e).__name__}: {e}")
            raise
        finally:
            metrics.close()
        self.wall = time.time() - t0

    def _ended(self, status: str, error: str, exit_status: Optional[int] = None) -> None:
        self.reporter.stop()
        extra = {"exit_status": exit_status} if exit_status is not None else {}
        self.write_status(self.out, status, error=error, step=rundir.last_step(self.out), **extra)

    def finish(self) -> dict:
        """The run's summary, also written to status.json as `finished`."""
        plan, out, state, t = self.plan, self.out, self.state, self.plan.cfg.train
        best = ckpt_io.read_pointer(out, ckpt_io.BEST)
        tps = round(state.tokens / state.elapsed, 1) if state.elapsed else None
        summary = {
            "run": str(out),
            "checkpoint": str(ckpt_io.read_latest(out)),
            "best_checkpoint": str(best) if best else None,
            "steps": state.step,
            "stopped_early": state.stopped_early,
            "tokens": state.tokens,
            **{k: v for k, v in state.last_eval.items()},
            f"best_{t.best_metric}": state.best,
            "train_seconds": round(state.elapsed, 2),
            "wall_seconds": round(self.wall, 2),
            "tokens_per_sec": tps,
        }
        if plan.dist.enabled:
            summary["world_size"] = plan.dist.world_size
            summary["tokens_per_sec_per_device"] = round(tps / plan.dist.world_size, 1) if tps else None
        self.write_status(out, "finished", step=state.step, **{k: v for k, v in summary.items() if k != "run"})
        return summary


def _train_locked(plan: TrainPlan, out: Path, reporter: Reporter, log: Log, resume_state: Optional[dict],
                  on_step: Optional[Callable[[LoopState], None]]) -> dict:
    recipe = Recipe(plan, out, reporter, log, on_step)
    recipe.setup()
    recipe.resume(resume_state)
    recipe.train()
    return recipe.finish()


def resume_command(kind: str, config: Optional[Path], overrides: list[str], out: Path,
                   from_: Optional[Path] = None) -> str:
    """The exact command line that continues a run (printed when a run is interrupted or runs out of disk)."""
    parts = [*distributed.launch_prefix(), "llmctl", kind]
    if config is not None:
        parts += ["-c", str(config)]
    for o in overrides:
        parts += ["--set", o]
    if from_ is not None:
        parts += ["--from", str(from_)]
    parts += ["--out", str(out), "--resume"]
    return " ".join(shlex.quote(p) for p in parts)


def load_teacher(cfg: Config, tokenizer: Tokenizer, device: torch.device, student: str) -> Transformer:
    """finetune.teacher as a frozen language model in eval mode on `device` (an adapter merged into its base),
    refused unless it shares the student's tokenizer and reads at least the student's context."""
    where = cfg.finetune.teacher
    try:
        loaded = load_model(where, "cpu")
    except LlmctlError as e:
        raise LlmctlError(f"finetune.teacher: {e.message}") from None
    ck = loaded.ckpt
    if loaded.classifier is not None:
        raise LlmctlError(f"finetune.teacher {ck.path} is a classification checkpoint; a language-model student "
                          "learns from a language model's next-token distributions (use the checkpoint it was "
                          "finetuned from)")
    if loaded.tokenizer.sha256 != tokenizer.sha256:
        raise LlmctlError(f"the teacher {ck.path} (tokenizer sha256 {loaded.tokenizer.sha256[:12]}) and the student "
                          f"{student} (tokenizer sha256 {tokenizer.sha256[:12]}) do not share a tokenizer; "
                          "distillation compares their distributions token by token, so both need the same one")
    if loaded.cfg.model.block_size < cfg.model.block_size:
        raise LlmctlError(f"the teacher {ck.path} reads {loaded.cfg.model.block_size} tokens but the student's "
                          f"model.block_size is {cfg.model.block_size}; give the student at most the teacher's context")
    teacher = merge_lora(loaded.model).to(device).eval()
    teacher.requires_grad_(False)
    return teacher


def _build_plan(cfg: Config, tokenizer: Optional[Tokenizer], log: Log, kind: str,
                base: Optional[ckpt_io.Checkpoint] = None) -> TrainPlan:
    """Tokenizer, data, model and task, all checked; a finetune's backbone starts from `base`'s weights."""
    distributed.check_layout(cfg, finetune=kind == "finetune")  # (before joining: a bad layout fails at once)
    ctx = distributed.init(cfg.train, resolve_device(cfg.train.device))  # under torchrun: join the group
    device = ctx.device
    amp = resolve_amp(cfg.train.dtype, device)
    slow = slow_precision_warning(amp, device, "train.dtype")  # (auto never picks an emulated precision)
    if slow:
        log(f"[yellow]warning:[/yellow] {slow}")
    accum = distributed.check(ctx, cfg.train, amp)
    tblog.check(cfg.train.log)
    task_kind = cfg.finetune.task if kind == "finetune" else "lm"
    td = None
    if task_kind in ("lm", "distill"):
        # under torchrun one process per node tokenizes; the others then open the cache
        td = distributed.local_rank0_first(
            ctx, lambda: prepare_tokens(cfg.data, cfg.tokenizer, tokenizer=tokenizer, log=log))
        tokenizer = td.tokenizer
    elif cfg.data.path is None:
        raise LlmctlError(f"data.path is not set: finetune.task={task_kind} needs a training file")
    cfg.model.vocab_size = vocab_for(cfg, tokenizer)
    seed_everything(cfg.train.seed)
    if base is not None:
        backbone = build_backbone(cfg, device)
        restore(backbone, None, base, from_dict(base.config))
    else:
        with torch.device(device):
            backbone = Transformer(cfg.model)
    layout = Layout(ctx, accum)
    if task_kind == "lm":
        task = lm_task(cfg, td, backbone, device, amp, layout)
    elif task_kind == "distill":
        student = str(base.path) if base is not None else "(a fresh model: section)"
        task = distill_task(cfg, td, backbone, device, amp, layout, load_teacher(cfg, tokenizer, device, student))
    else:
        task = TASKS[task_kind](cfg, tokenizer, backbone, device, amp, layout)
    if task.labels is not None:
        cfg.finetune.labels = task.labels  # saved with every checkpoint: the label set is part of the model
    if kind == "finetune":
        make_trainable(task, cfg)
    for note in task.notes:
        log(f"[yellow]note:[/yellow] {note}")
    # DDP / FSDP / compile wrap the module when training starts, after weights load
    return TrainPlan(cfg, tokenizer, task, device, amp, kind=kind, base=base, dist=ctx, grad_accum=accum)


def pretrain(
    config: Optional[Path],
    overrides: list[str],
    out: Path,
    resume: bool = False,
    overwrite: bool = False,
    resume_from: Optional[Path] = None,
    reporter: Reporter = NullReporter(),
    log: Log = nolog,
    on_plan: Optional[Callable[[TrainPlan], None]] = None,
    on_step: Optional[Callable[[LoopState], None]] = None,
    dry_run: bool = False,
) -> Optional[dict]:
    """`llmctl pretrain`: train a model from scratch (or continue one) on `data.path`.

    Everything is checked (arguments, run directory, config, data, model, disk) before the run directory is
    created or, with --overwrite, emptied. With `dry_run`, build and check everything, then return
    `estimate.dry_run`'s report instead of training (no run directory is created, touched or deleted).
    """
    reporter, log, on_plan = distributed.rank0_only(reporter, log, on_plan)  # under torchrun only rank 0 speaks
    if resume and overwrite:
        raise LlmctlError("--resume and --overwrite contradict each other; pick one")
    out = Path(out)
    if not dry_run:
        rundir.check_out_dir(out, resume or resume_from is not None, overwrite)
    source_ckpt, clear = None, overwrite
    if resume_from is not None:
        source_ckpt = ckpt_io.load(resume_from)
    elif resume:
        source_ckpt, clear = rundir.resume_point(out, log)
    base = source_ckpt.config if source_ckpt is not None and config is None else None
    base = distributed.inherited_layout(base, log) if base is not None else None
    if base is None and resume and config is None and (out / ckpt_io.CONFIG).is_file():
        base = read_yaml(out / ckpt_io.CONFIG)  # a run stopped before its first checkpoint
    cfg = load_config(config, overrides, base=base)
    if resume and source_ckpt is not None:
        built = finish_build(out, source_ckpt, cfg, log, resume_command("pretrain", config, overrides, out))
        if built:
            return built
    tokenizer = Tokenizer.from_str(source_ckpt.tokenizer_json()) if source_ckpt else None
    if source_ckpt is not None:
        _check_model_matches(cfg, from_dict(source_ckpt.config), source_ckpt.path, explicit=None)
    resume_cmd = resume_command("pretrain", config, overrides, out)
    with reported_stop(resume_cmd):
        plan = _build_plan(cfg, tokenizer, log, "pretrain")
    plan.overwrite = clear
    plan.resume_cmd = resume_cmd
    resume_state = None
    if source_ckpt is not None:
        load_weights(unwrap(plan.task.backbone), source_ckpt.weights(), str(source_ckpt.path))
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
        raise LlmctlError(f"config disagrees with checkpoint {where}: " + "; ".join(bad)
                          + " (remove these keys from the config)")


def finetune(
    config: Optional[Path],
    overrides: list[str],
    from_: Optional[Path],
    out: Path,
    resume: bool = False,
    overwrite: bool = False,
    reporter: Reporter = NullReporter(),
    log: Log = nolog,
    on_plan: Optional[Callable[[TrainPlan], None]] = None,
    on_step: Optional[Callable[[LoopState], None]] = None,
    dry_run: bool = False,
) -> Optional[dict]:
    """`llmctl finetune`: continue training a checkpoint's model on new data (same loop, same format).

    The model shape and tokenizer come from the checkpoint; model keys in the config must agree with it. Without
    `from_` (distillation only) the student is a fresh model of the config's model: section with the teacher's
    tokenizer.
    """
    reporter, log, on_plan = distributed.rank0_only(reporter, log, on_plan)  # under torchrun only rank 0 speaks
    if resume and overwrite:
        raise LlmctlError("--resume and --overwrite contradict each other; pick one")
    out = Path(out)
    if from_ is None:  # a fresh student of the config's model: section (distillation only)
        cfg = load_config(config, overrides)
        if cfg.finetune.task != "distill":
            raise LlmctlError("--from is required: finetune starts from a checkpoint (only finetune.task=distill "
                              "may train a fresh student of the config's model: section)")
        return _finetune(cfg, None, config, overrides, from_, out, resume, overwrite, reporter, log, on_plan,
                         on_step, dry_run)
    base_ckpt = ckpt_io.load(from_)
    base_cfg = from_dict(base_ckpt.config)
    user_raw = user_settings(config, overrides)
    user_model = user_raw.get("model", {}) if isinstance(user_raw.get("model", {}), dict) else {}
    cfg = from_dict(merge_settings({"model": base_cfg.model.__dict__}, user_raw))  # the model comes from the checkpoint
    _check_model_matches(cfg, base_cfg, base_ckpt.path, explicit=user_model)
    return _finetune(cfg, base_ckpt, config, overrides, from_, out, resume, overwrite, reporter, log, on_plan, on_step,
                     dry_run)


def _finetune(cfg: Config, base_ckpt: Optional[ckpt_io.Checkpoint], config: Optional[Path], overrides: list[str],
              from_: Optional[Path], out: Path, resume: bool, overwrite: bool, reporter: Reporter, log: Log,
              on_plan: Optional[Callable[[TrainPlan], None]], on_step: Optional[Callable[[LoopState], None]],
              dry_run: bool) -> Optional[dict]:
    if not dry_run:
        rundir.check_out_dir(out, resume, overwrite)
    resume_ckpt, clear = None, overwrite
    if resume:
        resume_ckpt, clear = rundir.resume_point(out, log)
        built = resume_ckpt and finish_build(out, resume_ckpt, cfg, log,
                                             resume_command("finetune", config, overrides, out, from_))
        if built:
            return built
    if base_ckpt is None:  # the fresh student uses the teacher's tokenizer
        try:
            tokenizer = Tokenizer.from_str(ckpt_io.load(cfg.finetune.teacher).tokenizer_json())
        except LlmctlError as e:
            raise LlmctlError(f"finetune.teacher: {e.message}") from None
    elif ckpt_io.ADAPTER in base_ckpt.meta["files"]:
        raise LlmctlError(f"--from {base_ckpt.path} is a LoRA adapter; finetune from its base checkpoint "
                          f"({(base_ckpt.meta.get('base') or {}).get('path')}) or from a full checkpoint")
    elif not base_ckpt.has_tokenizer and cfg.tokenizer.path:  # an imported checkpoint without a tokenizer
        tokenizer = Tokenizer.from_file(cfg.tokenizer.path)
    else:
        tokenizer = Tokenizer.from_str(base_ckpt.tokenizer_json())
    resume_cmd = resume_command("finetune", config, overrides, out, from_)
    with reported_stop(resume_cmd):
        plan = _build_plan(cfg, tokenizer, log, "finetune", base=base_ckpt)
    plan.overwrite = clear
    plan.resume_cmd = resume_cmd
    if resume_ckpt is not None:
        classifier = unwrap(plan.task.module) if plan.task.kind == "classification" else None
        restore(unwrap(plan.task.backbone), classifier, resume_ckpt, cfg)
        log(f"resuming from {resume_ckpt.path} (step {resume_ckpt.meta.get('step')})")
    resume_state = resume_ckpt.train_state() if resume_ckpt else None
    if on_plan:
        on_plan(plan)
    if dry_run:
        return estimate.dry_run(plan, start_step=resume_state["loop"]["step"] if resume_state else 0, out=out)
    return run_training(plan, out, reporter, log, resume_state, on_step)
