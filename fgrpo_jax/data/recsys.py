"""The recommendation data model, shared by the synthetic generator
(data/synthetic_recsys.py) and the real-data readers (data/recsys_real.py).

- `RecsysExamples`: one split in pool format (history, pool, relevance, optional
  oracle scores);
- `RecsysDataset`: the three splits plus catalogue metadata and score-based
  references (popularity, last item, bigram, the oracle where it is known);
- `score_ranking_metrics`: Hit@k / NDCG@k / MRR of ranking each pool by scores
  (exact under random tie-breaking), what the references are judged by.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import numpy as np

PAD = -1  # item id of an empty history slot


@dataclasses.dataclass(frozen=True, eq=False)
class RecsysExamples:
  """One split, in pool format.

  Attributes:
    history: int32 [N, H] item ids, most recent last, left-padded with -1.
    pool: int32 [N, C] candidate item ids, distinct within a row.
    relevance: float32 [N, C], 1.0 at the target's slot, 0.0 elsewhere.
    oracle_scores: float32 [N, C] p*(pool item | history) under the true
      generative model, or None (real data).
    user: optional int32 [N] index of the user each example comes from.
  """

  history: np.ndarray
  pool: np.ndarray
  relevance: np.ndarray
  oracle_scores: np.ndarray | None = None
  user: np.ndarray | None = None

  def __post_init__(self):
    n = self.history.shape[0]
    if self.history.ndim != 2 or self.pool.ndim != 2:
      raise ValueError("history and pool must be 2-D")
    if self.pool.shape[0] != n or self.relevance.shape != self.pool.shape:
      raise ValueError(
          f"inconsistent shapes: history {self.history.shape}, pool "
          f"{self.pool.shape}, relevance {self.relevance.shape}")
    if self.oracle_scores is not None and self.oracle_scores.shape != self.pool.shape:
      raise ValueError("oracle_scores must have the pool's shape")
    if self.user is not None and self.user.shape != (n,):
      raise ValueError("user must have shape [N]")

  def __len__(self) -> int:
    return int(self.history.shape[0])

  @property
  def history_len(self) -> int:
    return int(self.history.shape[1])

  @property
  def pool_size(self) -> int:
    return int(self.pool.shape[1])

  @property
  def target_slot(self) -> np.ndarray:
    """int [N] index of the (first) relevant slot of each row."""
    return np.argmax(self.relevance, axis=1)

  @property
  def target(self) -> np.ndarray:
    """int32 [N] item id of the (first) relevant pool item of each row."""
    return self.pool[np.arange(len(self)), self.target_slot]

  @property
  def history_lengths(self) -> np.ndarray:
    """int [N] number of non-padding history items."""
    return (self.history != PAD).sum(axis=1)

  @property
  def last_item(self) -> np.ndarray:
    """int32 [N] most recent history item (-1 if the history is empty)."""
    return self.history[:, -1]

  def take(self, idx) -> "RecsysExamples":
    """Row subset (any numpy index: ints, slice, boolean mask)."""
    if isinstance(idx, slice):
      sel = idx
    else:
      sel = np.asarray(idx)
      if sel.ndim == 0:
        sel = sel[None]
    opt = lambda a: None if a is None else a[sel]
    return RecsysExamples(
        history=self.history[sel],
        pool=self.pool[sel],
        relevance=self.relevance[sel],
        oracle_scores=opt(self.oracle_scores),
        user=opt(self.user),
    )


@dataclasses.dataclass(frozen=True, eq=False)
class RecsysDataset:
  """Train/validation/test splits plus catalogue metadata.

  Attributes:
    train, validation, test: the splits.
    num_items: catalogue size (item ids are 0 .. num_items-1).
    item_popularity: float32 [num_items] occurrence counts of each item in the
      training part of the sequences (every position except the validation and
      test targets), for the popularity reference.
    item_names: readable names, e.g. "item_17 (cluster 3)".
    model: the true generative model (None for real data).
    sequences: int32 [U, L] generated full sequences (None for real data).
    user_types: int32 [U] latent type of every user (None for real data).
    info: generation config and timing.
  """

  train: RecsysExamples
  validation: RecsysExamples
  test: RecsysExamples
  num_items: int
  item_popularity: np.ndarray
  item_names: list[str]
  model: Any = None  # synthetic_recsys.SyntheticRecsysModel, None for real data
  sequences: np.ndarray | None = None
  user_types: np.ndarray | None = None
  info: dict = dataclasses.field(default_factory=dict)
  _cache: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

  def split(self, name: str) -> RecsysExamples:
    return {"train": self.train, "validation": self.validation,
            "test": self.test}[name]

  def baseline_scores(self, examples: RecsysExamples) -> dict[str, np.ndarray]:
    """Reference scorers for a split: name -> float [N, C] pool scores.

    * ``oracle``: the true p*(item | history) (synthetic data only).
    * ``popularity``: training popularity of the pool item.
    * ``random``: constant scores (all ties; metrics use random tie-breaking).
    * ``last_item``: 1 for the pool item equal to the last history item.
    * ``bigram``: training item->item transition counts from the last history
      item (add-one backoff to popularity): a strong 1st-order Markov baseline
      that does not infer the user's type.
    """
    pool = examples.pool
    out: dict[str, np.ndarray] = {}
    if examples.oracle_scores is not None:
      out["oracle"] = examples.oracle_scores.astype(np.float64)
    pop = self.item_popularity.astype(np.float64)
    out["popularity"] = pop[pool]
    out["random"] = np.zeros(pool.shape)
    out["last_item"] = (pool == examples.last_item[:, None]).astype(np.float64)
    counts = self._train_bigram_counts()
    last = examples.last_item
    safe_last = np.where(last == PAD, 0, last)
    big = counts[safe_last[:, None], pool]
    big = np.where((last == PAD)[:, None], 0.0, big)
    # Backoff: popularity, scaled so it only breaks ties / fills unseen rows.
    out["bigram"] = big + (pop[pool] + 1.0) / (pop.sum() + len(pop) + 1.0)
    return out

  def _train_bigram_counts(self) -> np.ndarray:
    cache = self._cache
    if "counts" not in cache:
      n = self.num_items
      counts = np.zeros((n, n))
      if self.sequences is not None:
        # Each (user, position) pair of the training part of the sequences
        # (everything before the validation target) counted once.
        tr = self.sequences[:, : max(self.sequences.shape[1] - 2, 0)]
        prev, nxt = tr[:, :-1].ravel(), tr[:, 1:].ravel()
      else:
        # Real data: pairs inside training windows (overlaps counted again).
        full = np.concatenate(
            [self.train.history, self.train.target[:, None]], axis=1)
        prev, nxt = full[:, :-1].ravel(), full[:, 1:].ravel()
      ok = prev != PAD
      np.add.at(counts, (prev[ok], nxt[ok]), 1.0)
      cache["counts"] = counts
    return cache["counts"]

  def summary(self, split: str = "test") -> dict:
    """Sizes plus reference metrics (Hit@1, NDCG@5, ...) on ``split``.

    Metrics are exact expectations under uniformly random tie-breaking (so the
    constant "random" scorer gives exactly 1/C).  ``oracle_expected_hit@1`` is
    the oracle's Hit@1 predicted by the model itself,
    mean_n max_c p*_nc / sum_c p*_nc; it should match the empirical one.
    """
    ex = self.split(split)
    res: dict[str, Any] = {
        "num_items": self.num_items,
        "pool_size": ex.pool_size,
        "history_len": ex.history_len,
        "sizes": {k: len(self.split(k)) for k in ("train", "validation", "test")},
        "train_full_history_frac": float(
            np.mean(self.train.history_lengths == self.train.history_len))
        if len(self.train) else float("nan"),
        "split": split,
    }
    metrics = {}
    for name, scores in self.baseline_scores(ex).items():
      m = score_ranking_metrics(scores, ex.relevance, ks=(1, 5))
      metrics[name] = {"hit@1": m["hit@1"], "hit@5": m["hit@5"],
                       "ndcg@5": m["ndcg@5"]}
    res["metrics"] = metrics
    if ex.oracle_scores is not None and self.info.get("config", {}).get("num_targets", 1) == 1:
      res["oracle_expected_hit@1"] = float(oracle_expected_hit1(ex.oracle_scores))
    for k in ("generation_seconds",):
      if k in self.info:
        res[k] = self.info[k]
    # Flat shortcuts, e.g. res["oracle_hit@1"].
    for name, m in metrics.items():
      for key, v in m.items():
        res[f"{name}_{key}"] = v
    return res


# ----------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------


def score_ranking_metrics(scores: np.ndarray, relevance: np.ndarray,
                    ks: Iterable[int] = (1, 5, 10), ties: str = "random",
                    reduce: bool = True) -> dict[str, Any]:
  """Hit@k / NDCG@k / MRR of ranking each row's pool by ``scores`` (desc).

  Assumes exactly one relevant slot per row (the first max of ``relevance``).
  ``ties="random"``: exact expectation over uniformly random tie-breaking;
  ``ties="pessimistic"``: the target is ranked after every item it ties with.
  Returns means (``reduce=True``) or per-row float arrays.
  """
  scores = np.asarray(scores, dtype=np.float64)
  relevance = np.asarray(relevance)
  n, c = scores.shape
  slot = np.argmax(relevance, axis=1)
  tgt = scores[np.arange(n), slot][:, None]
  greater = (scores > tgt).sum(axis=1)             # items strictly above
  tied = (scores == tgt).sum(axis=1)               # includes the target
  if ties == "pessimistic":
    lo, k_tied = greater + tied - 1, np.ones(n, dtype=np.int64)
  elif ties == "random":
    lo, k_tied = greater, tied
  else:
    raise ValueError(f"unknown ties mode {ties!r}")
  # Target rank r (0-based) is uniform over lo .. lo + k_tied - 1.
  ranks = np.arange(c)
  in_range = (ranks[None] >= lo[:, None]) & (ranks[None] < (lo + k_tied)[:, None])
  p_rank = in_range / k_tied[:, None]              # [N, C] P(rank = r)
  disc = 1.0 / np.log2(ranks + 2.0)
  out: dict[str, Any] = {}
  for k in ks:
    out[f"hit@{k}"] = p_rank[:, :k].sum(axis=1)
    out[f"ndcg@{k}"] = (p_rank[:, :k] * disc[None, :k]).sum(axis=1)
  out["mrr"] = (p_rank / (ranks[None] + 1.0)).sum(axis=1)
  if reduce:
    out = {k: float(np.mean(v)) if n else float("nan") for k, v in out.items()}
  return out


def oracle_expected_hit1(oracle_scores: np.ndarray, reduce: bool = True):
  """Model-predicted Hit@1 of the oracle ranking: max_c p*_c / sum_c p*_c."""
  s = np.asarray(oracle_scores, dtype=np.float64)
  v = s.max(axis=1) / s.sum(axis=1)
  return float(v.mean()) if reduce else v

