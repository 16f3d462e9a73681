"""Rich renderings of the reports for people: the dry run, the table of runs, a comparison of two runs.

The same reports go out as JSON with `--json`; these functions only decide how they look on a terminal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml
from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from .console import fmt_duration


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def fmt_count(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f}"


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _kv_table(title: str, rows: list[tuple[str, str, str]] | list[tuple[str, str]]) -> Table:
    t = Table(title=title, title_justify="left", show_header=False, box=None, pad_edge=False, title_style="bold")
    width = max(len(r) for r in rows) if rows else 2
    t.add_column(style="cyan")
    for _ in range(width - 1):
        t.add_column(justify="right")
    for r in rows:
        t.add_row(*r)
    return t


def plan_lines(kind: str, info: dict) -> list[str]:
    """The two lines a training run starts with: what it trains, and how its global batch is made up
    (`info`: plan.describe)."""
    share = info["trainable_parameters"] / max(1, info["parameters"])
    parts = [f"{info['task']} ({info['method']})",
             f"{info['parameters']:,} parameters, {info['trainable_parameters']:,} trainable ({share:.1%})"]
    if info.get("tokens_per_step"):
        parts.append(f"{info['tokens_per_step']:,} tokens per step")
    parts += [f"{v:,} {k.replace('_', ' ')}" for k, v in info.items() if k.startswith(("train_", "val_"))]
    if "epochs" in info:
        parts.append(f"~{info['epochs']} epochs")
    parts += [info["device"], info["precision"]]
    if info["tp_size"] > 1:  # the ranks of a tensor-parallel group share their micro-batch
        replicas = (f"{info['dp_size']} data-parallel replica{'s' if info['dp_size'] > 1 else ''} "
                    f"({info['world_size']} processes in tensor-parallel groups of {info['tp_size']})")
    else:
        replicas = f"{info['world_size']} process{'es' if info['world_size'] > 1 else ''}"
    unit = f"prompts ({info['group_size']} completions each)" if "group_size" in info else "sequences"  # (GRPO)
    batch = (f"global batch {info['global_batch']:,} {unit} = {info['batch_size']} per device x "
             f"{info['grad_accum']} accumulation x {replicas}"
             + (f" ({info['parallel'].upper()})" if info["parallel"] != "none" else ""))
    return [f"{kind}: " + ", ".join(parts), batch]


def dry_run(report: dict) -> Group:
    """The dry-run report: config, parameters, compute, memory, time, and the sample batch with its loss mask."""
    cfg = report["config"]
    parts = [_dry_run_head(report), _parameters_table(report["parameters"]), _compute_table(report, cfg),
             _memory_table(report, cfg)]
    parts += _time_table(report)
    parts += _sample_batch(report["sample"])
    parts.append(Text("\nresolved config", style="bold"))
    parts.append(Text(yaml.safe_dump(cfg, sort_keys=False).rstrip(), style="dim"))
    return Group(*parts)


def _dry_run_head(report: dict) -> Text:
    head = Text()
    head.append(f"dry run of {report['kind']}", style="bold")
    if report.get("out"):
        exists = " (it holds a run: --resume or --overwrite)" if report.get("out_exists") else ""
        head.append(f": nothing trained, nothing written; the run would go to {report['out']}{exists}")
    head.append("\n")
    head.append(f"device {report['device']}, {report['precision']}\n")
    return head


def _parameters_table(p: dict) -> Table:
    rows = [(k, f"{p.get(k, 0):,}") for k in ("embeddings", "attention", "mlp", "norms")]
    rows.append(("head", "tied to the embedding" if p.get("head_tied") else f"{p.get('head', 0):,}"))
    if p.get("other"):
        rows.append(("other", f"{p['other']:,}"))
    rows.append(("total",
                 f"{p['total']:,}" + (f" ({p['trainable']:,} trainable)" if p["trainable"] != p["total"] else "")))
    return _kv_table("parameters", rows)


def _compute_table(report: dict, cfg: dict) -> Table:
    m, tr = cfg["model"], cfg["train"]
    acc = tr["grad_accum"]
    rows = [
        ("FLOPs per token (training)",
         f"{fmt_count(report['flops_per_token'])} (forward {fmt_count(report['flops_per_token_forward'])})"),
        *([("of which the teacher's forward",
            f"{fmt_count(report['teacher_flops_per_token'])} ({report['teacher_parameters']:,} parameters)")]
          if "teacher_flops_per_token" in report else []),
        ("tokens per optimizer step",
         f"{report['tokens_per_step']:,} ({report['rows_per_batch']} x {m['block_size']}"
         + (f" x {acc} micro-batches)" if acc > 1 else ")")),
        (("train / val tokens", f"{report['train_tokens']:,} / {report['val_tokens']:,} ({report['epochs']} epochs)")
         if "train_tokens" in report else
         _split_row(report, "prompts" if "train_prompts" in report else "examples")),
        ("device peak", f"{fmt_count(report['peak_flops'])}FLOP/s" if report.get("peak_flops") else "unknown"),
        ("peak from", report["peak_flops_source"]),
    ]
    return _kv_table("\ncompute", rows)


def _split_row(report: dict, unit: str) -> tuple[str, str]:
    return (f"train / val {unit}",
            f"{report[f'train_{unit}']:,} / {report[f'val_{unit}']:,} ({report['epochs']} epochs)")


def _memory_table(report: dict, cfg: dict) -> Table:
    m = cfg["model"]
    mem = report["memory"]
    rows = [("weights", fmt_bytes(mem["weights"]), _weight_parts(mem))]
    if mem["adapters"]:
        rows.append(("adapters (LoRA A, B)", fmt_bytes(mem["adapters"]), "trainable"))
    rows += [
        ("gradients", fmt_bytes(mem["gradients"]), ""),
        ("optimizer state (AdamW)", fmt_bytes(mem["optimizer"]), ""),
    ]
    if mem["autocast_copies"]:
        rows.append(("autocast weight copies", fmt_bytes(mem["autocast_copies"]), ""))
    if mem.get("nf4_dequant"):
        rows.append(("NF4 dequantization", fmt_bytes(mem["nf4_dequant"]), "largest NF4 weight, transient"))
    if mem.get("teacher"):
        rows.append(("distillation teacher", fmt_bytes(mem["teacher"]), "weights and its forward pass"))
    on = mem["checkpointing"]
    rows += [
        (f"activations ({report['rows_per_batch']} x {m['block_size']})",
         fmt_bytes(mem["activations_checkpointed" if on else "activations"]),
         f"checkpointing on (off: {fmt_bytes(mem['activations'])})" if on else
         f"with checkpointing {fmt_bytes(mem['activations_checkpointed'])}"),
        ("total", fmt_bytes(mem["needed"]),
         f"(off: {fmt_bytes(mem['total'])})" if on else f"with checkpointing {fmt_bytes(mem['total_checkpointed'])}"),
    ]
    if mem.get("device_capacity"):
        fits = mem.get("fits")
        rows.append(("device memory" if not report.get("memory_for", "").startswith("a CUDA") else "GPU memory",
                     fmt_bytes(mem["device_capacity"]), "fits" if fits else ("does NOT fit" if fits is False else "")))
    return _kv_table(f"\nmemory per device (estimate for {report.get('memory_for', report['device'])})", rows)


def _weight_parts(mem: dict) -> str:
    """Frozen and trainable weights (the adapters have their own row)."""
    if not mem["weights_frozen"]:
        return "all trainable"
    return (f"{fmt_bytes(mem['weights_frozen'])} frozen (NF4 packed where quantized), "
            f"{fmt_bytes(mem['weights_trainable'] + mem['adapters'])} trainable")


def _time_table(report: dict) -> list:
    """The timed steps and what they predict for the run; the error instead when they ran out of memory."""
    tm = report.get("time", {})
    if "error" in tm:
        return [Text(f"\ntime: {tm['error']}", style="red")]
    if not tm:
        return []
    mfu = f", MFU {100 * tm['mfu']:.1f}%" if tm.get("mfu") else ""
    rows = [
        ("per step", f"{tm['step_seconds']:.3f} s", f"{tm['tokens_per_sec']:,.0f} tok/s{mfu}"),
        (f"{tm['steps']:,} steps", fmt_duration(tm["train_seconds"]), ""),
        (f"{tm['evals']} evaluations", fmt_duration(tm["eval_seconds"]), f"{tm['eval_batches']} batches each"),
        ("whole run", fmt_duration(tm["run_seconds"]), "(checkpoint saves not included)"),
    ]
    if tm.get("measured_peak_memory"):
        what = "allocated" if report["device"].startswith("cuda") else "resident growth"
        rows.append((f"measured peak ({what})", fmt_bytes(tm["measured_peak_memory"]), "during the timed steps"))
    title = (f"\ntime (median of {tm['steps_timed']} timed steps after {tm['warmup_steps']} warm-up steps, "
             f"on {report['device']})")
    return [_kv_table(title, rows)]


def _sample_batch(s: dict) -> list[Text]:
    """The first sequence of the sample batch: its title, then its text with the untrained context in ⟦ ⟧."""
    if "label" in s:
        title = Text(f"\nsample batch (step {s['step']}, first sequence): {s['tokens']} tokens, "
                     f"label {s['label']}; "
                     "the classifier reads the text in ⟦ ⟧", style="bold")
    else:
        title = Text(f"\nsample batch (step {s['step']}, first sequence): {s['trained_tokens']} of {s['tokens']} "
                     "targets are trained on; text in ⟦ ⟧ is context only", style="bold")
    text = Text()
    shown = 0
    for span in s["spans"]:
        piece = span["text"]
        if shown + len(piece) > 3000:
            piece = piece[: max(0, 3000 - shown)] + " [...]"
        shown += len(piece)
        if span["trained"]:
            text.append(piece)
        else:
            text.append("⟦" + piece + "⟧", style="dim")
        if shown >= 3000:
            break
    return [title, text]


def runs_table(rows: list[dict], directory: str) -> Table:
    t = Table(title=f"runs in {directory}", title_justify="left", header_style="bold", box=box.SIMPLE_HEAD)
    with_evals = any(r.get("evals") for r in rows)  # the lm-eval column only where some run has results
    for col, just in (("name", "left"), ("status", "left"), ("steps", "right"), ("last\ncheckpoint", "right"),
                      ("best val\nloss", "right"), ("tokens\nseen", "right"), ("tokens/s", "right"),
                      ("lm-eval", "left"))[: 8 if with_evals else 7]:
        t.add_column(col, justify=just, no_wrap=col != "name", overflow="fold")
    colour = {"finished": "green", "running": "cyan", "interrupted": "yellow", "failed": "red", "diverged": "red",
              "crashed": "red"}
    for r in rows:
        status = r["status"] + (f" ({r['detail']})" if r["status"] == "interrupted" and r.get("detail") else "")
        steps = _fmt(r["steps"]) + (f"/{r['max_steps']:,}" if isinstance(r.get("max_steps"), int) else "")
        # the step a resume starts from, beside the last logged one: they differ when a run died between saves
        saved = _fmt(r.get("checkpoint_step"))
        if r.get("checkpoint_step") is not None and r.get("steps") is not None and r["checkpoint_step"] != r["steps"]:
            saved = Text(saved, style="yellow")
        evals = r.get("evals") or {}
        first = next(iter(evals.items()), None)  # one metric shown; `runs compare` and --json have them all
        shown = (f"{first[0].replace(',none', '')} {first[1]:.4g}" + (f" +{len(evals) - 1}" if len(evals) > 1 else "")
                 if first else "-")
        cells = [r["name"], Text(status, style=colour.get(r["status"], "")), steps, saved, _fmt(r["best_val_loss"]),
                 _fmt(r["tokens"]), _fmt(r["tokens_per_sec"], 0) if r["tokens_per_sec"] is not None else "-", shown]
        t.add_row(*cells[: 8 if with_evals else 7])
    return t


def comparison(c: dict) -> Group:
    a, b = Path(c["a"]).name, Path(c["b"]).name
    if a == b:
        a, b = "A", "B"
    head = Text(f"A: {c['a']}\nB: {c['b']}\n") if (a, b) == ("A", "B") else Text("")
    diff = Table(title="config keys that differ", title_justify="left", header_style="bold")
    diff.add_column("key")
    diff.add_column(a)
    diff.add_column(b)
    for d in c["config_diff"]:
        diff.add_row(d["key"], _fmt(d["a"], 6), _fmt(d["b"], 6))
    if not c["config_diff"]:
        diff.add_row("(none)", "", "")
    metrics = Table(title="final metrics", title_justify="left", header_style="bold")
    metrics.add_column("metric")
    metrics.add_column(a, justify="right")
    metrics.add_column(b, justify="right")
    for k in c["metrics"]["a"]:
        digits = 4 if "loss" in k or "/" in k else 1  # (lm-eval metrics are "task/metric")
        metrics.add_row(k, _fmt(c["metrics"]["a"][k], digits), _fmt(c["metrics"]["b"][k], digits))
    return Group(head, diff, Text(""), metrics)


def pruning(r: dict) -> Group:
    """`llmctl prune`: the shape before and after, parameters, calibration loss, and the least important units."""
    t = Table(title=f"prune {r['checkpoint']}" + (" (dry run: nothing written)" if r["out"] is None else ""),
              box=box.SIMPLE_HEAD)
    t.add_column("")
    t.add_column("parent", justify="right")
    t.add_column("pruned", justify="right")
    for key in r["parent"]:
        t.add_row(key, str(r["parent"][key]), str(r["pruned"][key]))
    for key, label in (("parameters", "parameters"), ("parameters_non_embedding", "non-embedding parameters")):
        t.add_row(label, f"{r[key]['before']:,}", f"{r[key]['after']:,}")
    t.add_row("calibration loss", f"{r['calibration_loss']['before']:.4f}", f"{r['calibration_loss']['after']:.4f}")
    rank = r["ranking"]
    lines = [Text("least important first (unit: score)", style="bold")]

    def row(name: str, pairs: list) -> None:
        lines.append(Text(f"  {name}: " + ", ".join(f"{i}: {s:.4g}" for i, s in pairs)))

    row("layers (block influence)", rank["layers"])
    for layer, pairs in rank["heads"].items():
        row(f"layer {layer} heads", pairs)
    for layer, pairs in (rank["kv_groups"] or {}).items():
        row(f"layer {layer} key/value groups", pairs)
    for layer, pairs in rank["mlp_channels"].items():
        row(f"layer {layer} MLP channels", pairs)
    row("embedding channels", rank["embd_channels"])
    if r.get("checkpoint_out"):
        lines.append(Text(f"wrote {r['checkpoint_out']}"))
    return Group(t, *lines)
