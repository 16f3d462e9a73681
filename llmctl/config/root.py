"""The whole configuration: one field per section, in the order the docs and `config show` list them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from .data import DataConfig, TokenizerConfig
from .finetune import FinetuneConfig
from .inference import EvalConfig, GenerateConfig, ServeConfig
from .model import ModelConfig
from .train import TrainConfig


@dataclass
class Config:
    """Every section, and the warnings of values that were adjusted (`train.adjust`)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    warnings: list = field(default_factory=list, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in sections(self)}

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False)


class _Dumper(yaml.SafeDumper):
    """YAML as safe_dump writes it, but a text of several lines (a chat template) as a literal block that reads as
    the text itself (PyYAML falls back to a quoted string where a block cannot hold it, e.g. trailing spaces)."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s
                                                             else None))


def sections(cfg: Any) -> list:
    """The section fields of a config (everything but bookkeeping)."""
    return [f for f in dataclasses.fields(cfg) if f.name != "warnings"]
