#!/bin/bash
cd "$(dirname "$0")/.." || exit 1  # run from the repository root
# rl.lr per algorithm on the QA default, seed 0, read on validation: every algorithm gets
# the same grid, from the warm start of runs/qa_compare/seed_0 (shared, not retrained).
# Extra compare arguments after the script's name are passed on; LRS sets the grid (the
# first QA sweep, on C = 5: LRS="(1e-5,3e-5,1e-4)" --config.data.pool_size=5 ...).
PY=${PY:-.venv/bin/python}
LRS=${LRS:-(1e-5,3e-5,1e-4,3e-4)}
WORKDIR=${WORKDIR:-runs/qa_compare}
sweep() {
  alg=$1
  shift
  for a in $alg; do
    $PY -m fgrpo_jax.compare --config=configs/multihop_qa.py --workdir="$WORKDIR" \
      --config.compare.sweep_field=rl.lr "--config.compare.sweep_values=$LRS" \
      --config.compare.sweep_algorithm="$a" --config.compare.first_seed=0 --config.compare.seeds=1 \
      "$@" > "$WORKDIR/sweep_lr_$a.log" 2>&1
  done
}
mkdir -p "$WORKDIR"
sweep "fgrpo decoupled decoupled_sft" "$@" &
sweep "grpo sft" "$@" &
wait
