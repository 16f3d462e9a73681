"""eval: measure a checkpoint. Language models: loss, perplexity, bits per byte. Classifiers: accuracy, precision,
recall, F1 and the confusion matrix. Instruction-tuned models: the loss on responses."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .. import sampling
from ..config import DataConfig, from_dict, user_settings
from ..data import (
    chat_examples,
    classification_examples,
    eval_batches,
    eval_blocks,
    holdout,
    instruct_examples,
    load_texts,
    prompt_rows,
    resolve_source,
    tokenize_file,
)
from ..data import prepare as prepare_tokens
from ..errors import LlmctlError
from ..evaluate import classification_metrics, classify, lm_metrics
from ..events import SILENT, Events
from ..generate import Engine
from ..loading import Loaded, for_inference, load_model
from ..mlm import Masking, masked_blocks, mlm_metrics
from ..precision import check_choices


def _default_source(loaded: Loaded, data: Optional[str]) -> str:
    """The file to evaluate on: --data, or the checkpoint's own data.path (which must exist here)."""
    if data is not None:
        return data
    path = loaded.cfg.data.path
    if not path:  # an imported checkpoint has no training data to take a validation split from
        raise LlmctlError(f"{loaded.ckpt.path} names no data.path to evaluate on (an imported model?); "
                          "pass --data FILE")
    if path and not path.startswith(("hf:", "http://", "https://")) and not Path(path).expanduser().exists():
        raise LlmctlError(f"the checkpoint's data.path {path} is not on this machine; "
                          "pass --data FILE to evaluate on a file")
    return path


def generation_changes(overrides: Optional[list[str]] = None, flags: Optional[dict] = None) -> dict:
    """`eval --tasks`: the sampling settings the user gave, field -> value, checked: `--set generate.<field>`
    (as config), then the sampling flags (field -> value, None = not given; under their own names). They override
    each generation task's own settings (llmctl.harness.task_sampling), as lm-eval's --gen_kwargs does; the
    checkpoint's generate section does not apply (a task decides, greedy unless it samples)."""
    given = sampling.given_flags(flags)
    raw = user_settings(None, overrides or [])
    gen = raw.get("generate")
    other = [f"{k}.*" for k in raw if k != "generate"] + [f"generate.{k}" for k in (gen if isinstance(gen, dict)
                                                                                   else {}) if k not in sampling.FIELDS]
    if other:
        raise LlmctlError(f"llmctl eval --tasks takes only the sampling settings generate."
                          f"{{{','.join(sampling.FIELDS)}}}; {', '.join(other)} do not apply")
    cfg = from_dict(raw)
    return {**{k: getattr(cfg.generate, k) for k in gen or {}}, **given}


def evaluate(ckpt: Path, data: Optional[str] = None, batch_size: Optional[int] = None, device: str = "auto",
             events: Events = SILENT, text_column: Optional[str] = None, label_column: Optional[str] = None,
             base: Optional[Path] = None, tokenizer: Optional[Path] = None, dtype: str = "float32",
             quantize_mode: str = "none") -> dict:
    """`llmctl eval`: without --data, the validation split the run held out; with it, all of that file.

    Language models are measured in float32 unless `dtype` / `quantize_mode` ask for an inference precision
    ("auto" = what `llmctl infer` uses), to see what bfloat16 or int8 cost in perplexity. `events` hears about
    characters of --data the tokenizer has never seen (they count as <unk> tokens; the measurement goes on), an
    emulated (slow) precision, and the preparation of the run's validation split.
    """
    check_choices(dtype, quantize_mode)
    if batch_size is not None and batch_size < 1:
        raise LlmctlError(f"--batch-size must be at least 1 (got {batch_size})")
    loaded = load_model(ckpt, device, base=base, tokenizer=tokenizer)
    cfg = loaded.cfg
    if (dtype, quantize_mode) != ("float32", "none") and loaded.classifier is None:
        for_inference(loaded, dtype, quantize_mode, compile=False, events=events)
    bs = batch_size or cfg.eval.batch_size
    source = _default_source(loaded, data)
    where = source if data is not None else f"{source} (validation split)"
    if loaded.classifier is not None:
        return {"checkpoint": str(loaded.ckpt.path), "data": where,
                **_eval_classifier(loaded, source, data is not None, bs, text_column, label_column)}
    if cfg.finetune.task == "instruct":
        key = "--data" if data is not None else "data.path"
        ex = instruct_examples(source, cfg.data, loaded.tokenizer, cfg.model.block_size, cfg.finetune, key=key,
                               chat=chat_examples(cfg, loaded.tokenizer))
        idx = range(len(ex.ids)) if data is not None else holdout(len(ex.ids), cfg.data.val_fraction, cfg.train.seed)[1]
        r = lm_metrics(loaded.model, eval_batches(ex, list(idx), "instruct", loaded.tokenizer.pad_id, bs),
                       loaded.device)
        return {"checkpoint": str(loaded.ckpt.path), "data": where, "response_loss": r["loss"], **r}
    if cfg.finetune.task == "dpo" and data is None:
        raise LlmctlError(f"{ckpt} was preference-tuned (finetune.task=dpo): its held-out rewards, margin, accuracy "
                          "and KL are in the run's metrics.jsonl (val_*); give --data FILE of text to measure its "
                          "language-model loss")
    if cfg.finetune.task == "grpo" and data is None:
        raise LlmctlError(f"{ckpt} was tuned with rewards (finetune.task=grpo): measure it with --reward SPEC "
                          "--prompts FILE, or give --data FILE of text to measure its language-model loss")
    tok = loaded.tokenizer
    if data is not None:
        tokens = tokenize_file(data, cfg.data, tok)
        _warn_unseen(tok, tokens, data, cfg.data, events)
    else:
        tokens = prepare_tokens(cfg.data, cfg.tokenizer, tokenizer=tok, events=events).val
    if len(tokens) < 2:
        raise LlmctlError(f"{where} has fewer than 2 tokens; nothing to evaluate")
    if not cfg.model.causal:  # an encoder: masked-token loss and accuracy, masks fixed by seed (llmctl.mlm)
        blocks = masked_blocks(eval_blocks(tokens, cfg.model.block_size, bs), Masking.of(tok, cfg.train.mask_rate))
        return {"checkpoint": str(loaded.ckpt.path), "data": where, "objective": "mlm",
                **mlm_metrics(loaded.model, blocks, loaded.device)}
    n_bytes = len(tok.decode([int(i) for i in tokens[1:]]).encode("utf-8"))
    r = lm_metrics(loaded.model, eval_blocks(tokens, cfg.model.block_size, bs), loaded.device, None, n_bytes=n_bytes)
    return {"checkpoint": str(loaded.ckpt.path), "data": where, "precision": loaded.precision, **r}


def _warn_unseen(tok, tokens, data: str, cfg: DataConfig, events: Events) -> None:
    """One warning line naming the characters of the --data file that became <unk>. The token ids (cached) say
    whether there are any; only then is the text read again to name them."""
    if tok.unk_id is None or not any((c == tok.unk_id).any() for c in tokens.chunks()):
        return
    d = DataConfig(**{**cfg.__dict__, "path": data, "val_path": None, "val_fraction": 0.0})  # as tokenize_file reads it
    texts = load_texts(resolve_source(data, d, "--data"), d, key="--data")["text"]
    found = tok.unseen([t if isinstance(t, str) else "" for t in texts])
    if found:
        events.warn(found.message(f"--data {data}"))


def _eval_classifier(loaded: Loaded, source: str, whole_file: bool, batch_size: int,
                     text_column: Optional[str], label_column: Optional[str]) -> dict:
    cfg, tok = loaded.cfg, loaded.tokenizer
    if whole_file:  # a report file may name its columns differently (SST-2's dev.tsv calls its text `content`)
        text_col = text_column or cfg.eval.text_column or cfg.data.text_column
        label_col = label_column or cfg.eval.label_column or cfg.data.label_column
    else:
        text_col, label_col = cfg.data.text_column, cfg.data.label_column
    key = "--data" if whole_file else "data.path"
    ex, labels = classification_examples(source, cfg.data, tok, cfg.model.block_size, text_col, label_col,
                                         loaded.labels, key=key, encoder=not cfg.model.causal)
    idx = (list(range(len(ex.ids))) if whole_file
           else holdout(len(ex.ids), cfg.data.val_fraction, cfg.train.seed)[1].tolist())
    rows, pred, _, loss = classify(loaded.classifier, eval_batches(ex, idx, "classification", tok.pad_id, batch_size),
                                   loaded.device)
    m = classification_metrics(pred, [ex.targets[i] for i in rows.tolist()], labels)
    return {"loss": loss, **m, "truncated": ex.truncated}


def evaluate_tasks(ckpt: Path, tasks: str, num_fewshot: Optional[int] = None, limit: Optional[float] = None,
                   include_path: Optional[Path] = None, batch_size: Optional[int] = None, device: str = "auto",
                   base: Optional[Path] = None, tokenizer: Optional[Path] = None, dtype: str = "float32",
                   quantize_mode: str = "none", log_samples: bool = False, events: Events = SILENT,
                   overrides: Optional[list[str]] = None, flags: Optional[dict] = None) -> dict:
    """`llmctl eval --tasks`: lm-evaluation-harness tasks on the checkpoint (llmctl.harness), in float32 unless
    asked otherwise; `overrides` (--set generate.*) and the sampling `flags` change the generation tasks'
    settings (`generation_changes`). Returns lm-eval's results dict plus `checkpoint` and `saved`
    (RUN/evals/<time>-<tasks>.json)."""
    from .. import harness
    from ..rundir import is_run, save_eval

    changes = generation_changes(overrides, flags)
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise LlmctlError("--tasks: give one or more lm-eval task names, separated by commas")
    if include_path is not None and not Path(include_path).is_dir():
        raise LlmctlError(f"--include-path {include_path} is not a directory of task YAML files")
    if num_fewshot is not None and num_fewshot < 0:
        raise LlmctlError(f"--num-fewshot must not be negative (got {num_fewshot})")
    if limit is not None and limit <= 0:
        raise LlmctlError(f"--limit must be positive: a number of examples, or a fraction below 1 (got {limit})")
    if batch_size is not None and batch_size < 1:
        raise LlmctlError(f"--batch-size must be at least 1 (got {batch_size})")
    check_choices(dtype, quantize_mode)
    harness.require()
    loaded = load_model(ckpt, device, base=base, tokenizer=tokenizer)
    if loaded.classifier is not None:
        raise LlmctlError(f"--tasks runs lm-eval on language models; {loaded.ckpt.path} is a classifier (measure it "
                          "with `llmctl eval --ckpt ... --data FILE`)")
    for_inference(loaded, dtype, quantize_mode, compile=False, events=events)  # (generate_until tasks decode on it)
    events.log(f"lm-eval: {', '.join(names)} on {loaded.ckpt.path} ({loaded.precision})")
    res = harness.evaluate(loaded, names, num_fewshot, int(limit) if limit and limit >= 1 else limit,
                           str(include_path) if include_path else None, batch_size or loaded.cfg.eval.batch_size,
                           log_samples, changes)
    out = harness.plain(res)
    out["checkpoint"] = str(loaded.ckpt.path)
    if is_run(loaded.ckpt.run_dir):
        out["saved"] = str(save_eval(loaded.ckpt.run_dir, names, out))
    return out


def evaluate_reward(ckpt: Path, rewards: list[str], prompts: Path, reference: Optional[Path] = None,
                    samples: int = 1, batch_size: Optional[int] = None, device: str = "auto",
                    base: Optional[Path] = None, tokenizer: Optional[Path] = None,
                    overrides: Optional[list[str]] = None, flags: Optional[dict] = None,
                    events: Events = SILENT) -> dict:
    """`llmctl eval --reward SPEC --prompts FILE`: `samples` completions of each prompt, sampled with the
    checkpoint's generate settings (then --set generate.* and the sampling flags over them), scored by the
    rewards (added up); and the KL to `reference` (default: the checkpoint the run started from). Returns exactly
    `reward` (mean), `reward_std` (over completions), `kl` (mean over completions of the summed log-ratio) and
    `samples`. With generate.seed (or --seed) set, every completion's seed derives from it."""
    from ..rewards import load_rewards
    from ..rollouts import derive_seed, encode_prompts, measure
    from .inference import sampling_settings

    if samples < 1:
        raise LlmctlError(f"--samples must be at least 1 (got {samples})")
    if batch_size is not None and batch_size < 1:
        raise LlmctlError(f"--batch-size must be at least 1 (got {batch_size})")
    loaded = load_model(ckpt, device, base=base, tokenizer=tokenizer)
    if loaded.classifier is not None or not loaded.cfg.model.causal:
        what = "a classifier" if loaded.classifier is not None else "an encoder, which does not generate"
        raise LlmctlError(f"--reward measures a language model's completions; {loaded.ckpt.path} is {what}")
    s = sampling_settings(loaded, overrides, flags, "eval")
    ref = _reference(loaded, reference, device, tokenizer)
    scorer = load_rewards(rewards, device=loaded.device, key="--reward")
    rows = prompt_rows(str(prompts), DataConfig(), loaded.cfg.finetune.prompt_field, key="--prompts")
    ids, cut = encode_prompts(loaded.cfg, loaded.tokenizer, rows, s.max_new_tokens)
    if cut:
        events.log(f"note: {cut} of {len(rows)} prompts were longer than the context leaves them and keep their end")
    seeds = None if s.seed is None else [derive_seed(s.seed, n) for n in range(len(rows) * samples)]
    engine = Engine(loaded.model, loaded.tokenizer, compile=False)
    events.log(f"eval --reward: {len(rows)} prompts x {samples} on {loaded.ckpt.path}, reference {ref.ckpt.path}")
    return measure(loaded.model, ref.model, engine, rows, ids, scorer, s, samples, seeds,
                   loaded.cfg.generate.batch_size, batch_size or loaded.cfg.eval.batch_size, loaded.tokenizer.pad_id)


def _reference(loaded: Loaded, reference: Optional[Path], device: str, tokenizer: Optional[Path]) -> Loaded:
    """The reference checkpoint: --reference, else the one the run started from (recorded in its checkpoints);
    with --tokenizer, read with that tokenizer too."""
    where = reference or (loaded.ckpt.meta.get("base") or {}).get("path")
    if where is None:
        raise LlmctlError(f"{loaded.ckpt.path} records no starting checkpoint to measure the KL against; pass "
                          "--reference RUN")
    try:
        ref = load_model(where, device, tokenizer=tokenizer)
    except LlmctlError as e:
        raise LlmctlError(f"the reference {where}: {e.message}") from None
    if ref.classifier is not None or ref.tokenizer.sha256 != loaded.tokenizer.sha256:
        raise LlmctlError(f"the reference {ref.ckpt.path} is not a language model with the policy's tokenizer; the KL "
                          "compares their next-token distributions, so pass one that is (--reference RUN)")
    return ref
