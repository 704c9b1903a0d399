"""Slate / ranking rewards and group-relative advantages for F-GRPO, in pure JAX.

This module is deliberately standalone: it imports only :mod:`jax`,
:mod:`numpy` and the standard library, so other projects can copy or
``pip install`` it without pulling in the training stack.

Conventions
-----------
* A *pool* has ``C`` candidates, addressed by integer index ``0 .. C-1``.
* ``slate: int[..., k]`` -- the candidates written in the generation phase
  (a set: order is irrelevant).
* ``ranking: int[..., m]`` -- the ranking phase, best first.
* ``relevance: float[..., C]`` -- binary or graded relevance of every pool
  candidate. A candidate is *relevant* iff ``relevance > 0``; negative
  relevance is treated as 0 everywhere (it never earns gain).
* ``-1`` marks an empty slot. For the metrics, *any* index outside
  ``[0, C)`` (``-1``, ``-7``, ``C + 3``, ...) is treated like an empty slot:
  it earns nothing. :func:`format_errors` tells the two cases apart.
* A candidate that occurs more than once earns credit only at its first
  occurrence (later copies are treated as empty slots).
* The leading batch shape ``...`` is arbitrary; the leading shapes of the
  candidate array(s) and of ``relevance`` are broadcast against each other
  with NumPy rules. For ``G`` rollouts per prompt use e.g.
  ``slate: [B, G, k]`` with ``relevance: [B, 1, C]``.
* Every metric returns ``float32`` of the broadcast batch shape and is
  defined (never NaN, given finite relevance) on every input: rows with no
  relevant candidate, or whose slots are all empty, score 0.
* Everything is vectorised (no Python loops over data) and works under
  :func:`jax.jit` and :func:`jax.vmap`. Slot counts (``k``, ``m``) come from
  static shapes; string modes and ``k=`` arguments are Python-level
  configuration and must be static under jit, e.g.
  ``jax.jit(ndcg, static_argnames=("k", "gain"))`` or
  ``jax.jit(functools.partial(coverage, mode="f1"))``. The public functions
  are themselves ``jax.jit`` wrappers with those arguments declared static,
  so eager calls compile once per input shape (and are inlined into your
  own ``jit``).

Phase ids (:data:`PHASE_NONE`, :data:`PHASE_GEN`, :data:`PHASE_RANK`,
:data:`PHASE_TAG`) label every token of a rollout; :func:`token_advantages`
uses them to broadcast per-phase advantages onto tokens.

>>> import jax.numpy as jnp
>>> relevance = jnp.array([0., 1., 0., 2., 1.])   # pool of C = 5
>>> slate = jnp.array([1, 2, 3])                  # k = 3
>>> ranking = jnp.array([3, 1])                   # m = 2
>>> float(coverage(slate, relevance))             # 2 of min(3, 3) relevant
0.6666666865348816
>>> float(ndcg(ranking, relevance))               # ideal order -> 1
1.0
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "EMPTY",
  "PHASE_NONE",
  "PHASE_GEN",
  "PHASE_RANK",
  "PHASE_TAG",
  "coverage",
  "ndcg",
  "hit_at_k",
  "recall_at_k",
  "precision_at_k",
  "mrr",
  "format_errors",
  "format_validity",
  "format_penalty",
  "group_advantages",
  "token_advantages",
  "joint_reward",
  "phase_rewards",
  "slate_relevance",
  "rank_defined",
]

#: Marker of an empty candidate slot.
EMPTY = -1

#: Phase id of prompt and padding tokens (never receive an advantage).
PHASE_NONE = 0
#: Phase id of the tokens that write the slate (generation phase).
PHASE_GEN = 1
#: Phase id of the tokens that write the ranking.
PHASE_RANK = 2
#: Phase id of forced tag tokens (e.g. ``<slate>``, ``</rank>``).
PHASE_TAG = 3

_COVERAGE_MODES = ("recall", "f1")
# R_gen modes of phase_rewards: the order-invariant coverage, or "ndcg", the slate scored
# as a ranking of its k slots (an order-aware extension; the paper's R_gen is coverage).
_SLATE_REWARDS = _COVERAGE_MODES + ("ndcg",)
_GAINS = ("exp", "linear")
_RANK_METRICS = ("ndcg", "hit", "mrr", "recall", "precision")
_ADV_MODES = ("mean", "std", "rloo")
_RANK_IDEALS = ("pool", "slate")


# --------------------------------------------------------------------------
# Internal helpers (all shape logic is static; no Python loops over data).
# --------------------------------------------------------------------------


def _jit(*static_argnames: str):
  """``jax.jit`` with Python-level (static) configuration arguments.

  Jitting every public function makes eager calls compile once per input
  shape instead of dispatching op by op; inside a user's own ``jit`` /
  ``vmap`` the wrapper is simply inlined.
  """
  return functools.partial(jax.jit, static_argnames=static_argnames)


def _as_candidates(x: Any, name: str) -> jax.Array:
  x = jnp.asarray(x)
  if x.ndim < 1:
    raise ValueError(f"{name} must have at least one axis (the slot axis), got a scalar")
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name} must be an integer array of pool indices, got dtype {x.dtype}")
  return x


def _as_relevance(x: Any) -> jax.Array:
  x = jnp.asarray(x)
  if x.ndim < 1:
    raise ValueError("relevance must have at least one axis (the pool axis), got a scalar")
  return x.astype(jnp.float32)


def _batch_shape(*shapes: tuple[int, ...]) -> tuple[int, ...]:
  try:
    return tuple(np.broadcast_shapes(*shapes))
  except ValueError as e:
    raise ValueError(
      f"leading (batch) shapes {list(shapes)} do not broadcast; for G rollouts per "
      "prompt pass relevance with a singleton group axis, e.g. relevance[:, None]"
    ) from e


def _prepare(cands: Any, relevance: Any, name: str) -> tuple[jax.Array, jax.Array]:
  """Validate and broadcast ``cands[..., n]`` and ``relevance[..., C]``."""
  cands = _as_candidates(cands, name)
  rel = _as_relevance(relevance)
  batch = _batch_shape(cands.shape[:-1], rel.shape[:-1])
  cands = jnp.broadcast_to(cands, batch + cands.shape[-1:])
  rel = jnp.broadcast_to(rel, batch + rel.shape[-1:])
  return cands, rel


def _in_range(cands: jax.Array, size: Any) -> jax.Array:
  return (cands >= 0) & (cands < size)


def _repeat_mask(cands: jax.Array, consider: jax.Array) -> jax.Array:
  """True at slot i iff an earlier slot j < i holds the same value and ``consider[j]``."""
  n = cands.shape[-1]
  same = cands[..., :, None] == cands[..., None, :]  # [..., i, j]
  earlier = jnp.tril(jnp.ones((n, n), dtype=bool), k=-1)  # j < i
  return jnp.any(same & earlier & consider[..., None, :], axis=-1)


def _first_valid(cands: jax.Array, pool_size: int) -> jax.Array:
  """Slots holding an in-pool index that has not occurred in an earlier slot."""
  valid = _in_range(cands, pool_size)
  return valid & ~_repeat_mask(cands, valid)


def _gather(values: jax.Array, cands: jax.Array, mask: jax.Array, fill: Any = 0) -> jax.Array:
  """``values[..., cands]`` where ``mask``, else ``fill``; masked slots never index."""
  idx = jnp.where(mask, cands, 0)
  out = jnp.take_along_axis(values, idx, axis=-1, mode="clip")
  return jnp.where(mask, out, jnp.asarray(fill, out.dtype))


def _fit_slots(cands: jax.Array, k: int) -> jax.Array:
  """Truncate the slot axis to ``k`` or pad it with empty slots up to ``k``."""
  n = cands.shape[-1]
  if n >= k:
    return cands[..., :k]
  pad = [(0, 0)] * (cands.ndim - 1) + [(0, k - n)]
  return jnp.pad(cands, pad, constant_values=EMPTY)


def _resolve_k(k: int | None, m: int) -> int:
  if k is None:
    return m
  try:
    k = operator.index(k)
  except TypeError as e:
    raise TypeError(f"k must be a Python int (static under jit) or None, got {k!r}") from e
  if k < 0:
    raise ValueError(f"k must be >= 0, got {k}")
  return k


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  """``num / den`` where ``den > 0``, else exactly 0 (float32)."""
  num = num.astype(jnp.float32)
  den = den.astype(jnp.float32)
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0).astype(jnp.float32)


def _num_relevant(rel: jax.Array) -> jax.Array:
  return jnp.sum(rel > 0, axis=-1)


def _gain(rel: jax.Array, gain: str) -> jax.Array:
  rel = jnp.maximum(rel, 0.0)
  if gain == "exp":
    return jnp.exp2(rel) - 1.0
  if gain == "linear":
    return rel
  raise ValueError(f"gain must be one of {_GAINS}, got {gain!r}")


def _topk_hits(
  ranking: Any, relevance: Any, k: int | None
) -> tuple[jax.Array, jax.Array, jax.Array, int]:
  """Shared body of the top-k ranking metrics.

  Returns ``(is_rel, first, rel, k)`` with ``is_rel, first: bool[..., k]``:
  whether slot p of the (truncated/padded) ranking is relevant, and whether
  it is the first occurrence of an in-pool candidate.
  """
  ranking, rel = _prepare(ranking, relevance, "ranking")
  k = _resolve_k(k, ranking.shape[-1])
  r = _fit_slots(ranking, k)
  first = _first_valid(r, rel.shape[-1])
  is_rel = _gather(rel, r, first) > 0
  return is_rel, first, rel, k


# --------------------------------------------------------------------------
# Slate reward.
# --------------------------------------------------------------------------


@_jit("mode")
def coverage(slate: Any, relevance: Any, mode: str = "recall") -> jax.Array:
  """Coverage of the relevant set by a slate (order-invariant).

  Shapes: ``slate: int[..., k]``, ``relevance: float[..., C]`` (leading
  shapes broadcast) -> ``float32[...]``.

  With ``Rel = {c : relevance[c] > 0}`` and ``hits = |set(slate) ∩ Rel|``
  (duplicates count once; ``-1`` / out-of-range slots never hit):

  * ``mode="recall"``: ``hits / min(|Rel|, k)`` -- a slate of ``k`` slots
    can cover at most ``k`` relevant candidates, so a perfect slate scores 1
    even when ``|Rel| > k``; if the pool has fewer than ``k`` candidates the
    bound ``min(|Rel|, k) <= C`` still holds.
  * ``mode="f1"``: F1 between the slate and ``Rel`` with precision taken over
    the ``k`` slots (empty and duplicate slots are misses):
    ``P = hits / k``, ``R = hits / |Rel|``, ``F1 = 2PR / (P + R)
    = 2 hits / (k + |Rel|)``.

  Edge cases: no relevant candidate (``|Rel| = 0``) -> 0; all slots
  empty -> 0; ``k = 0`` -> 0. Graded relevance only matters through
  ``relevance > 0``.

  >>> rel = jnp.array([1., 0., 2., 0., 1.])            # Rel = {0, 2, 4}
  >>> coverage(jnp.array([2, 0, 2, -1]), rel).tolist()  # 2 hits / min(3, 4)
  0.6666666865348816
  >>> coverage(jnp.array([2, 0, 2, -1]), rel, mode="f1").tolist()  # 2*2 / (4 + 3)
  0.5714285969734192
  >>> coverage(jnp.array([[0, 2], [3, 1]]), rel).tolist()  # batch of two slates
  [1.0, 0.0]
  >>> coverage(jnp.array([0, 1]), jnp.zeros(5)).tolist()   # nothing relevant
  0.0
  """
  if mode not in _COVERAGE_MODES:
    raise ValueError(f"mode must be one of {_COVERAGE_MODES}, got {mode!r}")
  slate, rel = _prepare(slate, relevance, "slate")
  k = slate.shape[-1]
  first = _first_valid(slate, rel.shape[-1])
  hits = jnp.sum(first & (_gather(rel, slate, first) > 0), axis=-1)
  n_rel = _num_relevant(rel)
  if mode == "recall":
    return _safe_div(hits, jnp.minimum(n_rel, k))
  return _safe_div(2 * hits, n_rel + k)


# --------------------------------------------------------------------------
# Ranking rewards.
# --------------------------------------------------------------------------


@_jit("k", "gain")
def ndcg(ranking: Any, relevance: Any, k: int | None = None, gain: str = "exp") -> jax.Array:
  """Normalised discounted cumulative gain NDCG@k of a ranking.

  Shapes: ``ranking: int[..., m]``, ``relevance: float[..., C]`` ->
  ``float32[...]``. ``k=None`` means ``k = m``.

  ``DCG@k = sum_{p < k} g(relevance[ranking[p]]) / log2(p + 2)`` over the
  first ``k`` slots (0-based ``p``), with gain ``g(r) = 2^r - 1``
  (``gain="exp"``) or ``g(r) = r`` (``gain="linear"``); negative
  relevance is clipped to 0. ``IDCG@k`` is the same sum over the top
  ``min(k, C)`` relevance values of the *whole pool* sorted descending, and
  ``NDCG@k = DCG@k / IDCG@k``.

  Edge cases: a candidate earns gain only at its first occurrence; ``-1``
  and out-of-range slots earn 0; if ``k > m`` the missing slots count as
  empty (the ideal still has ``k`` slots); ``IDCG = 0`` (nothing relevant)
  -> 0; ``k = 0`` -> 0. An ideal ranking scores 1 (DCG and IDCG are then
  the same float sum, so exactly 1 in practice), and the result is clipped
  to ``[0, 1]`` to absorb rounding. For parity with
  ``sklearn.metrics.ndcg_score`` use ``gain="linear"``.

  >>> rel = jnp.array([0., 1., 0., 2.])
  >>> ndcg(jnp.array([3, 1]), rel).tolist()                     # ideal order
  1.0
  >>> round(ndcg(jnp.array([1, 3]), rel).tolist(), 4)           # (1 + 3/log2 3) / (3 + 1/log2 3)
  0.7967
  >>> round(ndcg(jnp.array([1, 3]), rel, gain="linear").tolist(), 4)
  0.8597
  >>> round(ndcg(jnp.array([1, 1]), rel).tolist(), 4)           # the copy earns nothing
  0.2754
  >>> ndcg(jnp.array([3, 1]), rel, k=1).tolist()                # NDCG@1
  1.0
  >>> ndcg(jnp.array([0, -1]), rel).tolist()                    # nothing relevant ranked
  0.0
  """
  if gain not in _GAINS:
    raise ValueError(f"gain must be one of {_GAINS}, got {gain!r}")
  ranking = _as_candidates(ranking, "ranking")
  rel = _as_relevance(relevance)
  k = _resolve_k(k, ranking.shape[-1])
  C = rel.shape[-1]
  batch = _batch_shape(ranking.shape[:-1], rel.shape[:-1])
  if k == 0 or C == 0:
    return jnp.zeros(batch, jnp.float32)
  g = _gain(rel, gain)
  discount = 1.0 / jnp.log2(jnp.arange(k, dtype=jnp.float32) + 2.0)
  # IDCG on the un-broadcast relevance (e.g. once per prompt for [B, 1, C]).
  # The ideal gains are padded to exactly k slots like the ranking, so an
  # ideal ranking reproduces the same float sum and scores exactly 1.
  ideal = _fit_ideal(jax.lax.top_k(g, min(k, C))[0], k)
  idcg = jnp.sum(ideal * discount, axis=-1)
  r = _fit_slots(jnp.broadcast_to(ranking, batch + ranking.shape[-1:]), k)
  first = _first_valid(r, C)
  gained = _gather(jnp.broadcast_to(g, batch + (C,)), r, first)
  dcg = jnp.sum(gained * discount, axis=-1)
  return jnp.clip(_safe_div(dcg, idcg), 0.0, 1.0)


def _fit_ideal(ideal: jax.Array, k: int) -> jax.Array:
  n = ideal.shape[-1]
  if n >= k:
    return ideal
  pad = [(0, 0)] * (ideal.ndim - 1) + [(0, k - n)]
  return jnp.pad(ideal, pad)


@_jit("k")
def hit_at_k(ranking: Any, relevance: Any, k: int) -> jax.Array:
  """Hit@k: 1 if any of the first ``k`` ranking slots is relevant, else 0.

  Shapes: ``ranking: int[..., m]``, ``relevance: float[..., C]`` ->
  ``float32[...]`` in ``{0, 1}``. Relevant means ``relevance > 0``.
  Empty / out-of-range slots never hit; ``k > m`` pads with empty slots;
  ``k = 0`` -> 0.

  >>> rel = jnp.array([0., 1., 0., 2.])
  >>> hit_at_k(jnp.array([[0, 3], [3, 0], [-1, 2]]), rel, k=1).tolist()
  [0.0, 1.0, 0.0]
  >>> hit_at_k(jnp.array([0, 3]), rel, k=2).tolist()
  1.0
  """
  is_rel, _, _, _ = _topk_hits(ranking, relevance, k)
  return jnp.any(is_rel, axis=-1).astype(jnp.float32)


@_jit("k")
def recall_at_k(ranking: Any, relevance: Any, k: int) -> jax.Array:
  """Recall@k = |distinct candidates in the first k slots ∩ Rel| / |Rel|.

  Shapes: ``ranking: int[..., m]``, ``relevance: float[..., C]`` ->
  ``float32[...]``. This is the *standard* recall@k: the denominator is
  the full ``|Rel|`` (not ``min(|Rel|, k)``), so it cannot reach 1 when
  ``|Rel| > k``. (:func:`coverage` uses the ``min(|Rel|, k)`` variant.)
  Duplicates count once; empty slots never hit; ``|Rel| = 0`` -> 0.

  >>> rel = jnp.array([1., 1., 0., 1.])                # |Rel| = 3
  >>> round(recall_at_k(jnp.array([0, 2, 1]), rel, k=2).tolist(), 4)
  0.3333
  >>> round(recall_at_k(jnp.array([0, 0, 1]), rel, k=3).tolist(), 4)
  0.6667
  >>> recall_at_k(jnp.array([0, 1]), jnp.zeros(4), k=2).tolist()
  0.0
  """
  is_rel, first, rel, _ = _topk_hits(ranking, relevance, k)
  hits = jnp.sum(is_rel & first, axis=-1)
  return _safe_div(hits, _num_relevant(rel))


@_jit("k")
def precision_at_k(ranking: Any, relevance: Any, k: int) -> jax.Array:
  """Precision@k = |distinct candidates in the first k slots ∩ Rel| / k.

  Shapes: ``ranking: int[..., m]``, ``relevance: float[..., C]`` ->
  ``float32[...]``. The denominator is always ``k`` (empty slots, repeated
  candidates and slots beyond ``m`` count as misses); ``k = 0`` -> 0.

  >>> rel = jnp.array([1., 1., 0., 1.])
  >>> precision_at_k(jnp.array([0, 2, 1, 3]), rel, k=2).tolist()
  0.5
  >>> precision_at_k(jnp.array([0, 0]), rel, k=2).tolist()   # repeat is a miss
  0.5
  """
  is_rel, first, _, k = _topk_hits(ranking, relevance, k)
  hits = jnp.sum(is_rel & first, axis=-1)
  return _safe_div(hits, jnp.asarray(k))


@_jit("k")
def mrr(ranking: Any, relevance: Any, k: int | None = None) -> jax.Array:
  """Reciprocal rank of the first relevant candidate within the first ``k`` slots.

  Shapes: ``ranking: int[..., m]``, ``relevance: float[..., C]`` ->
  ``float32[...]``. ``RR = 1 / (p + 1)`` for the smallest 0-based slot ``p < k``
  with ``relevance[ranking[p]] > 0``; 0 if there is none (also when nothing
  is relevant). ``k=None`` means ``k = m``. Average it over rows yourself
  to get the *mean* reciprocal rank.

  >>> rel = jnp.array([0., 1., 0., 2.])
  >>> mrr(jnp.array([[3, 1], [0, 1], [0, 2]]), rel).tolist()
  [1.0, 0.5, 0.0]
  >>> mrr(jnp.array([0, 1]), rel, k=1).tolist()
  0.0
  """
  is_rel, _, _, k = _topk_hits(ranking, relevance, k)
  if k == 0:
    return jnp.zeros(is_rel.shape[:-1], jnp.float32)
  recip = 1.0 / jnp.arange(1, k + 1, dtype=jnp.float32)
  return jnp.max(jnp.where(is_rel, recip, 0.0), axis=-1).astype(jnp.float32)


# --------------------------------------------------------------------------
# Format checks.
# --------------------------------------------------------------------------


@jax.jit
def format_errors(
  slate: Any, ranking: Any, pool_size: Any, pool_mask: Any = None
) -> dict[str, jax.Array]:
  """Per-row format violations of a (slate, ranking) pair.

  Shapes: ``slate: int[..., k]``, ``ranking: int[..., m]``,
  ``pool_size``: Python int or ``int[...]`` (per-row pool sizes; may be
  ``None`` when ``pool_mask`` is given), ``pool_mask: bool[..., C]``
  (optional; ``False`` marks a padded / unavailable candidate). Leading
  shapes broadcast. Returns a dict of ``bool[...]``:

  * ``slate_empty_slot`` -- some slate slot is ``-1``.
  * ``slate_out_of_pool`` -- some non-``-1`` slate slot is not a valid pool
    index: ``< 0``, ``>= pool_size``, ``>= C`` of ``pool_mask``, or masked out.
  * ``slate_duplicate`` -- some non-``-1`` value occurs twice in the slate.
  * ``ranking_empty_slot`` -- some ranking slot is ``-1``.
  * ``ranking_duplicate`` -- some non-``-1`` value occurs twice in the ranking.
  * ``ranking_not_in_slate`` -- some non-``-1`` ranking value is not in the slate.

  A ranking longer than the slate (``m > k``) necessarily triggers a
  ranking error. An empty ranking (``m = 0``) is valid.

  >>> errs = format_errors(jnp.array([2, 0, 2]), jnp.array([0, 4]), pool_size=5)
  >>> {name: bool(v) for name, v in sorted(errs.items())}  # doctest: +NORMALIZE_WHITESPACE
  {'ranking_duplicate': False, 'ranking_empty_slot': False,
   'ranking_not_in_slate': True, 'slate_duplicate': True,
   'slate_empty_slot': False, 'slate_out_of_pool': False}
  """
  slate = _as_candidates(slate, "slate")
  ranking = _as_candidates(ranking, "ranking")
  shapes = [slate.shape[:-1], ranking.shape[:-1]]
  mask = None
  if pool_mask is not None:
    mask = jnp.asarray(pool_mask)
    if mask.ndim < 1:
      raise ValueError("pool_mask must have a pool axis")
    mask = mask.astype(bool)
    shapes.append(mask.shape[:-1])
  if pool_size is None:
    if mask is None:
      raise ValueError("give pool_size, pool_mask, or both")
    pool_size = mask.shape[-1]
  size = jnp.asarray(pool_size)
  if not jnp.issubdtype(size.dtype, jnp.integer):
    raise TypeError(f"pool_size must be an integer, got dtype {size.dtype}")
  shapes.append(size.shape)
  batch = _batch_shape(*shapes)

  slate = jnp.broadcast_to(slate, batch + slate.shape[-1:])
  ranking = jnp.broadcast_to(ranking, batch + ranking.shape[-1:])
  size = jnp.broadcast_to(size, batch)[..., None]

  s_empty = slate == EMPTY
  in_pool = _in_range(slate, size)
  if mask is not None:
    mask = jnp.broadcast_to(mask, batch + mask.shape[-1:])
    in_pool = in_pool & _in_range(slate, mask.shape[-1])
    in_pool = in_pool & _gather(mask, slate, in_pool, fill=False)

  r_empty = ranking == EMPTY
  in_slate = jnp.any(
    (ranking[..., :, None] == slate[..., None, :]) & ~s_empty[..., None, :], axis=-1
  )
  return {
    "slate_duplicate": jnp.any(_repeat_mask(slate, ~s_empty) & ~s_empty, axis=-1),
    "slate_out_of_pool": jnp.any(~s_empty & ~in_pool, axis=-1),
    "slate_empty_slot": jnp.any(s_empty, axis=-1),
    "ranking_duplicate": jnp.any(_repeat_mask(ranking, ~r_empty) & ~r_empty, axis=-1),
    "ranking_not_in_slate": jnp.any(~r_empty & ~in_slate, axis=-1),
    "ranking_empty_slot": jnp.any(r_empty, axis=-1),
  }


@jax.jit
def format_validity(slate: Any, ranking: Any, pool_size: Any, pool_mask: Any = None) -> jax.Array:
  """1.0 if the rollout is well formed, else 0.0 (``float32[...]``).

  Well formed = none of the :func:`format_errors` flags is set: every slate
  slot is a distinct in-pool index (``0 <= idx < pool_size`` and
  ``pool_mask[idx]`` if a mask is given, no ``-1``), and every ranking slot
  is a distinct member of the slate (no ``-1``). Arguments as in
  :func:`format_errors`.

  >>> slates = jnp.array([[3, 1, 4], [3, 1, 3], [3, 1, -1]])
  >>> format_validity(slates, jnp.array([[4, 3], [3, 1], [1, 3]]), pool_size=5).tolist()
  [1.0, 0.0, 0.0]
  >>> format_validity(jnp.array([3, 1]), jnp.array([1]), pool_size=5,
  ...                 pool_mask=jnp.array([True, True, True, False, True])).tolist()
  0.0
  """
  errs = format_errors(slate, ranking, pool_size, pool_mask)
  bad = jnp.zeros((), bool)
  for flag in errs.values():  # fixed 6 flags, not a loop over data
    bad = bad | flag
  return (~bad).astype(jnp.float32)


@jax.jit
def format_penalty(
  slate: Any, ranking: Any, pool_size: Any, penalty: float = 1.0, pool_mask: Any = None
) -> jax.Array:
  """``-penalty * (1 - format_validity(...))``: 0 when well formed, ``-penalty`` otherwise.

  >>> format_penalty(jnp.array([[0, 1], [0, 0]]), jnp.array([[1], [0]]), 3, penalty=0.5).tolist()
  [0.0, -0.5]
  """
  v = format_validity(slate, ranking, pool_size, pool_mask)
  return jnp.where(v > 0, 0.0, -jnp.asarray(penalty, jnp.float32)).astype(jnp.float32)


# --------------------------------------------------------------------------
# Advantages.
# --------------------------------------------------------------------------


@_jit("mode", "axis")
def group_advantages(
  rewards: Any, mode: str = "mean", eps: float = 1e-6, axis: int = -1, mask: Any = None
) -> jax.Array:
  """Group-relative advantages over the group axis (default: last).

  Shapes: ``rewards: float[..., G]`` (typically ``[B, G]``) -> same shape,
  float dtype of ``rewards`` (integers become ``float32``). With
  ``mean = mean_g r`` and the *population* std ``std = sqrt(mean_g (r -
  mean)^2)`` (``ddof=0``):

  * ``mode="mean"`` (Dr. GRPO): ``A_i = r_i - mean``.
  * ``mode="std"`` (GRPO): ``A_i = (r_i - mean) / (std + eps)``; ``eps``
    (default ``1e-6``) is *added* to the std, so the advantages have
    population std ``std / (std + eps)`` (just below 1).
  * ``mode="rloo"``: ``A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean)``.

  Every mode sums to zero over the group (up to rounding). A group whose
  rewards are all equal (zero variance) gets exactly 0 advantages -- never
  NaN and never rounding noise. ``G = 1`` (or ``G = 0``) gives zeros: a
  single rollout has no baseline to compare with. NaN rewards propagate.

  ``mask: bool`` of the shape of ``rewards`` (optional) marks the rollouts
  whose reward is defined (e.g. R_rank judged against the slate's own
  relevant items, see :func:`rank_defined`): mean, std and the
  leave-one-out baseline run over the masked rollouts of each group, the
  others get exactly 0, and a group with fewer than 2 masked rollouts gets
  zeros (no baseline), like ``G = 1``.

  >>> r = jnp.array([[1., 0., 0., 1.], [2., 2., 2., 2.]])
  >>> group_advantages(r).tolist()
  [[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]
  >>> [round(a, 4) for a in group_advantages(r, mode="std")[0].tolist()]
  [1.0, -1.0, -1.0, 1.0]
  >>> [round(a, 4) for a in group_advantages(r, mode="rloo")[0].tolist()]
  [0.6667, -0.6667, -0.6667, 0.6667]
  """
  if mode not in _ADV_MODES:
    raise ValueError(f"mode must be one of {_ADV_MODES}, got {mode!r}")
  r = jnp.asarray(rewards)
  if r.ndim < 1:
    raise ValueError("rewards must have a group axis")
  if not jnp.issubdtype(r.dtype, jnp.floating):
    r = r.astype(jnp.float32)
  m = (
    jnp.ones(r.shape, bool) if mask is None else jnp.broadcast_to(jnp.asarray(mask, bool), r.shape)
  )
  r = jnp.moveaxis(r, axis, -1)
  m = jnp.moveaxis(m, axis, -1)
  G = r.shape[-1]
  if G <= 1:
    return jnp.moveaxis(jnp.zeros_like(r), -1, axis)
  n = jnp.sum(m, axis=-1, keepdims=True).astype(r.dtype)  # rollouts with a defined reward
  mean = jnp.sum(jnp.where(m, r, 0), axis=-1, keepdims=True) / jnp.maximum(n, 1)
  centered = jnp.where(m, r - mean, 0)
  if mode == "mean":
    adv = centered
  elif mode == "std":
    std = jnp.sqrt(jnp.sum(jnp.square(centered), axis=-1, keepdims=True) / jnp.maximum(n, 1))
    adv = centered / (std + jnp.asarray(eps, r.dtype))
  else:  # rloo: r_i minus the mean of the other n - 1
    adv = centered * (n / jnp.maximum(n - 1, 1))
  hi = jnp.max(jnp.where(m, r, -jnp.inf), axis=-1, keepdims=True)
  lo = jnp.min(jnp.where(m, r, jnp.inf), axis=-1, keepdims=True)
  constant = (hi == lo) | (n < 2)  # exact zeros, never rounding noise
  adv = jnp.where(constant | ~m, jnp.zeros((), r.dtype), adv)
  return jnp.moveaxis(adv, -1, axis)


def _phase_items(phase_advantages: Any) -> list[tuple[int, Any]]:
  if isinstance(phase_advantages, Mapping):
    items = list(phase_advantages.items())
  elif isinstance(phase_advantages, (jax.Array, np.ndarray)):
    items = [(i, phase_advantages[i]) for i in range(phase_advantages.shape[0])]
  elif isinstance(phase_advantages, Sequence) and not isinstance(phase_advantages, (str, bytes)):
    items = list(enumerate(phase_advantages))
  else:
    raise TypeError(
      "phase_advantages must be a dict {phase_id: float[B, G]} or a sequence indexed by phase id"
    )
  out = []
  for pid, adv in items:
    try:
      pid = operator.index(pid)
    except TypeError as e:
      raise TypeError(f"phase ids must be ints, got {pid!r}") from e
    if adv is not None:
      out.append((pid, adv))
  return out


@jax.jit
def token_advantages(phase_ids: Any, phase_advantages: Any) -> jax.Array:
  """Broadcast per-phase advantages onto the tokens of each rollout.

  Shapes: ``phase_ids: int[B, G, T]`` (any ``[..., T]``) and
  ``phase_advantages``: either a dict ``{phase_id: float[B, G]}`` or a
  sequence (list / tuple / stacked array) whose element ``i`` is the
  advantage of phase id ``i`` (``None`` entries are skipped) -> ``float[B, G, T]``.

  ``out[b, g, t] = phase_advantages[phase_ids[b, g, t]][b, g]`` if that
  phase is given, else 0 -- so prompt / padding (:data:`PHASE_NONE`) and
  forced tag tokens (:data:`PHASE_TAG`) get 0 unless you pass them.
  Per-phase advantages may be any shape that broadcasts to ``[B, G]``
  (e.g. a scalar). The dtype is the promoted float dtype of the
  advantages (``float32`` if none are given).

  >>> ids = jnp.array([[[PHASE_NONE, PHASE_GEN, PHASE_GEN, PHASE_TAG, PHASE_RANK]]])  # B=G=1, T=5
  >>> adv = {PHASE_GEN: jnp.array([[0.5]]), PHASE_RANK: jnp.array([[-1.0]])}
  >>> token_advantages(ids, adv).tolist()
  [[[0.0, 0.5, 0.5, 0.0, -1.0]]]
  >>> token_advantages(ids, [None, jnp.array([[2.0]]), jnp.array([[3.0]])]).tolist()
  [[[0.0, 2.0, 2.0, 0.0, 3.0]]]
  """
  ids = jnp.asarray(phase_ids)
  if ids.ndim < 1:
    raise ValueError("phase_ids must have a token axis")
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise TypeError(f"phase_ids must be integers, got dtype {ids.dtype}")
  items = [(pid, jnp.asarray(adv)) for pid, adv in _phase_items(phase_advantages)]
  dtype = jnp.result_type(jnp.float32, *[adv.dtype for _, adv in items]) if items else jnp.float32
  if not jnp.issubdtype(dtype, jnp.floating):
    dtype = jnp.float32
  out = jnp.zeros(ids.shape, dtype)
  for pid, adv in items:  # loop over the (few) phases, not over data
    out = jnp.where(ids == pid, adv.astype(dtype)[..., None], out)
  return out


# --------------------------------------------------------------------------
# Composite rewards.
# --------------------------------------------------------------------------


def _restrict_to_slate(ranking: jax.Array, slate: jax.Array) -> jax.Array:
  """Replace ranking entries that are not (non-empty) slate members by -1."""
  batch = _batch_shape(ranking.shape[:-1], slate.shape[:-1])
  ranking = jnp.broadcast_to(ranking, batch + ranking.shape[-1:])
  slate = jnp.broadcast_to(slate, batch + slate.shape[-1:])
  member = jnp.any(
    (ranking[..., :, None] == slate[..., None, :]) & (slate != EMPTY)[..., None, :], axis=-1
  )
  return jnp.where(member, ranking, EMPTY)


@jax.jit
def slate_relevance(slate: Any, relevance: Any) -> jax.Array:
  """Relevance restricted to the slate: ``relevance`` where the candidate is
  a member of ``slate``, else 0.

  Shapes: ``slate: int[..., k]``, ``relevance: float[..., C]`` ->
  ``float32[..., C]`` (broadcast batch shape). Empty and out-of-range slots
  contribute nothing. Ranking metrics computed against this relevance judge
  a ranking only on what its own slate offered it (``rank_ideal="slate"``).

  >>> slate_relevance(jnp.array([3, 0, -1]), jnp.array([0., 1., 0., 2.])).tolist()
  [0.0, 0.0, 0.0, 2.0]
  """
  slate, rel = _prepare(slate, relevance, "slate")
  C = rel.shape[-1]
  member = jnp.any((slate[..., :, None] == jnp.arange(C)) & _in_range(slate, C)[..., None], axis=-2)
  return jnp.where(member, rel, 0.0)


@jax.jit
def rank_defined(slate: Any, relevance: Any) -> jax.Array:
  """Whether the slate holds a relevant candidate: ``bool[...]``.

  With ``rank_ideal="slate"`` the ranking reward of a rollout is undefined
  when this is False (no ranking of that slate can be right or wrong); such
  rollouts are left out of the rank phase's baseline and loss.

  >>> rank_defined(jnp.array([[3, 0], [0, 2]]), jnp.array([0., 1., 0., 2.])).tolist()
  [True, False]
  """
  return jnp.any(slate_relevance(slate, relevance) > 0, axis=-1)


@_jit("coverage_mode", "rank_metric", "rank_k", "gain", "restrict_to_slate", "rank_ideal")
def phase_rewards(
  slate: Any,
  ranking: Any,
  relevance: Any,
  coverage_mode: str = "recall",
  rank_metric: str = "ndcg",
  rank_k: int | None = None,
  gain: str = "exp",
  restrict_to_slate: bool = False,
  rank_ideal: str = "pool",
) -> tuple[jax.Array, jax.Array]:
  """Per-phase rewards ``(r_gen, r_rank)`` of F-GRPO, each ``float32[...]``.

  * ``r_gen = coverage(slate, relevance, mode=coverage_mode)``, or, with
    ``coverage_mode="ndcg"``, ``ndcg(slate, relevance, gain=gain)``: NDCG@k of
    the slate read as a ranking of its k slots (ideal over the whole pool), so
    a slate that writes its relevant candidates first earns more. This is not
    the paper's order-invariant R_gen: it lets the slate advantage see the order
    that the ranking phase reads from the slate.
  * ``r_rank`` = ranking metric on ``ranking``: ``"ndcg"`` (NDCG@rank_k with
    ``gain``), ``"hit"`` (hit@rank_k), ``"mrr"`` (RR within rank_k),
    ``"recall"`` or ``"precision"`` (@rank_k). ``rank_k=None`` means
    ``m = ranking.shape[-1]`` for every metric.

  If ``restrict_to_slate=True`` ranking entries that are not members of the
  slate are treated as empty (earn nothing); by default the ranking is
  scored as written and membership is left to :func:`format_penalty`.

  ``rank_ideal`` chooses what the ranking is judged against: ``"pool"``
  (the relevance of the whole pool; a slate without any relevant candidate
  then forces ``r_rank = 0`` whatever the ranking) or ``"slate"`` (only the
  relevant candidates inside the rollout's own slate, see
  :func:`slate_relevance`: NDCG's ideal DCG runs over them, so the ranking
  is not charged for the slate's misses). With ``"slate"``, ``r_rank`` is
  0 where :func:`rank_defined` is False, and callers should leave those
  rollouts out of the rank phase (``group_advantages(..., mask=)``).

  >>> rel = jnp.array([0., 1., 0., 2.])
  >>> r_gen, r_rank = phase_rewards(jnp.array([1, 3, 0]), jnp.array([3, 1]), rel)
  >>> r_gen.tolist(), r_rank.tolist()
  (1.0, 1.0)
  >>> phase_rewards(jnp.array([1, 0]), jnp.array([3, 1]), rel, rank_metric="mrr",
  ...               restrict_to_slate=True)[1].tolist()
  0.5
  >>> round(phase_rewards(jnp.array([1, 3, 0]), jnp.array([3, 1]), rel,
  ...                     coverage_mode="ndcg")[0].tolist(), 4)  # (1 + 3/log2 3) / (3 + 1/log2 3)
  0.7967
  """
  if coverage_mode not in _SLATE_REWARDS:
    raise ValueError(f"coverage_mode must be one of {_SLATE_REWARDS}, got {coverage_mode!r}")
  if rank_metric not in _RANK_METRICS:
    raise ValueError(f"rank_metric must be one of {_RANK_METRICS}, got {rank_metric!r}")
  if rank_ideal not in _RANK_IDEALS:
    raise ValueError(f"rank_ideal must be one of {_RANK_IDEALS}, got {rank_ideal!r}")
  slate = _as_candidates(slate, "slate")
  ranking = _as_candidates(ranking, "ranking")
  if coverage_mode == "ndcg":
    r_gen = ndcg(slate, relevance, gain=gain)
  else:
    r_gen = coverage(slate, relevance, mode=coverage_mode)
  if rank_ideal == "slate":
    relevance = slate_relevance(slate, relevance)
  if restrict_to_slate:
    ranking = _restrict_to_slate(ranking, slate)
  k = _resolve_k(rank_k, ranking.shape[-1])
  if rank_metric == "ndcg":
    r_rank = ndcg(ranking, relevance, k=k, gain=gain)
  elif rank_metric == "hit":
    r_rank = hit_at_k(ranking, relevance, k)
  elif rank_metric == "mrr":
    r_rank = mrr(ranking, relevance, k)
  elif rank_metric == "recall":
    r_rank = recall_at_k(ranking, relevance, k)
  else:
    r_rank = precision_at_k(ranking, relevance, k)
  return r_gen, r_rank


@_jit("coverage_mode", "k", "gain", "restrict_to_slate")
def joint_reward(
  slate: Any,
  ranking: Any,
  relevance: Any,
  lam: float = 1.0,
  coverage_mode: str = "recall",
  k: int | None = None,
  gain: str = "exp",
  restrict_to_slate: bool = False,
) -> jax.Array:
  """Single scalar reward of the plain-GRPO baseline: ``coverage + lam * ndcg``.

  ``coverage(slate, relevance, mode=coverage_mode) + lam * ndcg(ranking,
  relevance, k=k, gain=gain)`` as ``float32[...]``; ``restrict_to_slate``
  as in :func:`phase_rewards`.

  >>> rel = jnp.array([0., 1., 0., 2.])
  >>> joint_reward(jnp.array([1, 3, 0]), jnp.array([3, 1]), rel, lam=0.5).tolist()
  1.5
  """
  r_gen, r_rank = phase_rewards(
    slate,
    ranking,
    relevance,
    coverage_mode=coverage_mode,
    rank_metric="ndcg",
    rank_k=k,
    gain=gain,
    restrict_to_slate=restrict_to_slate,
  )
  return (r_gen + jnp.asarray(lam, jnp.float32) * r_rank).astype(jnp.float32)
