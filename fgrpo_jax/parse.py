"""Reading free-decoded rollouts: token ids -> slate, ranking, phase ids, format errors.

In free decoding the model may write any token. The prompt ends with the slate
opening tag, so a well-formed completion is

    s_1 … s_k <mid tags> r_1 … r_m <end tags>

where every s_i / r_j is the one token naming a pool slot (`cand_tokens[..., c]`) and
the tags are token sequences (`</slate><rank>` and `</rank>` as a text tokenizer
splits them). The rules, applied to token ids with static shapes (jit-able):

- live part: positions up to the last token of the end tags, or up to the first stop
  token (EOS), whichever comes first; all positions if neither occurs. The sampler
  writes padding after it.
- mid tags: their first occurrence in the live part; the slate span is every live
  position before it (all live positions if the tags are missing).
- end tags: their first occurrence after the mid tags; the rank span is every
  position between the two (up to the end of the live part if missing).
- phase ids: slate span -> PHASE_GEN, rank span -> PHASE_RANK, tag tokens ->
  PHASE_TAG, after the live part -> PHASE_NONE. A stray token or an early stop token
  inside a span keeps its span's phase: it was that phase's decision, and shares the
  phase's (penalised) advantage.
- slate: the pool slots named by the first k slot-naming tokens of the slate span, in
  order, -1 padded; ranking: the first m of the rank span. A token names slot c iff it
  equals cand_tokens[..., c] (the first such c); masked slots (pool_mask False) are
  named too and reported as out of the pool.

Errors (bool [...] each) are the tag and token errors below plus
`rewards.format_errors` of the parsed slate and ranking. A rollout is valid iff none
is set; the slate errors are charged to the slate phase, the rank errors to the
ranking phase (`phase_penalties`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fgrpo_jax import rewards as R

SLATE_ERRORS = ("slate_tag_missing", "slate_stray_token", "slate_count", "slate_duplicate",
                "slate_out_of_pool", "slate_empty_slot")
RANK_ERRORS = ("rank_tag_missing", "rank_stray_token", "rank_count", "ranking_duplicate",
               "ranking_not_in_slate", "ranking_empty_slot")
ERRORS = SLATE_ERRORS + RANK_ERRORS


class Parsed(NamedTuple):
  """A parsed batch of completions (leading shape `...`, usually [B, G]).

  slate int32 [..., k], ranking int32 [..., m]: pool slots, -1 padded;
  phase_ids int32 [..., T] (rewards.PHASE_*); choices int32 [..., T]: the slot named
  at each span position, -1 elsewhere; errors: name -> bool [...] (see ERRORS).
  """

  slate: jax.Array
  ranking: jax.Array
  phase_ids: jax.Array
  choices: jax.Array
  errors: dict


def tag_ends(tokens, tag) -> jax.Array:
  """bool [..., T]: the token sequence `tag` ends at position t. tokens int [..., T]."""
  T = tokens.shape[-1]
  hit = jnp.ones(tokens.shape, bool)
  if len(tag) > T:
    return ~hit
  for j, tok in enumerate(tag):  # static loop over the tag's tokens
    shift = len(tag) - 1 - j  # tag[j] sits `shift` positions before the end
    before = jnp.pad(tokens[..., :T - shift], [(0, 0)] * (tokens.ndim - 1) + [(shift, 0)],
                     constant_values=-1)
    hit &= before == tok
  return hit


def first_true(mask, default: int) -> jax.Array:
  """int32 [...]: index of the first True along the last axis, `default` if none."""
  return jnp.where(jnp.any(mask, -1), jnp.argmax(mask, -1), default).astype(jnp.int32)


def token_slots(tokens, cand_tokens) -> jax.Array:
  """int32 [..., T]: the pool slot each token names, -1 if none.

  tokens int [..., T]; cand_tokens int [..., C] (leading shape broadcasts)."""
  eq = tokens[..., :, None] == cand_tokens[..., None, :]  # [..., T, C]
  return jnp.where(jnp.any(eq, -1), jnp.argmax(eq, -1), -1).astype(jnp.int32)


def first_slots(slots, span, n: int) -> jax.Array:
  """int32 [..., n]: the first n slots (>= 0) inside `span`, in order, -1 padded.

  slots int32 [..., T]; span bool [..., T]."""
  named = span & (slots >= 0)
  order = jnp.cumsum(named, -1) - 1  # rank of each named position in its span
  hot = named[..., None] & (order[..., None] == jnp.arange(n))  # [..., T, n]
  return jnp.where(jnp.any(hot, -2), jnp.sum(hot * slots[..., None], -2), -1).astype(jnp.int32)


def span_bounds(tokens, mid_tags, end_tags, stop_tokens=()):
  """Where the tags and the live part end. tokens int [..., T] -> dict of int32 [...].

  mid_end / end_end: position of the last token of the mid / end tags (T if missing);
  last: the last live position (inclusive).
  """
  T = tokens.shape[-1]
  pos = jnp.arange(T)
  stop = first_true(jnp.isin(tokens, jnp.asarray(stop_tokens, jnp.int32)), T) if stop_tokens \
      else jnp.full(tokens.shape[:-1], T, jnp.int32)
  before_stop = pos < stop[..., None]
  mid_end = first_true(tag_ends(tokens, mid_tags) & before_stop, T)
  after_mid = pos - len(end_tags) + 1 > mid_end[..., None]
  end_end = first_true(tag_ends(tokens, end_tags) & after_mid & before_stop, T)
  last = jnp.minimum(jnp.minimum(end_end, stop), T - 1)
  return {"mid_end": mid_end, "end_end": end_end, "stop": stop, "last": last}


@functools.partial(jax.jit, static_argnames=("slate_size", "rank_size", "mid_tags", "end_tags",
                                             "stop_tokens"))
def parse(tokens, cand_tokens, pool_mask, *, slate_size: int, rank_size: int,
          mid_tags: tuple[int, ...], end_tags: tuple[int, ...],
          stop_tokens: tuple[int, ...] = ()) -> Parsed:
  """Parses completions written after the slate opening tag (rules in the module doc).

  tokens int32 [..., T]; cand_tokens int32 [..., C] and pool_mask bool [..., C] with
  leading shapes that broadcast against tokens' (e.g. [B, 1, C] for [B, G, T]).
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  T = tokens.shape[-1]
  pos = jnp.arange(T)
  b = span_bounds(tokens, mid_tags, end_tags, stop_tokens)
  has_mid, has_end = b["mid_end"] < T, b["end_end"] < T
  mid_start = jnp.where(has_mid, b["mid_end"] - len(mid_tags) + 1, T)[..., None]
  end_start = jnp.where(has_end, b["end_end"] - len(end_tags) + 1, T)[..., None]
  live = pos <= b["last"][..., None]
  slate_span = live & (pos < mid_start)
  rank_span = live & (pos > b["mid_end"][..., None]) & (pos < end_start)
  tag = live & ~slate_span & ~rank_span
  phase_ids = jnp.where(slate_span, R.PHASE_GEN, jnp.where(
      rank_span, R.PHASE_RANK, jnp.where(tag, R.PHASE_TAG, R.PHASE_NONE))).astype(jnp.int32)

  slots = token_slots(tokens, jnp.asarray(cand_tokens))
  slate = first_slots(slots, slate_span, slate_size)
  ranking = first_slots(slots, rank_span, rank_size)
  choices = jnp.where((slate_span | rank_span) & (slots >= 0), slots, -1)
  count = lambda span: jnp.sum(span & (slots >= 0), -1)
  errors = {
      "slate_tag_missing": ~has_mid,
      "rank_tag_missing": ~has_end,
      "slate_stray_token": jnp.any(slate_span & (slots < 0), -1),
      "rank_stray_token": jnp.any(rank_span & (slots < 0), -1),
      "slate_count": count(slate_span) != slate_size,
      "rank_count": count(rank_span) != rank_size,
  }
  pool_mask = jnp.broadcast_to(jnp.asarray(pool_mask, bool),
                               tokens.shape[:-1] + jnp.shape(pool_mask)[-1:])
  errors.update(R.format_errors(slate, ranking, None, pool_mask))
  return Parsed(slate=slate, ranking=ranking, phase_ids=phase_ids, choices=choices,
                errors={name: errors[name] for name in ERRORS})


def no_errors(shape) -> dict:
  """The errors dict of well-formed rollouts (constrained decoding): all False."""
  return {name: jnp.zeros(shape, bool) for name in ERRORS}


def phase_invalid(errors: dict) -> tuple[jax.Array, jax.Array]:
  """(slate part malformed, ranking part malformed), bool [...] each."""
  any_of = lambda names: functools.reduce(jnp.logical_or, [errors[n] for n in names])
  return any_of(SLATE_ERRORS), any_of(RANK_ERRORS)


def validity(errors: dict) -> jax.Array:
  """float32 [...]: 1 iff the rollout is well formed."""
  slate_bad, rank_bad = phase_invalid(errors)
  return (~(slate_bad | rank_bad)).astype(jnp.float32)


def phase_penalties(errors: dict, penalty: float) -> tuple[jax.Array, jax.Array]:
  """(-penalty where the slate part is malformed else 0, same for the ranking), f32 [...]."""
  slate_bad, rank_bad = phase_invalid(errors)
  return (-penalty * slate_bad.astype(jnp.float32), -penalty * rank_bad.astype(jnp.float32))
