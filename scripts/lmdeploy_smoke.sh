#!/usr/bin/env bash
# GPU smoke test of the LMDeploy bridge (see scripts/lmdeploy_smoke.py): exports MODEL_OR_RUN_DIR
# for serving, starts an LMDeploy server on it (scripts/launch_lmdeploy.sh, DiRL's fork), runs the
# checks, stops the server.
#   scripts/lmdeploy_smoke.sh MODEL_OR_RUN_DIR [PORT]
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 1 ]] || { echo "usage: $0 MODEL_OR_RUN_DIR [PORT]" >&2; exit 1; }
SOURCE=$1; PORT=${2:-23333}
OUT=${OUT:-$(mktemp -d)/export}
PYTHON=${PYTHON:-.venv/bin/python}
# the server and the client share a key (launch_lmdeploy.sh requires one; LMDeployEngine reads it)
export DIRL_API_KEY=${DIRL_API_KEY:-$("$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(32))')}
"$PYTHON" -m torch_bridge.export --checkpoint "$SOURCE" --out "$OUT" --dtype bfloat16
# JAX shares the GPU with the server: keep both away from the whole memory
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.35}
export CACHE_MAX_ENTRY_COUNT=${CACHE_MAX_ENTRY_COUNT:-0.3}
LAUNCH=$(scripts/launch_lmdeploy.sh "$OUT" "$PORT")
echo "$LAUNCH"
PID=$(echo "$LAUNCH" | sed -n 's/.*PID[= :]*\([0-9][0-9]*\).*/\1/p' | head -1)
trap '[[ -n "${PID:-}" ]] && kill "$PID" 2>/dev/null || true' EXIT
"$PYTHON" scripts/lmdeploy_smoke.py --model "$OUT" --server "http://127.0.0.1:$PORT" \
    --json "${JSON:-lmdeploy_smoke.json}"
