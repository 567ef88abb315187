#!/usr/bin/env bash
# Runs one dirl-jax command on every worker of a Cloud TPU VM pod slice (optionally creating the
# slice and installing the code first), keeps a log per worker and copies the logs back here.
# Every worker runs the same command; dirl_jax.distributed lets jax.distributed.initialize()
# find the pod's layout on its own.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/tpu_pod_launch.sh --name NAME --zone ZONE [options] -- COMMAND [ARGS...]

  --name NAME              TPU VM name (env TPU_NAME)
  --zone ZONE              zone (env TPU_ZONE or CLOUDSDK_COMPUTE_ZONE)
  --project PROJECT        GCP project (env TPU_PROJECT or CLOUDSDK_CORE_PROJECT; default: gcloud's)
  --create                 create the slice first, with:
    --accelerator-type T   e.g. v5litepod-64, v5p-128 (env TPU_ACCELERATOR_TYPE)
    --version V            TPU software version (env TPU_VERSION; default from the type:
                           v5litepod-* v2-alpha-tpuv5-lite, v5p-* v2-alpha-tpuv5, v6e-* v2-alpha-tpuv6e)
  --repo-url URL           install by cloning URL on every worker (default: copy this working tree,
                           without .git, .venv, runs/ and checkpoints/)
  --ref REF                branch, tag or commit to check out with --repo-url (default: main)
  --skip-install           the code and .venv are already on the workers
  --remote-dir DIR         checkout directory on the workers, relative to home (default: dirl-jax)
  --workers N              number of TPU VM hosts (default: asked from gcloud when collecting logs)
  --log-dir DIR            local directory the logs are copied into (default:
                           runs/tpu_logs/NAME-<date>); on the workers they are
                           <remote dir>/runs/launch/<date>/<hostname>.log
  --dry-run                print the commands instead of running them
  -h, --help               this text

COMMAND runs in the checkout on every worker with its .venv activated, for example
  scripts/tpu_pod_launch.sh --name dirl-v5p --zone us-east5-a --create --accelerator-type v5p-128 \
      -- python -m dirl_jax.train --config configs/sft_sdar8b.py --config.init_from=JetLM/SDAR-8B-Chat
EOF
}

die() { echo "tpu_pod_launch.sh: $*" >&2; exit 2; }

# shellcheck source=scripts/launch_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/launch_lib.sh"

run() {
  show "$@"
  if ((DRY_RUN)); then return 0; fi
  "$@"
}

default_version() {
  case "$1" in
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no default --version for accelerator type '$1': pass --version" ;;
  esac
}

NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-${CLOUDSDK_COMPUTE_ZONE:-}}
PROJECT=${TPU_PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}
ACCELERATOR_TYPE=${TPU_ACCELERATOR_TYPE:-}
VERSION=${TPU_VERSION:-}
CREATE=0 INSTALL=1 DRY_RUN=0
REPO_URL="" REF=main REMOTE_DIR=dirl-jax WORKERS="" LOCAL_LOG_DIR=""

while (($#)); do
  case "$1" in
    --name) NAME=${2:?--name needs a value}; shift 2 ;;
    --zone) ZONE=${2:?--zone needs a value}; shift 2 ;;
    --project) PROJECT=${2:?--project needs a value}; shift 2 ;;
    --create) CREATE=1; shift ;;
    --accelerator-type) ACCELERATOR_TYPE=${2:?--accelerator-type needs a value}; shift 2 ;;
    --version) VERSION=${2:?--version needs a value}; shift 2 ;;
    --repo-url) REPO_URL=${2:?--repo-url needs a value}; shift 2 ;;
    --ref) REF=${2:?--ref needs a value}; shift 2 ;;
    --skip-install) INSTALL=0; shift ;;
    --remote-dir) REMOTE_DIR=${2:?--remote-dir needs a value}; shift 2 ;;
    --workers) WORKERS=${2:?--workers needs a value}; shift 2 ;;
    --log-dir) LOCAL_LOG_DIR=${2:?--log-dir needs a value}; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) usage >&2; die "unknown option '$1' (the command to run goes after --)" ;;
  esac
done
(($#)) || { usage >&2; die "no command given after --"; }
[[ -n $NAME ]] || die "--name (or TPU_NAME) is required"
[[ -n $ZONE ]] || die "--zone (or TPU_ZONE) is required"
[[ -z $WORKERS || $WORKERS =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive integer, got '$WORKERS'"

REPO=$(cd "$(dirname "$0")/.." && pwd)
RUN_ID=$(date +%Y%m%d-%H%M%S)
REMOTE_LOG_DIR=runs/launch/$RUN_ID
LOCAL_LOG_DIR=${LOCAL_LOG_DIR:-$REPO/runs/tpu_logs/$NAME-$RUN_ID}
GCLOUD_FLAGS=(--zone="$ZONE")
[[ -z $PROJECT ]] || GCLOUD_FLAGS+=(--project="$PROJECT")
printf -v COMMAND ' %q' "$@"

on_all_workers() { run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=all --command="$1"; }

create_slice() {
  [[ -n $ACCELERATOR_TYPE ]] || die "--create needs --accelerator-type (or TPU_ACCELERATOR_TYPE)"
  run gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_FLAGS[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="${VERSION:-$(default_version "$ACCELERATOR_TYPE")}"
}

copy_working_tree() {
  local tarball="${TMPDIR:-/tmp}/dirl-jax-$RUN_ID.tgz"
  run tar -czf "$tarball" -C "$REPO" --exclude=./.git --exclude=./.venv --exclude=./runs \
    --exclude=./checkpoints --exclude=__pycache__ --exclude='*.egg-info' .
  run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:dirl-jax.tgz" "${GCLOUD_FLAGS[@]}" --worker=all
  run rm -f "$tarball"
}

# Puts the code on every worker (a clone of --repo-url, or a copy of this working tree), then
# creates .venv with scripts/setup.sh and adds the TPU jax wheels.
install() {
  local fetch
  if [[ -n $REPO_URL ]]; then
    printf -v fetch '{ [ -d %q/.git ] || git clone %q %q; } && cd %q && git fetch origin %q && git checkout --detach FETCH_HEAD' \
      "$REMOTE_DIR" "$REPO_URL" "$REMOTE_DIR" "$REMOTE_DIR" "$REF"
  else
    copy_working_tree
    printf -v fetch 'mkdir -p %q && tar -xzf dirl-jax.tgz -C %q && rm dirl-jax.tgz && cd %q' \
      "$REMOTE_DIR" "$REMOTE_DIR" "$REMOTE_DIR"
  fi
  on_all_workers "set -e; $fetch && bash scripts/setup.sh && .venv/bin/python -m pip install -q -c constraints.txt -e '.[tpu]'"
}

# The command on every worker, its output also in <remote dir>/runs/launch/<date>/<hostname>.log.
run_everywhere() {
  on_all_workers "set -o pipefail; cd $(printf %q "$REMOTE_DIR") && mkdir -p $REMOTE_LOG_DIR && source .venv/bin/activate && {$COMMAND; } 2>&1 | tee $REMOTE_LOG_DIR/\$(hostname).log"
}

worker_count() {
  if [[ -n $WORKERS ]]; then echo "$WORKERS"; return; fi
  local describe=(gcloud compute tpus tpu-vm describe "$NAME" "${GCLOUD_FLAGS[@]}" --format='value(networkEndpoints.len())')
  if ((DRY_RUN)); then show "${describe[@]}" >&2; echo 1; return; fi  # dry run: worker 0 stands for all
  "${describe[@]}"
}

collect_logs() {
  local workers worker
  workers=$(worker_count)
  run mkdir -p "$LOCAL_LOG_DIR"
  for ((worker = 0; worker < workers; worker++)); do
    run gcloud compute tpus tpu-vm scp --recurse "$NAME:$REMOTE_DIR/$REMOTE_LOG_DIR" \
      "$LOCAL_LOG_DIR/worker-$worker" "${GCLOUD_FLAGS[@]}" --worker="$worker" \
      || echo "tpu_pod_launch.sh: could not copy the logs of worker $worker" >&2
  done
}

if ((CREATE)); then create_slice; fi
if ((INSTALL)); then install; fi
status=0
run_everywhere || status=$?
collect_logs
echo "logs: $LOCAL_LOG_DIR (exit status $status)"
exit "$status"
