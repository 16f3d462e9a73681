import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SHAKESPEARE, Recorder, disk_fills_on_second_shard
from llmctl.config import DataConfig, TokenizerConfig
from llmctl.data import LMBatches, eval_blocks, prepare, resolve_source
from llmctl.errors import LlmctlError


def data_cfg(tmp_path, path, **kw) -> DataConfig:
    return DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), **kw)


def test_shakespeare_split_matches_nanogpt(tmp_path):
    td = prepare(data_cfg(tmp_path, SHAKESPEARE), TokenizerConfig(kind="char"))
    # nanoGPT's prepare.py: 65 characters, the first 90% train, the last 10% val
    assert td.tokenizer.vocab_size == 65 + 3
    assert len(td.train) == 1_003_854 and len(td.val) == 111_540
    text = SHAKESPEARE.read_text()
    assert td.tokenizer.decode(td.train[:200].tolist()) == text[:200]
    assert td.tokenizer.decode(td.val[-100:].tolist()) == text[-100:]
    assert td.train.dtype == np.uint16


def test_prepare_and_its_help_start_without_torch(tmp_path):
    """`llmctl prepare` never loads torch (seconds of start-up): the data package makes tensors only in the
    functions that batch, and imports torch there."""
    import re
    import subprocess
    import sys

    (tmp_path / "c.txt").write_text("hello world\n" * 50)
    for args in (["--help"], ["--set", f"data.path={tmp_path / 'c.txt'}", "--set", "tokenizer.kind=char",
                              "--set", f"data.cache_dir={tmp_path / 'cache'}"]):
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "llmctl", "prepare", *args],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        loaded = [line for line in r.stderr.splitlines() if re.search(r"\|\s*torch(\.|$)", line)]
        assert not loaded, (args, loaded[:3])
    assert list((tmp_path / "cache" / "tokens").glob("*/manifest.json"))  # (the second one did prepare)


def test_cache_is_reused_and_keyed_by_content(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("hello world\n" * 200)
    events = Recorder()
    first = prepare(data_cfg(tmp_path, src), TokenizerConfig(), events=events)
    second = prepare(data_cfg(tmp_path, src), TokenizerConfig(), events=events)
    misses = lambda: [x for x in events.logs if "(cache miss)" in x]  # noqa: E731
    assert first.dir == second.dir and len(misses()) == 1  # tokenized once
    src.write_text("goodbye world\n" * 200)  # new content -> new cache entry
    third = prepare(data_cfg(tmp_path, src), TokenizerConfig(), events=events)
    assert third.dir != first.dir and len(misses()) == 2


def test_formats_and_documents_joined_with_eos(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in ["one\ntwo", "three"]) + "\n")
    (tmp_path / "d.csv").write_text('body\n"one\ntwo"\nthree\n')
    (tmp_path / "d.tsv").write_text("body\tx\none\t1\nthree\t2\n")
    for name in ("d.jsonl", "d.csv", "d.tsv"):
        td = prepare(data_cfg(tmp_path, tmp_path / name, text_column="body", val_fraction=0.0), TokenizerConfig())
        ids = td.train.tolist()
        assert ids.count(td.tokenizer.eos_id) == 1, name  # two documents, one separator
        assert td.tokenizer.decode(ids, skip_special=False).endswith("<eos>three"), name


def test_folder_of_text_files_keeps_line_breaks(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text("line one\nline two\n")
    (d / "b.txt").write_text("other\n")
    td = prepare(data_cfg(tmp_path, d, val_fraction=0.0), TokenizerConfig())
    assert td.tokenizer.decode(td.train.tolist(), skip_special=False) == "line one\nline two\n<eos>other\n"


def test_parquet(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["alpha beta", "gamma"]}).to_parquet(str(tmp_path / "d.parquet"))
    td = prepare(data_cfg(tmp_path, tmp_path / "d.parquet", val_fraction=0.0), TokenizerConfig())
    assert td.tokenizer.decode(td.train.tolist()) == "alpha betagamma"


def test_errors(tmp_path):
    with pytest.raises(LlmctlError, match="does not exist"):
        resolve_source(str(tmp_path / "nope.txt"), DataConfig())
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(LlmctlError, match="empty"):
        prepare(data_cfg(tmp_path, tmp_path / "empty.txt"), TokenizerConfig())
    (tmp_path / "d.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(LlmctlError, match="no column 'text'.*body"):
        prepare(data_cfg(tmp_path, tmp_path / "d.jsonl"), TokenizerConfig())


@pytest.fixture
def http_server(tmp_path):
    """Serve tmp_path over HTTP on loopback, as a stand-in for a remote corpus."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_url_downloaded_once_and_checked_against_sha256(tmp_path, http_server):
    import hashlib

    src = tmp_path / "remote.txt"
    src.write_text("some text to learn from\n" * 50)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    cfg = data_cfg(tmp_path, f"{http_server}/remote.txt", sha256=digest)
    td = prepare(cfg, TokenizerConfig())
    assert td.tokenizer.decode(td.train[:9].tolist()) == "some text"
    src.unlink()  # the cached copy is reused, no second download
    assert prepare(cfg, TokenizerConfig()).dir == td.dir
    (tmp_path / "other.txt").write_text("different")
    with pytest.raises(LlmctlError, match="sha256"):
        prepare(data_cfg(tmp_path, f"{http_server}/other.txt", sha256="0" * 64), TokenizerConfig())
    with pytest.raises(LlmctlError, match="could not download"):
        prepare(data_cfg(tmp_path, f"{http_server}/missing.txt"), TokenizerConfig())


def test_batches_are_a_function_of_seed_and_step_and_split_by_rank():
    tokens = np.arange(10_000, dtype=np.uint16)
    one = LMBatches(tokens, 8, batch_size=4, grad_accum=2, seed=7)
    again = LMBatches(tokens, 8, batch_size=4, grad_accum=2, seed=7)
    assert all(torch_equal(a, b) for a, b in zip(one.get(3), again.get(3)))
    b = one.get(3)[0]
    assert (b["labels"][:, :-1] == b["input_ids"][:, 1:]).all()
    # two ranks with half the batch see exactly the rows of the one-rank global batch
    r0 = LMBatches(tokens, 8, batch_size=2, grad_accum=2, seed=7, rank=0, world_size=2)
    r1 = LMBatches(tokens, 8, batch_size=2, grad_accum=2, seed=7, rank=1, world_size=2)
    single = LMBatches(tokens, 8, batch_size=4, grad_accum=2, seed=7)
    assert sorted(single.offsets(5).ravel()) == sorted(np.concatenate([r0.offsets(5)[:, 0].ravel(),
                                                                       r1.offsets(5)[:, 1].ravel()]))


def torch_equal(a, b) -> bool:
    return all((a[k] == b[k]).all() for k in a)


def test_document_rows_start_at_a_document_and_carry_its_segments():
    from llmctl.data.batches import segments

    tokens = np.arange(1000, dtype=np.uint16)
    starts = np.array([0, 5, 9, 30, 400])  # documents of 5, 4, 21, 370 and 600 tokens
    b = LMBatches(tokens, 8, batch_size=64, grad_accum=1, seed=3, starts=starts)
    offsets = b.offsets(0).ravel()
    plain = LMBatches(tokens, 8, batch_size=64, grad_accum=1, seed=3).offsets(0).ravel()
    doc = starts[np.searchsorted(starts, plain, side="right") - 1]
    assert (offsets == np.where(plain - doc <= 8, doc, plain)).all()  # back to the document's start within a block
    assert set(offsets) & {0, 5, 9, 30, 400} and not set(offsets) <= {0, 5, 9, 30, 400}  # (both cases drawn)
    for o, seg in zip(offsets, b.get(0)[0]["segments"]):  # t's document: the starts in (o, o + t], counted
        assert seg.tolist() == [sum(o < s <= o + t for s in starts) for t in range(8)]
    assert segments(starts, np.array([0, 5, 26]), 8).tolist() == [
        [0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1]]
    segs = [s["segments"] for s in eval_blocks(tokens[:21], 8, 2, starts=np.array([0, 5, 9]))]
    assert [s.tolist() for s in segs] == [[[0, 0, 0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 1]], [[0, 0, 0, 0]]]


def test_eval_blocks_predict_every_token_once():
    tokens = np.arange(103, dtype=np.uint16)
    labels = np.concatenate([b["labels"].reshape(-1).numpy() for b in eval_blocks(tokens, 10, 3)])
    assert labels.tolist() == list(range(1, 103))


def test_instruct_labels_mask_exactly_the_prompt(tmp_path):
    from llmctl.chat import render_prompt
    from llmctl.config import FinetuneConfig
    from llmctl.data import instruct_examples
    from llmctl.tokenizer import Tokenizer

    rows = [
        {"instruction": "Say hi", "instances": [{"input": "", "output": "hi"}, {"input": "loud", "output": "HI"}]},
        {"instruction": "Add", "input": "1 1", "output": "2"},
        {"prompt": "Name?", "response": "Ann"},
    ]
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    ft = FinetuneConfig()
    tok = Tokenizer.train_char(["abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ#:? 12\n"])
    ex = instruct_examples(str(f), DataConfig(cache_dir=str(tmp_path / "c")), tok, 256, ft)
    pairs = [(render_prompt("Say hi", "", ft), "hi"), (render_prompt("Say hi", "loud", ft), "HI"),
             (render_prompt("Add", "1 1", ft), "2"), (render_prompt("Name?", "", ft), "Ann")]
    assert len(ex.ids) == 4
    for ids, labels, (prompt, response) in zip(ex.ids, ex.targets, pairs):
        n_prompt = len(tok.encode(prompt))
        assert ids == tok.encode(prompt) + tok.encode(response) + [tok.eos_id]
        assert labels[:n_prompt] == [-100] * n_prompt  # every prompt token masked
        assert labels[n_prompt:] == ids[n_prompt:]  # every response token (and <eos>) trained on
    from llmctl.data import pad_batch

    b = pad_batch(ex, [0, 3], tok.pad_id, "instruct")
    assert (b["labels"][b["input_ids"] == tok.pad_id] == -100).all()


def test_classification_examples(tmp_path):
    from llmctl.data import classification_examples
    from llmctl.tokenizer import Tokenizer

    tok = Tokenizer.train_char(["abcdefghij "])
    f = tmp_path / "c.tsv"
    f.write_text("label\tsentence\npos\tabc\nneg\tdef ghij\npos\ta\n")
    ex, labels = classification_examples(str(f), DataConfig(cache_dir=str(tmp_path / "c")), tok, 4, "sentence", "label")
    assert labels == ["neg", "pos"] and ex.targets == [1, 0, 1]
    assert ex.ids[0] == tok.encode("abc") + [tok.eos_id] and ex.truncated == 1 and len(ex.ids[1]) == 4
    f.write_text("label\tsentence\nneutral\tabc\n")
    with pytest.raises(LlmctlError, match="'neutral'.*not one the model was trained on"):
        classification_examples(str(f), DataConfig(cache_dir=str(tmp_path / "c")), tok, 8, "sentence", "label", labels)
    f.write_text("label\tsentence\npos\t \n")
    with pytest.raises(LlmctlError, match="row 1 .* empty text"):
        classification_examples(str(f), DataConfig(cache_dir=str(tmp_path / "c")), tok, 8, "sentence", "label", labels)


def test_example_batches_cover_each_epoch_once():
    from llmctl.data import ExampleBatches, Examples

    ex = Examples([[i, 0] for i in range(10)], list(range(10)))
    b = ExampleBatches(ex, np.arange(10), "classification", 0, batch_size=2, grad_accum=1, seed=3)
    seen = np.concatenate([b.rows(s).ravel() for s in range(5)])
    assert sorted(seen.tolist()) == list(range(10))  # steps 0-4 = one epoch
    assert (b.rows(7) == ExampleBatches(ex, np.arange(10), "classification", 0, 2, 1, 3).rows(7)).all()


# ------------------------------------------------------------------------------------------------------------------
# Streaming, sharded preparation


def _small_blocks(monkeypatch):
    """Read .txt files 4 KB at a time and cut 1024-token shards, so small corpora go through many of both."""
    from llmctl import corpus

    monkeypatch.setattr(corpus, "BLOCK_BYTES", 4096)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_a_text_file_read_in_pieces_gives_the_tokens_of_the_whole_file(tmp_path, monkeypatch, kind):
    _small_blocks(monkeypatch)
    # blank lines before names ("\n\nROMEO:"), where a cut would change a BPE token (see safe_cut), and blank lines
    # before indented ones, so that the tokenizer learns the merge of two newlines
    paras = SHAKESPEARE.read_text()[:60_000].split("\n\n")
    text = "".join(p + ("\n\n  " if i % 2 else "\n\n") for i, p in enumerate(paras)) + "tail\n\n\n   spaces  "
    (tmp_path / "t.txt").write_text(text)
    td = prepare(data_cfg(tmp_path, tmp_path / "t.txt", val_fraction=0.0, shard_tokens=1024),
                 TokenizerConfig(kind=kind, vocab_size=1000))
    assert kind == "char" or td.tokenizer.token_to_id("\u010a\u010a") is not None  # the merge of two newlines
    whole = td.tokenizer.tk.encode(text, add_special_tokens=False).ids  # the file tokenized as one string
    assert td.train[:].tolist() == whole
    sizes = [s["tokens"] for s in json.loads((td.dir / "index.json").read_text())["shards"]]
    assert len(sizes) > 5 and all(n >= 1024 for n in sizes[:-1])  # shards close at the first piece past the size


def test_more_formats_compressed_json_array_glob_and_parquet_folder(tmp_path):
    import gzip

    import datasets

    rows = [{"text": "alpha beta"}, {"text": ""}, {"text": "gamma"}]
    import zstandard

    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    jsonl = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl))
    (tmp_path / "d.txt.zst").write_bytes(zstandard.ZstdCompressor().compress("one\ntwo é\n".encode()))
    (tmp_path / "b.json").write_text(json.dumps(rows))
    shards = tmp_path / "pq"
    shards.mkdir()
    for i in range(3):
        datasets.Dataset.from_dict({"text": [f"doc {i} a", f"doc {i} b"]}).to_parquet(str(shards / f"{i}.parquet"))
    for path, want in ((tmp_path / "a.jsonl.gz", "alpha beta<eos>gamma"), (tmp_path / "b.json", "alpha beta<eos>gamma"),
                       (tmp_path / "c.jsonl.zst", "alpha beta<eos>gamma"), (tmp_path / "d.txt.zst", "one\ntwo é\n"),
                       (shards, "doc 0 a<eos>doc 0 b<eos>doc 1 a<eos>doc 1 b<eos>doc 2 a<eos>doc 2 b"),
                       (str(shards / "[02].parquet"), "doc 0 a<eos>doc 0 b<eos>doc 2 a<eos>doc 2 b")):
        td = prepare(data_cfg(tmp_path, path, val_fraction=0.0), TokenizerConfig())
        assert td.tokenizer.decode(td.train[:].tolist(), skip_special=False) == want, path


def test_hub_datasets_stream(tmp_path):
    """hf:NAME goes through datasets' streaming mode; a local dataset folder stands in for the hub."""
    hub = tmp_path / "hubdata"
    hub.mkdir()
    (hub / "train.jsonl").write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(50)))
    td = prepare(data_cfg(tmp_path, f"hf:{hub}", val_fraction=0.0, shard_tokens=1024), TokenizerConfig())
    text = td.tokenizer.decode(td.train[:].tolist(), skip_special=False)
    assert text.startswith("row 0<eos>row 1<eos>") and text.endswith("row 49") and td.manifest["documents"] == 50


def test_an_interrupted_preparation_resumes_from_its_last_complete_shard(tmp_path, monkeypatch):
    from llmctl import shards

    _small_blocks(monkeypatch)
    corpus_file = tmp_path / "c.txt"
    corpus_file.write_text(SHAKESPEARE.read_text()[:80_000])
    cfg = data_cfg(tmp_path, corpus_file, shard_tokens=4096)
    full = prepare(data_cfg(tmp_path / "other", corpus_file, shard_tokens=4096), TokenizerConfig())
    real_write, written = shards.ShardWriter._write, []

    def write_then_die(self, cursor, bytes_read):
        real_write(self, cursor, bytes_read)
        written.append(1)
        if len(written) == 5:
            raise KeyboardInterrupt  # as a Ctrl-C between two shards would

    monkeypatch.setattr(shards.ShardWriter, "_write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, TokenizerConfig())
    monkeypatch.setattr(shards.ShardWriter, "_write", real_write)
    tokens_root = tmp_path / "cache" / "tokens"
    assert not list(tokens_root.rglob("manifest.json"))  # nothing complete-looking
    events = Recorder()
    again = prepare(cfg, TokenizerConfig(), events=events)
    assert any("resuming the interrupted preparation after shard 4" in x for x in events.logs), events.logs
    assert again.train[:].tolist() == full.train[:].tolist() and again.val[:].tolist() == full.val[:].tolist()
    assert [json.loads((again.dir / "index.json").read_text())["shards"][i]["sha256"] for i in range(3)] == \
        [json.loads((full.dir / "index.json").read_text())["shards"][i]["sha256"] for i in range(3)]


def test_a_full_disk_mid_shard_leaves_no_partial_shard_and_the_same_command_resumes(tmp_path, monkeypatch):
    from llmctl import shards

    _small_blocks(monkeypatch)
    cfg = data_cfg(tmp_path, SHAKESPEARE, shard_tokens=300_000)
    tok = TokenizerConfig(kind="char")
    with monkeypatch.context() as m:
        disk_fills_on_second_shard(m)
        with pytest.raises(LlmctlError, match=r"the disk is full .* \(1 complete\); free space"):
            prepare(cfg, tok)
    root = tmp_path / "cache" / "tokens"
    assert not list(root.rglob("manifest.json")) and not list(root.rglob(".shard-*.tmp"))  # the partial went
    assert [f.name for f in root.glob(".build-*/shard-*.bin")] == ["shard-00000.bin"]
    events = Recorder()
    td = prepare(cfg, tok, events=events)
    assert any("resuming the interrupted preparation after shard 0 (3" in x for x in events.logs), events.logs
    (resumed,) = events.of("prepare")  # the progress starts where the complete shard ends, with its tokens
    assert 0 < resumed.start == resumed.updates[0][0] and resumed.updates[0][1]["tokens"] > 0 and resumed.closed
    assert len(td.train) + len(td.val) == 1_115_394 and shards.Index.load(td.dir).tokens == 1_115_394


def test_an_interrupted_build_whose_corpus_changed_is_removed_by_the_next_prepare(tmp_path, monkeypatch):
    from llmctl import shards

    _small_blocks(monkeypatch)
    corpus_file, other = tmp_path / "c.txt", tmp_path / "other.txt"
    corpus_file.write_text(SHAKESPEARE.read_text()[:40_000])
    other.write_text("something else\n")
    cfg = data_cfg(tmp_path, corpus_file, shard_tokens=4096)
    real_write = shards.ShardWriter._write

    def die_after_two(self, cursor, bytes_read):
        real_write(self, cursor, bytes_read)
        if len(self.index.shards) == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(shards.ShardWriter, "_write", die_after_two)
        with pytest.raises(KeyboardInterrupt):
            prepare(cfg, TokenizerConfig(kind="char"))
    root = tmp_path / "cache" / "tokens"
    (stranded,) = root.glob(".build-*")
    events = Recorder()
    prepare(data_cfg(tmp_path, other), TokenizerConfig(kind="char"), events=events)
    assert stranded.exists() and not any("removed" in x for x in events.logs)  # unchanged corpus: it can resume
    with open(corpus_file, "a") as f:
        f.write("an edit\n")  # the same command now has another cache key: the old build can never finish
    prepare(data_cfg(tmp_path, other, val_fraction=0.5), TokenizerConfig(kind="char"), events=events)
    assert not stranded.exists() and not list(root.glob(".build-*"))
    assert any(f"removed {stranded.name}, an interrupted preparation of {corpus_file}" in x
               for x in events.logs), events.logs


def test_progress_counts_the_bytes_of_rows_as_they_are_read(tmp_path, monkeypatch):
    """The "prepare" progress moves through a JSONL file row group by row group and ends at its size."""
    from llmctl.data import streaming

    monkeypatch.setattr(streaming, "BATCH_CHARS", 20_000)
    rows = [json.dumps({"text": p}) for p in SHAKESPEARE.read_text()[:200_000].split("\n\n")]
    (tmp_path / "c.jsonl").write_text("\n".join(rows) + "\n")
    size = (tmp_path / "c.jsonl").stat().st_size
    events = Recorder()
    td = prepare(data_cfg(tmp_path, tmp_path / "c.jsonl"), TokenizerConfig(kind="char"), events=events)
    (progress,) = events.of("prepare")
    done = [d for d, _ in progress.updates]
    assert progress.total == size and progress.closed and done == sorted(done) and done[-1] == size
    assert len({d for d in done if 0 < d < size}) >= 5  # it moved inside the file, not only at its end
    assert progress.updates[-1][1]["tokens"] == len(td.train) + len(td.val)


def test_reading_errors_name_the_file_and_the_place(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 ol\u00e9\n".encode("latin-1"))
    with pytest.raises(LlmctlError, match=r"latin1.txt is not UTF-8 text \(the bytes at offset 3 "):
        prepare(data_cfg(tmp_path, tmp_path / "latin1.txt"), TokenizerConfig())
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(LlmctlError, match="bad.jsonl line 2 is not valid JSON"):
        prepare(data_cfg(tmp_path, tmp_path / "bad.jsonl"), TokenizerConfig())
    (tmp_path / "fake.jsonl.gz").write_text('{"text": "not compressed"}\n')
    with pytest.raises(LlmctlError, match="named .gz but is not gzip"):
        prepare(data_cfg(tmp_path, tmp_path / "fake.jsonl.gz"), TokenizerConfig())
    with pytest.raises(LlmctlError, match="matches no file"):
        resolve_source(str(tmp_path / "*.nothing"), DataConfig())
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n{"text": null}\n')
    with pytest.raises(LlmctlError, match="holds no text"):
        prepare(data_cfg(tmp_path, tmp_path / "empty.jsonl"), TokenizerConfig(kind="char"))


@pytest.mark.slow
def test_sigkill_mid_prepare_then_the_same_command_resumes_and_equals_an_uninterrupted_run(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    text = SHAKESPEARE.read_text()
    rows = "".join(json.dumps({"text": p}) + "\n" for p in text.split("\n\n") if p.strip())
    src = tmp_path / "big.jsonl"
    src.write_text(rows * 8)  # ~9 MB, ~8.6M char tokens

    def cmd(cache):
        return [sys.executable, "-m", "llmctl", "prepare", "--set", f"data.path={src}", "--set",
                "data.shard_tokens=500000", "--set", f"data.cache_dir={cache}", "--json"]

    p = subprocess.Popen(cmd(tmp_path / "c1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while time.time() - t0 < 120:
        index = next((tmp_path / "c1" / "tokens").glob(".build-*/index.json"), None) \
            if (tmp_path / "c1" / "tokens").exists() else None
        if index is not None and len(json.loads(index.read_text())["shards"]) >= 3:
            break
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    again = subprocess.run(cmd(tmp_path / "c1"), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming the interrupted preparation after shard" in again.stderr
    whole = subprocess.run(cmd(tmp_path / "c2"), capture_output=True, text=True, timeout=300)
    a, b = json.loads(again.stdout), json.loads(whole.stdout)
    shas = [json.loads((Path(r["cache"]) / "index.json").read_text())["shards"] for r in (a, b)]
    assert [s["sha256"] for s in shas[0]] == [s["sha256"] for s in shas[1]] and len(shas[0]) > 3
    assert a["train_tokens"] == b["train_tokens"] and a["documents"] == b["documents"]


def test_cuts_never_split_a_run_of_newlines(tmp_path, monkeypatch):
    """A blank line before a word ("\\n\\nROMEO") is two pre-tokens in the whole text but one at the end of a piece;
    the reader must not cut there (only after a newline with a non-space character on both sides)."""
    _small_blocks(monkeypatch)
    unit = "lorem ipsum dolor " * 40 + "\n\nROMEO said " + "amet " * 20 + "\n\n\n  indented " + "end\nnext "
    text = unit * 60
    (tmp_path / "c.txt").write_text(text)
    td = prepare(data_cfg(tmp_path, tmp_path / "c.txt", val_fraction=0.0), TokenizerConfig(kind="bpe",
                                                                                           vocab_size=400))
    assert td.tokenizer.token_to_id("\u010a\u010a") is not None  # the merge of two newlines exists
    assert td.train[:].tolist() == td.tokenizer.tk.encode(text, add_special_tokens=False).ids


# --- conversations (chat SFT rows) ------------------------------------------------------------------------------

CHAT_TEMPLATES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chat_templates"
TOKENIZERS = CHAT_TEMPLATES.parent / "tokenizers"


def _jsonl(tmp_path, rows, name="c.jsonl") -> Path:
    f = tmp_path / name
    f.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return f


def _learned(tok, ids, labels) -> list[str]:
    """The text of each run of learned tokens (special tokens spelled out)."""
    runs, run = [], []
    for i, lab in zip(ids, labels):
        if lab != -100:
            assert lab == i
            run.append(i)
        elif run:
            runs, run = runs + [run], []
    runs += [run] if run else []
    return [tok.decode(r, skip_special=False) for r in runs]


def _real(template: str, tokenizer: str):
    """A real chat template and tokenizer from ../shared/data, and a renderer of whole conversations with them."""
    from llmctl.templates import render
    from llmctl.tokenizer import Tokenizer

    t, k = CHAT_TEMPLATES / template, TOKENIZERS / tokenizer / "tokenizer.json"
    if not (t.exists() and k.exists()):
        pytest.skip(f"needs {t} and {k} (../shared/data)")
    text, tok = t.read_text(), Tokenizer.from_file(k)
    return tok, lambda messages, prompt=False: render(text, messages, add_generation_prompt=prompt,
                                                      special=tok.special_tokens)


def _chat_examples(tmp_path, rows, tok, render, block_size=512, pairs=False):
    from llmctl.config import FinetuneConfig
    from llmctl.data import instruct_examples
    from llmctl.data.conversations import ChatExamples

    f = _jsonl(tmp_path, rows)
    return instruct_examples(str(f), DataConfig(cache_dir=str(tmp_path / "c")), tok, block_size, FinetuneConfig(),
                             chat=ChatExamples(render, tok, pairs))


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nSmall sums.\n</think>\n\n4."},
    {"role": "user", "content": "And 3+3? Say 4. if unsure"},
    {"role": "assistant", "content": "<think>\nAdd again.\n</think>\n\n6, not 4."},
]


def test_chat_labels_cover_the_answers_in_qwen3s_own_rendering(tmp_path):
    """Qwen3's template drops the reasoning of a past answer and keeps the last one's: each answer's span is found
    in the whole rendered conversation, with the <|im_end|> that closes it; nothing else is learned."""
    tok, render = _real("Qwen-Qwen3-0.6B.jinja", "qwen3")
    text = render(CONVERSATION)
    assert "Small sums." not in text and "Add again." in text  # the template rewrote the first answer
    ex = _chat_examples(tmp_path, [{"messages": CONVERSATION}], tok, render)
    ids, labels = ex.ids[0], ex.targets[0]
    assert ids == tok.encode(text)
    assert _learned(tok, ids, labels) == ["4.<|im_end|>", "<think>\nAdd again.\n</think>\n\n6, not 4.<|im_end|>"]


def test_instruction_pairs_render_with_a_models_own_template(tmp_path):
    """A model with a chat template of its own learns instruction pairs in it too: one user turn (instruction, blank
    line, input) and the answer, closed by the template's end-of-turn token rather than llmctl's <eos>."""
    tok, render = _real("Qwen-Qwen3-0.6B.jinja", "qwen3")
    rows = [{"instruction": "Add", "input": "1 1", "output": "2"}, {"messages": CONVERSATION[1:3]}]
    ex = _chat_examples(tmp_path, rows, tok, render, pairs=True)
    pair = [{"role": "user", "content": "Add\n\n1 1"}, {"role": "assistant", "content": "2"}]
    assert ex.ids[0] == tok.encode(render(pair))
    # (from the assistant header on: the empty think block is what the model writes when it answers)
    assert _learned(tok, ex.ids[0], ex.targets[0]) == ["<think>\n\n</think>\n\n2<|im_end|>"]
    assert _learned(tok, ex.ids[1], ex.targets[1]) == ["<think>\nSmall sums.\n</think>\n\n4.<|im_end|>"]


@pytest.mark.parametrize("template", ["meta-llama-Llama-3.1-8B-Instruct.jinja",
                                      "meta-llama-Llama-3.2-3B-Instruct.jinja"])
def test_chat_labels_with_llama3s_template_which_trims_answers(tmp_path, template):
    tok, render = _real(template, "llama3")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there.  \n"},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}]
    ex = _chat_examples(tmp_path, [{"messages": msgs}], tok, render)
    ids, labels = ex.ids[0], ex.targets[0]
    assert ids[0] == tok.token_to_id("<|begin_of_text|>") and ids == tok.encode(render(msgs))
    assert _learned(tok, ids, labels) == ["Hello there.<|eot_id|>", "Bye!<|eot_id|>"]


def _own_chat():
    """A char tokenizer and llmctl's own instruction template as Jinja (what a model without a template uses)."""
    from llmctl.chat import chat_template
    from llmctl.config import FinetuneConfig
    from llmctl.templates import render
    from llmctl.tokenizer import Tokenizer

    tok = Tokenizer.train_char(["abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ#:?!. 12\n"])
    template = chat_template(FinetuneConfig(), tok.eos_token)
    return tok, lambda messages, prompt=False: render(template, messages, add_generation_prompt=prompt)


def test_sharegpt_and_instruction_layouts_mix_in_one_file(tmp_path):
    from llmctl.chat import render_prompt
    from llmctl.config import FinetuneConfig

    tok, render = _own_chat()
    rows = [
        {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Name?"},
                           {"from": "gpt", "value": "Ann."}]},
        {"prompt": "Add", "response": "2"},
        {"messages": [{"role": "user", "content": "Yes?"}, {"role": "assistant", "content": "No."}], "id": 7},
    ]
    ex = _chat_examples(tmp_path, rows, tok, render)
    assert len(ex.ids) == 3
    assert _learned(tok, ex.ids[0], ex.targets[0]) == ["Hello!<eos>", "Ann.<eos>"]
    prompt = tok.encode(render_prompt("Add", "", FinetuneConfig()))
    assert ex.ids[1] == prompt + tok.encode("2") + [tok.eos_id]  # the instruction layouts are as before
    assert _learned(tok, ex.ids[2], ex.targets[2]) == ["No.<eos>"]
    sharegpt = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name?"},
                {"role": "assistant", "content": "Ann."}]
    assert ex.ids[0] == tok.encode(render(sharegpt))


def test_long_conversations_keep_their_start(tmp_path):
    tok, render = _own_chat()
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"}]
    n = len(tok.encode(render(msgs)))
    ex = _chat_examples(tmp_path, [{"messages": msgs}] * 2 + [{"prompt": "x" * 400, "response": "y"}], tok,
                        render, block_size=n - 4)
    assert ex.truncated == 3 and len(ex.ids) == 2  # the last one: nothing left to learn, dropped
    assert len(ex.ids[0]) == n - 3 and _learned(tok, ex.ids[0], ex.targets[0]) == ["Hello ther"]


@pytest.mark.parametrize("row, words", [
    ({"messages": [{"role": "user", "content": "Hi"}]}, ["no assistant message", "add the assistant's answer"]),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "x"}]},
     ["messages[1] has role 'robot'", "system, user, assistant, tool"]),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "x"}]},
     ["conversations[1] has from 'bot'", "system, human, gpt, tool"]),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                   {"role": "assistant", "content": "x"}]}, ["messages[0] (user) has a list content", "one string"]),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}]},
     ["messages[1] (assistant) has no content"]),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]},
     ["messages[1] is an empty assistant message"]),
    ({"messages": [{"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]}]},
     ["messages[1] has tool_calls"]),
    ({"messages": "Hi"}, ["'messages' must be a non-empty list"]),
])
def test_bad_conversation_rows_name_file_line_and_fix(tmp_path, row, words):
    tok, render = _own_chat()
    f = tmp_path / "c.jsonl"
    with pytest.raises(LlmctlError) as e:
        _chat_examples(tmp_path, [{"prompt": "a", "response": "b"}, row], tok, render)
    assert f"data.path: {f}:2: " in str(e.value) and "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_a_template_that_rewrites_an_answer_or_never_closes_one_is_an_error(tmp_path):
    from llmctl.templates import render

    tok, _ = _own_chat()
    msgs = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}]}
    rewrites = "{% for m in messages %}{{ m.content | replace('Yes', 'No') }}<eos>{% endfor %}"
    with pytest.raises(LlmctlError, match=r"c.jsonl:1: the chat template does not write messages\[1\] \(assistant\) "
                                          "as given"):
        _chat_examples(tmp_path, [msgs], tok, lambda m, p=False: render(rewrites, m, add_generation_prompt=p))
    open_ended = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    with pytest.raises(LlmctlError, match="not with a special token, so a model tuned on it would not learn to stop"):
        _chat_examples(tmp_path, [msgs], tok, lambda m, p=False: render(open_ended, m, add_generation_prompt=p))
    no_system = ("{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
                 "{% for m in messages %}{{ m.content }}<eos>{% endfor %}")
    system = {"messages": [{"role": "system", "content": "Be kind."}, *msgs["messages"]]}
    with pytest.raises(LlmctlError, match="c.jsonl:2: the chat template refused the conversation: System role not "
                                          "supported"):
        _chat_examples(tmp_path, [msgs, system], tok, lambda m, p=False: render(no_system, m, add_generation_prompt=p))
