"""What a run's policy does on validation: greedy metrics and the *sampled* rewards.

RL maximises the mean reward of sampled rollouts (temperature config.rollout.temperature);
evaluation decodes greedily. This script measures both on the same validation prompts
for the latest checkpoint of each workdir, so a reader can see whether RL raised its
own objective (sampled R_gen / R_rank) while the greedy metric moved another way.

    python scripts/policy_report.py --config=configs/recsys.py \
        --workdirs=runs/x/seed_0/warm_start,runs/x/seed_0/fgrpo --examples=2000 \
        [--overrides=sft.steps=300,rl.steps=300]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fgrpo_jax import cli, compare  # noqa: E402
from fgrpo_jax import config as config_lib  # noqa: E402
from fgrpo_jax import evaluate  # noqa: E402
from fgrpo_jax import rollout  # noqa: E402
from fgrpo_jax import steps as steps_lib  # noqa: E402
from fgrpo_jax import train  # noqa: E402
from fgrpo_jax.data import arrays as arrays_lib  # noqa: E402
from fgrpo_jax.data import tasks  # noqa: E402
from fgrpo_jax.models import llama  # noqa: E402


def sampled_rewards(params, arrays, *, cfg, layout, settings, group_size, batch_size, seed=0):
  """Means over the examples' sampled rollouts (group_size each): (R_gen, R_rank, hit@1
  of the sampled ranking's first item)."""
  n = arrays["prompt"].shape[0]
  sample = jax.jit(rollout.sample, static_argnames=("cfg", "layout", "group_size",
                                                    "temperature"))
  gen, rank, hit = [], [], []
  for i, start in enumerate(range(0, n, batch_size)):
    idx = np.arange(start, start + batch_size) % n
    batch = arrays_lib.take_batch(arrays, idx, arrays_lib.MODEL_INPUTS)
    ro = sample(params, batch, jax.random.key(seed * 100_003 + i), cfg=cfg, layout=layout,
                group_size=group_size, temperature=settings.temperature)
    relevance = jnp.asarray(arrays["relevance"][idx])
    r_gen, r_rank, _ = steps_lib.rollout_rewards(ro, relevance, settings, layout.rank_size)
    first = jnp.take_along_axis(relevance, ro.ranking[..., 0], axis=-1)  # [B, G]
    keep = min(batch_size, n - start)
    gen.append(np.asarray(r_gen)[:keep])
    rank.append(np.asarray(r_rank)[:keep])
    hit.append(np.asarray(first > 0)[:keep])
  return tuple(float(np.concatenate(x).mean()) for x in (gen, rank, hit))


def top1_profile(params, arrays, popularity, *, cfg, layout, batch_size):
  """Where the greedy top-1 goes: how many distinct items, and how popular they are.

  popularity: {item token: share of training examples whose relevant item it is}.
  Returns top1_distinct (items ranked first for some user), top1_popularity (mean
  popularity of the item ranked first) and target_popularity (the same for the
  relevant item, the reference a calibrated ranker moves towards).
  """
  n = arrays["prompt"].shape[0]
  firsts = []
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    batch = arrays_lib.take_batch(arrays, idx, arrays_lib.MODEL_INPUTS)
    ro = rollout.sample(params, batch, jax.random.key(0), cfg=cfg, layout=layout,
                        group_size=1, greedy=True)  # jitted already
    slot = np.asarray(ro.ranking)[:, 0, 0]
    firsts.append(arrays["cand_tokens"][idx, slot])
  firsts = np.concatenate(firsts)
  targets = arrays["cand_tokens"][np.arange(n), np.argmax(arrays["relevance"], axis=1)]
  pop = lambda items: float(np.mean([popularity.get(int(t), 0.0) for t in items]))
  return {"top1_distinct": int(len(np.unique(firsts))), "top1_popularity": pop(firsts),
          "target_popularity": pop(targets)}


def target_popularity(train_arrays) -> dict:
  """{item token: share of training examples whose (most) relevant item it is}."""
  rel = train_arrays["relevance"]
  targets = train_arrays["cand_tokens"][np.arange(rel.shape[0]), np.argmax(rel, axis=1)]
  tokens, counts = np.unique(targets, return_counts=True)
  return {int(t): c / rel.shape[0] for t, c in zip(tokens, counts)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/recsys.py")
  p.add_argument("--workdirs", required=True, help="comma-separated run directories")
  p.add_argument("--examples", type=int, default=2000, help="validation examples")
  p.add_argument("--overrides", default="", help="dotted=value,... applied to the config")
  a = p.parse_args(argv)
  config = cli.load_config_file(a.config)  # FILE[:variant], e.g. configs/multihop_qa.py
  for item in filter(None, a.overrides.split(",")):
    field, _, value = item.partition("=")
    compare._set_field(config, field, value)
  task = tasks.load_task(config, a.workdirs.split(",")[0], log=lambda *_: None)
  val = arrays_lib.subset(task.splits["validation"], a.examples, config.seed)
  layout = config_lib.make_layout(task, config)
  cfg = config_lib.model_config(config, task.vocab_size)
  settings = steps_lib.RLSettings.from_config(config)
  init = llama.init_params(cfg, jax.random.key(0))  # the checkpoint's layout
  popularity = target_popularity(task.splits["train"])
  for workdir in a.workdirs.split(","):
    run_config = os.path.join(workdir, train.RUN_CONFIG)
    if os.path.exists(run_config):  # the run's own algorithm names its last stage
      with open(run_config) as f:
        config.algorithm = json.load(f)["config"]["algorithm"]
    stage, params = train.latest_checkpoint(workdir, config, init)
    if params is None:
      print(f"{workdir}: no checkpoint")
      continue
    greedy = evaluate.evaluate_model(params, val, cfg=cfg, layout=layout, batch_size=250)
    r_gen, r_rank, hit = sampled_rewards(params, val, cfg=cfg, layout=layout, settings=settings,
                                    group_size=config.rollout.group_size, batch_size=250)
    profile = top1_profile(params, val, popularity, cfg=cfg, layout=layout, batch_size=250)
    print(json.dumps({"workdir": workdir, "stage": stage, "greedy_hit@1": greedy["hit@1"],
                      "greedy_ndcg@5": greedy["ndcg@5"],
                      "greedy_slate_recall": greedy["slate_recall"],
                      "greedy_rank_drop_given_hit": greedy["rank_drop_given_hit"],
                      "sampled_R_gen": r_gen, "sampled_R_rank": r_rank, "sampled_hit@1": hit,
                      **profile}))


if __name__ == "__main__":
  main()
