#!/usr/bin/env bash
# Builds llama.cpp's own C++ server, llama-server (CPU only, Release, no curl, no web UI download), the peer of
# `llmctl serve` in scripts/bench_serve.py --llama-server. No internet needed: the sources can be the llama.cpp tree
# vendored in the llama-cpp-python source package, e.g.
#   pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d /tmp/lcp
#   bash scripts/build_llama_server.sh /tmp/lcp/llama_cpp_python-0.3.36.tar.gz /work/peers/llama.cpp-build
# SOURCE is a llama.cpp source tree, a llama-cpp-python source tree (its vendor/llama.cpp is used) or its sdist
# (.tar.gz, unpacked beside BUILD_DIR). Prints the binary's path last: BUILD_DIR/bin/llama-server.
# JOBS (default: all cores) sets the build's parallelism; one core takes about an hour.
set -euo pipefail
if [ $# -ne 2 ]; then echo "usage: $0 SOURCE(llama.cpp dir | llama-cpp-python dir or .tar.gz) BUILD_DIR" >&2; exit 2; fi
src=$1
build=$(mkdir -p "$2" && cd "$2" && pwd)
if [ -f "$src" ]; then
  unpack="$build.src"
  mkdir -p "$unpack"
  tar xzf "$src" -C "$unpack"
  src=$(find "$unpack" -mindepth 1 -maxdepth 1 -type d | head -1)
fi
[ -d "$src/vendor/llama.cpp" ] && src="$src/vendor/llama.cpp"
[ -f "$src/tools/server/CMakeLists.txt" ] || { echo "no llama.cpp server sources under $src" >&2; exit 2; }
# shellcheck disable=SC2046
cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  $(bash "$(dirname "$0")/llama_cpp_flags.sh")
cmake --build "$build" --config Release --target llama-server -j "${JOBS:-$(nproc)}"
echo "$build/bin/llama-server"
