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
keys/values shared by the G samples. The decoder is `models.decoder(cfg)`: Llama-family
or Qwen3.5, whose DeltaNet layers copy the prompt's recurrent state into each sample.

In *free* decoding (`Layout(constrained=False, max_new_tokens=T)`, for text LLMs)
every token is sampled from the full vocabulary, nothing is forced, and a rollout
stops after its end tags or a stop token (padding follows). `fgrpo_jax.parse` then
reads the slate, the ranking, the phase ids and the format errors from the tokens;
the log-probs are the full-vocabulary ones at the sampling temperature
(`free_logprobs` recomputes them teacher-forced). `sample` and `rollout_logprobs`
serve both modes, chosen by the static layout.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fgrpo_jax import parse as parse_lib
from fgrpo_jax.models import llama
from fgrpo_jax.models.decoders import decoder
from fgrpo_jax.rewards import PHASE_GEN, PHASE_NONE, PHASE_RANK, PHASE_TAG

# Step kinds of the schedule.
FORCED, CHOOSE_SLATE, CHOOSE_RANK = 0, 1, 2
_NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static description of the generated part of a sequence.

  slate_size: k; rank_size: m; mid_tags: token ids forced between the slate and
  the ranking (`</SLATE> <RANK>`, possibly several tokens each for text LLMs);
  end_tags: token ids forced after the ranking (`</RANK>`).
  constrained: True = constrained decoding on the static schedule below; False =
    free decoding of max_new_tokens tokens over the whole vocabulary, read back by
    `fgrpo_jax.parse` (the tags are then what the parser looks for);
  max_new_tokens: free decoding's token budget T (>= the schedule's length);
  stop_tokens: free decoding ends early at any of these (EOS, end of turn);
  pad_token: written after a free rollout ended.
  """

  slate_size: int
  rank_size: int
  mid_tags: tuple[int, ...]
  end_tags: tuple[int, ...]
  constrained: bool = True
  max_new_tokens: int = 0
  stop_tokens: tuple[int, ...] = ()
  pad_token: int = 0

  def __post_init__(self):
    if not 1 <= self.rank_size <= self.slate_size:
      raise ValueError(f"need 1 <= rank size m ({self.rank_size}) <= slate size k "
                       f"({self.slate_size})")
    if not self.constrained:
      if not self.mid_tags or not self.end_tags:
        raise ValueError("free decoding needs non-empty mid and end tags to parse")
      if self.max_new_tokens < self.schedule_length:
        raise ValueError(f"max_new_tokens={self.max_new_tokens} cannot hold a well-formed "
                         f"rollout of {self.schedule_length} tokens")
      if set(self.stop_tokens) & set(self.mid_tags + self.end_tags):
        raise ValueError(f"stop tokens {self.stop_tokens} overlap the tags")

  @property
  def kinds(self) -> np.ndarray:
    """int32 [T]: FORCED, CHOOSE_SLATE or CHOOSE_RANK for each generated position."""
    return np.array([CHOOSE_SLATE] * self.slate_size + [FORCED] * len(self.mid_tags)
                    + [CHOOSE_RANK] * self.rank_size + [FORCED] * len(self.end_tags),
                    np.int32)

  @property
  def forced_tokens(self) -> np.ndarray:
    """int32 [T]: the forced token at FORCED positions, -1 elsewhere."""
    out = np.full(self.schedule_length, -1, np.int32)
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
  def schedule_length(self) -> int:
    """Tokens of a well-formed rollout: k + m + the tags (the constrained schedule)."""
    return self.slate_size + len(self.mid_tags) + self.rank_size + len(self.end_tags)

  @property
  def length(self) -> int:
    """T: generated positions of a rollout (the schedule, or the free budget)."""
    return self.schedule_length if self.constrained else self.max_new_tokens

  @property
  def slate_positions(self) -> np.ndarray:
    return np.nonzero(self.kinds == CHOOSE_SLATE)[0]

  @property
  def rank_positions(self) -> np.ndarray:
    return np.nonzero(self.kinds == CHOOSE_RANK)[0]


def with_budget(layout: Layout, constrained: bool, max_new_tokens: int = 0) -> Layout:
  """`layout` as is (constrained decoding), or for free decoding with a budget of
  max_new_tokens tokens (0 = twice a well-formed rollout, tags included)."""
  if constrained:
    return layout
  return dataclasses.replace(layout, constrained=False,
                             max_new_tokens=max_new_tokens or 2 * layout.schedule_length)


class Rollout(NamedTuple):
  """G sampled completions for each of B prompts (T = layout.length).

  tokens: int32 [B, G, T] generated token ids (tags included);
  choices: int32 [B, G, T] pool slot chosen at each step, -1 at forced tags;
  phase_ids: int32 [B, G, T] (rewards.PHASE_*);
  logprobs: f32 [B, G, T] log-prob of each token under the constrained
    distribution at the sampling temperature (0 at forced tags);
  slate: int32 [B, G, k]; ranking: int32 [B, G, m] (pool slot indices);
  errors: format errors, name -> bool [B, G] (`fgrpo_jax.parse.ERRORS`; all False
    in constrained decoding).
  In free decoding choices, phase_ids, slate and ranking come from the parser, and
  logprobs are full-vocabulary log-probs of every sampled token (0 after the end).
  """

  tokens: jax.Array
  choices: jax.Array
  phase_ids: jax.Array
  logprobs: jax.Array
  slate: jax.Array
  ranking: jax.Array
  errors: dict | None = None


def allowed_slots(kind, in_slate, ranked, pool_mask):
  """Which pool slots a step may choose. kind int (scalar or [T] broadcast);
  in_slate/ranked/pool_mask bool [..., C]. Returns bool [..., C]."""
  kind = jnp.asarray(kind)[..., None]
  gen = pool_mask & ~in_slate
  rank = in_slate & ~ranked
  return jnp.where(kind == CHOOSE_SLATE, gen, jnp.where(kind == CHOOSE_RANK, rank, False))


def _constrained_logprobs(slot_logits, allowed, temperature):
  """Logits of the pool slots' tokens [..., C] -> log-probs [..., C] over allowed slots.

  The model computes only these C logits (llama `columns=cand_tokens`), never the
  whole vocabulary."""
  cand = jnp.where(allowed, slot_logits / temperature, _NEG_INF)
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
  A free layout (`layout.constrained=False`) samples over the full vocabulary
  (`_sample_free`; no given_slate).
  """
  if not layout.constrained:
    if given_slate is not None:
      raise ValueError("given_slate needs constrained decoding")
    return _sample_free(params, batch, key, cfg=cfg, layout=layout, group_size=group_size,
                        temperature=temperature, greedy=greedy)
  prompt, prompt_mask = batch["prompt"], batch["prompt_mask"]
  cand_tokens, pool_mask = batch["cand_tokens"], batch["pool_mask"]
  B, C = cand_tokens.shape
  G, T = group_size, layout.length
  first_logits, prefix = decoder(cfg).prefill(params, prompt, cfg, prompt_mask,
                                              columns=cand_tokens)
  cache = decoder(cfg).init_decode_cache(cfg, B, G, T, prefix)
  logits = jnp.broadcast_to(first_logits[:, None], (B, G, C))
  cand_bg = jnp.broadcast_to(cand_tokens[:, None], (B, G, C))
  pool_bg = jnp.broadcast_to(pool_mask[:, None], (B, G, C)).astype(bool)
  kinds = jnp.asarray(layout.kinds)
  forced = jnp.asarray(layout.forced_tokens)

  def choose(t, logits, in_slate, ranked):
    kind = kinds[t]
    allowed = allowed_slots(kind, in_slate, ranked, pool_bg)
    logp = _constrained_logprobs(logits, allowed, temperature)
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
    logits, cache = decoder(cfg).decode_step(params, prefix, cache, token, t, cfg,
                                             columns=cand_tokens)
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
                 slate=slate, ranking=ranking, errors=parse_lib.no_errors((B, G)))


# ----------------------------------------------------------------------------
# Free decoding.


class FreeState(NamedTuple):
  """Where each free rollout is, updated token by token while sampling.

  stage: int32 [B, G]: 0 in the slate, 1 in the ranking, 2 ended (padding follows);
  window: int32 [B, G, L]: the last L tokens of the current stage (-1 = none yet),
  L = the longest tag.
  """

  stage: jax.Array
  window: jax.Array


def init_free_state(batch: int, group: int, layout: Layout) -> FreeState:
  width = max(len(layout.mid_tags), len(layout.end_tags))
  return FreeState(stage=jnp.zeros((batch, group), jnp.int32),
                   window=jnp.full((batch, group, width), -1, jnp.int32))


def _window_ends_with(window, tag) -> jax.Array:
  return jnp.all(window[..., window.shape[-1] - len(tag):] == jnp.asarray(tag, jnp.int32), -1)


def advance_free_state(state: FreeState, token, layout: Layout) -> FreeState:
  """The state after `token` int32 [B, G] was written (the parser's rules, online):
  the mid tags end the slate, the end tags (after them) or a stop token end the rollout."""
  window = jnp.concatenate([state.window[..., 1:], token[..., None]], -1)
  stage = state.stage
  new = jnp.where((stage == 0) & _window_ends_with(window, layout.mid_tags), 1, stage)
  new = jnp.where((stage == 1) & _window_ends_with(window, layout.end_tags), 2, new)
  if layout.stop_tokens:
    new = jnp.where(jnp.isin(token, jnp.asarray(layout.stop_tokens, jnp.int32)), 2, new)
  window = jnp.where((new != stage)[..., None], -1, window)  # tags never span two stages
  return FreeState(stage=new, window=window)


def parse_tokens(tokens, batch, layout: Layout) -> parse_lib.Parsed:
  """Parses free completions int32 [B, G, T] against the batch's pools."""
  return parse_lib.parse(tokens, batch["cand_tokens"][:, None], batch["pool_mask"][:, None],
                         slate_size=layout.slate_size, rank_size=layout.rank_size,
                         mid_tags=layout.mid_tags, end_tags=layout.end_tags,
                         stop_tokens=layout.stop_tokens)


def _sample_free(params, batch, key, *, cfg: llama.ModelConfig, layout: Layout,
                 group_size: int, temperature: float, greedy: bool) -> Rollout:
  """Free decoding: `layout.max_new_tokens` tokens per rollout over the full vocabulary.

  A rollout ends after its end tags or a stop token; later positions hold
  layout.pad_token with log-prob 0. Returns a Rollout parsed by `fgrpo_jax.parse`.
  """
  B, G, T = batch["prompt"].shape[0], group_size, layout.max_new_tokens
  first_logits, prefix = decoder(cfg).prefill(params, batch["prompt"], cfg, batch["prompt_mask"])
  cache = decoder(cfg).init_decode_cache(cfg, B, G, T, prefix)
  logits = jnp.broadcast_to(first_logits[:, None], (B, G, first_logits.shape[-1]))

  def choose(t, logits, state):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    if greedy:
      token = jnp.argmax(logp, axis=-1)
    else:
      token = jax.random.categorical(jax.random.fold_in(key, t), logp, axis=-1)
    token = token.astype(jnp.int32)
    lp = jnp.take_along_axis(logp, token[..., None], -1)[..., 0]
    ended = state.stage == 2
    token = jnp.where(ended, layout.pad_token, token)
    lp = jnp.where(ended, 0.0, lp)
    return token, lp, advance_free_state(state, token, layout)

  def step(carry, t):
    logits, cache, state = carry
    token, lp, state = choose(t, logits, state)
    logits, cache = decoder(cfg).decode_step(params, prefix, cache, token, t, cfg)
    return (logits, cache, state), (token, lp)

  (logits, _, state), (tokens, lps) = jax.lax.scan(
      step, (logits, cache, init_free_state(B, G, layout)), jnp.arange(T - 1))
  last_token, last_lp, _ = choose(T - 1, logits, state)
  tokens = jnp.moveaxis(jnp.concatenate([tokens, last_token[None]], 0), 0, -1)
  lps = jnp.moveaxis(jnp.concatenate([lps, last_lp[None]], 0), 0, -1)
  p = parse_tokens(tokens, batch, layout)
  return Rollout(tokens=tokens, choices=p.choices, phase_ids=p.phase_ids, logprobs=lps,
                 slate=p.slate, ranking=p.ranking, errors=p.errors)


def _full_vocab_logprobs(logits, tokens, temperature):
  """logits [..., T, V], tokens [..., T] -> (log-probs [..., T], entropies [..., T])."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  lp = jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0]
  entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  return lp, entropy


def free_logprobs(params, batch, tokens, live, *, cfg: llama.ModelConfig,
                  temperature: float = 1.0):
  """Teacher-forced full-vocabulary log-probs and entropies of free completions.

  tokens int32 [B, G, T]; live bool [B, G, T] (the sampled positions). Returns
  (logprobs f32 [B, G, T], entropy f32 [B, G, T]), 0 where not live.
  Differentiable in params.
  """
  logits = decoder(cfg).completion_logits(params, batch["prompt"], batch["prompt_mask"], tokens,
                                          cfg)
  lp, entropy = _full_vocab_logprobs(logits, tokens, temperature)
  return jnp.where(live, lp, 0.0), jnp.where(live, entropy, 0.0)


def rollout_logprobs(params, batch, ro: Rollout, *, cfg: llama.ModelConfig, layout: Layout,
                     temperature: float = 1.0):
  """Teacher-forced (logprobs, entropy) [B, G, T] of a rollout's sampled tokens, as
  `sample` reported them: constrained (`sequence_logprobs`) or free (`free_logprobs`)."""
  if layout.constrained:
    return sequence_logprobs(params, batch, ro.choices, cfg=cfg, layout=layout,
                             temperature=temperature)
  return free_logprobs(params, batch, ro.tokens, ro.phase_ids != PHASE_NONE, cfg=cfg,
                       temperature=temperature)


# ----------------------------------------------------------------------------
# Teacher forcing of the constrained schedule.


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
  choices = jnp.full(lead + (layout.schedule_length,), -1, jnp.int32)
  choices = choices.at[..., layout.slate_positions].set(slate.astype(jnp.int32))
  return choices.at[..., layout.rank_positions].set(ranking.astype(jnp.int32))


def sequence_logprobs(params, batch, choices, *, cfg: llama.ModelConfig, layout: Layout,
                      temperature: float = 1.0, with_prompt: bool = False, targets=None):
  """Teacher-forced constrained log-probs and entropies of given completions.

  choices int32 [B, G, T] (-1 at tags). Returns (logprobs f32 [B, G, T], entropy
  f32 [B, G, T]), both 0 at forced tags. Differentiable in params.
  With a free layout (gold sequences for SFT) the same schedule is scored with
  full-vocabulary log-probs, the distribution free decoding samples from, at every
  position: the tags too, since free decoding writes them.
  with_prompt (constrained layouts): also returns the candidate tokens' logits at
  every prompt position, f32 [B, P, C], from the same forward pass.
  targets (constrained layouts): None, or bool [B, G, T, C], the slots that count as a
  correct choice at each step; the log-prob of a step is then that of the event "an
  allowed target slot is chosen" (log of their total probability) instead of the
  given choice's own, e.g. for SFT when the gold order among tied items is arbitrary.
  """
  tokens = tokens_from_choices(choices, batch["cand_tokens"], layout)
  if not layout.constrained:
    if with_prompt or targets is not None:
      raise ValueError("with_prompt and targets need a constrained layout")
    logits = decoder(cfg).completion_logits(params, batch["prompt"], batch["prompt_mask"],
                                            tokens, cfg)
    return _full_vocab_logprobs(logits, tokens, temperature)
  slot_logits = decoder(cfg).completion_logits(
      params, batch["prompt"], batch["prompt_mask"], tokens, cfg,
      columns=batch["cand_tokens"], with_prompt=with_prompt)  # [B, G, T, C]
  if with_prompt:
    slot_logits, prompt_logits = slot_logits
  is_choice = choices >= 0
  allowed = allowed_masks(choices, layout, batch["pool_mask"][:, None])
  logp = _constrained_logprobs(slot_logits, allowed, temperature)  # [B, G, T, C]
  if targets is None:
    lp = jnp.take_along_axis(logp, jnp.maximum(choices, 0)[..., None], -1)[..., 0]
  else:
    lp = jax.nn.logsumexp(jnp.where(targets & allowed, logp, _NEG_INF), axis=-1)
  probs = jnp.exp(logp)
  entropy = -jnp.sum(jnp.where(allowed, probs * logp, 0.0), axis=-1)
  out = jnp.where(is_choice, lp, 0.0), jnp.where(is_choice, entropy, 0.0)
  return (*out, prompt_logits) if with_prompt else out

