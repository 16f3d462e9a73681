"""scripts/bench_serve.py's pure helpers: how its load generator counts streamed tokens (llmctl's events and
llama-server's), its window arithmetic (time to first token, inter-token gaps, usage settling held-back tokens),
and the llama-server command line. No server runs here (the comparison needs the llama-server binary)."""

import asyncio
import importlib.util
import json
import os

import pytest

from conftest import ROOT
from llmctl import openai_api as api


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "scripts" / "bench_serve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ours(obj: dict) -> bytes:  # what llmctl's server sends (llmctl/server.py _sse)
    return f"data: {json.dumps(obj, ensure_ascii=False)}".encode()


def theirs(obj: dict) -> bytes:  # llama-server: nlohmann's compact dump
    return ("data: " + json.dumps(obj, separators=(",", ":"))).encode()


def test_events_count_text_pieces_and_usage_settles_the_total(bench):
    piece = api.chunk("completion", "r", "m", 0, 0, "Romeo")
    close = api.chunk("completion", "r", "m", 0, 0, None, "length")
    assert bench.event_tokens(ours(piece)) == (1, None)
    assert bench.event_tokens(ours(close)) == (0, None)
    assert bench.event_tokens(ours(api.usage_chunk("completion", "r", "m", 0, 16, 128))) == (0, 128)
    # llama-server: text pieces, then one closing chunk with empty text and the usage
    assert bench.event_tokens(theirs({"choices": [{"text": " art", "index": 0, "finish_reason": None}]})) == (1, None)
    final = {"choices": [{"text": "", "index": 0, "finish_reason": "length"}],
             "usage": {"completion_tokens": 128, "prompt_tokens": 16, "total_tokens": 144}}
    assert bench.event_tokens(theirs(final)) == (0, 128)


def test_window_counts_tokens_gaps_and_tokens_held_back(bench):
    """Two clients, each request: three text events 10 ms apart (one of them carries two tokens: the server held
    one back), then usage 4; requests keep coming until the window closes."""
    async def one(body, deadline, seen):
        t = bench.time.perf_counter()
        assert body["stream_options"] == {"include_usage": True} and body["ignore_eos"] is True
        for k in range(3):
            seen(t + 0.5 + 0.01 * k, theirs({"choices": [{"text": "ab"[k % 2], "index": 0}]}))
        seen(t + 0.53, theirs({"choices": [{"text": "", "index": 0}], "usage": {"completion_tokens": 4}}))
        await asyncio.sleep(0.02)

    out = asyncio.run(bench._window(2, 0.1, [[1, 2]], one, (), {"ignore_eos": True, "max_tokens": 4}))
    assert out["completed"] >= 2 and out["completed_short"] == 0
    assert out["tokens_per_s"] == pytest.approx(4 * out["completed"] / 0.1)
    assert out["ttft_p50_s"] == pytest.approx(0.5, abs=0.01)
    assert out["itl_p50_s"] == pytest.approx(0.01, abs=1e-6) and out["itl_p99_s"] == pytest.approx(0.01, abs=1e-6)


def test_llama_server_command_line(bench, tmp_path):
    args = bench.llama_server_args("/x/llama-server", tmp_path / "m.gguf", 8080, 16, 2, 1024)
    flag = {a: b for a, b in zip(args, args[1:]) if a.startswith("-")}
    assert args[0] == "/x/llama-server" and "--cont-batching" in args
    assert flag["--parallel"] == "16" and flag["--threads"] == "2" and flag["-c"] == str(16 * 1024)
    assert bench.pct([1.0, 2.0, 3.0, 4.0], 0.5) == 3.0 and bench.pct([], 0.99) is None
    assert bench.proc_cpu_s(os.getpid()) > 0


def test_a_peer_only_run_adds_its_comparison_beside_the_files_rows(bench):
    old = {"cpu": "old cpu", "history": [1], "models": [{"model": "gpt2-124M", "rows": [{"clients": 1}]},
                                                        {"model": "shakespeare-bpe", "rows": []}]}
    new = {"cpu": "new cpu", "cores": 2, "torch": "t", "python": "p", "prompt_tokens": 16, "new_tokens": 128,
           "seconds": 12, "rounds": 2, "client": "raw", "http": "h",
           "models": [{"model": "gpt2-124M", "checkpoint": "c", "vs_llama_server": {"rows": [{"clients": 4}]}}]}
    merged = bench.with_peer_rows(old, new)
    gpt2, bpe = merged["models"]
    assert gpt2["rows"] == [{"clients": 1}] and bpe["model"] == "shakespeare-bpe" and merged["history"] == [1]
    assert gpt2["vs_llama_server"]["rows"] == [{"clients": 4}] and merged["cpu"] == "old cpu"
    assert gpt2["vs_llama_server"]["run"]["cpu"] == "new cpu"
