#!/usr/bin/env bash
# Runs the model, attention, sampler, DiPO and accelerator-check test files under other JAX
# releases, each in a throw-away venv on the CPU. Not CI (CI keeps constraints.txt's jax).
#
#   bash scripts/check_jax_versions.sh [VERSION ...]
#
# Default: the newest jax 0.11.x the package index offers (an error naming what it offers when
# there is none). jax 0.11 needs Python >= 3.12: PYTHON=/path/to/python3.12 picks the interpreter
# of the venvs (default python3). WHEELS=DIR adds a folder of jax/jaxlib wheels (pip
# --find-links), for an index that lags behind. flax follows jax (flax 0.12.8 imports only with
# jax 0.10, flax >= 0.12.9 needs jax >= 0.11.1), so pip picks the newest flax that fits; every
# other package keeps the version in constraints.txt. Prints one line per version: the pytest
# summary, or the step that failed; exits 1 when any version failed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PY_VERSION=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
FILES=(tests/test_model_parity.py tests/test_attention.py tests/test_attention_pallas_gpu.py
       tests/test_attention_splash.py tests/test_sampler.py tests/test_dipo.py
       tests/test_accelerator_check.py)
FIND_LINKS=()
[ -n "${WHEELS:-}" ] && FIND_LINKS=(--find-links "$WHEELS")

newest_011() {
  local offered
  offered=$("$PYTHON" -m pip index versions jax "${FIND_LINKS[@]}" 2>/dev/null \
            | sed -n 's/^Available versions: //p' | tr -d ' ' | tr ',' '\n')
  local pick
  pick=$(printf '%s\n' $offered | grep -E '^0\.11\.[0-9]+$' | sort -t. -k3,3n | tail -1 || true)
  if [ -z "$pick" ]; then
    echo "check_jax_versions: the package index offers no jax 0.11.x (newest: $(printf '%s\n' $offered | head -1));" \
         "pass versions as arguments or set WHEELS=DIR" >&2
    exit 2
  fi
  echo "$pick"
}

needs_python_312() {  # jax >= 0.11 is published for Python >= 3.12 only; no VERSION means 0.11
  [ $# -eq 0 ] && return 0
  local v
  for v; do case "$v" in 0.10.*|0.[0-9].*) ;; *) return 0 ;; esac; done
  return 1
}
if needs_python_312 "$@" && ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
  echo "check_jax_versions: jax 0.11 and newer need Python >= 3.12, and $PYTHON is $PY_VERSION;" \
       "set PYTHON=/path/to/python3.12" >&2
  exit 2
fi

VERSIONS=("$@")
[ ${#VERSIONS[@]} -gt 0 ] || VERSIONS=("$(newest_011)")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
grep -v -E '^(jax|jaxlib|flax)==' constraints.txt > "$WORK/constraints.txt"
SUMMARY=()
status=0
for version in "${VERSIONS[@]}"; do
  venv="$WORK/venv-$version"
  "$PYTHON" -m venv "$venv"
  log="$WORK/jax-$version.log"
  echo "== jax $version: installing into $venv (Python $PY_VERSION)" >&2
  if ! { "$venv/bin/python" -m pip install -q --upgrade pip \
         && "$venv/bin/python" -m pip install -q -c "$WORK/constraints.txt" "${FIND_LINKS[@]}" \
              "jax==$version" "jaxlib==$version" -e ".[test]" \
         && "$venv/bin/python" -m pip install -q --no-deps -c "$WORK/constraints.txt" lmdeploy; } >"$log" 2>&1; then
    tail -5 "$log" >&2
    SUMMARY+=("jax $version: install failed (see above; the jax range is pyproject.toml's)")
    status=1
    continue
  fi
  echo "== jax $version: $("$venv/bin/python" -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__)')" >&2
  set +e
  "$venv/bin/python" -m pytest -q -p no:cacheprovider "${FILES[@]}" 2>&1 | tee "$log" >&2
  set -e
  result=$(grep -E '^=*.*[0-9]+ (passed|failed|errors?)' "$log" | tail -1 || true)
  [ -n "$result" ] || result="pytest did not run the tests: $(grep -m1 -E 'Error|error' "$log" || tail -1 "$log")"
  flax=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("flax"))')
  SUMMARY+=("jax $version (flax $flax, Python $PY_VERSION): $result")
  case "$result" in *failed*|*error*|"pytest did not"*) status=1 ;; esac
done
printf '%s\n' "${SUMMARY[@]}"
exit $status
