"""Tests for fgrpo_jax/models/llama.py: cached and shared-prefix paths equal a full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgrpo_jax.models import llama

CFG = llama.ModelConfig(vocab_size=50, num_layers=2, hidden=32, num_heads=4,
                        num_kv_heads=2, head_dim=8, mlp_hidden=64)


def _params(cfg=CFG, seed=0):
  params = llama.init_params(cfg, jax.random.key(seed))
  # Larger weights than the init so attention patterns are far from uniform.
  return jax.tree.map(lambda p: p * 4.0 if p.ndim > 1 else p, params)


@pytest.mark.parametrize("variant", [
    {}, {"tie_embeddings": True}, {"qkv_bias": True}, {"qk_norm": True},
    {"num_kv_heads": 4}, {"num_kv_heads": 1}])
def test_decode_with_cache_equals_full_forward(variant):
  cfg = llama.ModelConfig(**{**CFG.__dict__, **variant})
  params = _params(cfg)
  if cfg.qkv_bias:  # make biases non-trivial
    params["layers"]["q_bias"] = params["layers"]["q_bias"] + 0.3
    params["layers"]["k_bias"] = params["layers"]["k_bias"] - 0.2
  B, G, P, T = 2, 3, 7, 5
  rng = np.random.default_rng(0)
  prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, P)), jnp.int32)
  completion = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, G, T)), jnp.int32)

  @jax.jit  # one compile of the three paths, not one per eager op
  def three_ways(params, prompt, completion):
    first, prefix = llama.prefill(params, prompt, cfg)
    cache = llama.init_decode_cache(cfg, B, G, T)
    step_logits = [jnp.broadcast_to(first[:, None], (B, G, cfg.vocab_size))]
    for t in range(T - 1):
      logits, cache = llama.decode_step(params, prefix, cache, completion[:, :, t],
                                        jnp.int32(t), cfg)
      step_logits.append(logits)
    cached = jnp.stack(step_logits, axis=2)  # [B, G, T, V]
    full_tokens = jnp.concatenate(
        [jnp.broadcast_to(prompt[:, None], (B, G, P)), completion], axis=-1).reshape(B * G, P + T)
    full = llama.forward(params, full_tokens, cfg).reshape(B, G, P + T, -1)[:, :, P - 1:P + T - 1]
    return cached, full, llama.completion_logits(params, prompt, None, completion, cfg)

  cached, full, shared = three_ways(params, prompt, completion)
  np.testing.assert_allclose(cached, full, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(shared, full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tied", [False, True])
def test_column_logits_equal_gathered_full_logits(tied):
  """columns=cand_tokens gives exactly the gathered columns of the full-vocabulary logits,
  in prefill, cached decode and the shared-prefix training forward."""
  cfg = llama.ModelConfig(**{**CFG.__dict__, "tie_embeddings": tied})
  params = _params(cfg)
  B, G, P, T, C = 2, 3, 6, 4, 5
  rng = np.random.default_rng(1)
  prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, P)), jnp.int32)
  completion = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, G, T)), jnp.int32)
  columns = jnp.asarray(np.stack([rng.choice(cfg.vocab_size, C, replace=False)
                                  for _ in range(B)]), jnp.int32)
  gather = lambda full: jnp.take_along_axis(
      full, columns.reshape((B,) + (1,) * (full.ndim - 2) + (C,)), axis=-1)

  @jax.jit  # one compile, not one per eager op
  def both_ways(params, prompt, completion, columns):
    full_first, prefix = llama.prefill(params, prompt, cfg)
    sub_first, _ = llama.prefill(params, prompt, cfg, columns=columns)
    cache = llama.init_decode_cache(cfg, B, G, T)
    token, t0 = completion[:, :, 0], jnp.int32(0)
    full_step, _ = llama.decode_step(params, prefix, cache, token, t0, cfg)
    sub_step, _ = llama.decode_step(params, prefix, cache, token, t0, cfg, columns=columns)
    full = llama.completion_logits(params, prompt, None, completion, cfg)
    sub = llama.completion_logits(params, prompt, None, completion, cfg, columns=columns)
    # with_prompt: the same completion logits plus the prompt positions', one pass.
    shared = llama.completion_logits(params, prompt, None, completion, cfg, columns=columns,
                                     with_prompt=True)
    return (full_first, sub_first, full_step, sub_step, full, sub, shared,
            llama.forward(params, prompt, cfg))

  (full_first, sub_first, full_step, sub_step, full, sub, (sub2, prompt_sub),
   prompt_full) = both_ways(params, prompt, completion, columns)
  np.testing.assert_allclose(sub2, sub, atol=1e-6, rtol=1e-6)
  assert prompt_sub.shape == (B, P, C)
  np.testing.assert_allclose(prompt_sub, gather(prompt_full), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(sub_first, gather(full_first), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(sub_step, gather(full_step), atol=1e-5, rtol=1e-5)
  assert sub.shape == (B, G, T, C)
  np.testing.assert_allclose(sub, gather(full), atol=1e-5, rtol=1e-5)


def test_left_padding_matches_unpadded():
  params = _params()
  rng = np.random.default_rng(1)
  prompt = rng.integers(1, CFG.vocab_size, (1, 6))
  completion = jnp.asarray(rng.integers(0, CFG.vocab_size, (1, 2, 4)), jnp.int32)
  padded = np.concatenate([np.zeros((1, 3), int), prompt], axis=1)
  mask = np.concatenate([np.zeros((1, 3), bool), np.ones((1, 6), bool)], axis=1)
  logits = jax.jit(lambda p, x, m: llama.completion_logits(p, x, m, completion, CFG))
  a = logits(params, jnp.asarray(prompt, jnp.int32), None)
  b = logits(params, jnp.asarray(padded, jnp.int32), jnp.asarray(mask))
  np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_prefix_sharing_gradients_equal_repeated_prompt():
  params = _params()
  B, G, P, T = 2, 3, 5, 4
  rng = np.random.default_rng(2)
  prompt = jnp.asarray(rng.integers(0, CFG.vocab_size, (B, P)), jnp.int32)
  completion = jnp.asarray(rng.integers(0, CFG.vocab_size, (B, G, T)), jnp.int32)
  weights = jnp.asarray(rng.normal(size=(B, G, T)), jnp.float32)

  def shared_loss(p):
    logits = llama.completion_logits(p, prompt, None, completion, CFG)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits), completion[..., None], -1)[..., 0]
    return jnp.sum(lp * weights)

  def repeated_loss(p):
    full = jnp.concatenate([jnp.broadcast_to(prompt[:, None], (B, G, P)), completion], -1)
    logits = llama.forward(p, full.reshape(B * G, P + T), CFG).reshape(B, G, P + T, -1)
    logits = logits[:, :, P - 1:P + T - 1]
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits), completion[..., None], -1)[..., 0]
    return jnp.sum(lp * weights)

  la, ga = jax.jit(jax.value_and_grad(shared_loss))(params)  # jitted: one compile, not one per op
  lb, gb = jax.jit(jax.value_and_grad(repeated_loss))(params)
  np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-4)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)


def test_remat_gives_same_gradients():
  cfg = llama.ModelConfig(**{**CFG.__dict__, "remat": "full"})
  params = _params()
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 50, (2, 6)), jnp.int32)
  f = lambda c: jax.jit(jax.grad(lambda p: llama.forward(p, tokens, c).sum()))(params)
  for x, y in zip(jax.tree.leaves(f(CFG)), jax.tree.leaves(f(cfg))):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)


def test_bad_head_config_is_one_clear_error():
  with pytest.raises(ValueError, match="num_kv_heads"):
    llama.ModelConfig(num_heads=4, num_kv_heads=3)
