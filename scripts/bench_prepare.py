#!/usr/bin/env python
"""Data preparation at scale, side by side: `llmctl prepare` vs a hand-written reference, same tokenizer.json.

The reference is what a careful engineer writes by hand: stream the corpus through `tokenizers`' `encode_batch`
into one flat uint16 file (a .txt in 4 MB blocks cut after a newline with a non-space character on both sides, so
the tokens are the whole file's; JSONL and parquet rows as documents joined by <eos>). Each side runs in its own
process, back to back, on a cold token cache, with the load average printed; peak memory is the largest sum of
anonymous resident memory (RssAnon: memory-mapped file pages not counted) over the whole process tree, sampled
every 50 ms. The token files must be identical (sha256 of llmctl's shards concatenated against the reference's
file).

Then: `prepare` of the 200 MB .txt killed (SIGKILL) at a random moment and run again (it must resume and give the
same shards), and `pretrain` on the prepared corpora (cache hit: seconds to the first step, peak memory).

Corpora (generated under --work, never committed): Tiny Shakespeare repeated to SIZE as .txt, as .jsonl (a
paragraph a row) and as a folder of 8 parquet shards; and "real" text of the same size built from the Python
sources and documentation on this machine (a realistic vocabulary: its distinct-word count is reported). The BPE
tokenizer (4096 tokens) is trained once per corpus by `llmctl prepare` (timed, with its peak memory, and stopped once
the tokenizer is saved) and then given to both sides as tokenizer.path. Figures go to benchmarks/prepare.json.

    python scripts/bench_prepare.py --size-mb 200                # the 200 MB cases (.txt BPE: 3 alternating rounds)
    python scripts/bench_prepare.py --size-mb 200 --big-mb 2000  # and the 2 GB .txt BPE case (about an hour in all)
    python scripts/bench_prepare.py --big-mb 2000 --only-big    # only the 2 GB case, added to the figures there
    python scripts/bench_prepare.py --size-mb 20 --rounds 1      # a quick look
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


# ------------------------------------------------------------------------------------------------------------------
# The reference


def line_cut(text: str) -> int:
    """The last newline with a non-space character on both sides (where the byte-level regex cannot differ)."""
    i = text.rfind("\n", 0, len(text) - 1)
    while i != -1 and (i == 0 or text[i - 1].isspace() or text[i + 1].isspace()):
        i = text.rfind("\n", 0, i)
    return i + 1 if i != -1 else -1


def reference(kind: str, path: str, tokenizer: str, out: str) -> None:
    import numpy as np
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(tokenizer)
    eos = tk.token_to_id("<eos>")
    f_out = open(out, "wb")

    def write(batch: list[str], docs: bool, first: list[bool]) -> None:
        for enc in tk.encode_batch(batch, add_special_tokens=False):
            ids = enc.ids
            if docs:
                if not ids:
                    continue
                if not first[0]:
                    ids = [eos] + ids
                first[0] = False
            np.asarray(ids, dtype=np.uint16).tofile(f_out)

    first = [True]
    if kind == "txt":
        with open(path, encoding="utf-8", newline="") as f:  # (newline="": \r\n stays as it is in the file)
            carry, batch = "", []
            while True:
                block = f.read(4 << 20)
                text = carry + block
                if not block:
                    batch.append(text)
                    break
                cut = line_cut(text)
                if cut <= 0:
                    carry = text
                    continue
                pieces, carry = text[:cut], text[cut:]
                batch.append(pieces)
                if len(batch) >= 2:
                    write(batch, False, first)
                    batch = []
            write(batch, False, first)
    elif kind == "jsonl":
        with open(path, encoding="utf-8") as f:
            batch: list[str] = []
            for line in f:
                if line.strip():
                    batch.append(json.loads(line)["text"] or "")
                if len(batch) >= 4096:
                    write(batch, True, first)
                    batch = []
            write(batch, True, first)
    else:  # a folder of parquet shards
        import pyarrow.parquet as pq

        for shard in sorted(Path(path).glob("*.parquet")):
            for rb in pq.ParquetFile(shard).iter_batches(columns=["text"], batch_size=4096):
                write([t or "" for t in rb.column(0).to_pylist()], True, first)
    f_out.close()


# ------------------------------------------------------------------------------------------------------------------
# Measuring


def tree_anon_kb(pid: int) -> int:
    """RssAnon summed over `pid` and all its descendants (kB)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1])
            for t in Path(f"/proc/{p}/task").iterdir():
                kids = (t / "children").read_text().split()
                todo += [int(k) for k in kids]
        except (OSError, ValueError):
            continue
    return total


def run(cmd: list[str], until: str | None = None) -> dict:
    """Run `cmd`, sampling its process tree's anonymous memory; with `until`, stop it (SIGKILL) at the first stderr
    line containing that text (its wall time is then up to that line)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, err_lines, out = [0], [], []

    def sample() -> None:
        while p.poll() is None:
            peak[0] = max(peak[0], tree_anon_kb(p.pid))
            time.sleep(0.05)

    def read_out() -> None:
        out.append(p.stdout.read())

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    to = threading.Thread(target=read_out, daemon=True)
    to.start()
    stopped = False
    for line in p.stderr:
        err_lines.append(line)
        if until and until in line:
            wall = time.perf_counter() - t0
            p.kill()
            stopped = True
            break
    p.wait()
    th.join()
    to.join()
    err = "".join(err_lines)
    if not stopped:
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"failed: {' '.join(cmd)}\n{err[-3000:]}")
    return {"wall_s": wall, "peak_anon_mb": peak[0] / 1024, "stdout": "".join(out), "stderr": err}


def sha_of(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def kill_and_resume(llmctl: list[str], corpus: Path, tok_file: Path, cache: Path, whole: str, wall: float) -> dict:
    """SIGKILL `prepare` at a random moment (seeded: 20-80% of an uninterrupted run's time), run the same command
    again: it must say where it resumes, and its shards must hash as the uninterrupted run's."""
    import random
    import signal

    cmd = [*llmctl, "prepare", "--set", f"data.path={corpus}", "--set", f"tokenizer.path={tok_file}",
           "--set", f"data.cache_dir={cache}", "--json"]
    at = random.Random(0).uniform(0.2, 0.8) * wall
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(at)
    p.send_signal(signal.SIGKILL)
    p.wait()
    again = run(cmd)
    manifest = json.loads(again["stdout"])
    said = [x for x in again["stderr"].splitlines() if "resuming" in x]
    same = sha_of([Path(manifest["cache"]) / s for s in manifest["shards"]]) == whole
    print(f"SIGKILL after {at:.1f}s, then again: {said[0] if said else 'no resume line'}; "
          f"{again['wall_s']:.1f}s; identical={same}", flush=True)
    subprocess.run(["rm", "-rf", str(cache)])
    return {"killed_after_s": at, "resume_line": said[0] if said else None, "rerun_wall_s": again["wall_s"],
            "identical_to_uninterrupted": same}


def pretrain_start(llmctl: list[str], cache: Path, tok_file: Path, corpus: Path, work: Path) -> dict:
    """`llmctl pretrain` on a prepared corpus (cache hit): seconds from the command's start to its first step (its
    first line in metrics.jsonl) and its peak anonymous memory, which must not grow with the corpus."""
    out = work / "pretrain-run"
    metrics = out / "metrics.jsonl"
    model = ["model.arch=llama", "model.n_layer=4", "model.n_head=4", "model.n_embd=256", "model.block_size=128"]
    settings = [*model, f"data.path={corpus}", f"tokenizer.path={tok_file}", f"data.cache_dir={cache}",
                "train.batch_size=16", "train.max_steps=5", "train.eval_batches=1", "train.log_interval=1"]
    cmd = [*llmctl, "pretrain", *[x for k in settings for x in ("--set", k)], "--out", str(out), "--overwrite"]
    first = [None]
    t0 = time.perf_counter()

    def watch() -> None:
        while first[0] is None and time.perf_counter() - t0 < 600:
            if metrics.exists() and metrics.read_text().strip():
                first[0] = time.perf_counter() - t0
            time.sleep(0.02)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    r = run(cmd)
    th.join()
    hit = "cache miss" not in r["stderr"]
    print(f"pretrain on {corpus.name}: first step {first[0]:.1f}s after start (cache hit={hit}), peak "
          f"{r['peak_anon_mb']:.0f} MB, wall {r['wall_s']:.1f}s", flush=True)
    subprocess.run(["rm", "-rf", str(out)])
    return {"corpus": corpus.name, "bytes": corpus.stat().st_size, "cache_hit": hit, "first_step_s": first[0],
            "peak_anon_mb": r["peak_anon_mb"], "wall_s": r["wall_s"]}


# ------------------------------------------------------------------------------------------------------------------
# Corpora


def shakespeare_txt(path: Path, mb: int) -> Path:
    if not path.exists():
        text = SHAKESPEARE.read_text()
        with open(path, "w") as f:
            for _ in range(mb * 1_000_000 // len(text) + 1):
                f.write(text)
    return path


def real_txt(path: Path, mb: int) -> tuple[Path, int]:
    """Python sources and docs on this machine (the standard library, then site-packages), to `mb` megabytes."""
    if not path.exists():
        roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"]), Path("/usr/share/doc")]
        need, parts = mb * 1_000_000, []
        with open(path, "w", encoding="utf-8") as f:
            while need > 0:  # loop over the files again if they are fewer than asked
                for root in roots:
                    for g in sorted(root.rglob("*")):
                        if need <= 0:
                            break
                        if g.suffix in (".py", ".md", ".rst", ".txt") and g.is_file():
                            try:
                                t = g.read_text(encoding="utf-8")
                            except (OSError, UnicodeDecodeError):
                                continue
                            f.write(t + "\n")
                            need -= len(t.encode()) + 1
                    parts.append(root)
    words: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for _ in range(200_000):  # distinct words of the first 200k lines (a set of all would be large)
            line = f.readline()
            if not line:
                break
            words.update(line.split())
    return path, len(words)


def as_jsonl(txt: Path, path: Path) -> Path:
    if not path.exists():
        text = txt.read_text()
        with open(path, "w") as f:
            for para in text.split("\n\n"):
                if para.strip():
                    f.write(json.dumps({"text": para}) + "\n")
    return path


def as_parquet(jsonl: Path, folder: Path, shards: int = 8) -> Path:
    if not folder.exists():
        import pyarrow as pa
        import pyarrow.parquet as pq

        folder.mkdir()
        rows = [json.loads(x)["text"] for x in jsonl.read_text().splitlines()]
        per = len(rows) // shards + 1
        for i in range(shards):
            pq.write_table(pa.table({"text": rows[i * per:(i + 1) * per]}), folder / f"part-{i:03d}.parquet")
    return folder


# ------------------------------------------------------------------------------------------------------------------


def save(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--big-mb", type=int, default=0, help="also the .txt BPE case at this size (0: skip)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the .txt BPE case")
    ap.add_argument("--only-big", action="store_true", help="run only the --big-mb case, added to --out's figures")
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmctl-bench-prepare"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "prepare.json")
    ap.add_argument("--reference", nargs=4, metavar=("KIND", "PATH", "TOKENIZER", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.reference:
        reference(*args.reference)
        return
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    mb = args.size_mb
    previous = {}
    if args.only_big:  # the big case added to the figures already in --out
        if not args.big_mb:
            raise SystemExit("--only-big needs --big-mb")
        previous = json.loads(args.out.read_text()) if args.out.exists() else {}
        txt, real, distinct, cases = None, None, None, []
    else:
        txt = shakespeare_txt(work / f"shakespeare-{mb}mb.txt", mb)
        jsonl = as_jsonl(txt, work / f"shakespeare-{mb}mb.jsonl")
        pq_dir = as_parquet(jsonl, work / f"shakespeare-{mb}mb-parquet")
        real, distinct = real_txt(work / f"real-{mb}mb.txt", mb)
        cases = [("txt", txt, "bpe", args.rounds), ("txt", txt, "char", 1), ("jsonl", jsonl, "bpe", 1),
                 ("jsonl", jsonl, "char", 1), ("parquet", pq_dir, "bpe", 1), ("parquet", pq_dir, "char", 1),
                 ("txt", real, "bpe", 1)]
    if args.big_mb:
        cases.append(("txt", shakespeare_txt(work / f"shakespeare-{args.big_mb}mb.txt", args.big_mb), "bpe", 1))
    llmctl = [sys.executable, "-m", "llmctl"]
    results = list(previous.get("cases", []))
    tokenizers: dict = {}
    kept: dict = {}  # corpus -> (its token cache, tokenizer, sha256 of its shards)
    print(f"load average before: {os.getloadavg()}", flush=True)
    for kind, path, tok_kind, rounds in cases:
        name = f"{path.name} {tok_kind}"
        tok_key = (str(path), tok_kind)
        if tok_key not in tokenizers:  # train the tokenizer once (timed): llmctl's own BPE training at scale
            cache = work / f"cache-tok-{len(tokenizers)}"
            r = run([*llmctl, "prepare", "--set", f"data.path={path}", "--set", f"tokenizer.kind={tok_kind}",
                     "--set", "tokenizer.vocab_size=4096", "--set", f"data.cache_dir={cache}", "--json"],
                    until="(cache miss)")  # (stopped once the tokenizer is trained and saved)
            tok_file = next((cache / "tokenizers").glob("*/tokenizer.json"))
            tokenizers[tok_key] = (tok_file, r)
            print(f"{name}: tokenizer {r['wall_s']:.1f}s, peak {r['peak_anon_mb']:.0f} MB", flush=True)
        tok_file, first = tokenizers[tok_key]
        rows = []
        for i in range(rounds):
            load = os.getloadavg()
            cache = work / f"cache-run-{os.getpid()}-{len(results)}-{i}"
            ours = run([*llmctl, "prepare", "--set", f"data.path={path}", "--set", f"tokenizer.path={tok_file}",
                        "--set", f"data.cache_dir={cache}", "--json"])
            ref_out = work / "reference.bin"
            ref = run([sys.executable, __file__, "--reference", kind, str(path), str(tok_file), str(ref_out)])
            manifest = json.loads(ours["stdout"])
            shard_files = [Path(manifest["cache"]) / s for s in manifest["shards"]]
            tokens = manifest["train_tokens"] + manifest["val_tokens"]
            same = sha_of(shard_files) == sha_of([ref_out])
            row = {"load_average": load, "llmctl_wall_s": ours["wall_s"], "reference_wall_s": ref["wall_s"],
                   "llmctl_peak_anon_mb": ours["peak_anon_mb"], "reference_peak_anon_mb": ref["peak_anon_mb"],
                   "tokens": tokens, "identical_tokens": same, "shards": len(shard_files)}
            rows.append(row)
            print(f"{name} round {i + 1}: llmctl {ours['wall_s']:.1f}s {ours['peak_anon_mb']:.0f} MB | reference "
                  f"{ref['wall_s']:.1f}s {ref['peak_anon_mb']:.0f} MB | {tokens:,} tokens, identical={same} "
                  f"| load {load[0]:.2f}", flush=True)
            ref_out.unlink()
            if kind == "txt" and tok_kind == "bpe" and path != real and i == rounds - 1:
                kept[path] = (cache, tok_file, sha_of(shard_files))  # for the resume and pretraining checks
            else:
                subprocess.run(["rm", "-rf", str(cache)])
        med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
        results.append({
            "corpus": path.name, "format": kind, "tokenizer": tok_kind, "bytes": sum(
                f.stat().st_size for f in ([path] if path.is_file() else path.glob("*.parquet"))),
            "rounds": rounds, "tokens": rows[0]["tokens"], "shards": rows[0]["shards"],
            "llmctl_wall_s": med("llmctl_wall_s"), "reference_wall_s": med("reference_wall_s"),
            "llmctl_tokens_per_s": rows[0]["tokens"] / med("llmctl_wall_s"),
            "reference_tokens_per_s": rows[0]["tokens"] / med("reference_wall_s"),
            "speed_vs_reference": med("reference_wall_s") / med("llmctl_wall_s"),
            "llmctl_peak_anon_mb": max(r["llmctl_peak_anon_mb"] for r in rows),
            "reference_peak_anon_mb": max(r["reference_peak_anon_mb"] for r in rows),
            "identical_tokens": all(r["identical_tokens"] for r in rows),
            "tokenizer_training_s": first["wall_s"] if tok_kind == "bpe" else None,
            "tokenizer_training_peak_anon_mb": first["peak_anon_mb"] if tok_kind == "bpe" else None,
            "distinct_words_first_200k_lines": distinct if path == real else None,
            "rows": rows,
        })
        save(args.out, {"cpu_count": os.cpu_count(), "cases": results})  # (after every case: a stopped run keeps them)
    if txt is not None:
        cache, tok_file, whole = kept[txt]
        resume = kill_and_resume(llmctl, txt, tok_file, work / "cache-killed", whole, results[0]["llmctl_wall_s"])
    else:
        resume = previous.get("sigkill_resume")
    starts = previous.get("pretrain_start", []) + [pretrain_start(llmctl, c, t, f, work) for f, (c, t, _) in
                                                   kept.items()]
    for c, _, _ in kept.values():
        subprocess.run(["rm", "-rf", str(c)])
    save(args.out, {"cpu_count": os.cpu_count(), "cases": results, "sigkill_resume": resume, "pretrain_start": starts})
    print(f"\n{'corpus':32s} {'tok':5s} {'tokens':>12s} {'llmctl tok/s':>13s} {'ref tok/s':>11s} {'ratio':>6s} "
          f"{'llmctl MB':>9s} {'ref MB':>7s} same")
    for r in results:
        print(f"{r['corpus']:32s} {r['tokenizer']:5s} {r['tokens']:12,d} {r['llmctl_tokens_per_s']:13,.0f} "
              f"{r['reference_tokens_per_s']:11,.0f} {r['speed_vs_reference']:6.2f} {r['llmctl_peak_anon_mb']:9.0f} "
              f"{r['reference_peak_anon_mb']:7.0f} {r['identical_tokens']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
