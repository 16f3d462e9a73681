import pytest
import torch

from llmctl import checkpoint as ck
from llmctl.errors import LlmctlError


def save(run, step, **kw):
    w = {"a": torch.randn(3, 4), "b": torch.zeros(2)}
    return ck.save(run, step, w, "model: {}\n", "{}", train_state={"x": torch.ones(2), "step": step}, **kw)


def test_save_load_latest_and_prune(tmp_path):
    run = tmp_path / "run"
    for s in (1, 2, 3):
        save(run, s)
    assert ck.read_latest(run).name == "step-0000003"
    assert ck.load(run).meta["step"] == 3
    assert ck.load(run / "step-0000001").train_state()["step"] == 1
    removed = ck.prune(run, keep_last=2)
    assert [p.name for p in removed] == ["step-0000001"]
    assert not list(run.glob(".tmp-*"))


def test_tied_tensors_stored_once(tmp_path):
    shared = torch.randn(4, 4)
    path = ck.save(tmp_path, 1, {"wte.weight": shared, "lm_head.weight": shared}, "", "{}")
    assert set(ck.load(path).weights()) == {"wte.weight"}


@pytest.mark.parametrize("name", ["model.safetensors", "train_state.pt"])
def test_flipped_byte_is_detected(tmp_path, name):
    path = save(tmp_path, 5)
    f = path / name
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(LlmctlError, match=name.replace(".", r"\.") + ".*sha256"):
        ck.load(path)


def test_malicious_pickle_is_refused_without_running(tmp_path):
    path = save(tmp_path, 1)

    class Evil:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('pwned')" % str(tmp_path / "pwned"),))

    torch.save({"x": Evil()}, path / "train_state.pt")
    checkpoint = ck.Checkpoint(path, {})
    with pytest.raises(LlmctlError, match="cannot be loaded safely"):
        checkpoint.train_state()
    assert not (tmp_path / "pwned").exists()


def test_resolve_errors(tmp_path):
    with pytest.raises(LlmctlError, match="not found"):
        ck.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LlmctlError, match="holds no checkpoint"):
        ck.load(tmp_path / "empty")


def _edit_meta(path, **fields):
    import json

    meta = json.loads((path / "meta.json").read_text())
    meta.update(fields)
    (path / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("fields,words", [
    ({"format_version": "abc"}, ["format_version must be an integer", "'abc'", "this llmctl writes 1"]),
    ({"format_version": None}, ["format_version must be an integer"]),
    ({"step": "7"}, ["step must be a non-negative integer", "set it to 7"]),
    ({"step": -1}, ["step must be a non-negative integer"]),
    ({"base": "somewhere"}, ["base must be a mapping"]),
    ({"files": {"../model.safetensors": "00"}}, ["not a file name inside the checkpoint"]),
    ({"files": {"model.safetensors": 5, "config.yaml": "00"}}, ["sha256 of 5"]),
])
def test_malformed_meta_fields_are_one_clear_error(tmp_path, fields, words):
    path = save(tmp_path, 7)
    _edit_meta(path, **fields)
    with pytest.raises(LlmctlError) as e:
        ck.load(path)
    assert str(path / "meta.json") in e.value.message and e.value.status == 2
    for w in words:
        assert w in e.value.message, e.value.message
