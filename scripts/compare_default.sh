#!/bin/bash
cd "$(dirname "$0")/.." || exit 1  # run from the repository root
# The 3-seed comparison on configs/recsys.py:one_target (issue 13), seeds as parallel processes,
# then one call that gathers them (every run reused) into compare.json / compare.md.
bash scripts/compare_seeds.sh runs/compare_default --config=configs/recsys.py:one_target \
  --config.compare.algorithms=fgrpo,grpo,sft --config.compare.lr=fgrpo=3e-4,grpo=3e-4,sft=3e-4 \
  --config.compare.pointwise=False --config.eval.val_examples=2000 --workdir=runs/compare_default
