#!/bin/bash
cd "$(dirname "$0")/.."  # run from the repository root
# The 3-seed comparison on configs/multihop_qa.py's default (issue 14), seeds as parallel
# processes, then one call that gathers them (every run reused) into compare.json / compare.md.
#   bash scripts/compare_qa.sh                       # rl.lr per algorithm from scripts/sweep_qa_lr.sh
#   LRS=fgrpo=3e-4,grpo=3e-4,decoupled=3e-4,decoupled_sft=3e-4,sft=3e-4 \
#     WORKDIR=runs/qa_compare_lr3e-4 bash scripts/compare_qa.sh   # every algorithm at 3e-4
# The rates: the best validation hit@1 of each algorithm in scripts/sweep_qa_lr.sh (seed 0,
# the same grid 1e-5 / 3e-5 / 1e-4 for every algorithm).
PY=${PY:-.venv/bin/python}
LRS=${LRS-fgrpo=1e-5,grpo=1e-5,decoupled=1e-5,decoupled_sft=1e-4,sft=1e-4}
WORKDIR=${WORKDIR:-runs/qa_compare}
ARGS="--config=configs/multihop_qa.py --workdir=$WORKDIR --config.compare.lr=$LRS"
for s in 0 1 2; do
  $PY -m fgrpo_jax.compare $ARGS --config.compare.first_seed=$s --config.compare.seeds=1 > $WORKDIR.seed$s.log 2>&1 &
done
wait
$PY -m fgrpo_jax.compare $ARGS --config.compare.seeds=3 > $WORKDIR.gather.log 2>&1
