"""The SASRec-like reference: the same backbone trained as a pointwise next-item scorer.

The model reads the history alone (`<bos> <hist> h_1 … h_n <pool>`, the pool left
out) and is trained with a softmax over the whole catalogue to predict the next
item. At evaluation it scores each pool item by its logit, independently of the
other candidates, and the score-based policy takes the top-k as slate and top-m as
ranking. Recommendation tasks only (item-token prompts).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fgrpo_jax import steps as steps_lib
from fgrpo_jax.data import arrays as arrays_lib
from fgrpo_jax.data import prompts as prompts_lib
from fgrpo_jax.models import llama


def history_prompts(history: np.ndarray, num_items: int) -> dict[str, np.ndarray]:
  """Left-padded history-only prompts: int32 [N, H+3] and mask."""
  builder = prompts_lib.ItemTokenPrompts(num_items=num_items)
  arrays = builder.build(history, np.zeros((history.shape[0], 0), np.int64))
  # build() ends with <pool> <slate>; a history-only prompt ends at <pool>.
  return {"prompt": arrays["prompt"][:, :-1], "prompt_mask": arrays["prompt_mask"][:, :-1]}


def _targets(arrays) -> np.ndarray:
  slot = np.argmax(arrays["relevance"], axis=-1)
  return np.take_along_axis(arrays["cand_tokens"], slot[:, None], 1)[:, 0]


@functools.partial(jax.jit, static_argnames=("cfg", "optimizer", "item_offset"),
                   donate_argnums=(0, 1))
def _step(params, opt_state, prompt, mask, target, *, cfg, optimizer, item_offset):
  def loss_fn(p):
    logits, _ = llama.prefill(p, prompt, cfg, mask)
    logits = logits[:, item_offset:]  # softmax over the catalogue only
    return optax.softmax_cross_entropy_with_integer_labels(logits, target - item_offset).mean()

  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


@functools.partial(jax.jit, static_argnames=("cfg",))
def _pool_logits(params, prompt, mask, cand_tokens, *, cfg):
  logits, _ = llama.prefill(params, prompt, cfg, mask)
  return jnp.take_along_axis(logits, cand_tokens, axis=-1)


def train_pointwise(task, config, cfg: llama.ModelConfig, *, steps: int, log=print):
  """Trains the next-item scorer on the task's training split. Returns params."""
  num_items = task.info["num_items"]
  train = task.splits["train"]
  hp = history_prompts(train["history"], num_items)
  target = _targets(train)
  offset = prompts_lib.ItemTokenPrompts(num_items).item_offset
  optimizer = steps_lib.make_optimizer(config.optim, config.sft.lr, steps)
  params = llama.init_params(cfg, jax.random.key(config.seed))
  opt_state = optimizer.init(params)
  n = target.shape[0]
  for step in range(steps):
    idx = arrays_lib.batch_indices(config.seed, 7, step, n, config.sft.batch_size)
    params, opt_state, loss = _step(params, opt_state, jnp.asarray(hp["prompt"][idx]),
                                    jnp.asarray(hp["prompt_mask"][idx]),
                                    jnp.asarray(target[idx]), cfg=cfg, optimizer=optimizer,
                                    item_offset=offset)
    if (step + 1) % max(steps // 5, 1) == 0:
      log(f"[pointwise] step {step + 1}/{steps} | loss {float(loss):.4f}")
  return params


def pointwise_scores(params, task, arrays, cfg: llama.ModelConfig, batch_size: int = 512):
  """Scores [N, C]: the scorer's logit of each pool item given the history."""
  hp = history_prompts(arrays["history"], task.info["num_items"])
  out = []
  for start in range(0, hp["prompt"].shape[0], batch_size):
    sl = slice(start, start + batch_size)
    out.append(np.asarray(_pool_logits(params, jnp.asarray(hp["prompt"][sl]),
                                       jnp.asarray(hp["prompt_mask"][sl]),
                                       jnp.asarray(arrays["cand_tokens"][sl]), cfg=cfg)))
  return np.concatenate(out)
