"""Prepare-once cache (fgrpo_jax/data/cache.py) and grain reading (fgrpo_jax/data/pipeline.py)."""

import os

import numpy as np
import pytest

from fgrpo_jax.data import cache, pipeline
from fgrpo_jax.errors import UserError


def _arrays(n=23):
  return {"x": (np.arange(n * 3, dtype=np.int32).reshape(n, 3)),
          "y": np.linspace(0, 1, n).astype(np.float32),
          "m": (np.arange(n * 2).reshape(n, 2) % 3 == 0)}


def _source(tmp_path, text="a,b\n"):
  p = tmp_path / "source.csv"
  p.write_text(text)
  return str(p)


class Builder:
  def __init__(self, arrays=None, fail_after_first_split=False):
    self.calls = 0
    self.arrays = arrays or _arrays()
    self.fail = fail_after_first_split

  def __call__(self, w):
    self.calls += 1
    w.write_split("train", self.arrays)
    if self.fail:
      raise KeyboardInterrupt("simulated interruption mid-preparation")
    w.write_split("test", {k: v[:5] for k, v in self.arrays.items()})
    w.write_texts("test", [{"i": i} for i in range(5)])
    w.counts["rows"] = len(self.arrays["x"])


def test_prepare_roundtrip_and_reuse(tmp_path):
  src = _source(tmp_path)
  root = str(tmp_path / "cache")
  b = Builder()
  logs = []
  p1 = cache.prepare(root, "toy", {"k": 1}, [src], b, log=logs.append)
  assert not p1.reused and b.calls == 1
  assert os.path.basename(p1.dir).startswith("toy-")
  assert p1.manifest["counts"]["rows"] == 23
  assert p1.manifest["splits"]["train"]["num_examples"] == 23
  got = pipeline.load_split_arrays(p1.dir, "train", chunk=5)
  for k, v in _arrays().items():
    np.testing.assert_array_equal(got[k], v)
    assert got[k].dtype == v.dtype
  assert pipeline.load_texts(p1.dir, "test", [4, 0]) == [{"i": 4}, {"i": 0}]
  mtime = os.path.getmtime(os.path.join(p1.dir, "train.array_record"))
  p2 = cache.prepare(root, "toy", {"k": 1}, [src], b, log=logs.append)
  assert p2.reused and p2.dir == p1.dir and b.calls == 1  # nothing rewritten
  assert os.path.getmtime(os.path.join(p2.dir, "train.array_record")) == mtime
  assert any("reusing" in line for line in logs)


def test_changed_source_or_settings_give_a_new_cache(tmp_path):
  src = _source(tmp_path)
  root = str(tmp_path / "cache")
  b = Builder()
  d1 = cache.prepare(root, "toy", {"k": 1}, [src], b).dir
  d2 = cache.prepare(root, "toy", {"k": 2}, [src], b).dir
  assert d2 != d1 and b.calls == 2
  st = os.stat(src)
  os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same content
  d3 = cache.prepare(root, "toy", {"k": 1}, [src], b).dir
  assert d3 not in (d1, d2) and b.calls == 3
  with open(src, "a") as f:  # edited
    f.write("c,d\n")
  d4 = cache.prepare(root, "toy", {"k": 1}, [src], b).dir
  assert d4 not in (d1, d2, d3) and b.calls == 4


def test_interrupted_preparation_leaves_no_cache(tmp_path):
  src = _source(tmp_path)
  root = tmp_path / "cache"
  with pytest.raises(KeyboardInterrupt):
    cache.prepare(str(root), "toy", {"k": 1}, [src], Builder(fail_after_first_split=True))
  assert list(root.iterdir()) == []  # neither a final nor a temporary directory
  # A crashed run (killed: no cleanup) leaves a .tmp-<pid> directory: never read as
  # a cache, and removed by the next preparation of the same key.
  key = cache.cache_key("toy", {"k": 1}, cache.source_fingerprint([src]))
  stale = root / f"toy-{key}.tmp-999999999-deadbeef"
  stale.mkdir()
  (stale / "train.array_record").write_bytes(b"half")
  b = Builder()
  p = cache.prepare(str(root), "toy", {"k": 1}, [src], b)
  assert b.calls == 1 and not stale.exists() and os.path.isdir(p.dir)
  assert sorted(os.listdir(root)) == [os.path.basename(p.dir)]


def test_user_error_in_build_cleans_up(tmp_path):
  src = _source(tmp_path)
  root = tmp_path / "cache"

  def build(w):
    w.write_split("train", _arrays())
    raise UserError("bad.csv:3: wrong")

  with pytest.raises(UserError, match="bad.csv:3"):
    cache.prepare(str(root), "toy", {}, [src], build)
  assert list(root.iterdir()) == []


def test_missing_source_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match="nope.csv: file not found"):
    cache.prepare(str(tmp_path), "toy", {}, [str(tmp_path / "nope.csv")], Builder())


def test_cache_root_precedence(tmp_path):
  import ml_collections
  c = ml_collections.ConfigDict({"data": {"cache_dir": ""}})
  assert cache.cache_root(c, str(tmp_path)) == os.path.join(str(tmp_path), "data_cache")
  c.data.cache_dir = str(tmp_path / "x")
  assert cache.cache_root(c, str(tmp_path)) == str(tmp_path / "x")


def test_batch_iterator_resumes_from_state(tmp_path):
  p = cache.prepare(str(tmp_path), "toy", {}, [_source(tmp_path)], Builder())
  it = pipeline.make_batch_iterator(p.dir, "train", 4, seed=3, shard_index=0, shard_count=1)
  for _ in range(7):  # past the first epoch (23 rows)
    next(it)
  state = it.get_state()
  expected = [next(it)["x"] for _ in range(6)]
  again = pipeline.make_batch_iterator(p.dir, "train", 4, seed=3, shard_index=0, shard_count=1)
  again.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(again)["x"], e)
  # Each epoch is a permutation of the split.
  one = pipeline.make_batch_iterator(p.dir, "train", 1, seed=3, shard_index=0, shard_count=1,
                                     num_epochs=1)
  rows = np.concatenate([b["y"] for b in one])
  assert sorted(rows.tolist()) == sorted(_arrays()["y"].tolist())


def test_batch_iterator_shards_per_host(tmp_path):
  p = cache.prepare(str(tmp_path), "toy", {}, [_source(tmp_path)], Builder())
  seen = []
  for shard in range(3):
    it = pipeline.make_batch_iterator(p.dir, "train", 1, shard_index=shard, shard_count=3,
                                      shuffle=False, num_epochs=1)
    seen.append([int(b["x"][0, 0]) // 3 for b in it])
  assert seen[1] == list(range(1, 23, 3))
  assert sorted(sum(seen, [])) == list(range(23))  # disjoint and complete
  # Default: this JAX process's shard (one process here = everything).
  it = pipeline.make_batch_iterator(p.dir, "train", 23, shuffle=False, num_epochs=1)
  assert next(it)["x"].shape == (23, 3)
