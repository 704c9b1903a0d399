"""Reference scorers that need more than the model arrays: BM25 over passage texts.

A reference maps each pool slot to a score (higher = better); evaluate.py turns the
scores into a slate (top-k) and a ranking (top-m), so references sit in the same
table as the model. `random` (all ties, broken at random by the evaluation) and the
oracle (`oracle_scores`) need no code here.

BM25 uses the maintained `bm25s` library (Lucene variant, k1 = 1.5, b = 0.75, its
English stop words, lower-casing): one index over the distinct passages of the
scored examples (so the inverse document frequencies are those of that corpus),
the question as the query, and the score of each pool slot's passage.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np


def random_scores(arrays: dict) -> np.ndarray:
  return np.zeros(arrays["pool_mask"].shape)


def bm25_scores(questions: Sequence[str], pools: Sequence[Sequence[str | None]],
                k1: float = 1.5, b: float = 0.75) -> np.ndarray:
  """questions [N], pools [N][C] passage texts (None = empty slot) -> float [N, C].

  Empty slots score -inf (they are outside the pool anyway).
  """
  import bm25s

  logging.getLogger("bm25s").setLevel(logging.WARNING)
  n = len(questions)
  c = max((len(p) for p in pools), default=0)
  out = np.full((n, c), -np.inf)
  corpus: dict[str, int] = {}
  for row in pools:
    for p in row:
      if p is not None and p not in corpus:
        corpus[p] = len(corpus)
  if not corpus:
    return out
  texts = list(corpus)
  tok = bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)
  retriever = bm25s.BM25(k1=k1, b=b)
  retriever.index(tok, show_progress=False)
  queries = bm25s.tokenize(list(questions), stopwords="en", return_ids=False,
                           show_progress=False)
  for i, (q, row) in enumerate(zip(queries, pools)):
    idx = [corpus[p] if p is not None else -1 for p in row]
    ids = np.asarray([j for j in idx if j >= 0])
    if not len(ids):
      continue
    weight = np.zeros(len(texts), np.float32)
    weight[ids] = 1.0
    scores = retriever.get_scores(list(q), weight_mask=weight) if q else np.zeros(len(texts))
    out[i, :len(row)] = [scores[j] if j >= 0 else -np.inf for j in idx]
  return out
