"""Draws docs/rollout.png: one prompt, a group of 4 rollouts, and who gets which advantage.

    python scripts/make_rollout_figure.py [--out docs/rollout.png]

The rollouts are sampled from a freshly initialised model on a test example of the
embedded task (the picture is about the credit assignment, not a trained model);
rewards and advantages come from fgrpo_jax.rewards exactly as in training.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import recsys  # noqa: E402
from fgrpo_jax import config as config_lib  # noqa: E402
from fgrpo_jax import rewards as R  # noqa: E402
from fgrpo_jax import rollout  # noqa: E402
from fgrpo_jax.data import arrays as arrays_lib  # noqa: E402
from fgrpo_jax.data import prompts, tasks  # noqa: E402
from fgrpo_jax.models import llama  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(REPO, "docs", "rollout.png"))
  args = parser.parse_args()
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  config = recsys.get_config()
  config.rollout.update(slate_size=5, rank_size=3)
  task = tasks.load_task(config)
  layout = task.layout_fn(5, 3)
  cfg = config_lib.model_config(config, task.vocab_size)
  params = llama.init_params(cfg, jax.random.key(3))
  params = jax.tree.map(lambda p: p * 8 if p.ndim > 1 else p, params)  # a varied group
  test = task.splits["test"]
  G = 4
  # The first example whose group shows a spread in both phases' rewards.
  for row in range(len(test["prompt"])):
    batch = arrays_lib.take_batch(test, slice(row, row + 1))
    ro = rollout.sample(params, batch, jax.random.key(row), cfg=cfg, layout=layout,
                        group_size=G)
    r_gen, r_rank = R.phase_rewards(ro.slate, ro.ranking, batch["relevance"][:, None])
    if np.ptp(np.asarray(r_gen)) > 0 and len(set(np.asarray(r_rank)[0].tolist())) > 2:
      break
  a_gen, a_rank = R.group_advantages(r_gen), R.group_advantages(r_rank)
  adv = np.asarray(R.token_advantages(ro.phase_ids, {R.PHASE_GEN: a_gen, R.PHASE_RANK: a_rank}))[0]
  tokens = np.asarray(ro.tokens[0])
  choices = np.asarray(ro.choices[0])
  phases = np.asarray(ro.phase_ids[0])
  pool = test["pool"][row]
  target_slot = int(np.argmax(test["relevance"][row]))

  def label(t, c):
    if c < 0:
      return prompts.SPECIAL_TOKENS[t]
    return f"i{pool[c]}" + ("*" if c == target_slot else "")

  T = tokens.shape[1]
  lim = max(np.abs(adv).max(), 1e-6)
  fig, ax = plt.subplots(figsize=(1.0 * T + 4.5, 0.75 * G + 2.0))
  cmap = plt.get_cmap("coolwarm_r")
  for g in range(G):
    for t in range(T):
      is_tag = phases[g, t] == R.PHASE_TAG
      color = "#dddddd" if is_tag else cmap(0.5 + 0.5 * adv[g, t] / lim)
      ax.add_patch(plt.Rectangle((t, G - 1 - g), 0.95, 0.9, color=color))
      ax.text(t + 0.47, G - 1 - g + 0.45, label(tokens[g, t], choices[g, t]), ha="center",
              va="center", fontsize=8, weight="bold" if choices[g, t] == target_slot else None)
    ax.text(T + 0.2, G - 1 - g + 0.45,
            f"R_gen {float(r_gen[0, g]):.2f} A_gen {float(a_gen[0, g]):+.2f}   "
            f"R_rank {float(r_rank[0, g]):.2f} A_rank {float(a_rank[0, g]):+.2f}",
            va="center", fontsize=8, family="monospace")
  k, m = layout.slate_size, layout.rank_size
  ax.text(k / 2, G + 0.2, "slate: π_gen, advantage A_gen", ha="center", fontsize=10)
  ax.text(k + 2 + m / 2, G + 0.2, "ranking: π_rank, advantage A_rank", ha="center",
          fontsize=10)
  ax.text(k + 1, -0.45, "forced tags: no advantage", ha="center", fontsize=8, color="#666666")
  ax.set_xlim(-0.2, T + 7.5)
  ax.set_ylim(-0.7, G + 0.7)
  ax.axis("off")
  ax.set_title("One prompt, G = 4 rollouts: per-phase group-relative advantages "
               "(blue > 0, red < 0; * = the relevant item)", fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  tmp = args.out + ".tmp.png"
  fig.savefig(tmp, dpi=100)
  os.replace(tmp, args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
