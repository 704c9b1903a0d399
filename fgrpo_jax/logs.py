"""What a run writes as it goes: the console line, TensorBoard scalars, metrics.jsonl,
and files replaced atomically (eval.json, run_config.json, eval_examples.npz, ...).

Only process 0 writes files (append_jsonl checks; the loop passes writer=None to the
others).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Callable

import jax
import numpy as np


class ConsoleLog:
  """One readable line per log step: stage, step/total, key metrics, speed, ETA."""

  def __init__(self, stage: str, total: int, start_step: int):
    self.stage, self.total = stage, total
    self.t0, self.s0 = time.time(), start_step

  def line(self, step: int, metrics: dict, keys) -> str:
    elapsed = time.time() - self.t0
    rate = (step - self.s0) / max(elapsed, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    parts = [f"{k} {metrics[k]:.4g}" for k in keys if k in metrics]
    return (f"[{self.stage}] step {step}/{self.total} | " + " ".join(parts)
            + f" | {rate:.2f} steps/s | ETA {eta:.0f}s")


def make_writer(workdir: str, log=print):
  """clu's TensorBoard writer, or None (metrics.jsonl only) where TensorFlow does not
  import, e.g. a notebook runtime whose own TensorFlow conflicts with ours."""
  try:
    from clu import metric_writers  # imports TensorFlow for event files; keep it lazy
  except ImportError as e:
    log(f"[log] TensorBoard writer off ({e}); metrics go to metrics.jsonl only")
    return None
  return metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=False)


def write_metrics(writer, step: int, metrics: dict) -> None:
  """TensorBoard scalars of one step (writer None: nothing)."""
  if writer is not None:
    writer.write_scalars(step, {k: float(v) for k, v in metrics.items()})


def append_jsonl(path: str, record: dict) -> None:
  """One JSON line appended to path (process 0 only)."""
  if jax.process_index() == 0:
    with open(path, "a") as f:
      f.write(json.dumps(record) + "\n")


def peak_memory_mb() -> float:
  """Peak memory so far in MiB: the first device's peak_bytes_in_use where the backend
  reports it (GPU, TPU), else this process's peak resident set (the CPU)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**20
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
  return rss / (2**20 if sys.platform == "darwin" else 2**10)


# ----------------------------------------------------------------------------
# Atomic files: written to a temporary name and renamed, so a reader (or a run killed
# mid-write) never sees half a file.


def write_atomic(path: str, write: Callable[[str], None], suffix: str = "") -> None:
  """Calls write(temporary path) and renames the result to path. suffix: an ending the
  writer needs on its file name (np.savez adds ".npz", matplotlib reads ".png")."""
  tmp = f"{path}.tmp.{os.getpid()}{suffix}"
  write(tmp)
  os.replace(tmp, path)


def write_text_atomic(path: str, text: str) -> None:
  def write(tmp):
    with open(tmp, "w") as f:
      f.write(text)
  write_atomic(path, write)


def write_json_atomic(path: str, obj) -> None:
  """obj as indented JSON with sorted keys and a final newline."""
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_npz_atomic(path: str, arrays: dict) -> None:
  """np.savez of arrays {name: array}."""
  write_atomic(path, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")
