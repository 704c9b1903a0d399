"""Multi-process start-up: jax.distributed when the run spans several processes."""

from __future__ import annotations

import os

import jax

# Cross-process collectives of the CPU backend. "gloo" (TCP, ships with jaxlib) is
# what a multi-process CPU run needs; older jax releases defaulted to "none", under
# which a computation spanning two processes' CPU devices fails. TPU and GPU
# collectives do not use it.
CPU_COLLECTIVES = "gloo"


def is_multi_process(environ=None) -> bool:
  """Whether the environment says this process is one of several."""
  env = os.environ if environ is None else environ
  return (env.get("JAX_NUM_PROCESSES", "1") not in ("", "1")
          or env.get("SLURM_NTASKS", "1") not in ("", "1")
          or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def initialize_kwargs(environ=None) -> dict:
  """Explicit jax.distributed.initialize arguments from JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID; {} lets JAX detect TPU pods and Slurm."""
  env = os.environ if environ is None else environ
  if not env.get("JAX_COORDINATOR_ADDRESS"):
    return {}
  return dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
              num_processes=int(env["JAX_NUM_PROCESSES"]),
              process_id=int(env["JAX_PROCESS_ID"]))


def use_cpu_collectives() -> None:
  """Selects CPU_COLLECTIVES for the CPU backend unless the user chose one (e.g. "mpi").

  Must run before the backend starts (before jax.distributed.initialize).
  """
  if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
    jax.config.update("jax_cpu_collectives_implementation", CPU_COLLECTIVES)


def maybe_initialize() -> bool:
  """Calls jax.distributed.initialize() when the environment says we are one of many.

  Single-process runs (a laptop, one TPU VM host) do nothing. On a TPU pod slice or
  under Slurm, JAX finds the coordinator from the environment; for a manual setup
  (e.g. several processes on one machine, see tests/test_distributed.py) set
  JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
  Multi-process CPU runs get the gloo collectives (see CPU_COLLECTIVES).
  """
  if not is_multi_process():
    return False
  use_cpu_collectives()
  jax.distributed.initialize(**initialize_kwargs())
  return True
