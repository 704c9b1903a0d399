"""Paired differences between finished runs on the same test examples (one seed each).

    python scripts/paired_runs.py --base "warm start=runs/smollm2/warm_start_v2" \
        fgrpo=runs/smollm2/fgrpo grpo=runs/smollm2/grpo

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


def _named(text: str) -> tuple[str, str]:
  name, sep, path = text.partition("=")
  if not sep or not name or not path:
    raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=RUN_DIR")
  return name, path


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--base", type=_named, required=True, help="NAME=RUN_DIR")
  parser.add_argument("runs", type=_named, nargs="+", help="NAME=RUN_DIR")
  args = parser.parse_args(argv)
  examples = {}
  for name, path in [args.base, *args.runs]:
    ex = compare._load_examples(path)
    if ex is None:
      raise SystemExit(f"{path}: no per-example evaluation (eval_examples.npz); not finished?")
    if examples and len(ex["hit@1"]) != len(examples[args.base[0]][0]["hit@1"]):
      raise SystemExit(f"{name} and {args.base[0]} evaluated different numbers of test examples")
    examples[name] = [ex]  # one seed
  names = [n for n, _ in args.runs]
  pairs = compare.planned_pairs(names, base=args.base[0], lead=names[0])
  table = compare.paired_table(compare.paired_differences(examples, pairs))
  print(table)
  return table


if __name__ == "__main__":
  main()
