"""The two-phase rollout: one sequence writes a slate, then ranks it.

Sequence layout (prompt ends with the slate opening tag):

    <prompt ... <SLATE>> s_1 … s_k </SLATE> <RANK> r_1 … r_m </RANK>

Each s_i / r_j is one token naming one pool slot (`cand_tokens[b, c]`). Tags are
forced. In *constrained* decoding each choice is sampled from the model's logits
restricted to the allowed pool slots:

- slate step: slots in the pool (`pool_mask`) and not yet in the slate;
- rank step: slots in the slate and not yet ranked.

The log-probabilities we report and train on are those of this masked distribution
at the sampling temperature; `sequence_logprobs` recomputes them teacher-forced.

The schedule of step kinds is static (numpy), so the whole rollout is one
`lax.scan` with static shapes, and the prompt is prefilled once per prompt and its
keys/values shared by the G samples.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fgrpo_jax.models import llama
from fgrpo_jax.rewards import PHASE_GEN, PHASE_RANK, PHASE_TAG

# Step kinds of the schedule.
FORCED, CHOOSE_SLATE, CHOOSE_RANK = 0, 1, 2
_NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static description of the generated part of a sequence.

  slate_size: k; rank_size: m; mid_tags: token ids forced between the slate and
  the ranking (`</SLATE> <RANK>`, possibly several tokens each for text LLMs);
  end_tags: token ids forced after the ranking (`</RANK>`).
  """

  slate_size: int
  rank_size: int
  mid_tags: tuple[int, ...]
  end_tags: tuple[int, ...]

  def __post_init__(self):
    if not 1 <= self.rank_size <= self.slate_size:
      raise ValueError(f"need 1 <= rank size m ({self.rank_size}) <= slate size k "
                       f"({self.slate_size})")

  @property
  def kinds(self) -> np.ndarray:
    """int32 [T]: FORCED, CHOOSE_SLATE or CHOOSE_RANK for each generated position."""
    return np.array([CHOOSE_SLATE] * self.slate_size + [FORCED] * len(self.mid_tags)
                    + [CHOOSE_RANK] * self.rank_size + [FORCED] * len(self.end_tags),
                    np.int32)

  @property
  def forced_tokens(self) -> np.ndarray:
    """int32 [T]: the forced token at FORCED positions, -1 elsewhere."""
    out = np.full(self.length, -1, np.int32)
    k, m, mid = self.slate_size, self.rank_size, len(self.mid_tags)
    out[k:k + mid] = self.mid_tags
    out[k + mid + m:] = self.end_tags
    return out

  @property
  def phase_ids(self) -> np.ndarray:
    """int32 [T]: PHASE_GEN on slate choices, PHASE_RANK on rank choices, PHASE_TAG on tags."""
    kinds = self.kinds
    return np.where(kinds == CHOOSE_SLATE, PHASE_GEN,
                    np.where(kinds == CHOOSE_RANK, PHASE_RANK, PHASE_TAG)).astype(np.int32)

  @property
  def length(self) -> int:
    return self.slate_size + len(self.mid_tags) + self.rank_size + len(self.end_tags)

  @property
  def slate_positions(self) -> np.ndarray:
    return np.nonzero(self.kinds == CHOOSE_SLATE)[0]

  @property
  def rank_positions(self) -> np.ndarray:
    return np.nonzero(self.kinds == CHOOSE_RANK)[0]


class Rollout(NamedTuple):
  """G sampled completions for each of B prompts (T = layout.length).

  tokens: int32 [B, G, T] generated token ids (tags included);
  choices: int32 [B, G, T] pool slot chosen at each step, -1 at forced tags;
  phase_ids: int32 [B, G, T] (rewards.PHASE_*);
  logprobs: f32 [B, G, T] log-prob of each token under the constrained
    distribution at the sampling temperature (0 at forced tags);
  slate: int32 [B, G, k]; ranking: int32 [B, G, m] (pool slot indices).
  """

  tokens: jax.Array
  choices: jax.Array
  phase_ids: jax.Array
  logprobs: jax.Array
  slate: jax.Array
  ranking: jax.Array


def allowed_slots(kind, in_slate, ranked, pool_mask):
  """Which pool slots a step may choose. kind int (scalar or [T] broadcast);
  in_slate/ranked/pool_mask bool [..., C]. Returns bool [..., C]."""
  kind = jnp.asarray(kind)[..., None]
  gen = pool_mask & ~in_slate
  rank = in_slate & ~ranked
  return jnp.where(kind == CHOOSE_SLATE, gen, jnp.where(kind == CHOOSE_RANK, rank, False))


def _constrained_logprobs(logits, cand_tokens, allowed, temperature):
  """logits [..., V], cand_tokens [..., C] -> log-probs [..., C] over allowed slots."""
  cand = jnp.take_along_axis(logits, cand_tokens, axis=-1) / temperature
  cand = jnp.where(allowed, cand, _NEG_INF)
  return jax.nn.log_softmax(cand, axis=-1)


def _split_choices(choices, layout: Layout):
  slate = choices[..., layout.slate_positions]
  ranking = choices[..., layout.rank_positions]
  return slate, ranking


@functools.partial(jax.jit, static_argnames=("cfg", "layout", "group_size", "greedy"))
def sample(params, batch, key, *, cfg: llama.ModelConfig, layout: Layout, group_size: int,
           temperature: float = 1.0, greedy: bool = False, given_slate=None) -> Rollout:
  """Samples `group_size` constrained completions per prompt.

  batch: dict with prompt int32 [B, P], prompt_mask bool [B, P], cand_tokens int32
  [B, C] (token naming each pool slot), pool_mask bool [B, C].
  greedy=True takes the argmax at every step (evaluation).
  given_slate: optional int32 [B, k] — the slate is teacher-forced to these pool
    slots (a decoupled ranker ranking a selector's slate); only the ranking is
    sampled. Log-probs of the given slate tokens are still reported.
  """
  prompt, prompt_mask = batch["prompt"], batch["prompt_mask"]
  cand_tokens, pool_mask = batch["cand_tokens"], batch["pool_mask"]
  B, C = cand_tokens.shape
  G, T = group_size, layout.length
  first_logits, prefix = llama.prefill(params, prompt, cfg, prompt_mask)
  cache = llama.init_decode_cache(cfg, B, G, T)
  logits = jnp.broadcast_to(first_logits[:, None], (B, G, first_logits.shape[-1]))
  cand_bg = jnp.broadcast_to(cand_tokens[:, None], (B, G, C))
  pool_bg = jnp.broadcast_to(pool_mask[:, None], (B, G, C)).astype(bool)
  kinds = jnp.asarray(layout.kinds)
  forced = jnp.asarray(layout.forced_tokens)

  def choose(t, logits, in_slate, ranked):
    kind = kinds[t]
    allowed = allowed_slots(kind, in_slate, ranked, pool_bg)
    logp = _constrained_logprobs(logits, cand_bg, allowed, temperature)
    if greedy:
      choice = jnp.argmax(logp, axis=-1)
    else:
      choice = jax.random.categorical(jax.random.fold_in(key, t), logp, axis=-1)
    choice = choice.astype(jnp.int32)
    if given_slate is not None:  # slate steps come first: step t is slate slot t
      given = given_slate[:, None, jnp.minimum(t, layout.slate_size - 1)].astype(jnp.int32)
      choice = jnp.where(kind == CHOOSE_SLATE, given, choice)
    is_choice = kind != FORCED
    token = jnp.where(is_choice, jnp.take_along_axis(cand_bg, choice[..., None], -1)[..., 0],
                      forced[t])
    lp = jnp.where(is_choice, jnp.take_along_axis(logp, choice[..., None], -1)[..., 0], 0.0)
    choice = jnp.where(is_choice, choice, -1)
    hot = jax.nn.one_hot(choice, C, dtype=bool)  # all False for -1
    in_slate = in_slate | (hot & (kind == CHOOSE_SLATE))
    ranked = ranked | (hot & (kind == CHOOSE_RANK))
    return token, choice, lp, in_slate, ranked

  def step(carry, t):
    logits, cache, in_slate, ranked = carry
    token, choice, lp, in_slate, ranked = choose(t, logits, in_slate, ranked)
    logits, cache = llama.decode_step(params, prefix, cache, token, t, cfg)
    return (logits, cache, in_slate, ranked), (token, choice, lp)

  empty = jnp.zeros((B, G, C), bool)
  (logits, _, in_slate, ranked), (tokens, choices, lps) = jax.lax.scan(
      step, (logits, cache, empty, empty), jnp.arange(T - 1))
  # The last token needs no decode step after it.
  last = choose(T - 1, logits, in_slate, ranked)[:3]
  tokens, choices, lps = (jnp.concatenate([x, y[None]], 0) for x, y in zip(
      (tokens, choices, lps), last))
  tokens, choices, lps = (jnp.moveaxis(x, 0, -1) for x in (tokens, choices, lps))
  slate, ranking = _split_choices(choices, layout)
  phase_ids = jnp.broadcast_to(jnp.asarray(layout.phase_ids), (B, G, T))
  return Rollout(tokens=tokens, choices=choices, phase_ids=phase_ids, logprobs=lps,
                 slate=slate, ranking=ranking)


def allowed_masks(choices, layout: Layout, pool_mask):
  """Allowed slots at every step, rebuilt from the choices (teacher forcing).

  choices int32 [..., T] (-1 at forced steps), pool_mask bool [..., C] ->
  bool [..., T, C].
  """
  C = pool_mask.shape[-1]
  kinds = jnp.asarray(layout.kinds)
  hot = jax.nn.one_hot(choices, C, dtype=jnp.int32)  # [..., T, C]
  slate_hot = hot * (kinds == CHOOSE_SLATE)[:, None]
  rank_hot = hot * (kinds == CHOOSE_RANK)[:, None]
  in_slate = (jnp.cumsum(slate_hot, axis=-2) - slate_hot) > 0  # chosen strictly before t
  ranked = (jnp.cumsum(rank_hot, axis=-2) - rank_hot) > 0
  return allowed_slots(kinds, in_slate, ranked, pool_mask[..., None, :].astype(bool))


def tokens_from_choices(choices, cand_tokens, layout: Layout):
  """choices int32 [B, G, T] -> token ids [B, G, T] (tags forced)."""
  cand = jnp.broadcast_to(cand_tokens[:, None], choices.shape[:2] + cand_tokens.shape[-1:])
  picked = jnp.take_along_axis(cand, jnp.maximum(choices, 0), axis=-1)
  return jnp.where(choices >= 0, picked, jnp.asarray(layout.forced_tokens))


def choices_from_slate_ranking(slate, ranking, layout: Layout):
  """Builds the [..., T] choice array of a sequence from slate [..., k] and ranking [..., m]."""
  lead = slate.shape[:-1]
  choices = jnp.full(lead + (layout.length,), -1, jnp.int32)
  choices = choices.at[..., layout.slate_positions].set(slate.astype(jnp.int32))
  return choices.at[..., layout.rank_positions].set(ranking.astype(jnp.int32))


def sequence_logprobs(params, batch, choices, *, cfg: llama.ModelConfig, layout: Layout,
                      temperature: float = 1.0):
  """Teacher-forced constrained log-probs and entropies of given completions.

  choices int32 [B, G, T] (-1 at tags). Returns (logprobs f32 [B, G, T], entropy
  f32 [B, G, T]), both 0 at forced tags. Differentiable in params.
  """
  tokens = tokens_from_choices(choices, batch["cand_tokens"], layout)
  logits = llama.completion_logits(params, batch["prompt"], batch["prompt_mask"], tokens, cfg)
  allowed = allowed_masks(choices, layout, batch["pool_mask"][:, None])
  cand = jnp.broadcast_to(batch["cand_tokens"][:, None, None], allowed.shape)
  logp = _constrained_logprobs(logits, cand, allowed, temperature)  # [B, G, T, C]
  is_choice = choices >= 0
  lp = jnp.take_along_axis(logp, jnp.maximum(choices, 0)[..., None], -1)[..., 0]
  probs = jnp.exp(logp)
  entropy = -jnp.sum(jnp.where(allowed, probs * logp, 0.0), axis=-1)
  return jnp.where(is_choice, lp, 0.0), jnp.where(is_choice, entropy, 0.0)

