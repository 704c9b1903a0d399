#!/bin/bash
cd "$(dirname "$0")/.." || exit 1  # run from the repository root
# An ablation on the QA default through compare.sweep_field, 3 seeds as parallel processes
# (warm starts shared with scripts/compare_qa.sh's runs in the same WORKDIR), then the gather.
#   bash scripts/ablate_qa.sh reward.lam "(0.5,1.0,2.0)" [more compare arguments]
WORKDIR=${WORKDIR:-runs/qa_compare}
bash scripts/compare_seeds.sh "runs/qa_ablate_$1" --config=configs/multihop_qa.py --workdir="$WORKDIR" \
  --config.compare.sweep_field="$1" --config.compare.sweep_values="$2" "${@:3}"
