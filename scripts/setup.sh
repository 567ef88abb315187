#!/usr/bin/env bash
# Creates .venv (if needed) and installs dirl-jax with its test dependencies at tested versions,
# then .venv-tpu (scripts/setup_tpu_compile.sh) where a Python >= 3.12 is found.
# Usage: bash scripts/setup.sh            (CPU; torch CPU for the reference tests)
# LMDeploy's client-side classes (serialize_state_dict, FlattenedTensorBucket) are installed without
# their CUDA dependencies; on a GPU rollout node install lmdeploy normally instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "setup: dirl-jax needs Python >= 3.11; $PYTHON is $("$PYTHON" -V 2>/dev/null || echo 'not found')." \
       "Run PYTHON=/path/to/python3.11 bash scripts/setup.sh" >&2
  exit 2
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
.venv/bin/python -m pip install -q --no-deps -c constraints.txt lmdeploy
# The TPU compile environment (.venv-tpu: jax[tpu], for python -m dirl_jax.compile_check and its
# tests) needs Python >= 3.12; without one the suite skips those tests, saying so.
if ! bash scripts/setup_tpu_compile.sh; then
  echo "setup: .venv-tpu not made (see above); the TPU compile tests will be skipped" >&2
fi
