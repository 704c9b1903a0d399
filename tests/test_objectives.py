"""Tests for fgrpo_jax/objectives.py: per-phase advantages and the clipped surrogate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgrpo_jax import objectives as O
from fgrpo_jax import rewards as R
from fgrpo_jax import rollout
from fgrpo_jax.data import prompts
from fgrpo_jax.models import llama

B, G = 3, 4
LAYOUT = prompts.ItemTokenPrompts(num_items=20).layout(4, 2)
T = LAYOUT.length
PHASES = jnp.broadcast_to(jnp.asarray(LAYOUT.phase_ids), (B, G, T))


def _rand(seed, shape=(B, G)):
  return jnp.asarray(np.random.default_rng(seed).random(shape), jnp.float32)


@pytest.mark.parametrize("mode", ["mean", "std", "rloo"])
def test_fgrpo_advantages_sum_to_zero_per_group_and_phase(mode):
  r_gen, r_rank = _rand(0), _rand(1)
  token_adv, adv = O.fgrpo_advantages(r_gen, r_rank, PHASES, mode=mode)
  np.testing.assert_allclose(adv["adv_gen"].sum(-1), 0, atol=1e-5)
  np.testing.assert_allclose(adv["adv_rank"].sum(-1), 0, atol=1e-5)
  ta = np.asarray(token_adv)
  ph = np.asarray(PHASES)
  # Each phase's tokens carry that phase's advantage, tags carry nothing.
  np.testing.assert_allclose(ta[..., 0], adv["adv_gen"])
  np.testing.assert_allclose(ta[..., LAYOUT.rank_positions[0]], adv["adv_rank"])
  assert np.all(ta[ph == R.PHASE_TAG] == 0)
  # Per phase and group, the token advantages (one per sequence) sum to zero.
  for p in (R.PHASE_GEN, R.PHASE_RANK):
    col = np.nonzero(LAYOUT.phase_ids == p)[0][0]
    np.testing.assert_allclose(ta[..., col].sum(-1), 0, atol=1e-5)


def test_grpo_uses_one_joint_advantage():
  r_gen, r_rank = _rand(2), _rand(3)
  token_adv, adv = O.grpo_advantages(r_gen, r_rank, PHASES, lam=0.5)
  joint = r_gen + 0.5 * r_rank
  expected = joint - joint.mean(-1, keepdims=True)
  np.testing.assert_allclose(adv["adv_joint"], expected, atol=1e-6)
  np.testing.assert_allclose(token_adv[..., 0], token_adv[..., LAYOUT.rank_positions[0]])


def _reference_surrogate(lp, old, adv, phases, groups, eps_low, eps_high):
  """Plain numpy reference of the per-group token-mean clipped objective."""
  lp, old, adv, phases = map(np.asarray, (lp, old, adv, phases))
  total = 0.0
  for ids, w in groups:
    mask = np.isin(phases, ids)
    ratio = np.exp(lp - old)
    s = np.minimum(ratio * adv, np.clip(ratio, 1 - eps_low, 1 + eps_high) * adv)
    total += w * s[mask].sum() / mask.sum()
  return -total


@pytest.mark.parametrize("groups", [O.fgrpo_groups(1.0), O.fgrpo_groups(0.25), O.JOINT_GROUPS])
def test_clipped_surrogate_matches_reference(groups):
  rng = np.random.default_rng(4)
  lp = jnp.asarray(rng.normal(size=(B, G, T)) * 0.3, jnp.float32)
  old = jnp.asarray(rng.normal(size=(B, G, T)) * 0.3, jnp.float32)
  adv = R.token_advantages(PHASES, {R.PHASE_GEN: _rand(5) - 0.5, R.PHASE_RANK: _rand(6) - 0.5})
  cfg = O.PolicyLossConfig(eps_low=0.2, eps_high=0.28)
  loss, m = O.clipped_surrogate(lp, old, adv, PHASES, groups, cfg)
  np.testing.assert_allclose(loss, _reference_surrogate(lp, old, adv, PHASES, groups, 0.2, 0.28),
                             rtol=1e-5)
  assert 0 < float(m["clip_frac"]) < 1


def test_gradient_ignores_prompt_and_forced_tokens():
  rng = np.random.default_rng(7)
  old = jnp.asarray(rng.normal(size=(B, G, T)) * 0.1, jnp.float32)
  adv = jnp.asarray(rng.normal(size=(B, G, T)), jnp.float32)  # nonzero even on tags
  cfg = O.PolicyLossConfig()
  for ratio in ("token", "phase"):
    cfg = O.PolicyLossConfig(ratio=ratio, kl_coef=0.1)
    grad = jax.grad(lambda lp: O.clipped_surrogate(lp, old, adv, PHASES, O.fgrpo_groups(1.0),
                                                   cfg, ref_logprobs=old)[0])(old + 0.05)
    tags = np.asarray(PHASES) == R.PHASE_TAG
    assert np.all(np.asarray(grad)[tags] == 0)
    assert np.all(np.abs(np.asarray(grad)[~tags]) > 0)


def test_policy_gradient_through_the_model_ignores_tag_advantages():
  """Advantages placed on forced tags or prompts change nothing in the parameter gradient."""
  builder = prompts.ItemTokenPrompts(num_items=20)
  cfg = llama.ModelConfig(vocab_size=builder.vocab_size, num_layers=1, hidden=16, num_heads=2,
                          num_kv_heads=1, head_dim=8, mlp_hidden=32)
  params = llama.init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(8)
  batch = {k: jnp.asarray(v) for k, v in builder.build(
      rng.integers(0, 20, (B, 3)), np.stack([rng.permutation(20)[:6] for _ in range(B)])).items()}
  ro = rollout.sample(params, batch, jax.random.key(1), cfg=cfg, layout=LAYOUT, group_size=G)
  adv = R.token_advantages(ro.phase_ids, {R.PHASE_GEN: _rand(9) - 0.5,
                                          R.PHASE_RANK: _rand(10) - 0.5})
  noisy = jnp.where(ro.phase_ids == R.PHASE_TAG, 100.0, adv)

  @jax.jit  # one compiled program for both advantages (eagerly: ~230 op-by-op compiles)
  def grads(token_adv):
    def loss(p):
      lp, _ = rollout.sequence_logprobs(p, batch, ro.choices, cfg=cfg, layout=LAYOUT)
      return O.clipped_surrogate(lp, ro.logprobs, token_adv, ro.phase_ids,
                                 O.fgrpo_groups(1.0), O.PolicyLossConfig())[0]
    return jax.grad(loss)(params)

  for a, b in zip(jax.tree.leaves(grads(adv)), jax.tree.leaves(grads(noisy))):
    np.testing.assert_array_equal(a, b)


def test_phase_ratio_is_one_per_sequence_and_phase():
  rng = np.random.default_rng(11)
  old = jnp.zeros((B, G, T))
  lp = jnp.asarray(rng.normal(size=(B, G, T)) * 0.01, jnp.float32)
  adv = jnp.ones((B, G, T))
  cfg = O.PolicyLossConfig(ratio="phase", eps_low=10.0, eps_high=10.0)
  loss, _ = O.clipped_surrogate(lp, old, adv, PHASES, O.fgrpo_groups(1.0), cfg)
  ph = np.asarray(PHASES)
  expected = 0.0
  for p in (R.PHASE_GEN, R.PHASE_RANK):
    mask = ph == p
    seq = np.exp((np.asarray(lp) * mask).sum(-1) / mask.sum(-1))  # [B, G]
    expected += seq.mean()
  np.testing.assert_allclose(loss, -expected, rtol=1e-5)


def test_kl_estimators():
  lp = jnp.log(jnp.array([0.2, 0.5, 0.9]))
  ref = jnp.log(jnp.array([0.3, 0.5, 0.6]))
  np.testing.assert_allclose(O.kl_penalty(lp, ref, "k1"), lp - ref, rtol=1e-6)
  k3 = O.kl_penalty(lp, ref, "k3")
  np.testing.assert_allclose(k3, jnp.exp(ref - lp) - (ref - lp) - 1, rtol=1e-6)
  assert np.all(np.asarray(k3) >= 0) and float(k3[1]) == 0.0
  with pytest.raises(ValueError, match="kl_estimator"):
    O.PolicyLossConfig(kl_estimator="k2")


def test_sft_loss_only_on_chosen_phases():
  lp = -jnp.arange(B * G * T, dtype=jnp.float32).reshape(B, G, T) / 10
  loss = O.sft_loss(lp, PHASES)
  mask = np.isin(np.asarray(PHASES), [R.PHASE_GEN, R.PHASE_RANK])
  np.testing.assert_allclose(loss, -np.asarray(lp)[mask].mean(), rtol=1e-6)
