"""Documents of the local lm-eval tasks, built from Tiny Shakespeare (../shared/data beside the project; nothing is
copied into the tree). Deterministic: the same documents on every machine."""

import random
from pathlib import Path

import datasets

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare.txt"


def _lines() -> list[str]:
    return [x for x in CORPUS.read_text(encoding="utf-8").splitlines() if len(x.split()) >= 4]


def next_line(**kwargs) -> dict:
    """Which of four lines follows a two-line passage (the real one and three from elsewhere in the plays)."""
    lines, rng, docs = _lines(), random.Random(0), []
    for i in range(60):
        k = 200 + i * 311
        others = [lines[(k + 5000 + 977 * j) % len(lines)] for j in range(3)]
        choices = others + [lines[k + 2]]
        rng.shuffle(choices)
        docs.append({"passage": lines[k] + "\n" + lines[k + 1] + "\n", "choices": choices,
                     "answer": choices.index(lines[k + 2])})
    return {"test": datasets.Dataset.from_list(docs)}


def complete_line(**kwargs) -> dict:
    """The rest of a line, given the line before it and the line's first three words."""
    lines, docs = _lines(), []
    for i in range(60):
        k = 150 + i * 263
        words = lines[k + 1].split(" ")
        docs.append({"context": lines[k] + "\n" + " ".join(words[:3]), "target": " " + " ".join(words[3:])})
    return {"test": datasets.Dataset.from_list(docs)}


def paragraphs(**kwargs) -> dict:
    """Whole speeches (blank-line separated), for loglikelihood_rolling."""
    text = CORPUS.read_text(encoding="utf-8")
    speeches = [s for s in text.split("\n\n") if len(s) > 300][:40]
    return {"test": datasets.Dataset.from_list([{"text": s} for s in speeches])}


def short_paragraphs(**kwargs) -> dict:
    """Short speeches (one rolling window of a 96-token context even with a small BPE), for loglikelihood_rolling
    through an OpenAI-compatible server, whose prompt must fit the context."""
    text = CORPUS.read_text(encoding="utf-8")
    speeches = [s for s in text.split("\n\n") if 60 < len(s) < 160][:24]
    return {"test": datasets.Dataset.from_list([{"text": s} for s in speeches])}
