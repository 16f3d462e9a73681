#!/usr/bin/env bash
# Prints the CMake flags this project builds llama.cpp with (scripts/check_gguf.sh, scripts/build_llama_server.sh):
# CPU only, without -march=native (on some Xeons its AMX int8 path stops q8_0 files with "Illegal instruction"),
# AVX2/FMA/F16C, plus AVX512F where the CPU has it.
flags="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
grep -q avx512f /proc/cpuinfo 2>/dev/null && flags="$flags -DGGML_AVX512=ON"
echo "$flags"
