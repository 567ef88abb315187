#!/usr/bin/env bash
# Starts an LMDeploy OpenAI-compatible server (PyTorch engine, dLLM decoding) for an SDAR model
# directory written by `python -m torch_bridge.export`, in the background; waits until
# GET /v1/models answers 200 and prints the URL, PID and log file.
#
#   scripts/launch_lmdeploy.sh MODEL_DIR [PORT] [extra `lmdeploy serve api_server` args...]
#
# Environment overrides (defaults in brackets):
#   DLLM_BLOCK_LENGTH          [config.json's block_size, else 4] must equal the trained block size:
#                              LMDeploy never reads block_size from config.json
#   DLLM_UNMASKING_STRATEGY    [low_confidence_dynamic] | low_confidence_static | sequential
#   DLLM_DENOISING_STEPS       [DLLM_BLOCK_LENGTH]  (ignored by low_confidence_dynamic)
#   DLLM_CONFIDENCE_THRESHOLD  [0.9]  (DiRL's rollout threshold; LMDeploy's own default is 0.85)
#   LMDEPLOY_DTYPE             [bfloat16] auto | float16 | bfloat16
#   CACHE_MAX_ENTRY_COUNT      [0.8]  fraction of free GPU memory for the KV cache
#   PORT                       [23333] (the second argument wins)
#   HOST                       [127.0.0.1] 0.0.0.0 serves other machines (the trainer elsewhere)
#   LMDEPLOY_API_KEY           [$DIRL_API_KEY] the shared key: passed as --api-keys, so every
#                              endpoint but /health needs Authorization: Bearer (the trainer sends
#                              $DIRL_API_KEY); required: without one the script refuses to start
#                              unless INSECURE=1 (LMDeploy's /update_weights unpickles its body:
#                              whoever reaches an open server runs code on this node)
#   INSECURE                   [0] 1 = serve without a key (docs/SECURITY.md)
#   STARTUP_TIMEOUT            [900] seconds to wait for the server to become healthy
#   LMDEPLOY_LOG               [${TMPDIR:-/tmp}/lmdeploy-PORT.log]
#   LMDEPLOY_BIN / PYTHON      [lmdeploy / python3]
#
# --distributed-executor-backend ray is always passed: only the Ray executor implements the
# weight-update endpoints (/update_weights, /update_weights_from_distributed). The model's config
# class is remote code (configuration_sdar.py, the export's own file: a config class, no model
# code), hence --trust-remote-code: without it LMDeploy's generic fallback config has no RoPE
# parameters (tests/test_torch_bridge_export.py::test_lmdeploy_still_needs_the_exported_config_class).
set -euo pipefail

die() { echo "launch_lmdeploy: error: $*" >&2; exit 1; }

[[ $# -ge 1 ]] || die "usage: $0 MODEL_DIR [PORT] [extra lmdeploy serve api_server args...]"
MODEL_DIR=$1; shift
if [[ $# -ge 1 && $1 != -* ]]; then PORT=$1; shift; fi
PORT=${PORT:-23333}
HOST=${HOST:-127.0.0.1}
LMDEPLOY_API_KEY=${LMDEPLOY_API_KEY:-${DIRL_API_KEY:-}}
INSECURE=${INSECURE:-0}
PYTHON=${PYTHON:-python3}
LMDEPLOY_BIN=${LMDEPLOY_BIN:-lmdeploy}
STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-900}
LMDEPLOY_LOG=${LMDEPLOY_LOG:-${TMPDIR:-/tmp}/lmdeploy-${PORT}.log}

[[ $PORT =~ ^[0-9]+$ ]] || die "PORT must be a number, got '$PORT'"
if [[ -z $LMDEPLOY_API_KEY && $INSECURE != 1 ]]; then
  die "no API key: set DIRL_API_KEY (or LMDEPLOY_API_KEY) to a shared secret, e.g." \
      "export DIRL_API_KEY=\$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))'), or INSECURE=1" \
      "to serve without one (anyone who reaches port $PORT on $HOST can then run code on this node)"
fi
[[ -n $LMDEPLOY_API_KEY ]] || echo "launch_lmdeploy: warning: INSECURE=1: serving on $HOST:$PORT without an API key" >&2
[[ -d $MODEL_DIR ]] || die "$MODEL_DIR: not a directory (expected a model exported by torch_bridge.export)"
[[ -f $MODEL_DIR/config.json ]] || die "$MODEL_DIR: no config.json (expected a model exported by torch_bridge.export)"
[[ -f $MODEL_DIR/configuration_sdar.py ]] ||
  die "$MODEL_DIR: no configuration_sdar.py (export it with python -m torch_bridge.export)"
command -v "$LMDEPLOY_BIN" >/dev/null || die "'$LMDEPLOY_BIN' not found on PATH (set LMDEPLOY_BIN)"

config_block_size=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("block_size") or "")' \
  "$MODEL_DIR/config.json") || die "$MODEL_DIR/config.json: cannot be read as JSON"
DLLM_BLOCK_LENGTH=${DLLM_BLOCK_LENGTH:-${config_block_size:-4}}
if [[ -n $config_block_size && $DLLM_BLOCK_LENGTH != "$config_block_size" ]]; then
  die "DLLM_BLOCK_LENGTH=$DLLM_BLOCK_LENGTH differs from block_size=$config_block_size in $MODEL_DIR/config.json"
fi
DLLM_UNMASKING_STRATEGY=${DLLM_UNMASKING_STRATEGY:-low_confidence_dynamic}
DLLM_DENOISING_STEPS=${DLLM_DENOISING_STEPS:-$DLLM_BLOCK_LENGTH}
DLLM_CONFIDENCE_THRESHOLD=${DLLM_CONFIDENCE_THRESHOLD:-0.9}
LMDEPLOY_DTYPE=${LMDEPLOY_DTYPE:-bfloat16}
CACHE_MAX_ENTRY_COUNT=${CACHE_MAX_ENTRY_COUNT:-0.8}

URL="http://127.0.0.1:${PORT}"
auth_args=()
[[ -n $LMDEPLOY_API_KEY ]] && auth_args=(--api-keys "$LMDEPLOY_API_KEY")

# Prints the HTTP status of GET $URL/v1/models ("000" when nothing answers).
models_status() {
  local header=()
  [[ -n $LMDEPLOY_API_KEY ]] && header=(-H "Authorization: Bearer $LMDEPLOY_API_KEY")
  curl -s -o /dev/null -w '%{http_code}' --max-time 5 "${header[@]}" "$URL/v1/models" || true
}
command -v curl >/dev/null || die "curl not found on PATH (needed for the health check)"
[[ $(models_status) == 000 ]] || die "port $PORT already answers HTTP requests (choose another PORT)"

cmd=("$LMDEPLOY_BIN" serve api_server "$MODEL_DIR"
  --backend pytorch
  --trust-remote-code
  --server-name "$HOST" --server-port "$PORT"
  --dtype "$LMDEPLOY_DTYPE"
  --cache-max-entry-count "$CACHE_MAX_ENTRY_COUNT"
  --distributed-executor-backend ray
  --dllm-block-length "$DLLM_BLOCK_LENGTH"
  --dllm-unmasking-strategy "$DLLM_UNMASKING_STRATEGY"
  --dllm-denoising-steps "$DLLM_DENOISING_STEPS"
  --dllm-confidence-threshold "$DLLM_CONFIDENCE_THRESHOLD"
  "${auth_args[@]}" "$@")
shown=()  # the command line without the key
for arg in "${cmd[@]}"; do
  if [[ -n $LMDEPLOY_API_KEY && $arg == "$LMDEPLOY_API_KEY" ]]; then shown+=("<key>"); else shown+=("$arg"); fi
done
echo "launch_lmdeploy: ${shown[*]}" >&2
echo "launch_lmdeploy: log: $LMDEPLOY_LOG" >&2
nohup "${cmd[@]}" >"$LMDEPLOY_LOG" 2>&1 &
PID=$!

fail() {
  echo "launch_lmdeploy: error: $*" >&2
  echo "----- last 40 lines of $LMDEPLOY_LOG -----" >&2
  tail -n 40 "$LMDEPLOY_LOG" >&2 || true
  exit 1
}
deadline=$((SECONDS + STARTUP_TIMEOUT))
until [[ $(models_status) == 200 ]]; do
  kill -0 "$PID" 2>/dev/null || fail "the server (PID $PID) exited before becoming healthy"
  if ((SECONDS >= deadline)); then
    kill "$PID" 2>/dev/null || true
    fail "GET $URL/v1/models did not answer 200 within ${STARTUP_TIMEOUT}s; stopped PID $PID"
  fi
  sleep 2
done
echo "URL=$URL"
echo "PID=$PID"
echo "LOG=$LMDEPLOY_LOG"
