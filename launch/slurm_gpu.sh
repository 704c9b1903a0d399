#!/usr/bin/env bash
# Submit multi-node GPU training to Slurm (runs launch/slurm_gpu.sbatch on the nodes).
#
#   bash launch/slurm_gpu.sh --nodes=4 --gpus-per-node=8 --partition=gpu \
#       --workdir=/shared/runs/recsys --config=configs/recsys.py --config.rl.steps=400
#   bash launch/slurm_gpu.sh --install ...   # first create the venv with jax[cuda12]
#   bash launch/slurm_gpu.sh ... --dry-run   # print the commands, one per line, run nothing
#
# Flags:
#   --nodes=N              nodes, one JAX process each (default 2)
#   --gpus-per-node=G      GPUs per node (default 8)
#   --cpus-per-task=C      CPU cores per process (default 16)
#   --partition=P          Slurm partition (default: the cluster's)
#   --account=A            Slurm account (default: yours)
#   --time=HH:MM:SS        time limit (default 04:00:00)
#   --name=NAME            job name (default fgrpo)
#   --config=FILE          training config (default configs/recsys.py)
#   --workdir=DIR          on a filesystem all nodes share (required)
#   --venv=DIR             virtualenv on the shared filesystem (default .venv)
#   --port=N               coordinator port (default: derived from the job id)
#   --install              create/update the venv with the GPU requirements first
#   --python=PY            interpreter for --install, Python >= 3.11 (default python3)
#   --dry-run              print the commands, one per line, and run nothing
#   --config.KEY=VALUE     config overrides, passed to fgrpo_jax.main (as is everything after --)
#
# Logs: logs/<name>-<jobid>.out in the repository.
set -euo pipefail

DRY_RUN=0
NODES=2
GPUS=8
CPUS=16
PARTITION=""
ACCOUNT=""
TIME=04:00:00
JOB=fgrpo
CONFIG=configs/recsys.py
WORKDIR=""
VENV=.venv
PORT=""
INSTALL=0
PYTHON=python3
EXTRA=()

die() { echo "slurm_gpu.sh: $*" >&2; exit 2; }

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
    --install) INSTALL=1 ;;
    --nodes=*) NODES=${1#*=} ;;
    --nodes) need_value "$@"; NODES=$2; shift ;;
    --gpus-per-node=*) GPUS=${1#*=} ;;
    --gpus-per-node) need_value "$@"; GPUS=$2; shift ;;
    --cpus-per-task=*) CPUS=${1#*=} ;;
    --cpus-per-task) need_value "$@"; CPUS=$2; shift ;;
    --partition=*) PARTITION=${1#*=} ;;
    --partition) need_value "$@"; PARTITION=$2; shift ;;
    --account=*) ACCOUNT=${1#*=} ;;
    --account) need_value "$@"; ACCOUNT=$2; shift ;;
    --time=*) TIME=${1#*=} ;;
    --time) need_value "$@"; TIME=$2; shift ;;
    --name=*|--job-name=*) JOB=${1#*=} ;;
    --name|--job-name) need_value "$@"; JOB=$2; shift ;;
    --config=*) CONFIG=${1#*=} ;;
    --config) need_value "$@"; CONFIG=$2; shift ;;
    --config.*) EXTRA+=("$1") ;;
    --workdir=*) WORKDIR=${1#*=} ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift ;;
    --venv=*) VENV=${1#*=} ;;
    --venv) need_value "$@"; VENV=$2; shift ;;
    --port=*) PORT=${1#*=} ;;
    --port) need_value "$@"; PORT=$2; shift ;;
    --python=*) PYTHON=${1#*=} ;;
    --python) need_value "$@"; PYTHON=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA+=("$@"); break ;;
    *) die "unknown flag $1 (see --help)" ;;
  esac
  shift
done
[[ -n $WORKDIR ]] || die "--workdir is required"
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
JAX_VERSION=$(sed -n 's/^jax==//p' "$REPO/requirements.txt")
[[ -n $JAX_VERSION ]] || die "no jax==VERSION pin in $REPO/requirements.txt"

run cd "$REPO"
if (( INSTALL )); then
  run "$PYTHON" -m venv "$VENV"
  run "$VENV/bin/pip" install --quiet -r requirements.txt "jax[cuda12]==$JAX_VERSION"
  run "$VENV/bin/pip" install --quiet --no-deps -e .
fi
run mkdir -p logs
SBATCH=(sbatch "--job-name=$JOB" "--nodes=$NODES" --ntasks-per-node=1 "--gpus-per-node=$GPUS"
        "--cpus-per-task=$CPUS" "--time=$TIME" --output=logs/%x-%j.out "--chdir=$REPO")
if [[ -n $PARTITION ]]; then SBATCH+=("--partition=$PARTITION"); fi
if [[ -n $ACCOUNT ]]; then SBATCH+=("--account=$ACCOUNT"); fi
JOB_ARGS=("--config=$CONFIG" "--workdir=$WORKDIR" "--venv=$VENV")
if [[ -n $PORT ]]; then JOB_ARGS+=("--port=$PORT"); fi
run "${SBATCH[@]}" launch/slurm_gpu.sbatch "${JOB_ARGS[@]}" -- "${EXTRA[@]}"
