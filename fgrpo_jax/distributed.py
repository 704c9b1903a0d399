"""Multi-process start-up: jax.distributed when the run spans several processes."""

from __future__ import annotations

import os

import jax

def maybe_initialize() -> bool:
  """Calls jax.distributed.initialize() when the environment says we are one of many.

  Single-process runs (a laptop, one TPU VM host) do nothing. On a TPU pod slice or
  under Slurm, JAX finds the coordinator from the environment; for a manual setup
  set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
  """
  multi = False
  if os.environ.get("JAX_NUM_PROCESSES", "1") not in ("", "1"):
    multi = True
  elif os.environ.get("SLURM_NTASKS", "1") not in ("", "1"):
    multi = True
  elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
    multi = True
  if not multi:
    return False
  kwargs = {}
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                  process_id=int(os.environ["JAX_PROCESS_ID"]))
  jax.distributed.initialize(**kwargs)
  return True
