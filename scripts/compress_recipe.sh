#!/usr/bin/env bash
# The compression recipe of docs/compression.md: prune configs/shakespeare-bpe.yaml's model to half its
# non-embedding parameters (width, depth, both), distil with 20% of its training steps, compare with the same
# shapes trained from scratch; figures in benchmarks/compress.json. About 70 minutes on 2 CPU cores (plus 10 for
# the teacher when RUNS/teacher is not trained yet). Re-running continues where it stopped.
# Usage: scripts/compress_recipe.sh [RUNS_DIR] [extra options of scripts/compress_recipe.py]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/compress}
shift || true
exec python scripts/compress_recipe.py --runs "$RUNS" "$@"
