#!/bin/bash
# One fgrpo_jax.compare run over seeds 0..SEEDS-1: every seed as its own parallel process
# (each trains or reuses its warm start and runs), then one call that gathers them all
# (every run reused) into compare.json / compare.md. The launcher of scripts/compare_*.sh
# and scripts/ablate_qa.sh.
#   bash scripts/compare_seeds.sh LOG_STEM COMPARE_ARGS...
#   e.g. bash scripts/compare_seeds.sh runs/qa_compare --config=configs/multihop_qa.py --workdir=runs/qa_compare
# Logs: LOG_STEM.seed<S>.log per seed, LOG_STEM.gather.log. PY (default .venv/bin/python)
# and SEEDS (default 3) from the environment.
cd "$(dirname "$0")/.." || exit 1  # run from the repository root
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-3}
stem=$1
shift
for ((s = 0; s < SEEDS; s++)); do
  "$PY" -m fgrpo_jax.compare "$@" --config.compare.first_seed="$s" --config.compare.seeds=1 > "$stem.seed$s.log" 2>&1 &
done
wait
"$PY" -m fgrpo_jax.compare "$@" --config.compare.seeds="$SEEDS" > "$stem.gather.log" 2>&1
