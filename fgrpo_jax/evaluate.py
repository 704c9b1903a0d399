"""Greedy evaluation, ranking metrics, the slate-miss / rank-drop split, references.

Every policy, learned or not, is judged on the same two arrays per example: a
slate [k] and a ranking [m] of pool slots. Score-based references (oracle,
popularity, random, a pointwise scorer) turn per-slot scores into a slate (top-k)
and a ranking (top-m), so their numbers sit in the same table as the model's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fgrpo_jax import parse as parse_lib
from fgrpo_jax import rewards as R
from fgrpo_jax import rollout as rollout_lib
from fgrpo_jax import sharding
from fgrpo_jax.data import arrays as arrays_lib
from fgrpo_jax.data.arrays import MODEL_INPUTS

CUTOFFS = (1, 3, 5)


@functools.partial(jax.jit, static_argnames=("gain",))
def ranking_metrics(slate, ranking, relevance, pool_mask=None, gain: str = "exp"):
  """Per-example metrics. slate [N, k], ranking [N, m], relevance [N, C] -> dict of [N].

  hit@c, ndcg@c, recall@c for c in (1, 3, 5) (c beyond m counts the m ranked);
  slate_recall: coverage of the slate; slate_miss: top-1 wrong and no relevant
  candidate entered the slate; rank_drop: top-1 wrong although a relevant one was
  in the slate (so hit@1 + slate_miss + rank_drop = 1 where anything is relevant);
  slate_hit: a relevant candidate is in the slate (mean_metrics adds
  rank_drop_given_hit = P(top-1 wrong | slate_hit), the ranking phase's own error);
  format_valid: the rollout is a well-formed slate and ranking.
  """
  out = {}
  for c in CUTOFFS:
    out[f"hit@{c}"] = R.hit_at_k(ranking, relevance, c)
    out[f"ndcg@{c}"] = R.ndcg(ranking, relevance, k=c, gain=gain)
    out[f"recall@{c}"] = R.recall_at_k(ranking, relevance, c)
  out["slate_recall"] = R.coverage(slate, relevance)
  any_rel_in_slate = R.hit_at_k(slate, relevance, slate.shape[-1]) > 0
  wrong_top = out["hit@1"] == 0
  has_rel = jnp.any(relevance > 0, axis=-1)
  out["slate_miss"] = (wrong_top & ~any_rel_in_slate & has_rel).astype(jnp.float32)
  out["rank_drop"] = (wrong_top & any_rel_in_slate).astype(jnp.float32)
  out["slate_hit"] = any_rel_in_slate.astype(jnp.float32)
  out["format_valid"] = R.format_validity(slate, ranking, relevance.shape[-1], pool_mask)
  return out


def mean_metrics(per_example: dict) -> dict[str, float]:
  """Means over examples, plus rank_drop_given_hit = P(rank drop | slate hit) (0 when
  no slate hit anything): the error of the ranking phase on the slates it was given."""
  out = {k: float(np.mean(v)) for k, v in per_example.items()}
  if "rank_drop" in out and "slate_hit" in out:
    out["rank_drop_given_hit"] = out["rank_drop"] / out["slate_hit"] if out["slate_hit"] else 0.0
  return out


def policy_from_scores(scores, pool_mask, slate_size: int, rank_size: int):
  """A score-based policy: slate = top-k slots by score, ranking = its top-m.

  scores f32 [N, C] (higher is better), pool_mask bool [N, C] -> (slate [N, k], ranking [N, m]).
  """
  scores = np.where(pool_mask, scores, -np.inf)
  order = np.argsort(-scores, axis=-1, kind="stable")[:, :slate_size].astype(np.int32)
  return order, order[:, :rank_size]


def _tie_break(scores, rng):
  """Breaks ties among equal scores at random, so a constant scorer is not lucky."""
  return scores + 1e-9 * rng.random(scores.shape)


def evaluate_scores(scores, batch_np, slate_size, rank_size, seed=0, gain="exp"):
  """Metrics of a score-based reference on numpy arrays (pool_mask, relevance)."""
  rng = np.random.default_rng(seed)
  scores = _tie_break(np.asarray(scores, np.float64), rng)
  slate, ranking = policy_from_scores(scores, batch_np["pool_mask"], slate_size, rank_size)
  return mean_metrics(ranking_metrics(slate, ranking, batch_np["relevance"],
                                      batch_np["pool_mask"], gain=gain))


def greedy_rollout(params, batch, *, cfg, layout):
  """One greedy rollout per prompt. A decoupled pair ({"selector", "ranker"}) runs
  as two passes: the ranker only ever sees the selector's slate."""
  sample = functools.partial(rollout_lib.sample, key=jax.random.key(0), cfg=cfg, layout=layout,
                             group_size=1, greedy=True)
  if isinstance(params, dict) and "selector" in params:
    slate = sample(params["selector"], batch).slate[:, 0]
    return sample(params["ranker"], batch, given_slate=slate)
  return sample(params, batch)


def greedy_outputs(params, arrays, *, cfg, layout, batch_size: int, mesh=None,
                   with_validity: bool = False):
  """Greedy constrained rollouts over numpy arrays in fixed-size batches.

  The last batch is padded by repeating rows, so every call has the same shape
  (one compilation). With a mesh (the params' one), each process loads only its
  rows of every batch (`sharding.process_batch_slice`), the batch is split over
  the mesh's batch axes, and the outputs are gathered back, so every process
  returns the same full arrays. Returns (slate [N, k], ranking [N, m], tokens [N, T])
  numpy, and with_validity also valid f32 [N]: the parser found the tags, counts
  and identifiers well formed (always 1 in constrained decoding).
  """
  n = arrays["prompt"].shape[0]
  slates, rankings, tokens, valid = [], [], [], []
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size) % n
    if mesh is None:
      batch = arrays_lib.take_batch(arrays, idx, MODEL_INPUTS)
    else:
      rows = idx[sharding.process_batch_slice(batch_size)]
      batch = sharding.shard_batch(arrays_lib.host_batch(arrays, rows, MODEL_INPUTS), mesh)
    ro = greedy_rollout(params, batch, cfg=cfg, layout=layout)
    slate, ranking, toks, ok = sharding.gather_to_host(
        (ro.slate, ro.ranking, ro.tokens, parse_lib.validity(ro.errors)))
    keep = min(batch_size, n - start)
    slates.append(slate[:keep, 0])
    rankings.append(ranking[:keep, 0])
    tokens.append(toks[:keep, 0])
    valid.append(ok[:keep, 0])
  out = (np.concatenate(slates), np.concatenate(rankings), np.concatenate(tokens))
  return out + (np.concatenate(valid),) if with_validity else out


def evaluate_model(params, arrays, *, cfg, layout, batch_size: int, gain: str = "exp",
                   mesh=None, per_example: bool = False):
  """Mean metrics of the model's greedy rollouts on a split's arrays.

  With a mesh the rollouts are sharded over it and gathered (see greedy_outputs),
  so on several hosts every process returns the same global metrics.
  per_example: also return the per-example metrics ({name: f32 [N]}) — for paired
  comparisons of two policies on the same examples (fgrpo_jax.compare).
  """
  slate, ranking, _, valid = greedy_outputs(params, arrays, cfg=cfg, layout=layout,
                                            batch_size=batch_size, mesh=mesh,
                                            with_validity=True)
  metrics = ranking_metrics(slate, ranking, arrays["relevance"], arrays["pool_mask"], gain=gain)
  # Free decoding: missing tags or stray tokens also make a rollout malformed.
  rows = {k: np.asarray(v) for k, v in metrics.items()}
  rows["format_valid"] = rows["format_valid"] * valid
  return (mean_metrics(rows), rows) if per_example else mean_metrics(rows)
