"""Tests for fgrpo_jax/models/qwen3_5.py: the two DeltaNet forms agree, and the cached
and shared-prefix paths equal a full forward (parity with transformers: test_hf.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgrpo_jax.models import llama, qwen3_5

# Jitted: eager scans dispatch op by op and are many times slower than compiling.
_prefill = jax.jit(qwen3_5.prefill, static_argnames=("cfg",))
_forward = jax.jit(qwen3_5.forward, static_argnames=("cfg",))
_completion = jax.jit(qwen3_5.completion_logits, static_argnames=("cfg",))
_decode = jax.jit(qwen3_5.decode_step, static_argnames=("cfg",))

CFG = llama.ModelConfig(
    arch="qwen3_5", vocab_size=50, num_layers=4, hidden=32, num_heads=4, num_kv_heads=2,
    head_dim=8, mlp_hidden=48, qk_norm=True, partial_rotary_factor=0.5,
    layer_types=("linear_attention", "full_attention") * 2, linear_num_key_heads=2,
    linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=4,
    linear_conv_kernel=3, chunk_size=4)


def _params(cfg=CFG, seed=0):
  params = qwen3_5.init_params(cfg, jax.random.key(seed))
  # Larger weights than the init (and non-zero norm weights) so nothing is near trivial.
  params = jax.tree.map(lambda p: p * 6.0 if p.ndim > 2 else p, params)
  params["layers"]["attn_norm"] += 0.3
  if "linear" in params:
    params["linear"]["A_log"] = jnp.log(jnp.full_like(params["linear"]["A_log"], 0.2))
  return params


def _inputs(seed, N=3, T=13, H=4, Dk=8, Dv=4):
  ks = jax.random.split(jax.random.key(seed), 6)
  q = qwen3_5._l2_normalize(jax.random.normal(ks[0], (N, T, H, Dk))) * Dk ** -0.5
  k = qwen3_5._l2_normalize(jax.random.normal(ks[1], (N, T, H, Dk)))
  v = jax.random.normal(ks[2], (N, T, H, Dv))
  g = -jax.random.uniform(ks[3], (N, T, H), maxval=0.7)
  beta = jax.random.uniform(ks[4], (N, T, H))
  state = jax.random.normal(ks[5], (N, H, Dk, Dv))
  return q, k, v, g, beta, state


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunked_delta_rule_equals_recurrent(chunk):
  """Chunked (one chunk, several, a padded last one) = token by token, from a non-zero
  state, outputs and final state; also their gradients."""
  args = _inputs(0)
  out_r, s_r = qwen3_5.recurrent_delta_rule(*args)
  out_c, s_c = qwen3_5.chunked_delta_rule(*args, chunk)
  np.testing.assert_allclose(out_c, out_r, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(s_c, s_r, atol=2e-5, rtol=1e-4)
  w = jax.random.normal(jax.random.key(1), out_r.shape)
  loss = lambda f: lambda *a: jnp.sum(f(*a)[0] * w) + jnp.sum(f(*a)[1])
  grad = lambda f: jax.jit(jax.grad(loss(f), argnums=range(6)))(*args)
  g_r = grad(qwen3_5.recurrent_delta_rule)
  g_c = grad(lambda *a: qwen3_5.chunked_delta_rule(*a, chunk))
  for a, b in zip(g_c, g_r):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("C", [1, 2, 3, 8, 64])
def test_unit_lower_inverse_equals_the_exact_inverse(C):
  """Strictly lower a with entries up to 1 (correlated keys, as in the DeltaNet's
  chunks): (I + a)^-1 to f32 rounding, also for C not a power of two."""
  a = jax.random.uniform(jax.random.key(C), (3, 2, C, C), minval=-0.3, maxval=1.0)
  a = jnp.tril(a, -1)
  exact = np.linalg.inv(np.eye(C) + np.asarray(a, np.float64))
  np.testing.assert_allclose(qwen3_5.unit_lower_inverse(a), exact, atol=1e-5, rtol=1e-5)


def test_chunked_delta_rule_compiles_to_no_library_call():
  """The chunked form and its gradient are plain XLA ops: no custom call (jaxlib
  0.10.2's CPU LAPACK triangular solve deadlocked the 2-thread intra-op pool of a
  2-core machine when two ran at once: a Qwen3.5 training run hung idle)."""
  args = _inputs(0, T=20)
  loss = lambda *a: jnp.sum(qwen3_5.chunked_delta_rule(*a, 8)[0])
  hlo = jax.jit(jax.value_and_grad(loss, argnums=range(6))).lower(*args).compile().as_text()
  assert "custom-call" not in hlo


def test_delta_rule_recalls_what_it_stored():
  """The rule's defining property: with beta = 1 and no decay, writing v under key k and
  reading with q = k returns v (the old association of k is replaced, not added to)."""
  k = jnp.eye(4)[None, :, None, :]  # 4 orthonormal keys, one per token
  v = jax.random.normal(jax.random.key(0), (1, 4, 1, 3))
  state = jax.random.normal(jax.random.key(1), (1, 1, 4, 3))
  out, _ = qwen3_5.chunked_delta_rule(k, k, v, jnp.zeros((1, 4, 1)), jnp.ones((1, 4, 1)),
                                      state, 2)
  np.testing.assert_allclose(out, v, atol=1e-5)


@pytest.mark.parametrize("variant", [
    {},  # period 2, GQA in both kinds
    {"tie_embeddings": True, "linear_num_key_heads": 4, "num_kv_heads": 1,
     "layer_types": ("full_attention",) + ("linear_attention",) * 3},
    {"layer_types": ("linear_attention",) * 4},
    {"layer_types": ("full_attention",) * 4}])
def test_decode_with_cache_equals_full_forward(variant):
  cfg = dataclasses.replace(CFG, **variant)
  params = _params(cfg)
  B, G, P, T = 2, 3, 7, 5
  rng = np.random.default_rng(0)
  prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, P)), jnp.int32)
  completion = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, G, T)), jnp.int32)

  first, prefix = _prefill(params, prompt, cfg=cfg)
  cache = qwen3_5.init_decode_cache(cfg, B, G, T, prefix)
  step_logits = [jnp.broadcast_to(first[:, None], (B, G, cfg.vocab_size))]
  for t in range(T - 1):
    logits, cache = _decode(params, prefix, cache, completion[:, :, t], jnp.int32(t), cfg=cfg)
    step_logits.append(logits)
  cached = jnp.stack(step_logits, axis=2)  # [B, G, T, V]

  full_tokens = jnp.concatenate(
      [jnp.broadcast_to(prompt[:, None], (B, G, P)), completion], axis=-1).reshape(B * G, P + T)
  full = _forward(params, full_tokens, cfg=cfg).reshape(B, G, P + T, -1)[:, :, P - 1:P + T - 1]
  np.testing.assert_allclose(cached, full, atol=1e-4, rtol=1e-4)
  shared = _completion(params, prompt, None, completion, cfg=cfg)
  np.testing.assert_allclose(shared, full, atol=1e-4, rtol=1e-4)


def test_left_padding_matches_unpadded():
  params = _params()
  rng = np.random.default_rng(1)
  prompt = rng.integers(1, CFG.vocab_size, (1, 6))
  completion = jnp.asarray(rng.integers(0, CFG.vocab_size, (1, 2, 4)), jnp.int32)
  padded = np.concatenate([rng.integers(1, CFG.vocab_size, (1, 3)), prompt], axis=1)
  mask = np.concatenate([np.zeros((1, 3), bool), np.ones((1, 6), bool)], axis=1)
  a = _completion(params, jnp.asarray(prompt, jnp.int32), None, completion, cfg=CFG)
  b = _completion(params, jnp.asarray(padded, jnp.int32), jnp.asarray(mask), completion, cfg=CFG)
  np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_prefix_sharing_gradients_equal_repeated_prompt_and_remat():
  """Gradients through the shared prompt state (DeltaNet state and conv window, attention
  keys) equal those of G repeated full sequences; remat changes nothing."""
  cfg = dataclasses.replace(CFG, num_layers=2, layer_types=CFG.layer_types[:2])
  params = _params(cfg)
  B, G, P, T = 2, 2, 5, 4
  rng = np.random.default_rng(2)
  prompt = jnp.asarray(rng.integers(0, CFG.vocab_size, (B, P)), jnp.int32)
  completion = jnp.asarray(rng.integers(0, CFG.vocab_size, (B, G, T)), jnp.int32)
  weights = jnp.asarray(rng.normal(size=(B, G, T)), jnp.float32)
  logp = lambda logits: jnp.take_along_axis(jax.nn.log_softmax(logits), completion[..., None],
                                            -1)[..., 0]

  def shared_loss(p, cfg=cfg):
    return jnp.sum(logp(qwen3_5.completion_logits(p, prompt, None, completion, cfg)) * weights)

  def repeated_loss(p):
    full = jnp.concatenate([jnp.broadcast_to(prompt[:, None], (B, G, P)), completion], -1)
    logits = qwen3_5.forward(p, full.reshape(B * G, P + T), cfg).reshape(B, G, P + T, -1)
    return jnp.sum(logp(logits[:, :, P - 1:P + T - 1]) * weights)

  la, ga = jax.jit(jax.value_and_grad(shared_loss))(params)
  lb, gb = jax.jit(jax.value_and_grad(repeated_loss))(params)
  remat = dataclasses.replace(cfg, remat="full")
  gc = jax.jit(jax.grad(lambda p: shared_loss(p, remat)))(params)
  np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-4)
  for x, y, z in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), jax.tree.leaves(gc)):
    np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(z, x, rtol=1e-4, atol=1e-5)


def test_period_and_bad_configs():
  assert qwen3_5._period(("a", "a", "b") * 3) == 3
  assert qwen3_5._period(("a", "b", "b")) == 3
  with pytest.raises(ValueError, match="layer_types"):
    dataclasses.replace(CFG, layer_types=("linear_attention",) * 3)
  with pytest.raises(ValueError, match="linear_num_value_heads"):
    dataclasses.replace(CFG, linear_num_key_heads=3)


@pytest.mark.parametrize("constrained", [True, False])
def test_rollout_logprobs_equal_teacher_forced(constrained):
  """rollout.sample on a Qwen3.5 (shared prefix: the prompt's DeltaNet state copied into
  each of the G samples) reports the log-probs rollout_logprobs recomputes teacher-forced
  (chunked form over the completions), with a left-padded prompt in the batch."""
  from fgrpo_jax import rollout
  from fgrpo_jax.data import prompts
  builder = prompts.ItemTokenPrompts(num_items=30)
  layout = builder.layout(4, 2)
  if not constrained:
    layout = dataclasses.replace(layout, constrained=False, max_new_tokens=layout.length + 2)
  cfg = dataclasses.replace(CFG, vocab_size=builder.vocab_size)
  params = _params(cfg)
  rng = np.random.default_rng(0)
  history = rng.integers(0, 30, (2, 5))
  history[0, :2] = -1  # left padding
  pool = np.stack([rng.permutation(30)[:6] for _ in range(2)])
  batch = {k: jnp.asarray(v) for k, v in builder.build(history, pool).items()}
  ro = rollout.sample(params, batch, jax.random.key(1), cfg=cfg, layout=layout, group_size=3)
  lp, _ = jax.jit(rollout.rollout_logprobs, static_argnames=("cfg", "layout"))(
      params, batch, ro, cfg=cfg, layout=layout)
  np.testing.assert_allclose(ro.logprobs, lp, atol=2e-5, rtol=1e-5)
  assert np.asarray(ro.logprobs).min() < -0.1  # not all forced or certain
