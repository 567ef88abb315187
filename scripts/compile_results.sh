#!/usr/bin/env bash
# Regenerates docs/results/compile_*.json: the paper's recipes compiled for TPU slices by
# python -m dirl_jax.compile_check (in .venv-tpu; bash scripts/setup_tpu_compile.sh first).
#
#   bash scripts/compile_results.sh [MODEL:SLICE ...]     (default: the table of docs/SCALING.md)
#   RECIPES=dipo bash scripts/compile_results.sh ...      (one recipe only: sft or dipo)
#
# Each MODEL:SLICE compiles configs/sft_sdar8b.py and configs/dipo_sdar8b.py with --model MODEL
# on the slice, at the per-chip micro-batch the planner picks (SFT: grad_accum; DiPO: one canvas
# row per data x fsdp shard, 64 engine slots per host), with --compare-plan. One 8B program takes
# 2-4 minutes on a 2-core host. Prints the summary table of every docs/results/compile_*.json at
# the end; exit status 1 when any compile check failed (the JSON says why).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv-tpu/bin/python
[ -x "$PY" ] || { echo "compile_results: run bash scripts/setup_tpu_compile.sh first" >&2; exit 2; }
PAIRS=("$@")
[ ${#PAIRS[@]} -gt 0 ] || PAIRS=(SDAR-8B:v5p-64 SDAR-8B:v5p-8 SDAR-8B:v5litepod-256 SDAR-8B:v6e-64
                                 SDAR-4B:v5p-64 SDAR-1.7B:v5p-64)
mkdir -p docs/results
status=0
for pair in "${PAIRS[@]}"; do
  model=${pair%%:*}; slice=${pair#*:}
  # the planner's default mesh and micro-batch for SFT on this slice (JSON: mesh, grad_accum)
  read -r data fsdp tensor accum chips < <("$PY" - "$model" "$slice" <<'PY'
import sys
from dirl_jax.sizing import plan
from dirl_jax.sizing.chips import parse_slice
model, name = sys.argv[1], sys.argv[2]
s = parse_slice(name)
hw = plan.Hardware(name, s.chips, s.chip.hbm_bytes / plan.GIB, s.chip.peak_flops / 1e12, chips_per_host=4)
p = plan.choose_plan(model, plan.SDAR_MODELS[model], plan.Workload(), hw)
print(p.mesh.data, p.mesh.fsdp, p.mesh.tensor, p.grad_accum, s.chips)
PY
)
  tag=$(echo "${model}_${slice}" | tr 'A-Z.' 'a-z_' | tr -d '-')
  if [[ " ${RECIPES:-sft dipo} " == *" sft "* ]]; then
  echo "== $model on $slice: SFT mesh ${data}x${fsdp}x${tensor}, grad_accum $accum" >&2
  "$PY" -m dirl_jax.compile_check --config configs/sft_sdar8b.py --model "$model" --topology "$slice" \
      --config.mesh.data=0 --config.mesh.fsdp="$fsdp" --config.mesh.tensor="$tensor" \
      --config.train.grad_accum="$accum" --compare-plan --out "runs/compile/sft_$tag" || status=1
  cp "runs/compile/sft_$tag/compile_report.json" "docs/results/compile_sft_$tag.json" 2>/dev/null
  fi
  [[ " ${RECIPES:-sft dipo} " == *" dipo "* ]] || continue
  rows=$((chips / tensor))
  slots=64  # per host (4 chips in every topology here): 16 rows of the 8k-token cache per chip
  echo "== $model on $slice: DiPO mesh 0x${fsdp}x${tensor}, canvas_rows $rows, slots $slots" >&2
  "$PY" -m dirl_jax.compile_check --config configs/dipo_sdar8b.py --model "$model" --topology "$slice" \
      --config.mesh.data=0 --config.mesh.fsdp="$fsdp" --config.mesh.tensor="$tensor" \
      --config.train.canvas_rows="$rows" --config.rollout.slots="$slots" --compare-plan \
      --out "runs/compile/dipo_$tag" || status=1
  cp "runs/compile/dipo_$tag/compile_report.json" "docs/results/compile_dipo_$tag.json" 2>/dev/null
done
echo "== summary (docs/SCALING.md)" >&2
"$PY" -m dirl_jax.sizing.summary docs/results/compile_*.json
exit $status
