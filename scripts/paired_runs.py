"""Paired differences between finished runs on the same test examples.

    python scripts/paired_runs.py --base "warm start=runs/smollm2/warm_start_v2" \
        fgrpo=runs/smollm2/fgrpo grpo=runs/smollm2/grpo
    # several seeds: one directory per seed, comma-separated, in the same seed order
    python scripts/paired_runs.py --base "grpo=runs/q/seed_0/grpo,runs/q/seed_1/grpo" \
        "fgrpo=runs/q/seed_0/fgrpo,runs/q/seed_1/fgrpo"

Every run against the base, and the first run against every other one: the mean
difference of each example-level metric with a 95% bootstrap interval over the test
examples (fgrpo_jax.compare.paired_difference, the statistic of compare.md). The runs
must have evaluated the same test examples (same data, seed and eval.test_examples).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fgrpo_jax import compare  # noqa: E402


def _named(text: str) -> tuple[str, list[str]]:
  name, sep, paths = text.partition("=")
  dirs = [p for p in paths.split(",") if p]
  if not sep or not name or not dirs:
    raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=RUN_DIR[,RUN_DIR...]")
  return name, dirs


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--base", type=_named, required=True, help="NAME=RUN_DIR[,RUN_DIR...]")
  parser.add_argument("runs", type=_named, nargs="+",
                      help="NAME=RUN_DIR[,RUN_DIR...]: one directory per seed, in the base's order")
  args = parser.parse_args(argv)
  base_name, base_dirs = args.base
  examples = {}
  for name, dirs in [args.base, *args.runs]:
    if len(dirs) != len(base_dirs):
      raise SystemExit(f"{name}: {len(dirs)} run directories, but the base {base_name} has "
                       f"{len(base_dirs)} (one per seed on both sides)")
    examples[name] = []
    for s, path in enumerate(dirs):
      ex = compare._load_examples(path)
      if ex is None:
        raise SystemExit(f"{path}: no per-example evaluation (eval_examples.npz); not finished?")
      if name != base_name and len(ex["hit@1"]) != len(examples[base_name][s]["hit@1"]):
        raise SystemExit(f"{path} and {base_dirs[s]} evaluated different numbers of test examples")
      examples[name].append(ex)
  names = [n for n, _ in args.runs]
  pairs = compare.planned_pairs(names, base=base_name, lead=names[0])
  table = compare.paired_table(compare.paired_differences(examples, pairs))
  print(table)
  return table


if __name__ == "__main__":
  main()
