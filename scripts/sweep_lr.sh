#!/bin/bash
cd "$(dirname "$0")/.."  # run from the repository root
# Sweep of rl.lr per algorithm on seed 0 (validation), short warm start.
set -x
COMMON="--config.sft.steps=300 --config.rl.steps=300 --config.eval.every=100 --config.eval.val_examples=2000 --config.compare.seeds=1 --config.compare.pointwise=False --workdir=runs/sweep2"
for alg in fgrpo grpo sft; do
  .venv/bin/python -m fgrpo_jax.compare --config=configs/recsys.py:one_target,sweep_lr --config.compare.sweep_algorithm=$alg --config.compare.sweep_values="(3e-4,1e-3)" $COMMON
done
