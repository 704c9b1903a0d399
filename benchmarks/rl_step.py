"""Wall time of one RL step (`fgrpo_jax.steps.rl_step`: rollout, rewards, update).

The workload is benchmarks/common.py's (random float32 weights, random prompts of
exactly --prompt-len tokens ending in the pool, random graded relevance); the RL
settings and the optimizer come from configs/recsys.py (default variant) with
rollout.group_size/slate_size/rank_size taken from the flags:
`RLSettings.from_config(config)`, `make_optimizer(config.optim, config.rl.lr,
config.rl.steps)`, no reference model (rl.kl_coef = 0).

seconds_per_step is the median of the fused, jitted `steps.rl_step`. The split
times the three pieces as separate jitted calls, in alternation with the fused
step (so all four see the same share of a shared machine):

    rollout  rollout.sample
    reward   per-phase rewards + group advantages
    update   steps_lib.policy_update: config.rl.inner_steps x (teacher-forced log-probs,
             clipped surrogate, gradient, AdamW)

--train-forward adds the prefix-sharing comparison of the training forward:
`completion_logits` (prompt computed once per group) against `forward`
on the G-times-repeated [B*G, P+T] sequences, forward+backward of the same
completion-token cross-entropy, timed and counted in FLOPs.

    python benchmarks/rl_step.py                   # table
    python benchmarks/rl_step.py --json            # one JSON line
    python benchmarks/rl_step.py --train-forward   # + training-forward prefix sharing
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py)
from common import decoder, llama, rollout_lib  # noqa: E402
from fgrpo_jax.data import arrays as arrays_lib  # noqa: E402
from fgrpo_jax import steps as steps_lib  # noqa: E402


# ----------------------------------------------------------------------------
# The pieces of steps.rl_step as separate jitted calls (for the split only).


@functools.partial(jax.jit, static_argnames=("settings", "rank_size"))
def reward_piece(ro: rollout_lib.Rollout, relevance, *, settings, rank_size):
  r_gen, r_rank, rank_ok = steps_lib.rollout_rewards(ro, relevance, settings, rank_size)
  token_adv, _, loss_ids = steps_lib.rl_advantages(r_gen, r_rank, rank_ok, ro.phase_ids, settings)
  return token_adv, loss_ids


@functools.partial(jax.jit, static_argnames=("cfg", "layout", "optimizer", "settings"),
                   donate_argnums=0)
def update_piece(state: steps_lib.TrainState, mb, ro: rollout_lib.Rollout, token_adv, *, cfg,
                 layout, optimizer, settings):
  """The update part of steps.rl_step (`steps.policy_update`, no reference model)."""
  params, opt_state, metrics = steps_lib.policy_update(
      state.params, state.opt_state, mb, ro, token_adv, steps_lib.loss_groups(settings), None,
      cfg=cfg, layout=layout, optimizer=optimizer, settings=settings)
  return steps_lib.TrainState(params, opt_state, state.step + 1), metrics["loss"]


# ----------------------------------------------------------------------------
# Training-forward prefix sharing.


def _completion_ce(logits, completion):
  """Mean cross-entropy of completion tokens under logits [..., T, V]."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, completion[..., None], -1))


@functools.partial(jax.jit, static_argnames=("cfg",))
def shared_fwd_bwd(params, prompt, prompt_mask, completion, *, cfg):
  """completion_logits: B prompts once, G completions attend to them. completion [B, G, T]."""
  def loss(p):
    return _completion_ce(decoder(cfg).completion_logits(p, prompt, prompt_mask, completion, cfg),
                          completion)
  return jax.value_and_grad(loss)(params)


@functools.partial(jax.jit, static_argnames=("cfg",))
def naive_fwd_bwd(params, prompt, prompt_mask, completion, *, cfg):
  """The decoder's forward on [B*G, P+T]: each completion with its own copy of the prompt."""
  B, G, T = completion.shape
  P = prompt.shape[1]
  seq = jnp.concatenate([jnp.repeat(prompt, G, 0), completion.reshape(B * G, T)], axis=1)
  mask = jnp.concatenate([jnp.repeat(prompt_mask, G, 0), jnp.ones((B * G, T), bool)], axis=1)

  def loss(p):
    logits = decoder(cfg).forward(p, seq, cfg, mask)[:, P - 1:P + T - 1]  # predicts completion t
    return _completion_ce(logits.reshape(B, G, T, -1), completion)
  return jax.value_and_grad(loss)(params)


def train_forward_comparison(params, batch, completion, cfg, a, peak) -> dict:
  B, G, T = completion.shape
  P = a.prompt_len
  args = (params, batch["prompt"], batch["prompt_mask"], completion)
  fwd_flops = {"shared": common.completion_forward_flops(cfg, B, G, P, T),
               "naive": common.full_forward_flops(cfg, B * G, P + T)}
  ts = common.time_interleaved({"shared": lambda: shared_fwd_bwd(*args, cfg=cfg),
                                "naive": lambda: naive_fwd_bwd(*args, cfg=cfg)}, a.repeats)
  out, grads = {}, {}
  for name, t in ts.items():
    grads[name] = t.result[1]
    flops = 3.0 * fwd_flops[name]  # backward ~ 2x forward
    out[name] = {"seconds_fwd_bwd": t.median_s, "seconds_min": t.min_s,
                 "compile_s": t.compile_s, "loss": float(t.result[0]),
                 "flops_fwd_bwd": flops, "flops_per_s": flops / t.median_s,
                 "peak_fraction": flops / t.median_s / peak}
  out["speedup"] = out["naive"]["seconds_fwd_bwd"] / out["shared"]["seconds_fwd_bwd"]
  out["speedup_best"] = out["naive"]["seconds_min"] / out["shared"]["seconds_min"]
  out["flops_ratio"] = out["naive"]["flops_fwd_bwd"] / out["shared"]["flops_fwd_bwd"]
  # Both compute the same loss and gradients (up to float rounding).
  out["loss_abs_diff"] = abs(out["naive"]["loss"] - out["shared"]["loss"])
  out["grad_max_abs_diff"] = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(
      jax.tree.leaves(grads["shared"]), jax.tree.leaves(grads["naive"])))
  return out


# ----------------------------------------------------------------------------


def rl_config(a):
  config = common.load_config("default")
  config.rollout.group_size = a.group
  config.rollout.slate_size = a.slate
  config.rollout.rank_size = a.rank
  config.rl.batch_prompts = a.prompts
  if getattr(a, "inner_steps", None) is not None:
    config.rl.inner_steps = a.inner_steps
  return config


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_workload_flags(p, repeats=5)
  p.add_argument("--train-forward", action="store_true",
                 help="also compare the training forward+backward with and without prefix "
                      "sharing (completion_logits vs forward on repeated prompts)")
  p.add_argument("--inner-steps", type=int, default=None,
                 help="gradient steps per rollout batch (default: configs/recsys.py's "
                      "rl.inner_steps)")
  a = p.parse_args(argv)
  common.check_workload(p, a)
  if a.group < 2:
    p.error("--group must be >= 2 (group-relative advantages)")
  if a.inner_steps is not None and a.inner_steps < 1:
    p.error("--inner-steps must be >= 1")

  m = common.meta()
  peak_before = common.matmul_peak(a.peak_size)
  cfg = common.model_config(a)
  lay = common.layout(a.slate, a.rank)
  config = rl_config(a)
  settings = steps_lib.RLSettings.from_config(config)
  optimizer = steps_lib.make_optimizer(config.optim, config.rl.lr,
                                   config.rl.steps * config.rl.inner_steps)
  params = common.init_params(cfg, a.seed)
  batch = arrays_lib.device_batch(common.make_batch(a.prompts, a.prompt_len, a.pool, a.vocab,
                                                a.seed, relevance=True))
  mb = arrays_lib.model_inputs(batch)
  key = jax.random.key(a.seed + 1)
  B, G, P, T = a.prompts, a.group, a.prompt_len, lay.length
  static = dict(cfg=cfg, layout=lay, optimizer=optimizer)

  def fresh():  # rl_step and update_piece donate their state: give them a copy
    own = jax.tree.map(jnp.copy, params)
    return steps_lib.TrainState(own, optimizer.init(own), jnp.zeros((), jnp.int32))

  # The fused step and the three pieces, timed in alternation. States are donated:
  # each chain threads its own through its calls.
  state = {"fused": fresh(), "split": fresh()}
  held = {}

  def fused():
    state["fused"], metrics = steps_lib.rl_step(state["fused"], None, batch, key,
                                            settings=settings, **static)
    return metrics

  def roll():
    held["ro"] = rollout_lib.sample(params, mb, key, cfg=cfg, layout=lay, group_size=G,
                                    temperature=settings.temperature)
    return held["ro"]

  def reward():
    held["adv"] = reward_piece(held["ro"], batch["relevance"], settings=settings,
                               rank_size=a.rank)
    return held["adv"]

  def update():
    token_adv, loss_ids = held["adv"]
    state["split"], loss = update_piece(state["split"], mb,
                                        held["ro"]._replace(phase_ids=loss_ids), token_adv,
                                        settings=settings, **static)
    return loss

  ts = common.time_interleaved({"fused": fused, "rollout": roll, "reward": reward,
                                "update": update}, a.repeats)
  t_step, t_roll, t_rew, t_upd = ts["fused"], ts["rollout"], ts["reward"], ts["update"]
  tf = (train_forward_comparison(params, mb, held["ro"].tokens, cfg, a, 1.0)
        if a.train_forward else None)
  peak = common.best_peak(peak_before, common.matmul_peak(a.peak_size))
  peak_fs = peak["matmul_flops_per_s"]

  C = a.pool  # constrained decoding and its teacher-forced log-probs compute C logits
  roll_flops = common.rollout_flops(cfg, B, G, P, T, columns=C)
  upd_flops = settings.inner_steps * 3.0 * common.completion_forward_flops(cfg, B, G, P, T,
                                                                          columns=C)
  step_flops = roll_flops + upd_flops
  split = {
      "rollout_s": t_roll.median_s, "reward_s": t_rew.median_s, "update_s": t_upd.median_s,
      "sum_s": t_roll.median_s + t_rew.median_s + t_upd.median_s,
      "rollout_compile_s": t_roll.compile_s, "reward_compile_s": t_rew.compile_s,
      "update_compile_s": t_upd.compile_s,
      "sum_min_s": t_roll.min_s + t_rew.min_s + t_upd.min_s,
      "rollout_flops": roll_flops, "update_flops": upd_flops,
  }
  out = {"benchmark": "rl_step", "seconds_per_step": t_step.median_s,
         "seconds_min": t_step.min_s, "compile_s": t_step.compile_s,
         "steps_per_s": 1.0 / t_step.median_s,
         "generated_tokens_per_s": B * G * T / t_step.median_s,
         "layout_length": T, "split": split,
         "flops_per_step": step_flops, "flops_per_s": step_flops / t_step.median_s,
         "peak_fraction": step_flops / t_step.median_s / peak_fs,
         "algorithm": settings.algorithm, "inner_steps": settings.inner_steps,
         "device": m["device"], "versions": m["versions"], "meta": m,
         "workload": common.workload_dict(a), "repeats": a.repeats,
         "num_params": llama.count_params(params), **peak}
  if tf is not None:
    for name in ("shared", "naive"):
      tf[name]["peak_fraction"] = tf[name]["flops_per_s"] / peak_fs
    out["train_forward"] = tf
  out.update(common.memory_stats())

  if a.json:
    common.print_json(out)
    return 0
  print(common.header("fgrpo_jax RL step benchmark (steps.rl_step)", m, a))
  print(f"{out['num_params']:,} parameters; {settings.algorithm}, "
        f"{settings.inner_steps} inner gradient steps per rollout batch, T = {T}; matmul peak "
        f"({a.peak_size}^2 f32, best call) {common.gflops(peak_fs)} GFLOP/s")
  pct = lambda x: f"{100 * x:.1f}"
  rows = [["rl_step (fused, jitted)", t_step.median_s * 1e3, t_step.min_s * 1e3, "",
           common.gflops(step_flops), common.gflops(step_flops / t_step.median_s),
           pct(out["peak_fraction"]), t_step.compile_s]]
  for name, t, fl in (("  rollout (rollout.sample)", t_roll, roll_flops),
                      ("  reward + advantages", t_rew, 0.0),
                      ("  update (inner steps)", t_upd, upd_flops)):
    rows.append([name, t.median_s * 1e3, t.min_s * 1e3, pct(t.median_s / split["sum_s"]),
                 common.gflops(fl), common.gflops(fl / t.median_s),
                 pct(fl / t.median_s / peak_fs), t.compile_s])
  rows.append(["  sum of the three", split["sum_s"] * 1e3,
               (t_roll.min_s + t_rew.min_s + t_upd.min_s) * 1e3, "100.0",
               common.gflops(step_flops), common.gflops(step_flops / split["sum_s"]),
               pct(step_flops / split["sum_s"] / peak_fs), ""])
  print(common.table(["piece", "ms (median)", "ms (best)", "% of split", "GFLOP", "GFLOP/s",
                      "% peak", "compile s"], rows, "RL step"))
  print(f"\n{out['steps_per_s']:.2f} steps/s, {out['generated_tokens_per_s']:,.0f} generated "
        f"tokens/s through the whole step")
  if a.train_forward:
    tf = out["train_forward"]
    rows = [[f"{name}", r["seconds_fwd_bwd"] * 1e3, r["seconds_min"] * 1e3,
             common.gflops(r["flops_fwd_bwd"]), common.gflops(r["flops_per_s"]),
             pct(r["peak_fraction"]), r["compile_s"]]
            for name, r in (("shared prefix (completion_logits)", tf["shared"]),
                            ("repeated prompts (forward [B*G, P+T])", tf["naive"]))]
    print(common.table(["training forward + backward", "ms (median)", "ms (best)", "GFLOP",
                        "GFLOP/s", "% peak", "compile s"], rows,
                       "Training forward: prefix sharing"))
    print(f"\nshared / repeated speedup {tf['speedup']:.2f}x median, {tf['speedup_best']:.2f}x "
          f"best (timed in alternation; FLOPs ratio {tf['flops_ratio']:.2f}x; "
          f"|loss difference| {tf['loss_abs_diff']:.1e}, max |grad difference| "
          f"{tf['grad_max_abs_diff']:.1e})")
  print("\n" + common.memory_line(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
