"""RL that measurably learns: the jitted RL steps raise the reward they are given.

From a fixed initialisation, on a small task whose reward-maximising slate and
ranking are known, a few dozen steps of steps_lib.rl_step (F-GRPO, GRPO) and
steps_lib.decoupled_step must raise the mean sampled reward of each phase by a stated
margin. The same test run with the advantages' sign flipped, or with a learning
rate of 0 (the update skipped), must not: so a no-op or sign-flipped RL stage
cannot pass, which `test_tiny_run_beats_popularity_and_random` alone would allow
(SFT clears it by itself).

Also here: the learning-rate schedule spans every optimizer update of a stage
(rl.steps x rl.inner_steps), the budget rule of the baselines, and the per-step
credit-assignment diagnostics against plain numpy.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import recsys
from fgrpo_jax import config as config_lib
from fgrpo_jax import objectives
from fgrpo_jax import parse
from fgrpo_jax import rewards as R
from fgrpo_jax import rollout
from fgrpo_jax import steps as steps_lib
from fgrpo_jax import train
from fgrpo_jax.models import llama

# The task: 8 prompts, pools of C = 8 candidate tokens drawn from ids 8..55, slate
# k = 3, ranking m = 2. Token GOOD[0] has relevance 2 and GOOD[1] relevance 1 in every
# pool that holds them (each pool holds both, at random slots); the rest 0. The best
# slate holds both, the best ranking is [GOOD[0], GOOD[1]]: R_gen = R_rank = 1.
GOOD = (8, 9)
B, C, P, K, M, G = 8, 8, 6, 3, 2, 8
STEPS = 30
LR = 3e-2
# Margins on the mean sampled reward, last 5 steps vs the first 5 (measured with the
# seeds below: F-GRPO +0.26 R_gen / +0.38 R_rank, GRPO +0.31 / +0.42, decoupled
# +0.35 / +0.45; flipped signs -0.17 to -0.20 / -0.07 to -0.08; lr 0 moves neither).
MARGIN = 0.15


def _task():
  rng = np.random.default_rng(0)
  cands = np.stack([np.concatenate([GOOD, rng.choice(np.arange(10, 56), C - 2, replace=False)])
                    for _ in range(B)])
  cands = rng.permuted(cands, axis=1).astype(np.int32)
  relevance = np.where(cands == GOOD[0], 2.0, np.where(cands == GOOD[1], 1.0, 0.0))
  batch = {"prompt": rng.integers(10, 56, (B, P)).astype(np.int32),
           "prompt_mask": np.ones((B, P), bool), "cand_tokens": cands,
           "pool_mask": np.ones((B, C), bool), "relevance": relevance.astype(np.float32)}
  cfg = llama.ModelConfig(vocab_size=64, num_layers=1, hidden=32, num_heads=4, num_kv_heads=2,
                          head_dim=8, mlp_hidden=64)
  layout = rollout.Layout(slate_size=K, rank_size=M, mid_tags=(60, 61), end_tags=(62,))
  return cfg, layout, jax.tree.map(jnp.asarray, batch)


def _settings(algorithm, **kw):
  kw = {"lam": 1.0, "inner_steps": 1, **kw}  # one update per step: the smallest program
  return steps_lib.RLSettings(
      algorithm=algorithm, group_size=G, temperature=1.0, coverage="recall", rank_metric="ndcg",
      gain="exp", advantage="mean", loss=objectives.PolicyLossConfig(), **kw)


def _train_rewards(algorithm, lr, settings=None):
  """Mean sampled (R_gen, R_rank) per step over STEPS steps from a fixed init."""
  jax.clear_caches()  # a monkeypatched advantage must be traced anew
  cfg, layout, batch = _task()
  settings = settings or _settings(algorithm)
  optimizer = optax.adam(lr)
  params = llama.init_params(cfg, jax.random.key(0))
  if algorithm == "decoupled":
    params = {"selector": params, "ranker": jax.tree.map(jnp.copy, params)}
    opt_state = {r: optimizer.init(p) for r, p in params.items()}
    step_fn = steps_lib.decoupled_step
    # The decoupled step trains each policy on half the prompts: give it the batch
    # twice so that both halves are the whole task.
    batch = jax.tree.map(lambda x: jnp.concatenate([x, x]), batch)
  else:
    opt_state = optimizer.init(params)
    step_fn = steps_lib.rl_step
  state = steps_lib.TrainState(params, opt_state, jnp.zeros((), jnp.int32))
  key = jax.random.key(1)
  compiled = step_fn.lower(state, None, batch, key, cfg=cfg, layout=layout, optimizer=optimizer,
                           settings=settings).compile()
  history = []
  for i in range(STEPS):
    state, metrics = compiled(state, None, batch, jax.random.fold_in(key, i))
    history.append((float(metrics["reward_gen_mean"]), float(metrics["reward_rank_mean"])))
  return np.asarray(history)


def _gain(history):
  return history[-5:].mean(0) - history[:5].mean(0)


@pytest.fixture
def flipped_advantages(monkeypatch):
  original = R.group_advantages
  monkeypatch.setattr(R, "group_advantages", lambda *a, **k: -original(*a, **k))
  yield
  jax.clear_caches()


@pytest.mark.parametrize("algorithm", ["fgrpo", "grpo", "decoupled"])
def test_rl_raises_each_phase_reward(algorithm):
  d_gen, d_rank = _gain(_train_rewards(algorithm, LR))
  print(f"{algorithm}: R_gen {d_gen:+.3f} R_rank {d_rank:+.3f}")
  # GRPO has one joint reward; both of its phases still improve on this task.
  assert d_gen > MARGIN and d_rank > MARGIN


@pytest.mark.parametrize("algorithm", ["fgrpo", "grpo", "decoupled"])
def test_flipped_advantage_sign_does_not_learn(algorithm, flipped_advantages):
  d_gen, d_rank = _gain(_train_rewards(algorithm, LR))
  print(f"{algorithm} flipped: R_gen {d_gen:+.3f} R_rank {d_rank:+.3f}")
  assert d_gen < MARGIN / 2 and d_rank < MARGIN / 2


def test_skipped_update_does_not_learn():
  d = _gain(_train_rewards("fgrpo", 0.0))
  assert np.all(np.abs(d) < MARGIN / 2), d


def test_slate_rank_ideal_and_joint_norm_still_learn():
  """The ablation settings of the loss take the same path and still learn."""
  s = _settings("fgrpo", rank_ideal="slate", loss_norm="joint")
  d_gen, d_rank = _gain(_train_rewards("fgrpo", LR, s))
  assert d_gen > MARGIN and d_rank > MARGIN


# ----------------------------------------------------------------------------
# The schedule counts optimizer updates; budgets of the baselines.


def _expected_lr(count, peak, end, warmup, total):
  """Plain-Python warmup + cosine schedule at an update count."""
  if count < warmup:
    return peak * count / warmup
  frac = min((count - warmup) / (total - warmup), 1.0)
  return end + (peak - end) * 0.5 * (1.0 + np.cos(np.pi * frac))


# decoupled takes the same stage_sizes and optimizer as fgrpo (test_baseline_budgets...);
# the end-to-end check runs the RL stage and the SFT continuation (its inner updates).
@pytest.mark.parametrize("algorithm", ["fgrpo", "sft"])
def test_schedule_spans_every_optimizer_update(tmp_path, algorithm):
  c = recsys.get_config("tiny")
  c.algorithm = algorithm
  c.sft.steps = 0
  c.rl.update(steps=4, inner_steps=3, lr=1e-3)
  c.optim.warmup_steps = 2
  c.log_every = 1
  c.eval.update(every=0, test_examples=16, val_examples=16, batch_size=16)
  c.data.num_users = 100
  train.run(c, str(tmp_path), log=lambda *_: None)
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  stage = config_lib.main_stage(algorithm)
  rows = [r for r in rows if r["stage"] == stage and "lr" in r]
  total = c.rl.steps * c.rl.inner_steps
  assert [r["opt_updates"] for r in rows] == [3, 6, 9, 12]
  peak, end = c.rl.lr, c.rl.lr * c.optim.final_lr_frac
  for r in rows:
    np.testing.assert_allclose(r["lr"], _expected_lr(r["opt_updates"], peak, end, 2, total),
                               rtol=1e-5)
  assert rows[-1]["lr"] == pytest.approx(end, rel=1e-6)
  # Half way through the updates the rate is still well above the floor (the old
  # schedule, built for rl.steps updates, had reached it by then).
  assert rows[1]["lr"] > 2 * end


def test_baseline_budgets_follow_the_rule():
  c = recsys.get_config("default")
  rl = config_lib.stage_sizes("rl", c)
  more = config_lib.stage_sizes("sft_more", c)
  G = c.rollout.group_size
  assert rl.batch_size * G == more.batch_size  # sampled rollouts == gold sequences
  assert rl.updates == more.updates == c.rl.steps * c.rl.inner_steps
  assert rl.lr == more.lr == c.rl.lr


def test_decoupled_samples_the_same_number_of_sequences():
  """Count the sequences decoupled_step samples (rollout.sample calls) vs rl_step."""
  cfg, layout, batch = _task()
  params = llama.init_params(cfg, jax.random.key(0))
  optimizer = optax.sgd(0.0)
  counted = {}
  original = rollout.sample

  def counting(*args, group_size, **kw):
    ro = original(*args, group_size=group_size, **kw)
    counted[len(counted)] = int(np.prod(ro.tokens.shape[:2]))
    return ro

  def sequences(step_fn, p, opt_state):
    counted.clear()
    jax.clear_caches()  # trace anew, through the counting sampler
    state = steps_lib.TrainState(p, opt_state, jnp.zeros((), jnp.int32))
    jax.eval_shape(lambda st, b, k: step_fn(st, None, b, k, cfg=cfg, layout=layout,
                                             optimizer=optimizer,
                                             settings=_settings("fgrpo", inner_steps=1)),
                   state, batch, jax.random.key(0))
    return sum(counted.values())

  pytest.MonkeyPatch().setattr(rollout, "sample", counting)
  try:
    one = sequences(steps_lib.rl_step, params, optimizer.init(params))
    pair = {"selector": params, "ranker": params}
    two = sequences(steps_lib.decoupled_step, pair, {r: optimizer.init(p) for r, p in pair.items()})
  finally:
    rollout.sample = original
  assert one == B * G and two == one


# ----------------------------------------------------------------------------
# Loss normalisation and diagnostics.


def test_loss_groups_do_not_depend_on_the_algorithm():
  for norm in ("phase", "joint"):
    f = steps_lib.loss_groups(_settings("fgrpo", loss_norm=norm))
    g = steps_lib.loss_groups(_settings("grpo", loss_norm=norm))
    assert f == g


def test_joint_norm_is_one_mean_with_lambda_on_rank_tokens():
  rng = np.random.default_rng(0)
  phase_ids = jnp.asarray(rng.choice([0, 1, 2, 3], (2, 4, 9)).astype(np.int32))
  r_gen, r_rank = (jnp.asarray(rng.random((2, 4)), jnp.float32) for _ in range(2))
  lp = jnp.asarray(rng.normal(size=(2, 4, 9)), jnp.float32)
  lam = 0.5
  s = _settings("fgrpo", loss_norm="joint", lam=lam)
  token_adv, _, ids = steps_lib.rl_advantages(r_gen, r_rank, jnp.ones((2, 4), bool), phase_ids, s)
  loss, _ = objectives.clipped_surrogate(lp, lp, token_adv, ids, steps_lib.loss_groups(s),
                                         objectives.PolicyLossConfig())
  # Reference: ratio 1, so the surrogate is the advantage itself.
  a_gen = np.asarray(r_gen) - np.asarray(r_gen).mean(-1, keepdims=True)
  a_rank = np.asarray(r_rank) - np.asarray(r_rank).mean(-1, keepdims=True)
  ids_np = np.asarray(phase_ids)
  total = (np.sum(np.where(ids_np == 1, a_gen[..., None], 0))
           + lam * np.sum(np.where(ids_np == 2, a_rank[..., None], 0)))
  np.testing.assert_allclose(float(loss), -total / np.isin(ids_np, (1, 2)).sum(), rtol=1e-5)
  # Phase normalisation of the same advantages: mean over each phase, lam on rank.
  s = dataclasses.replace(s, loss_norm="phase")
  token_adv, _, ids = steps_lib.rl_advantages(r_gen, r_rank, jnp.ones((2, 4), bool), phase_ids, s)
  loss, _ = objectives.clipped_surrogate(lp, lp, token_adv, ids, steps_lib.loss_groups(s),
                                         objectives.PolicyLossConfig())
  expected = (np.sum(np.where(ids_np == 1, a_gen[..., None], 0)) / (ids_np == 1).sum()
              + lam * np.sum(np.where(ids_np == 2, a_rank[..., None], 0)) / (ids_np == 2).sum())
  np.testing.assert_allclose(float(loss), -expected, rtol=1e-5)


def test_undefined_rank_rewards_leave_the_rank_loss():
  phase_ids = jnp.asarray(np.tile(np.array([1, 1, 3, 2, 2], np.int32), (1, 4, 1)))
  r_gen = jnp.asarray([[0.0, 1.0, 1.0, 0.0]])
  r_rank = jnp.asarray([[0.0, 1.0, 0.5, 0.0]])
  ok = jnp.asarray([[False, True, True, False]])
  token_adv, adv, ids = steps_lib.rl_advantages(r_gen, r_rank, ok, phase_ids,
                                            _settings("fgrpo", rank_ideal="slate"))
  np.testing.assert_allclose(adv["adv_rank"], [[0.0, 0.25, -0.25, 0.0]])
  ids = np.asarray(ids)
  assert np.all(ids[0, [0, 3]][:, 3:] == R.PHASE_NONE)  # left out of the rank loss
  assert np.all(ids[0, [1, 2]][:, 3:] == R.PHASE_RANK)
  # GRPO keeps every token: its joint reward counts an undefined R_rank as 0.
  _, _, ids = steps_lib.rl_advantages(r_gen, r_rank, ok, phase_ids,
                                  _settings("grpo", rank_ideal="slate"))
  np.testing.assert_array_equal(ids, phase_ids)


def test_group_diagnostics_match_numpy():
  rng = np.random.default_rng(3)
  r_gen = (rng.random((6, 8)) < 0.5).astype(np.float32)
  r_gen[0] = 1.0  # a group with no slate signal
  r_rank = np.clip(r_gen * rng.random((6, 8)) + 0.1 * rng.random((6, 8)), 0, 1).astype(np.float32)
  ok = np.ones((6, 8), bool)
  d = steps_lib.group_diagnostics(jnp.asarray(r_gen), jnp.asarray(r_rank), jnp.asarray(ok),
                              _settings("grpo"))
  a_gen = r_gen - r_gen.mean(-1, keepdims=True)
  a_rank = r_rank - r_rank.mean(-1, keepdims=True)
  np.testing.assert_allclose(d["adv_gen_var"], a_gen.var(-1).mean(), rtol=1e-5)
  np.testing.assert_allclose(d["adv_rank_var"], a_rank.var(-1).mean(), rtol=1e-5)
  assert float(d["zero_gen_groups"]) == pytest.approx(1 / 6)
  corrs = [np.corrcoef(g, r)[0, 1] for g, r in zip(r_gen, r_rank) if g.std() > 0 and r.std() > 0]
  np.testing.assert_allclose(d["reward_corr"], np.mean(corrs), rtol=1e-4)
  assert float(d["corr_groups"]) == pytest.approx(len(corrs) / 6)


@pytest.mark.parametrize("rank_metric,rank_k", [("hit", 1), ("ndcg", 2), ("mrr", 0)])
def test_rank_reward_cut_off_matches_plain_python(rank_metric, rank_k):
  """reward.rank_k: R_rank counts only the first rank_k ranked items (0 = all m)."""
  rng = np.random.default_rng(5)
  B, C, k, m = 4, 9, 5, 3
  slates = np.stack([np.stack([rng.permutation(C)[:k] for _ in range(G)]) for _ in range(B)])
  rankings = np.stack([np.stack([rng.permutation(s)[:m] for s in row]) for row in slates])
  relevance = (rng.random((B, C)) < 0.3).astype(np.float32)
  relevance[:, 0] = 1.0  # every pool has a relevant item
  ro = rollout.Rollout(tokens=None, choices=None, phase_ids=None, logprobs=None,
                       slate=jnp.asarray(slates), ranking=jnp.asarray(rankings),
                       errors={n: jnp.zeros((B, G), bool) for n in parse.ERRORS})
  s = dataclasses.replace(_settings("fgrpo", rank_k=rank_k), rank_metric=rank_metric)
  _, r_rank, _ = steps_lib.rollout_rewards(ro, jnp.asarray(relevance), s, m)
  cut = rank_k or m

  def plain(ranking, rel):
    top = [int(i) for i in ranking[:cut]]
    if rank_metric == "hit":
      return float(any(rel[i] > 0 for i in top))
    if rank_metric == "mrr":
      return next((1.0 / (p + 1) for p, i in enumerate(top) if rel[i] > 0), 0.0)
    dcg = sum((2 ** rel[i] - 1) / np.log2(p + 2) for p, i in enumerate(top))
    ideal = sorted(rel, reverse=True)[:cut]
    return dcg / sum((2 ** g - 1) / np.log2(p + 2) for p, g in enumerate(ideal))

  want = [[plain(rankings[b, g], relevance[b]) for g in range(G)] for b in range(B)]
  np.testing.assert_allclose(np.asarray(r_rank), want, rtol=1e-5)


@pytest.mark.parametrize("value", [-1, 6])
def test_rank_cut_off_beyond_the_ranking_is_a_config_error(value):
  c = recsys.get_config("tiny")
  c.reward.rank_k = value
  with pytest.raises(config_lib.ConfigError, match=r"^config.reward.rank_k="):
    config_lib.validate_config(c)
