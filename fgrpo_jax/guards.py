"""Guards against silent wrong results: numeric settings, diverged training, changed
resumes.

- `check_finite_settings(config)`: every learning rate and coefficient is a finite
  number in its range (`--config.rl.lr=nan` used to train to the end on NaN weights).
- `check_finite_step(...)`: stops a stage whose loss or gradient norm (or, before a
  checkpoint, whose parameters) became non-finite, naming the step and the last
  good checkpoint; the bad state is never saved.
- `warn_config_changes(...)`: a resume whose config differs from the checkpointed
  run_config.json says which fields changed.
"""

from __future__ import annotations

import functools
import json
import math
import os

import numpy as np

from fgrpo_jax.errors import UserError

# (field, lowest, lowest allowed?, highest, highest allowed?): each value must be a
# finite number in that interval. Fields a config does not have are skipped.
NUMERIC_RANGES = (
    ("sft.lr", 0.0, False, math.inf, False),
    ("rl.lr", 0.0, False, math.inf, False),
    ("rl.eps_low", 0.0, True, 1.0, False),  # the ratio's lower clip 1 - eps_low stays > 0
    ("rl.eps_high", 0.0, True, math.inf, False),
    ("rl.kl_coef", 0.0, True, math.inf, False),
    ("reward.lam", 0.0, True, math.inf, False),
    ("reward.format_penalty", 0.0, True, math.inf, False),
    ("rollout.temperature", 0.0, False, math.inf, False),
    ("optim.weight_decay", 0.0, True, math.inf, False),
    ("optim.b1", 0.0, True, 1.0, False),
    ("optim.b2", 0.0, True, 1.0, False),
    ("optim.grad_clip", 0.0, False, math.inf, False),
    ("optim.final_lr_frac", 0.0, True, 1.0, True),
    ("optim.warmup_steps", 0, True, math.inf, False),
    ("model.rope_theta", 0.0, False, math.inf, False),
    ("model.lora_alpha", 0.0, False, math.inf, False),
    ("data.min_rating", -math.inf, False, math.inf, False),
    ("eval.every", 0, True, math.inf, False),
    ("ckpt_keep", 1, True, math.inf, False),
)


def _get(config, field: str):
  node = config
  for part in field.split("."):
    if part not in node:
      return None
    node = node[part]
  return node


def _interval(lo, lo_in, hi, hi_in) -> str:
  if hi == math.inf:
    return "" if lo == -math.inf else f" {'>=' if lo_in else '>'} {lo:g}"
  return f" in {'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"


def check_finite_settings(config) -> None:
  """One ConfigError-like line for the first non-finite or out-of-range setting."""
  from fgrpo_jax.config import ConfigError  # config imports this module
  for field, lo, lo_in, hi, hi_in in NUMERIC_RANGES:
    value = _get(config, field)
    if value is None:
      continue
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value)
          and (value >= lo if lo_in else value > lo) and (value <= hi if hi_in else value < hi))
    if not ok:
      raise ConfigError(f"config.{field}={value!r} must be a finite number"
                        f"{_interval(lo, lo_in, hi, hi_in)}")


# ----------------------------------------------------------------------------
# Divergence.


class TrainingDiverged(UserError):
  """The loss or the gradient norm became non-finite."""


@functools.cache
def _all_finite_fn():
  import jax
  import jax.numpy as jnp

  @jax.jit
  def all_finite(tree):
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)

  return all_finite


def _watched(metrics) -> dict[str, float]:
  """The losses and gradient norms of a step's metrics, as floats."""
  import jax
  keys = [k for k in metrics if k.endswith("loss") or k.endswith("grad_norm")]
  return {k: float(np.asarray(v)) for k, v in jax.device_get({k: metrics[k] for k in keys}).items()}


def check_finite_step(stage: str, step: int, metrics, ckpt, params=None) -> None:
  """Raises TrainingDiverged if the step's loss / gradient norm (or `params`, checked
  when given: before a checkpoint) is not finite; waits for pending saves first so
  that the message names the last good checkpoint on disk."""
  bad = {k: v for k, v in _watched(metrics).items() if not math.isfinite(v)}
  if not bad and params is not None and not bool(_all_finite_fn()(params)):
    bad = {"parameters": math.nan}
  if not bad:
    return
  ckpt.wait()
  last = ckpt.latest_step()
  where = (f"the last good checkpoint is step {last} in {ckpt.directory}" if last is not None
           else f"no checkpoint of this stage was saved ({ckpt.directory})")
  what = ", ".join(f"{k} {v}" for k, v in bad.items())
  raise TrainingDiverged(
      f"[{stage}] step {step}: training diverged ({what} is not finite); nothing was saved "
      f"for this step, {where}; lower the learning rate (config.{_lr_field(stage)}) or "
      "config.optim.grad_clip")


def _lr_field(stage: str) -> str:
  return "rl.lr" if stage == "rl" else "sft.lr"


# ----------------------------------------------------------------------------
# Resume with another config.

# Fields that do not change what the checkpoints continue: evaluation, logging,
# where things are written, the device layout.
IGNORED_ON_RESUME = ("variant", "mode", "eval.", "log_every", "ckpt_every", "ckpt_keep",
                     "profile_steps", "tensorboard", "compare.", "mesh.", "data.cache_dir")


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_changes(saved: dict, current: dict) -> list[str]:
  """Dotted fields that differ between two config dicts ("rl.steps 2 -> 3")."""
  a, b = _flatten(saved), _flatten(current)
  out = []
  for field in sorted(set(a) | set(b)):
    if any(field == p or (p.endswith(".") and field.startswith(p)) for p in IGNORED_ON_RESUME):
      continue
    old, new = a.get(field, "<absent>"), b.get(field, "<absent>")
    if isinstance(old, list):  # JSON has no tuples
      old = tuple(old)
    if isinstance(new, list):
      new = tuple(new)
    if old != new:
      out.append(f"{field} {old!r} -> {new!r}")
  return out


def warn_config_changes(workdir: str, run_config_file: str, config, log=print) -> list[str]:
  """Logs one line naming the fields that differ from the checkpointed run's config
  (only when the workdir has checkpoints to resume); returns those fields."""
  path = os.path.join(workdir, run_config_file)
  ckpt_dir = os.path.join(workdir, "ckpt")
  if not os.path.isfile(path) or not os.path.isdir(ckpt_dir) or not os.listdir(ckpt_dir):
    return []
  try:
    with open(path, encoding="utf-8-sig") as f:
      saved = json.load(f)["config"]
  except (OSError, ValueError, KeyError, TypeError):
    log(f"[resume] {path} is unreadable: cannot compare this config with the checkpointed run's")
    return []
  changes = config_changes(saved, config.to_dict())
  if changes:
    log(f"[resume] warning: resuming {workdir} with a config that differs from the "
        f"checkpointed run ({path}): {'; '.join(changes)} (schedules and data order follow "
        "the new values)")
  return changes


# ----------------------------------------------------------------------------
# Evaluation without a checkpoint.


def no_checkpoint_to_evaluate(workdir: str) -> UserError:
  from fgrpo_jax.config import ConfigError
  return ConfigError(f"--workdir={workdir}: no checkpoint to evaluate (config.mode=eval); "
                     "config.eval.allow_random=True evaluates the random initial parameters")


def check_eval_has_checkpoint(config, workdir: str) -> None:
  """config.mode=eval on a workdir without checkpoints and without a pretrained model
  is most likely a mistyped --workdir: random weights would look like a result."""
  if config.mode != "eval" or config.model.get("hf_checkpoint", ""):
    return
  if config.eval.get("allow_random", False):
    return
  ckpt_dir = os.path.join(workdir, "ckpt")
  if not os.path.isdir(ckpt_dir) or not any(
      os.listdir(os.path.join(ckpt_dir, d)) for d in os.listdir(ckpt_dir)
      if os.path.isdir(os.path.join(ckpt_dir, d))):
    raise no_checkpoint_to_evaluate(workdir)
