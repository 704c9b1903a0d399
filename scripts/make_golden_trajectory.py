"""Regenerates tests/golden/tiny_trajectory.json: the first logged metrics of
`configs/recsys.py:tiny` on the CPU.

    python scripts/make_golden_trajectory.py            # rewrites the golden file
    python scripts/make_golden_trajectory.py --check    # compares a fresh run with it

The run is the tiny variant shortened to a few steps (GOLDEN_OVERRIDES: 6 SFT steps,
4 F-GRPO steps, a log every 2 steps, 64 test examples), so that tests/test_golden.py
stays quick. The file holds every logged metric of metrics.jsonl except the wall-clock
ones (TIMING_KEYS), and the test metrics of eval.json. A refactor must reproduce them
within RTOL / ATOL: only a change of the numbers (or a different jax / XLA version)
should need a new golden file, and its commit should say why.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "tests", "golden", "tiny_trajectory.json")
CONFIG = "tiny"  # the variant of configs/recsys.py
GOLDEN_OVERRIDES = {"sft.steps": 6, "rl.steps": 4, "log_every": 2, "ckpt_every": 100,
                    "eval.test_examples": 64}
# Wall-clock and memory figures differ from run to run (and from machine to machine).
TIMING_KEYS = ("steps_per_s", "gen_tokens_per_s", "compile_s", "peak_memory_mb")
RTOL, ATOL = 1e-4, 1e-6  # CPU float32: a moved function gives the same numbers to ~1e-7


def golden_config():
  sys.path.insert(0, REPO)
  from configs import recsys
  from fgrpo_jax import config as config_lib
  config = recsys.get_config(CONFIG)
  for field, value in GOLDEN_OVERRIDES.items():
    config_lib.set_config_value(config, field, value)
  return config


def trajectory(workdir: str) -> dict:
  """{"metrics": [records of metrics.jsonl less TIMING_KEYS], "test": eval.json metrics}
  of a fresh golden run in workdir."""
  from fgrpo_jax import train
  result = train.run(golden_config(), workdir, log=lambda *a, **k: None)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  records = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]
  return {"config": f"configs/recsys.py:{CONFIG}", "overrides": GOLDEN_OVERRIDES,
          "rtol": RTOL, "atol": ATOL, "metrics": records, "test": result["metrics"]}


def differences(golden: dict, fresh: dict, rtol: float = RTOL, atol: float = ATOL) -> list[str]:
  """Where fresh departs from golden (every golden key must be there and agree)."""
  out = []

  def compare(where, want, got):
    if isinstance(want, str) or isinstance(got, str):
      if want != got:
        out.append(f"{where}: {got!r} != golden {want!r}")
    elif not math.isclose(got, want, rel_tol=rtol, abs_tol=atol):
      out.append(f"{where}: {got!r} != golden {want!r}")

  if len(fresh["metrics"]) != len(golden["metrics"]):
    out.append(f"{len(fresh['metrics'])} logged records != golden {len(golden['metrics'])}")
  for i, (want, got) in enumerate(zip(golden["metrics"], fresh["metrics"])):
    for key, value in want.items():
      if key not in got:
        out.append(f"record {i} ({want['stage']} step {want['step']}): {key} missing")
      else:
        compare(f"record {i} ({want['stage']} step {want['step']}) {key}", value, got[key])
  for key, value in golden["test"].items():
    if key not in fresh["test"]:
      out.append(f"test {key} missing")
    else:
      compare(f"test {key}", value, fresh["test"][key])
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--check", action="store_true", help="compare a fresh run with the file")
  args = parser.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  with tempfile.TemporaryDirectory() as workdir:
    fresh = trajectory(workdir)
  if args.check:
    with open(GOLDEN) as f:
      diffs = differences(json.load(f), fresh)
    print("\n".join(diffs) or f"matches {GOLDEN}")
    sys.exit(1 if diffs else 0)
  os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
  with open(GOLDEN, "w") as f:
    json.dump(fresh, f, indent=1, sort_keys=True)
    f.write("\n")
  print(f"wrote {GOLDEN}: {len(fresh['metrics'])} records")


if __name__ == "__main__":
  main()
