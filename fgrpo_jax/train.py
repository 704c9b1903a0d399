"""Training: SFT warm start, then RL (F-GRPO or GRPO), then the test evaluation.

The step functions are pure and jitted: one RL step samples the rollouts, scores
them, builds per-phase advantages and updates the parameters without leaving the
device. `run` is the imperative shell: data order, logging, checkpoints, resume,
evaluation and eval.json.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fgrpo_jax import checkpoint as ckpt_lib
from fgrpo_jax import evaluate as eval_lib
from fgrpo_jax import guards
from fgrpo_jax import objectives
from fgrpo_jax import parse as parse_lib
from fgrpo_jax import rewards as R
from fgrpo_jax import rollout as rollout_lib
from fgrpo_jax import sharding
from fgrpo_jax import workdir_lock
from fgrpo_jax.data import tasks as tasks_lib
from fgrpo_jax.models import hf
from fgrpo_jax.models import llama
from fgrpo_jax.models.decoders import decoder
from fgrpo_jax.models import lora as lora_lib
from fgrpo_jax.errors import UserError
from fgrpo_jax.guards import check_finite_settings as _check_finite_settings

ALGORITHMS = ("fgrpo", "grpo", "decoupled", "decoupled_sft", "sft")
MODEL_KEYS = ("ids", "prompt", "prompt_mask", "cand_tokens", "pool_mask", "relevance")


class ConfigError(UserError):
  """A user mistake in the config: printed as one line by main."""


class TrainState(NamedTuple):
  params: Any
  opt_state: Any
  step: jax.Array  # int32 scalar: steps done in this stage


# ----------------------------------------------------------------------------
# Config -> static objects.


def validate_config(config, pool_size: int | None = None):
  """Stops on impossible settings with one line naming the field."""
  r = config.rollout
  if config.algorithm not in ALGORITHMS:
    raise ConfigError(f"config.algorithm={config.algorithm!r} is unknown "
                      f"(choose one of {', '.join(ALGORITHMS)})")
  if config.mode not in ("train", "eval"):
    raise ConfigError(f"config.mode={config.mode!r} is unknown (train or eval)")
  if r.group_size < 2 and config.algorithm != "sft":
    raise ConfigError(f"config.rollout.group_size={r.group_size}: group-relative advantages "
                      "need at least 2 rollouts per prompt")
  if r.slate_size < 1:
    raise ConfigError(f"config.rollout.slate_size={r.slate_size} must be at least 1")
  rank_k = config.reward.rank_k
  if not 0 <= rank_k <= r.rank_size:
    raise ConfigError(f"config.reward.rank_k={rank_k} must be between 0 (all ranked) and "
                      f"config.rollout.rank_size={r.rank_size}")
  if r.rank_size < 1 or r.rank_size > r.slate_size:
    raise ConfigError(f"config.rollout.rank_size={r.rank_size} must be between 1 and "
                      f"config.rollout.slate_size={r.slate_size}")
  C = pool_size or config.data.get("pool_size", None)
  if C is not None and C < 2:  # before the slate check, which would blame slate_size
    raise ConfigError(f"config.data.pool_size={C} must be at least 2")
  if C is not None and r.slate_size > C:
    raise ConfigError(f"config.rollout.slate_size={r.slate_size} exceeds the pool size "
                      f"C={C} (config.data.pool_size)")
  choices = {"reward.coverage": ("recall", "f1"), "reward.rank_metric": ("ndcg", "hit", "mrr"),
             "reward.gain": ("exp", "linear"), "reward.advantage": ("mean", "std", "rloo"),
             "rl.ratio": ("token", "phase"), "sft.supervise": ("relevant", "all"),
             "rl.loss_norm": ("phase", "joint"), "reward.rank_ideal": ("pool", "slate"),
             "sft.slate_order": ("random", "relevant_first"), "rl.kl_estimator": ("k1", "k3"),
             "model.dtype": ("float32", "bfloat16"), "model.remat": ("none", "full"),
             "data.loader": ("memory", "grain")}
  for field, allowed in choices.items():
    value = config_value(config, field)
    if value not in allowed:
      raise ConfigError(f"config.{field}={value!r} is unknown (choose one of "
                        f"{', '.join(allowed)})")
  for field in ("sft.steps", "rl.steps", "rollout.max_new_tokens", "reward.format_penalty"):
    if config_value(config, field) < 0:
      raise ConfigError(f"config.{field} must be >= 0")
  for field in ("rl.inner_steps", "eval.batch_size", "log_every", "sft.batch_size",
                "rl.batch_prompts"):
    value = config_value(config, field)
    if value < 1:
      raise ConfigError(f"config.{field}={value} must be >= 1")
  if not config.rollout.temperature > 0:
    raise ConfigError(f"config.rollout.temperature={config.rollout.temperature} must be > 0")
  if not r.constrained and config.algorithm in DECOUPLED:
    raise ConfigError(f"config.rollout.constrained=False: free decoding does not support "
                      f"config.algorithm={config.algorithm} (its ranker is given the slate)")
  n = config.optim.grad_accum
  if n < 1:
    raise ConfigError(f"config.optim.grad_accum={n} must be >= 1")
  bad = [f"{what} ({rows} rows)" for what, rows in update_batches(config) if rows % n]
  if bad:
    raise ConfigError(f"config.optim.grad_accum={n} must divide the batch of every gradient "
                      f"step; it does not divide {', '.join(bad)}")
  _validate_lora(config.model)
  _check_finite_settings(config)


def config_value(config, field: str):
  """config.<field> for a dotted field name ("rl.inner_steps")."""
  node = config
  for part in field.split("."):
    node = node[part]
  return node


def make_layout(task, config) -> rollout_lib.Layout:
  """The task's rollout layout for config.rollout: constrained, or free decoding with
  a token budget (config.rollout.max_new_tokens, 0 = twice a well-formed rollout)."""
  r = config.rollout
  layout = task.layout_fn(r.slate_size, r.rank_size)
  if r.constrained:
    return layout
  budget = r.max_new_tokens or 2 * layout.schedule_length
  if budget < layout.schedule_length:
    raise ConfigError(f"config.rollout.max_new_tokens={budget} is shorter than a well-formed "
                      f"rollout ({layout.schedule_length} tokens with the tags)")
  return dataclasses.replace(layout, constrained=False, max_new_tokens=budget)


def update_batches(config) -> list[tuple[str, int]]:
  """(description, rows) of the batches the stages of this config take gradients on.

  grad_accum splits each of them into microbatches. The RL stage splits prompts
  (with all their G rollouts); the decoupled pair updates each policy on one half.
  """
  out = []
  if config.sft.steps and not config.sft.init_from:
    out.append(("config.sft.batch_size", config.sft.batch_size))
  if config.rl.steps:
    B, G = config.rl.batch_prompts, config.rollout.group_size
    what, rows = (("config.rl.batch_prompts", B) if main_stage(config.algorithm) == "rl"
                  else ("config.rl.batch_prompts*config.rollout.group_size", B * G))
    if config.algorithm in DECOUPLED:
      out += [(f"half of {what} for each decoupled policy", half)
              for half in sorted({(rows + 1) // 2, rows // 2})]
    else:
      out.append((what, rows))
  return out


def _validate_lora(m):
  rank = m.get("lora_rank", 0)
  if not isinstance(rank, int) or rank < 0:
    raise ConfigError(f"config.model.lora_rank={rank!r} must be an integer >= 0 (0 = no LoRA)")
  if rank == 0:
    return
  if not m.lora_alpha > 0:
    raise ConfigError(f"config.model.lora_alpha={m.lora_alpha!r} must be > 0")
  try:
    lora_lib.parse_targets(m.lora_targets)
  except ValueError as e:
    raise ConfigError(f"config.model.lora_targets={m.lora_targets!r}: {e}") from None


def model_config(config, vocab_size: int) -> llama.ModelConfig:
  m = config.model
  return llama.ModelConfig(
      vocab_size=vocab_size, num_layers=m.num_layers, hidden=m.hidden, num_heads=m.num_heads,
      num_kv_heads=m.num_kv_heads, head_dim=m.head_dim, mlp_hidden=m.mlp_hidden,
      rope_theta=m.rope_theta, tie_embeddings=m.tie_embeddings, dtype=m.dtype, remat=m.remat)


def pretrained_model_config(config, vocab_size: int) -> llama.ModelConfig:
  """ModelConfig of config.model.hf_checkpoint (its config.json; the sizes in config.model
  are ignored), compute dtype config.model.dtype, remat config.model.remat."""
  path = config.model.hf_checkpoint
  try:
    hf_config, source = hf.read_hf_config(path)
    cfg = hf.config_from_hf(hf_config, dtype=config.model.dtype, source=str(source))
  except UserError as e:
    raise ConfigError(f"config.model.hf_checkpoint: {e}") from None
  if vocab_size > cfg.vocab_size:
    raise ConfigError(
        f"config.model.hf_checkpoint: the task's token ids need a vocabulary of {vocab_size} "
        f"but {source} has vocab_size={cfg.vocab_size}")
  return dataclasses.replace(cfg, remat=config.model.remat)


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


def make_optimizer(optim, peak_lr: float, total_steps: int) -> optax.GradientTransformation:
  """AdamW with linear warmup, cosine decay and global-norm clipping.

  total_steps: the optimizer updates the schedule spans (a stage's steps times its
  updates per step, see stage_sizes).

  Cached on its values: the optimizer is a static argument of the jitted steps, so
  an equal optimizer must be the same object for the compiled step to be reused.
  """
  return _optimizer(int(optim.warmup_steps), float(optim.weight_decay), float(optim.b1),
                    float(optim.b2), float(optim.grad_clip), float(optim.final_lr_frac),
                    float(peak_lr), int(total_steps))


def learning_rate_schedule(optim, peak_lr: float, total_steps: int):
  """The learning rate against the optimizer update count: linear warmup over
  optim.warmup_steps updates, then cosine decay to optim.final_lr_frac * peak at
  update total_steps (the stage's optimizer updates, not its steps)."""
  return _schedule(int(optim.warmup_steps), float(optim.final_lr_frac), float(peak_lr),
                   int(total_steps))


@functools.lru_cache(maxsize=None)
def _schedule(warmup_steps, final_lr_frac, peak_lr, total_steps):
  warmup = min(warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=peak_lr * final_lr_frac)


@functools.lru_cache(maxsize=None)
def _optimizer(warmup_steps, weight_decay, b1, b2, grad_clip, final_lr_frac, peak_lr,
               total_steps):
  schedule = _schedule(warmup_steps, final_lr_frac, peak_lr, total_steps)
  return optax.chain(
      optax.clip_by_global_norm(grad_clip),
      optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))


@dataclasses.dataclass(frozen=True)
class RLSettings:
  """Everything static an RL step needs (hashable, a jit static argument)."""

  algorithm: str
  group_size: int
  temperature: float
  coverage: str
  rank_metric: str
  gain: str
  lam: float
  advantage: str
  inner_steps: int
  loss: objectives.PolicyLossConfig
  format_penalty: float = 1.0  # subtracted from a malformed phase's reward (free decoding)
  grad_accum: int = 1  # microbatches per gradient (config.optim.grad_accum)
  loss_norm: str = "phase"  # phase: mean(slate) + lam*mean(rank) | joint: one mean, rank x lam
  rank_ideal: str = "pool"  # R_rank's ideal DCG over the pool | the rollout's own slate
  rank_k: int = 0  # R_rank's cut-off: the first rank_k ranked items (0 = all m)

  @classmethod
  def from_config(cls, config):
    rl = config.rl
    return cls(algorithm=config.algorithm, group_size=config.rollout.group_size,
               temperature=config.rollout.temperature, coverage=config.reward.coverage,
               rank_metric=config.reward.rank_metric, gain=config.reward.gain,
               lam=config.reward.lam, advantage=config.reward.advantage,
               inner_steps=rl.inner_steps, format_penalty=config.reward.format_penalty,
               loss_norm=rl.loss_norm, rank_ideal=config.reward.rank_ideal,
               rank_k=config.reward.rank_k,
               loss=objectives.PolicyLossConfig(
                   eps_low=rl.eps_low, eps_high=rl.eps_high, ratio=rl.ratio,
                   kl_coef=rl.kl_coef, kl_estimator=rl.kl_estimator),
               grad_accum=config.optim.grad_accum)


# ----------------------------------------------------------------------------
# Pure step functions.


def gold_choices(relevance, pool_mask, key, layout: rollout_lib.Layout,
                 slate_order: str = "random"):
  """A gold sequence for teacher forcing. relevance/pool_mask [B, C] -> choices [B, T].

  The gold slate holds the relevant candidates and random other pool members; the
  gold ranking is its top-m by relevance (relevant ones first). slate_order
  "random" shuffles the slate (its order carries no meaning, and the ranker must
  then find the relevant members instead of copying the first slate slots);
  "relevant_first" writes the relevant ones first.
  """
  k_fill, k_order = jax.random.split(key)
  noise = jax.random.uniform(k_fill, relevance.shape)
  # Sorted by relevance (any grades), ties in random order, pool padding last: a stable
  # sort by relevance of the slots already sorted by noise (padding by slot index).
  by_noise = jnp.argsort(-jnp.where(pool_mask, noise, -1.0), axis=-1, stable=True)
  rel = jnp.take_along_axis(jnp.where(pool_mask, relevance, -jnp.inf), by_noise, axis=-1)
  by_relevance = jnp.take_along_axis(
      by_noise, jnp.argsort(-rel, axis=-1, stable=True), axis=-1)[..., :layout.slate_size]
  ranking = by_relevance[..., :layout.rank_size]
  slate = by_relevance
  if slate_order == "random":
    perm = jnp.argsort(jax.random.uniform(k_order, by_relevance.shape), axis=-1)
    slate = jnp.take_along_axis(by_relevance, perm, axis=-1)
  return rollout_lib.choices_from_slate_ranking(slate, ranking, layout)


def _model_batch(batch):
  return {k: batch[k] for k in ("prompt", "prompt_mask", "cand_tokens", "pool_mask")}


def split_microbatches(tree, n: int):
  """Leaves [B, ...] -> [n, B/n, ...]; microbatch i holds rows i, i + n, i + 2n, ...

  Strided rather than contiguous: a batch split over devices keeps B/n/devices rows
  of every device in each microbatch, so no microbatch lives on a few devices only.
  """
  def split(x):
    return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, tree)


def merge_microbatches(tree):
  """Inverse of split_microbatches: leaves [n, B/n, ...] -> [B, ...] in the original order."""
  def merge(x):
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])
  return jax.tree.map(merge, tree)


def accumulated_value_and_grad(loss_fn, params, data, n: int):
  """((loss, aux), grads) of `loss_fn(params, data)`, summed over n microbatches.

  loss_fn(params, rows) -> (loss scalar, aux dict of scalars) must be *additive*
  over rows (a sum, or a mean normalised by a count of the whole batch, see
  objectives.token_counts): then the result equals the full-batch value and
  gradient. The microbatches run one after the other in a lax.scan inside the
  jitted step, so activations are kept for B/n rows at a time; gradients are
  accumulated in the parameters' dtype (float32 master weights). data: pytree of
  [B, ...] leaves, B divisible by n. n = 1 is the plain value_and_grad.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if n == 1:
    return grad_fn(params, data)
  micro = split_microbatches(data, n)
  first = jax.tree.map(lambda x: x[0], micro)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(grad_fn, params, first))

  def body(total, rows):
    return jax.tree.map(jnp.add, total, grad_fn(params, rows)), None

  total, _ = jax.lax.scan(body, zeros, micro)
  return total


def sft_update(params, opt_state, batch, key, *, cfg, layout, optimizer,
               supervise="relevant", slate_order="random",
               phases=(R.PHASE_GEN, R.PHASE_RANK), grad_accum: int = 1, frozen=None,
               inner_steps: int = 1):
  """One teacher-forcing update on gold sequences (G = 1) -> (params, opt_state, metrics).

  batch: dict of [B, ...] arrays (MODEL_KEYS[1:]).
  supervise: "relevant" puts the loss on the gold slate/ranking tokens that name a
  relevant candidate; "all" on every choice token of the gold sequence.
  slate_order: order of the gold slate (see gold_choices).
  phases: which phases carry loss (a decoupled selector learns only the slate).
  In free decoding the model writes the tags itself, so they carry loss too.
  grad_accum: microbatches of B / grad_accum rows per gradient (same result).
  frozen: None, or the lora.Frozen base when `params` are LoRA adapters.
  inner_steps: optimizer updates on this batch (the SFT baselines match RL's
  rl.inner_steps updates per step); metrics are those of the first.
  """
  if not layout.constrained:
    phases = (*phases, R.PHASE_TAG)
  choices = gold_choices(batch["relevance"], batch["pool_mask"], key, layout,
                         slate_order)[:, None]
  phase_ids = jnp.broadcast_to(jnp.asarray(layout.phase_ids), choices.shape)
  if supervise == "relevant":
    # Filler candidates of the gold slate are context, not targets: supervising
    # them would teach a uniform guess over the rest of the pool.
    rel = jnp.take_along_axis(batch["relevance"][:, None], jnp.maximum(choices, 0), -1)
    keep = ((choices >= 0) & (rel > 0)) | (phase_ids == R.PHASE_TAG)
    phase_ids = jnp.where(keep, phase_ids, R.PHASE_NONE)

  # Token counts of the whole batch: each microbatch's loss is its share of the mean.
  counts = {name: objectives.sft_token_count(phase_ids, p) for name, p in
            (("loss", phases), ("gen", (R.PHASE_GEN,)), ("rank", (R.PHASE_RANK,)))}

  def loss_fn(params, rows):
    lp, _ = rollout_lib.sequence_logprobs(lora_lib.model_params(params, frozen),
                                          _model_batch(rows), rows["choices"], cfg=cfg,
                                          layout=layout)
    ids = rows["phase_ids"]
    loss = objectives.sft_loss(lp, ids, phases, counts["loss"])
    # Per-phase NLL of the supervised tokens, for the logs.
    gen = objectives.sft_loss(lp, ids, (R.PHASE_GEN,), counts["gen"])
    rank = objectives.sft_loss(lp, ids, (R.PHASE_RANK,), counts["rank"])
    return loss, {"nll_gen": gen, "nll_rank": rank}

  data = {**_model_batch(batch), "choices": choices, "phase_ids": phase_ids}
  for i in range(inner_steps):
    (loss, aux), grads = accumulated_value_and_grad(loss_fn, params, data, grad_accum)
    if i == 0:
      metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  return params, opt_state, metrics


SFT_STATIC = ("cfg", "layout", "optimizer", "supervise", "slate_order", "grad_accum",
              "inner_steps")


@functools.partial(jax.jit, static_argnames=SFT_STATIC, donate_argnums=0)
def sft_step(state: TrainState, batch, key, *, cfg, layout, optimizer, supervise="relevant",
             slate_order="random", grad_accum=1, frozen=None, inner_steps=1):
  """SFT of the one policy that writes both phases (frozen: the LoRA base or None)."""
  params, opt_state, metrics = sft_update(state.params, state.opt_state, batch, key, cfg=cfg,
                                          layout=layout, optimizer=optimizer,
                                          supervise=supervise, slate_order=slate_order,
                                          grad_accum=grad_accum, frozen=frozen,
                                          inner_steps=inner_steps)
  return TrainState(params, opt_state, state.step + 1), metrics


@functools.partial(jax.jit, static_argnames=SFT_STATIC, donate_argnums=0)
def decoupled_sft_step(state: TrainState, batch, key, *, cfg, layout, optimizer,
                       supervise="relevant", slate_order="random", grad_accum=1,
                       frozen=None, inner_steps=1):
  """SFT of a decoupled pair: the selector on gold slates, the ranker on gold rankings."""
  out_p, out_o, metrics = {}, {}, {}
  for role, phases, half in (("selector", (R.PHASE_GEN,), True),
                             ("ranker", (R.PHASE_RANK,), False)):
    out_p[role], out_o[role], m = sft_update(
        state.params[role], state.opt_state[role], _half(batch, half), key, cfg=cfg,
        layout=layout, optimizer=optimizer, supervise=supervise, slate_order=slate_order,
        phases=phases, grad_accum=grad_accum, frozen=frozen, inner_steps=inner_steps)
    metrics.update({f"{role}_{k}": v for k, v in m.items()})
  metrics["loss"] = metrics["selector_loss"] + metrics["ranker_loss"]
  metrics["grad_norm"] = metrics["selector_grad_norm"] + metrics["ranker_grad_norm"]
  return TrainState(out_p, out_o, state.step + 1), metrics


def rollout_rewards(ro: rollout_lib.Rollout, relevance, s: RLSettings, rank_size: int):
  """Per-phase rewards of a rollout: relevance [B, C] -> (r_gen, r_rank, rank_ok) [B, G].

  A malformed slate (ranking) part of a free-decoding rollout loses
  s.format_penalty from R_gen (R_rank); constrained rollouts are always well formed.
  rank_ok: where R_rank is defined — everywhere with s.rank_ideal="pool"; with
  "slate", only where the rollout's slate holds a relevant candidate (elsewhere
  R_rank is 0 and the factorised algorithms leave the rank tokens out).
  """
  rel = relevance[:, None]
  r_gen, r_rank = R.phase_rewards(ro.slate, ro.ranking, rel, coverage_mode=s.coverage,
                                  rank_metric=s.rank_metric, rank_k=s.rank_k or rank_size,
                                  gain=s.gain,
                                  rank_ideal=s.rank_ideal)
  pen_gen, pen_rank = parse_lib.phase_penalties(ro.errors, s.format_penalty)
  rank_ok = (R.rank_defined(ro.slate, rel) if s.rank_ideal == "slate"
             else jnp.ones(r_rank.shape, bool))
  return r_gen + pen_gen, r_rank + pen_rank, rank_ok


def rl_advantages(r_gen, r_rank, rank_ok, phase_ids, s: RLSettings):
  """(token advantages [B, G, T], per-rollout advantages, loss phase ids [B, G, T]).

  The loss phase ids drop the rank tokens of rollouts whose R_rank is undefined
  (rank_ok False, reward.rank_ideal="slate") from the factorised rank loss; GRPO's
  one joint reward has no such case (an undefined R_rank counts 0 in it).
  Under rl.loss_norm="joint" the rank tokens' advantages carry the lambda weight
  (one mean over all choice tokens); under "phase" the loss weights the phase means.
  """
  if s.algorithm == "grpo":
    token_adv, adv = objectives.grpo_advantages(r_gen, r_rank, phase_ids, lam=s.lam,
                                                mode=s.advantage)
    loss_ids = phase_ids
  else:
    token_adv, adv = objectives.fgrpo_advantages(r_gen, r_rank, phase_ids, mode=s.advantage,
                                                 rank_mask=rank_ok)
    loss_ids = objectives.drop_rank_tokens(phase_ids, rank_ok)
  if s.loss_norm == "joint":
    token_adv = jnp.where(phase_ids == R.PHASE_RANK, s.lam * token_adv, token_adv)
  return token_adv, adv, loss_ids


def loss_groups(s: RLSettings):
  """The phase groups of the clipped surrogate: the same for every algorithm, so that
  F-GRPO and GRPO differ only in their advantages (rl.loss_norm)."""
  return objectives.fgrpo_groups(s.lam) if s.loss_norm == "phase" else objectives.JOINT_GROUPS


def group_diagnostics(r_gen, r_rank, rank_ok, s: RLSettings):
  """Per-step diagnostics of credit assignment, for any algorithm. [B, G] -> scalars.

  adv_{gen,rank}_var: mean within-group variance of the per-phase advantages (those
  F-GRPO uses, whatever the algorithm); zero_{gen,rank}_groups: fraction of groups
  where that phase's advantage is 0 for every rollout (nothing to learn from);
  reward_corr: mean within-group correlation of R_gen and R_rank over the groups
  where both vary (1 = one reward would say the same as two); corr_groups: the
  fraction of groups where both vary.
  """
  a_gen = R.group_advantages(r_gen, mode=s.advantage)
  a_rank = R.group_advantages(r_rank, mode=s.advantage, mask=rank_ok)
  out = {}
  for name, a in (("gen", a_gen), ("rank", a_rank)):
    out[f"adv_{name}_var"] = jnp.mean(jnp.var(a, axis=-1))
    out[f"zero_{name}_groups"] = jnp.mean(jnp.all(a == 0, axis=-1))
  dg = r_gen - jnp.mean(r_gen, axis=-1, keepdims=True)
  dr = r_rank - jnp.mean(r_rank, axis=-1, keepdims=True)
  sg, sr = jnp.sqrt(jnp.mean(dg * dg, -1)), jnp.sqrt(jnp.mean(dr * dr, -1))
  both = (sg > 1e-6) & (sr > 1e-6)
  corr = jnp.mean(dg * dr, -1) / jnp.where(both, sg * sr, 1.0)
  out["reward_corr"] = jnp.sum(jnp.where(both, corr, 0.0)) / jnp.maximum(jnp.sum(both), 1)
  out["corr_groups"] = jnp.mean(both)
  out["rank_defined"] = jnp.mean(rank_ok)
  return out


def _stats(prefix, x):
  return {f"{prefix}_mean": jnp.mean(x), f"{prefix}_std": jnp.std(x)}


def policy_update(params, opt_state, mb, ro: rollout_lib.Rollout, token_adv, groups, ref_params,
                  *, cfg, layout, optimizer, settings: RLSettings, frozen=None, diagnose=None):
  """`settings.inner_steps` clipped-surrogate updates of one policy on its rollouts.

  mb: model inputs of B prompts; ro: their rollouts [B, G, ...]; token_adv f32
  [B, G, T]. Each gradient is accumulated over `settings.grad_accum` microbatches
  of B / grad_accum prompts (with all their G rollouts); the losses are normalised
  by token counts of the whole batch, so the gradient is the full batch's.
  frozen: None, or the lora.Frozen base when `params` are LoRA adapters.
  diagnose: None, or a traced bool: when True, also the gradient norms of the
  slate-token and rank-token parts of the loss (grad_norm_gen / grad_norm_rank).

  Returns (params, opt_state, metrics) — metrics of the first inner step, plus the
  clip fraction and drift of the last (where the ratio is no longer 1).
  """
  s = settings
  data = {"mb": mb, "ro": ro, "adv": token_adv}  # split into microbatches along B
  if ref_params is not None:  # per microbatch too: free decoding's logits are [.., V] wide
    ref_lp = lambda rows: rollout_lib.rollout_logprobs(
        ref_params, rows["mb"], rows["ro"], cfg=cfg, layout=layout,
        temperature=s.temperature)[0]
    data["ref_lp"] = merge_microbatches(
        jax.lax.map(ref_lp, split_microbatches({"mb": mb, "ro": ro}, s.grad_accum)))
  counts = objectives.token_counts(ro.phase_ids, groups)  # of the whole batch

  def loss_fn(params, rows):
    lp, ent = rollout_lib.rollout_logprobs(lora_lib.model_params(params, frozen), rows["mb"],
                                           rows["ro"], cfg=cfg, layout=layout,
                                           temperature=s.temperature)
    ro_rows = rows["ro"]
    loss, aux = objectives.clipped_surrogate(lp, ro_rows.logprobs, rows["adv"],
                                             ro_rows.phase_ids, groups, s.loss,
                                             rows.get("ref_lp"), counts=counts)
    trained = jnp.isin(ro_rows.phase_ids, jnp.asarray([p for ids, _ in groups for p in ids]))
    aux["entropy"] = jnp.sum(ent * trained) / jnp.maximum(counts[-1], 1)
    return loss, aux

  def phase_grad_norm(phase):
    # The surrogate is linear in the advantages: zeroing them off one phase's tokens
    # leaves that phase's part of the loss (the KL term is not part of either).
    rows = {**data, "adv": jnp.where(ro.phase_ids == phase, token_adv, 0.0)}
    rows.pop("ref_lp", None)
    _, g = accumulated_value_and_grad(loss_fn, params, rows, s.grad_accum)
    return optax.tree.norm(g)

  for i in range(s.inner_steps):  # a few static PPO-style epochs on the same rollouts
    (loss, aux), grads = accumulated_value_and_grad(loss_fn, params, data, s.grad_accum)
    if i == 0:
      metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
      if diagnose is not None:  # two extra backward passes, only on logged steps
        metrics["grad_norm_gen"], metrics["grad_norm_rank"] = jax.lax.cond(
            diagnose, lambda: (phase_grad_norm(R.PHASE_GEN), phase_grad_norm(R.PHASE_RANK)),
            lambda: (jnp.zeros(()), jnp.zeros(())))
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  metrics["clip_frac"], metrics["approx_kl_old"] = aux["clip_frac"], aux["approx_kl_old"]
  return params, opt_state, metrics


def _advantage_stats(adv):
  out = {}
  for name, a in adv.items():
    out[f"{name}_abs_mean"] = jnp.mean(jnp.abs(a))
    out[f"{name}_zero_groups"] = jnp.mean(jnp.all(a == 0, axis=-1))
  return out


@functools.partial(jax.jit, static_argnames=("cfg", "layout", "optimizer", "settings"),
                   donate_argnums=0)
def rl_step(state: TrainState, ref_params, batch, key, diagnose=None, *, cfg, layout,
            optimizer, settings: RLSettings, frozen=None):
  """F-GRPO / GRPO: rollout -> rewards -> group advantages -> clipped-surrogate updates.

  The two algorithms share the rollout, the rewards and the loss (settings.loss_norm);
  they differ only in the advantages (rl_advantages).
  diagnose: None, or a traced bool; True adds the per-phase gradient norms (the
  loop passes True on logged steps; None compiles without them).
  frozen: None, or the lora.Frozen base when state.params are LoRA adapters.
  """
  s = settings
  mb = _model_batch(batch)
  ro = rollout_lib.sample(lora_lib.model_params(state.params, frozen), mb, key, cfg=cfg,
                          layout=layout, group_size=s.group_size, temperature=s.temperature)
  r_gen, r_rank, rank_ok = rollout_rewards(ro, batch["relevance"], s, layout.rank_size)
  token_adv, adv, loss_ids = rl_advantages(r_gen, r_rank, rank_ok, ro.phase_ids, s)
  params, opt_state, metrics = policy_update(
      state.params, state.opt_state, mb, ro._replace(phase_ids=loss_ids), token_adv,
      loss_groups(s), ref_params, cfg=cfg, layout=layout, optimizer=optimizer, settings=s,
      frozen=frozen, diagnose=diagnose)
  metrics.update(**_stats("reward_gen", r_gen), **_stats("reward_rank", r_rank),
                 **_advantage_stats(adv), **group_diagnostics(r_gen, r_rank, rank_ok, s),
                 format_valid=jnp.mean(parse_lib.validity(ro.errors)))
  return TrainState(params, opt_state, state.step + 1), metrics


def _half(batch, first: bool):
  n = jax.tree.leaves(batch)[0].shape[0]
  cut = (n + 1) // 2
  return jax.tree.map(lambda x: x[:cut] if first else x[cut:], batch)


@functools.partial(jax.jit, static_argnames=("cfg", "layout", "optimizer", "settings"),
                   donate_argnums=0)
def decoupled_step(state: TrainState, ref_params, batch, key, diagnose=None, *, cfg, layout,
                   optimizer, settings: RLSettings, frozen=None):
  """Decoupled pipeline: a selector (R_gen) and a ranker (R_rank) as two policies.

  params = {"selector": ..., "ranker": ...}. The sampling budget equals F-GRPO's:
  B*G sampled sequences and settings.inner_steps updates of each policy per step.
  On the first B/2 prompts the selector samples G rollouts each (B*G/2 sequences);
  the ranker samples G rankings (B*G/2 sequences) of the slate of the selector's
  first rollout of the same prompt, so it learns on the slates the selector really
  writes and no sequence is sampled outside the budget. The batch's other half is
  not used (each policy sees B/2 prompts per step).
  With LoRA (frozen = the base) the two roles are two adapter sets on one base.
  diagnose: unused (the two policies' gradients are per phase already).
  """
  del diagnose
  s = settings
  k_sel, k_rank = jax.random.split(key)
  sel, rnk = state.params["selector"], state.params["ranker"]
  ref = {"selector": ref_params, "ranker": ref_params}
  view = functools.partial(lora_lib.model_params, frozen=frozen)

  b1 = _half(batch, True)
  mb1 = _model_batch(b1)
  ro = rollout_lib.sample(view(sel), mb1, k_sel, cfg=cfg, layout=layout,
                          group_size=s.group_size, temperature=s.temperature)
  r_gen, _, _ = rollout_rewards(ro, b1["relevance"], s, layout.rank_size)
  a_gen = R.group_advantages(r_gen, mode=s.advantage)
  adv = R.token_advantages(ro.phase_ids, {R.PHASE_GEN: a_gen})
  sel, sel_opt, m_sel = policy_update(
      sel, state.opt_state["selector"], mb1, ro, adv, (((R.PHASE_GEN,), 1.0),),
      ref["selector"], cfg=cfg, layout=layout, optimizer=optimizer, settings=s, frozen=frozen)

  # The ranker ranks slates the selector sampled above (its first rollout per
  # prompt), on the same prompts: B*G sequences in all, like F-GRPO.
  slate = ro.slate[:, 0]
  ro2 = rollout_lib.sample(view(rnk), mb1, k_rank, cfg=cfg, layout=layout,
                           group_size=s.group_size, temperature=s.temperature,
                           given_slate=slate)
  _, r_rank, rank_ok = rollout_rewards(ro2, b1["relevance"], s, layout.rank_size)
  a_rank = R.group_advantages(r_rank, mode=s.advantage, mask=rank_ok)
  adv2 = R.token_advantages(ro2.phase_ids, {R.PHASE_RANK: a_rank})
  ro2 = ro2._replace(phase_ids=objectives.drop_rank_tokens(ro2.phase_ids, rank_ok))
  rnk, rnk_opt, m_rnk = policy_update(rnk, state.opt_state["ranker"], mb1, ro2, adv2,
                                      (((R.PHASE_RANK,), 1.0),), ref["ranker"], cfg=cfg,
                                      layout=layout, optimizer=optimizer, settings=s,
                                      frozen=frozen)
  metrics = {**{f"selector_{k}": v for k, v in m_sel.items()},
             **{f"ranker_{k}": v for k, v in m_rnk.items()},
             "grad_norm": m_sel["grad_norm"] + m_rnk["grad_norm"],
             "grad_norm_gen": m_sel["grad_norm"], "grad_norm_rank": m_rnk["grad_norm"],
             "clip_frac": (m_sel["clip_frac"] + m_rnk["clip_frac"]) / 2,
             "entropy": (m_sel["entropy"] + m_rnk["entropy"]) / 2,
             **_stats("reward_gen", r_gen), **_stats("reward_rank", r_rank),
             **_advantage_stats({"adv_gen": a_gen, "adv_rank": a_rank}),
             **group_diagnostics(r_gen, r_rank, rank_ok, s)}
  return TrainState({"selector": sel, "ranker": rnk},
                    {"selector": sel_opt, "ranker": rnk_opt}, state.step + 1), metrics


# ----------------------------------------------------------------------------
# The imperative shell.


def batch_indices(seed: int, stage: int, step: int, n: int, batch_size: int) -> np.ndarray:
  """Example indices of a step: epoch-wise permutations, a pure function of the step.

  Being stateless, the data order needs no iterator state to resume exactly.
  """
  start = step * batch_size
  idx = []
  while len(idx) < batch_size:
    epoch, offset = divmod(start + len(idx), n)
    perm = np.random.default_rng([seed, stage, epoch]).permutation(n)
    idx.extend(perm[offset:offset + batch_size - len(idx)].tolist())
  return np.asarray(idx, np.int64)


def host_batch(arrays, idx):
  """The model inputs of rows idx, as numpy (this host's part of a global batch)."""
  return {k: arrays[k][idx] for k in MODEL_KEYS[1:]}


def take_batch(arrays, idx):
  return {k: jnp.asarray(v) for k, v in host_batch(arrays, idx).items()}


def _subset(arrays, n: int, seed: int):
  total = arrays["prompt"].shape[0]
  if not n or n >= total:
    return arrays
  idx = np.sort(np.random.default_rng(seed).choice(total, n, replace=False))
  return {k: v[idx] for k, v in arrays.items()}


class ConsoleLog:
  """One readable line per log step: stage, step/total, key metrics, speed, ETA."""

  def __init__(self, stage: str, total: int, start_step: int):
    self.stage, self.total = stage, total
    self.t0, self.s0 = time.time(), start_step

  def line(self, step: int, metrics: dict, keys) -> str:
    elapsed = time.time() - self.t0
    rate = (step - self.s0) / max(elapsed, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    parts = [f"{k} {metrics[k]:.4g}" for k in keys if k in metrics]
    return (f"[{self.stage}] step {step}/{self.total} | " + " ".join(parts)
            + f" | {rate:.2f} steps/s | ETA {eta:.0f}s")


def _write_metrics(writer, step, metrics):
  if writer is not None:
    writer.write_scalars(step, {k: float(v) for k, v in metrics.items()})


def _make_writer(workdir, log=print):
  """clu's TensorBoard writer, or None (metrics.jsonl only) where TensorFlow does not
  import, e.g. a notebook runtime whose own TensorFlow conflicts with ours."""
  try:
    from clu import metric_writers  # imports TensorFlow for event files; keep it lazy
  except ImportError as e:
    log(f"[log] TensorBoard writer off ({e}); metrics go to metrics.jsonl only")
    return None
  return metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=False)


RL_ALGORITHMS = ("fgrpo", "grpo", "decoupled")
RUN_CONFIG = "run_config.json"  # the run's config and task vocabulary, for fgrpo_jax.export
DECOUPLED = ("decoupled", "decoupled_sft")


def main_stage(algorithm: str) -> str:
  """Name of the stage after the SFT warm start: RL, or more SFT for SFT baselines."""
  return "rl" if algorithm in RL_ALGORITHMS else "sft_more"


def _stage_step(stage: str, config, cfg, layout, optimizer):
  """(jitted step, its static kwargs, whether it takes ref_params, log keys) of a stage."""
  alg = config.algorithm
  static = {"cfg": cfg, "layout": layout, "optimizer": optimizer}
  if stage == "rl":
    keys = ("reward_gen_mean", "reward_rank_mean", "zero_gen_groups", "reward_corr",
            "clip_frac", "entropy", "grad_norm_gen", "grad_norm_rank", "lr")
    if not config.rollout.constrained:
      keys += ("format_valid",)
    fn = decoupled_step if alg == "decoupled" else rl_step
    return fn, {**static, "settings": RLSettings.from_config(config)}, True, keys
  fn = decoupled_sft_step if (stage == "sft_more" and alg == "decoupled_sft") else sft_step
  return (fn, {**static, "supervise": config.sft.supervise,
               "slate_order": config.sft.slate_order, "grad_accum": config.optim.grad_accum,
               "inner_steps": stage_sizes(stage, config).updates_per_step},
          False,
          ("loss", "nll_gen", "nll_rank", "grad_norm", "lr"))


class StageSizes(NamedTuple):
  steps: int  # steps of the stage (each: one batch)
  batch_size: int  # rows per step: sequences (SFT) or prompts (RL, with G rollouts each)
  lr: float  # peak learning rate
  updates_per_step: int  # optimizer updates per step (on the same batch)

  @property
  def updates(self) -> int:
    """Optimizer updates of the stage: the length of its learning-rate schedule."""
    return self.steps * self.updates_per_step


def stage_sizes(stage: str, config) -> StageSizes:
  """The sizes of a stage. The budget rule of the stage after the warm start: every
  algorithm gets the same rl.steps steps, rl.inner_steps optimizer updates per step,
  peak rate rl.lr (each algorithm's own value from the sweep) and B*G sequences per
  step — sampled rollouts for RL, gold sequences for the SFT baselines."""
  if stage == "sft":
    return StageSizes(config.sft.steps, config.sft.batch_size, config.sft.lr, 1)
  rl = config.rl
  if stage == "rl":
    return StageSizes(rl.steps, rl.batch_prompts, rl.lr, rl.inner_steps)
  return StageSizes(rl.steps, rl.batch_prompts * config.rollout.group_size, rl.lr,
                    rl.inner_steps)


def optimizer_updates(opt_state) -> int:
  """Optimizer updates applied so far (optax's step counters; the largest, so that a
  decoupled pair's two optimizers, which advance together, count once)."""
  counts = [int(v) for _, v in optax.tree_utils.tree_get_all_with_path(opt_state, "count")]
  return max(counts, default=0)


def policy_params(params, frozen):
  """The params the model runs with: merges LoRA adapters (each role's, for a pair)."""
  if frozen is not None and isinstance(params, dict) and "selector" in params:
    return {role: lora_lib.merged(p, frozen) for role, p in params.items()}
  return lora_lib.merged(params, frozen)


def append_jsonl(path: str, record: dict) -> None:
  if jax.process_index() == 0:
    with open(path, "a") as f:
      f.write(json.dumps(record) + "\n")


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
  optimizer = make_optimizer(config.optim, sizes.lr, sizes.updates)
  schedule = learning_rate_schedule(config.optim, sizes.lr, sizes.updates)
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
  step_fn, static, takes_ref, keys = _stage_step(stage, config, cfg, layout, optimizer)
  ckpt = ckpt_lib.StageCheckpointer(os.path.join(workdir, "ckpt", stage),
                                    keep=config.ckpt_keep, every=config.ckpt_every)
  state = TrainState(params, opt_state, jax.device_put(jnp.zeros((), jnp.int32), rep))
  step0, r_params, r_opt = ckpt.restore_latest(ckpt_lib.abstract_like(state.params),
                                               ckpt_lib.abstract_like(state.opt_state))
  if step0 is not None:
    state = TrainState(r_params, r_opt, jax.device_put(jnp.asarray(step0, jnp.int32), rep))
    log(f"[{stage}] resumed from step {step0} ({ckpt.directory})")
  if mesh.size > 1:  # keep the state's layout fixed from step to step
    step_fn = sharding.pin_state_shardings(step_fn, sharding.train_state_shardings(state, mesh),
                                           static_argnames=tuple(static))
  ref_args = (ref_params,) if takes_ref else ()
  start = int(state.step)
  stage_id = ("sft", "rl", "sft_more").index(stage)
  stream = _train_stream(task, config, stage, stage_id, batch_size, start, workdir, log)
  train = task.splits["train"]
  val = _subset(task.splits["validation"], config.eval.val_examples, config.seed)
  n_train = train["prompt"].shape[0]
  base_key = jax.random.fold_in(jax.random.key(config.seed), stage_id)
  console = ConsoleLog(stage, total, start)
  history = os.path.join(workdir, "metrics.jsonl")
  gen_tokens = batch_size * config.rollout.group_size * layout.length
  t_last, step_last = time.time(), start
  # Leaving by an exception (an interrupt, a divergence) still waits for the
  # checkpoint being written, so the next run never finds a half-saved step.
  try:
    for step in range(start, total):
      if stream is None:
        idx = batch_indices(config.seed, stage_id, step, n_train, batch_size)
        rows = host_batch(train, idx[sharding.process_batch_slice(batch_size)])
      else:  # this host's rows, read from its shard of the array_record files
        rows = {k: v for k, v in next(stream).items() if k in MODEL_KEYS}
      batch = sharding.shard_batch(rows, mesh)
      done = step + 1
      log_now = done % config.log_every == 0 or done == total
      extra = {"diagnose": jnp.asarray(log_now)} if takes_ref else {}
      state, metrics = step_fn(state, *ref_args, batch, jax.random.fold_in(base_key, step),
                               frozen=frozen, **extra, **static)
      if log_now:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        # The schedule's rate for the next update, and the updates applied so far.
        metrics["opt_updates"] = optimizer_updates(state.opt_state)
        metrics["lr"] = float(schedule(metrics["opt_updates"]))
        now = time.time()
        metrics["steps_per_s"] = (done - step_last) / max(now - t_last, 1e-9)
        if stage == "rl":
          metrics["gen_tokens_per_s"] = metrics["steps_per_s"] * gen_tokens
        t_last, step_last = now, done
        _write_metrics(writer, done, {f"{stage}/{k}": v for k, v in metrics.items()})
        append_jsonl(history, {"stage": stage, "step": done, **metrics})
        log(console.line(done, metrics, keys))
      saving = ckpt.due(done, force=(done == total))
      if saving or done % config.log_every == 0:  # never checkpoint a diverged state
        guards.check_finite_step(stage, done, metrics, ckpt, state.params if saving else None)
      if config.eval.every and (done % config.eval.every == 0 or done == total):
        val_metrics = eval_lib.evaluate_model(policy_params(state.params, frozen), val, cfg=cfg,
                                              layout=layout, batch_size=config.eval.batch_size,
                                              gain=config.reward.gain, mesh=mesh)
        _write_metrics(writer, done, {f"{stage}/val_{k}": v for k, v in val_metrics.items()})
        append_jsonl(history, {"stage": stage, "step": done,
                               **{f"val_{k}": v for k, v in val_metrics.items()}})
        log(f"[{stage}] step {done}/{total} | validation hit@1 {val_metrics['hit@1']:.4f} "
            f"ndcg@5 {val_metrics['ndcg@5']:.4f} slate_recall {val_metrics['slate_recall']:.4f}")
      saved = ckpt.save(done, state.params, state.opt_state, force=(done == total))
      if saved and stream is not None:
        _save_stream_state(workdir, stage, done, stream.get_state())
  finally:
    ckpt.close()
  return state.params


def _stream_state_path(workdir: str, stage: str, step: int) -> str:
  return os.path.join(workdir, "ckpt", f"{stage}_data", f"{step}.{jax.process_index()}.json")


def _save_stream_state(workdir: str, stage: str, step: int, state) -> None:
  """The grain iterator state of this host at a checkpointed step (temp file + rename)."""
  path = _stream_state_path(workdir, stage, step)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  write_json_atomic(path, state)


def _train_stream(task, config, stage: str, stage_id: int, batch_size: int, start: int,
                  workdir: str, log):
  """config.data.loader="grain": this host's iterator over the training split, positioned
  at step `start` (from its saved state, else by replaying `start` batches). None for
  the in-memory loader. run() has checked that the task can stream."""
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


EVAL_EXAMPLES = "eval_examples.npz"  # per-example test metrics of the final evaluation


def write_npz_atomic(path: str, arrays: dict) -> None:
  """np.savez through a temporary file and a rename."""
  tmp = f"{path}.tmp.{os.getpid()}.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def write_json_atomic(path: str, obj) -> None:
  """Writes JSON through a temporary file and a rename: never a half file."""
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


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
  r_gen = np.asarray(R.coverage(slate, sub["relevance"], mode=config.reward.coverage))
  r_rank = np.asarray(R.ndcg(ranking, sub["relevance"], gain=config.reward.gain))
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
  validate_config(config, pool_size=task.pool_size)
  layout = make_layout(task, config)
  mesh = sharding.make_mesh(config.get("mesh"))
  shards = sharding.batch_shards(mesh)
  for field in ("sft.batch_size", "rl.batch_prompts", "eval.batch_size"):
    if config_value(config, field) % shards:
      raise ConfigError(f"config.{field}={config_value(config, field)} must be a multiple of "
                        f"data*fsdp={shards} (config.mesh)")
  if shards % jax.process_count():
    # Each process feeds its own rows; a batch replicated across processes would
    # receive different data on each of them.
    raise ConfigError(f"config.mesh: the batch axes data*fsdp={shards} must be a multiple of "
                      f"the {jax.process_count()} processes")
  if config.data.get("loader", "memory") == "grain" and task.stream is None:
    why = ("chat prompts are built in memory (config.prompt.format)" if
           task.info.get("prompt") == "chat" else f"{task.dataset} is generated in memory")
    raise ConfigError(f"config.data.loader=grain streams prepared data, but {why}; use "
                      "config.data.loader=memory")
  n = config.optim.grad_accum
  for what, rows in update_batches(config) if n > 1 else ():
    if (rows // n) % shards:
      raise ConfigError(f"config.optim.grad_accum={n} leaves microbatches of {rows // n} rows "
                        f"of {what} ({rows} rows), not a multiple of data*fsdp={shards} "
                        "(config.mesh)")
  cfg, params, frozen = build_model(config, task.vocab_size, mesh, log)
  log(f"task {task.dataset}: {task.info} | model {llama.count_params(decoder(cfg).param_shapes(cfg))/1e6:.2f}M"
      f" params | devices {jax.devices()}")
  writer = _make_writer(workdir, log) if jax.process_index() == 0 else None
  if jax.process_index() == 0:  # what fgrpo_jax.export needs to rebuild the model
    guards.warn_config_changes(workdir, RUN_CONFIG, config, log)
    write_json_atomic(os.path.join(workdir, RUN_CONFIG),
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
  params = policy_params(params, frozen)

  test = _subset(task.splits["test"], config.eval.test_examples, config.seed + 1)
  metrics, rows = eval_lib.evaluate_model(params, test, cfg=cfg, layout=layout,
                                          batch_size=config.eval.batch_size,
                                          gain=config.reward.gain, mesh=mesh, per_example=True)
  oracle, refs = reference_metrics(task, test, config)
  steps = (0 if config.sft.init_from else config.sft.steps) + config.rl.steps
  result = {"algorithm": config.algorithm, "task": task.name, "dataset": task.dataset,
            "split": "test", "metrics": metrics, "oracle": oracle, "references": refs,
            "steps": int(steps) if config.mode == "train" else 0,
            "num_examples": int(test["prompt"].shape[0]),
            "wall_time_s": round(time.time() - t_start, 1)}
  if jax.process_index() == 0:
    # Per-example test metrics, in the order of the test subset (the same examples
    # for every run of a seed): fgrpo_jax.compare pairs runs on them.
    write_npz_atomic(os.path.join(workdir, EVAL_EXAMPLES), rows)
    write_json_atomic(os.path.join(workdir, "eval.json"), result)
    if writer is not None:
      _write_metrics(writer, steps, {f"test/{k}": v for k, v in metrics.items()})
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
