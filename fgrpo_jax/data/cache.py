"""Prepare-once cache of model-ready examples in array_record files.

A prepared dataset is one directory

    <cache root>/<name>-<key>/
        manifest.json                   settings, source fingerprints, counts, schemas
        <split>.array_record            one record per example (fixed-size binary row)
        <split>.texts.array_record      optional: one JSON record per example (texts)
        ...                             anything else the preparer writes (tokenizer/)

where `<cache root>` is `config.data.cache_dir`, else `<workdir>/data_cache`, and
`<key>` hashes the preparation settings, the format version and the size and
modification time of every source file. Rerunning with the same files and
settings finds the directory and reuses it; touching a source file or changing a
setting gives a new key (a new directory). Preparation writes into
`<name>-<key>.tmp-<pid>-<random>` and renames it into place only after the
manifest is written, so an interrupted preparation never leaves a directory that
looks prepared (a crashed run's `.tmp-*` directory is ignored and removed by the
next preparation of the same key). The manifest records the size and SHA-256 of
every prepared file; a reuse checks them, and a directory that no longer matches
(a truncated or edited file, a deleted one) is removed and prepared again.

Example rows are encoded as the concatenated raw bytes of fixed-shape numpy
fields (the schema in the manifest gives names, dtypes and shapes), so decoding a
batch of records is one `np.frombuffer` and a few slices.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil
import time
import uuid
from typing import Any, Callable, Iterable

import numpy as np

from fgrpo_jax.errors import UserError

FORMAT_VERSION = 2  # 2: the manifest lists every file's size and checksum
MANIFEST = "manifest.json"
WRITER_OPTIONS = "group_size:1"  # one record per chunk: cheap random access for grain


def cache_root(config, workdir: str | None) -> str:
  """config.data.cache_dir, else <workdir>/data_cache, else ~/.cache/fgrpo_jax/data_cache."""
  d = config.data.get("cache_dir", "") or ""
  if d:
    return os.path.expanduser(d)
  if workdir:
    return os.path.join(workdir, "data_cache")
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "fgrpo_jax", "data_cache")


def source_fingerprint(paths: Iterable[str]) -> list[dict]:
  """Name, size and mtime of each source file (a changed file changes the key)."""
  out = []
  for p in sorted(set(paths)):
    try:
      st = os.stat(p)
    except FileNotFoundError:
      raise UserError(f"{p}: file not found") from None
    out.append({"path": os.path.abspath(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
  return out


def cache_key(name: str, settings: dict, sources: list[dict]) -> str:
  blob = json.dumps({"format_version": FORMAT_VERSION, "name": name, "settings": settings,
                     "sources": sources}, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------
# Fixed-schema binary rows.


def schema_of(arrays: dict[str, np.ndarray]) -> dict[str, list]:
  """{field: [dtype, per-example shape]} of arrays with a leading example axis."""
  return {k: [np.dtype(v.dtype).str, list(v.shape[1:])] for k, v in arrays.items()}


def _row_layout(schema: dict) -> tuple[int, list]:
  fields, offset = [], 0
  for name, (dtype, shape) in schema.items():
    dt = np.dtype(dtype)
    nbytes = dt.itemsize * int(np.prod(shape, dtype=np.int64))
    fields.append((name, dt, tuple(shape), offset, nbytes))
    offset += nbytes
  return offset, fields


def encode_rows(arrays: dict[str, np.ndarray], schema: dict) -> np.ndarray:
  """uint8 [N, row_bytes]: each example's fields' bytes, concatenated in schema order."""
  row_bytes, fields = _row_layout(schema)
  n = len(next(iter(arrays.values())))
  out = np.empty((n, row_bytes), np.uint8)
  for name, dt, shape, off, nb in fields:
    a = np.ascontiguousarray(np.asarray(arrays[name]).astype(dt, copy=False)).reshape(n, -1)
    out[:, off:off + nb] = a.view(np.uint8).reshape(n, nb)
  return out


def decode_rows(records: list[bytes], schema: dict) -> dict[str, np.ndarray]:
  """Inverse of encode_rows for a list of records -> {field: [n, *shape]}."""
  row_bytes, fields = _row_layout(schema)
  n = len(records)
  buf = np.frombuffer(b"".join(records), np.uint8)
  if buf.size != n * row_bytes:
    raise UserError(f"prepared data is corrupt: {buf.size} bytes for {n} rows of "
                    f"{row_bytes} (delete the cache directory to prepare again)")
  buf = buf.reshape(n, row_bytes)
  out = {}
  for name, dt, shape, off, nb in fields:
    out[name] = np.ascontiguousarray(buf[:, off:off + nb]).view(dt).reshape((n, *shape))
  return out


# ----------------------------------------------------------------------------
# Writing.


class CacheWriter:
  """What a preparer gets: write splits, texts, JSON side files, and counts."""

  def __init__(self, directory: str):
    self.dir = directory
    self.splits: dict[str, dict] = {}
    self.counts: dict[str, Any] = {}
    self.extra: dict[str, Any] = {}

  def _writer(self, filename: str):
    from array_record.python.array_record_module import ArrayRecordWriter
    return ArrayRecordWriter(os.path.join(self.dir, filename), WRITER_OPTIONS)

  def write_split(self, split: str, arrays: dict[str, np.ndarray], chunk: int = 65536) -> None:
    """Writes one record per example (arrays share the leading axis N)."""
    schema = schema_of(arrays)
    n = len(next(iter(arrays.values())))
    filename = f"{split}.array_record"
    w = self._writer(filename)
    try:
      for s in range(0, n, chunk):
        rows = encode_rows({k: v[s:s + chunk] for k, v in arrays.items()}, schema)
        for row in rows:
          w.write(row.tobytes())
    finally:
      w.close()
    self.splits.setdefault(split, {}).update(num_examples=int(n), schema=schema, file=filename)

  def write_texts(self, split: str, records: Iterable[dict]) -> None:
    """One JSON record per example (for references and readable printing)."""
    filename = f"{split}.texts.array_record"
    w = self._writer(filename)
    n = 0
    try:
      for r in records:
        w.write(json.dumps(r, ensure_ascii=False).encode())
        n += 1
    finally:
      w.close()
    self.splits.setdefault(split, {}).update(texts_file=filename, num_texts=n)

  def write_json(self, filename: str, obj) -> None:
    with open(os.path.join(self.dir, filename), "w") as f:
      json.dump(obj, f, ensure_ascii=False)


@dataclasses.dataclass
class Prepared:
  """A ready cache directory and its manifest."""

  dir: str
  manifest: dict
  reused: bool

  def read_json(self, filename: str):
    with open(os.path.join(self.dir, filename)) as f:
      return json.load(f)


def _read_manifest(directory: str) -> dict | None:
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def file_digests(directory: str) -> dict[str, dict]:
  """{relative path: {"size", "sha256"}} of every file under `directory` but the manifest."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in sorted(names):
      path = os.path.join(root, name)
      rel = os.path.relpath(path, directory)
      if rel == MANIFEST:
        continue
      digest = hashlib.sha256()
      with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          digest.update(block)
      out[rel] = {"size": os.path.getsize(path), "sha256": digest.hexdigest()}
  return out


def verify(directory: str, manifest: dict) -> str | None:
  """None if every file the manifest lists is there, of its size and checksum; else
  what is wrong with the first one that is not. Sizes are compared first (cheap)."""
  files = manifest.get("files")
  if not isinstance(files, dict):
    return f"{MANIFEST} lists no file checksums"
  for rel, want in files.items():
    path = os.path.join(directory, rel)
    if not os.path.isfile(path):
      return f"{rel} is missing"
    if os.path.getsize(path) != want["size"]:
      return f"{rel} has {os.path.getsize(path)} bytes, the manifest says {want['size']}"
  got = file_digests(directory)
  for rel, want in files.items():
    if got[rel]["sha256"] != want["sha256"]:
      return f"{rel} does not match its checksum"
  return None


def _discard(final: str) -> None:
  """Removes a corrupt prepared directory: renamed first, so no reader sees it half gone."""
  trash = f"{final}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-corrupt"
  try:
    os.rename(final, trash)
  except OSError as e:
    raise UserError(f"{final}: prepared data is corrupt and cannot be removed ({e.strerror}); "
                    "delete this directory to prepare the data again") from None
  shutil.rmtree(trash, ignore_errors=True)


def _remove_stale_tmp(final: str) -> None:
  """Removes .tmp-* siblings of `final` left by dead processes on this host."""
  for tmp in glob.glob(glob.escape(final) + ".tmp-*"):
    try:
      pid = int(os.path.basename(tmp).rsplit(".tmp-", 1)[1].split("-")[0])
    except (IndexError, ValueError):
      continue
    alive = True
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      alive = False
    except PermissionError:
      pass
    if not alive or pid == os.getpid():
      shutil.rmtree(tmp, ignore_errors=True)


def prepare(root: str, name: str, settings: dict, sources: list[str],
            build: Callable[[CacheWriter], None], log: Callable[[str], None] = print
            ) -> Prepared:
  """Returns the cache directory of (name, settings, sources), building it if needed.

  build(writer) reads the sources and writes every split; it may raise UserError,
  in which case nothing is left behind.
  """
  fingerprint = source_fingerprint(sources)
  key = cache_key(name, settings, fingerprint)
  final = os.path.join(root, f"{name}-{key}")
  manifest = _read_manifest(final)
  if manifest is not None:
    problem = verify(final, manifest)
    if problem is None:
      log(f"[data] {name}: reusing prepared data in {final}")
      return Prepared(final, manifest, reused=True)
    log(f"[data] {name}: prepared data in {final} is corrupt ({problem}); preparing it again")
    _discard(final)
  os.makedirs(root, exist_ok=True)
  _remove_stale_tmp(final)
  tmp = f"{final}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  os.makedirs(tmp)
  t0 = time.time()
  try:
    writer = CacheWriter(tmp)
    build(writer)
    manifest = {"format_version": FORMAT_VERSION, "name": name, "key": key,
                "settings": settings, "sources": fingerprint, "splits": writer.splits,
                "counts": writer.counts, **writer.extra, "files": file_digests(tmp),
                "prepare_seconds": round(time.time() - t0, 2),
                "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(os.path.join(tmp, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=1, ensure_ascii=False)
    try:
      os.replace(tmp, final)
    except OSError:
      # Another process finished the same preparation first: use theirs.
      if _read_manifest(final) is None:
        raise
      shutil.rmtree(tmp, ignore_errors=True)
      manifest = _read_manifest(final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  sizes = ", ".join(f"{s} {v['num_examples']}" for s, v in manifest["splits"].items())
  log(f"[data] {name}: prepared {sizes} examples in {time.time() - t0:.1f}s -> {final}")
  return Prepared(final, manifest, reused=False)
