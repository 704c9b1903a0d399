"""The model-array schema and batch selection: one place for training, evaluation, the
grain stream and the benchmarks.

A split is a dict of numpy arrays with a leading example axis N (data.tasks.Task):

    prompt        int32 [N, P]   prompt tokens, left-padded
    prompt_mask   bool  [N, P]   True on real prompt tokens
    cand_tokens   int32 [N, C]   the token that names each pool slot
    pool_mask     bool  [N, C]   True on real pool slots (False: padding of a short pool)
    relevance     f32   [N, C]   graded relevance of each slot (0 = not relevant)

plus, per task, fields for references and printing (oracle_scores [N, C], pool and
history item ids, example_id). MODEL_INPUTS are what the decoder reads; BATCH_KEYS
what a training or evaluation step receives.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

SPLITS = ("train", "validation", "test")
MODEL_INPUTS = ("prompt", "prompt_mask", "cand_tokens", "pool_mask")
BATCH_KEYS = MODEL_INPUTS + ("relevance",)


def model_inputs(batch: dict) -> dict:
  """The MODEL_INPUTS of a batch (numpy or jax arrays, any leading shape)."""
  return {k: batch[k] for k in MODEL_INPUTS}


def host_batch(arrays: dict, idx, keys=BATCH_KEYS) -> dict[str, np.ndarray]:
  """Rows idx [n] of a split's `keys`, as numpy (this host's part of a global batch)."""
  return {k: arrays[k][idx] for k in keys}


def take_batch(arrays: dict, idx, keys=BATCH_KEYS) -> dict:
  """Rows idx [n] of a split's `keys`, as jax arrays on the default device."""
  return device_batch(host_batch(arrays, idx, keys))


def device_batch(batch: dict) -> dict:
  """Every array of a batch as a jax array on the default device."""
  return {k: jnp.asarray(v) for k, v in batch.items()}


def num_examples(arrays: dict) -> int:
  return arrays["prompt"].shape[0]


def subset(arrays: dict, n: int, seed: int) -> dict:
  """n examples of a split drawn without replacement by seed, in their order (the
  whole split for n = 0 or n >= its size)."""
  total = num_examples(arrays)
  if not n or n >= total:
    return arrays
  idx = np.sort(np.random.default_rng(seed).choice(total, n, replace=False))
  return {k: v[idx] for k, v in arrays.items()}


def batch_indices(seed: int, stage: int, step: int, n: int, batch_size: int) -> np.ndarray:
  """Example indices int64 [batch_size] of a step: epoch-wise permutations of n
  examples, a pure function of (seed, stage, step).

  Being stateless, the data order needs no iterator state to resume exactly.
  """
  start = step * batch_size
  idx = []
  while len(idx) < batch_size:
    epoch, offset = divmod(start + len(idx), n)
    perm = np.random.default_rng([seed, stage, epoch]).permutation(n)
    idx.extend(perm[offset:offset + batch_size - len(idx)].tolist())
  return np.asarray(idx, np.int64)


def with_bool_masks(rows: dict) -> dict:
  """Stored rows (masks as uint8 in the cache) with prompt_mask / pool_mask as bool."""
  return dict(rows, prompt_mask=rows["prompt_mask"].astype(bool),
              pool_mask=rows["pool_mask"].astype(bool))
