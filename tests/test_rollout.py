"""Tests for fgrpo_jax/rollout.py: constrained two-phase sampling and teacher forcing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgrpo_jax import rewards as R
from fgrpo_jax import rollout
from fgrpo_jax.data import prompts
from fgrpo_jax.models import llama

NUM_ITEMS, C, K, M = 30, 8, 5, 3
BUILDER = prompts.ItemTokenPrompts(num_items=NUM_ITEMS)
LAYOUT = BUILDER.layout(K, M)
CFG = llama.ModelConfig(vocab_size=BUILDER.vocab_size, num_layers=2, hidden=32, num_heads=4,
                        num_kv_heads=2, head_dim=8, mlp_hidden=64)


def _batch(B=3, H=4, seed=0, pool_holes=False):
  rng = np.random.default_rng(seed)
  history = rng.integers(0, NUM_ITEMS, (B, H))
  history[0, :2] = -1  # a short, left-padded history
  pool = np.stack([rng.permutation(NUM_ITEMS)[:C] for _ in range(B)])
  if pool_holes:
    pool[:, -1] = -1  # one empty slot per pool: never choosable
  return {k: jnp.asarray(v) for k, v in BUILDER.build(history, pool).items()}


def _params(seed=0):
  params = llama.init_params(CFG, jax.random.key(seed))
  return jax.tree.map(lambda p: p * 5.0 if p.ndim > 1 else p, params)  # peaky logits


def test_layout_schedule():
  assert LAYOUT.length == K + 2 + M + 1
  assert list(LAYOUT.phase_ids[:K]) == [R.PHASE_GEN] * K
  assert list(LAYOUT.phase_ids[K:K + 2]) == [R.PHASE_TAG] * 2
  assert list(LAYOUT.phase_ids[K + 2:K + 2 + M]) == [R.PHASE_RANK] * M
  assert LAYOUT.phase_ids[-1] == R.PHASE_TAG
  with pytest.raises(ValueError, match="rank size"):
    rollout.Layout(slate_size=3, rank_size=4, mid_tags=(1,), end_tags=(2,))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_teacher_forced(temperature):
  params, batch = _params(), _batch()
  ro = rollout.sample(params, batch, jax.random.key(1), cfg=CFG, layout=LAYOUT, group_size=4,
                      temperature=temperature)
  # Jitted: one compile instead of one per eager op.
  lp, ent = jax.jit(functools.partial(rollout.sequence_logprobs, cfg=CFG, layout=LAYOUT,
                                      temperature=temperature))(params, batch, ro.choices)
  np.testing.assert_allclose(ro.logprobs, lp, atol=1e-5, rtol=1e-5)
  tags = np.asarray(ro.phase_ids) == R.PHASE_TAG
  assert np.all(np.asarray(ro.logprobs)[tags] == 0)
  assert np.all(np.asarray(ent)[~tags] > 0)
  # Tokens are the named candidates at choice steps and the forced tags elsewhere.
  np.testing.assert_array_equal(
      ro.tokens, rollout.tokens_from_choices(ro.choices, batch["cand_tokens"], LAYOUT))
  np.testing.assert_array_equal(np.asarray(ro.tokens)[..., K:K + 2],
                                np.broadcast_to([prompts.SLATE_END, prompts.RANK], (3, 4, 2)))


def test_slates_distinct_and_rankings_within_slate_over_many_seeds():
  params = _params()
  for seed in range(12):
    batch = _batch(seed=seed, pool_holes=seed % 2 == 1)
    ro = rollout.sample(params, batch, jax.random.key(seed), cfg=CFG, layout=LAYOUT,
                        group_size=8)
    slate, ranking = np.asarray(ro.slate), np.asarray(ro.ranking)
    pool_mask = np.asarray(batch["pool_mask"])
    for b in range(slate.shape[0]):
      for g in range(slate.shape[1]):
        s, r = slate[b, g], ranking[b, g]
        assert len(set(s.tolist())) == K, s
        assert all(pool_mask[b, c] for c in s)
        assert len(set(r.tolist())) == M and set(r.tolist()) <= set(s.tolist())
    assert np.all(np.asarray(R.format_validity(ro.slate, ro.ranking, C,
                                               batch["pool_mask"][:, None])) == 1)


def test_samples_differ_across_group_and_greedy_is_argmax():
  params, batch = _params(), _batch()
  ro = rollout.sample(params, batch, jax.random.key(3), cfg=CFG, layout=LAYOUT, group_size=8)
  assert len({tuple(x) for x in np.asarray(ro.slate[0]).tolist()}) > 1
  greedy = rollout.sample(params, batch, jax.random.key(4), cfg=CFG, layout=LAYOUT,
                          group_size=2, greedy=True)
  np.testing.assert_array_equal(greedy.choices[:, 0], greedy.choices[:, 1])
  # Greedy picks the most likely allowed slot at each step under teacher forcing.
  lp_all = _all_slot_logprobs(params, batch, greedy.choices[:, :1])
  chosen = np.asarray(greedy.choices[:, 0])
  steps = chosen >= 0
  best = np.argmax(lp_all, axis=-1)
  np.testing.assert_array_equal(best[steps], chosen[steps])


def _all_slot_logprobs(params, batch, choices):
  tokens = rollout.tokens_from_choices(choices, batch["cand_tokens"], LAYOUT)
  logits = llama.completion_logits(params, batch["prompt"], batch["prompt_mask"], tokens, CFG)
  allowed = rollout.allowed_masks(choices, LAYOUT, batch["pool_mask"][:, None])
  cand = jnp.broadcast_to(batch["cand_tokens"][:, None, None], allowed.shape)
  cl = jnp.take_along_axis(logits, cand, -1)
  return np.asarray(jnp.where(allowed, cl, -jnp.inf))[:, 0]


def test_sampling_frequencies_match_model_distribution():
  """The first slate choice is drawn from the constrained softmax."""
  params, batch = _params(seed=1), _batch(B=1)
  G = 4096
  ro = rollout.sample(params, batch, jax.random.key(5), cfg=CFG, layout=LAYOUT, group_size=G)
  first = np.asarray(ro.choices[0, :, 0])
  freq = np.bincount(first, minlength=C) / G
  probs = np.exp(np.asarray(ro.logprobs[0, :, 0]))
  expected = np.zeros(C)
  expected[first] = probs  # each sample carries its own probability
  np.testing.assert_allclose(freq, expected, atol=0.03)


def test_choices_round_trip_and_allowed_masks():
  slate = jnp.array([[3, 1, 4, 0, 6]])
  ranking = jnp.array([[4, 3, 0]])
  choices = rollout.choices_from_slate_ranking(slate, ranking, LAYOUT)
  assert choices.shape == (1, LAYOUT.length)
  allowed = np.asarray(rollout.allowed_masks(choices, LAYOUT, jnp.ones((1, C), bool)))[0]
  assert allowed[0].all()  # first slate step: anything in the pool
  assert not allowed[1, 3] and allowed[1, 1]
  assert not allowed[K].any()  # forced tag
  first_rank = K + 2
  assert set(np.nonzero(allowed[first_rank])[0]) == {3, 1, 4, 0, 6}
  assert set(np.nonzero(allowed[first_rank + 1])[0]) == {3, 1, 0, 6}
