"""RL training compiles once: no new XLA compilation after the first rl_step.

Counts backend compilations through jax.monitoring (the event
`/jax/core/compile/backend_compile_duration` that jax records around every XLA
compilation, persistent-cache hits included) over several RL steps of the tiny
config on real, changing batches of the synthetic recommendation task, and checks
the jitted function's own cache size.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from fgrpo_jax import cli
from fgrpo_jax import config as config_lib
from fgrpo_jax import steps as steps_lib
from fgrpo_jax.data import arrays as arrays_lib
from fgrpo_jax.data import tasks
from fgrpo_jax.models import llama

REPO = pathlib.Path(__file__).resolve().parents[1]
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
STEPS = 4


def _config(variant: str):
  return cli.load_python_file(str(REPO / "configs" / "recsys.py")).get_config(variant)


def test_rl_step_compiles_only_on_the_first_step():
  config = _config("tiny")
  task = tasks.load_task(config)
  layout = task.layout_fn(config.rollout.slate_size, config.rollout.rank_size)
  cfg = config_lib.model_config(config, task.vocab_size)
  settings = steps_lib.RLSettings.from_config(config)
  optimizer = steps_lib.make_optimizer(config.optim, config.rl.lr, config.rl.steps)
  params = llama.init_params(cfg, jax.random.key(config.seed))
  state = steps_lib.TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))

  # Real batches in training order, and per-step keys, made before counting.
  split = task.splits["train"]
  n, bsz = split["prompt"].shape[0], config.rl.batch_prompts
  batches = [arrays_lib.take_batch(split, arrays_lib.batch_indices(config.seed, 1, step, n, bsz))
             for step in range(STEPS)]
  base = jax.random.key(config.seed)
  keys = [jax.random.fold_in(base, step) for step in range(STEPS)]
  jax.block_until_ready((batches, keys))
  assert not np.array_equal(np.asarray(batches[0]["prompt"]), np.asarray(batches[1]["prompt"]))
  assert not np.array_equal(np.asarray(batches[1]["relevance"]),
                            np.asarray(batches[2]["relevance"]))

  compiled = []

  def listener(event, duration_secs, **kwargs):
    if event == COMPILE_EVENT:
      compiled.append(kwargs.get("fun_name", "?"))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    losses, after_first = [], None
    for step in range(STEPS):
      state, metrics = steps_lib.rl_step(state, None, batches[step], keys[step], cfg=cfg,
                                     layout=layout, optimizer=optimizer, settings=settings)
      losses.append(float(jax.device_get(metrics["loss"])))
      if step == 0:
        after_first = (list(compiled), steps_lib.rl_step._cache_size())
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)

  first_compiles, first_cache = after_first
  assert first_compiles, "the listener saw no compilation at all: is the event name stale?"
  assert compiled == first_compiles, (
      f"recompiled after the first step: {compiled[len(first_compiles):]}")
  assert steps_lib.rl_step._cache_size() == first_cache
  assert int(state.step) == STEPS
  assert all(np.isfinite(losses))
