"""The server's counters, gauges and histograms, written in Prometheus' text exposition format (version 0.0.4).

A few dozen lines instead of the prometheus_client dependency: the server needs three metric kinds, one process,
no registry and no push gateway. Updates come from the engine thread and the HTTP thread; a lock keeps each one
whole.
"""

from __future__ import annotations

import bisect
import threading
from typing import Callable, Optional

PREFIX = "llmctl_"


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    def esc(v: str) -> str:
        return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in sorted(labels.items())) + "}"


def _number(v: float) -> str:
    """A sample's value in full (a byte count past a million stays exact): an integer without a fraction."""
    v = float(v)
    return str(int(v)) if v.is_integer() else repr(v)


class Metrics:
    """Counters (by label set), gauges read when scraped, and histograms with fixed buckets."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}  # name -> (type, help)
        self._counters: dict[str, dict[tuple, float]] = {}
        self._gauges: dict[str, Callable[[], float]] = {}
        self._hist: dict[str, tuple[list[float], list[int], list[float]]] = {}  # bounds, counts, [sum, count]

    def counter(self, name: str, help: str, read: Optional[Callable[[], float]] = None) -> None:
        """A counter incremented with `inc`, or, with `read`, one that something else counts (read when scraped)."""
        self._help[name] = ("counter", help)
        self._counters[name] = {}
        if read is not None:
            self._gauges[name] = read

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        self._help[name] = ("gauge", help)
        self._gauges[name] = read

    def histogram(self, name: str, help: str, buckets: list[float]) -> None:
        self._help[name] = ("histogram", help)
        self._hist[name] = (sorted(buckets), [0] * len(buckets), [0.0, 0])

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._counters[name]
            series[key] = series.get(key, 0.0) + amount

    def observe(self, name: str, value: float) -> None:
        bounds, counts, total = self._hist[name]
        with self._lock:
            i = bisect.bisect_left(bounds, value)
            if i < len(counts):
                counts[i] += 1
            total[0] += value
            total[1] += 1

    def value(self, name: str, **labels: str) -> float:
        """A counter's current value (tests and the server's own summary read it)."""
        if name in self._gauges:
            return float(self._gauges[name]())
        return self._counters[name].get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for name, (kind, help) in self._help.items():
                full = PREFIX + name
                lines += [f"# HELP {full} {help}", f"# TYPE {full} {kind}"]
                if kind == "counter" and name in self._gauges:
                    lines.append(f"{full} {_number(self._gauges[name]())}")
                elif kind == "counter":
                    for key, v in sorted(self._counters[name].items()):
                        lines.append(f"{full}{_labels(dict(key))} {_number(v)}")
                elif kind == "gauge":
                    lines.append(f"{full} {_number(self._gauges[name]())}")
                else:
                    bounds, counts, (s, n) = self._hist[name]
                    running = 0
                    for b, c in zip(bounds, counts):
                        running += c
                        lines.append(f'{full}_bucket{{le="{b:g}"}} {running}')
                    lines += [f'{full}_bucket{{le="+Inf"}} {n}', f"{full}_sum {s:.6g}", f"{full}_count {n}"]
        return "\n".join(lines) + "\n"


def parse(text: str) -> dict[str, float]:
    """Samples of an exposition text as {"name{labels}": value} (what tests and benchmarks read back)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
