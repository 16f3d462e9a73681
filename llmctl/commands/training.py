"""`llmctl pretrain` and `llmctl finetune`: each decides where its run starts (fresh, from the run's own latest
checkpoint, from another checkpoint, from a base model) and hands that to the one train path, `_train`: build and
check the plan (`llmctl.plan`), load what the run continues, then train it (`llmctl.recipe`) or, with --dry-run,
measure it (`llmctl.estimate`)."""

from __future__ import annotations

import contextlib
import dataclasses
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from .. import checkpoint as ckpt_io
from .. import distributed, estimate, recipe, rundir
from ..config import Config, TokenizerConfig, from_dict, load_config, merge_settings, read_yaml, user_settings
from ..errors import LlmctlError
from ..events import SILENT, Events
from ..interrupt import as_stop
from ..plan import TrainPlan, build_plan
from ..recipe import AfterTraining, Start
from ..tokenizer import Tokenizer
from ..train import Interrupted, LoopState


@dataclass(frozen=True)
class TrainOptions:
    """How a run reports, and the work that follows it: the same for pretrain and finetune."""

    events: Events = SILENT  # progress, log lines and warnings (a slow precision, a damaged checkpoint skipped)
    on_plan: Optional[Callable[[TrainPlan], None]] = None  # gets the plan once it is built and checked
    on_step: Optional[Callable[[LoopState], None]] = None  # hears every optimizer step (tests, benchmarks)
    after_training: tuple[AfterTraining, ...] = ()  # work after a finished run (the CLI's compiled decode step)
    dry_run: bool = False  # measure the plan (estimate.dry_run) instead of training it
    gpu_memory: Optional[int] = None  # the dry run's memory estimate for a CUDA GPU of this many bytes

    def for_this_rank(self) -> TrainOptions:
        """Under torchrun only rank 0 speaks: the other ranks' events are silent, and they show no plan."""
        return dataclasses.replace(self, events=distributed.rank0_only(self.events),
                                   on_plan=self.on_plan if distributed.speaks() else None)


def pretrain(
    config: Optional[Path],
    overrides: list[str],
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    resume_from: Optional[Path] = None,
    dry_run: bool = False,
    gpu_memory: Optional[str] = None,
    events: Events = SILENT,
    on_plan: Optional[Callable[[TrainPlan], None]] = None,
    on_step: Optional[Callable[[LoopState], None]] = None,
    after_training: Sequence[AfterTraining] = (),
) -> Optional[dict]:
    """`llmctl pretrain`: train a model from scratch (or continue one) on `data.path`.

    Everything is checked (arguments, run directory, config, data, model, disk) before the run directory is
    created or, with --overwrite, emptied. With `dry_run`, build and check everything, then return
    `estimate.dry_run`'s report instead of training (no run directory is created, touched or deleted);
    `gpu_memory` (a size such as 24GB) makes its memory estimate one for a CUDA GPU of that size.
    """
    opts = TrainOptions(events, on_plan, on_step, tuple(after_training), dry_run,
                        _gpu_memory(gpu_memory, dry_run)).for_this_rank()
    if resume and overwrite:
        raise LlmctlError("--resume and --overwrite contradict each other; pick one")
    out = Path(out)
    if not dry_run:
        rundir.check_out_dir(out, resume or resume_from is not None, overwrite)
    source, clear = None, overwrite
    if resume_from is not None:
        source = ckpt_io.load(resume_from)
        if ckpt_io.ADAPTER in source.meta["files"]:
            raise LlmctlError(f"--resume-from {source.path} is a LoRA adapter; pretraining continues a full "
                              "checkpoint (continue a LoRA finetune with `llmctl finetune --resume`)")
    elif resume:
        source, clear = rundir.resume_point(out, opts.events)
    cfg = load_config(config, overrides, base=_pretrain_base(config, source, out, resume, opts.events))
    tokenizer = Tokenizer.from_str(source.tokenizer_json()) if source else None
    if source is not None:
        _check_model_matches(cfg, from_dict(source.config), source.path, explicit=None)
    start = Start(out, source, resumed=resume, clear=clear,
                  resume_cmd=resume_command("pretrain", config, overrides, out))
    return _train("pretrain", cfg, tokenizer, None, start, opts)


def _pretrain_base(config: Optional[Path], source: Optional[ckpt_io.Checkpoint], out: Path, resume: bool,
                   events: Events) -> Optional[dict]:
    """The settings a pretrain without -c continues: the checkpoint's (its tensor-parallel layout only under
    torchrun), or the config.yaml of a run stopped before its first checkpoint. None: the defaults in code."""
    if config is not None:
        return None
    if source is not None:
        return distributed.inherited_layout(source.config, events.log)
    if resume and (out / ckpt_io.CONFIG).is_file():
        return read_yaml(out / ckpt_io.CONFIG)
    return None


def finetune(
    config: Optional[Path],
    overrides: list[str],
    from_: Optional[Path],
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    dry_run: bool = False,
    gpu_memory: Optional[str] = None,
    events: Events = SILENT,
    on_plan: Optional[Callable[[TrainPlan], None]] = None,
    on_step: Optional[Callable[[LoopState], None]] = None,
    after_training: Sequence[AfterTraining] = (),
) -> Optional[dict]:
    """`llmctl finetune`: continue training a checkpoint's model on new data (same loop, same format).

    The model shape and tokenizer come from the checkpoint; model keys in the config must agree with it. Without
    `from_` (distillation only) the student is a fresh model of the config's model: section with the teacher's
    tokenizer.
    """
    opts = TrainOptions(events, on_plan, on_step, tuple(after_training), dry_run,
                        _gpu_memory(gpu_memory, dry_run)).for_this_rank()
    if resume and overwrite:
        raise LlmctlError("--resume and --overwrite contradict each other; pick one")
    out = Path(out)
    cfg, base = _finetune_config(config, overrides, from_)
    if not dry_run:
        rundir.check_out_dir(out, resume, overwrite)
    source, clear = rundir.resume_point(out, opts.events) if resume else (None, overwrite)
    start = Start(out, source, resumed=resume, clear=clear,
                  resume_cmd=resume_command("finetune", config, overrides, out, from_))
    return _train("finetune", cfg, _finetune_tokenizer(cfg, base), base, start, opts)


def _finetune_config(config: Optional[Path], overrides: list[str],
                     from_: Optional[Path]) -> tuple[Config, Optional[ckpt_io.Checkpoint]]:
    """A finetune's config and the checkpoint it starts from: the model: section comes from the checkpoint (keys
    the user sets must agree with it). Without `from_`, a fresh student of the config's model: section."""
    if from_ is None:  # a fresh student of the config's model: section (distillation only)
        cfg = load_config(config, overrides)
        if cfg.finetune.task != "distill":
            raise LlmctlError("--from is required: finetune starts from a checkpoint (only finetune.task=distill "
                              "may train a fresh student of the config's model: section)")
        if not cfg.finetune.teacher:
            return cfg, None
        try:  # the student chats like its teacher: the teacher's tokenizer settings, the user's over them
            teacher = from_dict(ckpt_io.load(cfg.finetune.teacher).config).tokenizer
        except LlmctlError:
            return cfg, None  # (_finetune_tokenizer names the problem with the teacher)
        own = {"tokenizer": {k: getattr(teacher, k) for k in TokenizerConfig.MODEL_FIELDS}}
        return load_config(config, overrides, base=own), None
    base = ckpt_io.load(from_)
    base_cfg = from_dict(base.config)
    user_raw = user_settings(config, overrides)
    user_model = user_raw.get("model", {}) if isinstance(user_raw.get("model", {}), dict) else {}
    # the model, and its tokenizer's settings (chat template, special tokens, end ids), come from the checkpoint
    own = {"model": base_cfg.model.__dict__,
           "tokenizer": {k: getattr(base_cfg.tokenizer, k) for k in TokenizerConfig.MODEL_FIELDS}}
    cfg = from_dict(merge_settings(own, user_raw))
    _check_model_matches(cfg, base_cfg, base.path, explicit=user_model)
    return cfg, base


def _finetune_tokenizer(cfg: Config, base: Optional[ckpt_io.Checkpoint]) -> Tokenizer:
    """The tokenizer a finetune trains with: its base checkpoint's (or tokenizer.path for an imported checkpoint
    that has none); a fresh distillation student takes the teacher's. An adapter is no base."""
    if base is None:
        try:
            return Tokenizer.from_str(ckpt_io.load(cfg.finetune.teacher).tokenizer_json()).configured(cfg.tokenizer)
        except LlmctlError as e:
            raise LlmctlError(f"finetune.teacher: {e.message}") from None
    if ckpt_io.ADAPTER in base.meta["files"]:
        raise LlmctlError(f"--from {base.path} is a LoRA adapter; finetune from its base checkpoint "
                          f"({(base.meta.get('base') or {}).get('path')}) or from a full checkpoint")
    if not base.has_tokenizer and cfg.tokenizer.path:  # an imported checkpoint without a tokenizer
        return Tokenizer.from_file(cfg.tokenizer.path).configured(cfg.tokenizer)
    return Tokenizer.from_str(base.tokenizer_json()).configured(cfg.tokenizer)


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


def _gpu_memory(size: Optional[str], dry_run: bool) -> Optional[int]:
    if size is None:
        return None
    if not dry_run:
        raise LlmctlError("--gpu-memory sizes the dry run's memory estimate: add --dry-run, or drop --gpu-memory")
    return estimate.parse_size(size)


def _train(kind: str, cfg: Config, tokenizer: Optional[Tokenizer], base: Optional[ckpt_io.Checkpoint], start: Start,
           opts: TrainOptions) -> Optional[dict]:
    """The one train path: a finished run whose work after training a signal stopped does that work; any other
    builds and checks its plan, loads the checkpoint it continues, then trains (or with --dry-run is measured)."""
    if not opts.dry_run:
        finished = recipe.finish_stopped_work(start, cfg, opts.after_training, opts.events)
        if finished:
            return finished
    with reported_stop(start.resume_cmd):
        plan = build_plan(cfg, tokenizer, kind, base, events=opts.events)
    resume_state = recipe.load_start(plan, start, opts.events)
    if opts.on_plan:
        opts.on_plan(plan)
    if opts.dry_run:
        return estimate.dry_run(plan, start_step=resume_state["loop"]["step"] if resume_state else 0, out=start.out,
                                gpu_memory=opts.gpu_memory)
    return recipe.run_training(plan, start, resume_state, events=opts.events, on_step=opts.on_step,
                               after_training=opts.after_training)


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
