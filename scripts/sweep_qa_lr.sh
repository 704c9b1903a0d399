#!/bin/bash
cd "$(dirname "$0")/.."  # run from the repository root
# rl.lr per algorithm on the QA default, seed 0, read on validation: every algorithm gets
# the same grid, from the warm start of runs/qa_compare/seed_0 (shared, not retrained).
PY=${PY:-.venv/bin/python}
sweep() {
  for alg in "$@"; do
    $PY -m fgrpo_jax.compare --config=configs/multihop_qa.py --workdir=runs/qa_compare \
      --config.compare.sweep_field=rl.lr "--config.compare.sweep_values=(1e-5,3e-5,1e-4)" \
      --config.compare.sweep_algorithm=$alg --config.compare.first_seed=0 --config.compare.seeds=1 \
      > runs/qa_sweep_lr_$alg.log 2>&1
  done
}
sweep fgrpo decoupled decoupled_sft &
sweep grpo sft &
wait
