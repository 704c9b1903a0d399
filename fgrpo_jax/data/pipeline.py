"""Reading prepared data (fgrpo_jax.data.cache) through grain.

- `load_split_arrays(dir, split)`: the whole split as numpy arrays (what
  `Task.splits` holds), read in large batches through a grain MapDataset.
- `make_batch_iterator(dir, split, batch_size, ...)`: a grain IterDataset
  iterator over decoded batches, sharded per host (by default the JAX process
  index / count, `grain.sharding.ShardByJaxProcess`), shuffled per epoch with a
  seed, and checkpointable: `it.get_state()` / `it.set_state(state)` resume the
  exact same sequence of batches.
- `load_texts(dir, split, ids)`: the JSON text records of some examples (random
  access), for text references such as BM25 and for readable printing.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Sequence

import numpy as np

from fgrpo_jax.data import cache as cache_lib
from fgrpo_jax.errors import UserError


def _manifest(cache_dir: str) -> dict:
  m = cache_lib._read_manifest(cache_dir)
  if m is None:
    raise UserError(f"{cache_dir}: no prepared data here (missing {cache_lib.MANIFEST})")
  return m


def _split_info(cache_dir: str, split: str, manifest: dict | None = None) -> dict:
  manifest = manifest or _manifest(cache_dir)
  if split not in manifest["splits"]:
    raise UserError(f"{cache_dir}: prepared data has no split {split!r} "
                    f"(has {', '.join(manifest['splits'])})")
  return manifest["splits"][split]


def data_source(cache_dir: str, split: str, texts: bool = False, manifest: dict | None = None):
  """grain ArrayRecordDataSource of a split's example rows (or its text records)."""
  import grain
  info = _split_info(cache_dir, split, manifest)
  name = info["texts_file"] if texts else info["file"]
  return grain.sources.ArrayRecordDataSource([os.path.join(cache_dir, name)])


def _decode_batch(records, schema):
  return cache_lib.decode_rows(list(records), schema)


def load_split_arrays(cache_dir: str, split: str, manifest: dict | None = None,
                      chunk: int = 16384) -> dict[str, np.ndarray]:
  """All examples of a split -> {field: numpy array with a leading example axis}."""
  import grain
  info = _split_info(cache_dir, split, manifest)
  schema = info["schema"]
  n = info["num_examples"]
  if n == 0:
    return {k: np.zeros((0, *shape), np.dtype(dt)) for k, (dt, shape) in schema.items()}
  ds = grain.MapDataset.source(data_source(cache_dir, split, manifest=manifest))
  ds = ds.batch(chunk, batch_fn=functools.partial(_decode_batch, schema=schema))
  parts = [ds[i] for i in range(len(ds))]
  out = {k: np.concatenate([p[k] for p in parts]) for k in schema}
  if len(out[next(iter(schema))]) != n:
    raise UserError(f"{cache_dir}: {split} has {len(out[next(iter(schema))])} records, the "
                    f"manifest says {n} (delete the directory to prepare again)")
  return out


def load_texts(cache_dir: str, split: str, ids: Sequence[int] | None = None,
               manifest: dict | None = None) -> list[dict]:
  """Text records of examples `ids` of a split (all when None)."""
  src = data_source(cache_dir, split, texts=True, manifest=manifest)
  if ids is None:
    ids = range(len(src))
  ids = [int(i) for i in ids]
  records = src.__getitems__(ids) if ids else []
  return [json.loads(r) for r in records]


def make_dataset(cache_dir: str, split: str, batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = None,
                 shard_index: int | None = None, shard_count: int | None = None,
                 drop_remainder: bool = True, fields: Sequence[str] | None = None,
                 transform=None):
  """A grain IterDataset of decoded batches {field: [batch_size, ...]} of one host's shard.

  shard_index/shard_count default to this JAX process's index and the process
  count; each host reads the examples i with i % shard_count == shard_index.
  num_epochs=None repeats forever; every epoch is shuffled with a different order.
  transform: optional fn(decoded batch dict) -> dict, applied to each batch (e.g.
  building model prompts from stored ids).
  """
  import grain
  manifest = _manifest(cache_dir)
  info = _split_info(cache_dir, split, manifest)
  schema = info["schema"]
  if shard_index is None or shard_count is None:
    opts = grain.sharding.ShardByJaxProcess(drop_remainder=False)
    shard_index, shard_count = opts.shard_index, opts.shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  ds = grain.MapDataset.source(data_source(cache_dir, split, manifest=manifest))
  ds = ds[shard_index::shard_count]
  if len(ds) == 0:
    raise UserError(f"{cache_dir}: split {split!r} has no examples for shard {shard_index}")
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)

  def decode(records):
    out = cache_lib.decode_rows(list(records), schema)
    out = out if transform is None else transform(out)
    return out if fields is None else {k: out[k] for k in fields}

  ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=decode)
  return ds.to_iter_dataset()


def make_batch_iterator(cache_dir: str, split: str, batch_size: int, **kwargs):
  """A checkpointable iterator (get_state / set_state) over make_dataset's batches."""
  return iter(make_dataset(cache_dir, split, batch_size, **kwargs))
