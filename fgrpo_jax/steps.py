"""The pure, jitted steps of training: what a reader of the paper opens.

- `sft_step` / `decoupled_sft_step`: teacher forcing on gold sequences (gold_choices);
- `rl_step`: F-GRPO / GRPO — rollout, per-phase rewards, group advantages, clipped-
  surrogate updates, all on the device (rollout_rewards, rl_advantages, policy_update);
- `decoupled_step`: the selector / ranker baseline with the same sampling budget;
- the optimizer (AdamW, warmup + cosine over optimizer updates) and microbatching
  (gradient accumulation that gives the full batch's gradient).

Every step takes a TrainState and a batch (data.arrays.BATCH_KEYS, [B, ...]) and returns
(the next TrainState, metrics: dict of scalars: the loss, grad_norm and update_norm of the
first optimizer update of the step, param_norm after the last, and the step's own
diagnostics). The rollout, the reference log-probs and the update run under
jax.named_scope("rollout" / "reference_logprobs" / "update"), the names a profile
(config.profile_steps) shows. The loop that calls the steps is train.py.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fgrpo_jax import objectives
from fgrpo_jax import parse as parse_lib
from fgrpo_jax import rewards as R
from fgrpo_jax import rollout as rollout_lib
from fgrpo_jax.data.arrays import model_inputs
from fgrpo_jax.models import lora as lora_lib
from fgrpo_jax.models.decoders import decoder


class TrainState(NamedTuple):
  params: Any
  opt_state: Any
  step: jax.Array  # int32 scalar: steps done in this stage


# ----------------------------------------------------------------------------
# Optimizer.


def make_optimizer(optim, peak_lr: float, total_steps: int) -> optax.GradientTransformation:
  """AdamW with linear warmup, cosine decay and global-norm clipping.

  total_steps: the optimizer updates the schedule spans (a stage's steps times its
  updates per step, see config.stage_sizes).

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
  "relevant_first" writes the relevant ones first (most relevant first, ties in random
  order), so the model learns to write the candidate it is surest of first and the
  ranking can build on that order (the QA default: docs/experiments.md, "The order of
  the gold slate").
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


def tied_target_slots(choices, relevance):
  """The candidates exchangeable with each gold choice: choices int32 [B, G, T] (-1 at
  tags), relevance [B, C] -> bool [B, G, T, C], True where a slot is as relevant as
  the step's gold choice (> 0); at other steps only the choice itself. Intersected with
  the step's allowed slots (not yet written in this phase, in the slate when ranking)
  by `rollout.sequence_logprobs`, so every True slot is a correct next choice."""
  rel = relevance[:, None, None, :]  # [B, 1, 1, C]
  gold = jnp.take_along_axis(relevance[:, None], jnp.maximum(choices, 0), -1)  # [B, G, T]
  own = jax.nn.one_hot(choices, relevance.shape[-1], dtype=bool)  # -1 -> all False
  tied = (rel == gold[..., None]) & (gold > 0)[..., None] & (choices >= 0)[..., None]
  return tied | own


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


def repeated_updates(value_and_grad, params, opt_state, optimizer, n: int):
  """n optimizer updates in a row -> (params, opt_state, metrics of each update [n]).

  value_and_grad(params) -> ((loss, aux dict), grads) at the current params. The
  updates run as one lax.scan, so the forward/backward pass is compiled once whatever
  n is (an unrolled loop compiled n copies: rl.inner_steps PPO-style epochs and the
  SFT baselines' matching updates). Each update's metrics: loss, grad_norm,
  update_norm and the aux entries.
  """
  def update(carry, _):
    params, opt_state = carry
    (loss, aux), grads = value_and_grad(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "update_norm": optax.tree.norm(updates), **aux}
    return (optax.apply_updates(params, updates), opt_state), metrics

  (params, opt_state), metrics = jax.lax.scan(update, (params, opt_state), length=n)
  return params, opt_state, metrics


def sft_update(params, opt_state, batch, key, *, cfg, layout, optimizer,
               supervise="relevant", slate_order="random",
               phases=(R.PHASE_GEN, R.PHASE_RANK), grad_accum: int = 1, frozen=None,
               inner_steps: int = 1, prompt_lm_weight: float = 0.0,
               slot_relevance_weight: float = 0.0, tied_targets: bool = False):
  """One teacher-forcing update on gold sequences (G = 1) -> (params, opt_state, metrics).

  batch: dict of [B, ...] arrays (data.arrays.BATCH_KEYS).
  supervise: "relevant" puts the loss on the gold slate/ranking tokens that name a
  relevant candidate; "all" on every choice token of the gold sequence.
  slate_order: order of the gold slate (see gold_choices).
  phases: which phases carry loss (a decoupled selector learns only the slate).
  In free decoding the model writes the tags itself, so they carry loss too.
  grad_accum: microbatches of B / grad_accum rows per gradient (same result).
  frozen: None, or the lora.Frozen base when `params` are LoRA adapters.
  inner_steps: optimizer updates on this batch (the SFT baselines match RL's
  rl.inner_steps updates per step); metrics are those of the first.
  prompt_lm_weight: > 0 adds that times the next-token NLL of the prompt itself
  (`objectives.prompt_lm_loss`): a dense signal (every prompt token) next to the few
  supervised choice tokens; the gold sequence's loss is unchanged.
  slot_relevance_weight: > 0 adds that times a per-slot relevance loss read at each
  identifier's position in the prompt (`objectives.slot_relevance_loss`): C labels
  per example where the gold sequence has k + m pointers.
  tied_targets: a choice's loss is -log of the total probability of every allowed
  candidate as relevant as the gold one (`tied_target_slots`), not of the gold one
  alone: the gold order among equally relevant items is a coin flip, and the
  single-target loss would teach the model to split its mass between them.
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
  if prompt_lm_weight:
    counts["prompt"] = jnp.sum(objectives.prompt_lm_pairs(batch["prompt_mask"].astype(bool)))
  slot_data = {}
  if slot_relevance_weight:
    positions, present = objectives.slot_positions(
        batch["prompt"], batch["prompt_mask"].astype(bool), batch["cand_tokens"])
    slot_data = {"slot_positions": positions, "relevance": batch["relevance"],
                 "slot_valid": present & batch["pool_mask"].astype(bool)}
    counts["slots"] = jnp.sum(slot_data["slot_valid"]).astype(jnp.float32)
  # The slot loss reads the prompt positions of the same forward pass when it can.
  shared = bool(slot_relevance_weight) and layout.constrained

  def loss_fn(params, rows):
    model = lora_lib.model_params(params, frozen)
    out = rollout_lib.sequence_logprobs(model, model_inputs(rows), rows["choices"], cfg=cfg,
                                        layout=layout, with_prompt=shared,
                                        targets=rows.get("targets"))
    lp = out[0]
    ids = rows["phase_ids"]
    loss = objectives.sft_loss(lp, ids, phases, counts["loss"])
    # Per-phase NLL of the supervised tokens, for the logs.
    gen = objectives.sft_loss(lp, ids, (R.PHASE_GEN,), counts["gen"])
    rank = objectives.sft_loss(lp, ids, (R.PHASE_RANK,), counts["rank"])
    aux = {"nll_gen": gen, "nll_rank": rank}
    if prompt_lm_weight:
      mask = rows["prompt_mask"].astype(bool)
      logits = decoder(cfg).forward(model, rows["prompt"], cfg, mask)
      aux["nll_prompt"] = objectives.prompt_lm_loss(logits, rows["prompt"], mask,
                                                    counts["prompt"])
      loss = loss + prompt_lm_weight * aux["nll_prompt"]
    if slot_relevance_weight:
      slot_logits = out[2] if shared else decoder(cfg).prefill(
          model, rows["prompt"], cfg, rows["prompt_mask"], all_logits=True,
          columns=rows["cand_tokens"])[0]
      aux["bce_slots"] = objectives.slot_relevance_loss(
          slot_logits, rows["slot_positions"], rows["relevance"], rows["slot_valid"],
          counts["slots"])
      loss = loss + slot_relevance_weight * aux["bce_slots"]
    return loss, aux

  data = {**model_inputs(batch), "choices": choices, "phase_ids": phase_ids, **slot_data}
  if tied_targets:
    data["targets"] = tied_target_slots(choices, batch["relevance"])
  with jax.named_scope("update"):
    params, opt_state, each = repeated_updates(
        lambda p: accumulated_value_and_grad(loss_fn, p, data, grad_accum), params, opt_state,
        optimizer, inner_steps)
  metrics = jax.tree.map(lambda x: x[0], each)
  metrics["param_norm"] = optax.tree.norm(params)
  return params, opt_state, metrics


SFT_STATIC = ("cfg", "layout", "optimizer", "supervise", "slate_order", "grad_accum",
              "inner_steps", "prompt_lm_weight", "slot_relevance_weight", "tied_targets")


@functools.partial(jax.jit, static_argnames=SFT_STATIC, donate_argnums=0)
def sft_step(state: TrainState, batch, key, *, cfg, layout, optimizer, supervise="relevant",
             slate_order="random", grad_accum=1, frozen=None, inner_steps=1,
             prompt_lm_weight=0.0, slot_relevance_weight=0.0, tied_targets=False):
  """SFT of the one policy that writes both phases (frozen: the LoRA base or None)."""
  params, opt_state, metrics = sft_update(state.params, state.opt_state, batch, key, cfg=cfg,
                                          layout=layout, optimizer=optimizer,
                                          supervise=supervise, slate_order=slate_order,
                                          grad_accum=grad_accum, frozen=frozen,
                                          inner_steps=inner_steps,
                                          prompt_lm_weight=prompt_lm_weight,
                                          slot_relevance_weight=slot_relevance_weight,
                                          tied_targets=tied_targets)
  return TrainState(params, opt_state, state.step + 1), metrics


@functools.partial(jax.jit, static_argnames=SFT_STATIC, donate_argnums=0)
def decoupled_sft_step(state: TrainState, batch, key, *, cfg, layout, optimizer,
                       supervise="relevant", slate_order="random", grad_accum=1,
                       frozen=None, inner_steps=1, prompt_lm_weight=0.0,
                       slot_relevance_weight=0.0, tied_targets=False):
  """SFT of a decoupled pair: the selector on gold slates, the ranker on gold rankings."""
  out_p, out_o, metrics = {}, {}, {}
  for role, phases, half in (("selector", (R.PHASE_GEN,), True),
                             ("ranker", (R.PHASE_RANK,), False)):
    out_p[role], out_o[role], m = sft_update(
        state.params[role], state.opt_state[role], _half(batch, half), key, cfg=cfg,
        layout=layout, optimizer=optimizer, supervise=supervise, slate_order=slate_order,
        phases=phases, grad_accum=grad_accum, frozen=frozen, inner_steps=inner_steps,
        prompt_lm_weight=prompt_lm_weight, slot_relevance_weight=slot_relevance_weight,
        tied_targets=tied_targets)
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
    def ref_lp(rows):
      return rollout_lib.rollout_logprobs(ref_params, rows["mb"], rows["ro"], cfg=cfg,
                                          layout=layout, temperature=s.temperature)[0]
    with jax.named_scope("reference_logprobs"):
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

  def phase_grad_norms():
    # The surrogate is linear in the advantages: zeroing them off one phase's tokens
    # leaves that phase's part of the loss (the KL term is not part of either). Both
    # phases in one vmapped backward pass (compiled once, not twice).
    rows = {k: v for k, v in data.items() if k != "ref_lp"}

    def norm(phase):
      adv = jnp.where(ro.phase_ids == phase, token_adv, 0.0)
      _, g = accumulated_value_and_grad(loss_fn, params, {**rows, "adv": adv}, s.grad_accum)
      return optax.tree.norm(g)
    return tuple(jax.vmap(norm)(jnp.asarray([R.PHASE_GEN, R.PHASE_RANK])))

  with jax.named_scope("update"):
    diagnostics = {}
    if diagnose is not None:  # at the params before the first update, only on logged steps
      diagnostics["grad_norm_gen"], diagnostics["grad_norm_rank"] = jax.lax.cond(
          diagnose, phase_grad_norms, lambda: (jnp.zeros(()), jnp.zeros(())))
    # s.inner_steps static PPO-style epochs on the same rollouts.
    params, opt_state, each = repeated_updates(
        lambda p: accumulated_value_and_grad(loss_fn, p, data, s.grad_accum), params,
        opt_state, optimizer, s.inner_steps)
  metrics = {**jax.tree.map(lambda x: x[0], each), **diagnostics}
  metrics["param_norm"] = optax.tree.norm(params)
  # Where the ratio is no longer 1: the last update's clip fraction and drift.
  metrics["clip_frac"], metrics["approx_kl_old"] = each["clip_frac"][-1], each["approx_kl_old"][-1]
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
  mb = model_inputs(batch)
  with jax.named_scope("rollout"):
    ro = rollout_lib.sample(lora_lib.model_params(state.params, frozen), mb, key, cfg=cfg,
                            layout=layout, group_size=s.group_size, temperature=s.temperature)
  with jax.named_scope("rewards"):
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
  mb1 = model_inputs(b1)
  with jax.named_scope("rollout"):
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
  with jax.named_scope("rollout"):
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
# Reading a train state.


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
