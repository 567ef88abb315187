#!/usr/bin/env bash
# dirl-jax on a SLURM GPU cluster: one process per node, driving all of that node's GPUs.
# Submit from the repository root (the job runs in $SLURM_SUBMIT_DIR); edit the placeholders
# below or override them on the command line (sbatch --nodes=4 ...):
#
#   sbatch --nodes=4 scripts/gpu_cluster_launch.sh --config configs/sft_sdar8b.py
#   bash scripts/gpu_cluster_launch.sh --dry-run --config configs/sft_sdar8b.py
#
#SBATCH --job-name=dirl-jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=dirl-jax-%j.out
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: sbatch [sbatch options] scripts/gpu_cluster_launch.sh [options] [--] ARGS...

Runs `srun python -m MODULE ARGS...` with one task per node. Every task finds its place in the
run from SLURM's variables (dirl_jax.distributed: process id SLURM_PROCID of SLURM_NTASKS,
coordinator = first host of the nodelist, port DIRL_COORDINATOR_PORT).

  --module M       Python module to run (default: dirl_jax.train)
  --python PATH    interpreter (default: <repo>/.venv/bin/python)
  --port N         coordinator port (default: DIRL_COORDINATOR_PORT or 12345)
  --dry-run        print what would run, outside SLURM too
  -h, --help       this text
USAGE
}

die() { echo "gpu_cluster_launch.sh: $*" >&2; exit 2; }

# sbatch runs a spooled copy of this file: the checkout is the submit directory
# shellcheck source=scripts/launch_lib.sh
source "${SLURM_SUBMIT_DIR:-$(dirname "${BASH_SOURCE[0]}")/..}/scripts/launch_lib.sh"

REPO=${SLURM_SUBMIT_DIR:-$(pwd)}
MODULE=dirl_jax.train
PYTHON=""
PORT=${DIRL_COORDINATOR_PORT:-12345}
DRY_RUN=0
while (($#)); do
  case "$1" in
    --module) MODULE=${2:?--module needs a value}; shift 2 ;;
    --python) PYTHON=${2:?--python needs a value}; shift 2 ;;
    --port) PORT=${2:?--port needs a value}; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
[[ $PORT =~ ^[1-9][0-9]*$ ]] && ((PORT < 65536)) || die "--port must be a TCP port, got '$PORT'"

# Process 0 (the coordinator) runs on the first node of the allocation.
NODELIST=${SLURM_JOB_NODELIST:-}
if [[ -n $NODELIST ]]; then
  HOSTS=$(scontrol show hostnames "$NODELIST")
  COORDINATOR="${HOSTS%%$'\n'*}:$PORT"
elif ((DRY_RUN)); then
  COORDINATOR="<first host of SLURM_JOB_NODELIST>:$PORT"
else
  die "not inside a SLURM allocation (SLURM_JOB_NODELIST is unset): submit with sbatch, or use --dry-run"
fi

export DIRL_COORDINATOR_PORT=$PORT
# srun no longer inherits sbatch's --cpus-per-task (SLURM >= 22.05).
[[ -z ${SLURM_CPUS_PER_TASK:-} ]] || export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
# The plans in docs/SCALING.md use up to 80% of HBM; JAX preallocates only 75% by default.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
echo "dirl-jax: ${SLURM_NNODES:-?} nodes x ${SLURM_GPUS_ON_NODE:-?} GPUs, coordinator $COORDINATOR"

COMMAND=(srun --ntasks-per-node=1 --kill-on-bad-exit=1 "$PYTHON" -u -m "$MODULE" "$@")
show "${COMMAND[@]}"
if ((DRY_RUN)); then exit 0; fi
cd "$REPO"
exec "${COMMAND[@]}"
