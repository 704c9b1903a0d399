#!/bin/bash
cd "$(dirname "$0")/.."  # run from the repository root
# An ablation on the QA default through compare.sweep_field, 3 seeds as parallel processes
# (warm starts shared with scripts/compare_qa.sh's runs/qa_compare), then the gather.
#   bash scripts/ablate_qa.sh reward.lam "(0.5,1.0,2.0)"
PY=${PY:-.venv/bin/python}
ARGS="--config=configs/multihop_qa.py --workdir=runs/qa_compare --config.compare.sweep_field=$1 --config.compare.sweep_values=$2"
for s in 0 1 2; do
  $PY -m fgrpo_jax.compare $ARGS --config.compare.first_seed=$s --config.compare.seeds=1 > runs/qa_ablate_$1.seed$s.log 2>&1 &
done
wait
$PY -m fgrpo_jax.compare $ARGS --config.compare.seeds=3 > runs/qa_ablate_$1.gather.log 2>&1
