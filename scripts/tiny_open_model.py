"""Write a small random-weight open model as the hub holds it, to try the open-model commands offline.

transformers builds the model from the family's own config class at a tiny width; beside it go the family's real
tokenizer.json, tokenizer_config.json, chat template and end ids from ../shared/data (see its README), so
`llmctl import hf DIR` sees what it would see in a download of Qwen/Qwen3-0.6B or meta-llama/Llama-3.2-1B-Instruct
(docs/open-models.md). Needs the hf extra (pip install -e ".[hf]").

    python scripts/tiny_open_model.py qwen3 --out /tmp/tiny-qwen3
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"

# family -> (tokenizer folder, chat template, generation_config.json)
FAMILIES = {
    "qwen3": ("qwen3", "Qwen-Qwen3-0.6B.jinja", {"bos_token_id": 151643, "eos_token_id": [151645, 151643]}),
    "llama3.2": ("llama3", "meta-llama-Llama-3.2-3B-Instruct.jinja",
                 {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}),
}


def config(family: str, width: int, layers: int, context: int, init: float = 0.3):
    """The family's transformers config at this size, its distinctive values kept (Qwen3: head_dim apart from the
    width, RoPE base 1e6; Llama 3.2: llama3 RoPE scaling, tied head). Weights start wide enough (`init` 0.3) that a
    few dozen LoRA steps can teach the random model a reply; at 0.02 (the real models' initializer_range) the
    random model starts near the uniform distribution, from which a few LoRA steps on text lower the loss."""
    import transformers

    common = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=context, tie_word_embeddings=True,
                  initializer_range=init)
    if family == "qwen3":
        return transformers.Qwen3Config(vocab_size=151936, head_dim=width // 2, rope_theta=1e6, **common)
    return transformers.LlamaConfig(vocab_size=128256, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, **common)


def write(family: str, out: Path, width: int = 64, layers: int = 2, context: int = 96, seed: int = 0,
          init: float = 0.3) -> Path:
    """The transformers directory of a random-weight `family` model in `out`; returns `out`."""
    import torch
    import transformers

    tok_dir, template, generation = FAMILIES[family]
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(config(family, width, layers, context, init)).save_pretrained(out)
    shutil.copy(SHARED / "tokenizers" / tok_dir / "tokenizer.json", out / "tokenizer.json")
    tc = json.loads((SHARED / "tokenizers" / tok_dir / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)  # transformers 5 writes the template beside it, as here
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    shutil.copy(SHARED / "chat_templates" / template, out / "chat_template.jinja")
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("family", choices=sorted(FAMILIES))
    ap.add_argument("--out", type=Path, required=True, help="directory to write (created)")
    ap.add_argument("--width", type=int, default=64, help="hidden size (default 64)")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    ap.add_argument("--context", type=int, default=96, help="max_position_embeddings (default 96)")
    a = ap.parse_args()
    print(write(a.family, a.out, a.width, a.layers, a.context))


if __name__ == "__main__":
    main()
