"""Is a run's latest policy in the paper's regime? Validation metrics beside the oracle's.

Issue 14's criteria for an embedded task, read at the SFT warm start on validation:
slate_miss >= 0.15, rank_drop_given_hit >= 0.15, and the oracle's hit@1 at least 0.15
above the policy's. The config is the one the run wrote (run_config.json), so the
same validation examples are rebuilt.

    python scripts/warm_start_regime.py --workdir=runs/x [--examples=1000] [--stage=sft]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402

from fgrpo_jax import config as config_lib  # noqa: E402
from fgrpo_jax import evaluate  # noqa: E402
from fgrpo_jax import train  # noqa: E402
from fgrpo_jax.data import arrays as arrays_lib  # noqa: E402
from fgrpo_jax.data import tasks  # noqa: E402
from fgrpo_jax.models import llama  # noqa: E402

KEYS = ("hit@1", "slate_miss", "rank_drop_given_hit", "slate_recall", "ndcg@5")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="a run directory with run_config.json")
  p.add_argument("--examples", type=int, default=1000, help="validation examples (0 = all)")
  p.add_argument("--stage", default="sft", help="sft (the warm start) | latest")
  a = p.parse_args(argv)
  with open(os.path.join(a.workdir, "run_config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f)["config"])
  task = tasks.load_task(config, a.workdir, log=lambda *_: None)
  val = arrays_lib.subset(task.splits["validation"], a.examples, config.seed)
  layout = config_lib.make_layout(task, config)
  cfg = config_lib.model_config(config, task.vocab_size)
  init = llama.init_params(cfg, jax.random.key(0))  # the checkpoint's layout
  if a.stage == "latest":
    stage, params = train.latest_checkpoint(a.workdir, config, init)
  else:
    stage, params = a.stage, train.load_stage_params(a.workdir, a.stage, init)
  policy = evaluate.evaluate_model(params, val, cfg=cfg, layout=layout, batch_size=250)
  oracle, refs = train.reference_metrics(task, val, config)
  rows = {"policy": policy, "oracle": oracle, **refs}
  report = {name: {k: round(m[k], 4) for k in KEYS} for name, m in rows.items() if m}
  report["examples"] = int(val["prompt"].shape[0])
  report["stage"] = stage
  if oracle:
    report["oracle_gap_hit@1"] = round(oracle["hit@1"] - policy["hit@1"], 4)
  print(json.dumps(report))


if __name__ == "__main__":
  main()
