#!/usr/bin/env bash
# Creates .venv-tpu: jax[tpu] (libtpu, the real XLA:TPU and Mosaic compilers) and dirl-jax's own
# dependencies, no torch. It compiles a run's programs for a TPU slice on a CPU-only host:
#   bash scripts/setup_tpu_compile.sh
#   .venv-tpu/bin/python -m dirl_jax.compile_check --config configs/sft_sdar8b.py --model SDAR-8B \
#       --topology v5p-64 --out runs/compile_sft_sdar8b
# The TPU wheels need Python >= 3.12: PYTHON=/path/to/python3.12 picks the interpreter; otherwise
# the first of python3.13, python3.12 on PATH, then pyenv's 3.12+ installs. Versions: constraints-tpu.txt
# over constraints.txt. Re-running with the same pins does nothing (stamp .venv-tpu/.dirl-pins).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-tpu}

is_312() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; }

find_python() {
  if [ -n "${PYTHON:-}" ]; then
    is_312 "$PYTHON" && { echo "$PYTHON"; return; }
    echo "setup_tpu_compile: PYTHON=$PYTHON is $("$PYTHON" -V 2>&1 || echo 'not found'); the TPU wheels need Python >= 3.12" >&2
    return 1
  fi
  local candidate
  for candidate in python3.13 python3.12 python3; do
    command -v "$candidate" >/dev/null && is_312 "$(command -v "$candidate")" && { command -v "$candidate"; return; }
  done
  local root
  root=$( (pyenv root 2>/dev/null) || echo "${PYENV_ROOT:-$HOME/.pyenv}")
  for candidate in $(ls -d "$root"/versions/3.1[2-9]*/bin/python3 2>/dev/null | sort -V -r); do
    is_312 "$candidate" && { echo "$candidate"; return; }
  done
  echo "setup_tpu_compile: no Python >= 3.12 found (PATH, pyenv). Install one (e.g. 'pyenv install 3.12'," \
       "'apt-get install python3.12 python3.12-venv' or 'uv python install 3.12'), then run" \
       "PYTHON=/path/to/python3.12 bash scripts/setup_tpu_compile.sh" >&2
  return 1
}

PY=$(find_python) || exit 2
PINS=$(cat constraints.txt constraints-tpu.txt pyproject.toml | sha256sum | cut -c1-16)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.dirl-pins" 2>/dev/null)" = "$PINS" ]; then
  echo "setup_tpu_compile: $VENV is up to date ($("$VENV/bin/python" -V))"
  exit 0
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
grep -v -E '^(jax|jaxlib|flax|libtpu)==' constraints.txt > "$WORK/constraints.txt"
grep -E '^[a-z]' constraints-tpu.txt >> "$WORK/constraints.txt"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -c "$WORK/constraints.txt" "jax[tpu]" pytest -e .
"$VENV/bin/python" -c 'import jax, jaxlib, flax, libtpu; print("setup_tpu_compile:", "jax", jax.__version__, "flax", flax.__version__)'
echo "$PINS" > "$VENV/.dirl-pins"
