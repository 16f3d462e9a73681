"""`llmctl plot`: training and validation loss against tokens seen, for one or more runs on one chart.

matplotlib is an optional extra (`pip install 'llmctl[plot]'`); without it the command exits 2 with that hint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .errors import LlmctlError
from .rundir import read_metrics
from .runs import require_run


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise LlmctlError("llmctl plot needs matplotlib: pip install 'llmctl[plot]'") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _short(x: float) -> str:
    """Axis label for a token count: 0, 500, 250k, 1.5M, 2B."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:g}{unit}"
    return f"{x:g}"


def plot(runs: list[Path], out: Path, title: Optional[str] = None, log_x: bool = False) -> dict:
    """Draw every run's train loss (line) and validation loss (dashed, markers) in one colour; save to `out`."""
    if not runs:
        raise LlmctlError("give at least one run directory to plot")
    dirs = [require_run(Path(r)) for r in runs]
    series = []
    for d in dirs:
        rows = read_metrics(d)
        train = [(r["tokens"], r["loss"]) for r in rows if "loss" in r and "tokens" in r]
        val = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r and "tokens" in r]
        if not train and not val:
            raise LlmctlError(f"{d}/metrics.jsonl has no loss to plot yet")
        series.append((d, train, val))
    out = Path(out)
    if out.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise LlmctlError(f"-o {out}: the file name must end in .png, .svg or .pdf")
    if not out.parent.exists():
        raise LlmctlError(f"-o {out}: the folder {out.parent} does not exist")
    plt = _pyplot()
    names = [d.name for d in dirs]
    if len(set(names)) < len(names):  # same leaf names from different folders: show more of the path
        names = [str(d) for d in dirs]
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=100)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, ((d, train, val), name) in enumerate(zip(series, names)):
        c = colors[i % len(colors)]
        if train:
            ax.plot([t for t, _ in train], [v for _, v in train], color=c, lw=1.5, label=f"{name} train")
        if val:
            ax.plot([t for t, _ in val], [v for _, v in val], color=c, lw=1.4, ls="--", marker="o", ms=4,
                    label=f"{name} val")
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _short(x)))
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats per token)")
    if log_x:
        ax.set_xscale("log")
    ax.set_title(title or ("loss: " + ", ".join(names)))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return {"output": str(out), "runs": [str(d) for d in dirs],
            "points": sum(len(t) + len(v) for _, t, v in series)}
