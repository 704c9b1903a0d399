"""Orbax checkpoints of a training stage, with resume and a fallback on bad steps.

A stage (SFT or RL) saves params and opt_state at its step under `workdir/ckpt/<stage>/`.
Data order and sampling keys are pure functions of (seed, step), so the step is
all the iterator and PRNG state a resume needs. Orbax writes each step to a
temporary directory and renames it when complete, so a killed save never leaves a
step that looks finished; a latest step that fails to restore anyway (corrupt
files) is skipped with a warning and the previous one is used.
"""

from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp

from fgrpo_jax.errors import UserError


# Orbax's errors for a different pytree / differently shaped arrays.
_MISMATCH = ("tree structures do not match", "is not compatible with the stored shape")


class CheckpointMismatch(UserError):
  """The stage directory holds a checkpoint of differently shaped parameters."""


class StageCheckpointer:
  """Save/restore one training stage's state pytree."""

  def __init__(self, directory: str, *, keep: int = 2, every: int = 100):
    self.directory = os.path.abspath(directory)
    self.every = every
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=True))

  def save(self, step: int, params, opt_state, *, force: bool = False) -> bool:
    """Saves params and optimizer state as separate items (params load alone)."""
    if not force and (self.every <= 0 or step % self.every):
      return False
    if step in self._manager.all_steps():
      return False
    return self._manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state)),
        force=True)

  def restore_latest(self, abstract_params, abstract_opt_state=None):
    """(step, params, opt_state) of the newest readable checkpoint, or (None, None, None).

    With abstract_opt_state=None only the parameters are read.
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      items = {"params": ocp.args.StandardRestore(abstract_params)}
      if abstract_opt_state is not None:
        items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
      try:
        out = self._manager.restore(step, args=ocp.args.Composite(**items))
        return step, out["params"], out.get("opt_state")
      except ValueError as e:
        if any(m in str(e) for m in _MISMATCH):  # readable, but another run's layout: not a fallback case
          raise CheckpointMismatch(
              f"{self.directory}: checkpoint step {step} holds other parameters than this "
              "run's (changed config.model.lora_rank / lora_targets, config.algorithm or "
              "the model sizes?); use a new --workdir") from None
        logging.warning("checkpoint step %d in %s is unreadable (%s: %s); trying an older one",
                        step, self.directory, type(e).__name__, str(e).splitlines()[0][:200])
      except Exception as e:  # noqa: BLE001 - any unreadable step falls back
        logging.warning("checkpoint step %d in %s is unreadable (%s: %s); trying an older one",
                        step, self.directory, type(e).__name__, str(e).splitlines()[0][:200])
    return None, None, None

  def latest_step(self):
    return self._manager.latest_step()

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) of a pytree, the restore target."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)
