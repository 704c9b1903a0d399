#!/usr/bin/env bash
# Install and train on the TPU VM this script runs on (one host: v4-8, v5litepod-8, v6e-8...).
#
#   gcloud compute tpus tpu-vm ssh NAME --zone=ZONE     # then, in a copy of the repo:
#   bash launch/tpu_vm.sh --config=configs/recsys.py --workdir=runs/recsys
#   bash launch/tpu_vm.sh --workdir=runs/x --config.rl.steps=50 -- --config.seed=1
#   bash launch/tpu_vm.sh --workdir=runs/x --dry-run    # print the commands, run nothing
#
# Flags:
#   --config=FILE[:VARIANT]  training config (default configs/recsys.py)
#   --workdir=DIR            checkpoints, metrics, eval.json (required unless --install-only)
#   --venv=DIR               virtualenv to create/use (default .venv in the repo)
#   --python-version=X.Y     Python of the virtualenv, fetched by uv if missing (default 3.11)
#   --jax-extra=NAME         jax extra to install: tpu | cuda12 | cpu (default tpu)
#   --skip-install           reuse an installed virtualenv
#   --install-only           install, do not train (tpu_pod.sh uses this on every worker)
#   --log=FILE               also write the training output to FILE
#   --dry-run                print the commands, one per line, and run nothing
#   --config.KEY=VALUE       config overrides, passed to fgrpo_jax.main (as is everything after --)
#
# Install: the requirements pin Python >= 3.11 wheels, older than most TPU VM images
# ship, so uv creates the virtualenv (downloading Python if needed).
set -euo pipefail

DRY_RUN=0
CONFIG=configs/recsys.py
WORKDIR=""
VENV=.venv
PY_VERSION=3.11
JAX_EXTRA=tpu
SKIP_INSTALL=0
INSTALL_ONLY=0
LOG=""
EXTRA=()

die() { echo "tpu_vm.sh: $*" >&2; exit 2; }

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
    --skip-install) SKIP_INSTALL=1 ;;
    --install-only) INSTALL_ONLY=1 ;;
    --config=*) CONFIG=${1#*=} ;;
    --config) need_value "$@"; CONFIG=$2; shift ;;
    --config.*) EXTRA+=("$1") ;;
    --workdir=*) WORKDIR=${1#*=} ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift ;;
    --venv=*) VENV=${1#*=} ;;
    --venv) need_value "$@"; VENV=$2; shift ;;
    --python-version=*) PY_VERSION=${1#*=} ;;
    --python-version) need_value "$@"; PY_VERSION=$2; shift ;;
    --jax-extra=*) JAX_EXTRA=${1#*=} ;;
    --jax-extra) need_value "$@"; JAX_EXTRA=$2; shift ;;
    --log=*) LOG=${1#*=} ;;
    --log) need_value "$@"; LOG=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA+=("$@"); break ;;
    *) die "unknown flag $1 (see --help)" ;;
  esac
  shift
done
(( INSTALL_ONLY )) || [[ -n $WORKDIR ]] || die "--workdir is required"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
JAX_VERSION=$(sed -n 's/^jax==//p' "$REPO/requirements.txt")
[[ -n $JAX_VERSION ]] || die "no jax==VERSION pin in $REPO/requirements.txt"
PY=$VENV/bin/python

run cd "$REPO"
if (( ! SKIP_INSTALL )); then
  run python3 -m pip install --user --quiet uv
  run python3 -m uv venv --python "$PY_VERSION" --allow-existing "$VENV"
  run python3 -m uv pip install --python "$PY" --quiet -r requirements.txt \
      "jax[$JAX_EXTRA]==$JAX_VERSION"
  run python3 -m uv pip install --python "$PY" --quiet --no-deps -e .
fi
(( INSTALL_ONLY )) && exit 0

TRAIN=("$PY" -m fgrpo_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" "${EXTRA[@]}")
if [[ -n $LOG ]]; then
  # The output goes to the terminal and to the log; the exit status is the trainer's.
  if (( DRY_RUN )); then
    echo "$(print_cmd "${TRAIN[@]}") 2>&1 | tee $(quote "$LOG")"
  else
    echo "+ $(print_cmd "${TRAIN[@]}") 2>&1 | tee $(quote "$LOG")" >&2
    "${TRAIN[@]}" 2>&1 | tee "$LOG"
  fi
else
  run "${TRAIN[@]}"
fi
