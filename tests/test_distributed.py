"""Tests for fgrpo_jax/distributed.py: a real two-process run on one machine.

Two local processes (2 fake CPU devices each) join over jax.distributed on
localhost and train `configs/recsys.py:tiny` (shrunk further: 1 layer, no SFT,
1 RL step, 32 test examples) on a 4-device FSDP mesh, so every parameter and Adam
moment is split across both processes, each process feeds its own rows of every
RL and evaluation batch (SFT batches take the same path in train.run_stage),
gradients are accumulated over 2 microbatches, and Orbax writes each process's
shards. One process with the same
4 devices runs the same config. Checked: the test metrics of eval.json are the
same (tolerance 1e-6 absolute; they are means of per-example 0/1 or NDCG values
over 32 examples, so any real difference is >= 1/32; measured: identical), the
sharded checkpoint holds the single run's state, and only process 0 logs, writes
metrics.jsonl, TensorBoard events and eval.json.

Every subprocess has a timeout, so a hang (e.g. a missing collective) fails the
test instead of blocking CI. The XLA fast-compile flags keep the run short; both
sides use the same flags.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import conftest
import pytest

from fgrpo_jax import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240  # per launch; a normal one takes ~10-30 s on 2 busy cores
METRIC_ATOL = 1e-6
CKPT_ATOL = 1e-5
NUM_PROCESSES, DEVICES_PER_PROCESS = 2, 2
OVERRIDES = (
    "--config.model.num_layers=1", "--config.sft.steps=0", "--config.rl.steps=1",
    "--config.rl.inner_steps=1", "--config.eval.test_examples=32", "--config.eval.batch_size=16",
    "--config.optim.grad_accum=2", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
)
MULTI_ENV = ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS",
             "TPU_WORKER_HOSTNAMES")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir, num_processes: int, devices: int, *overrides):
  """Starts num_processes trainers (one jax.distributed job when > 1); returns
  [(returncode, stdout, stderr, pid)] by process id. Kills them all on a timeout."""
  base = {k: v for k, v in os.environ.items() if k not in MULTI_ENV}
  base.update(JAX_PLATFORMS="cpu", XLA_FLAGS=conftest.subprocess_xla_flags(devices))
  port = _free_port()
  procs = []
  for i in range(num_processes):
    env = dict(base)
    if num_processes > 1:
      env.update(JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(i),
                 JAX_COORDINATOR_ADDRESS=f"localhost:{port}")
    cmd = [sys.executable, "-m", "fgrpo_jax.main", "--config=configs/recsys.py:tiny",
           f"--workdir={workdir}", *OVERRIDES, *overrides]
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  try:
    outs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    for p in procs:
      p.communicate()
    pytest.fail(f"a {num_processes}-process run did not finish in {TIMEOUT_S}s (hang?)")
  return [(p.returncode, out, err, p.pid) for p, (out, err) in zip(procs, outs)]


def _check_ok(results, what):
  for i, (code, out, err, _) in enumerate(results):
    assert code == 0, f"{what}, process {i}:\n{out[-2000:]}\n{err[-3000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The 2-process job and the single-process run, launched together."""
  import concurrent.futures
  single_dir = str(tmp_path_factory.mktemp("single"))
  multi_dir = str(tmp_path_factory.mktemp("multi"))
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    # The reference run writes no TensorBoard files (no TensorFlow import: ~6 CPU s).
    single_f = pool.submit(_launch, single_dir, 1, NUM_PROCESSES * DEVICES_PER_PROCESS,
                           "--config.tensorboard=False")
    multi = _launch(multi_dir, NUM_PROCESSES, DEVICES_PER_PROCESS)
    single = single_f.result()
  _check_ok(single, "single-process run")
  _check_ok(multi, "2-process run")
  return {"single_dir": single_dir, "multi_dir": multi_dir, "single": single, "multi": multi}


def _eval(workdir):
  with open(os.path.join(workdir, "eval.json")) as f:
    return json.load(f)


def test_two_processes_match_one_process(runs):
  single, multi = _eval(runs["single_dir"]), _eval(runs["multi_dir"])
  assert set(multi["metrics"]) == set(single["metrics"])
  diffs = {k: abs(multi["metrics"][k] - v) for k, v in single["metrics"].items()}
  assert max(diffs.values()) <= METRIC_ATOL, diffs
  assert multi["references"] == single["references"] and multi["oracle"] == single["oracle"]
  assert multi["steps"] == single["steps"] == 1 and multi["num_examples"] == 32


def test_sharded_checkpoint_is_complete(runs):
  """Both processes wrote their shards (the saved layout spans 4 devices of 2
  processes): the job's final RL params and Adam state, read back here on one
  device, are the single-process run's (float32, 1e-5 absolute: gloo's cross-process
  reductions add in another order; measured: 1.4e-7 params, 7e-10 Adam moments)."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp

  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def restore(workdir, item):
    path = os.path.join(workdir, "ckpt", "rl", "1", item)
    checkpointer = ocp.StandardCheckpointer()
    meta = checkpointer.metadata(path).item_metadata
    if item == "params":
      mesh = jax.tree.leaves(meta)[0].sharding.device_mesh.mesh  # nested lists
      ids = {d.id for d in np.asarray(mesh, dtype=object).flat}
      assert len(ids) == 4, ids
    like = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
    return jax.tree.leaves(checkpointer.restore(path, like))

  for item in ("params", "opt_state"):
    multi, single = restore(runs["multi_dir"], item), restore(runs["single_dir"], item)
    assert len(multi) == len(single) > 0
    worst = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(multi, single))
    print(f"{item}: max abs difference {worst:.1e}")
    for a, b in zip(multi, single):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=CKPT_ATOL,
                                 err_msg=item)


def test_only_process_zero_writes(runs):
  (_, out0, _, pid0), (_, out1, _, _) = runs["multi"]
  assert "[test] fgrpo:" in out0 and "[done]" in out0
  assert "[rl]" in out0 and "[rl]" not in out1 and "[test]" not in out1, out1
  with open(os.path.join(runs["multi_dir"], "metrics.jsonl")) as f:
    keys = [(r["stage"], r["step"], "val_hit@1" in r) for r in map(json.loads, f)]
  # The step's metrics and the end-of-stage validation, once each, not once per process.
  assert keys == [("rl", 1, False), ("rl", 1, True)], keys
  events = [name for _, _, files in os.walk(runs["multi_dir"]) for name in files
            if "tfevents" in name]
  # Event file names end with .<pid>.<n>.v2: all are process 0's.
  assert events and all(name.split(".")[-3] == str(pid0) for name in events), (events, pid0)


def test_maybe_initialize_reads_the_environment():
  assert not distributed.is_multi_process({})
  assert not distributed.is_multi_process({"JAX_NUM_PROCESSES": "1", "SLURM_NTASKS": "1"})
  assert distributed.is_multi_process({"JAX_NUM_PROCESSES": "2"})
  assert distributed.is_multi_process({"SLURM_NTASKS": "16"})
  assert distributed.is_multi_process({"TPU_WORKER_HOSTNAMES": "w0,w1"})
  env = {"JAX_COORDINATOR_ADDRESS": "localhost:1234", "JAX_NUM_PROCESSES": "2",
         "JAX_PROCESS_ID": "1"}
  assert distributed.initialize_kwargs(env) == {
      "coordinator_address": "localhost:1234", "num_processes": 2, "process_id": 1}
  assert distributed.initialize_kwargs({"JAX_NUM_PROCESSES": "2"}) == {}  # TPU/Slurm detect
