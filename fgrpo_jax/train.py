"""The training loop: SFT warm start, then RL (F-GRPO or GRPO) or more SFT, then the
test evaluation and eval.json.

This is the imperative shell around the pure steps of fgrpo_jax/steps.py: data order,
logging, profiling, checkpoints, resume, evaluation. The config's checks live in
fgrpo_jax/config.py, the console / TensorBoard / metrics.jsonl writers in
fgrpo_jax/logs.py, batch selection in fgrpo_jax/data/arrays.py.

Files of a workdir: metrics.jsonl and TensorBoard events (process 0), RUN_CONFIG,
ckpt/<stage>/ (Orbax) and ckpt/<stage>_data/ (grain iterator states), EVAL_EXAMPLES,
eval.json; profile/<stage>/ with config.profile_steps > 0.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from fgrpo_jax import checkpoint as ckpt_lib
from fgrpo_jax import evaluate as eval_lib
from fgrpo_jax import guards
from fgrpo_jax import logs
from fgrpo_jax import rewards as R
from fgrpo_jax import sharding
from fgrpo_jax import steps as steps_lib
from fgrpo_jax import workdir_lock
from fgrpo_jax.config import (DECOUPLED, ConfigError, main_stage, make_layout, model_config,
                              pretrained_model_config, stage_sizes, validate_config)
from fgrpo_jax.data import arrays as arrays_lib
from fgrpo_jax.data import tasks as tasks_lib
from fgrpo_jax.errors import UserError
from fgrpo_jax.models import hf, llama
from fgrpo_jax.models import lora as lora_lib
from fgrpo_jax.models.decoders import decoder

RUN_CONFIG = "run_config.json"  # the run's config and task vocabulary, for fgrpo_jax.export
EVAL_EXAMPLES = "eval_examples.npz"  # per-example test metrics of the final evaluation


def build_model(config, vocab_size: int, mesh, log=print):
  """(cfg, params, frozen) of a run, placed on the mesh.

  The backbone is a random init from config.model's sizes, or the Hugging Face
  checkpoint config.model.hf_checkpoint (its parameters kept in float32 with the
  partition-rule shardings; compute in config.model.dtype). Without LoRA, params is
  the backbone and frozen is None; with config.model.lora_rank > 0, params are fresh
  adapters (the only trainable, checkpointed tree) and frozen = lora.Frozen(backbone,
  alpha / rank).
  """
  key = jax.random.key(config.seed)
  path = config.model.get("hf_checkpoint", "")
  if path:
    cfg = pretrained_model_config(config, vocab_size)
    shardings = sharding.param_shardings(decoder(cfg).param_shapes(cfg), mesh)
    try:
      base = hf.load_hf_params(path, cfg, dtype="float32", shardings=shardings)
    except UserError as e:
      raise ConfigError(f"config.model.hf_checkpoint: {e}") from None
    log(f"model: {path} ({llama.count_params(base) / 1e6:.2f}M params, vocab "
        f"{cfg.vocab_size}, {cfg.num_layers} layers, hidden {cfg.hidden}); the sizes in "
        "config.model are ignored")
  else:
    cfg = model_config(config, vocab_size)
    base = sharding.init_sharded_params(cfg, key, mesh)
  lcfg = lora_lib.config_from_model_config(config.model)
  if lcfg is None:
    return cfg, base, None
  try:
    lora_lib.adapter_shapes(cfg, lcfg)
  except ValueError as e:  # a target this architecture lacks (in_proj_qkv of a Llama)
    raise ConfigError(f"config.model.lora_targets={config.model.lora_targets!r}: {e}") from None
  # Adapters are small: created whole, then split by their partition rules.
  adapters = sharding.shard_params(lora_lib.init_adapters(cfg, lcfg, jax.random.fold_in(key, 1)),
                                   mesh)
  log(f"LoRA: rank {lcfg.rank}, alpha {lcfg.alpha:g} on {','.join(lcfg.targets)}: "
      f"{llama.count_params(adapters) / 1e6:.3f}M trainable params, the base is frozen")
  return cfg, adapters, lora_lib.Frozen(base, lcfg.scale)


def stage_step(stage: str, config, cfg, layout, optimizer):
  """(jitted step, its static kwargs, whether it takes ref_params, log keys) of a stage."""
  alg = config.algorithm
  static = {"cfg": cfg, "layout": layout, "optimizer": optimizer}
  if stage == "rl":
    keys = ("reward_gen_mean", "reward_rank_mean", "zero_gen_groups", "reward_corr",
            "clip_frac", "entropy", "grad_norm_gen", "grad_norm_rank", "lr")
    if not config.rollout.constrained:
      keys += ("format_valid",)
    fn = steps_lib.decoupled_step if alg == "decoupled" else steps_lib.rl_step
    return fn, {**static, "settings": steps_lib.RLSettings.from_config(config)}, True, keys
  fn = (steps_lib.decoupled_sft_step if (stage == "sft_more" and alg == "decoupled_sft")
        else steps_lib.sft_step)
  return (fn, {**static, "supervise": config.sft.supervise,
               "slate_order": config.sft.slate_order, "grad_accum": config.optim.grad_accum,
               "prompt_lm_weight": float(config.sft.get("prompt_lm_weight", 0.0)),
               "slot_relevance_weight": float(config.sft.get("slot_relevance_weight", 0.0)),
               "tied_targets": bool(config.sft.get("tied_targets", False)),
               "inner_steps": stage_sizes(stage, config).updates_per_step},
          False,
          ("loss", "nll_gen", "nll_rank", "grad_norm", "lr"))


class StepTrace:
  """A jax.profiler trace of `count` steps of a stage (config.profile_steps) into
  `directory`, from the step after the first one (which compiles) on; process 0 only.
  Open it with `tensorboard --logdir DIR` (the Profile tab)."""

  def __init__(self, directory: str, count: int, start: int, total: int):
    self.directory, self.on = directory, False
    self.first = min(start + 1, total - 1)
    self.last = min(self.first + count, total) if count and jax.process_index() == 0 else -1

  def before(self, step: int) -> None:
    if step == self.first and self.last > step:
      jax.profiler.start_trace(self.directory)
      self.on = True

  def after(self, step: int, outputs) -> None:
    if self.on and step + 1 == self.last:
      jax.block_until_ready(outputs)
      self.stop()

  def stop(self) -> None:
    if self.on:
      jax.profiler.stop_trace()
      self.on = False


def run_stage(stage: str, *, params, task, cfg, layout, config, workdir, writer, mesh,
              log=print, frozen=None):
  """Runs one stage from `params`, resuming from its checkpoints. Returns the params.

  stage: "sft" (warm start), "rl" (fgrpo/grpo/decoupled) or "sft_more" (the SFT
  baselines' continuation, same number of sequences as RL's rollouts).
  frozen: None, or the lora.Frozen base: `params` are then LoRA adapters, the only
  thing trained and checkpointed, and the KL reference is the base without them.
  """
  sizes = stage_sizes(stage, config)
  total, batch_size = sizes.steps, sizes.batch_size
  optimizer = steps_lib.make_optimizer(config.optim, sizes.lr, sizes.updates)
  schedule = steps_lib.learning_rate_schedule(config.optim, sizes.lr, sizes.updates)
  rep = sharding.replicated(mesh)
  params = sharding.shard_params(params, mesh)
  ref_params = None
  if stage == "rl" and config.rl.kl_coef > 0:
    # Copies: the train state's buffers are donated to the step, these must survive.
    # With LoRA the reference is the frozen base itself (never donated, no copy).
    ref_params = frozen.params if frozen is not None else jax.tree.map(jnp.copy, params)
  pair = stage != "sft" and config.algorithm in DECOUPLED
  if pair:  # both start from the warm start
    params = {"selector": params, "ranker": jax.tree.map(jnp.copy, params)}
    opt_state = {r: sharding.init_opt_state(optimizer, p, mesh) for r, p in params.items()}
  else:
    opt_state = sharding.init_opt_state(optimizer, params, mesh)
  step_fn, static, takes_ref, keys = stage_step(stage, config, cfg, layout, optimizer)
  ckpt = ckpt_lib.StageCheckpointer(os.path.join(workdir, "ckpt", stage),
                                    keep=config.ckpt_keep, every=config.ckpt_every)
  state = steps_lib.TrainState(params, opt_state, jax.device_put(jnp.zeros((), jnp.int32), rep))
  step0, r_params, r_opt = ckpt.restore_latest(ckpt_lib.abstract_like(state.params),
                                               ckpt_lib.abstract_like(state.opt_state))
  if step0 is not None:
    state = steps_lib.TrainState(r_params, r_opt,
                                 jax.device_put(jnp.asarray(step0, jnp.int32), rep))
    log(f"[{stage}] resumed from step {step0} ({ckpt.directory})")
  if mesh.size > 1:  # keep the state's layout fixed from step to step
    step_fn = sharding.pin_state_shardings(step_fn, sharding.train_state_shardings(state, mesh),
                                           static_argnames=tuple(static))
  ref_args = (ref_params,) if takes_ref else ()
  start = int(state.step)
  stage_id = ("sft", "rl", "sft_more").index(stage)
  stream = _train_stream(task, config, stage, stage_id, batch_size, start, workdir, log)
  train = task.splits["train"]
  val = arrays_lib.subset(task.splits["validation"], config.eval.val_examples, config.seed)
  n_train = arrays_lib.num_examples(train)
  base_key = jax.random.fold_in(jax.random.key(config.seed), stage_id)
  console = logs.ConsoleLog(stage, total, start)
  history = os.path.join(workdir, "metrics.jsonl")
  gen_tokens = batch_size * config.rollout.group_size * layout.length
  trace = StepTrace(os.path.join(workdir, "profile", stage), config.profile_steps, start, total)
  t_last, step_last = time.time(), start
  first_step = {}  # the first step's wall time (compile included), for its log record
  # Leaving by an exception (an interrupt, a divergence) still waits for the
  # checkpoint being written, so the next run never finds a half-saved step.
  try:
    for step in range(start, total):
      if stream is None:
        idx = arrays_lib.batch_indices(config.seed, stage_id, step, n_train, batch_size)
        rows = arrays_lib.host_batch(train, idx[sharding.process_batch_slice(batch_size)])
      else:  # this host's rows, read from its shard of the array_record files
        rows = {k: v for k, v in next(stream).items() if k in arrays_lib.BATCH_KEYS}
      batch = sharding.shard_batch(rows, mesh)
      done = step + 1
      log_now = done % config.log_every == 0 or done == total
      extra = {"diagnose": jnp.asarray(log_now)} if takes_ref else {}
      trace.before(step)
      t_step = time.time()
      state, metrics = step_fn(state, *ref_args, batch, jax.random.fold_in(base_key, step),
                               frozen=frozen, **extra, **static)
      trace.after(step, metrics)
      if step == start:
        jax.block_until_ready(metrics)
        first_step = {"compile_s": time.time() - t_step}
        log(f"[{stage}] first step {first_step['compile_s']:.1f}s (compiling included) | "
            f"peak memory {logs.peak_memory_mb():.0f} MiB")
      if log_now:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        # The schedule's rate for the next update, and the updates applied so far.
        metrics["opt_updates"] = steps_lib.optimizer_updates(state.opt_state)
        metrics["lr"] = float(schedule(metrics["opt_updates"]))
        now = time.time()
        metrics["steps_per_s"] = (done - step_last) / max(now - t_last, 1e-9)
        if stage == "rl":
          metrics["gen_tokens_per_s"] = metrics["steps_per_s"] * gen_tokens
        metrics.update(first_step, peak_memory_mb=logs.peak_memory_mb())
        first_step = {}
        t_last, step_last = now, done
        logs.write_metrics(writer, done, {f"{stage}/{k}": v for k, v in metrics.items()})
        logs.append_jsonl(history, {"stage": stage, "step": done, **metrics})
        log(console.line(done, metrics, keys))
      saving = ckpt.due(done, force=(done == total))
      if saving or done % config.log_every == 0:  # never checkpoint a diverged state
        guards.check_finite_step(stage, done, metrics, ckpt, state.params if saving else None)
      # Always at the end of the stage: settings are chosen on validation.
      if done == total or (config.eval.every and done % config.eval.every == 0):
        val_metrics = eval_lib.evaluate_model(steps_lib.policy_params(state.params, frozen), val,
                                              cfg=cfg, layout=layout,
                                              batch_size=config.eval.batch_size,
                                              gain=config.reward.gain, mesh=mesh)
        logs.write_metrics(writer, done, {f"{stage}/val_{k}": v for k, v in val_metrics.items()})
        logs.append_jsonl(history, {"stage": stage, "step": done,
                                    **{f"val_{k}": v for k, v in val_metrics.items()}})
        log(f"[{stage}] step {done}/{total} | validation hit@1 {val_metrics['hit@1']:.4f} "
            f"ndcg@5 {val_metrics['ndcg@5']:.4f} slate_recall {val_metrics['slate_recall']:.4f}")
      saved = ckpt.save(done, state.params, state.opt_state, force=(done == total))
      if saved and stream is not None:
        _save_stream_state(workdir, stage, done, stream.get_state())
  finally:
    trace.stop()
    ckpt.close()
  return state.params


def _stream_state_path(workdir: str, stage: str, step: int) -> str:
  return os.path.join(workdir, "ckpt", f"{stage}_data", f"{step}.{jax.process_index()}.json")


def _save_stream_state(workdir: str, stage: str, step: int, state) -> None:
  """The grain iterator state of this host at a checkpointed step (temp file + rename)."""
  path = _stream_state_path(workdir, stage, step)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  logs.write_json_atomic(path, state)


def _train_stream(task, config, stage: str, stage_id: int, batch_size: int, start: int,
                  workdir: str, log):
  """config.data.loader="grain": this host's iterator over the training split, positioned
  at step `start` (from its saved state, else by replaying `start` batches). None for
  the in-memory loader. validate_config has checked that the task can stream."""
  if config.data.get("loader", "memory") != "grain":
    return None
  stream = task.stream("train", batch_size // jax.process_count(),
                       seed=config.seed * 1000 + stage_id, shard_index=jax.process_index(),
                       shard_count=jax.process_count())
  if start:
    path = _stream_state_path(workdir, stage, start)
    if os.path.exists(path):
      with open(path) as f:
        stream.set_state(json.load(f))
    else:
      log(f"[{stage}] no data iterator state for step {start}: replaying {start} batches")
      for _ in range(start):
        next(stream)
  return stream


def reference_metrics(task, arrays, config) -> tuple[dict | None, dict]:
  """(oracle metrics or None, {reference name: metrics}) on a split's arrays."""
  k, m = config.rollout.slate_size, config.rollout.rank_size
  gain = config.reward.gain
  oracle = None
  if "oracle_scores" in arrays:
    oracle = eval_lib.evaluate_scores(arrays["oracle_scores"], arrays, k, m, config.seed, gain)
  refs = {name: eval_lib.evaluate_scores(fn(arrays), arrays, k, m, config.seed, gain)
          for name, fn in task.reference_fns.items()}
  return oracle, refs


def _fmt(metrics: dict | None, keys=("hit@1", "ndcg@5", "slate_recall")) -> str:
  if not metrics:
    return "n/a"
  return " ".join(f"{k} {metrics[k]:.4f}" for k in keys)


def show_examples(params, task, arrays, config, cfg, layout, n: int, log=print, mesh=None):
  """Prints n greedy test rollouts in readable form with their rewards."""
  n = min(n, arrays["prompt"].shape[0])
  sub = {k: v[:n] for k, v in arrays.items()}
  rows = -(-max(n, 1) // _eval_rows(mesh)) * _eval_rows(mesh)  # a multiple of the shards
  slate, ranking, _ = eval_lib.greedy_outputs(params, sub, cfg=cfg, layout=layout,
                                              batch_size=rows, mesh=mesh)
  r_gen, r_rank = (np.asarray(r) for r in R.phase_rewards(
      slate, ranking, sub["relevance"], coverage_mode=config.reward.coverage,
      gain=config.reward.gain))
  for i in range(n):
    log(f"--- example {i}")
    log(task.describe(sub, i, slate[i], ranking[i],
                      f"R_gen {r_gen[i]:.3f}  R_rank (ndcg@{layout.rank_size}) {r_rank[i]:.3f}"))


def _eval_rows(mesh) -> int:
  """Evaluation batches must split evenly over the batch shards and the processes
  (mesh None: one device, as in the notebook)."""
  shards = 1 if mesh is None else sharding.batch_shards(mesh)
  return math.lcm(shards, jax.process_count())


def _quiet(*args, **kwargs):
  """The log of processes other than 0: one process speaks for all."""


def run(config, workdir: str, log=print) -> dict:
  """Trains (or only evaluates) as the config says and writes workdir/eval.json.

  On several processes every one runs this same program; only process 0 logs and
  writes metrics.jsonl, TensorBoard events and eval.json. Process 0 holds the
  workdir's lock (fgrpo_jax/workdir_lock.py) for the whole run.
  """
  if jax.process_index() > 0:
    log = _quiet
  validate_config(config)
  guards.check_eval_has_checkpoint(config, workdir)  # before anything is created
  with workdir_lock.hold(workdir, log, enabled=jax.process_index() == 0):
    return _run(config, workdir, log)


def _run(config, workdir: str, log) -> dict:
  t_start = time.time()
  task = tasks_lib.load_task(config, workdir, log)
  mesh = sharding.make_mesh(config.get("mesh"))
  validate_config(config, task, mesh)
  layout = make_layout(task, config)
  cfg, params, frozen = build_model(config, task.vocab_size, mesh, log)
  log(f"task {task.dataset}: {task.info} | model "
      f"{llama.count_params(decoder(cfg).param_shapes(cfg)) / 1e6:.2f}M params | devices "
      f"{jax.devices()}")
  writer = (logs.make_writer(workdir, log)
            if jax.process_index() == 0 and config.get("tensorboard", True) else None)
  if jax.process_index() == 0:  # what fgrpo_jax.export needs to rebuild the model
    guards.warn_config_changes(workdir, RUN_CONFIG, config, log)
    logs.write_json_atomic(os.path.join(workdir, RUN_CONFIG),
                           {"config": config.to_dict(), "vocab_size": task.vocab_size})

  stage2 = main_stage(config.algorithm)
  if config.mode == "train":
    if config.sft.init_from:
      params = load_stage_params(config.sft.init_from, "sft", params)
      log(f"[sft] using SFT params of {config.sft.init_from}")
    elif config.sft.steps:
      params = run_stage("sft", params=params, task=task, cfg=cfg, layout=layout,
                         config=config, workdir=workdir, writer=writer, mesh=mesh, log=log,
                         frozen=frozen)
    if config.rl.steps:
      params = run_stage(stage2, params=params, task=task, cfg=cfg, layout=layout,
                         config=config, workdir=workdir, writer=writer, mesh=mesh, log=log,
                         frozen=frozen)
  else:
    params = _latest_params(workdir, params, config, log)
  params = steps_lib.policy_params(params, frozen)

  test = arrays_lib.subset(task.splits["test"], config.eval.test_examples, config.seed + 1)
  metrics, rows = eval_lib.evaluate_model(params, test, cfg=cfg, layout=layout,
                                          batch_size=config.eval.batch_size,
                                          gain=config.reward.gain, mesh=mesh, per_example=True)
  oracle, refs = reference_metrics(task, test, config)
  steps = (0 if config.sft.init_from else config.sft.steps) + config.rl.steps
  result = {"algorithm": config.algorithm, "task": task.name, "dataset": task.dataset,
            "split": "test", "metrics": metrics, "oracle": oracle, "references": refs,
            "steps": int(steps) if config.mode == "train" else 0,
            "num_examples": arrays_lib.num_examples(test),
            "wall_time_s": round(time.time() - t_start, 1)}
  if jax.process_index() == 0:
    # Per-example test metrics, in the order of the test subset (the same examples
    # for every run of a seed): fgrpo_jax.compare pairs runs on them.
    logs.write_npz_atomic(os.path.join(workdir, EVAL_EXAMPLES), rows)
    logs.write_json_atomic(os.path.join(workdir, "eval.json"), result)
    if writer is not None:
      logs.write_metrics(writer, steps, {f"test/{k}": v for k, v in metrics.items()})
      writer.flush()
  log(f"[test] {config.algorithm}: {_fmt(metrics)}")
  log(f"[test] oracle: {_fmt(oracle)}")
  for name, r in refs.items():
    log(f"[test] {name}: {_fmt(r)}")
  log(f"[done] {time.time() - t_start:.0f}s, wrote {os.path.join(workdir, 'eval.json')}")
  if config.eval.show_examples:
    show_examples(params, task, test, config, cfg, layout, config.eval.show_examples, log, mesh)
  return result


def latest_checkpoint(workdir, config, params):
  """(stage, params) of the most advanced stage checkpoint in workdir, or (None, None).

  `params` (the initial ones: full model, or LoRA adapters) give the restore layout.
  """
  like = {"selector": params, "ranker": params} if config.algorithm in DECOUPLED else params
  for stage in (main_stage(config.algorithm), "sft"):
    restored = load_stage_params(workdir, stage, params if stage == "sft" else like,
                                 missing_ok=True)
    if restored is not None:
      return stage, restored
  return None, None


def _latest_params(workdir, params, config, log):
  """Parameters of the most advanced checkpoint in workdir (eval mode), else `params`."""
  stage, restored = latest_checkpoint(workdir, config, params)
  if restored is not None:
    log(f"[eval] evaluating the latest {stage} params of {workdir}")
    return restored
  if config.model.get("hf_checkpoint"):
    log(f"[eval] no checkpoint in {workdir}: evaluating the pretrained weights of "
        f"{config.model.hf_checkpoint} (zero-shot)")
  elif config.eval.get("allow_random", False):
    log(f"[eval] no checkpoint in {workdir}: evaluating the initial (random) parameters")
  else:  # e.g. every checkpoint unreadable: random weights would look like a result
    raise guards.no_checkpoint_to_evaluate(workdir)
  return params


def load_stage_params(workdir: str, stage: str, like_params, missing_ok: bool = False):
  """Parameters of the latest checkpoint of a stage in another (or this) workdir."""
  directory = os.path.join(workdir, "ckpt", stage)
  if not os.path.isdir(directory):
    if missing_ok:
      return None
    raise ConfigError(f"no {stage} checkpoint under {directory} (config.sft.init_from)")
  ckpt = ckpt_lib.StageCheckpointer(directory)
  step, params, _ = ckpt.restore_latest(ckpt_lib.abstract_like(like_params))
  ckpt.close()
  if step is None and not missing_ok:
    raise ConfigError(f"no readable {stage} checkpoint in {directory} (config.sft.init_from)")
  return params
