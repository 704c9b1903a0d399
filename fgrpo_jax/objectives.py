"""Losses: F-GRPO, GRPO, the decoupled selector/ranker pair, and SFT.

All functions are pure and take per-token arrays shaped [B, G, T] (B prompts, G
rollouts each, T generated positions). Losses are *minimised*; the RL objectives
return the negated surrogate.

F-GRPO (per phase p in {gen, rank}, with its own group-relative advantage A_p):

    L_p = mean over phase-p tokens of  min(rho_t A_p, clip(rho_t, 1-eps_low, 1+eps_high) A_p)
    J   = L_gen + lambda * L_rank,     loss = -J + beta * KL

GRPO uses one advantage of the joint reward R_gen + lambda R_rank on every choice
token. The loss normalisation is a separate choice shared by both (rl.loss_norm):
"phase" is J above, "joint" one mean over all choice tokens with the rank tokens'
advantages scaled by lambda; so F-GRPO and GRPO can differ in their advantages only.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from fgrpo_jax import rewards as R


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
  """Static settings of the clipped surrogate (see configs/recsys.py `rl`)."""

  eps_low: float = 0.2
  eps_high: float = 0.28
  ratio: str = "token"  # "token" | "phase": one ratio per sequence and phase group
  kl_coef: float = 0.0
  kl_estimator: str = "k3"  # "k1" | "k3"

  def __post_init__(self):
    if self.ratio not in ("token", "phase"):
      raise ValueError(f"rl.ratio must be 'token' or 'phase', got {self.ratio!r}")
    if self.kl_estimator not in ("k1", "k3"):
      raise ValueError(f"rl.kl_estimator must be 'k1' or 'k3', got {self.kl_estimator!r}")


def kl_penalty(logprobs, ref_logprobs, estimator: str = "k3"):
  """Per-token estimate of KL(pi || pi_ref) from samples of pi.

  k1 = log pi - log pi_ref (unbiased, can be negative);
  k3 = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1 (unbiased, >= 0).
  """
  log_ratio = ref_logprobs - logprobs
  if estimator == "k1":
    return -log_ratio
  return jnp.exp(log_ratio) - log_ratio - 1.0


def _masked_mean(x, mask, count=None):
  """sum(x * mask) / max(count, 1); count defaults to sum(mask).

  Passing the count of the *whole* batch makes the result a sum over rows, so the
  losses of microbatches add up to the full batch's (gradient accumulation).
  """
  mask = mask.astype(x.dtype)
  count = jnp.sum(mask) if count is None else count
  return jnp.sum(x * mask) / jnp.maximum(count, 1.0)


def token_counts(phase_ids, phase_groups: Sequence[tuple[tuple[int, ...], float]]):
  """Token counts that normalise `clipped_surrogate`: phase_ids [B, G, T] -> f32 [n + 1].

  Entry i counts the tokens of phase group i, the last one the tokens of any group.
  Computed once on the full batch and passed to the loss of each microbatch.
  """
  masks = [jnp.isin(phase_ids, jnp.asarray(phases)) for phases, _ in phase_groups]
  any_mask = functools.reduce(jnp.logical_or, masks)
  return jnp.stack([jnp.sum(m) for m in masks + [any_mask]]).astype(jnp.float32)


def clipped_surrogate(logprobs, old_logprobs, token_adv, phase_ids,
                      phase_groups: Sequence[tuple[tuple[int, ...], float]],
                      cfg: PolicyLossConfig, ref_logprobs=None, counts=None):
  """Generic clipped policy loss over groups of phases.

  logprobs/old_logprobs/token_adv: f32 [B, G, T]; phase_ids int32 [B, G, T].
  phase_groups: ((phase ids, weight), ...): each group is averaged over its own
    tokens and weighted, e.g. F-GRPO ((GEN,), 1), ((RANK,), lambda); GRPO
    ((GEN, RANK), 1).
  counts: f32 [len(phase_groups) + 1] from `token_counts` of the full batch when
    this is one microbatch of it (the loss and metrics are then its additive share);
    None counts the tokens of these arrays.
  Returns (loss scalar, metrics dict).
  """
  if counts is None:
    counts = token_counts(phase_ids, phase_groups)
  old_logprobs = jax.lax.stop_gradient(old_logprobs)
  token_adv = jax.lax.stop_gradient(token_adv)
  log_ratio = logprobs - old_logprobs
  objective = 0.0
  metrics = {}
  all_mask = jnp.zeros(phase_ids.shape, bool)
  clipped_any = jnp.zeros(phase_ids.shape, bool)
  for i, (phases, weight) in enumerate(phase_groups):
    mask = jnp.isin(phase_ids, jnp.asarray(phases))
    all_mask |= mask
    if cfg.ratio == "phase":
      # One ratio per sequence and phase group: exp(mean log-ratio over its tokens).
      seq_lr = (jnp.sum(log_ratio * mask, axis=-1, keepdims=True)
                / jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1))
      ratio = jnp.exp(jnp.broadcast_to(seq_lr, log_ratio.shape))
    else:
      ratio = jnp.exp(log_ratio)
    unclipped = ratio * token_adv
    clipped = jnp.clip(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high) * token_adv
    surrogate = jnp.minimum(unclipped, clipped)
    clipped_any |= mask & (clipped < unclipped)
    objective = objective + weight * _masked_mean(surrogate, mask, counts[i])
  loss = -objective
  metrics["clip_frac"] = _masked_mean(clipped_any, all_mask, counts[-1])
  metrics["approx_kl_old"] = _masked_mean(-log_ratio, all_mask, counts[-1])
  if ref_logprobs is not None:
    kl = _masked_mean(kl_penalty(logprobs, jax.lax.stop_gradient(ref_logprobs),
                                 cfg.kl_estimator), all_mask, counts[-1])
    metrics["kl_ref"] = kl
    if cfg.kl_coef:
      loss = loss + cfg.kl_coef * kl
  return loss, metrics


def fgrpo_advantages(r_gen, r_rank, phase_ids, mode: str = "mean", rank_mask=None):
  """Separate group-relative advantages per phase, placed on their tokens.

  r_gen, r_rank: f32 [B, G]; phase_ids [B, G, T] -> (token_adv [B, G, T], dict).
  rank_mask: None, or bool [B, G]: the rollouts whose R_rank is defined (the rank
  baseline runs over them only; the others' rank tokens get 0, see drop_rank_tokens).
  """
  a_gen = R.group_advantages(r_gen, mode=mode)
  a_rank = R.group_advantages(r_rank, mode=mode, mask=rank_mask)
  token_adv = R.token_advantages(phase_ids, {R.PHASE_GEN: a_gen, R.PHASE_RANK: a_rank})
  return token_adv, {"adv_gen": a_gen, "adv_rank": a_rank}


def grpo_advantages(r_gen, r_rank, phase_ids, lam: float = 1.0, mode: str = "mean"):
  """One advantage of the joint reward R_gen + lambda R_rank on every choice token."""
  a = R.group_advantages(r_gen + lam * r_rank, mode=mode)
  token_adv = R.token_advantages(phase_ids, {R.PHASE_GEN: a, R.PHASE_RANK: a})
  return token_adv, {"adv_joint": a}


def fgrpo_groups(lam: float):
  return (((R.PHASE_GEN,), 1.0), ((R.PHASE_RANK,), lam))


# One mean over every choice token (rl.loss_norm="joint"; lambda then scales the rank
# tokens' advantages instead of a phase mean).
JOINT_GROUPS = (((R.PHASE_GEN, R.PHASE_RANK), 1.0),)


def drop_rank_tokens(phase_ids, keep):
  """phase_ids [B, G, T] with the rank tokens of rollouts where keep [B, G] is False
  relabelled PHASE_NONE: they leave the loss and its token counts (an undefined
  R_rank, reward.rank_ideal="slate")."""
  drop = (phase_ids == R.PHASE_RANK) & ~keep[..., None]
  return jnp.where(drop, R.PHASE_NONE, phase_ids)


def sft_loss(logprobs, phase_ids, phases=(R.PHASE_GEN, R.PHASE_RANK), count=None):
  """Teacher-forcing negative log-likelihood over the chosen phases' tokens.

  logprobs f32 [B, G, T] of the gold choices; forced tags carry no loss.
  count: the number of supervised tokens of the full batch when this is one
  microbatch (see `sft_token_count`); None counts them here.
  """
  mask = jnp.isin(phase_ids, jnp.asarray(phases))
  return -_masked_mean(logprobs, mask, count)


def sft_token_count(phase_ids, phases=(R.PHASE_GEN, R.PHASE_RANK)):
  """Supervised tokens of `sft_loss`: phase_ids [B, G, T] -> f32 scalar."""
  return jnp.sum(jnp.isin(phase_ids, jnp.asarray(phases))).astype(jnp.float32)


def prompt_lm_pairs(prompt_mask):
  """bool [B, P-1]: position p predicts token p+1 and both are real tokens."""
  return prompt_mask[:, :-1] & prompt_mask[:, 1:]


def prompt_lm_loss(logits, prompt, prompt_mask, count=None):
  """Next-token negative log-likelihood over the prompt itself (an auxiliary SFT loss).

  logits f32 [B, P, V] of a causal forward over prompt int32 [B, P] (prompt_mask bool
  [B, P], False = left padding); the mean over `prompt_lm_pairs` (count: their number
  in the whole batch when this is one microbatch).
  """
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, prompt[:, 1:, None], -1)[..., 0]
  return _masked_mean(nll, prompt_lm_pairs(prompt_mask), count)


def slot_positions(prompt, prompt_mask, cand_tokens):
  """Where each pool slot's identifier stands in the prompt: its last occurrence.

  prompt int32 [B, P], prompt_mask bool [B, P], cand_tokens int32 [B, C] ->
  (positions int32 [B, C], present bool [B, C]); positions are 0 where absent.
  """
  eq = (prompt[:, :, None] == cand_tokens[:, None, :]) & prompt_mask[:, :, None]  # [B, P, C]
  last = prompt.shape[1] - 1 - jnp.argmax(eq[:, ::-1], axis=1)
  present = eq.any(axis=1)
  return jnp.where(present, last, 0).astype(jnp.int32), present


def slot_relevance_loss(slot_logits, positions, relevance, valid, count=None):
  """Binary cross-entropy of "this slot is relevant" read at its identifier's position.

  slot_logits f32 [B, P, C]: the logits of the C identifier tokens at every prompt
  position (a causal forward with lm-head columns = cand_tokens); the score of slot j
  is its own identifier's logit where that identifier stands (positions [B, C], from
  `slot_positions`), so no new parameters: the position learns to vote for itself.
  relevance [B, C] (> 0 = relevant); valid bool [B, C] (real slot, identifier
  present). The mean over valid slots (count: their number in the whole batch).
  """
  # [b, 0, j] = slot_logits[b, positions[b, j], j]
  score = jnp.take_along_axis(slot_logits, positions[:, None, :], axis=1)[:, 0]  # [B, C]
  label = (relevance > 0).astype(jnp.float32)
  bce = jnp.logaddexp(0.0, score) - label * score  # -log sigmoid(+-score)
  return _masked_mean(bce, valid, count)
