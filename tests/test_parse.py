"""Tests for fgrpo_jax/parse.py: the jnp parser of free-decoded rollouts against a
plain-Python reference, on hand-made and random (hypothesis) token sequences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fgrpo_jax import parse
from fgrpo_jax import rewards as R
from fgrpo_jax import rollout

# A toy vocabulary: ids 10..15 name pool slots 0..5, tags are multi-token and share
# tokens (1 starts both, the mid tags repeat it), 4 is EOS, 5 and 6 are other text.
CAND = (10, 11, 12, 13, 14, 15)
MID, END, STOPS = (1, 2, 1), (1, 3), (4,)
K, M, T = 3, 2, 16
LAYOUT = rollout.Layout(slate_size=K, rank_size=M, mid_tags=MID, end_tags=END,
                        constrained=False, max_new_tokens=T, stop_tokens=STOPS, pad_token=0)


def _find(seq, tag, start, stop):
  """First i >= start with seq[i:i+len(tag)] == tag ending before `stop`, else None."""
  for i in range(start, stop - len(tag) + 1):
    if list(seq[i:i + len(tag)]) == list(tag):
      return i
  return None


def reference_parse(tokens, cand, pool_mask, k=K, m=M, mid=MID, end=END, stops=STOPS):
  """The module doc's rules, written out with lists. Returns (slate, ranking, phases, errors)."""
  tokens = list(tokens)
  n = len(tokens)
  stop = next((i for i, x in enumerate(tokens) if x in stops), n)
  ms = _find(tokens, mid, 0, stop)
  es = _find(tokens, end, ms + len(mid), stop) if ms is not None else None
  last = min(stop, n - 1) if es is None else es + len(end) - 1
  phases = [R.PHASE_NONE] * n
  slate_pos = range(0, (ms if ms is not None else last + 1))
  rank_pos = range(ms + len(mid), es if es is not None else last + 1) if ms is not None else []
  for i in range(last + 1):
    phases[i] = R.PHASE_TAG
  for i in slate_pos:
    phases[i] = R.PHASE_GEN
  for i in rank_pos:
    phases[i] = R.PHASE_RANK
  slot = lambda x: cand.index(x) if x in cand else -1
  slate_ids = [slot(tokens[i]) for i in slate_pos if slot(tokens[i]) >= 0]
  rank_ids = [slot(tokens[i]) for i in rank_pos if slot(tokens[i]) >= 0]
  slate = (slate_ids + [-1] * k)[:k]
  ranking = (rank_ids + [-1] * m)[:m]
  filled = lambda xs: [x for x in xs if x != -1]
  repeats = lambda xs: len(set(filled(xs))) != len(filled(xs))
  errors = {
      "slate_tag_missing": ms is None,
      "rank_tag_missing": es is None,
      "slate_stray_token": any(slot(tokens[i]) < 0 for i in slate_pos),
      "rank_stray_token": any(slot(tokens[i]) < 0 for i in rank_pos),
      "slate_count": len(slate_ids) != k,
      "rank_count": len(rank_ids) != m,
      "slate_duplicate": repeats(slate),
      "slate_out_of_pool": any(not pool_mask[c] for c in filled(slate)),
      "slate_empty_slot": -1 in slate,
      "ranking_duplicate": repeats(ranking),
      "ranking_not_in_slate": any(r not in filled(slate) for r in filled(ranking)),
      "ranking_empty_slot": -1 in ranking,
  }
  return slate, ranking, phases, errors


def _parse(seqs, pool_mask):
  tokens = jnp.asarray(seqs, jnp.int32)
  n = tokens.shape[0]
  return parse.parse(tokens, jnp.broadcast_to(jnp.asarray(CAND), (n, len(CAND))),
                     jnp.broadcast_to(jnp.asarray(pool_mask), (n, len(CAND))),
                     slate_size=K, rank_size=M, mid_tags=MID, end_tags=END, stop_tokens=STOPS)


def _check_against_reference(seqs, pool_mask):
  got = _parse(seqs, pool_mask)
  for row, seq in enumerate(seqs):
    slate, ranking, phases, errors = reference_parse(seq, list(CAND), pool_mask)
    assert np.asarray(got.slate[row]).tolist() == slate, seq
    assert np.asarray(got.ranking[row]).tolist() == ranking, seq
    assert np.asarray(got.phase_ids[row]).tolist() == phases, seq
    assert {k: bool(v[row]) for k, v in got.errors.items()} == errors, seq
  return got


def _pad(seq, fill=0):
  return (list(seq) + [fill] * T)[:T]


ALL_IN_POOL = [True] * len(CAND)
GOOD = [10, 12, 14, *MID, 14, 10, *END]


@pytest.mark.parametrize("name,seq,pool_mask,expected", [
    ("well formed", GOOD, ALL_IN_POOL, set()),
    ("well formed, EOS after", GOOD + [4, 4], ALL_IN_POOL, set()),
    ("mid tags missing", [10, 12, 14, 1, 2, 14, 10, *END], ALL_IN_POOL,
     {"slate_tag_missing", "rank_tag_missing", "slate_stray_token", "slate_count",
      "rank_count", "ranking_empty_slot"}),
    ("end tags missing, EOS", [10, 12, 14, *MID, 14, 10, 4], ALL_IN_POOL,
     {"rank_tag_missing", "rank_stray_token"}),
    ("duplicate in the slate", [10, 10, 14, *MID, 14, 10, *END], ALL_IN_POOL,
     {"slate_duplicate"}),
    ("ranked but not in the slate", [10, 12, 14, *MID, 13, 10, *END], ALL_IN_POOL,
     {"ranking_not_in_slate"}),
    ("slot outside the pool", GOOD, [True, True, True, True, False, True],
     {"slate_out_of_pool"}),
    ("too many in the slate", [10, 12, 14, 15, *MID, 14, 10, *END], ALL_IN_POOL,
     {"slate_count"}),
    ("too few in the ranking", [10, 12, 14, *MID, 14, *END], ALL_IN_POOL,
     {"rank_count", "ranking_empty_slot"}),
    ("stray text in the ranking", [10, 12, 14, *MID, 14, 5, 10, *END], ALL_IN_POOL,
     {"rank_stray_token"}),
    ("early EOS", [10, 12, 4, *MID, 14, 10, *END], ALL_IN_POOL,
     {"slate_tag_missing", "rank_tag_missing", "slate_stray_token", "slate_count",
      "slate_empty_slot", "rank_count", "ranking_empty_slot"}),
])
def test_hand_made_sequences(name, seq, pool_mask, expected):
  got = _check_against_reference([_pad(seq)], pool_mask)
  assert {k for k, v in got.errors.items() if bool(v[0])} == expected, name
  assert float(parse.validity(got.errors)[0]) == float(not expected)


def test_well_formed_spans_and_phases():
  got = _parse([_pad(GOOD, fill=4)], ALL_IN_POOL)
  assert np.asarray(got.slate[0]).tolist() == [0, 2, 4]
  assert np.asarray(got.ranking[0]).tolist() == [4, 0]
  expected = ([R.PHASE_GEN] * K + [R.PHASE_TAG] * len(MID) + [R.PHASE_RANK] * M
              + [R.PHASE_TAG] * len(END))
  assert np.asarray(got.phase_ids[0]).tolist() == expected + [R.PHASE_NONE] * (T - len(expected))
  assert np.asarray(got.choices[0]).tolist()[:len(expected)] == [0, 2, 4, -1, -1, -1, 4, 0,
                                                                  -1, -1]


def test_penalties_per_phase():
  seqs = [_pad(GOOD), _pad([10, 10, 14, *MID, 14, 10, *END]),
          _pad([10, 12, 14, *MID, 13, 10, *END]), _pad([5] * T)]
  got = _parse(seqs, ALL_IN_POOL)
  pen_gen, pen_rank = parse.phase_penalties(got.errors, 0.5)
  assert np.asarray(pen_gen).tolist() == [0.0, -0.5, 0.0, -0.5]
  assert np.asarray(pen_rank).tolist() == [0.0, 0.0, -0.5, -0.5]
  assert np.asarray(parse.validity(got.errors)).tolist() == [1.0, 0.0, 0.0, 0.0]


# Random sequences: built from chunks that are likely to matter (ids, whole and
# partial tags, EOS, other text), or drawn token by token.
ALPHABET = list(CAND) + [0, 1, 2, 3, 4, 5, 6]
CHUNKS = st.one_of(st.sampled_from(CAND).map(lambda x: [x]), st.just(list(MID)),
                   st.just(list(END)), st.sampled_from([MID[:1], MID[:2], END[:1]]).map(list),
                   st.sampled_from([[4], [5], [6]]))
# Near-valid: k' distinct ids, the mid tags, m' of them, the end tags (k' = k +- 1,
# m' = m +- 1), then maybe one token replaced.
def _near_valid(x):
  perm, order, k, m, where, token = x
  slate = list(perm[:k])
  ranking = [slate[i] for i in order if i < k][:m]
  seq = slate + list(MID) + ranking + list(END)
  return [token if i == where else tok for i, tok in enumerate(seq)]


NEAR_VALID = st.tuples(st.permutations(CAND), st.permutations(range(K + 1)),
                       st.sampled_from([K, K, K, K - 1, K + 1]),
                       st.sampled_from([M, M, M, M - 1, M + 1]),
                       st.integers(0, 4 * T), st.sampled_from(ALPHABET)).map(_near_valid)
SEQ = st.one_of(
    NEAR_VALID,
    st.lists(CHUNKS, max_size=12).map(lambda chunks: sum(chunks, [])),
    st.lists(st.sampled_from(ALPHABET), max_size=T)).flatmap(
        lambda seq: st.lists(st.sampled_from(ALPHABET), min_size=T, max_size=T).map(
            lambda filler: (seq + filler)[:T]))


@settings(max_examples=150, deadline=None)
@given(seqs=st.lists(SEQ, min_size=8, max_size=8),
       pool_mask=st.lists(st.booleans(), min_size=len(CAND), max_size=len(CAND)))
def test_parser_matches_reference_on_random_sequences(seqs, pool_mask):
  _check_against_reference(seqs, pool_mask)


_online_stages = jax.jit(lambda tokens: jax.lax.scan(
    lambda s, tok: (lambda n: (n, n.stage))(rollout.advance_free_state(s, tok, LAYOUT)),
    rollout.init_free_state(tokens.shape[0], 1, LAYOUT), tokens.T[:, :, None])[1][..., 0].T)


@settings(max_examples=60, deadline=None)
@given(seqs=st.lists(SEQ, min_size=8, max_size=8))
def test_sampler_state_ends_where_the_parser_ends(seqs):
  """The sampler's online state (which pads after the end) agrees with the parser."""
  stages = np.asarray(_online_stages(jnp.asarray(seqs, jnp.int32)))  # stage after token t
  got = _parse(seqs, ALL_IN_POOL)
  phases = np.asarray(got.phase_ids)
  for row in range(len(seqs)):
    ended = np.nonzero(stages[row] == 2)[0]
    last_live = int(ended[0]) if len(ended) else T - 1
    assert (phases[row, :last_live + 1] != R.PHASE_NONE).all()
    assert (phases[row, last_live + 1:] == R.PHASE_NONE).all()
    # Before the end, stage 1 (ranking) starts right after the mid tags.
    rank_or_end = np.nonzero(stages[row] >= 1)[0]
    first_rank = int(rank_or_end[0]) if len(rank_or_end) else T
    mid_done = np.nonzero(phases[row] == R.PHASE_RANK)[0]
    if len(mid_done):
      assert first_rank == mid_done[0] - 1


def test_no_errors_is_valid():
  errors = parse.no_errors((2, 3))
  assert set(errors) == set(parse.ERRORS)
  assert np.all(np.asarray(parse.validity(errors)) == 1)
