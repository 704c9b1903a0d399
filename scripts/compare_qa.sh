#!/bin/bash
cd "$(dirname "$0")/.." || exit 1  # run from the repository root
# The 3-seed comparison on configs/multihop_qa.py's default (issue 14), seeds as parallel
# processes, then one call that gathers them (every run reused) into compare.json / compare.md.
#   bash scripts/compare_qa.sh                       # rl.lr per algorithm from scripts/sweep_qa_lr.sh
#   LRS=fgrpo=3e-4,grpo=3e-4,decoupled=3e-4,decoupled_sft=3e-4,sft=3e-4 \
#     WORKDIR=runs/qa_compare_lr3e-4 bash scripts/compare_qa.sh   # every algorithm at 3e-4
# The rates: the best validation hit@1 of each algorithm in scripts/sweep_qa_lr.sh on the
# C = 6 default (seed 0, the same grid 1e-5 / 3e-5 / 1e-4 / 3e-4 for every algorithm, a tie
# within 0.004 to the smaller rate). The C = 5 runs used the earlier sweep's rates:
#   LRS=fgrpo=1e-5,grpo=1e-5,decoupled=1e-5,decoupled_sft=1e-4,sft=1e-4
# Extra compare arguments after the script's name are passed on.
LRS=${LRS-fgrpo=3e-5,grpo=3e-5,decoupled=1e-5,decoupled_sft=1e-5,sft=1e-5}
WORKDIR=${WORKDIR:-runs/qa_compare}
bash scripts/compare_seeds.sh "$WORKDIR" --config=configs/multihop_qa.py --workdir="$WORKDIR" \
  --config.compare.lr="$LRS" "$@"
