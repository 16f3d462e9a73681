"""Hugging Face interoperability: transformers checkpoint directories <-> llmctl checkpoints.

Architectures: GPT2LMHeadModel, LlamaForCausalLM (Llama 2/3.x, RoPE scaling included), Qwen2ForCausalLM,
Qwen3ForCausalLM, MistralForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM (text only) and Phi3ForCausalLM; an
imported model records its architecture (model.hf_architecture) and export writes the same one back. Encoders
(`encoders`): BertForMaskedLM, BertModel, BertForSequenceClassification and their ModernBert counterparts.

Only JSON and safetensors are read and written here: transformers is never imported (it is an optional extra,
used by the tests to check parity). Every field of a config we cannot represent exactly is an error that names it,
never a silent approximation.

Modules, each importing only the ones before it: `fields` (typed config.json fields, the "cannot represent"
error, the tensor `Pair`), `rope` (RoPE settings in the hub's and transformers 5's forms), `encoders` (BERT and
ModernBERT: configs and tensor names), `configs` (one `Family` per architecture: config.json <-> ModelConfig),
`layouts` (tensor names and layouts per architecture), `tokens` (the special token ids of config.json and
generation_config.json; the files beside tokenizer.json are llmctl.tokenizer_files'), `files` (directories: read,
write, download). The rest of llmctl uses the names below.
"""

from .configs import FAMILIES, architecture, family_of, to_model_config
from .fields import read_json
from .files import (
    DOWNLOAD_BIN_PATTERNS,
    DOWNLOAD_PATTERNS,
    SAFETENSORS,
    Imported,
    download,
    load_dir,
    read_weights,
    to_hf_config,
    write_dir,
)
from .layouts import (
    IGNORED_SUFFIXES,
    expected_shapes,
    from_hf_weights,
    head_to_hf,
    layout,
    split_head,
    to_hf_weights,
)
from .tokens import generation_config, token_ids

__all__ = [
    "FAMILIES", "architecture", "family_of", "to_model_config", "read_json", "DOWNLOAD_BIN_PATTERNS",
    "DOWNLOAD_PATTERNS", "SAFETENSORS", "Imported", "download", "load_dir", "read_weights", "to_hf_config",
    "write_dir", "IGNORED_SUFFIXES", "expected_shapes", "from_hf_weights", "head_to_hf", "layout", "split_head",
    "to_hf_weights",
    "generation_config", "token_ids",
]
