"""Tasks: a dataset, its prompt builder and its reference scorers, behind one door.

`load_task(config)` is the only place that knows which datasets exist. A Task
holds, for each split, the model-ready numpy arrays (prompt, prompt_mask,
cand_tokens, pool_mask, relevance and, where the generator is known,
oracle_scores), so the train loop, the evaluation and the comparison never look at
raw data.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from fgrpo_jax.data import prompts as prompts_lib
from fgrpo_jax.errors import UserError

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass
class Task:
  """A dataset ready for the model.

  name: task family ("recsys" or "multihop_qa"); dataset: config.data.name;
  splits: split -> dict of numpy arrays with a leading example axis N:
    prompt int32 [N, P], prompt_mask bool [N, P], cand_tokens int32 [N, C],
    pool_mask bool [N, C], relevance float32 [N, C], optional oracle_scores [N, C]
    and item ids `pool` [N, C] / `history` [N, H] for readable printing.
  vocab_size: tokens the model must embed; layout_fn(k, m) -> rollout.Layout;
  reference_fns: name -> fn(split arrays) -> scores [N, C] (higher = better);
  describe: fn(split arrays, row, slate, ranking) -> readable text of one rollout.
  """

  name: str
  dataset: str
  splits: dict[str, dict[str, np.ndarray]]
  vocab_size: int
  layout_fn: Callable[[int, int], Any]
  reference_fns: dict[str, Callable[[dict], np.ndarray]]
  describe: Callable[..., str]
  info: dict = dataclasses.field(default_factory=dict)

  @property
  def pool_size(self) -> int:
    return self.splits["test"]["cand_tokens"].shape[1]

  @property
  def has_oracle(self) -> bool:
    return "oracle_scores" in self.splits["test"]


def _recsys_split_arrays(examples, builder: prompts_lib.ItemTokenPrompts) -> dict:
  arrays = builder.build(examples.history, examples.pool)
  arrays["relevance"] = np.asarray(examples.relevance, np.float32)
  arrays["pool"] = np.asarray(examples.pool, np.int32)
  arrays["history"] = np.asarray(examples.history, np.int32)
  if examples.oracle_scores is not None:
    arrays["oracle_scores"] = np.asarray(examples.oracle_scores, np.float32)
  return arrays


def recsys_task(dataset, name: str) -> Task:
  """Wraps a RecsysDataset (synthetic or prepared real data) into a Task."""
  builder = prompts_lib.ItemTokenPrompts(num_items=dataset.num_items)
  splits = {s: _recsys_split_arrays(getattr(dataset, s), builder) for s in SPLITS}
  popularity = np.asarray(dataset.item_popularity, np.float64)
  names = list(dataset.item_names)
  references = {
      "random": lambda a: np.zeros(a["pool"].shape),
      "popularity": lambda a: popularity[a["pool"]],
  }

  def describe(arrays, row, slate, ranking, rewards_text=""):
    pool = arrays["pool"][row]
    rel = arrays["relevance"][row]
    hist = [names[i] for i in arrays["history"][row] if i >= 0]
    mark = lambda c: f"{names[pool[c]]}{'*' if rel[c] > 0 else ''}"
    lines = [f"history : {' '.join(hist)}",
             f"pool    : {' '.join(mark(c) for c in range(len(pool)))}   (* relevant)",
             f"slate   : {' '.join(mark(c) for c in slate if c >= 0)}",
             f"ranking : {' '.join(mark(c) for c in ranking if c >= 0)}"]
    if rewards_text:
      lines.append(f"rewards : {rewards_text}")
    return "\n".join(lines)

  info = {"num_items": dataset.num_items}
  info.update({f"{s}_examples": len(getattr(dataset, s)) for s in SPLITS})
  return Task(name="recsys", dataset=name, splits=splits, vocab_size=builder.vocab_size,
              layout_fn=builder.layout, reference_fns=references, describe=describe,
              info=info)


def load_task(config) -> Task:
  """Builds the task named by config.data.name (one clear error if unknown)."""
  d = config.data
  if d.name == "synthetic_recsys":
    from fgrpo_jax.data import synthetic_recsys
    dataset = synthetic_recsys.make_synthetic_recsys(
        num_items=d.num_items, num_clusters=d.num_clusters, num_user_types=d.num_user_types,
        num_users=d.num_users, seq_len=d.seq_len, history_len=d.history_len,
        pool_size=d.pool_size, negatives=d.negatives, seed=config.seed)
    return recsys_task(dataset, d.name)
  raise UserError(f"config.data.name: unknown dataset {d.name!r} (known: synthetic_recsys)")
