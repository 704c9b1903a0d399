#!/bin/bash
cd "$(dirname "$0")/.."  # run from the repository root
# The 3-seed comparison on configs/recsys.py:one_target (issue 13), seeds as parallel processes,
# then one call that gathers them (every run reused) into compare.json / compare.md.
ARGS="--config=configs/recsys.py:one_target --config.compare.algorithms=fgrpo,grpo,sft --config.compare.lr=fgrpo=3e-4,grpo=3e-4,sft=3e-4 --config.compare.pointwise=False --config.eval.val_examples=2000 --workdir=runs/compare_default"
for s in 0 1 2; do
  .venv/bin/python -m fgrpo_jax.compare $ARGS --config.compare.first_seed=$s --config.compare.seeds=1 > runs/compare_default_seed$s.log 2>&1 &
done
wait
.venv/bin/python -m fgrpo_jax.compare $ARGS --config.compare.seeds=3 > runs/compare_default_gather.log 2>&1
