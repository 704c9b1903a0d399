"""Tests for fgrpo_jax.data.synthetic_recsys (numpy only, ~a few seconds)."""

import math

import numpy as np
import pytest

from fgrpo_jax.data import recsys
from fgrpo_jax.data import synthetic_recsys as sr
from fgrpo_jax.errors import UserError

TINY = dict(sr.TINY_CONFIG)
SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def tiny():
  return sr.make_synthetic_recsys(**TINY, seed=0)


@pytest.fixture(scope="module")
def default():
  return sr.make_synthetic_recsys(seed=0)


def _all_examples(ds):
  return [ds.split(s) for s in SPLITS]


# -- shapes, dtypes, padding ----------------------------------------------------


def test_shapes_dtypes_and_sizes(tiny):
  h, c, users, length = TINY["history_len"], 20, TINY["num_users"], TINY["seq_len"]
  min_hist = max(1, h // 2)
  assert len(tiny.train) == users * (length - 2 - min_hist)
  assert len(tiny.validation) == users and len(tiny.test) == users
  for ex in _all_examples(tiny):
    n = len(ex)
    assert ex.history.shape == (n, h) and ex.history.dtype == np.int32
    assert ex.pool.shape == (n, c) and ex.pool.dtype == np.int32
    assert ex.relevance.shape == (n, c) and ex.relevance.dtype == np.float32
    assert ex.oracle_scores.shape == (n, c) and ex.oracle_scores.dtype == np.float32
    assert ex.pool.min() >= 0 and ex.pool.max() < tiny.num_items
    assert ex.history.min() >= -1 and ex.history.max() < tiny.num_items
    assert np.all(np.isfinite(ex.oracle_scores)) and np.all(ex.oracle_scores >= 0)
  assert tiny.item_popularity.shape == (tiny.num_items,)
  assert tiny.item_popularity.dtype == np.float32
  assert len(tiny.item_names) == tiny.num_items
  assert "cluster" in tiny.item_names[0]
  assert tiny.sequences.shape == (users, length)


def test_padding_is_left_and_most_histories_full(tiny, default):
  for ds in (tiny, default):
    h = ds.train.history_len
    min_hist = ds.info["config"]["min_history"]
    for ex in _all_examples(ds):
      valid = ex.history != -1
      # Padding only as a prefix: once valid, always valid.
      assert np.all(valid[:, 1:] >= valid[:, :-1])
      assert np.all(ex.history_lengths >= min_hist)
    assert np.all(ds.test.history_lengths == h)
    assert np.all(ds.validation.history_lengths == h)
    assert np.mean(ds.train.history_lengths == h) > 0.5
    assert np.any(ds.train.history_lengths < h)  # some padded examples exist


def test_histories_match_sequences_leave_one_out(tiny):
  seqs, h = tiny.sequences, tiny.test.history_len
  length = seqs.shape[1]
  np.testing.assert_array_equal(tiny.test.target, seqs[:, -1])
  np.testing.assert_array_equal(tiny.validation.target, seqs[:, -2])
  np.testing.assert_array_equal(tiny.test.history, seqs[:, length - 1 - h:length - 1])
  np.testing.assert_array_equal(tiny.validation.history, seqs[:, length - 2 - h:length - 2])
  # Training examples are prefixes of their user's sequence, ending before
  # the validation target, never seeing validation/test targets.
  tr = tiny.train
  for n in range(0, len(tr), 97):
    u = tr.user[n]
    hist = tr.history[n][tr.history[n] != -1]
    t = None
    for cand in range(1, length - 2):
      lo = max(0, cand - h)
      if np.array_equal(seqs[u, lo:cand], hist) and seqs[u, cand] == tr.target[n]:
        t = cand
    assert t is not None and t <= length - 3


# -- pools --------------------------------------------------------------------


@pytest.mark.parametrize("negatives", ["uniform", "popularity"])
def test_pools_distinct_and_contain_target_once(negatives):
  ds = sr.make_synthetic_recsys(**TINY, seed=3, negatives=negatives)
  seqs = ds.sequences
  for ex, targets in ((ds.test, seqs[:, -1]), (ds.validation, seqs[:, -2]),
                      (ds.train, None)):
    srt = np.sort(ex.pool, axis=1)
    assert np.all(srt[:, 1:] != srt[:, :-1]), "pool items must be distinct"
    assert np.all(ex.relevance.sum(axis=1) == 1.0)
    assert set(np.unique(ex.relevance)) <= {0.0, 1.0}
    tgt = targets if targets is not None else ex.target
    assert np.all((ex.pool == tgt[:, None]).sum(axis=1) == 1)
    np.testing.assert_array_equal(ex.pool[np.arange(len(ex)), ex.target_slot], tgt)


def test_target_slot_roughly_uniform(default):
  slots = default.train.target_slot
  c = default.train.pool_size
  counts = np.bincount(slots, minlength=c)
  expected = len(slots) / c
  chi2 = float(((counts - expected) ** 2 / expected).sum())
  # 19 dof: P(chi2 > 55) ~ 2e-5.
  assert chi2 < 55, (chi2, counts)
  # And not trivially constant.
  assert counts.min() > 0


def test_popularity_negatives_favour_popular_items():
  uni = sr.make_synthetic_recsys(**TINY, seed=1)
  pop = sr.make_synthetic_recsys(**TINY, seed=1, negatives="popularity")
  def neg_pop(ds):
    ex = ds.train
    mask = ex.relevance == 0
    return ds.item_popularity[ex.pool][mask].mean()
  # Same sequences (the pool stream is separate), different negatives.
  np.testing.assert_array_equal(uni.sequences, pop.sequences)
  assert neg_pop(pop) > 1.2 * neg_pop(uni)


# -- determinism ----------------------------------------------------------------


def test_determinism_and_seed_sensitivity():
  a = sr.make_synthetic_recsys(**TINY, seed=7)
  b = sr.make_synthetic_recsys(**TINY, seed=7)
  c = sr.make_synthetic_recsys(**TINY, seed=8)
  for s in SPLITS:
    for f in ("history", "pool", "relevance", "oracle_scores"):
      np.testing.assert_array_equal(getattr(a.split(s), f), getattr(b.split(s), f))
  np.testing.assert_array_equal(a.item_popularity, b.item_popularity)
  assert a.item_names == b.item_names
  assert not np.array_equal(a.sequences, c.sequences)
  assert not np.array_equal(a.test.pool, c.test.pool)
  assert not np.array_equal(a.model.transition, c.model.transition)


def test_max_train_per_user_and_take(tiny):
  ds = sr.make_synthetic_recsys(**TINY, seed=0, max_train_per_user=2)
  assert len(ds.train) == 2 * TINY["num_users"]
  assert np.all(np.bincount(ds.train.user) == 2)
  np.testing.assert_array_equal(ds.test.pool, tiny.test.pool)
  sub = tiny.test.take([3, 1])
  assert len(sub) == 2
  np.testing.assert_array_equal(sub.pool, tiny.test.pool[[3, 1]])
  np.testing.assert_array_equal(sub.oracle_scores, tiny.test.oracle_scores[[3, 1]])
  assert len(tiny.test.take(slice(0, 5))) == 5
  assert len(tiny.test.take(tiny.test.user < 10)) == 10
  assert len(tiny.test.take(4)) == 1


# -- generative model -------------------------------------------------------------


def test_no_immediate_repeats(tiny, default):
  for ds in (tiny, default):
    s = ds.sequences
    assert np.all(s[:, 1:] != s[:, :-1])
    for ex in _all_examples(ds):
      assert np.all(ex.target != ex.last_item)
    assert np.all(np.diagonal(ds.model.transition, axis1=1, axis2=2) == 0)


def test_model_tables_are_consistent(tiny):
  m = tiny.model
  np.testing.assert_allclose(m.transition.sum(axis=2), 1.0, atol=1e-12)
  np.testing.assert_allclose(m.initial.sum(axis=1), 1.0, atol=1e-12)
  # Stationarity: pi_u P_u = pi_u (what makes the window oracle exact).
  np.testing.assert_allclose(np.einsum("ti,tij->tj", m.initial, m.transition),
                             m.initial, atol=1e-12)
  assert np.all(m.follow_up != np.arange(m.num_items))
  np.testing.assert_array_equal(m.item_cluster[m.follow_up], m.item_cluster)


def test_sequences_follow_the_model_empirically(default):
  """Empirical bigram frequencies match sum_u P(u) pi_u(i) p(j|u,i)."""
  m, s = default.model, default.sequences
  joint = np.einsum("t,ti,tij->ij", m.type_prior, m.initial, m.transition)
  counts = np.zeros_like(joint)
  np.add.at(counts, (s[:, :-1].ravel(), s[:, 1:].ravel()), 1.0)
  n = counts.sum()
  # Compare on the clusters (aggregated) to keep the test statistically sharp.
  onehot = np.eye(m.num_clusters)[m.item_cluster]          # [I, K]
  agg = lambda a: onehot.T @ a @ onehot
  emp, exp = agg(counts) / n, agg(joint)
  se = np.sqrt(exp * (1 - exp) / n) * 3  # sequences are correlated: be lenient
  assert np.all(np.abs(emp - exp) < 6 * se + 1e-4)
  # Latent types are used roughly uniformly.
  frac = np.bincount(default.user_types, minlength=m.num_user_types) / len(s)
  assert np.all(np.abs(frac - m.type_prior) < 0.03)


def _brute_force_oracle(model, history, pool):
  """Plain-Python Bayes computation from the model's primitive parameters."""
  nt, ni = model.num_user_types, model.num_items
  cl, w, f = model.item_cluster, model.item_weight, model.follow_up
  a, b = model.alpha, model.beta

  def kernel(u, i):
    q = []
    for j in range(ni):
      v = (1 - b) * w[j] * (a * model.cluster_transition[cl[i], cl[j]]
                            + (1 - a) * model.type_taste[u, cl[j]])
      if j == f[i]:
        v += b
      q.append(0.0 if j == i else v)
    z = sum(q)
    return [v / z for v in q]

  items = [int(x) for x in history if x != -1]
  logs = []
  for u in range(nt):
    lp = math.log(model.type_prior[u]) + math.log(model.initial[u][items[0]])
    for prev, nxt in zip(items[:-1], items[1:]):
      lp += math.log(kernel(u, prev)[nxt])
    logs.append(lp)
  mx = max(logs)
  z = sum(math.exp(l - mx) for l in logs)
  post = [math.exp(l - mx) / z for l in logs]
  scores = []
  for item in pool:
    scores.append(sum(post[u] * kernel(u, items[-1])[int(item)] for u in range(nt)))
  return post, scores


def test_oracle_matches_brute_force(tiny):
  rng = np.random.default_rng(0)
  ex_list = []
  for ex in (tiny.train, tiny.test):
    idx = rng.choice(len(ex), size=4, replace=False)
    ex_list.append(ex.take(idx))
  # Make sure padded histories are covered.
  short = np.nonzero(tiny.train.history_lengths < tiny.train.history_len)[0][:3]
  ex_list.append(tiny.train.take(short))
  checked = 0
  for ex in ex_list:
    post = tiny.model.posterior(ex.history)
    for n in range(len(ex)):
      bf_post, bf_scores = _brute_force_oracle(tiny.model, ex.history[n], ex.pool[n])
      np.testing.assert_allclose(post[n], bf_post, rtol=1e-9, atol=1e-12)
      np.testing.assert_allclose(ex.oracle_scores[n], bf_scores, rtol=1e-5, atol=1e-9)
      checked += 1
  assert checked == 11
  # next_item_probs is a distribution consistent with oracle_scores.
  ex = tiny.test.take(np.arange(50))
  probs = tiny.model.next_item_probs(ex.history)
  np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
  np.testing.assert_allclose(np.take_along_axis(probs, ex.pool, axis=1),
                             ex.oracle_scores, rtol=1e-5)
  # The posterior is informative (not just the prior).
  assert np.mean(tiny.model.posterior(tiny.test.history).max(axis=1)) > 0.6


def test_oracle_is_the_generating_distribution(default):
  """Self-predicted Hit@1 and slot probabilities match the data."""
  ex = default.train  # ~52k examples
  s = ex.oracle_scores.astype(np.float64)
  q = s / s.sum(axis=1, keepdims=True)  # P(target = slot | history, pool)
  hit = recsys.score_ranking_metrics(s, ex.relevance, ks=(1,), reduce=False)["hit@1"]
  p = q.max(axis=1)
  se = math.sqrt(float(np.sum(p * (1 - p)))) / len(ex)
  assert abs(hit.mean() - p.mean()) < 4 * se + 1e-3, (hit.mean(), p.mean(), se)
  # Calibration of every slot probability, binned.
  qf, rf = q.ravel(), ex.relevance.ravel().astype(np.float64)
  edges = np.array([0, 0.01, 0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0 + 1e-9])
  which = np.digitize(qf, edges) - 1
  for bin_ in range(len(edges) - 1):
    sel = which == bin_
    if sel.sum() < 200:
      continue
    var = float(np.sum(qf[sel] * (1 - qf[sel])))
    diff = abs(rf[sel].sum() - qf[sel].sum())
    assert diff < 5 * math.sqrt(var) + 2, (bin_, rf[sel].sum(), qf[sel].sum())


def test_oracle_beats_baselines(default):
  ex = default.train
  scores = default.baseline_scores(ex)
  hit = {k: recsys.score_ranking_metrics(v, ex.relevance, ks=(1,))["hit@1"]
         for k, v in scores.items()}
  assert hit["oracle"] > hit["popularity"] + 0.2
  assert hit["oracle"] > hit["last_item"] + 0.3
  assert hit["oracle"] > hit["random"] + 0.3
  assert hit["last_item"] < 0.06 and abs(hit["random"] - 0.05) < 1e-9
  # On held-out users' last items the oracle also beats the estimated bigram.
  te = default.test
  t_scores = default.baseline_scores(te)
  t_hit = {k: recsys.score_ranking_metrics(v, te.relevance, ks=(1,))["hit@1"]
           for k, v in t_scores.items()}
  assert t_hit["oracle"] > t_hit["bigram"] + 0.02
  # Conditioning on more history helps (type inference is part of the task).
  last1 = default.model.oracle_scores(te.history[:, -1:], te.pool)
  assert t_hit["oracle"] > recsys.score_ranking_metrics(last1, te.relevance, ks=(1,))["hit@1"]


def test_default_summary_has_headroom(default):
  s = default.summary()
  m = s["metrics"]
  assert 0.4 <= m["oracle"]["hit@1"] <= 0.8
  assert m["popularity"]["hit@1"] <= 0.25
  assert m["oracle"]["hit@1"] > m["popularity"]["hit@1"] + 0.2
  assert abs(m["random"]["hit@1"] - 1 / 20) < 1e-9
  assert m["last_item"]["hit@1"] <= 0.06
  assert m["oracle"]["ndcg@5"] > m["popularity"]["ndcg@5"]
  assert s["sizes"] == {"train": len(default.train), "validation": 4000, "test": 4000}
  assert abs(s["oracle_expected_hit@1"] - m["oracle"]["hit@1"]) < 0.04
  assert s["generation_seconds"] > 0  # reported; speed targets live in benchmarks/, not tests
  assert s["oracle_hit@1"] == m["oracle"]["hit@1"]
  assert "oracle" in sr.format_summary(s)


# -- metrics ----------------------------------------------------------------------


def test_ranking_metrics_ties_and_extremes():
  rel = np.zeros((3, 4), np.float32)
  rel[:, 1] = 1
  const = np.zeros((3, 4))
  m = recsys.score_ranking_metrics(const, rel, ks=(1, 2))
  assert m["hit@1"] == pytest.approx(0.25) and m["hit@2"] == pytest.approx(0.5)
  assert m["ndcg@2"] == pytest.approx(0.25 * (1 + 1 / math.log2(3)))
  pess = recsys.score_ranking_metrics(const, rel, ks=(1, 4), ties="pessimistic")
  assert pess["hit@1"] == 0.0 and pess["hit@4"] == 1.0
  perfect = recsys.score_ranking_metrics(rel.astype(float), rel, ks=(1, 3))
  assert perfect["hit@1"] == 1.0 and perfect["ndcg@3"] == 1.0 and perfect["mrr"] == 1.0
  worst = recsys.score_ranking_metrics(-rel.astype(float), rel, ks=(1, 3))
  assert worst["hit@1"] == 0.0 and worst["hit@3"] == 0.0
  assert worst["mrr"] == pytest.approx(0.25)


def test_examples_validation_and_real_data_container():
  h = np.array([[-1, 1, 2]], np.int32)
  pool = np.array([[3, 4]], np.int32)
  rel = np.array([[0, 1]], np.float32)
  ex = recsys.RecsysExamples(history=h, pool=pool, relevance=rel, oracle_scores=None)
  assert len(ex) == 1 and ex.target[0] == 4 and ex.take([0]).oracle_scores is None
  with pytest.raises(ValueError):
    recsys.RecsysExamples(history=h, pool=pool, relevance=rel[:, :1], oracle_scores=None)


# -- several graded targets, retrieved pools (issue 14) -------------------------------

RETRIEVED = dict(TINY, negatives="retrieved", num_targets=3, pool_size=20, seq_len=16)


def _digest(ds):
  import hashlib
  h = hashlib.sha256()
  for ex in _all_examples(ds):
    for a in (ex.history, ex.pool, ex.relevance, ex.oracle_scores, ex.user):
      h.update(np.ascontiguousarray(a).tobytes())
  h.update(ds.item_popularity.tobytes())
  h.update(ds.sequences.tobytes())
  return h.hexdigest()[:16]


@pytest.mark.parametrize("negatives,digest", [("uniform", "d28996d6e33773e1"),
                                              ("popularity", "dea1fa1fe494d458")])
def test_one_target_reproduces_the_earlier_data_exactly(negatives, digest):
  # Digests of every array, written by the generator at commit 695e5a7 (before
  # num_targets existed): num_targets=1 with those negatives must not change a bit.
  ds = sr.make_synthetic_recsys(**TINY, seed=0, negatives=negatives, num_targets=1)
  assert _digest(ds) == digest


@pytest.fixture(scope="module")
def small_model():
  return sr.build_synthetic_model(num_items=7, num_clusters=3, num_user_types=3,
                                  num_successors=1, rng=5)


def _futures(model, u, last, n):
  """Plain Python: every n-step future of a type-u user after `last`, with its probability."""
  out = [((), 1.0)]
  for _ in range(n):
    out = [(y + (j,), p * float(model.transition[u, y[-1] if y else last, j]))
           for y, p in out for j in range(model.num_items)]
  return out


@pytest.mark.parametrize("n", [1, 2, 3])
def test_multi_target_oracle_is_the_bayes_posterior(small_model, n):
  """Brute force over user types and every future: P(c relevant | window, pool, kept),
  with the pool drawn from the window alone and kept iff it meets a target."""
  model = small_model
  rng = np.random.default_rng(n)
  checked = 0
  for _ in range(6):
    history = np.full(4, -1)
    seq = [int(rng.integers(model.num_items))]
    for _ in range(int(rng.integers(1, 4))):
      seq.append(int(rng.choice(model.num_items, p=model.transition[0, seq[-1]])))
    history[4 - len(seq):] = seq
    pool = rng.choice(model.num_items, size=4, replace=False)
    post = model.posterior(history[None])[0]
    joint = np.zeros(len(pool))
    kept = 0.0
    for u in range(model.num_user_types):
      for future, p in _futures(model, u, seq[-1], n):
        if set(future) & set(pool.tolist()):
          kept += post[u] * p
          joint += post[u] * p * np.isin(pool, future)
    bayes = joint / kept
    scores = model.oracle_scores(history[None], pool[None], n)[0]
    # Exact up to the row constant P(kept | window, pool), which ranking ignores.
    np.testing.assert_allclose(scores, bayes * kept, rtol=1e-9, atol=1e-15)
    assert bayes.max() > 0
    checked += 1
  assert checked == 6


def test_target_tables_at_start_and_as_probabilities(small_model):
  model = small_model
  after_item, at_start = model.target_tables(3)
  for u in range(model.num_user_types):
    want = np.zeros(model.num_items)
    for i in range(model.num_items):
      for future, p in _futures(model, u, i, 2):
        for c in set((i,) + future):
          want[c] += model.initial[u, i] * p
    np.testing.assert_allclose(at_start[u], want, rtol=1e-9)
  # A membership probability, and the expected number of distinct items is <= n.
  assert np.all((after_item >= 0) & (after_item <= 1 + 1e-12))
  assert np.all(after_item.sum(axis=2) <= 3 + 1e-9) and np.all(after_item.sum(axis=2) > 2)
  table1, start1 = model.target_tables(1)
  assert table1 is model.transition and start1 is model.initial


def test_retrieved_targets_and_graded_relevance_follow_the_sequences():
  ds = sr.make_synthetic_recsys(**RETRIEVED, seed=2, target_decay=0.5)
  seqs = ds.sequences
  length = seqs.shape[1]
  for name, first in (("validation", length - 6), ("test", length - 3)):
    ex = ds.split(name)
    assert len(ex) == ds.num_items * 0 + len(seqs) - ds.info["dropped"][name]
    for row in range(len(ex)):
      targets = seqs[ex.user[row], first:first + 3].tolist()
      want = [max([0.5 ** j for j, t in enumerate(targets) if t == item], default=0.0)
              for item in ex.pool[row].tolist()]
      assert ex.relevance[row].tolist() == want
      np.testing.assert_array_equal(ex.history[row], seqs[ex.user[row], first - 6:first])
  for ex in _all_examples(ds):
    assert np.all(ex.relevance.max(axis=1) > 0)  # examples missing every target dropped
    srt = np.sort(ex.pool, axis=1)
    assert np.all(srt[:, 1:] != srt[:, :-1])
  # Training targets stop before the validation targets.
  assert ds.train.history.shape[1] == 6 and sum(ds.info["dropped"].values()) > 0
  assert set(np.unique(ds.validation.relevance)) <= {0.0, 0.25, 0.5, 1.0}
  assert np.mean((ds.validation.relevance > 0).sum(axis=1)) > 1.2


def test_retrieved_pools_have_the_configured_mix():
  model = sr.build_synthetic_model(num_items=60, num_clusters=6, num_user_types=4, rng=0)
  rng = np.random.default_rng(0)
  history = rng.integers(0, 60, size=(2000, 3))
  history[:5, :2] = -1
  shares = sr.parse_retrieval_mix("cluster=0.5,popularity=0.3,uniform=0.2")
  counts = sr.retrieval_counts(shares, 10)
  assert counts == {"cluster": 5, "popularity": 3, "uniform": 2}
  log_pop = np.log(model.item_marginal)
  pool, kind = sr._retrieve_pools(history, model.item_cluster, log_pop, counts, rng)
  assert pool.shape == kind.shape == (2000, 10)
  for kind_id, name in enumerate(sr.RETRIEVAL_KINDS):
    assert np.all((kind == kind_id).sum(axis=1) == counts[name])
  srt = np.sort(pool, axis=1)
  assert np.all(srt[:, 1:] != srt[:, :-1])
  # Same-cluster items come from the clusters the history touches (<= 3 clusters of
  # 10 items each, so 5 always fit).
  for row in range(len(pool)):
    touched = set(model.item_cluster[history[row][history[row] >= 0]].tolist())
    assert set(model.item_cluster[pool[row][kind[row] == 0]].tolist()) <= touched
  # Popular items: drawn proportionally to the model's item marginal, so their mean
  # log-popularity is above the uniform draws'.
  assert log_pop[pool[kind == 1]].mean() > log_pop[pool[kind == 2]].mean() + 0.1
  # The draw does not depend on anything but the history and the random stream.
  again, _ = sr._retrieve_pools(history, model.item_cluster, log_pop, counts,
                                np.random.default_rng(0))
  np.testing.assert_array_equal(again, sr._retrieve_pools(
      history, model.item_cluster, log_pop, counts, np.random.default_rng(0))[0])


@pytest.mark.parametrize("kwargs,field", [
    (dict(num_targets=0), "config.data.num_targets"),
    (dict(num_targets=2.5, negatives="retrieved"), "config.data.num_targets"),
    (dict(num_targets=2), "config.data.num_targets"),  # needs retrieved pools
    (dict(target_decay=0.0), "config.data.target_decay"),
    (dict(target_decay=1.5), "config.data.target_decay"),
    (dict(negatives="hard"), "config.data.negatives"),
    (dict(negatives="retrieved", retrieval_mix="cluster=0.7,uniform=0.7"),
     "config.data.retrieval_mix"),
    (dict(negatives="retrieved", retrieval_mix="nearby=1"), "config.data.retrieval_mix"),
    (dict(negatives="retrieved", retrieval_mix="cluster=x"), "config.data.retrieval_mix"),
    (dict(negatives="retrieved", retrieval_mix="cluster=-0.5,uniform=1.5"),
     "config.data.retrieval_mix"),
    (dict(negatives="retrieved", num_targets=4), "config.data.seq_len"),
    (dict(pool_size=61), "config.data.pool_size"),
])
def test_bad_values_name_the_field(kwargs, field):
  with pytest.raises(UserError) as err:
    sr.make_synthetic_recsys(**{**TINY, **kwargs})
  assert str(err.value).startswith(field) and "\n" not in str(err.value)
