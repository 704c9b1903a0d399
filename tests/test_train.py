"""End-to-end tests of fgrpo_jax/train.py and the entry point fgrpo_jax/main.py."""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import recsys
from fgrpo_jax import config as config_lib
from fgrpo_jax import objectives
from fgrpo_jax import rollout
from fgrpo_jax import steps as steps_lib
from fgrpo_jax.data import arrays as arrays_lib
from fgrpo_jax.errors import UserError
from fgrpo_jax.models import llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRIC_KEYS = ("hit@1", "hit@5", "ndcg@5", "recall@5", "slate_recall")


def _main(workdir, *overrides, config="configs/recsys.py:tiny"):
  cmd = [sys.executable, "-m", "fgrpo_jax.main", f"--config={config}", f"--workdir={workdir}",
         *overrides]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("tiny"))
  proc = _main(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "eval.json")) as f:
    return workdir, json.load(f), proc.stdout


def test_eval_json_contract(tiny_run):
  _, result, _ = tiny_run
  assert result["algorithm"] == "fgrpo" and result["split"] == "test"
  assert isinstance(result["task"], str)
  c = recsys.get_config("tiny")
  assert result["steps"] == c.sft.steps + c.rl.steps
  for block in [result["metrics"], result["oracle"], *result["references"].values()]:
    for key in METRIC_KEYS:
      assert isinstance(block[key], float) and 0.0 <= block[key] <= 1.0
  assert {"random", "popularity"} <= set(result["references"])


def test_every_stage_ends_with_a_validation(tiny_run):
  """eval.every = 0 (the tiny config's) still validates once, at the end of each stage:
  settings are chosen on validation, so a run without it could not be compared."""
  workdir, _, _ = tiny_run
  c = recsys.get_config("tiny")
  assert c.eval.every == 0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  val = [(r["stage"], r["step"]) for r in rows if "val_hit@1" in r]
  assert val == [("sft", c.sft.steps), ("rl", c.rl.steps)], val


def test_tiny_run_beats_popularity_and_random(tiny_run):
  _, result, _ = tiny_run
  hit1 = result["metrics"]["hit@1"]
  assert hit1 > result["references"]["popularity"]["hit@1"] + 0.02
  assert hit1 > result["references"]["random"]["hit@1"] + 0.1
  assert hit1 <= result["oracle"]["hit@1"] + 0.05  # nobody beats the Bayes oracle
  assert result["metrics"]["format_valid"] == 1.0


def test_console_and_tensorboard_output(tiny_run):
  workdir, _, stdout = tiny_run
  assert "[sft] step" in stdout and "[rl] step" in stdout and "ETA" in stdout
  events = [f for _, _, files in os.walk(workdir) for f in files if "tfevents" in f]
  assert events, "no TensorBoard event files in the workdir"


def test_rerun_resumes_and_eval_mode_reproduces(tiny_run):
  workdir, result, _ = tiny_run
  # Without TensorBoard (a field that does not change results: no config warning).
  proc = _main(workdir, "--config.tensorboard=False")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "config that differs" not in proc.stdout
  assert "[sft] resumed from step" in proc.stdout and "[rl] resumed from step" in proc.stdout
  assert "[sft] step 5/" not in proc.stdout  # nothing retrained
  with open(os.path.join(workdir, "eval.json")) as f:
    again = json.load(f)
  assert again["metrics"] == result["metrics"]
  proc = _main(workdir, "--config.mode=eval", "--config.tensorboard=False")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "eval.json")) as f:
    evaluated = json.load(f)
  assert evaluated["metrics"] == result["metrics"]


@pytest.mark.parametrize("override,field", [
    ("--config.rollout.slate_size=20", "slate_size"),  # k > C (tiny C = 8)
    ("--config.rollout.rank_size=6", "rank_size"),  # m > k
    ("--config.rollout.group_size=1", "group_size"),
    ("--config.algorithm=ppo", "algorithm"),
    ("--config.reward.advantage=median", "reward.advantage"),
    ("--config.data.num_targets=0", "data.num_targets"),  # raised by the data generator
])
def test_bad_config_is_one_clear_line(tmp_path, override, field):
  proc = _main(str(tmp_path), override)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith("error: config.") and field in lines[0], proc.stderr


def test_gold_choices_put_relevant_first():
  layout = rollout.Layout(slate_size=4, rank_size=2, mid_tags=(1, 2), end_tags=(3,))
  relevance = jnp.array([[0, 0, 1, 0, 0, 0.0], [0, 2, 0, 0, 1, 0]])
  pool_mask = jnp.array([[True] * 6, [True] * 5 + [False]])
  for seed in range(5):
    for order in ("relevant_first", "random"):
      choices = np.asarray(steps_lib.gold_choices(relevance, pool_mask, jax.random.key(seed),
                                                  layout, order))
      slate, ranking = choices[:, :4], choices[:, 6:8]
      assert ranking[0, 0] == 2 and list(ranking[1]) == [1, 4]
      assert 2 in slate[0] and {1, 4} <= set(slate[1].tolist()) and 5 not in slate[1]
      if order == "relevant_first":
        assert slate[0, 0] == 2 and list(slate[1, :2]) == [1, 4]
      for row in slate:
        assert len(set(row.tolist())) == 4
  # Random order puts the relevant candidate at every slate position over seeds.
  positions = {int(np.argmax(np.asarray(steps_lib.gold_choices(
      relevance, pool_mask, jax.random.key(s), layout))[0, :4] == 2)) for s in range(40)}
  assert positions == {0, 1, 2, 3}


def _reference_gold(relevance, pool_mask, k, m):
  """Plain Python: the slate holds the k best slots by relevance, the ranking its m best.

  Returns, per row, (the ranking's relevances, the slate's relevances best first)."""
  rows = []
  for rel, mask in zip(relevance.tolist(), pool_mask.tolist()):
    valid = sorted((r for r, ok in zip(rel, mask) if ok), reverse=True)
    rows.append((valid[:m], valid[:k]))
  return rows


@pytest.mark.parametrize("seed", range(6))
def test_gold_choices_follow_any_graded_relevance(seed):
  """Grades closer than 0.25 (the old `relevance * 4 + noise` broke them) and ties."""
  layout = rollout.Layout(slate_size=5, rank_size=3, mid_tags=(1, 2), end_tags=(3,))
  rng = np.random.default_rng(seed)
  relevance = rng.choice([0.0, 0.0, 0.0, 0.01, 0.05, 0.1, 0.1, 0.12, 0.9], size=(4, 12))
  pool_mask = np.ones((4, 12), bool)
  pool_mask[1, 9:] = False
  relevance[1, 9:] = 5.0  # padding never enters, whatever its relevance
  choices = np.asarray(steps_lib.gold_choices(jnp.asarray(relevance), jnp.asarray(pool_mask),
                                          jax.random.key(seed), layout))
  slate, ranking = choices[:, :5], choices[:, 7:10]
  for row, (want_rank, want_slate) in enumerate(_reference_gold(relevance, pool_mask, 5, 3)):
    assert relevance[row, ranking[row]].tolist() == want_rank
    assert sorted(relevance[row, slate[row]].tolist(), reverse=True) == want_slate
    assert pool_mask[row, slate[row]].all() and len(set(slate[row].tolist())) == 5
    assert set(ranking[row].tolist()) <= set(slate[row].tolist())


def test_gold_choices_unchanged_on_binary_relevance():
  """Same draws as the old `top_k(relevance * 4 + noise)` whenever grades are 0 / 1, so
  the committed one-target results reproduce."""
  layout = rollout.Layout(slate_size=4, rank_size=2, mid_tags=(1, 2), end_tags=(3,))
  relevance = jnp.asarray(np.random.default_rng(0).random((64, 9)) < 0.2, jnp.float32)
  pool_mask = jnp.ones((64, 9), bool)
  for seed in range(3):
    key = jax.random.key(seed)
    k_fill, k_order = jax.random.split(key)
    noise = jax.random.uniform(k_fill, relevance.shape)
    _, old_slate = jax.lax.top_k(relevance * 4.0 + noise, 4)
    perm = jnp.argsort(jax.random.uniform(k_order, old_slate.shape), axis=-1)
    want = rollout.choices_from_slate_ranking(jnp.take_along_axis(old_slate, perm, -1),
                                              old_slate[:, :2], layout)
    np.testing.assert_array_equal(steps_lib.gold_choices(relevance, pool_mask, key, layout), want)


def test_batch_indices_cover_epochs_and_are_pure():
  a = [arrays_lib.batch_indices(0, 1, s, 10, 4) for s in range(5)]
  b = [arrays_lib.batch_indices(0, 1, s, 10, 4) for s in range(5)]
  np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))
  first_epoch = np.concatenate(a)[:10]
  assert sorted(first_epoch.tolist()) == list(range(10))


def test_sigkill_after_first_checkpoint_then_resume_is_exact(tiny_run, tmp_path):
  """A run killed with SIGKILL and restarted ends with the uninterrupted run's metrics."""
  import signal
  import time
  _, uninterrupted, _ = tiny_run
  workdir = str(tmp_path / "killed")
  # Without TensorBoard: these runs start ~6 CPU s sooner (no TensorFlow import).
  cmd = [sys.executable, "-m", "fgrpo_jax.main", "--config=configs/recsys.py:tiny",
         f"--workdir={workdir}", "--config.tensorboard=False"]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  first = os.path.join(workdir, "ckpt", "sft", "5")
  deadline = time.time() + 300
  while not os.path.isdir(first) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL
  assert not os.path.exists(os.path.join(workdir, "eval.json"))
  resumed = _main(workdir, "--config.tensorboard=False")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert not [f for _, _, files in os.walk(workdir) for f in files if "tfevents" in f]
  assert "[sft] resumed from step" in resumed.stdout
  with open(os.path.join(workdir, "eval.json")) as f:
    assert json.load(f)["metrics"] == uninterrupted["metrics"]


# ----------------------------------------------------------------------------
# Gradient accumulation (config.optim.grad_accum) and mixed precision.
#
# Accumulation: microbatches of a lax.scan inside the jitted step give the full
# batch's loss and gradient. The updates use plain SGD (lr 1 for SFT, 0.5 for RL),
# so the updated parameters differ exactly by the gradient differences (Adam would
# turn a 1e-9 gradient into a +-lr step). Tolerance (float32, sums merely
# regrouped): losses and metrics 1e-5 relative + 1e-6 absolute, parameters 1e-5
# absolute (the largest gradient entries are ~1). SFT is checked with 2
# microbatches, RL with 4 (each compile costs seconds). Measured: losses within
# ~2e-7 relative, parameters within ~5e-7 (run with -s to see the differences).
#
# The steps compile with the session's XLA:CPU fast-compile flags (tests/conftest.py,
# through XLA_FLAGS); the tests compare programs, not compiler settings.

ACCUM_RTOL, ACCUM_ATOL, ACCUM_PARAM_ATOL = 1e-5, 1e-6, 1e-5
SGD_SFT, SGD_RL = optax.sgd(1.0), optax.sgd(0.5)  # static jit args: one object each


def _fast(jitted, *args, options=None, **static):
  """`jitted(*args, **static)`, compiled ahead of time (with extra XLA `options`)."""
  return jitted.lower(*args, **static).compile(options)(*args)


def _tiny_problem(B=8, with_identifiers=False):
  """A 1-layer model config with large random weights, a layout and B examples.

  with_identifiers: a longer prompt in which each candidate's identifier token stands
  after a word (twice for some, one missing in row 3), as in the QA prompts."""
  cfg = llama.ModelConfig(vocab_size=64, num_layers=1, hidden=32, num_heads=4, num_kv_heads=2,
                          head_dim=8, mlp_hidden=64)
  layout = rollout.Layout(slate_size=4, rank_size=2, mid_tags=(60, 61), end_tags=(62,))
  rng = np.random.default_rng(0)
  P, C = 6, 8
  prompt_mask = np.ones((B, P), bool)
  prompt_mask[1, :2] = False  # left padding
  pool_mask = np.ones((B, C), bool)
  pool_mask[2, -2:] = False
  # 0 to 4 relevant candidates per row: microbatches supervise different token counts,
  # so a mean of microbatch means would not be the batch mean.
  relevance = (np.arange(C)[None] < (np.arange(B) % 5)[:, None]).astype(np.float32)
  batch = {
      "prompt": rng.integers(0, 56, (B, P)).astype(np.int32),
      "prompt_mask": prompt_mask,
      "cand_tokens": np.stack([rng.choice(np.arange(8, 56), C, replace=False)
                               for _ in range(B)]).astype(np.int32),
      "pool_mask": pool_mask,
      "relevance": rng.permuted(relevance, axis=1) * pool_mask,
  }
  if with_identifiers:
    words = rng.integers(0, 8, (B, 2 * C + 2)).astype(np.int32)  # never an identifier
    words[:, 1:2 * C + 1:2] = batch["cand_tokens"]
    words[:, -1] = batch["cand_tokens"][:, 0]  # slot 0's identifier twice: the last one counts
    words[3, 3] = 7  # row 3: slot 1's identifier missing from the prompt
    mask = np.ones(words.shape, bool)
    mask[1, :2] = False
    batch.update(prompt=words, prompt_mask=mask)
  params = llama.init_params(cfg, jax.random.key(0))
  params = jax.tree.map(lambda p: p * 4.0 if p.ndim > 1 else p, params)
  return cfg, layout, jax.tree.map(jnp.asarray, batch), params


def _state(params, optimizer):
  params = jax.tree.map(jnp.copy, params)  # the steps donate their state
  return steps_lib.TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))


@functools.lru_cache(maxsize=None)
def _sft_run(grad_accum: int, dtype: str = "float32", optimizer=SGD_SFT,
             prompt_lm_weight: float = 0.0, slot_relevance_weight: float = 0.0):
  """(new TrainState, metrics) of one steps.sft_step on the tiny problem."""
  cfg, layout, batch, params = _tiny_problem(with_identifiers=bool(slot_relevance_weight))
  cfg = dataclasses.replace(cfg, dtype=dtype)
  options = None if dtype == "float32" else BF16_COMPILE
  return _fast(steps_lib.sft_step, _state(params, optimizer), batch, jax.random.key(1), cfg=cfg,
               layout=layout, optimizer=optimizer, grad_accum=grad_accum, options=options,
               prompt_lm_weight=prompt_lm_weight, slot_relevance_weight=slot_relevance_weight)


def _random_rollouts(layout, batch, G, rng):
  """Valid rollouts (slate from the pool, ranking from the slate) without sampling."""
  pool_mask = np.asarray(batch["pool_mask"])
  B, T = pool_mask.shape[0], layout.length
  choices = np.full((B, G, T), -1, np.int32)
  for b in range(B):
    for g in range(G):
      slate = rng.choice(np.flatnonzero(pool_mask[b]), layout.slate_size, replace=False)
      choices[b, g, layout.slate_positions] = slate
      choices[b, g, layout.rank_positions] = rng.permutation(slate)[:layout.rank_size]
  phase_ids = np.broadcast_to(layout.phase_ids, (B, G, T)).astype(np.int32)
  return jnp.asarray(choices), jnp.asarray(phase_ids)


@functools.partial(jax.jit, static_argnames=("cfg", "layout", "settings"))
def _rl_update(params, ref_params, batch, choices, phase_ids, key, *, cfg, layout, settings):
  """steps.policy_update (as in rl_step and decoupled_step) on fixed rollouts whose
  old log-probs are the current ones plus noise (ratios != 1, some clipped)."""
  mb = arrays_lib.model_inputs(batch)
  lp, _ = rollout.sequence_logprobs(params, mb, choices, cfg=cfg, layout=layout)
  k_old, k_adv = jax.random.split(key)
  is_choice = phase_ids != 0
  old = jnp.where(is_choice, lp + 0.3 * jax.random.normal(k_old, lp.shape), 0.0)
  adv = jnp.where(is_choice, jax.random.normal(k_adv, lp.shape), 0.0)
  ro = rollout.Rollout(tokens=choices, choices=choices, phase_ids=phase_ids, logprobs=old,
                       slate=None, ranking=None)
  params, _, metrics = steps_lib.policy_update(
      params, SGD_RL.init(params), mb, ro, adv, objectives.fgrpo_groups(0.5), ref_params,
      cfg=cfg, layout=layout, optimizer=SGD_RL, settings=settings)
  return params, metrics


def _assert_same_update(out, ref, what):
  (params, metrics), (params_ref, metrics_ref) = out, ref
  for k, v in metrics_ref.items():
    np.testing.assert_allclose(metrics[k], v, rtol=ACCUM_RTOL, atol=ACCUM_ATOL,
                               err_msg=f"{what}: metric {k}")
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_ref)):
    np.testing.assert_allclose(a, b, rtol=0, atol=ACCUM_PARAM_ATOL, err_msg=what)
  loss, loss_ref = float(metrics["loss"]), float(metrics_ref["loss"])
  d_loss = abs(loss - loss_ref) / abs(loss_ref)
  d_par = max(float(jnp.max(jnp.abs(a - b))) for a, b in
              zip(jax.tree.leaves(params), jax.tree.leaves(params_ref)))
  print(f"{what}: loss rel diff {d_loss:.1e}, max param diff {d_par:.1e}")


def test_repeated_updates_match_a_python_loop_of_updates():
  """steps.repeated_updates (one lax.scan) = n optimizer steps written out in Python, with
  each step's metrics at the params it started from."""
  target = jnp.asarray([1.0, -2.0, 3.0])

  def value_and_grad(p):
    loss, g = jax.value_and_grad(lambda q: jnp.sum((q["w"] - target) ** 2))(p)
    return (loss, {"w0": p["w"][0]}), g

  optimizer = optax.adam(0.1)
  p0 = {"w": jnp.zeros(3)}
  params, opt_state, each = jax.jit(functools.partial(
      steps_lib.repeated_updates, value_and_grad, optimizer=optimizer, n=3))(
          p0, optimizer.init(p0))
  p, o, losses, w0 = p0, optimizer.init(p0), [], []
  for _ in range(3):
    (loss, aux), g = value_and_grad(p)
    updates, o = optimizer.update(g, o, p)
    losses.append(float(loss))
    w0.append(float(aux["w0"]))
    p = optax.apply_updates(p, updates)
  np.testing.assert_allclose(params["w"], p["w"], rtol=1e-6)
  np.testing.assert_allclose(each["loss"], losses, rtol=1e-6)
  np.testing.assert_allclose(each["w0"], w0, rtol=1e-6)
  assert each["grad_norm"].shape == each["update_norm"].shape == (3,)
  assert int(steps_lib.optimizer_updates(opt_state)) == 3
  assert losses[0] > losses[-1]  # the three steps are distinct updates


def test_sft_grad_accumulation_matches_full_batch():
  ref = _sft_run(1)
  assert float(ref[1]["grad_norm"]) > 0.1  # a real gradient
  for n in (2,):  # 4 microbatches: the RL test below
    out = _sft_run(n)
    _assert_same_update((out[0].params, out[1]), (ref[0].params, ref[1]), f"sft grad_accum={n}")


def test_sft_prompt_lm_loss_adds_the_prompts_next_token_nll():
  """sft.prompt_lm_weight: loss = gold-sequence NLL + w x the prompt's next-token NLL,
  the latter equal to a plain numpy count over the real (non-padding) token pairs, and
  the same with 2 microbatches (the pair count is the whole batch's)."""
  cfg, _, batch, params = _tiny_problem()
  w = 0.5
  ref_state, ref = _sft_run(1)
  state, m = _sft_run(1, prompt_lm_weight=w)
  logits = np.asarray(llama.forward(params, batch["prompt"], cfg, batch["prompt_mask"]),
                      np.float64)
  prompt, mask = np.asarray(batch["prompt"]), np.asarray(batch["prompt_mask"])
  total, pairs = 0.0, 0
  for b in range(prompt.shape[0]):
    for p in range(prompt.shape[1] - 1):
      if mask[b, p] and mask[b, p + 1]:
        row = logits[b, p]
        total += np.log(np.exp(row - row.max()).sum()) + row.max() - row[prompt[b, p + 1]]
        pairs += 1
  assert pairs == mask.size - mask.shape[0] - 2  # row 1 has two padding slots
  np.testing.assert_allclose(float(m["nll_prompt"]), total / pairs, rtol=1e-5)
  np.testing.assert_allclose(float(m["loss"]), float(ref["loss"]) + w * total / pairs, rtol=1e-5)
  assert "nll_prompt" not in ref
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)))
  assert moved > 1e-4  # the auxiliary loss has a gradient
  accum = _sft_run(2, prompt_lm_weight=w)
  _assert_same_update((accum[0].params, accum[1]), (state.params, m), "sft prompt_lm grad_accum=2")


def test_sft_slot_relevance_loss_is_a_bce_at_each_identifiers_last_position():
  """sft.slot_relevance_weight: loss = gold-sequence NLL + w x the mean binary
  cross-entropy of "slot j is relevant" with score = identifier j's own logit where
  it last stands in the prompt, over real slots whose identifier is present; checked
  against a plain numpy loop over full-vocabulary logits, and with 2 microbatches."""
  cfg, layout, batch, params = _tiny_problem(with_identifiers=True)
  w = 0.5
  state, m = _sft_run(1, slot_relevance_weight=w)
  logits = np.asarray(llama.forward(params, batch["prompt"], cfg, batch["prompt_mask"]),
                      np.float64)
  prompt, mask = np.asarray(batch["prompt"]), np.asarray(batch["prompt_mask"])
  cand, pool = np.asarray(batch["cand_tokens"]), np.asarray(batch["pool_mask"])
  rel = np.asarray(batch["relevance"])
  total, slots = 0.0, 0
  for b in range(prompt.shape[0]):
    for j in range(cand.shape[1]):
      where = [p for p in range(prompt.shape[1]) if mask[b, p] and prompt[b, p] == cand[b, j]]
      if not pool[b, j] or not where:
        continue
      score = logits[b, where[-1], cand[b, j]]
      y = float(rel[b, j] > 0)
      total += -(y * np.log(1 / (1 + np.exp(-score))) + (1 - y) * np.log(1 / (1 + np.exp(score))))
      slots += 1
  assert slots == pool.sum() - 1  # the one missing identifier is left out
  np.testing.assert_allclose(float(m["bce_slots"]), total / slots, rtol=1e-5)
  # The gold-sequence part is the run without the auxiliary loss on the same prompts.
  ref = _fast(steps_lib.sft_step, _state(params, SGD_SFT), batch, jax.random.key(1), cfg=cfg,
              layout=layout, optimizer=SGD_SFT)
  np.testing.assert_allclose(float(m["loss"]), float(ref[1]["loss"]) + w * total / slots,
                             rtol=1e-5)
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(state.params), jax.tree.leaves(ref[0].params)))
  assert moved > 1e-4  # the auxiliary loss has a gradient
  accum = _sft_run(2, slot_relevance_weight=w)
  _assert_same_update((accum[0].params, accum[1]), (state.params, m), "sft slot_relevance x2")
  # Free decoding (chat LLMs) reads the prompt logits from a separate forward: same loss.
  free = rollout.with_budget(layout, constrained=False, max_new_tokens=layout.length + 2)
  _, m_free = _fast(steps_lib.sft_step, _state(params, SGD_SFT), batch, jax.random.key(1),
                    cfg=cfg, layout=free, optimizer=SGD_SFT, slot_relevance_weight=w)
  np.testing.assert_allclose(float(m_free["bce_slots"]), total / slots, rtol=1e-5)


def test_rl_grad_accumulation_matches_full_batch():
  """policy_update (of rl_step and decoupled_step): token ratios != 1 (some clipped),
  per-phase weights, KL to a reference policy."""
  cfg, layout, batch, params = _tiny_problem()
  choices, phase_ids = _random_rollouts(layout, batch, G=4, rng=np.random.default_rng(1))
  base = steps_lib.RLSettings(
      algorithm="fgrpo", group_size=4, temperature=1.0, coverage="recall", rank_metric="ndcg",
      gain="exp", lam=0.5, advantage="mean", inner_steps=1,
      loss=objectives.PolicyLossConfig(kl_coef=0.1))
  ref_params = jax.tree.map(lambda p: 0.9 * p, params)
  runs = {n: _fast(_rl_update, params, ref_params, batch, choices, phase_ids, jax.random.key(2),
                   cfg=cfg, layout=layout, settings=dataclasses.replace(base, grad_accum=n))
          for n in (1, 4)}  # 2 microbatches: the SFT test above and tests/test_distributed.py
  assert float(runs[1][1]["clip_frac"]) > 0.05 and float(runs[1][1]["kl_ref"]) > 0
  for n in (4,):
    _assert_same_update(runs[n], runs[1], f"rl grad_accum={n}")


def test_split_microbatches_is_strided():
  x = jnp.arange(8 * 3).reshape(8, 3)
  micro = steps_lib.split_microbatches({"x": x}, 4)["x"]
  assert micro.shape == (4, 2, 3)
  np.testing.assert_array_equal(micro[1], x[jnp.array([1, 5])])
  np.testing.assert_array_equal(steps_lib.merge_microbatches({"x": micro})["x"], x)


@pytest.mark.parametrize("overrides,message", [
    ({"optim.grad_accum": 3}, "does not divide config.sft.batch_size (32 rows)"),
    ({"optim.grad_accum": 0}, "must be >= 1"),
    ({"optim.grad_accum": 8, "algorithm": "decoupled"}, "half of config.rl.batch_prompts"),
])
def test_grad_accum_must_divide_every_update(overrides, message):
  config = recsys.get_config("tiny")
  for field, value in overrides.items():
    section, _, name = field.rpartition(".")
    (config[section] if section else config)[name] = value
  with pytest.raises(config_lib.ConfigError, match="config.optim.grad_accum") as e:
    config_lib.validate_config(config)
  assert message in str(e.value)
  config.optim.grad_accum = 4  # divides 32, 8 (and 4 rows per decoupled half)
  config_lib.validate_config(config)


# Mixed precision: config.model.dtype="bfloat16" computes in bfloat16 (every matmul
# of the forward takes bf16 operands; logits accumulate in float32) while the
# parameters, their gradients and the Adam state stay float32 (master weights).
# XLA:CPU computes bf16 ops in float32 and by default keeps that "excess precision"
# between ops; the bf16 step here is compiled without it, so every intermediate is
# rounded to bf16 as on a TPU. Tolerance against the float32 step: loss 2e-2 and
# gradient norm 5e-2 relative (bf16 keeps 8 significant bits, ~4e-3 per rounding).
# Measured: loss 2.4e-4, gradient norm 3.5e-3 relative.

BF16_LOSS_RTOL, BF16_GRAD_NORM_RTOL = 2e-2, 5e-2
BF16_COMPILE = {"xla_allow_excess_precision": False}
ADAMW = optax.adamw(1e-4)  # constant lr: the first step already moves every weight


def _dot_operand_dtypes(jaxpr) -> list[tuple[str, ...]]:
  """Operand dtypes of every dot_general in a jaxpr, nested ones (scan, remat) included."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out.append(tuple(str(v.aval.dtype) for v in eqn.invars))
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else (value,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          out += _dot_operand_dtypes(sub)
  return out


def test_bfloat16_forward_computes_in_bf16():
  cfg, layout, batch, params = _tiny_problem()
  choices, _ = _random_rollouts(layout, batch, G=1, rng=np.random.default_rng(3))
  mb = arrays_lib.model_inputs(batch)
  for dtype in ("float32", "bfloat16"):
    c = dataclasses.replace(cfg, dtype=dtype)
    jaxpr = jax.make_jaxpr(lambda p: rollout.sequence_logprobs(p, mb, choices, cfg=c,
                                                              layout=layout))(params).jaxpr
    dots = _dot_operand_dtypes(jaxpr)
    assert len(dots) >= 8, dots  # q, k, v, scores, values, o, gate, up, down, lm_head
    assert all(d == (dtype, dtype) for d in dots), (dtype, sorted(set(dots)))
    logits = jax.eval_shape(lambda p: llama.completion_logits(
        p, mb["prompt"], mb["prompt_mask"], jnp.zeros(choices.shape, jnp.int32), c), params)
    assert logits.dtype == jnp.float32  # bf16 operands, float32 accumulation


def test_bfloat16_step_keeps_float32_master_weights_and_state():
  before = _tiny_problem()[3]
  state, metrics = _sft_run(1, "bfloat16", ADAMW)
  leaves = jax.tree.leaves((state.params, state.opt_state))
  floats = [x.dtype for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(d == jnp.float32 for d in floats), set(map(str, floats))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  # The update (~1e-4 per weight) is below bf16's resolution for most weights: it
  # survives only because the weights are kept in float32.
  w0, w1 = before["layers"]["up_proj"], state.params["layers"]["up_proj"]
  step = jnp.abs(w1 - w0)
  lost_in_bf16 = (step > 0) & (w0.astype(jnp.bfloat16) == w1.astype(jnp.bfloat16))
  assert float(jnp.mean(lost_in_bf16)) > 0.5
  f32 = _sft_run(1)[1]
  for key, rtol in (("loss", BF16_LOSS_RTOL), ("grad_norm", BF16_GRAD_NORM_RTOL)):
    a, b = float(metrics[key]), float(f32[key])
    print(f"bf16 {key} {a:.6f} vs float32 {b:.6f}: rel diff {abs(a - b) / b:.1e}")
    np.testing.assert_allclose(a, b, rtol=rtol, err_msg=key)
  assert float(metrics["loss"]) != float(f32["loss"])  # it really ran in bf16


@pytest.mark.parametrize("field,value", [
    ("rl.inner_steps", 0), ("eval.batch_size", 0), ("log_every", 0),
    ("rollout.temperature", 0.0)])
def test_zero_sizes_and_temperature_are_config_errors(field, value):
  c = recsys.get_config("tiny")
  section, _, name = field.rpartition(".")
  (c[section] if section else c)[name] = value
  with pytest.raises(config_lib.ConfigError, match=f"^config.{field}="):
    config_lib.validate_config(c)


def test_sft_tied_targets_scores_every_allowed_candidate_as_relevant_as_the_gold_one():
  """sft.tied_targets: the loss at a supervised choice is -log of the total probability
  of the allowed slots whose relevance equals the gold choice's. Reference: each slot's
  probability at step t from the single-target log-probs with that slot written at t
  (the prefix, hence the distribution, is unchanged), the allowed set rebuilt by hand
  (pool members not yet in the slate; slate members not yet ranked), graded relevance
  with ties (grades 1 and 2)."""
  cfg, layout, batch, params = _tiny_problem()
  rel = np.asarray(batch["relevance"]).copy()
  rel[::2] *= 1.0 + (np.arange(rel.shape[1]) % 2)  # even rows: grades 1 and 2
  batch = {**batch, "relevance": jnp.asarray(rel)}
  key = jax.random.key(1)
  _, m = _fast(steps_lib.sft_step, _state(params, SGD_SFT), batch, key, cfg=cfg,
               layout=layout, optimizer=SGD_SFT, tied_targets=True)
  _, plain = _fast(steps_lib.sft_step, _state(params, SGD_SFT), batch, key, cfg=cfg,
                   layout=layout, optimizer=SGD_SFT)
  choices = np.asarray(steps_lib.gold_choices(batch["relevance"], batch["pool_mask"], key,
                                              layout))  # the step's own gold sequences
  pool = np.asarray(batch["pool_mask"])
  B, T = choices.shape
  C = pool.shape[1]
  kinds = np.asarray(layout.kinds)
  steps = [t for t in range(T) if choices[0, t] >= 0]
  alt = np.repeat(choices[:, None], len(steps) * C, axis=1)  # [B, steps * C, T]: one per (t, j)
  for i, (t, j) in enumerate((t, j) for t in steps for j in range(C)):
    alt[:, i, t] = j
  lp = np.asarray(rollout.sequence_logprobs(params, batch, jnp.asarray(alt), cfg=cfg,
                                            layout=layout)[0])
  lp_at = np.zeros((B, T, C))  # log p_t(j)
  for i, (t, j) in enumerate((t, j) for t in steps for j in range(C)):
    lp_at[:, t, j] = lp[:, i, t]
  total, ties = {"gen": [], "rank": []}, 0
  for b in range(B):
    slate, ranked = [], []
    for t in range(T):
      c = choices[b, t]
      if c < 0:
        continue
      phase = "gen" if kinds[t] == rollout.CHOOSE_SLATE else "rank"
      allowed = [j for j in range(C) if pool[b, j] and (
          j not in slate if phase == "gen" else (j in slate and j not in ranked))]
      if rel[b, c] > 0:
        tied = [j for j in allowed if rel[b, j] == rel[b, c]]
        assert c in tied
        ties += len(tied) > 1
        total[phase].append(-np.log(np.sum(np.exp(lp_at[b, t, tied]))))
      (slate if phase == "gen" else ranked).append(c)
  assert ties >= 5  # steps with more than one correct slot
  np.testing.assert_allclose(float(m["nll_gen"]), np.mean(total["gen"]), rtol=1e-5)
  np.testing.assert_allclose(float(m["nll_rank"]), np.mean(total["rank"]), rtol=1e-5)
  np.testing.assert_allclose(float(m["loss"]), np.mean(total["gen"] + total["rank"]), rtol=1e-5)
  assert float(m["loss"]) < float(plain["loss"]) - 1e-3  # the tie sets hold more than one slot
  c = recsys.get_config("tiny")
  c.sft.tied_targets, c.rollout.constrained = True, False
  with pytest.raises(UserError, match="config.sft.tied_targets"):
    config_lib.validate_config(c)
  free = rollout.with_budget(layout, constrained=False, max_new_tokens=layout.length + 2)
  with pytest.raises(ValueError, match="targets need a constrained layout"):
    steps_lib.sft_step(_state(params, SGD_SFT), batch, key, cfg=cfg, layout=free,
                       optimizer=SGD_SFT, tied_targets=True)
