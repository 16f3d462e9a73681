from pathlib import Path

import pytest
import yaml

from llmctl.config import Config, from_dict, load_config, parse_overrides
from llmctl.errors import LlmctlError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path):
    p = write(tmp_path, "model:\n  n_layer: 3\ntrain:\n  lr: 3e-4\n")
    cfg = load_config(p, ["train.lr=1e-3", "model.arch=llama", "train.compile=true", "model.n_kv_head=2"])
    assert cfg.model.n_layer == 3 and cfg.model.arch == "llama"
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.train.compile is True and cfg.model.kv_heads == 2
    assert cfg.train.batch_size == Config().train.batch_size  # untouched keys keep code defaults


def test_yaml_string_numbers_are_coerced(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  lr: 3e-4\n  max_steps: 1e3\n"))
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.max_steps == 1000


def test_every_problem_reported_at_once(tmp_path):
    p = write(tmp_path, "model:\n  n_layr: 3\n  n_embd: 100\n  n_head: 3\ntrain:\n  lr: -1\n  batch_size: many\n")
    with pytest.raises(LlmctlError) as e:
        load_config(p)
    msg = str(e.value)
    assert "model.n_layr: unknown key (did you mean 'model.n_layer'?)" in msg
    assert "not divisible" in msg and "train.lr" in msg and "train.batch_size: must be an integer" in msg
    assert e.value.status == 2


def test_unknown_section_and_bad_choice():
    with pytest.raises(LlmctlError) as e:
        from_dict({"trian": {"lr": 1}, "model": {"arch": "gpt3"}})
    assert "did you mean 'train'" in str(e.value) and "must be one of gpt2, llama" in str(e.value)


def test_odd_values_adjusted_with_warning():
    cfg = from_dict({"train": {"max_steps": 10, "warmup_steps": 50}})
    assert cfg.train.warmup_steps == 10
    assert any("clamped" in w for w in cfg.warnings)


def test_gqa_needs_llama_and_divisibility():
    with pytest.raises(LlmctlError, match="needs model.arch=llama"):
        from_dict({"model": {"n_kv_head": 2}})
    with pytest.raises(LlmctlError, match="must divide"):
        from_dict({"model": {"arch": "llama", "n_kv_head": 4}})


@pytest.mark.parametrize("text,needle", [
    ("model: [1, 2\n", "not valid YAML at line"),
    ("- a\n- b\n", "must be a mapping"),
])
def test_malformed_yaml(tmp_path, text, needle):
    with pytest.raises(LlmctlError, match=needle):
        load_config(write(tmp_path, text))


def test_bad_override_syntax():
    with pytest.raises(LlmctlError, match="expected KEY=VALUE"):
        parse_overrides(["train.lr"])


def test_resolved_config_round_trips():
    cfg = from_dict({"model": {"n_layer": 2}})
    again = from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.data.path, "shipped configs name their data"
    raw = yaml.safe_load(path.read_text())
    defaults = Config().to_dict()
    for section, values in raw.items():  # configs hold only what differs from the defaults
        for k, v in values.items():
            if section == "data" and k == "path":
                continue
            assert defaults[section][k] != v or section == "model" and k == "arch", (
                f"{path.name}: {section}.{k} repeats the default")


@pytest.mark.parametrize("text",
                         ["model:\ntrain:\n  lr: 1e-3\n", "model: null\n", "model: ~\n", "model:\n  # n_layer: 4\n"])
@pytest.mark.parametrize("overrides", [[], ["model.n_layer=2"], ["train.lr=1e-3"]])
def test_empty_section_is_one_error_with_or_without_set(tmp_path, text, overrides):
    """A null section is refused the same way whether or not a --set for that section would fill it."""
    with pytest.raises(LlmctlError) as e:
        load_config(write(tmp_path, text), overrides)
    assert "model: in" in e.value.message and "is empty (null); give it keys, or remove the line" in e.value.message
    assert e.value.status == 2


def test_section_that_is_not_a_mapping_is_refused_even_with_set(tmp_path):
    with pytest.raises(LlmctlError, match=r"train: in .* must be a mapping of train settings \(got 3\)"):
        load_config(write(tmp_path, "train: 3\n"), ["train.lr=1e-3"])
    with pytest.raises(LlmctlError, match=r"model: is empty \(null\)"):
        from_dict({"model": None})
    with pytest.raises(LlmctlError, match=r"model: is empty \(null\)"):
        load_config(None, ["model=null"])
