#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (single host or pod) from your workstation:
# create the TPU, copy this repo to every worker, install, run fgrpo_jax.main on all
# workers at once, copy each worker's log back, delete the TPU.
#
#   bash launch/tpu_pod.sh --name=fgrpo-v4 --zone=us-central2-b --accelerator=v4-32 \
#       --workdir=gs://BUCKET/runs/recsys --config=configs/recsys.py --config.rl.steps=400
#   bash launch/tpu_pod.sh ... --dry-run    # print the commands, one per line, run nothing
#
# Flags:
#   --name=NAME            TPU name (required)
#   --zone=ZONE            zone (required)
#   --accelerator=TYPE     accelerator type, e.g. v4-8, v4-32, v5litepod-64, v6e-64 (default v4-8)
#   --version=RUNTIME      TPU software version (default: the base image of the accelerator)
#   --project=PROJECT      GCP project (default: gcloud's)
#   --spot                 create a Spot TPU
#   --num-workers=N        hosts in the slice (default: derived from --accelerator)
#   --config=FILE          training config (default configs/recsys.py)
#   --workdir=DIR          workdir on every worker; use gs://... on multi-host slices so
#                          checkpoints and eval.json land in one place (required)
#   --logs=DIR             where the workers' logs are copied (default launch_logs/NAME)
#   --skip-create          use an existing TPU called NAME (it is then not deleted)
#   --keep                 do not delete the TPU at the end
#   --dry-run              print the commands, one per line, and run nothing
#   --config.KEY=VALUE     config overrides, passed to fgrpo_jax.main (as is everything after --)
#
# The TPU is deleted on exit (also after a failed step) unless --keep or --skip-create.
set -euo pipefail

DRY_RUN=0
NAME=""
ZONE=""
ACCEL=v4-8
VERSION=""
PROJECT=""
SPOT=0
NUM_WORKERS=""
CONFIG=configs/recsys.py
WORKDIR=""
LOGS=""
SKIP_CREATE=0
KEEP=0
EXTRA=()

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

# Shell-quotes one word so that a printed command can be pasted back verbatim.
quote() {
  local safe='^[A-Za-z0-9_./:=@%+,-]+$' flag='^(--?[A-Za-z0-9_.-]+=)(.*)$'
  if [[ $1 =~ $safe ]]; then
    printf '%s' "$1"
  elif [[ $1 =~ $flag ]]; then  # --flag='value' reads better than '--flag=value'
    printf '%s' "${BASH_REMATCH[1]}"; quote "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
print_cmd() {
  local out="" word
  for word in "$@"; do out+="${out:+ }$(quote "$word")"; done
  printf '%s\n' "$out"
}
# Runs a command, or with --dry-run only prints it.
run() {
  if (( DRY_RUN )); then print_cmd "$@"; else echo "+ $(print_cmd "$@")" >&2; "$@"; fi
}

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

need_value() { [[ $# -ge 2 && $2 != --* ]] || die "$1 needs a value"; }
while (( $# )); do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --spot) SPOT=1 ;;
    --skip-create) SKIP_CREATE=1 ;;
    --keep) KEEP=1 ;;
    --name=*) NAME=${1#*=} ;;
    --name) need_value "$@"; NAME=$2; shift ;;
    --zone=*) ZONE=${1#*=} ;;
    --zone) need_value "$@"; ZONE=$2; shift ;;
    --accelerator=*|--accelerator-type=*) ACCEL=${1#*=} ;;
    --accelerator|--accelerator-type) need_value "$@"; ACCEL=$2; shift ;;
    --version=*) VERSION=${1#*=} ;;
    --version) need_value "$@"; VERSION=$2; shift ;;
    --project=*) PROJECT=${1#*=} ;;
    --project) need_value "$@"; PROJECT=$2; shift ;;
    --num-workers=*) NUM_WORKERS=${1#*=} ;;
    --num-workers) need_value "$@"; NUM_WORKERS=$2; shift ;;
    --config=*) CONFIG=${1#*=} ;;
    --config) need_value "$@"; CONFIG=$2; shift ;;
    --config.*) EXTRA+=("$1") ;;
    --workdir=*) WORKDIR=${1#*=} ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift ;;
    --logs=*) LOGS=${1#*=} ;;
    --logs) need_value "$@"; LOGS=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA+=("$@"); break ;;
    *) die "unknown flag $1 (see --help)" ;;
  esac
  shift
done
[[ -n $NAME ]] || die "--name is required"
[[ -n $ZONE ]] || die "--zone is required"
[[ -n $WORKDIR ]] || die "--workdir is required"

# Hosts of a slice: v2/v3 have 8 TensorCores per host; v4/v5p name TensorCores (2 per
# chip) with 4 chips per host; v5e/v6e name chips, 4 per host beyond one 8-chip host.
hosts_of() {
  local n=${1##*-}
  [[ $n =~ ^[0-9]+$ ]] || return 1
  case $1 in
    v2-*|v3-*|v4-*|v5p-*) echo $(( n <= 8 ? 1 : n / 8 )) ;;
    v5litepod-*|v5e-*|v6e-*) echo $(( n <= 8 ? 1 : n / 4 )) ;;
    *) return 1 ;;
  esac
}
runtime_of() {
  case $1 in
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}
if [[ -z $NUM_WORKERS ]]; then
  NUM_WORKERS=$(hosts_of "$ACCEL") ||
    die "cannot tell the hosts of --accelerator=$ACCEL; pass --num-workers"
fi
[[ $NUM_WORKERS =~ ^[1-9][0-9]*$ ]] || die "--num-workers must be a positive integer"
VERSION=${VERSION:-$(runtime_of "$ACCEL")}
LOGS=${LOGS:-launch_logs/$NAME}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARBALL=${TMPDIR:-/tmp}/fgrpo_jax-$NAME.tar.gz
REMOTE_DIR=fgrpo_jax  # relative to the home directory on every worker

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=("--zone=$ZONE")
if [[ -n $PROJECT ]]; then WHERE+=("--project=$PROJECT"); fi

# The command line of the trainer on a worker, quoted for the remote shell.
train_cmd=".venv/bin/python -m fgrpo_jax.main"
for arg in "--config=$CONFIG" "--workdir=$WORKDIR" "${EXTRA[@]}"; do train_cmd+=" $(quote "$arg")"; done
# distributed.maybe_initialize() calls jax.distributed.initialize() (which finds the
# other workers from the TPU metadata) only when told the run has several processes.
env_prefix=""
if (( NUM_WORKERS > 1 )); then env_prefix="JAX_NUM_PROCESSES=$NUM_WORKERS "; fi
INSTALL="set -euo pipefail; rm -rf $REMOTE_DIR; mkdir -p $REMOTE_DIR"
INSTALL+="; tar -xzf $REMOTE_DIR.tar.gz -C $REMOTE_DIR; cd $REMOTE_DIR"
INSTALL+="; bash launch/tpu_vm.sh --install-only --jax-extra=tpu"
TRAIN="set -o pipefail; cd $REMOTE_DIR && ${env_prefix}${train_cmd} 2>&1 | tee train.log"

# shellcheck disable=SC2317,SC2329  # invoked by the EXIT trap
delete_tpu() {
  local rc=$?
  trap - EXIT
  if (( ! SKIP_CREATE && ! KEEP )); then
    run "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet || rc=$(( rc ? rc : 1 ))
  fi
  exit "$rc"
}

if (( ! SKIP_CREATE )); then
  create=("${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" "--accelerator-type=$ACCEL"
          "--version=$VERSION")
  if (( SPOT )); then create+=(--spot); fi
  run "${create[@]}"
  trap delete_tpu EXIT
fi
run tar -czf "$TARBALL" --exclude=.git --exclude=.venv --exclude=runs --exclude=launch_logs \
    --exclude=__pycache__ --exclude='*.egg-info' -C "$REPO" .
run "${GCLOUD[@]}" scp "$TARBALL" "$NAME:$REMOTE_DIR.tar.gz" --worker=all "${WHERE[@]}"
run "${GCLOUD[@]}" ssh "$NAME" --worker=all "${WHERE[@]}" "--command=$INSTALL"
status=0
run "${GCLOUD[@]}" ssh "$NAME" --worker=all "${WHERE[@]}" "--command=$TRAIN" || status=$?
run mkdir -p "$LOGS"
for (( i = 0; i < NUM_WORKERS; i++ )); do
  run "${GCLOUD[@]}" scp "$NAME:$REMOTE_DIR/train.log" "$LOGS/worker-$i.log" "--worker=$i" \
      "${WHERE[@]}" || echo "tpu_pod.sh: could not copy the log of worker $i" >&2
done
if (( status )); then echo "tpu_pod.sh: training failed (exit $status); logs in $LOGS" >&2; fi
exit "$status"
