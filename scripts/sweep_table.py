"""Markdown table of a one-factor RL sweep (scripts/sweep_rl.sh): one row per run.

For each run directory under --sweep (and the warm start they all start from):
validation hit@1 at every evaluation of the RL stage, the final validation ndcg@5 and
slate recall, the change of final validation hit@1 against the warm start's, the
RL-stage diagnostics averaged over the first and the last fifth of the logged steps
(sampled R_rank, entropy per choice, groups without slate signal), the test hit@1
(reported, never used to choose) and the wall time.

    python scripts/sweep_table.py --sweep=runs/sweep3 > runs/sweep3/table.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fgrpo_jax import compare  # noqa: E402


def validation_curve(rows: list[dict], stages=("rl", "sft_more")) -> list[tuple[int, dict]]:
  """[(step, {val metric: value})] of the post-warm-start stage, in step order."""
  out = {}
  for r in rows:
    if r.get("stage") in stages and "val_hit@1" in r:
      out[r["step"]] = r  # a resumed run logs a step twice: keep the last
  return sorted(out.items())


def stage_mean(rows: list[dict], key: str, part: str) -> float:
  """Mean of a logged training metric over the first or last fifth of the logged steps."""
  vals = [r[key] for r in rows if r.get("stage") in ("rl", "sft_more") and key in r]
  if not vals:
    return float("nan")
  n = max(1, len(vals) // 5)
  return float(np.mean(vals[:n] if part == "first" else vals[-n:]))


def warm_start_validation(warm_dir: str) -> dict:
  """The warm start's last validation metrics (end of SFT)."""
  curve = validation_curve(compare.read_history(warm_dir), stages=("sft",))
  return curve[-1][1] if curve else {}


def fmt(x: float, digits: int = 3) -> str:
  return "—" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def table(sweep: str, warm_dir: str) -> str:
  warm = warm_start_validation(warm_dir)
  w_hit = warm.get("val_hit@1", float("nan"))
  lines = [
      f"Warm start ({warm_dir}): val hit@1 {fmt(w_hit)}, val ndcg@5 "
      f"{fmt(warm.get('val_ndcg@5', float('nan')))}, val slate recall "
      f"{fmt(warm.get('val_slate_recall', float('nan')))}.",
      "",
      "| run | val hit@1 by eval step | final val hit@1 | Δ vs warm | val ndcg@5 "
      "| val slate recall | sampled R_rank first→last | entropy first→last "
      "| zero_gen_groups | test hit@1 | wall s |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name in sorted(os.listdir(sweep)):
    run_dir = os.path.join(sweep, name)
    if not os.path.isdir(run_dir) or os.path.realpath(run_dir) == os.path.realpath(warm_dir):
      continue
    rows = compare.read_history(run_dir)
    curve = validation_curve(rows)
    if not curve:
      continue
    last = curve[-1][1]
    by_step = " / ".join(f"{s}: {r['val_hit@1']:.3f}" for s, r in curve)
    eval_path = os.path.join(run_dir, "eval.json")
    test_hit, wall = float("nan"), float("nan")
    if os.path.exists(eval_path):
      with open(eval_path) as f:
        result = json.load(f)
      test_hit, wall = result["metrics"]["hit@1"], result.get("wall_time_s", float("nan"))
    else:
      name += " (running)"
    lines.append(
        f"| {name} | {by_step} | {fmt(last['val_hit@1'])} | {last['val_hit@1'] - w_hit:+.3f} "
        f"| {fmt(last.get('val_ndcg@5', float('nan')))} "
        f"| {fmt(last.get('val_slate_recall', float('nan')))} "
        f"| {fmt(stage_mean(rows, 'reward_rank_mean', 'first'))}→"
        f"{fmt(stage_mean(rows, 'reward_rank_mean', 'last'))} "
        f"| {fmt(stage_mean(rows, 'entropy', 'first'), 2)}→"
        f"{fmt(stage_mean(rows, 'entropy', 'last'), 2)} "
        f"| {fmt(stage_mean(rows, 'zero_gen_groups', 'last'), 2)} "
        f"| {fmt(test_hit)} | {fmt(wall, 0)} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sweep", required=True, help="directory of the sweep's runs")
  parser.add_argument("--warm", default="", help="warm start dir (default: SWEEP/warm_start)")
  args = parser.parse_args()
  print(table(args.sweep, args.warm or os.path.join(args.sweep, "warm_start")))


if __name__ == "__main__":
  main()
