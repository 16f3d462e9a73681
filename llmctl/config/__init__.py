"""Typed configuration: dataclass defaults, YAML files that hold only what differs, dotted overrides.

One module per concern: a module per group of sections (`model`, `data` with `tokenizer`, `train`, `inference`
with `generate`, `eval` and `serve`, `finetune`), each section checking its own values; `root` joins them into
`Config`; `load` reads YAML and `--set`, coerces and merges values and reports every problem at once; `fields`
gives each key's type, default and doc line (the docs' configuration reference and CLI help read it). Importers
use the names re-exported here.
"""

from .data import DataConfig, TokenizerConfig, default_cache_dir
from .fields import FieldInfo, all_fields, field_info
from .finetune import ADAPTER_METHODS, FinetuneConfig
from .inference import INFER_DTYPES, QUANTIZE_MODES, EvalConfig, GenerateConfig, ServeConfig
from .load import EMPTY_SECTION, from_dict, load_config, merge_settings, parse_overrides, read_yaml, user_settings
from .model import ModelConfig
from .root import Config, sections
from .train import TrainConfig

__all__ = [
    "INFER_DTYPES", "QUANTIZE_MODES", "EMPTY_SECTION", "ADAPTER_METHODS",
    "Config", "ModelConfig", "TokenizerConfig", "DataConfig", "TrainConfig", "GenerateConfig", "EvalConfig",
    "FinetuneConfig", "ServeConfig",
    "default_cache_dir", "sections", "from_dict", "load_config", "merge_settings", "parse_overrides", "read_yaml",
    "user_settings", "FieldInfo", "all_fields", "field_info",
]
