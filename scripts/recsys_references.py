"""Reference policies on the synthetic recsys validation split, no training needed.

For generator settings (keyword arguments of make_synthetic_recsys), prints the
oracle's, the bigram's and popularity's validation hit@1, slate_miss,
rank_drop_given_hit and slate recall (slate = top-10, ranking = top-5 by score), the
examples kept and the generation time: a cheap first look at a regime before any
warm start is trained.

    python scripts/recsys_references.py "pool_size=50" \
        "pool_size=50,negatives='retrieved',num_targets=3"
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fgrpo_jax import evaluate  # noqa: E402
from fgrpo_jax.data import synthetic_recsys  # noqa: E402

KEYS = ("hit@1", "slate_miss", "rank_drop_given_hit", "slate_recall")


def report(settings: dict, slate_size: int = 10, rank_size: int = 5) -> str:
  start = time.perf_counter()
  dataset = synthetic_recsys.make_synthetic_recsys(seed=0, **settings)
  seconds = time.perf_counter() - start
  val = dataset.validation
  arrays = {"pool_mask": val.pool >= 0, "relevance": val.relevance}
  scores = dataset.baseline_scores(val)
  lines = [f"{settings}: validation {len(val)} (dropped {dataset.info['dropped']}), "
           f"relevant per example {(val.relevance > 0).sum(1).mean():.2f}, {seconds:.1f}s"]
  for name in ("oracle", "bigram", "popularity"):
    m = evaluate.evaluate_scores(scores[name], arrays, slate_size, rank_size)
    lines.append(f"  {name:10s} " + " ".join(f"{k} {m[k]:.3f}" for k in KEYS))
  return "\n".join(lines)


if __name__ == "__main__":
  for spec in sys.argv[1:]:
    print(report(eval(f"dict({spec})")))  # noqa: S307 (a developer's own command line)
