"""Throughput of the jitted reward / advantage functions in fgrpo_jax.rewards.

Times each function on one batch of B*G rollouts (after a warm-up call that
compiles it), blocking on the result, and reports rollouts evaluated per
second (batch size / median wall time of one call).

    python benchmarks/rewards.py                      # table
    python benchmarks/rewards.py --batch 4096 --json  # one JSON line
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

try:
  from fgrpo_jax import rewards as R
except ImportError:  # running from a checkout without `pip install -e .`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from fgrpo_jax import rewards as R


def make_inputs(
  batch: int,
  group: int,
  pool: int,
  slate: int,
  rank: int,
  seed: int,
  per_rollout_relevance: bool = False,
):
  """Random rollouts shaped [B, G, .] with B*G = batch: mostly-valid slates (about 2%
  of slots replaced by a random id, -1 or a duplicate), rankings drawn from the
  slate, graded relevance with ~30% relevant candidates, given once per prompt
  ([B, 1, C], broadcast over the group) unless per_rollout_relevance ([B, G, C])."""
  rng = np.random.default_rng(seed)
  if slate > pool:
    raise SystemExit(f"--slate ({slate}) must be <= --pool ({pool})")
  if rank > slate:
    raise SystemExit(f"--rank ({rank}) must be <= --slate ({slate})")
  B, G = batch // group, group
  # Distinct slate = first `slate` entries of a random permutation of the pool.
  slates = np.argsort(rng.random((B, G, pool)), axis=-1)[..., :slate]
  corrupt = rng.random((B, G, slate)) < 0.02
  slates = np.where(corrupt, rng.integers(-1, pool, size=(B, G, slate)), slates).astype(np.int32)
  order = np.argsort(rng.random((B, G, slate)), axis=-1)[..., :rank]
  rankings = np.take_along_axis(slates, order, axis=-1).astype(np.int32)
  rel_rows = G if per_rollout_relevance else 1
  relevance = np.where(
    rng.random((B, rel_rows, pool)) < 0.3, rng.integers(1, 4, size=(B, rel_rows, pool)), 0
  )
  rewards = rng.random((B, G)).astype(np.float32)
  return (
    jnp.asarray(slates),
    jnp.asarray(rankings),
    jnp.asarray(relevance, jnp.float32),
    jnp.asarray(rewards),
  )


def time_fn(fn, args, repeats: int) -> tuple[float, float]:
  """Compile + warm up, then return (compile_s, median seconds per call)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return compile_s, statistics.median(times)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--batch", type=int, default=65536, help="rollouts per call (B*G), default 65536")
  p.add_argument(
    "--group",
    type=int,
    default=8,
    help="G, rollouts per prompt (group_advantages input is [batch/G, G])",
  )
  p.add_argument("--pool", type=int, default=20, help="pool size C")
  p.add_argument("--slate", type=int, default=10, help="slate size k")
  p.add_argument("--rank", type=int, default=5, help="ranking length m")
  p.add_argument(
    "--repeats", type=int, default=20, help="timed calls per function (median reported)"
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--per-rollout-relevance",
    action="store_true",
    help="relevance [B, G, C] per rollout instead of [B, 1, C] per prompt",
  )
  p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
  a = p.parse_args(argv)
  if a.batch % a.group:
    raise SystemExit(f"--batch ({a.batch}) must be a multiple of --group ({a.group})")

  slates, rankings, relevance, rewards = make_inputs(
    a.batch, a.group, a.pool, a.slate, a.rank, a.seed, a.per_rollout_relevance
  )
  cases = [
    ("coverage(recall)", jax.jit(R.coverage), (slates, relevance)),
    ("coverage(f1)", jax.jit(functools.partial(R.coverage, mode="f1")), (slates, relevance)),
    ("ndcg(exp)", jax.jit(R.ndcg), (rankings, relevance)),
    ("hit@1", jax.jit(functools.partial(R.hit_at_k, k=1)), (rankings, relevance)),
    ("mrr", jax.jit(R.mrr), (rankings, relevance)),
    (
      "format_validity",
      jax.jit(functools.partial(R.format_validity, pool_size=a.pool)),
      (slates, rankings),
    ),
    ("group_advantages(mean)", jax.jit(R.group_advantages), (rewards,)),
    (
      "group_advantages(std)",
      jax.jit(functools.partial(R.group_advantages, mode="std")),
      (rewards,),
    ),
    (
      "group_advantages(rloo)",
      jax.jit(functools.partial(R.group_advantages, mode="rloo")),
      (rewards,),
    ),
    ("phase_rewards(ndcg)", jax.jit(R.phase_rewards), (slates, rankings, relevance)),
  ]
  rows = []
  for name, fn, args in cases:
    compile_s, sec = time_fn(fn, args, a.repeats)
    rows.append(
      {
        "function": name,
        "ms_per_call": sec * 1e3,
        "rollouts_per_s": a.batch / sec,
        "compile_s": compile_s,
      }
    )

  dev = jax.devices()[0]
  meta = {
    "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
    "n_devices": jax.device_count(),
    "jax": jax.__version__,
    "numpy": np.__version__,
    "python": platform.python_version(),
    "cpu_count": os.cpu_count(),
    "batch": a.batch,
    "group": a.group,
    "pool": a.pool,
    "slate": a.slate,
    "rank": a.rank,
    "relevance_shape": list(relevance.shape),
    "repeats": a.repeats,
  }
  if a.json:
    print(json.dumps({**meta, "results": rows}))
    return 0
  print(
    f"fgrpo_jax.rewards benchmark -- device {meta['device']} (x{meta['n_devices']}), "
    f"jax {meta['jax']}, numpy {meta['numpy']}, python {meta['python']}, {meta['cpu_count']} CPUs"
  )
  print(
    f"B*G = {a.batch} rollouts (G = {a.group}), pool C = {a.pool}, slate k = {a.slate}, "
    f"ranking m = {a.rank}, relevance {list(relevance.shape)}, "
    f"median of {a.repeats} calls after warm-up"
  )
  print()
  print(f"| {'function':<24} | {'ms / call':>10} | {'rollouts / s':>14} |")
  print(f"|{'-' * 26}|{'-' * 11}:|{'-' * 15}:|")
  for r in rows:
    print(f"| {r['function']:<24} | {r['ms_per_call']:>10.3f} | {r['rollouts_per_s']:>14,.0f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
