"""Tests of fgrpo_jax/evaluate.py: the metrics and the slate-miss / rank-drop split."""

import numpy as np
import pytest

from fgrpo_jax import evaluate


def _random_policy_outputs(seed=0, N=400, C=10, k=4, m=3):
  rng = np.random.default_rng(seed)
  rel = (rng.random((N, C)) < 0.15).astype(np.float32)
  rel[:20] = 0.0  # nothing relevant
  slate = np.stack([rng.choice(C, k, replace=False) for _ in range(N)]).astype(np.int32)
  ranking = np.stack([rng.permutation(s)[:m] for s in slate]).astype(np.int32)
  return slate, ranking, rel


def test_error_split_is_a_partition_and_rank_drop_given_hit_is_conditional():
  slate, ranking, rel = _random_policy_outputs()
  per = {k: np.asarray(v) for k, v in evaluate.ranking_metrics(slate, ranking, rel).items()}
  has_rel = rel.sum(-1) > 0
  # hit@1 + slate_miss + rank_drop = 1 wherever anything is relevant.
  np.testing.assert_allclose((per["hit@1"] + per["slate_miss"] + per["rank_drop"])[has_rel], 1.0)
  # Plain-Python reference of the split and of P(top-1 wrong | a relevant one in the slate).
  in_slate = np.array([any(rel[i, c] > 0 for c in slate[i]) for i in range(len(rel))])
  top_ok = np.array([rel[i, ranking[i, 0]] > 0 for i in range(len(rel))])
  np.testing.assert_array_equal(per["slate_hit"], in_slate)
  np.testing.assert_array_equal(per["rank_drop"], in_slate & ~top_ok)
  np.testing.assert_array_equal(per["slate_miss"], has_rel & ~in_slate)
  means = evaluate.mean_metrics(per)
  assert means["rank_drop_given_hit"] == pytest.approx((in_slate & ~top_ok).sum() / in_slate.sum())
  assert 0.0 < means["rank_drop_given_hit"] < 1.0


def test_rank_drop_given_hit_without_any_slate_hit_is_zero():
  slate, ranking, rel = _random_policy_outputs()
  means = evaluate.mean_metrics(evaluate.ranking_metrics(slate, ranking, np.zeros_like(rel)))
  assert means["slate_hit"] == 0.0 and means["rank_drop_given_hit"] == 0.0
