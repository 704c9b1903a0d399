#!/bin/bash
# Issue "RL that measurably learns": the one-factor sweep of the RL settings on
# validation (seed 0), every run from the same short SFT warm start (300 steps) so
# that RL has room to improve. Two runs at a time (one per core). Results:
# runs/sweep3/<name>/metrics.jsonl (val_* rows) and eval.json; summarised by
# scripts/sweep_table.py.
cd "$(dirname "$0")/.."  # run from the repository root
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/sweep3}
WARM=${WARM:-$OUT/warm_start}
COMMON="--config=configs/recsys.py:one_target --config.seed=0 --config.sft.steps=300 --config.rl.steps=300 \
 --config.eval.every=100 --config.eval.val_examples=2000"
mkdir -p "$OUT"
if [ ! -f "$WARM/eval.json" ]; then  # the warm start every run starts from
  $PY -m fgrpo_jax.main $COMMON --config.rl.steps=0 --workdir="$WARM" > "$OUT/warm_start.log" 2>&1 || exit 1
fi
# name, then the overrides of the one setting it changes (rl.lr 3e-4 elsewhere).
SETTINGS=(
  "sft_continuation --config.algorithm=sft"
  "lr_1e-4 --config.rl.lr=1e-4"
  "temperature_0.7 --config.rollout.temperature=0.7"
  "group_16 --config.rollout.group_size=16 --config.rl.batch_prompts=8"
  "advantage_std --config.reward.advantage=std"
  "kl_0.05 --config.rl.kl_coef=0.05"
  "inner_1 --config.rl.inner_steps=1"
  "inner_4 --config.rl.inner_steps=4"
  "kl_0.01 --config.rl.kl_coef=0.01"
  "grpo --config.algorithm=grpo"
  "rank_ideal_slate --config.reward.rank_ideal=slate"
  "fgrpo --config.algorithm=fgrpo"
  "steps_1000 --config.rl.steps=1000 --config.eval.every=250"
)
run_one() {
  name=$1; shift
  [ -f "$OUT/$name/eval.json" ] && return 0  # finished earlier
  $PY -m fgrpo_jax.main $COMMON --config.sft.init_from="$WARM" "$@" --workdir="$OUT/$name" \
    > "$OUT/$name.log" 2>&1
}
export -f run_one; export PY OUT WARM COMMON
printf '%s\n' "${SETTINGS[@]}" | xargs -P "${JOBS:-2}" -I{} bash -c 'run_one {}'
