#!/usr/bin/env bash
# llama.cpp reads llmctl's GGUF: installs llama-cpp-python (it builds llama.cpp from source: several minutes on 2
# cores, once), then runs tests/test_gguf.py. Its llama.cpp tests export to f32 and q8_0 GGUF and check, with
# llama.cpp's KV cache in f32, that its tokenization and greedy tokens equal llmctl's (q8_0: loads and generates):
#   - a llama-flavour (GQA, padded vocabulary), a head-pruned and a GPT-2-flavour model with llmctl's own
#     byte-level BPE, trained briefly on Shakespeare: a Shakespeare paragraph, 50 greedy tokens;
#   - random-weight Llama 3 (llama3 RoPE scaling, tied head), Qwen3 (QK-norm, head_dim decoupled) and Qwen2 (q/k/v
#     biases) models with their real tokenizers (../shared/data/tokenizers): a multilingual paragraph with special
#     and added tokens, with and without the tokenizer's own specials, decoded back; 40 greedy tokens.
#   bash scripts/check_gguf.sh            # from the project root, in its virtual environment
set -euo pipefail
cd "$(dirname "$0")/.."
flags=$(bash scripts/llama_cpp_flags.sh)  # without -march=native (see there)
python -c "import gguf" 2>/dev/null || pip install "gguf>=0.10"
python -c "import llama_cpp" 2>/dev/null \
  || CMAKE_ARGS="$flags" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" pip install llama-cpp-python
python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
python -m pytest -q -rps tests/test_gguf.py  # each test named: passed, or skipped with the reason
