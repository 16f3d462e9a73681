import json

import numpy as np
import pytest

from conftest import SHAKESPEARE
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


def test_cache_is_reused_and_keyed_by_content(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("hello world\n" * 200)
    logs: list[str] = []
    first = prepare(data_cfg(tmp_path, src), TokenizerConfig(), log=logs.append)
    second = prepare(data_cfg(tmp_path, src), TokenizerConfig(), log=logs.append)
    assert first.dir == second.dir and len(logs) == 1  # tokenized once
    src.write_text("goodbye world\n" * 200)  # new content -> new cache entry
    third = prepare(data_cfg(tmp_path, src), TokenizerConfig(), log=logs.append)
    assert third.dir != first.dir and len(logs) == 2


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
