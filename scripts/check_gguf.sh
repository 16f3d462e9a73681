#!/usr/bin/env bash
# llama.cpp reads llmctl's GGUF: installs llama-cpp-python (it builds llama.cpp from source: several minutes on 2
# cores, once), then runs tests/test_gguf.py, whose last test exports a llama-flavour and a GPT-2-flavour byte-level
# BPE model to f32 and q8_0 GGUF and checks, with llama.cpp's KV cache in f32, that its tokenization of a
# Shakespeare paragraph and its greedy 50 tokens equal llmctl's (q8_0: loads and generates).
#   bash scripts/check_gguf.sh            # from the project root, in its virtual environment
set -euo pipefail
cd "$(dirname "$0")/.."
# without -march=native: on some Xeons its AMX int8 path stops q8_0 files with "Illegal instruction"
flags="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
grep -q avx512f /proc/cpuinfo 2>/dev/null && flags="$flags -DGGML_AVX512=ON"
python -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="$flags" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" pip install llama-cpp-python
python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
python -m pytest -q -rs tests/test_gguf.py
