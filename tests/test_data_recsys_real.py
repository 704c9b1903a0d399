"""Real recommendation datasets (fgrpo_jax/data/recsys_real.py): every published format,
written as small fixture files, prepared, checked against the known sequences, and
trained for one SFT and one RL step; bad input ends in one UserError naming file and line."""

import datetime
import functools
import gzip
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import recsys
from fgrpo_jax import config as config_lib
from fgrpo_jax import steps as steps_lib
from fgrpo_jax import train
from fgrpo_jax.data import arrays as arrays_lib
from fgrpo_jax.data import recsys_real, tasks
from fgrpo_jax.errors import UserError
from fgrpo_jax.models import llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_USERS, NUM_ITEMS = 10, 40


def _log():
  """Events: (user, item, rating, seconds), each user's items distinct, time-shuffled."""
  rng = np.random.default_rng(0)
  out = []
  for u in range(NUM_USERS):
    n = 4 if u == NUM_USERS - 1 else int(rng.integers(7, 12))  # the last user is too short
    items = rng.choice(NUM_ITEMS, n, replace=False)
    times = 1_000_000_000 + np.sort(rng.choice(10**6, n, replace=False)) + u * 10**7
    out += [(u, int(i), int(rng.integers(1, 6)), int(t)) for i, t in zip(items, times)]
  perm = rng.permutation(len(out))  # files are not in time order
  return [out[j] for j in perm]


EVENTS = _log()
TITLE = {i: f"Film {i} (199{i % 10})" for i in range(NUM_ITEMS)}
TITLE[3] = "Amélie (2001)"


def _sequences():
  seqs = {}
  for u, i, _, t in sorted(EVENTS, key=lambda e: (e[0], e[3])):
    seqs.setdefault(u, []).append(i)
  return seqs


# ----------------------------------------------------------------------------
# Fixture writers: one per published layout. Each returns raw-item-id -> item index.


def write_ml100k(d):
  with open(d / "u.data", "w") as f:
    for u, i, r, t in EVENTS:
      f.write(f"{u + 1}\t{i + 1}\t{r}\t{t}\n")
  with open(d / "u.item", "w", encoding="latin-1") as f:
    for i in range(NUM_ITEMS + 3):  # movies nobody rated are fine
      f.write(f"{i + 1}|{TITLE.get(i, 'Unrated')}|01-Jan-1995||http://x|0|0|1\n")
  return {str(i + 1): i for i in range(NUM_ITEMS)}


def write_ml1m(d):
  with open(d / "ratings.dat", "w") as f:
    for u, i, r, t in EVENTS:
      f.write(f"{u + 1}::{i + 1}::{r}::{t}\n")
  with open(d / "movies.dat", "w", encoding="latin-1") as f:
    for i in range(NUM_ITEMS):
      f.write(f"{i + 1}::{TITLE[i]}::Drama|Comedy\n")
  return {str(i + 1): i for i in range(NUM_ITEMS)}


def write_ml25m(d):
  with open(d / "ratings.csv", "w") as f:
    f.write("userId,movieId,rating,timestamp\n")
    for u, i, r, t in EVENTS:
      f.write(f"{u + 1},{i + 100},{r - 0.5},{t}\n")
  with open(d / "movies.csv", "w", encoding="utf-8") as f:
    f.write("movieId,title,genres\n")
    for i in range(NUM_ITEMS):
      f.write(f'{i + 100},"{TITLE[i]}, The",Comedy\n')
  return {str(i + 100): i for i in range(NUM_ITEMS)}


def write_hetrec(d):
  with open(d / "user_taggedartists-timestamps.dat", "w") as f:
    f.write("userID\tartistID\ttagID\ttimestamp\n")
    for u, i, _, t in EVENTS:
      for tag in (1, 7):  # several tags per (user, artist): one interaction
        f.write(f"{u + 2}\t{i + 50}\t{tag}\t{t * 1000}\n")
  with open(d / "artists.dat", "w") as f:
    f.write("id\tname\turl\tpictureURL\n")
    for i in range(NUM_ITEMS):
      f.write(f"{i + 50}\t{TITLE[i]}\thttp://www.last.fm/music/x\thttp://img\n")
  return {str(i + 50): i for i in range(NUM_ITEMS)}


def _mbid(i):
  return "" if i == 5 else f"00000000-0000-0000-0000-{i:012d}"


def write_lfm1k(d):
  rows = []
  for u, i, _, t in EVENTS:
    stamp = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
    for rep in range(2 if i % 4 == 0 else 1):  # repeated listens
      iso = (stamp + datetime.timedelta(seconds=rep)).strftime("%Y-%m-%dT%H:%M:%SZ")
      rows.append((u, iso, f"user_{u + 1:06d}\t{iso}\t{_mbid(i)}\t{TITLE[i]}\t\tSong {i}\n"))
  rows.sort(key=lambda r: (r[0], r[1]), reverse=True)  # the file is newest first per user
  with open(d / "userid-timestamp-artid-artname-traid-traname.tsv", "w") as f:
    f.writelines(r[2] for r in rows)
  return {(_mbid(i) or f"name:{TITLE[i]}"): i for i in range(NUM_ITEMS)}


def write_amazon2018(d, gz=False):
  opener = (lambda p: gzip.open(p, "wt")) if gz else (lambda p: open(p, "w"))
  ext = ".json.gz" if gz else ".json"
  with opener(d / f"Beauty_5{ext}") as f:
    for u, i, r, t in EVENTS:
      f.write(json.dumps({"overall": float(r), "verified": True, "reviewerID": f"A{u}X",
                          "asin": f"B{i:05d}", "unixReviewTime": t,
                          "reviewText": "nice", "summary": "ok"}) + "\n")
  with opener(d / f"meta_Beauty{ext}") as f:
    for i in range(NUM_ITEMS):
      meta = {"asin": f"B{i:05d}", "title": TITLE[i]} if i != 7 else {"asin": f"B{i:05d}"}
      f.write(json.dumps(meta) + "\n")
    f.write(json.dumps({"asin": "B99999", "title": "Never reviewed"}) + "\n")
  return {f"B{i:05d}": i for i in range(NUM_ITEMS)}


def write_amazon2023(d):
  with open(d / "All_Beauty.jsonl", "w") as f:
    for u, i, r, t in EVENTS:
      f.write(json.dumps({"rating": float(r), "title": "x", "text": "y", "images": [],
                          "asin": f"C{i}-{u}", "parent_asin": f"P{i:04d}", "user_id": f"U{u}",
                          "timestamp": t * 1000, "helpful_vote": 0,
                          "verified_purchase": True}) + "\n")
  with open(d / "meta_All_Beauty.jsonl", "w") as f:
    for i in range(NUM_ITEMS):
      f.write(json.dumps({"main_category": "All Beauty", "title": TITLE[i],
                          "parent_asin": f"P{i:04d}"}) + "\n")
  return {f"P{i:04d}": i for i in range(NUM_ITEMS)}


def write_recbole(d, name="ml-fix"):
  """RecBole atomic files: typed headers, tab-separated, the .item file with a BOM."""
  with open(d / f"{name}.inter", "w") as f:
    f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
    for u, i, r, t in EVENTS:
      f.write(f"{u + 1}\t{i + 1}\t{r}\t{t}\n")
  with open(d / f"{name}.item", "w", encoding="utf-8-sig") as f:
    f.write("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n")
    for i in range(NUM_ITEMS + 2):
      f.write(f"{i + 1}\t{TITLE.get(i, 'Unrated')}\t1995\tDrama Comedy\n")
  with open(d / f"{name}.user", "w") as f:  # not read, but part of the published folder
    f.write("user_id:token\tage:token\tgender:token\n")
    f.writelines(f"{u + 1}\t30\tF\n" for u in range(NUM_USERS))
  return {str(i + 1): i for i in range(NUM_ITEMS)}


FORMATS = {
    "ml-100k": ("movielens", write_ml100k, "ml-100k"),
    "ml-1m": ("movielens", write_ml1m, "ml-1m"),
    "ml-25m": ("movielens", write_ml25m, "ml-25m"),
    "hetrec": ("lastfm", write_hetrec, "hetrec2011-lastfm-2k"),
    "lastfm-1k": ("lastfm", write_lfm1k, "lastfm-1k"),
    "amazon2018": ("amazon", write_amazon2018, "amazon2018-Beauty"),
    "amazon2018-gz": ("amazon", functools.partial(write_amazon2018, gz=True), "amazon2018-Beauty"),
    "amazon2023": ("amazon", write_amazon2023, "amazon2023-All_Beauty"),
    "recbole": ("recbole", write_recbole, "ml-fix"),
}


def make_config(name, path, cache_dir, **data):
  c = recsys.get_config("tiny")
  c.data.name, c.data.path, c.data.cache_dir = name, str(path), str(cache_dir)
  c.data.pool_size = 20
  c.data.kcore = 1  # the k-core has its own test
  c.data.min_history = 3
  for k, v in data.items():
    c.data[k] = v
  return c


def prepare(tmp_path, fmt, **data):
  name, writer, _ = FORMATS[fmt]
  d = tmp_path / fmt
  d.mkdir(exist_ok=True)
  ids = writer(d)
  logs = []
  ds = recsys_real.load(make_config(name, d, tmp_path / "cache", **data), log=logs.append)
  return ds, ids, logs


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_format_is_read_chronologically_with_leave_one_out(tmp_path, fmt):
  ds, ids, logs = prepare(tmp_path, fmt)
  assert ds.info["variant"] == FORMATS[fmt][2]
  seqs = {u: s for u, s in _sequences().items() if len(s) >= 3 + 2}  # min_history 3
  raw = ds.info["item_raw_ids"]
  to_fixture = np.array([ids[r] for r in raw])  # prepared item id -> fixture item
  H = ds.test.history_len
  assert len(ds.test) == len(ds.validation) == len(seqs) == NUM_USERS - 1
  targets = sorted(tuple(to_fixture[ds.test.history[r][ds.test.history[r] >= 0]].tolist())
                   + (int(to_fixture[ds.test.target[r]]),) for r in range(len(ds.test)))
  expected = sorted(tuple(s[-1 - H:]) for s in seqs.values())
  assert targets == expected  # histories are the last H items before the last one
  vals = sorted(int(to_fixture[t]) for t in ds.validation.target)
  assert vals == sorted(s[-2] for s in seqs.values())
  assert len(ds.train) == sum(len(s) - 2 - 3 for s in seqs.values())
  assert (ds.train.history_lengths >= 3).all()
  for split in (ds.train, ds.validation, ds.test):
    pool = split.pool
    assert (np.sort(pool, 1)[:, 1:] != np.sort(pool, 1)[:, :-1]).all()  # distinct
    np.testing.assert_array_equal(split.relevance.sum(1), 1.0)
    for r in range(len(split)):  # negatives are items the user never touched
      user_items = set(seqs[_user_of(split, r, seqs, to_fixture)])
      negs = [int(to_fixture[p]) for p, rel in zip(pool[r], split.relevance[r]) if rel == 0]
      assert not user_items & set(negs)
  names = dict(zip(to_fixture.tolist(), ds.item_names))
  if fmt.startswith("amazon2018"):
    assert names[7] == "B00007"  # no title in the metadata: named by its id
    never_reviewed = NUM_ITEMS - len({i for _, i, _, _ in EVENTS})
    # metadata of items nobody reviewed, plus the one extra asin B99999
    assert ds.info["counts"]["metadata_unknown_items_skipped"] == never_reviewed + 1
  else:
    assert names[3].startswith("Amélie")  # latin-1 / utf-8 decoded as published
  assert ds.info["counts"]["users_too_short"] == 1
  assert any("too short" not in l and "core" in l for l in logs)
  assert ds.item_popularity.shape == (ds.num_items,) and ds.item_popularity.sum() > 0


def _user_of(split, r, seqs, to_fixture):
  """The fixture user of row r (its target and history identify it)."""
  hist = to_fixture[split.history[r][split.history[r] >= 0]].tolist()
  target = int(to_fixture[split.target[r]])
  for u, s in seqs.items():
    for t in range(len(s)):
      if s[t] == target and s[max(0, t - len(hist)):t] == hist:
        return u
  raise AssertionError("row matches no user")


def test_lastfm1k_dedup_modes(tmp_path):
  first, _, _ = prepare(tmp_path, "lastfm-1k")
  cons, _, _ = prepare(tmp_path, "lastfm-1k", dedup="none")
  assert cons.info["counts"]["after_dedup"] > first.info["counts"]["after_dedup"]
  assert first.info["counts"]["after_dedup"] == len(EVENTS)


def test_pools_are_fixed_per_seed_and_reused(tmp_path):
  a, _, logs = prepare(tmp_path, "ml-1m")
  logs2 = []
  b = recsys_real.load(make_config("movielens", tmp_path / "ml-1m", tmp_path / "cache"),
                       log=logs2.append)
  assert any("reusing" in l for l in logs2) and b.info["cache_dir"] == a.info["cache_dir"]
  np.testing.assert_array_equal(a.test.pool, b.test.pool)
  write_ml1m(tmp_path / "ml-1m")  # rewritten files: prepared again, same pools
  c = recsys_real.load(make_config("movielens", tmp_path / "ml-1m", tmp_path / "cache"),
                       log=lambda s: None)
  assert c.info["cache_dir"] != a.info["cache_dir"]
  np.testing.assert_array_equal(a.test.pool, c.test.pool)
  cfg = make_config("movielens", tmp_path / "ml-1m", tmp_path / "cache")
  cfg.seed = 1
  d = recsys_real.load(cfg, log=lambda s: None)
  assert d.info["cache_dir"] != a.info["cache_dir"]
  assert not np.array_equal(np.sort(a.test.pool, 1), np.sort(d.test.pool, 1))
  pop = recsys_real.load(make_config("movielens", tmp_path / "ml-1m", tmp_path / "cache",
                                     negatives="popularity"), log=lambda s: None)
  np.testing.assert_array_equal(pop.test.target, a.test.target)


def _kcore_reference(events, k):
  """Plain-Python k-core: drop users and items with < k interactions until none is left."""
  kept = list(events)
  while True:
    users, items = {}, {}
    for u, i, _, _ in kept:
      users[u] = users.get(u, 0) + 1
      items[i] = items.get(i, 0) + 1
    nxt = [e for e in kept if users[e[0]] >= k and items[e[1]] >= k]
    if len(nxt) == len(kept):
      return kept
    kept = nxt


def test_kcore_and_min_rating_filter(tmp_path):
  a, ids, _ = prepare(tmp_path, "ml-1m", kcore=2, min_history=1)
  counts = a.info["counts"]
  core = _kcore_reference(EVENTS, 2)
  assert 0 < counts["after_kcore"] == len(core) < counts["after_dedup"] == len(EVENTS)
  to_fixture = np.array([ids[r] for r in a.info["item_raw_ids"]])
  assert sorted(to_fixture.tolist()) == sorted({e[1] for e in core})  # catalogue = core items
  assert np.bincount(np.concatenate([a.test.pool[a.test.relevance > 0]]),
                     minlength=a.num_items).sum() == len(a.test)
  b, _, _ = prepare(tmp_path, "ml-1m", min_rating=3.0, kcore=1, min_history=1)
  assert b.info["counts"]["after_min_rating"] == sum(1 for e in EVENTS if e[2] >= 3)


# ----------------------------------------------------------------------------
# Bad input: one UserError naming the file and the line.


def _expect(tmp_path, fmt, match, mutate, name=None, **data):
  name_, writer, _ = FORMATS[fmt]
  d = tmp_path / fmt
  d.mkdir(exist_ok=True)
  writer(d)
  mutate(d)
  with pytest.raises(UserError) as e:
    recsys_real.load(make_config(name or name_, d, tmp_path / "cache", **data), log=lambda s: None)
  msg = str(e.value)
  assert match in msg, msg
  assert "\n" not in msg
  assert not os.path.exists(tmp_path / "cache") or not [
      p for p in os.listdir(tmp_path / "cache") if not p.endswith(".lock")]
  return msg


def _append(path, text, newline=True):
  with open(path, "a") as f:
    f.write(text + ("\n" if newline else ""))


def _replace_line(path, lineno, text):
  lines = open(path, encoding="latin-1").read().splitlines(True)
  lines[lineno - 1] = text
  open(path, "w", encoding="latin-1").writelines(lines)


def test_missing_file(tmp_path):
  msg = _expect(tmp_path, "ml-1m", "movies.dat: file not found",
                lambda d: os.remove(d / "movies.dat"))
  assert str(tmp_path) in msg
  with pytest.raises(UserError, match="directory not found"):
    recsys_real.load(make_config("movielens", tmp_path / "nowhere", tmp_path / "c"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="no MovieLens files"):
    recsys_real.load(make_config("movielens", tmp_path / "empty", tmp_path / "c"))
  _expect(tmp_path, "amazon2023", "meta_All_Beauty.jsonl: file not found",
          lambda d: os.remove(d / "meta_All_Beauty.jsonl"))


def test_wrong_delimiter(tmp_path):
  def tabs(d):
    text = open(d / "ratings.dat").read().replace("::", "\t")
    open(d / "ratings.dat", "w").write(text)
  msg = _expect(tmp_path, "ml-1m", "ratings.dat:1: expected 4 fields", tabs)
  assert "wrong delimiter" in msg and "tab" in msg
  _expect(tmp_path, "ml-25m", "ratings.csv:1: expected the header",
          lambda d: _replace_line(d / "ratings.csv", 1, "userId;movieId;rating;timestamp\n"))


def test_truncated_line(tmp_path):
  n = len(EVENTS) + 2
  msg = _expect(tmp_path, "ml-25m", f"ratings.csv:{n}: expected 4 fields",
                lambda d: _append(d / "ratings.csv", "3,10", newline=False))
  assert "truncated" in msg
  _expect(tmp_path, "amazon2023", f"All_Beauty.jsonl:{len(EVENTS) + 1}: invalid JSON",
          lambda d: _append(d / "All_Beauty.jsonl", '{"rating": 5.0, "user_id": "U1", "pa',
                            newline=False))


def test_not_a_number_and_missing_fields(tmp_path):
  _expect(tmp_path, "ml-100k", "u.data:3: field 'timestamp' is not a number: 'yesterday'",
          lambda d: _replace_line(d / "u.data", 3, "1\t2\t3\tyesterday\n"))
  _expect(tmp_path, "amazon2018", "Beauty_5.json:2: missing field 'asin'",
          lambda d: _replace_line(d / "Beauty_5.json", 2,
                                  json.dumps({"overall": 5.0, "reviewerID": "A1X",
                                              "unixReviewTime": 5}) + "\n"))
  _expect(tmp_path, "hetrec", "artists.dat:4: expected at least 2 fields",
          lambda d: _replace_line(d / "artists.dat", 4, "52\n"))
  _expect(tmp_path, "lastfm-1k", "tsv:2: field 'timestamp' is not an ISO time",
          lambda d: _replace_line(d / "userid-timestamp-artid-artname-traid-traname.tsv", 2,
                                  "user_000001\tnot-a-time\tx\tArtist\t\tSong\n"))


def test_recbole_bad_input(tmp_path):
  _expect(tmp_path, "recbole", "ml-fix.item: file not found",
          lambda d: os.remove(d / "ml-fix.item"))

  def no_timestamp(d):
    rows = [l.split("\t")[:3] for l in open(d / "ml-fix.inter").read().splitlines()]
    open(d / "ml-fix.inter", "w").write("".join("\t".join(r) + "\n" for r in rows))
  msg = _expect(tmp_path, "recbole", "ml-fix.inter:1: no 'timestamp' column", no_timestamp)
  assert "user_id, item_id, rating" in msg
  _expect(tmp_path, "recbole", "ml-fix.inter:3: expected 4 fields (user_id, item_id, rating, "
          "timestamp) separated by a tab, found 3",
          lambda d: _replace_line(d / "ml-fix.inter", 3, "1\t2\t3\n"))
  _expect(tmp_path, "recbole", "ml-fix.inter:4: field 'timestamp' is not a number",
          lambda d: _replace_line(d / "ml-fix.inter", 4, "1\t2\t3\tnoon\n"))
  _expect(tmp_path, "recbole", "ml-fix.item:1: no title column",
          lambda d: _replace_line(d / "ml-fix.item", 1, "item_id:token\tyear:token\tx:token\n"))
  _expect(tmp_path, "recbole", "other.inter: file not found", lambda d: None, dataset="other")
  _expect(tmp_path, "recbole", "found ml-fix.inter, two.inter: set config.data.dataset",
          lambda d: write_recbole(d, "two"))


def test_recbole_dataset_named_in_a_parent_folder(tmp_path):
  d = tmp_path / "dataset_example" / "ml-fix"
  d.mkdir(parents=True)
  write_recbole(d)
  write_recbole(d, "other")  # a second dataset beside it: config.data.dataset picks one
  ds = recsys_real.load(make_config("recbole", tmp_path / "dataset_example", tmp_path / "cache",
                                    dataset="ml-fix"), log=lambda s: None)
  assert ds.info["variant"] == "ml-fix" and len(ds.test) == NUM_USERS - 1


def test_skip_bad_lines_counts_them(tmp_path):
  d = tmp_path / "ml-100k"
  d.mkdir()
  write_ml100k(d)
  _replace_line(d / "u.data", 3, "1\t2\t3\tyesterday\n")
  _append(d / "u.data", "7\t8")
  logs = []
  ds = recsys_real.load(make_config("movielens", d, tmp_path / "cache", skip_bad_lines=True),
                        log=logs.append)
  assert ds.info["counts"]["bad_lines_skipped"] == 2
  assert any("skipped 2 malformed lines" in l and "u.data:3" in l for l in logs)


def test_amazon_needs_a_category_when_ambiguous(tmp_path):
  d = tmp_path / "amz"
  d.mkdir()
  write_amazon2018(d)
  write_amazon2023(d)
  with pytest.raises(UserError, match="set config.data.category"):
    recsys_real.load(make_config("amazon", d, tmp_path / "cache"))
  ds = recsys_real.load(make_config("amazon", d, tmp_path / "cache", category="All_Beauty"),
                        log=lambda s: None)
  assert ds.info["variant"] == "amazon2023-All_Beauty"
  with pytest.raises(UserError, match="Toys_5.json: file not found"):
    recsys_real.load(make_config("amazon", d, tmp_path / "cache", category="Toys"))


def test_too_few_items_or_users(tmp_path):
  _expect(tmp_path, "ml-1m", "fewer than config.data.pool_size=50", lambda d: None,
          pool_size=50)
  _expect(tmp_path, "ml-1m", "no user is left after filtering", lambda d: None, kcore=50)


def test_bad_input_is_one_line_from_main(tmp_path):
  d = tmp_path / "ml"
  d.mkdir()
  write_ml1m(d)
  _replace_line(d / "ratings.dat", 5, "1::2::3\n")
  cmd = [sys.executable, "-m", "fgrpo_jax.main", "--config=configs/recsys.py:tiny",
         f"--workdir={tmp_path / 'w'}", "--config.data.name=movielens",
         f"--config.data.path={d}", f"--config.data.cache_dir={tmp_path / 'c'}"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and "ratings.dat:5: expected 4 fields" in lines[0], proc.stderr


# ----------------------------------------------------------------------------
# One training step on every format. Every task's batches are left-padded to one
# prompt length and the model embeds a common vocabulary, so all recommendation and
# QA datasets share one compilation of the SFT step and one of the RL step
# (tests/test_data_multihop_qa.py and tests/test_synthetic_qa.py use this helper).

VOCAB, PROMPT_LEN, POOL = 256, 176, 20


@functools.lru_cache(None)
def _static():
  c = recsys.get_config("tiny")
  c.rl.inner_steps = 1
  cfg = config_lib.model_config(c, VOCAB)
  optimizer = steps_lib.make_optimizer(c.optim, 1e-3, 4)
  return c, cfg, optimizer, steps_lib.RLSettings.from_config(c)


def _pad_batch(batch):
  p = batch["prompt"].shape[1]
  assert p <= PROMPT_LEN and batch["cand_tokens"].shape[1] == POOL
  pad = PROMPT_LEN - p
  out = dict(batch)
  out["prompt"] = jnp.pad(batch["prompt"], ((0, 0), (pad, 0)))
  out["prompt_mask"] = jnp.pad(batch["prompt_mask"], ((0, 0), (pad, 0)))
  return out


def one_training_step(task, batch=4):
  """One SFT and one RL step of a tiny model on a batch of the task's training split."""
  c, cfg, optimizer, settings = _static()
  assert task.vocab_size <= VOCAB
  layout = task.layout_fn(c.rollout.slate_size, c.rollout.rank_size)
  params = llama.init_params(cfg, jax.random.key(0))
  state = steps_lib.TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))
  n = task.splits["train"]["prompt"].shape[0]
  b = _pad_batch(arrays_lib.take_batch(task.splits["train"], np.arange(batch) % n))
  state, m1 = steps_lib.sft_step(state, b, jax.random.key(1), cfg=cfg, layout=layout,
                             optimizer=optimizer)
  state, m2 = steps_lib.rl_step(state, None, b, jax.random.key(2), cfg=cfg, layout=layout,
                            optimizer=optimizer, settings=settings)
  assert np.isfinite(float(m1["loss"])) and np.isfinite(float(m2["loss"]))
  assert int(state.step) == 2
  return m1, m2


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_one_training_step_on_each_format(tmp_path, fmt):
  name, writer, _ = FORMATS[fmt]
  d = tmp_path / fmt
  d.mkdir()
  writer(d)
  task = tasks.load_task(make_config(name, d, tmp_path / "cache"), log=lambda s: None)
  assert task.name == "recsys" and task.dataset == name
  assert set(task.reference_fns) == {"random", "popularity"} and not task.has_oracle
  one_training_step(task)


class _Interrupt(Exception):
  pass


def test_grain_loader_streams_shards_and_resumes_exactly(tmp_path):
  """config.data.loader=grain: batches stream from the array_record cache; a run stopped
  after its first checkpoint and restarted ends with the same parameters."""
  d = tmp_path / "ml-1m"
  d.mkdir()
  write_ml1m(d)

  def config():
    c = make_config("movielens", d, tmp_path / "cache")
    c.data.loader = "grain"
    c.sft.update(steps=4, batch_size=8)
    c.rl.steps = 0
    c.log_every, c.ckpt_every = 1, 2
    c.eval.update(test_examples=8, batch_size=8)
    return c

  def stop_at_step_3(line):
    if "step 3/4" in line:
      raise _Interrupt

  full = train.run(config(), str(tmp_path / "full"), log=lambda s: None)
  with pytest.raises(_Interrupt):
    train.run(config(), str(tmp_path / "cut"), log=stop_at_step_3)
  assert os.path.exists(tmp_path / "cut" / "ckpt" / "sft_data" / "2.0.json")
  resumed_log = []
  resumed = train.run(config(), str(tmp_path / "cut"), log=resumed_log.append)
  assert any("resumed from step 2" in l for l in resumed_log)
  assert resumed["metrics"] == full["metrics"]
  like = tasks.load_task(config(), log=lambda s: None)
  cfg = config_lib.model_config(config(), like.vocab_size)
  init = llama.init_params(cfg, jax.random.key(0))
  a = train.load_stage_params(str(tmp_path / "full"), "sft", init)
  b = train.load_stage_params(str(tmp_path / "cut"), "sft", init)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  c = config()
  c.data.name = "synthetic_recsys"
  with pytest.raises(config_lib.ConfigError, match="config.data.loader=grain"):
    train.run(c, str(tmp_path / "synthetic"), log=lambda s: None)
