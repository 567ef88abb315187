#!/usr/bin/env bash
# Creates .venv (if needed) and installs dirl-jax with its test dependencies at tested versions.
# Usage: bash scripts/setup.sh            (CPU; torch CPU for the reference tests)
# LMDeploy's client-side classes (serialize_state_dict, FlattenedTensorBucket) are installed without
# their CUDA dependencies; on a GPU rollout node install lmdeploy normally instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
.venv/bin/python -m pip install -q --no-deps -c constraints.txt lmdeploy
