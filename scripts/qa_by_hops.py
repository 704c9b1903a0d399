"""Test metrics of synthetic multi-hop QA runs split by the number of hops (gold passages).

    python scripts/qa_by_hops.py runs/qa_compare/seed_0/warm_start runs/qa_compare/seed_0/fgrpo

Reads each run's `run_config.json` and `eval_examples.npz` (the per-example test metrics
that `fgrpo_jax.main` writes) and regenerates the run's synthetic test split from its
config to count each question's gold passages; prints hit@1, slate recall and the
rank-drop share per hop count. Only for `data.name = synthetic_qa`.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from fgrpo_jax import export, train  # noqa: E402
from fgrpo_jax.data import synthetic_qa  # noqa: E402

METRICS = ("hit@1", "slate_recall", "rank_drop")


def hops_of(workdir: str) -> np.ndarray:
  """int [N]: the gold passages of each test question of the run in `workdir`."""
  config, _ = export.read_run_config(workdir)
  if config.data.name != "synthetic_qa":
    raise SystemExit(f"{workdir}: data.name is {config.data.name!r}, not synthetic_qa")
  splits = synthetic_qa.generate(synthetic_qa.settings_from_config(config), int(config.seed))
  return np.array([sum(e.supporting) for e in splits["test"]])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdirs", nargs="+")
  args = parser.parse_args()
  print("| run | hops | questions | " + " | ".join(METRICS) + " |")
  print("|---|---|---|" + "---|" * len(METRICS))
  for workdir in args.workdirs:
    per_example = np.load(os.path.join(workdir, train.EVAL_EXAMPLES))
    hops = hops_of(workdir)
    n = per_example["hit@1"].shape[0]
    hops = hops[:n]  # eval.test_examples may cut the split
    for h in np.unique(hops):
      rows = hops == h
      cells = " | ".join(f"{per_example[m][rows].mean():.3f}" for m in METRICS)
      print(f"| {workdir} | {h} | {int(rows.sum())} | {cells} |")


if __name__ == "__main__":
  main()
