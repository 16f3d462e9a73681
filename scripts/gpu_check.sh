#!/usr/bin/env bash
# The GPU check (docs/gpu.md): prove llmctl's CUDA paths and measure them, in one command.
#
#   scripts/gpu_check.sh --prepare-wheels DIR   here, where a registry is reached: download the wheels that the
#                                               GPU machine lacks (for its Python, default 3.12) into DIR
#   scripts/gpu_check.sh [--wheels DIR] [--out DIR] [--steps N] [--budget SECONDS]
#                                               there: install what is missing (offline from DIR; torch is never
#                                               replaced), run the CUDA-marked tests, train GPT-2 124M eager and
#                                               compiled, decode against transformers; figures in
#                                               OUT/gpu_check.json and OUT/gpu_check.txt (default runs/gpu-check)
#   scripts/gpu_check.sh --quick --device cpu   the same steps on a CPU with tiny shapes, in under a minute (CI)
#
# Other options: --device cuda|cpu (default cuda), --python PY (default: $PYTHON, else the active virtual
# environment's python, else ./.venv/bin/python, else python3), --keep-work
# (keep the scratch folder: corpus, runs, caches). Exit status 0 when every phase ran and every CUDA test passed.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
START=$(date +%s)

# What the lent GPU machine lacks (its image has Python 3.12, torch, transformers, tokenizers, safetensors, typer,
# rich, pyyaml, numpy, pyarrow, pandas, huggingface_hub, xxhash, pytest, setuptools; no registry is reached there):
#   datasets      llmctl.data reads every corpus through it, a plain .txt too; and what it needs that is not there:
#   dill, multiprocess
# and guards, installed there only where its own copy does not satisfy what datasets or the tests ask for:
#   fsspec (datasets caps its version), xxhash, pytest, pluggy, iniconfig
# Versions: those of the Python that prepares the folder (what llmctl's tests run with), else the newest.
WHEEL_PACKAGES=(datasets dill multiprocess fsspec xxhash pytest pluggy iniconfig)
WHEELS_MAX_MB=64

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "gpu_check.sh: $*" >&2; exit 2; }

# the interpreter: $PYTHON, else the active virtual environment's, else this checkout's .venv, else python3
PY="${PYTHON:-}"
[ -z "$PY" ] && [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ] && PY="$VIRTUAL_ENV/bin/python"
[ -z "$PY" ] && [ -x "$ROOT/.venv/bin/python" ] && PY="$ROOT/.venv/bin/python"
PY="${PY:-python3}"
QUICK="" DEVICE=cuda OUT="" WHEELS="" PREPARE="" STEPS="" BUDGET="" KEEP=""
GPU_PYTHON="${GPU_PYTHON:-3.12}"
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --device) DEVICE="${2:?--device needs cuda or cpu}"; shift ;;
    --out) OUT="${2:?--out needs a folder}"; shift ;;
    --wheels) WHEELS="${2:?--wheels needs a folder}"; shift ;;
    --prepare-wheels) PREPARE="${2:?--prepare-wheels needs a folder}"; shift ;;
    --steps) STEPS="${2:?--steps needs a number}"; shift ;;
    --budget) BUDGET="${2:?--budget needs seconds}"; shift ;;
    --python) PY="${2:?--python needs an interpreter}"; shift ;;
    --keep-work) KEEP=1 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option $1" ;;
  esac
  shift
done
case "$DEVICE" in cuda|cpu) ;; *) die "--device must be cuda or cpu (got $DEVICE)" ;; esac
command -v "$PY" >/dev/null || die "no Python interpreter '$PY' (give one with --python or PYTHON=...)"

# ----------------------------------------------------------------------------------------------------------------
# --prepare-wheels: here, with a registry

if [ -n "$PREPARE" ]; then
  mkdir -p "$PREPARE"
  mapfile -t SPECS < <("$PY" - "${WHEEL_PACKAGES[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        print(name)
EOF
)
  for s in "${SPECS[@]}"; do
    case "$s" in *==*) ;; *) echo "note: $s is not installed in $PY: downloading its newest version" ;; esac
  done
  echo "downloading for Python $GPU_PYTHON, manylinux x86_64: ${SPECS[*]}"
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$PREPARE" "${SPECS[@]}"
  kb=$(du -sk "$PREPARE" | cut -f1)
  ls -l "$PREPARE"
  echo "wheels: $(find "$PREPARE" -name '*.whl' | wc -l) files, $((kb / 1024)) MiB ($kb KiB) in $PREPARE"
  [ "$kb" -lt $((WHEELS_MAX_MB * 1024)) ] || die "the wheels folder is over $WHEELS_MAX_MB MiB"
  echo "on the GPU machine: scripts/gpu_check.sh --wheels $PREPARE --out OUT"
  exit 0
fi

# ----------------------------------------------------------------------------------------------------------------
# The check

OUT="${OUT:-$ROOT/runs/gpu-check}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/gpu_check.json "$OUT"/gpu_check.txt "$OUT"/gpu_check.log "$OUT"/details.log "$OUT"/cuda-tests.xml
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
TEE_PID=$!
WORK=$(mktemp -d "${TMPDIR:-/tmp}/llmctl-gpu-check.XXXXXX")
cleanup() {
  if [ -n "$KEEP" ]; then echo "scratch folder kept: $WORK"; else rm -rf "$WORK"; fi
  exec >&- 2>&-  # then wait for tee, so gpu_check.log is complete when this script returns
  wait "$TEE_PID" 2>/dev/null || true
}
trap cleanup EXIT
BUDGET="${BUDGET:-$([ -n "$QUICK" ] && echo 300 || echo 570)}"  # the full check must end within 10 minutes
echo "gpu check: $([ -n "$QUICK" ] && echo quick || echo full) on $DEVICE; out $OUT; budget ${BUDGET} s"

PIP=("$PY" -m pip install -q --disable-pip-version-check)
OFFLINE=()
if [ -n "$WHEELS" ]; then
  [ -d "$WHEELS" ] || die "--wheels $WHEELS is not a folder (make it with --prepare-wheels where a registry is reached)"
  WHEELS=$(cd "$WHEELS" && pwd)
  OFFLINE=(--no-index --find-links "$WHEELS")
fi

# torch: the one found is kept, whatever it is; only where there is none is one installed
TORCH_KEPT=true
torch_desc() { "$PY" -c 'import torch; print(torch.__version__, torch.version.cuda or "none", int(torch.cuda.is_available()))' 2>/dev/null; }
if ! desc=$(torch_desc); then
  TORCH_KEPT=false
  if [ -n "$WHEELS" ]; then
    ls "$WHEELS"/torch-*.whl >/dev/null 2>&1 || die "no torch in $PY and none in $WHEELS; install a CUDA build of torch first"
    "${PIP[@]}" "${OFFLINE[@]}" torch
  else
    echo "no torch in $PY: installing it from the registry (its Linux x86-64 wheels are CUDA builds)"
    "${PIP[@]}" torch
  fi
  desc=$(torch_desc) || die "torch does not import after installing it"
fi
read -r TORCH_VERSION TORCH_CUDA TORCH_GPU <<<"$desc"
echo "python $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])'); torch $TORCH_VERSION (CUDA $TORCH_CUDA)"
if [ "$DEVICE" = cuda ]; then
  [ "$TORCH_CUDA" != none ] || die "torch $TORCH_VERSION here is a CPU build; this script never replaces an installed torch: install a CUDA build, or run --quick --device cpu"
  [ "$TORCH_GPU" = 1 ] || die "torch $TORCH_VERSION sees no CUDA device here (nvidia-smi?); on a machine without one run --quick --device cpu"
fi
echo "torch==$TORCH_VERSION" >"$WORK/constraints.txt"  # nothing installed below may move torch

# the Python packages the check imports (module:distribution)
missing=$("$PY" - datasets:datasets pytest:pytest transformers:transformers typer:typer rich:rich \
  tokenizers:tokenizers yaml:pyyaml safetensors:safetensors numpy:numpy <<'EOF'
import importlib.util, sys
print(" ".join(d for m, d in (a.split(":") for a in sys.argv[1:]) if importlib.util.find_spec(m) is None))
EOF
)
INSTALLED=()
if [ -n "$missing" ]; then
  echo "installing $missing${WHEELS:+ from $WHEELS}"
  # shellcheck disable=SC2086
  if ! "${PIP[@]}" "${OFFLINE[@]}" -c "$WORK/constraints.txt" $missing; then
    [ -n "$WHEELS" ] || die "could not install $missing"
    echo "the resolver refused (see above); installing the folder's wheels that are not installed, without their dependency checks"
    for whl in "$WHEELS"/*.whl; do
      name=$(basename "$whl" | cut -d- -f1)
      "$PY" -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "$name" 2>/dev/null \
        || "${PIP[@]}" --no-index --no-deps "$whl"
    done
  fi
  read -r -a INSTALLED <<<"$missing"
fi

# llmctl itself, without dependencies; the check always runs this checkout's code (PYTHONPATH)
if (cd / && "$PY" -c 'import llmctl, pathlib, sys; sys.exit(pathlib.Path(llmctl.__file__).resolve().parents[1] != pathlib.Path(sys.argv[1]).resolve())' "$ROOT") 2>/dev/null; then
  LLMCTL_MODE="already installed from $ROOT"
elif "${PIP[@]}" "${OFFLINE[@]}" --no-deps --no-build-isolation -e "$ROOT"; then
  LLMCTL_MODE="pip install --no-deps -e $ROOT"
else
  LLMCTL_MODE="not installed (pip failed); run from $ROOT through PYTHONPATH"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
echo "llmctl: $LLMCTL_MODE"

"$PY" - "$WORK/install.json" "$TORCH_VERSION" "$TORCH_CUDA" "$TORCH_KEPT" "${WHEELS:-}" "$LLMCTL_MODE" "${INSTALLED[@]}" <<'EOF'
import json, sys
path, torch, cuda, kept, wheels, llmctl, *installed = sys.argv[1:]
json.dump({"python": sys.version.split()[0], "torch": torch, "torch_cuda": None if cuda == "none" else cuda,
           "torch_kept": kept == "true", "wheels": wheels or None, "installed": installed, "llmctl": llmctl},
          open(path, "w"))
EOF

NOW=$(date +%s)
args=(--out "$OUT" --work "$WORK" --device "$DEVICE" --deadline $((START + BUDGET)) --install-json "$WORK/install.json"
      --install-seconds $((NOW - START)))
[ -n "$QUICK" ] && args+=(--quick)
[ -n "$STEPS" ] && args+=(--steps "$STEPS")
status=0
"$PY" "$ROOT/scripts/gpu_check.py" "${args[@]}" || status=$?
echo "gpu check: $(($(date +%s) - START)) s in all"
exit $status
