"""Tests of fgrpo_jax.rewards against plain-Python references, sklearn and properties."""

from __future__ import annotations

import ast
import doctest
import functools
import json
import math
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import ndcg_score

from fgrpo_jax import rewards as R

REPO = pathlib.Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-5, 1e-6
PROPS = settings(max_examples=50, deadline=None, derandomize=True, database=None)


# ---------------------------------------------------------------------------
# Plain-Python reference implementations (loops over lists).
# ---------------------------------------------------------------------------


def _ok(c, C):
  return 0 <= c < C


def ref_coverage(slate, rel, mode="recall"):
  C, k = len(rel), len(slate)
  relevant = {i for i, r in enumerate(rel) if r > 0}
  hits = len({c for c in slate if _ok(c, C)} & relevant)
  den = min(len(relevant), k) if mode == "recall" else k + len(relevant)
  num = hits if mode == "recall" else 2 * hits
  return num / den if den > 0 else 0.0


def ref_gain(r, gain):
  r = max(r, 0.0)
  return 2.0**r - 1.0 if gain == "exp" else r


def ref_ndcg(ranking, rel, k=None, gain="exp"):
  k = len(ranking) if k is None else k
  seen, dcg = set(), 0.0
  for p, c in enumerate(ranking[:k]):
    if _ok(c, len(rel)) and c not in seen:
      seen.add(c)
      dcg += ref_gain(rel[c], gain) / math.log2(p + 2)
  ideal = sorted((ref_gain(r, gain) for r in rel), reverse=True)[:k]
  idcg = sum(g / math.log2(p + 2) for p, g in enumerate(ideal))
  return min(dcg / idcg, 1.0) if idcg > 0 else 0.0


def _distinct_relevant_hits(ranking, rel, k):
  found = set()
  for c in ranking[:k]:
    if _ok(c, len(rel)) and rel[c] > 0:
      found.add(c)
  return len(found)


def ref_hit(ranking, rel, k):
  return float(any(_ok(c, len(rel)) and rel[c] > 0 for c in ranking[:k]))


def ref_recall(ranking, rel, k):
  n_rel = sum(1 for r in rel if r > 0)
  return _distinct_relevant_hits(ranking, rel, k) / n_rel if n_rel else 0.0


def ref_precision(ranking, rel, k):
  return _distinct_relevant_hits(ranking, rel, k) / k if k else 0.0


def ref_mrr(ranking, rel, k=None):
  k = len(ranking) if k is None else k
  for p, c in enumerate(ranking[:k]):
    if _ok(c, len(rel)) and rel[c] > 0:
      return 1.0 / (p + 1)
  return 0.0


def _has_repeat(values):
  seen = set()
  for v in values:
    if v == -1:
      continue
    if v in seen:
      return True
    seen.add(v)
  return False


def ref_format_errors(slate, ranking, pool_size, pool_mask=None):
  def in_pool(c):
    if not 0 <= c < pool_size:
      return False
    if pool_mask is not None:
      return c < len(pool_mask) and bool(pool_mask[c])
    return True

  members = {c for c in slate if c != -1}
  return {
    "slate_duplicate": _has_repeat(slate),
    "slate_out_of_pool": any(c != -1 and not in_pool(c) for c in slate),
    "slate_empty_slot": -1 in slate,
    "ranking_duplicate": _has_repeat(ranking),
    "ranking_not_in_slate": any(c != -1 and c not in members for c in ranking),
    "ranking_empty_slot": -1 in ranking,
  }


def ref_group_advantages(r, mode="mean", eps=1e-6):
  G = len(r)
  if G <= 1 or all(x == r[0] for x in r):
    return [0.0] * G
  mean = sum(r) / G
  if mode == "mean":
    return [x - mean for x in r]
  if mode == "std":
    std = math.sqrt(sum((x - mean) ** 2 for x in r) / G)
    return [(x - mean) / (std + eps) for x in r]
  return [x - (sum(r) - x) / (G - 1) for x in r]  # explicit leave-one-out


# ---------------------------------------------------------------------------
# Random cases: -1 padding, duplicates, out-of-range ids, graded / binary /
# negative relevance and rows with nothing relevant.
# ---------------------------------------------------------------------------


def random_relevance(rng, B, C):
  kind = rng.integers(0, 5, size=(B, 1))
  binary = (rng.random((B, C)) < 0.3).astype(np.float32)
  graded = np.where(rng.random((B, C)) < 0.4, rng.integers(1, 4, size=(B, C)), 0).astype(np.float32)
  real = np.where(rng.random((B, C)) < 0.5, rng.random((B, C)) * 2.0, 0.0).astype(np.float32)
  negative = np.where(rng.random((B, C)) < 0.3, -1.0, graded).astype(np.float32)
  zero = np.zeros((B, C), np.float32)
  rel = np.select(
    [kind == 0, kind == 1, kind == 2, kind == 3], [binary, graded, real, negative], zero
  )
  return rel.astype(np.float32)


def random_candidates(rng, B, n, C):
  kind = rng.integers(0, 4, size=(B, 1))
  noisy = rng.integers(-1, max(C, 1), size=(B, n))  # -1 padding + duplicates
  if n <= C:
    distinct = np.argsort(rng.random((B, C)), axis=-1)[:, :n]
  else:
    distinct = noisy
  odd = np.where(rng.random((B, n)) < 0.2, rng.choice([-3, C, C + 2], size=(B, n)), distinct)
  padded = np.where(rng.random((B, n)) < 0.3, -1, distinct)
  return np.select([kind == 0, kind == 1, kind == 2], [noisy, distinct, odd], padded).astype(
    np.int32
  )


def random_ranking_from(rng, slate, m):
  B, k = slate.shape
  picks = np.argsort(rng.random((B, k)), axis=-1)[:, : min(m, k)]
  ranking = np.take_along_axis(slate, picks, axis=-1)
  if m > k:
    ranking = np.concatenate([ranking, rng.integers(-1, 5, size=(B, m - k))], axis=-1)
  stray = rng.random((B, m)) < 0.1
  return np.where(stray, rng.integers(-1, 9, size=(B, m)), ranking).astype(np.int32)


# (C, k, m): a pool smaller than the slate and a ranking longer than the slate,
# typical sizes, and a large pool (tiny pools are covered in test_edge_cases).
SHAPES = [(4, 6, 8), (20, 10, 5), (70, 6, 4)]
B_REF = 128
RANK_REFS = {
  "ndcg": ref_ndcg,
  "hit": ref_hit,
  "mrr": ref_mrr,
  "recall": ref_recall,
  "precision": ref_precision,
}
TOPK_FNS = {
  "hit": (R.hit_at_k, ref_hit),
  "recall": (R.recall_at_k, ref_recall),
  "precision": (R.precision_at_k, ref_precision),
  "mrr": (R.mrr, ref_mrr),
}


def ndcg_ks(m):
  return (None, 1, m + 2)  # default k = m, NDCG@1, and k beyond the ranking length


def topk_ks(m):
  return (1, m, m + 1)


@functools.lru_cache(maxsize=None)
def case(C, k, m, seed=0):
  rng = np.random.default_rng([seed, C, k, m])
  rel = random_relevance(rng, B_REF, C)
  slate = random_candidates(rng, B_REF, k, C)
  from_slate = random_ranking_from(rng, slate, m)
  anywhere = random_candidates(rng, B_REF, m, C)
  ranking = np.where(rng.random((B_REF, 1)) < 0.6, from_slate, anywhere).astype(np.int32)
  return slate, ranking, rel


def _all_metrics(slate, ranking, rel, m):
  out = {f"coverage/{mode}": R.coverage(slate, rel, mode=mode) for mode in ("recall", "f1")}
  for gain in ("exp", "linear"):
    for kk in ndcg_ks(m):
      out[f"ndcg/{gain}/{kk}"] = R.ndcg(ranking, rel, k=kk, gain=gain)
  for name, (fn, _) in TOPK_FNS.items():
    for kk in topk_ks(m):
      out[f"{name}/{kk}"] = fn(ranking, rel, k=kk)
  out["mrr/None"] = R.mrr(ranking, rel)
  for restrict in (False, True):
    for metric in RANK_REFS:
      out[f"phase/{metric}/{restrict}"] = R.phase_rewards(
        slate,
        ranking,
        rel,
        coverage_mode="f1",
        rank_metric=metric,
        rank_k=2,
        restrict_to_slate=restrict,
      )
    out[f"joint/{restrict}"] = R.joint_reward(
      slate, ranking, rel, lam=0.3, gain="linear", restrict_to_slate=restrict
    )
  return out


@functools.lru_cache(maxsize=None)
def outputs(C, k, m):
  """Every metric on case(C, k, m), from one jitted call (one compilation per shape)."""
  slate, ranking, rel = case(C, k, m)
  return jax.jit(functools.partial(_all_metrics, m=m))(slate, ranking, rel)


def rows(*arrays):
  return zip(*(a.tolist() for a in arrays))


def check_rows(got, expected):
  assert got.dtype == jnp.float32 and got.shape == (B_REF,)
  np.testing.assert_allclose(
    np.asarray(got), np.asarray(expected, np.float64), rtol=RTOL, atol=ATOL
  )


# ---------------------------------------------------------------------------
# Vectorised implementation == reference, on many random rows.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("C,k,m", SHAPES)
@pytest.mark.parametrize("mode", ["recall", "f1"])
def test_coverage_matches_reference(C, k, m, mode):
  slate, _, rel = case(C, k, m)
  check_rows(
    outputs(C, k, m)[f"coverage/{mode}"], [ref_coverage(s, r, mode) for s, r in rows(slate, rel)]
  )


@pytest.mark.parametrize("C,k,m", SHAPES)
@pytest.mark.parametrize("gain", ["exp", "linear"])
def test_ndcg_matches_reference(C, k, m, gain):
  _, ranking, rel = case(C, k, m)
  for kk in ndcg_ks(m):
    check_rows(
      outputs(C, k, m)[f"ndcg/{gain}/{kk}"],
      [ref_ndcg(r, v, kk, gain) for r, v in rows(ranking, rel)],
    )


@pytest.mark.parametrize("C,k,m", SHAPES)
@pytest.mark.parametrize("name", sorted(TOPK_FNS))
def test_topk_metrics_match_reference(C, k, m, name):
  _, ranking, rel = case(C, k, m)
  ref = TOPK_FNS[name][1]
  for kk in topk_ks(m):
    check_rows(outputs(C, k, m)[f"{name}/{kk}"], [ref(r, v, kk) for r, v in rows(ranking, rel)])
  if name == "mrr":
    check_rows(outputs(C, k, m)["mrr/None"], [ref_mrr(r, v) for r, v in rows(ranking, rel)])


@pytest.mark.parametrize("C,k,m", SHAPES)
@pytest.mark.parametrize("restrict", [False, True])
def test_phase_and_joint_rewards(C, k, m, restrict):
  slate, ranking, rel = case(C, k, m)
  eff = ranking  # what the ranking metrics see
  if restrict:
    eff = np.array(
      [[c if (c != -1 and c in set(s)) else -1 for c in r] for s, r in rows(slate, ranking)],
      np.int32,
    ).reshape(ranking.shape)
  out = outputs(C, k, m)
  for metric, ref in RANK_REFS.items():
    r_gen, r_rank = out[f"phase/{metric}/{restrict}"]
    check_rows(r_gen, [ref_coverage(s, v, "f1") for s, v in rows(slate, rel)])
    check_rows(r_rank, [ref(r, v, 2) for r, v in rows(eff, rel)])
  check_rows(
    out[f"joint/{restrict}"],
    [
      ref_coverage(s, v) + 0.3 * ref_ndcg(r, v, None, "linear") for s, r, v in rows(slate, eff, rel)
    ],
  )


@pytest.mark.parametrize("C,k,m", SHAPES)
@pytest.mark.parametrize("gain", ["exp", "linear"])
def test_order_aware_slate_reward_is_the_slates_ndcg(C, k, m, gain):
  """reward.coverage="ndcg": R_gen is the slate's NDCG@k (ideal over the pool), R_rank
  unchanged; reversing a slate changes R_gen where the order of its relevant slots does."""
  slate, ranking, rel = case(C, k, m)
  r_gen, r_rank = R.phase_rewards(slate, ranking, rel, coverage_mode="ndcg", gain=gain)
  check_rows(r_gen, [ref_ndcg(s, v, None, gain) for s, v in rows(slate, rel)])
  check_rows(r_rank, [ref_ndcg(r, v, None, gain) for r, v in rows(ranking, rel)])
  rev = R.phase_rewards(slate[:, ::-1], ranking, rel, coverage_mode="ndcg", gain=gain)[0]
  check_rows(rev, [ref_ndcg(s[::-1], v, None, gain) for s, v in rows(slate, rel)])
  assert np.any(np.abs(np.asarray(rev) - np.asarray(r_gen)) > 1e-3)
  with pytest.raises(ValueError, match="coverage_mode"):
    R.phase_rewards(slate, ranking, rel, coverage_mode="dcg")


def _all_format_checks(slate, ranking, sizes, mask, C):
  variants = {
    "size": (C, None),
    "mask": (C, mask),
    "per_row_size": (sizes, None),
    "smaller_size_and_mask": (max(C - 1, 0), mask),
    "mask_only": (None, mask),
  }
  return {
    name: (
      R.format_errors(slate, ranking, ps, pm),
      R.format_validity(slate, ranking, ps, pool_mask=pm),
      R.format_penalty(slate, ranking, ps, penalty=0.7, pool_mask=pm),
    )
    for name, (ps, pm) in variants.items()
  }


@pytest.mark.parametrize("C,k,m", SHAPES)
def test_format_checks_match_reference(C, k, m):
  slate, ranking, _ = case(C, k, m)
  rng = np.random.default_rng(C * 100 + k)
  mask = rng.random((B_REF, C)) < 0.8
  sizes = rng.integers(0, C + 1, size=B_REF)
  out = jax.jit(functools.partial(_all_format_checks, C=C))(slate, ranking, sizes, mask)
  variants = {
    "size": (C, None),
    "mask": (C, mask),
    "per_row_size": (sizes, None),
    "smaller_size_and_mask": (max(C - 1, 0), mask),
    "mask_only": (C, mask),
  }
  for variant, (pool_size, pool_mask) in variants.items():
    errs, valid, penalty = out[variant]
    ps = np.broadcast_to(pool_size, (B_REF,)).tolist()
    masks = [None] * B_REF if pool_mask is None else pool_mask.tolist()
    ref = [
      ref_format_errors(s, r, p, pm)
      for s, r, p, pm in zip(slate.tolist(), ranking.tolist(), ps, masks)
    ]
    assert set(errs) == set(ref[0])
    for name in errs:
      assert errs[name].dtype == jnp.bool_ and errs[name].shape == (B_REF,)
      np.testing.assert_array_equal(
        np.asarray(errs[name]), [e[name] for e in ref], err_msg=f"{variant}/{name}"
      )
    expected_valid = [0.0 if any(e.values()) else 1.0 for e in ref]
    assert valid.dtype == jnp.float32 and penalty.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(valid), expected_valid)
    np.testing.assert_allclose(
      np.asarray(penalty), [-0.7 * (1 - v) for v in expected_valid], atol=1e-7
    )


def test_format_validity_accepts_valid_rollouts():
  rng = np.random.default_rng(1)
  slate = np.argsort(rng.random((50, 12)), axis=-1)[:, :6].astype(np.int32)
  ranking = slate[:, ::-1][:, :4]
  assert np.all(np.asarray(R.format_validity(slate, ranking, 12)) == 1.0)
  assert np.all(np.asarray(R.format_penalty(slate, ranking, 12)) == 0.0)
  assert float(R.format_validity(slate[0], slate[0, :0], 12)) == 1.0  # empty ranking is valid


# ---------------------------------------------------------------------------
# Parity with sklearn.metrics.ndcg_score.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("gain", ["linear", "exp"])
def test_ndcg_matches_sklearn(gain):
  rng = np.random.default_rng(7)
  B, C, m = 120, 15, 6
  rel = np.where(rng.random((B, C)) < 0.5, rng.integers(0, 5, size=(B, C)), 0).astype(np.float32)
  rel[::10] = 0.0  # rows with nothing relevant: both give 0
  rel[5::10] = rng.random((len(rel[5::10]), C)) * 3  # real-valued grades
  ranking = np.argsort(rng.random((B, C)), axis=-1)[:, :m].astype(np.int32)
  # sklearn scores every item: the ranked items get descending scores m..1,
  # everything else scores 0 (ties there only matter beyond position m >= k).
  scores = np.zeros((B, C))
  np.put_along_axis(scores, ranking, np.arange(m, 0, -1, dtype=float)[None], axis=-1)
  # sklearn's gain is linear; 2^rel - 1 as its y_true reproduces exp gain.
  y_true = rel.astype(np.float64) if gain == "linear" else np.exp2(rel.astype(np.float64)) - 1
  for k in (1, 3, m):
    got = np.asarray(R.ndcg(ranking, rel, k=k, gain=gain))
    want = [ndcg_score(y_true[i : i + 1], scores[i : i + 1], k=k) for i in range(B)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Hypothesis properties (fixed shapes, so the jitted functions compile once).
# ---------------------------------------------------------------------------

PC, PK, PM = 8, 5, 4
_cov = jax.jit(R.coverage, static_argnames=("mode",))
_ndcg = jax.jit(R.ndcg, static_argnames=("k", "gain"))
_hit = jax.jit(R.hit_at_k, static_argnames=("k",))
_rec = jax.jit(R.recall_at_k, static_argnames=("k",))
_prec = jax.jit(R.precision_at_k, static_argnames=("k",))
_mrr = jax.jit(R.mrr, static_argnames=("k",))

grades = st.sampled_from([0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 0.5, -1.0])
relevance_st = st.lists(grades, min_size=PC, max_size=PC)
slate_st = st.lists(st.integers(-1, PC - 1), min_size=PK, max_size=PK)
ranking_st = st.lists(st.integers(-1, PC - 1), min_size=PM, max_size=PM)


@PROPS
@given(slate=slate_st, ranking=ranking_st, rel=relevance_st)
def test_property_values_in_unit_interval(slate, ranking, rel):
  s, r, v = np.array(slate, np.int32), np.array(ranking, np.int32), np.array(rel, np.float32)
  values = [
    _cov(s, v, mode="recall"),
    _cov(s, v, mode="f1"),
    _ndcg(r, v, gain="exp"),
    _ndcg(r, v, gain="linear"),
    _ndcg(r, v, k=2, gain="exp"),
    _hit(r, v, k=2),
    _rec(r, v, k=3),
    _prec(r, v, k=3),
    _mrr(r, v),
  ]
  for x in values:
    x = float(x)
    assert 0.0 <= x <= 1.0 and not math.isnan(x)


@PROPS
@given(slate=slate_st, rel=relevance_st, perm=st.permutations(range(PK)))
def test_property_coverage_is_permutation_invariant(slate, rel, perm):
  s, v = np.array(slate, np.int32), np.array(rel, np.float32)
  for mode in ("recall", "f1"):
    assert float(_cov(s, v, mode=mode)) == float(_cov(s[list(perm)], v, mode=mode))


@PROPS
@given(
  rel=relevance_st, gain=st.sampled_from(["exp", "linear"]), k=st.sampled_from([None, 1, 3, 6])
)
def test_property_ideal_ranking_scores_one(rel, gain, k):
  v = np.array(rel, np.float32)
  ideal = np.argsort(-np.maximum(v, 0), kind="stable")[:PM].astype(np.int32)
  got = float(_ndcg(ideal, v, k=k, gain=gain))
  if k is not None and k > PM:  # the ideal has more slots than the ranking
    assert got == pytest.approx(ref_ndcg(ideal.tolist(), rel, k, gain), rel=1e-5)
  elif np.any(v > 0):
    assert got == pytest.approx(1.0, abs=1e-6)
  else:
    assert got == 0.0


@PROPS
@given(
  rel=relevance_st,
  order=st.permutations(range(PC)),
  i=st.integers(0, PM - 1),
  j=st.integers(0, PM - 1),
  gain=st.sampled_from(["exp", "linear"]),
)
def test_property_swapping_relevant_item_upward_never_hurts(rel, order, i, j, gain):
  v = np.array(rel, np.float32)
  ranking = np.array(order[:PM], np.int32)
  i, j = min(i, j), max(i, j)
  if max(v[ranking[j]], 0) <= max(v[ranking[i]], 0):
    ranking[[i, j]] = ranking[[j, i]]  # make slot j the more relevant one
  before = float(_ndcg(ranking, v, gain=gain))
  swapped = ranking.copy()
  swapped[[i, j]] = swapped[[j, i]]  # the more relevant item moves up to slot i
  assert float(_ndcg(swapped, v, gain=gain)) >= before - 1e-6


@PROPS
@given(
  st.lists(
    st.lists(st.floats(-100, 100, width=32), min_size=6, max_size=6), min_size=3, max_size=3
  ),
  st.sampled_from(["mean", "std", "rloo"]),
)
def test_property_group_advantages_sum_to_zero(r, mode):
  r = np.array(r, np.float32)
  adv = np.asarray(_adv(r, mode=mode))
  assert np.all(np.isfinite(adv))
  scale = np.abs(adv).max() + np.abs(r).max() + 1
  np.testing.assert_allclose(adv.sum(-1), 0.0, atol=1e-5 * scale)


# ---------------------------------------------------------------------------
# Group and token advantages.
# ---------------------------------------------------------------------------

_adv = jax.jit(R.group_advantages, static_argnames=("mode", "axis"))


@pytest.mark.parametrize("mode", ["mean", "std", "rloo"])
@pytest.mark.parametrize("G", [1, 2, 5, 16])
def test_group_advantages_match_reference(mode, G):
  rng = np.random.default_rng(G)
  r = rng.normal(size=(40, G)).astype(np.float32)
  r[::7] = 0.25  # zero-variance groups
  r[3::7] = np.round(r[3::7])  # ties
  got = np.asarray(_adv(r, mode=mode))
  assert got.shape == r.shape and got.dtype == np.float32
  np.testing.assert_allclose(
    got, [ref_group_advantages(row, mode) for row in r.tolist()], rtol=1e-4, atol=1e-5
  )
  np.testing.assert_allclose(got.sum(-1), 0.0, atol=1e-5)


def test_group_advantages_zero_variance_is_exactly_zero():
  G = 7
  r = np.stack([np.full(G, x, np.float32) for x in (0.1, 1 / 3, 1e8, -2.5, 0.0, 1e-30)])
  for mode in ("mean", "std", "rloo"):
    for eps in (1e-6, 0.0):
      got = np.asarray(_adv(r, mode=mode, eps=eps))
      assert not np.isnan(got).any()
      assert np.all(got == 0.0), (mode, eps, got)
  np.testing.assert_array_equal(
    np.asarray(R.group_advantages(np.ones((3, 1)), mode="std")), 0.0
  )  # G = 1


def test_group_advantages_rloo_is_leave_one_out():
  r = np.random.default_rng(3).random((10, 6)).astype(np.float32)
  got = np.asarray(_adv(r, mode="rloo"))
  for b in range(10):
    for i in range(6):
      others = [r[b, j] for j in range(6) if j != i]
      assert got[b, i] == pytest.approx(r[b, i] - sum(others) / len(others), abs=1e-5)


def test_group_advantages_std_mode_has_unit_population_std():
  r = np.random.default_rng(4).normal(scale=3.0, size=(20, 8)).astype(np.float32)
  adv = np.asarray(_adv(r, mode="std"))
  np.testing.assert_allclose(adv.std(-1, ddof=0), 1.0, rtol=1e-4)
  np.testing.assert_allclose(adv.mean(-1), 0.0, atol=1e-5)


def test_group_advantages_axis_batch_and_int_input():
  r = np.random.default_rng(5).random((3, 4, 6)).astype(np.float32)
  a = np.asarray(_adv(r, mode="std"))
  np.testing.assert_allclose(
    a.reshape(12, 6), np.asarray(_adv(r.reshape(12, 6), mode="std")), atol=1e-6
  )
  np.testing.assert_allclose(
    np.asarray(_adv(np.moveaxis(r, -1, 0), mode="std", axis=0)), np.moveaxis(a, -1, 0), atol=1e-6
  )
  ints = R.group_advantages(np.array([[1, 0, 0, 1]]))
  assert ints.dtype == jnp.float32 and ints.tolist() == [[0.5, -0.5, -0.5, 0.5]]


def test_token_advantages_places_values_by_phase():
  rng = np.random.default_rng(6)
  B, G, T = 3, 4, 11
  ids = rng.integers(0, 4, size=(B, G, T)).astype(np.int32)
  a_gen = rng.normal(size=(B, G)).astype(np.float32)
  a_rank = rng.normal(size=(B, G)).astype(np.float32)
  expected = np.zeros((B, G, T), np.float32)
  for b in range(B):
    for g in range(G):
      for t in range(T):
        if ids[b, g, t] == R.PHASE_GEN:
          expected[b, g, t] = a_gen[b, g]
        elif ids[b, g, t] == R.PHASE_RANK:
          expected[b, g, t] = a_rank[b, g]
  by_dict = jax.jit(R.token_advantages)(ids, {R.PHASE_GEN: a_gen, R.PHASE_RANK: a_rank})
  by_seq = R.token_advantages(ids, [None, a_gen, a_rank])
  stacked = R.token_advantages(
    ids, np.stack([np.zeros_like(a_gen), a_gen, a_rank, np.zeros_like(a_gen)])
  )
  for got in (by_dict, by_seq, stacked):
    assert got.shape == (B, G, T) and got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), expected)
  tag = R.token_advantages(ids, {R.PHASE_TAG: 2.0})  # scalar broadcast
  np.testing.assert_array_equal(np.asarray(tag), np.where(ids == R.PHASE_TAG, 2.0, 0.0))
  np.testing.assert_array_equal(np.asarray(R.token_advantages(ids, {})), 0.0)


def test_phase_constants():
  assert (R.PHASE_NONE, R.PHASE_GEN, R.PHASE_RANK, R.PHASE_TAG) == (0, 1, 2, 3)


# ---------------------------------------------------------------------------
# Edge cases.
# ---------------------------------------------------------------------------


def test_edge_cases():
  rel = jnp.array([0.0, 1.0, 0.0, 2.0])
  none = jnp.zeros(4)
  empty = jnp.array([-1, -1, -1])
  all_fns = [
    lambda x, v: R.coverage(x, v),
    lambda x, v: R.coverage(x, v, mode="f1"),
    lambda x, v: R.ndcg(x, v),
    lambda x, v: R.hit_at_k(x, v, 2),
    lambda x, v: R.mrr(x, v),
    lambda x, v: R.recall_at_k(x, v, 2),
    lambda x, v: R.precision_at_k(x, v, 2),
  ]
  for f in all_fns:
    assert float(f(jnp.array([1, 3, 0]), none)) == 0.0  # nothing relevant -> 0, not NaN
    assert float(f(empty, rel)) == 0.0  # all slots empty
    assert float(f(jnp.array([7, -5, 4]), rel)) == 0.0  # out-of-range ids act as empty
    assert float(f(jnp.zeros((0,), jnp.int32), rel)) == 0.0  # zero slots
    assert float(f(jnp.array([0, 1]), jnp.zeros((0,)))) == 0.0  # empty pool
  # Duplicates count once.
  assert float(R.coverage(jnp.array([1, 1, 1]), rel)) == 0.5
  assert float(R.coverage(jnp.array([1, 1, 3]), rel)) == 1.0
  # Pool smaller than the slate: min(|Rel|, k) = |Rel| <= C.
  assert float(R.coverage(jnp.array([0, 1, -1, -1, -1]), jnp.array([1.0, 1.0]))) == 1.0
  # Negative relevance is not relevant and earns no gain.
  assert float(R.coverage(jnp.array([0]), jnp.array([-2.0, 1.0]))) == 0.0
  assert float(R.ndcg(jnp.array([0, 1]), jnp.array([-2.0, 1.0]))) == pytest.approx(1 / math.log2(3))
  # recall@k uses |Rel| (standard), coverage uses min(|Rel|, k).
  many = jnp.ones(6)
  assert float(R.recall_at_k(jnp.array([0, 1]), many, 2)) == pytest.approx(2 / 6)
  assert float(R.coverage(jnp.array([0, 1]), many)) == 1.0
  # Duplicate in a ranking earns gain only once.
  assert float(R.ndcg(jnp.array([3, 3]), rel)) == pytest.approx(
    3 / (3 + 1 / math.log2(3)), rel=1e-6
  )
  # Invalid arguments.
  with pytest.raises(ValueError):
    R.coverage(jnp.array([0]), rel, mode="precision")
  with pytest.raises(ValueError):
    R.ndcg(jnp.array([0]), rel, gain="log")
  with pytest.raises(ValueError):
    R.group_advantages(jnp.ones((2, 3)), mode="zscore")
  with pytest.raises(ValueError):
    R.phase_rewards(jnp.array([0]), jnp.array([0]), rel, rank_metric="map")
  with pytest.raises(TypeError):
    R.coverage(jnp.array([0.0, 1.0]), rel)
  with pytest.raises(ValueError):
    R.coverage(jnp.zeros((3, 2), jnp.int32), jnp.zeros((4, 5)))  # batch shapes do not broadcast


def test_ndcg_ideal_is_exactly_one_for_graded_pools():
  rng = np.random.default_rng(8)
  for C in (5, 20, 100):  # both branches of the ideal-gain computation
    rel = rng.random((64, C)).astype(np.float32) * 3
    ideal = np.argsort(-rel, axis=-1)[:, :4].astype(np.int32)
    np.testing.assert_array_equal(np.asarray(R.ndcg(ideal, rel)), 1.0)
    np.testing.assert_array_equal(np.asarray(R.ndcg(ideal, rel, gain="linear")), 1.0)


# ---------------------------------------------------------------------------
# jit / vmap / extra batch axes / broadcasting / sharding.
# ---------------------------------------------------------------------------

FUNCS = {
  "coverage": (lambda s, r, v: R.coverage(s, v)),
  "coverage_f1": (lambda s, r, v: R.coverage(s, v, mode="f1")),
  "ndcg": (lambda s, r, v: R.ndcg(r, v)),
  "ndcg@2_linear": (lambda s, r, v: R.ndcg(r, v, k=2, gain="linear")),
  "hit@1": (lambda s, r, v: R.hit_at_k(r, v, 1)),
  "recall@3": (lambda s, r, v: R.recall_at_k(r, v, 3)),
  "precision@3": (lambda s, r, v: R.precision_at_k(r, v, 3)),
  "mrr": (lambda s, r, v: R.mrr(r, v)),
  "validity": (lambda s, r, v: R.format_validity(s, r, v.shape[-1])),
  "penalty": (lambda s, r, v: R.format_penalty(s, r, v.shape[-1], penalty=2.0)),
  "joint": (lambda s, r, v: R.joint_reward(s, r, v, lam=0.5)),
  "phase_mrr": (lambda s, r, v: R.phase_rewards(s, r, v, rank_metric="mrr")[1]),
}


def all_funcs(s, r, v):
  return {name: f(s, r, v) for name, f in FUNCS.items()}


def test_jit_vmap_and_batch_axes_agree():
  slate, ranking, rel = case(12, 6, 4)
  Bp, G, C = 16, 8, rel.shape[-1]  # B_REF = 128 = 16 prompts x 8 rollouts
  per_prompt = rel.reshape(Bp, G, C)[:, :1]  # one relevance row per prompt: [B, 1, C]
  flat_rel = np.repeat(per_prompt, G, axis=1).reshape(B_REF, C)
  grouped = (slate.reshape(Bp, G, -1), ranking.reshape(Bp, G, -1))
  reference = jax.jit(all_funcs)(slate, ranking, flat_rel)
  variants = {
    "vmap": jax.jit(jax.vmap(all_funcs))(slate, ranking, flat_rel),
    "[B, G] with relevance [B, 1, C]": jax.jit(all_funcs)(*grouped, per_prompt),
    "vmap(vmap) over [B, G]": jax.jit(jax.vmap(jax.vmap(all_funcs)))(
      *grouped, flat_rel.reshape(Bp, G, C)
    ),
  }
  for name in FUNCS:
    assert reference[name].shape == (B_REF,) and reference[name].dtype == jnp.float32, name
    for variant, out in variants.items():
      assert out[name].shape == (B_REF,) if variant == "vmap" else (Bp, G), (name, variant)
      np.testing.assert_allclose(
        np.asarray(out[name]).reshape(-1),
        np.asarray(reference[name]),
        rtol=1e-6,
        atol=1e-7,
        err_msg=f"{name} {variant}",
      )
  # Eager calls (the public functions are jit wrappers) agree with an outer jit.
  np.testing.assert_allclose(
    np.asarray(R.ndcg(ranking, flat_rel)), np.asarray(reference["ndcg"]), rtol=1e-6
  )


def test_advantage_pipeline_under_jit_and_vmap():
  slate, ranking, rel = case(12, 6, 4)
  Bp, G, T = 16, 8, 9
  ids = np.random.default_rng(9).integers(0, 4, size=(Bp, G, T)).astype(np.int32)

  def pipeline(s, r, v, ids):
    r_gen, r_rank = R.phase_rewards(s, r, v)
    return R.token_advantages(
      ids,
      {
        R.PHASE_GEN: R.group_advantages(r_gen, mode="std"),
        R.PHASE_RANK: R.group_advantages(r_rank, mode="rloo"),
      },
    )

  args = (slate.reshape(Bp, G, -1), ranking.reshape(Bp, G, -1), rel.reshape(Bp, G, -1), ids)
  eager = np.asarray(pipeline(*args))
  np.testing.assert_allclose(np.asarray(jax.jit(pipeline)(*args)), eager, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(
    np.asarray(jax.jit(jax.vmap(pipeline))(*args)), eager, rtol=1e-6, atol=1e-7
  )


SHARDING_SCRIPT = textwrap.dedent(
  """
    import functools, json
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from fgrpo_jax import rewards as R
    assert jax.device_count() == 2, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rng = np.random.default_rng(0)
    B, G, C, k, m = 8, 4, 10, 5, 3
    slate = rng.integers(-1, C, size=(B, G, k)).astype(np.int32)
    ranking = rng.integers(-1, C, size=(B, G, m)).astype(np.int32)
    rel = (rng.random((B, 1, C)) < 0.4) * rng.integers(1, 4, size=(B, 1, C)).astype(np.float32)
    def put(x):
        return jax.device_put(x, NamedSharding(mesh, P("data", *([None] * (x.ndim - 1)))))
    def run(s, r, v):
        cov, nd = R.phase_rewards(s, r, v)
        return dict(cov=cov, nd=nd, mrr=R.mrr(r, v), valid=R.format_validity(s, r, C),
                    adv=R.group_advantages(cov + nd, mode="std"))
    ref = run(slate, ranking, rel)
    out = jax.jit(run)(put(slate), put(ranking), put(rel))
    assert len(out["cov"].sharding.device_set) == 2
    ok = all(np.allclose(np.asarray(out[n]), np.asarray(ref[n]), rtol=1e-6, atol=1e-7) for n in ref)
    print(json.dumps({"ok": bool(ok)}))
    """
)


def _subprocess_env(**extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
  return env


def test_sharded_inputs_on_two_cpu_devices():
  env = _subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run(
    [sys.executable, "-c", SHARDING_SCRIPT],
    capture_output=True,
    text=True,
    env=env,
    cwd=REPO,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"ok": True}


# ---------------------------------------------------------------------------
# Docstrings and import hygiene.
# ---------------------------------------------------------------------------


def test_doctests_pass():
  result = doctest.testmod(R, verbose=False, report=True)
  assert result.failed == 0
  assert result.attempted >= 30


def test_every_public_function_has_an_example():
  for name in R.__all__:
    obj = getattr(R, name)
    if callable(obj):
      assert obj.__doc__ and ">>>" in obj.__doc__, name


def test_module_imports_only_jax_numpy_and_stdlib():
  tree = ast.parse(pathlib.Path(R.__file__).read_text())
  allowed = {"jax", "numpy", "__future__"} | set(sys.stdlib_module_names)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      assert node.level == 0, "no relative imports"
      names = [node.module]
    else:
      continue
    for n in names:
      assert n.split(".")[0] in allowed, n


def test_import_pulls_in_no_heavy_dependencies():
  code = "import fgrpo_jax.rewards, sys, json; print(json.dumps(sorted(sys.modules)))"
  proc = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    env=_subprocess_env(),
    cwd=REPO,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
  forbidden = {
    "flax",
    "optax",
    "orbax",
    "transformers",
    "tensorflow",
    "tensorboard",
    "torch",
    "sklearn",
    "chex",
    "ml_collections",
    "clu",
    "grain",
    "tokenizers",
    "safetensors",
    "tensorflow_datasets",
    "matplotlib",
    "hypothesis",
  }
  bad = sorted(m for m in loaded if m.split(".")[0] in forbidden)
  bad += sorted(m for m in loaded if m.startswith("fgrpo_jax.") and m != "fgrpo_jax.rewards")
  assert not bad, bad


# ---------------------------------------------------------------------------
# R_rank judged against the slate (reward.rank_ideal="slate") and masked
# group baselines.
# ---------------------------------------------------------------------------


def ref_slate_ndcg(slate, ranking, rel, k=None, gain="exp"):
  """NDCG whose relevance (DCG and ideal alike) counts only the slate's members."""
  members = {c for c in slate if _ok(c, len(rel))}
  return ref_ndcg(ranking, [r if i in members else 0.0 for i, r in enumerate(rel)], k, gain)


def ref_masked_advantages(r, mask, mode="mean", eps=1e-6):
  """Group advantages over the masked rollouts only; the others get 0."""
  idx = [i for i, m in enumerate(mask) if m]
  out = [0.0] * len(r)
  for i, a in zip(idx, ref_group_advantages([r[i] for i in idx], mode, eps)):
    out[i] = a
  return out


@pytest.mark.parametrize("gain", ["exp", "linear"])
def test_slate_rank_ideal_matches_reference(gain):
  rng = np.random.default_rng(7)
  N, C, k, m = 300, 12, 5, 3
  rel = np.where(rng.random((N, C)) < 0.3, rng.integers(1, 4, (N, C)), 0).astype(np.float32)
  slate = np.stack([rng.choice(C, k, replace=False) for _ in range(N)]).astype(np.int32)
  slate[::7, -1] = -1  # empty slots
  ranking = np.stack([rng.permutation(s)[:m] for s in slate]).astype(np.int32)
  r_gen, r_rank = R.phase_rewards(slate, ranking, rel, gain=gain, rank_ideal="slate")
  defined = R.rank_defined(slate, rel)
  for i in range(N):
    assert r_rank[i] == pytest.approx(
      ref_slate_ndcg(slate[i], ranking[i], rel[i], gain=gain), rel=RTOL, abs=ATOL
    )
    assert bool(defined[i]) == any(_ok(c, C) and rel[i][c] > 0 for c in slate[i])
    assert r_gen[i] == pytest.approx(ref_coverage(slate[i], rel[i]), rel=RTOL, abs=ATOL)
  # The pool ideal charges a slate miss to the ranking; the slate ideal does not.
  pool = R.phase_rewards(slate, ranking, rel, gain=gain)[1]
  assert np.all(np.asarray(r_rank) >= np.asarray(pool) - 1e-6)
  assert np.any(np.asarray(r_rank) > np.asarray(pool) + 1e-3)
  with pytest.raises(ValueError, match="rank_ideal"):
    R.phase_rewards(slate, ranking, rel, rank_ideal="slates")


@pytest.mark.parametrize("mode", ["mean", "std", "rloo"])
def test_masked_group_advantages_match_reference(mode):
  rng = np.random.default_rng(11)
  r = rng.random((40, 6)).astype(np.float32)
  r[:5] = np.round(r[:5])  # ties
  mask = rng.random((40, 6)) < 0.6
  mask[0] = False  # nothing defined
  mask[1] = [True, False, False, False, False, False]  # one: no baseline
  got = np.asarray(R.group_advantages(r, mode=mode, mask=mask))
  for i in range(40):
    np.testing.assert_allclose(
      got[i], ref_masked_advantages(list(r[i]), mask[i], mode), rtol=1e-4, atol=1e-6
    )
  # An all-True mask is the unmasked function; the mask follows `axis`.
  np.testing.assert_allclose(
    R.group_advantages(r, mode=mode, mask=np.ones_like(mask)),
    R.group_advantages(r, mode=mode),
    rtol=1e-5,
    atol=1e-6,
  )
  np.testing.assert_allclose(
    R.group_advantages(r.T, mode=mode, mask=mask.T, axis=0), got.T, rtol=1e-6, atol=1e-7
  )
