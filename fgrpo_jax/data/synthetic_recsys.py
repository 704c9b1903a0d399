"""Embedded synthetic sequential-recommendation task with a known oracle.

Nothing is downloaded: ``make_synthetic_recsys`` draws a catalogue, a population
of users and their interaction sequences from an explicit, seeded generative
model, then builds leave-one-out splits in the pool format used by F-GRPO (a
history, a pool of ``C`` candidate items holding the next item -- or, with
``num_targets = n``, some of the next n -- and a relevance vector graded by
recency).  Because the generative model is known, every example also carries
``oracle_scores``: the exact Bayes-posterior probability of each pool item being
relevant (among the next n items) given the history shown in the prompt.

Generative model
----------------
* Catalogue: ``num_items`` items split (randomly, as evenly as possible) into
  ``num_clusters`` clusters.  Inside a cluster, items have Zipf-like weights
  ``w(i) ∝ rank(i) ** -zipf_exponent`` (random ranks, normalised per cluster).
* Item-level stickiness: every item ``i`` has one "follow-up" item ``f(i)`` in
  its own cluster (a random cycle through the cluster, so ``f(i) != i``).
* Cluster dynamics: a sparse cluster-to-cluster transition matrix ``A``; each
  cluster leads to ``num_successors`` other clusters with Dirichlet(1) weights.
* ``num_user_types`` discrete latent user types, drawn uniformly per user, each
  with a sparse taste ``theta_u`` over clusters: Dirichlet(``taste_concentration``)
  weights on a random support of ``clusters_per_type`` clusters (floored at
  1e-6 elsewhere; ``clusters_per_type=None`` = Dirichlet over all clusters).
  Supports overlap across types, so the last item alone leaves the type
  ambiguous and the rest of the history matters.
* Next-item kernel of a type-``u`` user whose last item is ``i``::

      q(j | u, i) = beta * [j == f(i)]
                    + (1 - beta) * w(j) * (alpha * A[c(i), c(j)]
                                           + (1 - alpha) * theta_u[c(j)])
      p(j | u, i) = q(j | u, i) * [j != i] / sum_{j' != i} q(j' | u, i)

  i.e. no immediate repeats (copying the last item never works).
* Sequences: ``x_1 ~ pi_u`` where ``pi_u`` is the STATIONARY distribution of
  the type-``u`` chain ``p(. | u, .)``, then ``x_{t+1} ~ p(. | u, x_t)``.

Why stationary starts: the chain is then stationary given ``u``, so *every*
contiguous window ``(x_s, ..., x_{s+h-1})`` of a type-``u`` sequence has
likelihood ``pi_u(x_s) * prod_t p(x_{t+1} | u, x_t)`` whatever its start ``s``.
The oracle therefore conditions on exactly the (possibly truncated, possibly
left-padded) history the model is shown -- the last ``history_len`` items --
and nothing else::

    P(u | window) ∝ P(u) * pi_u(x_s) * prod_t p(x_{t+1} | u, x_t)   (log space)
    p*(j | window) = sum_u P(u | window) * p(j | u, last item of window)

which is exactly the Bayes-optimal next-item distribution given the prompt
(split membership and position carry no extra information, because the
window's law does not depend on its position).

Targets and relevance
---------------------
The relevant items of an example are the user's next ``n = num_targets`` items
``x_t .. x_{t+n-1}``, graded by recency: the j-th (j = 0, 1, ...) has relevance
``target_decay ** j``; an item that comes back keeps its earliest grade.  The
oracle score of a pool item is the exact probability that it is among them::

    P(c in next n | window) = sum_u P(u | window) * sum_{j=1..n} F_j(u, last, c)

with ``F_j`` the first-visit probabilities of the type-``u`` chain
(``SyntheticRecsysModel.first_visits``); with ``n = 1`` this is ``p*(c | window)``.

Pools (``negatives``)
---------------------
* ``uniform`` / ``popularity`` (one target only): the target plus ``C - 1``
  distinct negatives drawn from the catalogue minus the target (uniformly, or
  proportionally to add-one-smoothed training popularity), randomly permuted so
  the target's slot is uniform.  With uniform negatives the pool's composition
  carries no information about which member is the target, so
  ``P(target = pool[c] | history, pool) ∝ p*(pool[c] | history)`` and ranking by
  ``oracle_scores`` is Bayes-optimal.  With popularity negatives ranking by them is
  only approximately optimal (popular items are more likely to be negatives).
* ``retrieved``: the pool is drawn from the history alone, never from the
  future -- ``retrieval_mix`` shares of hard negatives from the clusters the
  history touches, popular items (the model's own item marginal, so no sampled
  sequence is involved) and uniform items -- and an example is kept only if its
  pool holds at least one target.  Because the pool's law Q(S | window) does not
  depend on the targets, conditioning on (window, S, kept) gives
  ``P(c relevant | window, S, kept) = P(c in next n | window) / P(kept | window, S)``
  for every c in S: the oracle scores are exact up to a per-row constant, so the
  top-1 by oracle score is the Bayes choice for Hit@1, and the top-k maximises the
  expected number of relevant items in the slate, whatever Q is.

Splits (per user, sequences ``x_0 .. x_{L-1}`` 0-based, n targets): the test
targets are the last n items, the validation targets the n before them, and every
window whose first target ``x_t`` has ``min_history <= t <= L - 3n`` is a training
example (optionally a random ``max_train_per_user`` of them), so no training target
is a validation or test target.  With n = 1 this is leave-one-out: ``x_{L-1}``
test, ``x_{L-2}`` validation.  The history of target ``x_t`` is
``x_{max(0, t-H)} .. x_{t-1}``, left-padded with ``-1`` to ``H = history_len``.

Only numpy, the standard library and fgrpo_jax.errors are used.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from fgrpo_jax.data.recsys import PAD, RecsysDataset, RecsysExamples
from fgrpo_jax.errors import UserError

__all__ = [
    "SyntheticRecsysModel",
    "build_synthetic_model",
    "make_synthetic_recsys",
    "format_summary",
    "TINY_CONFIG",
]

# Small setting used by the tests and smoke runs.
TINY_CONFIG: dict[str, Any] = dict(
    num_items=60,
    num_clusters=6,
    num_user_types=4,
    num_users=600,
    seq_len=12,
    history_len=6,
)


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticRecsysModel:
  """The true generative model (all arrays numpy; see module docstring).

  Attributes:
    item_cluster: int32 [I] cluster of every item.
    item_weight: float64 [I] within-cluster Zipf weight (sums to 1 per cluster).
    follow_up: int32 [I] follow-up item f(i) (same cluster, != i).
    cluster_transition: float64 [K, K] row-stochastic, zero diagonal.
    type_taste: float64 [T, K] row-stochastic taste of each user type.
    type_prior: float64 [T] prior over user types.
    alpha: weight of the cluster-transition part (vs. the taste part).
    beta: weight of the follow-up (item stickiness) part.
    transition: float64 [T, I, I] p(next = j | type u, last = i), zero diagonal.
    initial: float64 [T, I] stationary distribution pi_u of each type's chain
      (law of x_1 and, by stationarity, of every x_t given u).
  """

  item_cluster: np.ndarray
  item_weight: np.ndarray
  follow_up: np.ndarray
  cluster_transition: np.ndarray
  type_taste: np.ndarray
  type_prior: np.ndarray
  alpha: float
  beta: float
  transition: np.ndarray
  initial: np.ndarray

  @property
  def num_items(self) -> int:
    return int(self.item_cluster.shape[0])

  @property
  def num_clusters(self) -> int:
    return int(self.cluster_transition.shape[0])

  @property
  def num_user_types(self) -> int:
    return int(self.type_prior.shape[0])

  # -- sampling ---------------------------------------------------------------

  def sample_sequences(self, num_users: int, seq_len: int,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draws (user_types int32 [U], sequences int32 [U, L]) -- vectorised."""
    types = rng.choice(self.num_user_types, size=num_users, p=self.type_prior)
    seqs = np.empty((num_users, seq_len), dtype=np.int32)
    init_cdf = _row_cdf(self.initial)            # [T, I]
    trans_cdf = _row_cdf(self.transition)        # [T, I, I]
    u = rng.random(num_users)
    seqs[:, 0] = _sample_from_cdf(init_cdf[types], u)
    for t in range(1, seq_len):
      u = rng.random(num_users)
      seqs[:, t] = _sample_from_cdf(trans_cdf[types, seqs[:, t - 1]], u)
    return types.astype(np.int32), seqs

  # -- exact inference ----------------------------------------------------------

  def log_likelihood(self, history: np.ndarray) -> np.ndarray:
    """log p(window | u) for every type: float64 [N, T].

    ``history`` is int [N, H], left-padded with -1; only the non-padding items
    (a contiguous suffix) are used: log pi_u(first) + sum log p(next | u, prev).
    An all-padding row has log-likelihood 0 for every type.
    """
    history = np.asarray(history)
    if history.ndim == 1:
      history = history[None]
    n, h = history.shape
    num_t = self.num_user_types
    out = np.zeros((n, num_t))
    if h == 0 or n == 0:
      return out
    valid = history != PAD
    if not np.all(valid[:, 1:] >= valid[:, :-1]):
      raise ValueError("history must be left-padded (padding only at the start)")
    with np.errstate(divide="ignore"):
      log_init = np.log(self.initial)            # [T, I]
      log_trans = np.log(self.transition)        # [T, I, I]
    lengths = valid.sum(axis=1)
    rows = np.nonzero(lengths > 0)[0]
    first = history[rows, h - lengths[rows]]
    out[rows] = log_init[:, first].T
    if h > 1:
      prev = np.where(valid[:, :-1], history[:, :-1], 0)
      nxt = np.where(valid[:, :-1], history[:, 1:], 0)
      # [T, N, H-1] -> masked sum over pairs.
      pair_ll = log_trans[:, prev, nxt]
      pair_ll = np.where(valid[None, :, :-1], pair_ll, 0.0)
      out += pair_ll.sum(axis=2).T
    return out

  def posterior(self, history: np.ndarray) -> np.ndarray:
    """P(u | window): float64 [N, T] (exact, computed in log space)."""
    with np.errstate(divide="ignore"):
      logp = self.log_likelihood(history) + np.log(self.type_prior)[None]
    m = logp.max(axis=1, keepdims=True)
    if not np.all(np.isfinite(m)):
      raise ValueError("history has zero probability under every user type")
    p = np.exp(logp - m)
    return p / p.sum(axis=1, keepdims=True)

  def next_item_probs(self, history: np.ndarray) -> np.ndarray:
    """p*(next = j | window) for all items: float64 [N, I]."""
    history = np.asarray(history)
    if history.ndim == 1:
      history = history[None]
    post = self.posterior(history)                              # [N, T]
    last = history[:, -1] if history.shape[1] else np.full(len(history), PAD)
    empty = last == PAD
    rows = self.transition[:, np.where(empty, 0, last)]          # [T, N, I]
    rows = np.where(empty[None, :, None], self.initial[:, None, :], rows)
    return np.einsum("nt,tni->ni", post, rows)

  @property
  def item_marginal(self) -> np.ndarray:
    """float64 [I] the model's own item popularity: sum_u P(u) pi_u(i)."""
    return self.type_prior @ self.initial

  def first_visits(self, num_steps: int) -> np.ndarray:
    """First-visit probabilities: float64 [num_steps, T, I, I].

    ``[j-1, u, i, c]`` = P(x_j = c and x_1..x_{j-1} != c | type u, x_0 = i): step 1
    is the transition itself, then F_{j+1}[i, c] = sum_{l != c} p(l | u, i) F_j[l, c]
    (the diagonal is the first return to the start item).
    """
    visits = [self.transition]
    for _ in range(1, num_steps):
      prev = visits[-1]
      first_return = np.einsum("tcc->tc", prev)                    # [T, I]
      visits.append(self.transition @ prev - self.transition * first_return[:, None, :])
    return np.stack(visits)

  def target_tables(self, num_targets: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """P(item c is among the next ``num_targets`` items | type, window).

    Returns (after_item float64 [T, I, I]: [u, i, c] given last item i;
    at_start float64 [T, I]: [u, c] given an empty window, x_1 ~ pi_u).
    With one target these are the transition table and pi_u themselves.
    """
    if num_targets == 1:
      return self.transition, self.initial
    visits = self.first_visits(num_targets)
    after_item = visits.sum(axis=0)
    shorter = visits[:-1].sum(axis=0)                             # next n-1 items
    # x_1 = c, or x_1 = i != c and c among the n-1 items after i.
    at_start = (self.initial + np.einsum("ti,tic->tc", self.initial, shorter)
                - self.initial * np.einsum("tcc->tc", shorter))
    return after_item, at_start

  def oracle_scores(self, history: np.ndarray, pool: np.ndarray, num_targets: int = 1,
                    chunk: int = 16384) -> np.ndarray:
    """P(pool item is among the next ``num_targets`` items | window): float64 [N, C].

    With one target this is p*(pool item | window). Vectorised, chunked.
    """
    history = np.asarray(history)
    pool = np.asarray(pool)
    after_item, at_start = self.target_tables(num_targets)
    out = np.empty(pool.shape, dtype=np.float64)
    for s in range(0, len(pool), chunk):
      h = history[s:s + chunk]
      p = pool[s:s + chunk]
      post = self.posterior(h)
      last = h[:, -1] if h.shape[1] else np.full(len(h), PAD)
      empty = last == PAD
      vals = after_item[:, np.where(empty, 0, last)[:, None], p]      # [T, n, C]
      if np.any(empty):
        init_vals = at_start[:, p]                                    # [T, n, C]
        vals = np.where(empty[None, :, None], init_vals, vals)
      out[s:s + chunk] = np.einsum("nt,tnc->nc", post, vals)
    return out


# ----------------------------------------------------------------------------
# Construction
# ----------------------------------------------------------------------------


def _row_cdf(p: np.ndarray) -> np.ndarray:
  """Row-wise CDF whose last entry is exactly 1 (zero-prob items unreachable)."""
  c = np.cumsum(p, axis=-1)
  return c / c[..., -1:]


def _sample_from_cdf(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
  """Inverse-CDF sampling, one draw per row: smallest j with cdf[j] > u."""
  idx = (cdf <= u[:, None]).sum(axis=1)
  return np.minimum(idx, cdf.shape[1] - 1).astype(np.int32)


def _stationary(trans: np.ndarray) -> np.ndarray:
  """Stationary distributions of a stack of row-stochastic matrices [T, I, I]."""
  t, n, _ = trans.shape
  a = np.transpose(trans, (0, 2, 1)) - np.eye(n)[None]   # (P^T - I) pi = 0
  a[:, -1, :] = 1.0                                      # sum(pi) = 1
  b = np.zeros((t, n))
  b[:, -1] = 1.0
  pi = np.linalg.solve(a, b[..., None])[..., 0]
  pi = np.clip(pi, 0.0, None)
  pi /= pi.sum(axis=1, keepdims=True)
  # Polish with a few power iterations (removes solver round-off).
  for _ in range(3):
    pi = np.einsum("ti,tij->tj", pi, trans)
  return pi / pi.sum(axis=1, keepdims=True)


def build_synthetic_model(*, num_items: int = 200, num_clusters: int = 10,
                          num_user_types: int = 8, alpha: float = 0.15,
                          beta: float = 0.3, taste_concentration: float = 0.5,
                          clusters_per_type: int | None = 3,
                          num_successors: int = 2, zipf_exponent: float = 1.0,
                          rng: np.random.Generator | int = 0
                          ) -> SyntheticRecsysModel:
  """Draws the true generative model (see module docstring)."""
  rng = np.random.default_rng(rng)
  n, k, nt = num_items, num_clusters, num_user_types
  if k < 2 or n < 2 * k:
    raise ValueError("need num_clusters >= 2 and num_items >= 2 * num_clusters")
  if not 1 <= num_successors <= k - 1:
    raise ValueError("num_successors must be in [1, num_clusters - 1]")
  if not (0.0 <= alpha <= 1.0 and 0.0 <= beta < 1.0):
    raise ValueError("need 0 <= alpha <= 1 and 0 <= beta < 1")

  # Items -> clusters (balanced, random assignment).
  item_cluster = rng.permutation(np.arange(n) % k).astype(np.int32)
  item_weight = np.empty(n)
  follow_up = np.empty(n, dtype=np.int32)
  for c in range(k):
    members = np.nonzero(item_cluster == c)[0]
    ranks = rng.permutation(len(members)) + 1.0
    w = ranks ** (-zipf_exponent)
    item_weight[members] = w / w.sum()
    cycle = rng.permutation(members)
    follow_up[cycle] = np.roll(cycle, -1)        # random cycle, f(i) != i

  # Sparse cluster transitions: each cluster -> num_successors other clusters.
  cluster_transition = np.zeros((k, k))
  for c in range(k):
    others = np.array([d for d in range(k) if d != c])
    succ = rng.choice(others, size=num_successors, replace=False)
    cluster_transition[c, succ] = rng.dirichlet(np.ones(num_successors))

  # Sparse user-type tastes over clusters (floored to keep logs finite).
  if clusters_per_type is not None:
    clusters_per_type = max(1, min(int(clusters_per_type), k))
  if clusters_per_type is None:
    taste = rng.dirichlet(np.full(k, taste_concentration), size=nt)
  else:
    taste = np.zeros((nt, k))
    for u in range(nt):
      support = rng.choice(k, size=clusters_per_type, replace=False)
      taste[u, support] = rng.dirichlet(np.full(clusters_per_type, taste_concentration))
  taste = np.maximum(taste, 1e-6)
  taste /= taste.sum(axis=1, keepdims=True)
  type_prior = np.full(nt, 1.0 / nt)

  # Item-level transition tables p(j | u, i): [T, I, I].
  cl_mix = (alpha * cluster_transition[None]
            + (1.0 - alpha) * taste[:, None, :])              # [T, K_prev, K_next]
  q = cl_mix[:, item_cluster][:, :, item_cluster] * item_weight[None, None, :]
  q *= (1.0 - beta)
  q[:, np.arange(n), follow_up] += beta
  q[:, np.arange(n), np.arange(n)] = 0.0                      # no immediate repeat
  trans = q / q.sum(axis=2, keepdims=True)
  initial = _stationary(trans)
  return SyntheticRecsysModel(
      item_cluster=item_cluster, item_weight=item_weight, follow_up=follow_up,
      cluster_transition=cluster_transition, type_taste=taste,
      type_prior=type_prior, alpha=float(alpha), beta=float(beta),
      transition=trans, initial=initial)


def _build_histories(seqs: np.ndarray, users: np.ndarray, t: np.ndarray,
                     history_len: int) -> np.ndarray:
  idx = t[:, None] - history_len + np.arange(history_len)[None]
  vals = seqs[users[:, None], np.clip(idx, 0, None)]
  return np.where(idx >= 0, vals, PAD).astype(np.int32)


def _sample_pools(targets: np.ndarray, num_items: int, pool_size: int,
                  log_weights: np.ndarray | None, rng: np.random.Generator,
                  chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
  """Target + (C-1) distinct negatives != target, shuffled.

  Uniform negatives: the C-1 smallest of i.i.d. uniform keys (target excluded).
  Weighted negatives: Gumbel-top-k on log weights (= sequential sampling
  without replacement proportional to the weights).
  Returns (pool int32 [N, C], target slot int [N]).
  """
  n = len(targets)
  c = pool_size
  pool = np.empty((n, c), dtype=np.int32)
  for s in range(0, n, chunk):
    tg = targets[s:s + chunk]
    m = len(tg)
    if log_weights is None:
      keys = rng.random((m, num_items), dtype=np.float32)
    else:
      g = rng.gumbel(size=(m, num_items)).astype(np.float32)
      keys = -(log_weights[None].astype(np.float32) + g)   # smaller = chosen
    keys[np.arange(m), tg] = np.inf
    negs = np.argpartition(keys, c - 2, axis=1)[:, : c - 1]
    pool[s:s + m, 0] = tg
    pool[s:s + m, 1:] = negs
  perm = np.argsort(rng.random((n, c)), axis=1)
  pool = np.take_along_axis(pool, perm, axis=1)
  slot = np.argmax(perm == 0, axis=1)
  return pool, slot


RETRIEVAL_KINDS = ("cluster", "popularity", "uniform")  # draw order inside a retrieved pool


def parse_retrieval_mix(text: str) -> dict[str, float]:
  """"cluster=0.5,popularity=0.25,uniform=0.25" -> shares of a retrieved pool.

  Kinds left out get 0; the shares must lie in [0, 1] and sum to 1.
  """
  field = "config.data.retrieval_mix"
  shares = dict.fromkeys(RETRIEVAL_KINDS, 0.0)
  for part in (p.strip() for p in str(text).split(",") if p.strip()):
    name, eq, value = part.partition("=")
    name = name.strip()
    if not eq or name not in shares:
      raise UserError(f"{field}={text!r}: {part!r} is not kind=share with a kind of "
                      f"{', '.join(RETRIEVAL_KINDS)}")
    try:
      shares[name] = float(value)
    except ValueError:
      raise UserError(f"{field}={text!r}: share {value!r} of {name} is not a number") from None
    if not 0.0 <= shares[name] <= 1.0:
      raise UserError(f"{field}={text!r}: share of {name} must be in [0, 1]")
  if abs(sum(shares.values()) - 1.0) > 1e-6:
    raise UserError(f"{field}={text!r}: the shares must sum to 1")
  return shares


def retrieval_counts(shares: dict[str, float], pool_size: int) -> dict[str, int]:
  """Pool slots per kind: round(share * C) same-cluster and popular items, the rest uniform."""
  cluster = min(int(round(shares["cluster"] * pool_size)), pool_size)
  popularity = min(int(round(shares["popularity"] * pool_size)), pool_size - cluster)
  return {"cluster": cluster, "popularity": popularity,
          "uniform": pool_size - cluster - popularity}


def _retrieve_pools(history: np.ndarray, item_cluster: np.ndarray, log_popularity: np.ndarray,
                    counts: dict[str, int], rng: np.random.Generator,
                    chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """Pools drawn from the history alone (never from the items that follow it).

  For each kind in RETRIEVAL_KINDS order, ``counts[kind]`` items not drawn yet, by
  Gumbel-top-k (sampling without replacement): ``cluster`` uniformly among the items
  of the clusters the history touches (then elsewhere, if those run out),
  ``popularity`` proportionally to exp(log_popularity), ``uniform`` uniformly.
  history int [N, H] (-1 padding) -> (pool int32 [N, C], kind int8 [N, C]: index into
  RETRIEVAL_KINDS), each row shuffled.
  """
  n = len(history)
  num_items = len(item_cluster)
  num_clusters = int(item_cluster.max()) + 1
  size = sum(counts.values())
  pool = np.empty((n, size), dtype=np.int32)
  kind = np.empty((n, size), dtype=np.int8)
  for s in range(0, n, chunk):
    h = history[s:s + chunk]
    m = len(h)
    rows = np.arange(m)[:, None]
    touched = np.zeros((m, num_clusters), bool)
    touched[np.broadcast_to(rows, h.shape)[h >= 0], item_cluster[h[h >= 0]]] = True
    log_weights = {
        "cluster": np.where(touched[:, item_cluster], 0.0, -1e4),  # [m, I]
        "popularity": np.broadcast_to(log_popularity, (m, num_items)),
        "uniform": np.zeros((m, num_items)),
    }
    taken = np.zeros((m, num_items), bool)
    start = 0
    for kind_id, name in enumerate(RETRIEVAL_KINDS):
      count = counts[name]
      if not count:
        continue
      keys = -(log_weights[name] + rng.gumbel(size=(m, num_items)))   # smaller = drawn
      keys[taken] = np.inf
      drawn = np.argpartition(keys, count - 1, axis=1)[:, :count]
      taken[rows, drawn] = True
      pool[s:s + m, start:start + count] = drawn
      kind[s:s + m, start:start + count] = kind_id
      start += count
  perm = np.argsort(rng.random((n, size)), axis=1)
  return np.take_along_axis(pool, perm, 1), np.take_along_axis(kind, perm, 1)


def graded_relevance(pool: np.ndarray, targets: np.ndarray, decay: float) -> np.ndarray:
  """pool int [N, C], targets int [N, n] (next item first) -> relevance float32 [N, C].

  The j-th next item (j = 0, 1, ...) has relevance decay**j; an item that comes back
  keeps its earliest (highest) grade; pool items outside the targets get 0.
  """
  grades = decay ** np.arange(targets.shape[1], dtype=np.float64)           # [n]
  hits = pool[:, :, None] == targets[:, None, :]                            # [N, C, n]
  return np.where(hits, grades, 0.0).max(axis=2).astype(np.float32)


def make_synthetic_recsys(*, num_items: int = 200, num_clusters: int = 10,
                          num_user_types: int = 8, num_users: int = 4000,
                          seq_len: int = 20, history_len: int = 10,
                          pool_size: int = 20, negatives: str = "uniform",
                          alpha: float = 0.15, beta: float = 0.3,
                          taste_concentration: float = 0.5,
                          clusters_per_type: int | None = 3,
                          num_successors: int = 2, zipf_exponent: float = 1.0,
                          min_history: int | None = None, seed: int = 0,
                          max_train_per_user: int | None = None, num_targets: int = 1,
                          target_decay: float = 0.5,
                          retrieval_mix: str = "cluster=0.5,popularity=0.25,uniform=0.25"
                          ) -> RecsysDataset:
  """Generates the synthetic task (model, sequences, leave-one-out splits).

  Args:
    num_items, num_clusters, num_user_types: catalogue / latent structure.
    num_users, seq_len: number and length of generated sequences.
    history_len: H, items shown in the prompt (most recent last, -1 padded).
    pool_size: C, candidates per example (target + C-1 negatives).
    negatives: how the pool is made.  "uniform" (default; oracle exactly
      Bayes-optimal) or "popularity" (proportional to add-one-smoothed training
      counts): the target plus C-1 sampled negatives (one target only).
      "retrieved": C items drawn from the history alone (``retrieval_mix``);
      examples whose pool holds none of the targets are dropped (oracle exact).
    alpha: weight of the cluster-transition part vs. the user's taste.
    beta: probability mass of the item's follow-up item (item stickiness).
    taste_concentration: Dirichlet concentration of type tastes (small=sparse).
    clusters_per_type: size of each type's taste support (None: all clusters).
    num_successors: clusters each cluster can transition to.
    zipf_exponent: within-cluster popularity skew.
    min_history: smallest history length of a training example
      (default max(1, history_len // 2)).
    seed: controls everything (model, users, sequences, pools).
    max_train_per_user: keep a random subset of this many training examples
      per user (default: all).
    num_targets: n, relevant items per example: the user's next n items.
    target_decay: relevance of the j-th next item (j = 0, 1, ...) is
      target_decay**j (graded by recency; the next item has 1).
    retrieval_mix: negatives="retrieved": shares of same-cluster, popular and
      uniform items in the pool (see parse_retrieval_mix).
  """
  t0 = time.perf_counter()
  if negatives not in ("uniform", "popularity", "retrieved"):
    raise UserError(f"config.data.negatives={negatives!r} is unknown "
                    "(uniform, popularity or retrieved)")
  if not (isinstance(num_targets, (int, np.integer)) and num_targets >= 1):
    raise UserError(f"config.data.num_targets={num_targets!r} must be an integer >= 1")
  if num_targets > 1 and negatives != "retrieved":
    raise UserError(f"config.data.num_targets={num_targets} needs config.data.negatives="
                    f"retrieved (with {negatives} negatives the pool is built around one target)")
  if not 0.0 < target_decay <= 1.0:
    raise UserError(f"config.data.target_decay={target_decay!r} must be in (0, 1]")
  if min_history is None:
    min_history = max(1, history_len // 2)
  if min_history < 1:
    raise UserError(f"config.data.min_history={min_history} must be >= 1")
  if seq_len < min_history + 3 * num_targets:
    raise UserError(f"config.data.seq_len={seq_len} must be >= min_history + 3 x num_targets "
                    f"= {min_history + 3 * num_targets} (train, validation and test targets)")
  if not 2 <= pool_size <= num_items:
    raise UserError(f"config.data.pool_size={pool_size} must be in [2, num_items={num_items}]")
  mix = parse_retrieval_mix(retrieval_mix) if negatives == "retrieved" else None

  ss = np.random.SeedSequence(seed)
  ss_model, ss_seq, ss_split, ss_pool = ss.spawn(4)
  rng_model, rng_seq, rng_split = (
      np.random.default_rng(s) for s in (ss_model, ss_seq, ss_split))
  # One pool stream per split: validation/test pools do not depend on the
  # training options (min_history, max_train_per_user).
  rng_pools = dict(zip(("train", "validation", "test"),
                       (np.random.default_rng(s) for s in ss_pool.spawn(3))))
  model = build_synthetic_model(
      num_items=num_items, num_clusters=num_clusters,
      num_user_types=num_user_types, alpha=alpha, beta=beta,
      taste_concentration=taste_concentration,
      clusters_per_type=clusters_per_type, num_successors=num_successors,
      zipf_exponent=zipf_exponent, rng=rng_model)
  user_types, seqs = model.sample_sequences(num_users, seq_len, rng_seq)

  # Popularity = counts over every position that is not a val/test target.
  n_t = num_targets
  train_part = seqs[:, : seq_len - 2 * n_t]
  item_popularity = np.bincount(train_part.ravel(), minlength=num_items)
  item_popularity = item_popularity.astype(np.float32)

  # Example positions (of the first target): test = the last n items, validation
  # the n before them, training windows whose targets all precede validation's.
  train_t = np.arange(min_history, seq_len - 3 * n_t + 1)
  n_pos = len(train_t)
  if max_train_per_user is not None and max_train_per_user < n_pos:
    keys = rng_split.random((num_users, n_pos))
    keep = np.sort(np.argsort(keys, axis=1)[:, :max_train_per_user], axis=1)
    tr_users = np.repeat(np.arange(num_users), max_train_per_user)
    tr_t = train_t[keep].ravel()
  else:
    tr_users = np.repeat(np.arange(num_users), n_pos)
    tr_t = np.tile(train_t, num_users)
  all_users = np.arange(num_users)
  specs = {
      "train": (tr_users, tr_t),
      "validation": (all_users, np.full(num_users, seq_len - 2 * n_t)),
      "test": (all_users, np.full(num_users, seq_len - n_t)),
  }
  log_w = None
  if negatives == "popularity":
    log_w = np.log(item_popularity.astype(np.float64) + 1.0)

  splits = {}
  dropped = {}
  for name, (users, t) in specs.items():
    hist = _build_histories(seqs, users, t, history_len)
    targets = seqs[users[:, None], t[:, None] + np.arange(n_t)]        # [N, n]
    if mix is None:
      pool, _ = _sample_pools(targets[:, 0], num_items, pool_size, log_w, rng_pools[name])
    else:
      # The model's own popularity: independent of every sampled sequence.
      pool, _ = _retrieve_pools(hist, model.item_cluster, np.log(model.item_marginal),
                                retrieval_counts(mix, pool_size), rng_pools[name])
    rel = graded_relevance(pool, targets, target_decay)
    keep = rel.max(axis=1) > 0          # retrieved pools may miss every target
    dropped[name] = int((~keep).sum())
    hist, pool, rel, users = hist[keep], pool[keep], rel[keep], users[keep]
    oracle = model.oracle_scores(hist, pool, n_t).astype(np.float32)
    splits[name] = RecsysExamples(
        history=hist, pool=pool, relevance=rel, oracle_scores=oracle,
        user=users.astype(np.int32))

  item_names = [f"item_{i} (cluster {c})" for i, c in enumerate(model.item_cluster)]
  config = dict(num_items=num_items, num_clusters=num_clusters,
                num_user_types=num_user_types, num_users=num_users,
                seq_len=seq_len, history_len=history_len, pool_size=pool_size,
                negatives=negatives, alpha=alpha, beta=beta,
                taste_concentration=taste_concentration,
                clusters_per_type=clusters_per_type,
                num_successors=num_successors, zipf_exponent=zipf_exponent,
                min_history=min_history, seed=seed,
                max_train_per_user=max_train_per_user, num_targets=num_targets,
                target_decay=target_decay, retrieval_mix=retrieval_mix)
  info = {"config": config, "dropped": dropped,
          "generation_seconds": round(time.perf_counter() - t0, 4)}
  return RecsysDataset(
      train=splits["train"], validation=splits["validation"],
      test=splits["test"], num_items=num_items,
      item_popularity=item_popularity, item_names=item_names, model=model,
      sequences=seqs, user_types=user_types, info=info)


def format_summary(s: dict) -> str:
  """Human-readable multi-line rendering of ``RecsysDataset.summary()``."""
  lines = [f"sizes={s['sizes']} train_full_history_frac="
           f"{s['train_full_history_frac']:.2f} gen={s.get('generation_seconds')}s"]
  for name, m in s["metrics"].items():
    lines.append(f"  {name:<11s} hit@1={m['hit@1']:.3f} hit@5={m['hit@5']:.3f} "
                 f"ndcg@5={m['ndcg@5']:.3f}")
  if "oracle_expected_hit@1" in s:
    lines.append(f"  oracle expected hit@1={s['oracle_expected_hit@1']:.3f}")
  return "\n".join(lines)


if __name__ == "__main__":
  for label, kw in (("default", {}), ("tiny", TINY_CONFIG)):
    ds = make_synthetic_recsys(**kw)
    print(f"[{label}]")
    print(format_summary(ds.summary()))
