"""Orbax checkpoints of a training stage, with resume and a fallback on bad steps.

A stage (SFT or RL) saves params and opt_state at its step under `workdir/ckpt/<stage>/`.
Data order and sampling keys are pure functions of (seed, step), so the step is
all the iterator and PRNG state a resume needs. Orbax writes each step to a
temporary directory and renames it when complete, so a killed save never leaves a
step that looks finished; a latest step that fails to restore anyway (corrupt
files) is skipped with a warning and the previous one is used. A resume (a restore
that asks for the optimizer state: the stage goes on to save and rotate steps)
moves unreadable steps aside to `ckpt/<stage>_corrupt/<step>[.n]` rather than let
rotation delete them; when none is readable it says so before the stage restarts.
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

  def due(self, step: int, *, force: bool = False) -> bool:
    """Whether save(step, force=force) would write a checkpoint."""
    if not force and (self.every <= 0 or step % self.every):
      return False
    return step not in self._manager.all_steps()

  def save(self, step: int, params, opt_state, *, force: bool = False) -> bool:
    """Saves params and optimizer state as separate items (params load alone)."""
    if not self.due(step, force=force):
      return False
    return self._manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state)),
        force=True)

  def restore_latest(self, abstract_params, abstract_opt_state=None):
    """(step, params, opt_state) of the newest readable checkpoint, or (None, None, None).

    With abstract_opt_state=None only the parameters are read and the directory is
    left as it is; with it (a resume), unreadable steps are moved aside.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    bad, found = [], (None, None, None)
    for step in steps:
      items = {"params": ocp.args.StandardRestore(abstract_params)}
      if abstract_opt_state is not None:
        items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
      try:
        out = self._manager.restore(step, args=ocp.args.Composite(**items))
        found = step, out["params"], out.get("opt_state")
        break
      except ValueError as e:
        # Readable, but another run's layout: not a fallback case.
        if any(m in str(e) for m in _MISMATCH):
          raise CheckpointMismatch(
              f"{self.directory}: checkpoint step {step} holds other parameters than this "
              "run's (changed config.model.lora_rank / lora_targets, config.algorithm or "
              "the model sizes?); use a new --workdir") from None
        _unreadable(step, self.directory, e)
        bad.append(step)
      except Exception as e:  # noqa: BLE001 - any unreadable step falls back
        _unreadable(step, self.directory, e)
        bad.append(step)
    if bad and abstract_opt_state is not None:  # a resume: rotation would delete them
      self._move_aside(bad, all_bad=len(bad) == len(steps))
    return found

  def _move_aside(self, steps, all_bad: bool) -> None:
    """Renames unreadable step directories out of the manager's sight (kept, not deleted)."""
    if jax.process_index() != 0:
      return
    aside = f"{self.directory}_corrupt"
    os.makedirs(aside, exist_ok=True)
    moved = []
    for step in steps:
      src = os.path.join(self.directory, str(step))
      if not os.path.isdir(src):
        continue
      dst, n = os.path.join(aside, str(step)), 1
      while os.path.exists(dst):  # an earlier run's corrupt step of the same number
        dst, n = os.path.join(aside, f"{step}.{n}"), n + 1
      os.rename(src, dst)
      moved.append(str(step))
    self._manager.reload()
    if all_bad:
      logging.warning("every checkpoint of %s is unreadable (steps %s, moved to %s): the stage "
                      "starts again from step 0", self.directory, ", ".join(moved), aside)
    elif moved:
      logging.warning("unreadable checkpoint steps %s of %s moved to %s", ", ".join(moved),
                      self.directory, aside)

  def latest_step(self):
    return self._manager.latest_step()

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def _unreadable(step, directory, e):
  logging.warning("checkpoint step %d in %s is unreadable (%s: %s); trying an older one",
                  step, directory, type(e).__name__, str(e).splitlines()[0][:200])


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) of a pytree, the restore target."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)
