#!/bin/bash
cd "$(dirname "$0")/.."  # run from the repository root
# The 3-seed comparison on configs/multihop_qa.py's default (issue 14), seeds as parallel
# processes, then one call that gathers them (every run reused) into compare.json / compare.md.
# Every algorithm runs at the config's rl.lr (3e-4): none was tuned, so none had more tuning.
PY=${PY:-.venv/bin/python}
ARGS="--config=configs/multihop_qa.py --workdir=runs/qa_compare"
for s in 0 1 2; do
  $PY -m fgrpo_jax.compare $ARGS --config.compare.first_seed=$s --config.compare.seeds=1 > runs/qa_compare_seed$s.log 2>&1 &
done
wait
$PY -m fgrpo_jax.compare $ARGS --config.compare.seeds=3 > runs/qa_compare_gather.log 2>&1
