"""Real sequential-recommendation datasets, read as published, prepared once.

`config.data.name` / `config.data.path` (the unpacked download folder, or its
parent when it holds exactly one such folder):

  movielens  ml-100k (u.data, u.item) | ml-1m (ratings.dat, movies.dat) |
             ml-20m, ml-25m, ml-latest(-small) (ratings.csv, movies.csv)
  lastfm     hetrec2011-lastfm-2k (user_taggedartists-timestamps.dat, artists.dat) |
             lastfm-dataset-1K (userid-timestamp-artid-artname-traid-traname.tsv)
  amazon     2018 5-core reviews <Category>_5.json + meta_<Category>.json |
             2023 reviews <Category>.jsonl + meta_<Category>.jsonl (either .gz or not)
  recbole    RecBole atomic files <dataset>.inter + <dataset>.item (tab-separated,
             typed headers "user_id:token item_id:token timestamp:float"; the
             dataset is `config.data.dataset`, or the only *.inter in the folder)

Preparation (each step's counts are logged and stored in the manifest):

1. read every interaction (user, item, time, rating); a malformed line (wrong
   delimiter, missing field, truncated, not a number) stops with
   "<file>:<line>: what is wrong", or is skipped and counted with
   `config.data.skip_bad_lines=True`;
2. `min_rating`: drop interactions rated below it (0 = keep all, implicit feedback);
3. `dedup`: "first" keeps a user's first interaction with each item (repeated
   listens / tags), "consecutive" drops immediate repeats, "none" keeps all;
4. `kcore`: repeatedly drop users and items with fewer than k interactions;
5. `min_history`: drop users with fewer than min_history + 2 interactions (they
   cannot give a validation and a test example with min_history items of history);
6. chronological sequences (ties keep file order), items renumbered 0..n-1;
   leave-one-out: the last item is the test target, the one before the validation
   target, every earlier position t >= min_history a training target (the most
   recent `max_train_per_user` of them if > 0); histories are the last H =
   `history_len` items before the target, left-padded with -1;
7. pools: the target plus C-1 distinct negatives the user never interacted with,
   drawn uniformly or proportionally to add-one-smoothed training popularity
   (`negatives`), shuffled; drawn once per `config.seed` and stored with the
   prepared data, so every run with that seed evaluates on the same pools.

Item names: MovieLens titles, LastFM artist names, Amazon metadata titles, the title
column of a RecBole .item file (metadata entries of items that are not in the reviews
are skipped and counted; items without a title are named by their raw id, also counted).
"""

from __future__ import annotations

import array
import csv
import datetime
import glob
import math
import os
from typing import Callable

import numpy as np

from fgrpo_jax.data import cache as cache_lib
from fgrpo_jax.data import pipeline
from fgrpo_jax.data import textio
from fgrpo_jax.data.arrays import SPLITS
from fgrpo_jax.data.recsys import RecsysDataset, RecsysExamples
from fgrpo_jax.errors import UserError

DATASETS = ("movielens", "lastfm", "amazon", "recbole")
DEDUP = ("first", "consecutive", "none")
PREP_VERSION = 1  # bump when preparation changes: part of the cache key

# Defaults of the config.data fields read with .get (configs may omit them).
DEFAULTS = dict(history_len=10, pool_size=20, negatives="uniform", kcore=5, min_rating=0.0,
                dedup="first", min_history=2, max_train_per_user=0, category="",
                dataset="", skip_bad_lines=False)


def settings_from_config(config) -> dict:
  d = config.data
  s = {k: d.get(k, v) for k, v in DEFAULTS.items()}
  s["name"] = d.name
  s["seed"] = int(config.seed)
  if s["negatives"] not in ("uniform", "popularity"):
    raise UserError(f"config.data.negatives={s['negatives']!r} is unknown (uniform or popularity)")
  if s["dedup"] not in DEDUP:
    raise UserError(f"config.data.dedup={s['dedup']!r} is unknown "
                    f"(choose one of {', '.join(DEDUP)})")
  for field in ("history_len", "min_history", "kcore"):
    if int(s[field]) < (1 if field != "kcore" else 0):
      raise UserError(f"config.data.{field}={s[field]} is too small")
  if int(s["pool_size"]) < 2:
    raise UserError(f"config.data.pool_size={s['pool_size']} must be at least 2")
  return s


# ----------------------------------------------------------------------------
# Reading files.


def _lines(path: str, encoding: str = "utf-8"):
  """(line number, line without newline, had_newline) of every non-empty line."""
  try:
    with textio.open_text(path, encoding) as f:
      for lineno, line in enumerate(f, 1):
        had_newline = line.endswith("\n")
        line = line.rstrip("\r\n")
        if line.strip():
          yield lineno, line, had_newline
  except (OSError, EOFError) as e:  # e.g. a truncated .gz
    raise UserError(f"{path}: cannot read ({e})") from None


_DELIMS = {"\t": "a tab", ",": "a comma", "::": "'::'", "|": "'|'", ";": "';'"}


def _split(line, sep, names, path, lineno, had_newline, problems, exact=True):
  parts = line.split(sep)
  if len(parts) == len(names) or (not exact and len(parts) > len(names)):
    return parts
  found = [d for d in _DELIMS if d != sep and d in line and (sep not in d)]
  hint = ""
  if len(parts) < len(names) and not had_newline:
    hint = " (the file's last line has no newline: truncated download?)"
  elif len(parts) == 1 and found:
    hint = f" (wrong delimiter? the line contains {_DELIMS[found[0]]})"
  problems(path, lineno, f"expected {len(names)} fields ({', '.join(names)}) separated by "
                         f"{_DELIMS.get(sep, repr(sep))}, found {len(parts)}{hint}")
  return None


def _number(value, kind, field, path, lineno, problems):
  try:
    return int(value) if kind is int else float(value)
  except ValueError:
    problems(path, lineno, f"field {field!r} is not {'an integer' if kind is int else 'a number'}:"
                           f" {value[:40]!r}")
    return None


class _Events:
  """Interactions accumulated while reading (raw ids -> dense codes)."""

  def __init__(self):
    self.users: dict[str, int] = {}
    self.items: dict[str, int] = {}
    self.u = array.array("q")
    self.i = array.array("q")
    self.t = array.array("d")
    self.r = array.array("f")

  def add(self, user: str, item: str, ts: float, rating: float = math.nan) -> None:
    self.u.append(self.users.setdefault(user, len(self.users)))
    self.i.append(self.items.setdefault(item, len(self.items)))
    self.t.append(ts)
    self.r.append(rating)

  def __len__(self):
    return len(self.u)


def _read_delimited_events(path, sep, names, get, problems, *, header=None, encoding="utf-8",
                           events=None):
  """Reads user/item/time/rating rows. get(parts, path, lineno) -> (u, i, t, r) or None."""
  events = events if events is not None else _Events()
  first = True
  for lineno, line, nl in _lines(path, encoding):
    if first and header is not None:
      first = False
      cols = [c.strip().strip('"') for c in line.split(sep)]
      if [c.lower() for c in cols[:len(header)]] != [h.lower() for h in header]:
        hint = ""
        if len(cols) == 1 and any(d in line for d in _DELIMS if d != sep):
          hint = " (wrong delimiter?)"
        raise UserError(f"{path}:{lineno}: expected the header {sep.join(header)!r}, found "
                        f"{line[:80]!r}{hint}")
      continue
    first = False
    parts = _split(line, sep, names, path, lineno, nl, problems)
    if parts is None:
      continue
    row = get(parts, path, lineno)
    if row is not None:
      events.add(*row)
  return events


def _numeric_row(user_i, item_i, time_i, rating_i, problems, time_scale=1.0, id_names=None):
  """id_names: (user field, item field) of a format whose ids are integers: anything
  else is a malformed line, not a new user or item."""
  def get(parts, path, lineno):
    ts = _number(parts[time_i], float, "timestamp", path, lineno, problems)
    if ts is None:
      return None
    r = math.nan
    if rating_i is not None:
      r = _number(parts[rating_i], float, "rating", path, lineno, problems)
      if r is None:
        return None
    u, i = parts[user_i].strip(), parts[item_i].strip()
    if not u or not i:
      problems(path, lineno, "empty user or item id")
      return None
    if id_names:
      ids = []
      for value, field in zip((u, i), id_names):
        ids.append(_number(value, int, field, path, lineno, problems))
        if ids[-1] is None:
          return None
      u, i = (str(x) for x in ids)
    return u, i, ts * time_scale, r
  return get


def _read_names(path, sep, id_i, name_i, min_fields, *, header=False, encoding="utf-8",
                quoted=False):
  """{raw item id: name} from a metadata table (rows with too few fields are errors)."""
  names = {}
  if quoted:
    with textio.open_text(path, encoding, newline="") as f:
      reader = csv.reader(f)
      for row in reader:
        lineno = reader.line_num
        if lineno == 1 and header:
          continue
        if not row:
          continue
        if len(row) < min_fields:
          raise UserError(f"{path}:{lineno}: expected at least {min_fields} comma-separated "
                          f"fields, found {len(row)}")
        names[row[id_i].strip()] = row[name_i].strip()
    return names
  for lineno, line, nl in _lines(path, encoding):
    if lineno == 1 and header:
      continue
    parts = line.split(sep)
    if len(parts) < min_fields:
      hint = " (truncated line?)" if not nl else ""
      raise UserError(f"{path}:{lineno}: expected at least {min_fields} fields separated by "
                      f"{_DELIMS.get(sep, repr(sep))}, found {len(parts)}{hint}")
    names[parts[id_i].strip()] = parts[name_i].strip()
  return names


def _find_dir(path: str, marker_sets: list[list[str]]) -> str:
  """config.data.path, or its only subdirectory holding one of the marker sets."""
  if not path:
    raise UserError("config.data.path is empty: set it to the unpacked dataset folder")
  path = os.path.expanduser(path)
  if not os.path.isdir(path):
    raise UserError(f"config.data.path={path}: directory not found")

  def has(d):
    return any(any(os.path.isfile(os.path.join(d, m)) for m in ms) for ms in marker_sets)

  if has(path):
    return path
  subs = [os.path.join(path, s) for s in sorted(os.listdir(path))
          if os.path.isdir(os.path.join(path, s)) and has(os.path.join(path, s))]
  if len(subs) == 1:
    return subs[0]
  return path


def _require(d: str, *files: str) -> list[str]:
  paths = [os.path.join(d, f) for f in files]
  for p in paths:
    if not os.path.isfile(p):
      raise UserError(f"{p}: file not found")
  return paths


# MovieLens layouts: (variant, ratings file, its separator, its field names, items file,
# its separator, encoding, CSV with a header and quoted titles).
MOVIELENS = (
    ("ml-100k", "u.data", "\t", ("user id", "item id", "rating", "timestamp"), "u.item", "|",
     "latin-1", False),
    ("ml-1m", "ratings.dat", "::", ("UserID", "MovieID", "Rating", "Timestamp"), "movies.dat",
     "::", "latin-1", False),
    ("ml-csv", "ratings.csv", ",", ("userId", "movieId", "rating", "timestamp"), "movies.csv",
     ",", "utf-8", True),
)


def read_movielens(path: str, problems: textio.BadLines):
  """-> (variant, events, names, source files)."""
  d = _find_dir(path, [[layout[1]] for layout in MOVIELENS])
  for variant, r_file, sep, fields, i_file, i_sep, encoding, is_csv in MOVIELENS:
    if not os.path.isfile(os.path.join(d, r_file)):
      continue
    ratings, items = _require(d, r_file, i_file)
    get = _numeric_row(0, 1, 3, 2, problems, id_names=fields[:2])
    ev = _read_delimited_events(ratings, sep, fields, get, problems,
                                header=fields if is_csv else None)
    names = _read_names(items, i_sep, 0, 1, 2, header=is_csv, quoted=is_csv, encoding=encoding)
    if is_csv:  # ml-20m, ml-25m, ml-latest(-small): named by their folder
      folder = os.path.basename(os.path.normpath(d))
      variant = folder if folder.startswith("ml-") else variant
    return variant, ev, names, [ratings, items]
  raise UserError(f"config.data.path={path}: no MovieLens files (expected u.data + u.item "
                  "(ml-100k), ratings.dat + movies.dat (ml-1m) or ratings.csv + movies.csv "
                  "(ml-20m, ml-25m, ml-latest))")


HETREC_EVENTS = "user_taggedartists-timestamps.dat"
LFM1K_EVENTS = "userid-timestamp-artid-artname-traid-traname.tsv"


def _iso_seconds(value: str) -> float:
  return datetime.datetime.fromisoformat(value.strip().replace("Z", "+00:00")).timestamp()


def read_lastfm(path: str, problems: textio.BadLines):
  d = _find_dir(path, [[HETREC_EVENTS], [LFM1K_EVENTS]])
  if os.path.isfile(os.path.join(d, HETREC_EVENTS)):
    events_path, artists = _require(d, HETREC_EVENTS, "artists.dat")
    names4 = ("userID", "artistID", "tagID", "timestamp")
    get = _numeric_row(0, 1, 3, None, problems, id_names=names4[:2])
    ev = _read_delimited_events(events_path, "\t", names4, get, problems, header=names4)
    names = _read_names(artists, "\t", 0, 1, 2, header=True)
    return "hetrec2011-lastfm-2k", ev, names, [events_path, artists]
  if os.path.isfile(os.path.join(d, LFM1K_EVENTS)):
    (events_path,) = _require(d, LFM1K_EVENTS)
    names6 = ("userid", "timestamp", "artid", "artname", "traid", "traname")
    names: dict[str, str] = {}

    def get(parts, p, lineno):
      user, stamp, artid, artname = (x.strip() for x in parts[:4])
      try:
        ts = _iso_seconds(stamp)
      except ValueError:
        problems(p, lineno, f"field 'timestamp' is not an ISO time: {stamp[:40]!r}")
        return None
      if not user or not (artid or artname):
        problems(p, lineno, "empty user or artist")
        return None
      item = artid or f"name:{artname}"
      names.setdefault(item, artname or artid)
      return user, item, ts, math.nan

    ev = _read_delimited_events(events_path, "\t", names6, get, problems)
    return "lastfm-1k", ev, names, [events_path]
  raise UserError(f"config.data.path={path}: no LastFM files (expected {HETREC_EVENTS} + "
                  f"artists.dat (hetrec2011-lastfm-2k) or {LFM1K_EVENTS} (lastfm-dataset-1K))")


def _json_lines(path: str, problems: textio.BadLines):
  for lineno, line, nl in _lines(path):
    try:
      obj = textio.loads_line(line, nl)
    except ValueError as e:
      problems(path, lineno, str(e))
      continue
    if not isinstance(obj, dict):
      problems(path, lineno, "expected a JSON object")
      continue
    yield lineno, obj


def _amazon_files(d: str, category: str):
  def find(pattern):
    return sorted(p for p in glob.glob(os.path.join(d, pattern))
                  if not os.path.basename(p).startswith("meta_"))

  if category:
    cands = [(2018, p) for p in find(f"{category}_5.json") + find(f"{category}_5.json.gz")]
    cands += [(2023, p) for p in find(f"{category}.jsonl") + find(f"{category}.jsonl.gz")]
    if not cands:
      raise UserError(f"{os.path.join(d, category + '_5.json')}: file not found (nor "
                      f"{category}.jsonl: Amazon 2018 5-core or 2023 reviews of "
                      f"config.data.category={category!r})")
  else:
    cands = [(2018, p) for p in find("*_5.json") + find("*_5.json.gz")]
    cands += [(2023, p) for p in find("*.jsonl") + find("*.jsonl.gz")]
    if not cands:
      raise UserError(f"config.data.path={d}: no Amazon review file (expected <Category>_5.json "
                      "(2018 5-core) or <Category>.jsonl (2023), with meta_<Category>.json(l))")
    if len(cands) > 1:
      raise UserError(f"config.data.path={d}: several Amazon review files "
                      f"({', '.join(os.path.basename(p) for _, p in cands)}): set "
                      "config.data.category")
  version, reviews = cands[0]
  base = os.path.basename(reviews)
  cat = base.split("_5.json")[0] if version == 2018 else base.split(".jsonl")[0]
  ext = [".json", ".json.gz"] if version == 2018 else [".jsonl", ".jsonl.gz"]
  metas = [os.path.join(d, f"meta_{cat}{e}") for e in ext]
  meta = next((m for m in metas if os.path.isfile(m)), None)
  if meta is None:
    raise UserError(f"{metas[0]}: file not found (the metadata file with the item titles of "
                    f"{base})")
  return version, cat, reviews, meta


def read_amazon(path: str, problems: textio.BadLines, category: str = ""):
  d = os.path.expanduser(path or "")
  if not path:
    raise UserError("config.data.path is empty: set it to the folder of the Amazon files")
  if not os.path.isdir(d):
    raise UserError(f"config.data.path={path}: directory not found")
  version, cat, reviews, meta = _amazon_files(d, category)
  if version == 2018:
    fields = {"user": "reviewerID", "item": "asin", "time": "unixReviewTime", "rating": "overall"}
    scale, meta_id = 1.0, "asin"
  else:
    fields = {"user": "user_id", "item": "parent_asin", "time": "timestamp", "rating": "rating"}
    scale, meta_id = 1e-3, "parent_asin"
  ev = _Events()
  for lineno, obj in _json_lines(reviews, problems):
    missing = [f for f in fields.values() if f not in obj]
    if missing:
      problems(reviews, lineno, f"missing field {missing[0]!r}")
      continue
    ts = _number(str(obj[fields["time"]]), float, fields["time"], reviews, lineno, problems)
    r = _number(str(obj[fields["rating"]]), float, fields["rating"], reviews, lineno, problems)
    if ts is None or r is None:
      continue
    ev.add(str(obj[fields["user"]]), str(obj[fields["item"]]), ts * scale, r)
  names = {}
  for lineno, obj in _json_lines(meta, problems):
    if meta_id not in obj:
      problems(meta, lineno, f"missing field {meta_id!r}")
      continue
    title = obj.get("title")
    if isinstance(title, str) and title.strip():
      names[str(obj[meta_id])] = " ".join(title.split())
  return f"amazon{version}-{cat}", ev, names, [reviews, meta]


# RecBole atomic files: one tab-separated table per kind, its header naming each column
# with its type ("user_id:token", "rating:float", "movie_title:token_seq"). RecBole's own
# default field names are used; the title is the first of these .item columns present.
RECBOLE_FIELDS = {"user": "user_id", "item": "item_id", "time": "timestamp", "rating": "rating"}
RECBOLE_TITLES = ("movie_title", "title", "name", "artist_name", "track_name", "item_name")
RECBOLE_ENCODING = "utf-8-sig"  # a byte-order mark (Windows editors) is not part of a name


def _recbole_files(path: str, dataset: str) -> tuple[str, str, str]:
  """(dataset, its .inter file, its .item file), found without parsing them."""
  if dataset:
    d = _find_dir(path, [[f"{dataset}.inter"]])
    inter = os.path.join(d, f"{dataset}.inter")
    if not os.path.isfile(inter):
      raise UserError(f"{inter}: file not found (the RecBole interactions of "
                      f"config.data.dataset={dataset!r})")
  else:
    d = _find_dir(path, [])
    found = sorted(glob.glob(os.path.join(d, "*.inter")))
    if not found:
      subs = sorted(glob.glob(os.path.join(d, "*", "*.inter")))
      found = subs if len({os.path.dirname(p) for p in subs}) == 1 else found
    if len(found) != 1:
      listed = ", ".join(os.path.basename(p) for p in found) or "none"
      raise UserError(f"config.data.path={path}: expected one RecBole <dataset>.inter file, "
                      f"found {listed}: set config.data.dataset")
    inter = found[0]
    dataset = os.path.basename(inter)[:-len(".inter")]
  item = inter[:-len(".inter")] + ".item"
  if not os.path.isfile(item):
    raise UserError(f"{item}: file not found (the RecBole item file with the titles of "
                    f"{os.path.basename(inter)})")
  return dataset, inter, item


def _atomic_header(path: str) -> tuple[list[str], list[str]]:
  """(column names, typed columns) of an atomic file's header ("user_id:token")."""
  for lineno, line, _ in _lines(path, RECBOLE_ENCODING):
    typed = line.split("\t")
    if any(":" not in c for c in typed):
      raise UserError(f"{path}:{lineno}: expected a RecBole header of tab-separated "
                      f"name:type columns (e.g. user_id:token), found {line[:80]!r}")
    return [c.split(":", 1)[0].strip() for c in typed], typed
  raise UserError(f"{path}: empty file (expected a RecBole header line)")


def _column(cols: list[str], name: str, path: str, why: str) -> int:
  if name not in cols:
    raise UserError(f"{path}:1: no {name!r} column ({why}); the header has "
                    f"{', '.join(cols)}")
  return cols.index(name)


def read_recbole(path: str, problems: textio.BadLines, dataset: str = ""):
  """-> (dataset, events, names, source files) of RecBole atomic files."""
  dataset, inter, item = _recbole_files(path, dataset)
  cols, typed = _atomic_header(inter)
  f = RECBOLE_FIELDS
  user_i = _column(cols, f["user"], inter, "the user of each interaction")
  item_i = _column(cols, f["item"], inter, "the item of each interaction")
  time_i = _column(cols, f["time"], inter, "the leave-one-out split orders each user's "
                                          "interactions by time")
  rating_i = cols.index(f["rating"]) if f["rating"] in cols else None
  ev = _read_delimited_events(inter, "\t", cols,
                              _numeric_row(user_i, item_i, time_i, rating_i, problems),
                              problems, header=typed, encoding=RECBOLE_ENCODING)
  item_cols, _ = _atomic_header(item)
  id_i = _column(item_cols, f["item"], item, "the item id")
  titles = [c for c in RECBOLE_TITLES if c in item_cols]
  if not titles:
    raise UserError(f"{item}:1: no title column (one of {', '.join(RECBOLE_TITLES)}); the "
                    f"header has {', '.join(item_cols)}")
  name_i = item_cols.index(titles[0])
  names = _read_names(item, "\t", id_i, name_i, max(id_i, name_i) + 1, header=True,
                      encoding=RECBOLE_ENCODING)
  return dataset, ev, names, [inter, item]


# ----------------------------------------------------------------------------
# Filtering, splitting, pools.


def _kcore(u, i, k, log_counts):
  keep = np.ones(len(u), bool)
  rounds = 0
  while k > 1:
    uc = np.bincount(u[keep], minlength=u.max() + 1 if len(u) else 0)
    ic = np.bincount(i[keep], minlength=i.max() + 1 if len(i) else 0)
    bad = keep & ((uc[u] < k) | (ic[i] < k))
    if not bad.any():
      break
    keep &= ~bad
    rounds += 1
  log_counts["kcore_rounds"] = rounds
  return keep


def _sample_negatives(targets, users, user_item_keys, num_items, c, cdf, rng,
                      rounds: int = 64):
  """int32 [N, c-1] distinct negatives per row, none equal to the target and, where
  the catalogue allows, none the user interacted with (sorted keys u*num_items+i)."""
  n = len(targets)
  k = c - 1
  out = np.full((n, k), -1, np.int64)
  count = np.zeros(n, np.int64)
  for strict in (True, False):
    for _ in range(rounds):
      rows = np.nonzero(count < k)[0]
      if not rows.size:
        break
      m = 2 * k + 4
      if cdf is None:
        draws = rng.integers(0, num_items, size=(rows.size, m))
      else:
        draws = np.searchsorted(cdf, rng.random((rows.size, m)), side="right")
        draws = np.minimum(draws, num_items - 1)
      bad = draws == targets[rows, None]
      if strict:
        q = users[rows, None].astype(np.int64) * num_items + draws
        pos = np.minimum(np.searchsorted(user_item_keys, q), len(user_item_keys) - 1)
        bad |= user_item_keys[pos] == q
      draws = np.where(bad, -1, draws)
      cand = np.concatenate([out[rows], draws], axis=1)       # kept ones first
      order = np.argsort(cand, axis=1, kind="stable")
      sc = np.take_along_axis(cand, order, 1)
      dup_sorted = np.zeros_like(sc, bool)
      dup_sorted[:, 1:] = sc[:, 1:] == sc[:, :-1]
      dup = np.zeros_like(dup_sorted)
      np.put_along_axis(dup, order, dup_sorted, 1)
      valid = (cand >= 0) & ~dup
      rank = np.cumsum(valid, axis=1) - 1
      take = valid & (rank < k)
      new = np.full((rows.size, k), -1, np.int64)
      r_idx, c_idx = np.nonzero(take)
      new[r_idx, rank[r_idx, c_idx]] = cand[r_idx, c_idx]
      out[rows] = new
      count[rows] = take.sum(axis=1)
    if (count >= k).all():
      break
  if (count < k).any():
    raise UserError(f"cannot draw {k} distinct negatives for some examples: the catalogue "
                    f"has {num_items} items (lower config.data.pool_size)")
  return out.astype(np.int32)


def build_splits(u, i, t, settings, log_counts, log) -> dict:
  """Filtered events -> leave-one-out splits with pools (see the module docstring)."""
  H, C = int(settings["history_len"]), int(settings["pool_size"])
  min_hist = int(settings["min_history"])
  max_train = int(settings["max_train_per_user"])
  # Chronological order per user; ties keep file order (stable sort on line index).
  order = np.lexsort((np.arange(len(u)), t, u))
  u, i = u[order], i[order]
  users, starts, lengths = np.unique(u, return_index=True, return_counts=True)
  items, item_new = np.unique(i, return_inverse=True)
  seq = item_new.astype(np.int64)
  num_items = len(items)
  if num_items < C:
    raise UserError(f"after filtering only {num_items} items remain, fewer than "
                    f"config.data.pool_size={C} (lower config.data.kcore or the pool size)")
  user_new = np.repeat(np.arange(len(users)), lengths)
  # Targets: global positions into seq.
  ends = starts + lengths
  test_g, val_g = ends - 1, ends - 2
  n_tr = np.maximum(lengths - 2 - min_hist, 0)
  if max_train > 0:
    n_tr = np.minimum(n_tr, max_train)
  tr_user = np.repeat(np.arange(len(users)), n_tr)
  # Most recent n_tr training positions before the validation target.
  offs = np.arange(n_tr.sum()) - np.repeat(np.cumsum(n_tr) - n_tr, n_tr)
  tr_g = np.repeat(val_g - n_tr, n_tr) + offs
  # Popularity over the training part (everything before validation targets).
  pos_in_user = np.arange(len(seq)) - np.repeat(starts, lengths)
  train_part = pos_in_user < np.repeat(lengths - 2, lengths)
  popularity = np.bincount(seq[train_part], minlength=num_items).astype(np.float32)
  cdf = None
  if settings["negatives"] == "popularity":
    w = popularity.astype(np.float64) + 1.0
    cdf = np.cumsum(w) / w.sum()
  keys = np.unique(user_new.astype(np.int64) * num_items + seq)
  ss = np.random.SeedSequence([int(settings["seed"]), 20240601])
  rngs = dict(zip(SPLITS, (np.random.default_rng(s) for s in ss.spawn(3))))
  out = {}
  specs = {"train": (tr_user, tr_g), "validation": (np.arange(len(users)), val_g),
           "test": (np.arange(len(users)), test_g)}
  user_start = starts
  for split, (uu, g) in specs.items():
    idx = g[:, None] - H + np.arange(H)[None]
    valid = idx >= user_start[uu][:, None]
    hist = np.where(valid, seq[np.clip(idx, 0, None)], -1).astype(np.int32)
    target = seq[g].astype(np.int64)
    rng = rngs[split]
    chunk = 100_000  # bounded memory on the large datasets
    negs = np.concatenate([
        _sample_negatives(target[s:s + chunk], uu[s:s + chunk], keys, num_items, C, cdf, rng)
        for s in range(0, len(target), chunk)]) if len(target) else np.zeros((0, C - 1), np.int32)
    pool = np.concatenate([target[:, None].astype(np.int32), negs], axis=1)
    perm = np.argsort(rng.random(pool.shape), axis=1)
    pool = np.take_along_axis(pool, perm, 1)
    rel = (perm == 0).astype(np.float32)
    out[split] = {"history": hist, "pool": pool, "relevance": rel,
                  "user": uu.astype(np.int32)}
  log_counts.update(users=int(len(users)), items=int(num_items), interactions=int(len(seq)),
                    **{f"{s}_examples": int(len(v["pool"])) for s, v in out.items()})
  return {"splits": out, "items": items, "users": users, "popularity": popularity}


# config.data.name -> (reader(path, problems[, option]), the settings field of its option)
READERS: dict[str, tuple[Callable, str | None]] = {
    "movielens": (read_movielens, None), "lastfm": (read_lastfm, None),
    "amazon": (read_amazon, "category"), "recbole": (read_recbole, "dataset")}


def read_events(settings: dict, problems: textio.BadLines):
  """(variant, events, names, source files) of the dataset config.data.name names."""
  reader, option = READERS[settings["name"]]
  return reader(settings["path"], problems, *([settings[option]] if option else []))


def _source_files(settings) -> list[str]:
  """The files a dataset reads (for the cache key), found without parsing them."""
  name, path = settings["name"], settings["path"]
  if name == "movielens":
    d = _find_dir(path, [["u.data"], ["ratings.dat"], ["ratings.csv"]])
    for files in (("u.data", "u.item"), ("ratings.dat", "movies.dat"),
                  ("ratings.csv", "movies.csv")):
      if os.path.isfile(os.path.join(d, files[0])):
        return _require(d, *files)
    read_movielens(path, textio.BadLines(False))  # raises the "no MovieLens files" error
  if name == "lastfm":
    d = _find_dir(path, [[HETREC_EVENTS], [LFM1K_EVENTS]])
    if os.path.isfile(os.path.join(d, HETREC_EVENTS)):
      return _require(d, HETREC_EVENTS, "artists.dat")
    if os.path.isfile(os.path.join(d, LFM1K_EVENTS)):
      return _require(d, LFM1K_EVENTS)
    read_lastfm(path, textio.BadLines(False))
  if name == "amazon":
    d = os.path.expanduser(path or "")
    if not path:
      raise UserError("config.data.path is empty: set it to the folder of the Amazon files")
    if not os.path.isdir(d):
      raise UserError(f"config.data.path={path}: directory not found")
    _, _, reviews, meta = _amazon_files(d, settings["category"])
    return [reviews, meta]
  if name == "recbole":
    return list(_recbole_files(path, settings["dataset"])[1:])
  raise UserError(f"config.data.name={name!r} is not a recommendation dataset")


def _prepare(settings: dict, writer: cache_lib.CacheWriter, log) -> None:
  name = settings["name"]
  problems = textio.BadLines(bool(settings["skip_bad_lines"]))
  variant, ev, names, _ = read_events(settings, problems)
  counts: dict = {"variant": variant}
  steps = []

  def step(label, u):
    steps.append(f"{label}: {len(u)} interactions, {len(np.unique(u))} users")

  counts["read_interactions"] = len(ev)
  counts["bad_lines_skipped"] = problems.count
  if problems.count:
    log(f"[data] {name}: skipped {problems.count} malformed lines (first: {problems.first})")
  if len(ev) == 0:
    raise UserError(f"config.data.path={settings['path']}: no interactions in the {variant} files")
  u = np.frombuffer(ev.u, np.int64)
  i = np.frombuffer(ev.i, np.int64)
  t = np.frombuffer(ev.t, np.float64)
  r = np.frombuffer(ev.r, np.float32)
  step("read", u)
  line = np.arange(len(u))
  min_rating = float(settings["min_rating"] or 0.0)
  if min_rating > 0:
    keep = ~np.isnan(r) & (r >= min_rating) | np.isnan(r)
    u, i, t, line = u[keep], i[keep], t[keep], line[keep]
  counts["after_min_rating"] = int(len(u))
  step(f"rating >= {min_rating:g}", u)
  order = np.lexsort((line, t, u))
  u, i, t, line = u[order], i[order], t[order], line[order]
  if settings["dedup"] == "first":
    _, first = np.unique(u * (i.max() + 1) + i, return_index=True)
    keep = np.zeros(len(u), bool)
    keep[first] = True
  elif settings["dedup"] == "consecutive":
    keep = np.ones(len(u), bool)
    keep[1:] = ~((u[1:] == u[:-1]) & (i[1:] == i[:-1]))
  else:
    keep = np.ones(len(u), bool)
  u, i, t = u[keep], i[keep], t[keep]
  counts["after_dedup"] = int(len(u))
  step(f"dedup {settings['dedup']}", u)
  keep = _kcore(u, i, int(settings["kcore"]), counts)
  u, i, t = u[keep], i[keep], t[keep]
  counts["after_kcore"] = int(len(u))
  step(f"{settings['kcore']}-core ({counts['kcore_rounds']} rounds)", u)
  need = int(settings["min_history"]) + 2
  ucount = np.bincount(u, minlength=(u.max() + 1) if len(u) else 0)
  keep = ucount[u] >= need
  short = int(np.sum(ucount > 0) - np.sum(ucount >= need))
  u, i, t = u[keep], i[keep], t[keep]
  counts["users_too_short"] = short
  counts["after_min_history"] = int(len(u))
  step(f"users with >= {need} interactions (dropped {short} shorter)", u)
  if len(u) == 0:
    raise UserError(f"config.data.path={settings['path']}: no user is left after filtering "
                    f"(config.data.kcore={settings['kcore']}, "
                    f"config.data.min_history={settings['min_history']}); lower them")
  built = build_splits(u, i, t, settings, counts, log)
  for line_text in steps:
    log(f"[data] {name} ({variant}) {line_text}")
  # Item metadata: raw ids of the catalogue, names (fallback: raw id).
  inv_items = np.empty(len(ev.items), object)
  for raw, code in ev.items.items():
    inv_items[code] = raw
  raw_ids = [str(x) for x in inv_items[built["items"]]]
  catalogue = set(raw_ids)
  unknown_meta = sum(1 for k in names if k not in ev.items)
  not_in_catalogue = sum(1 for k in names if k in ev.items and k not in catalogue)
  item_names = [names.get(x) or x for x in raw_ids]
  counts["items_without_name"] = sum(1 for x in raw_ids if not names.get(x))
  counts["metadata_unknown_items_skipped"] = unknown_meta
  counts["metadata_filtered_items"] = not_in_catalogue
  log(f"[data] {name} ({variant}) catalogue {len(raw_ids)} items: {counts['items_without_name']} "
      f"without a name (named by id), {unknown_meta} metadata entries for unknown items skipped")
  log(f"[data] {name} ({variant}) splits: train {counts['train_examples']}, validation "
      f"{counts['validation_examples']}, test {counts['test_examples']} examples, "
      f"{counts['users']} users")
  for split, arrays in built["splits"].items():
    writer.write_split(split, arrays)
  writer.write_json("items.json", {"raw_ids": raw_ids, "names": item_names,
                                   "popularity": built["popularity"].tolist()})
  writer.counts.update(counts)


def prepare(config, workdir: str | None = None, log=print) -> cache_lib.Prepared:
  settings = settings_from_config(config)
  settings["path"] = os.path.abspath(os.path.expanduser(config.data.get("path", "") or "")) \
      if config.data.get("path", "") else ""
  sources = _source_files(settings)
  key_settings = {k: v for k, v in settings.items() if k != "path"}
  key_settings["prep_version"] = PREP_VERSION
  return cache_lib.prepare(cache_lib.cache_root(config, workdir), settings["name"],
                           key_settings, sources, lambda w: _prepare(settings, w, log), log)


def load(config, workdir: str | None = None, log=print) -> RecsysDataset:
  """Prepares (or reuses) the dataset named by config.data.name -> RecsysDataset."""
  prepared = prepare(config, workdir, log)
  splits = {}
  for s in SPLITS:
    a = pipeline.load_split_arrays(prepared.dir, s, prepared.manifest)
    splits[s] = RecsysExamples(history=a["history"], pool=a["pool"], relevance=a["relevance"],
                               oracle_scores=None, user=a["user"])
  items = prepared.read_json("items.json")
  counts = prepared.manifest.get("counts", {})
  return RecsysDataset(train=splits["train"], validation=splits["validation"],
                       test=splits["test"], num_items=len(items["raw_ids"]),
                       item_popularity=np.asarray(items["popularity"], np.float32),
                       item_names=items["names"],
                       info={"variant": counts.get("variant"), "cache_dir": prepared.dir,
                             "counts": counts, "item_raw_ids": items["raw_ids"]})
