"""Multi-hop QA as passage-pool ranking: HotpotQA, MuSiQue, 2WikiMultihopQA.

`config.data.name` / `config.data.path` (the folder with the files as downloaded):

  hotpotqa  hotpot_train_v1.1.json + hotpot_dev_distractor_v1.json (a JSON array;
            each example has `question`, `context` = [[title, [sentence, ...]], ...]
            and `supporting_facts` = [[title, sentence index], ...])
  2wiki     train.json + dev.json (2WikiMultihopQA, the same fields as HotpotQA)
  musique   musique_ans_v1.0_train.jsonl + musique_ans_v1.0_dev.jsonl (JSON lines;
            each has `question` and `paragraphs` = [{title, paragraph_text,
            is_supporting}, ...]; the musique_full_v1.0_* files work too)

Each example becomes one pool of C = config.data.pool_size passages ("title :
text"): its supporting passages (relevance 1) plus its own distractors (relevance
0), topped up with random passages of other examples of the same split when it has
fewer than C, and cut to C (supporting ones kept) when it has more; the order is
shuffled with the seed. Splits: the test split is the published dev file (the test
files carry no labels); the validation split is `val_size` examples held out from
the training file (seeded).

Skipped and counted (logged, stored in the manifest): examples without any
supporting passage (e.g. MuSiQue's unanswerable questions) and supporting facts
whose title is not in the context. Malformed input (invalid or truncated JSON, a
missing field, a field of the wrong type) stops with "<file>:<line>: ..." unless
`config.data.skip_bad_lines=True`, which skips the example and counts it (invalid
JSON inside a JSON array cannot be skipped: nothing after it can be read).

Prompts: fgrpo_jax.data.text_prompts, with a word-level vocabulary of at most
`vocab_size` words built from the training split.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Iterator

import numpy as np

from fgrpo_jax.data import cache as cache_lib
from fgrpo_jax.data import text_prompts
from fgrpo_jax.data import textio
from fgrpo_jax.data.qa import (PREP_VERSION, PreparedQA, QAExample, QASettings, load_prepared,
                               write_qa_cache)
from fgrpo_jax.errors import UserError

DATASETS = ("hotpotqa", "musique", "2wiki")

# Defaults of the config.data fields read with .get.
DEFAULTS = dict(pool_size=20, question_len=32, passage_len=24, max_prompt_len=0,
                vocab_size=30000, min_word_frequency=2, val_size=1000, max_train_examples=0,
                skip_bad_lines=False, question_first=False, slot_after_passage=False)

FILES = {
    # dataset: (train candidates, test candidates), the first present is used.
    "hotpotqa": (["hotpot_train_v1.1.json", "hotpot_train_v1.json"],
                 ["hotpot_dev_distractor_v1.json"]),
    "2wiki": (["train.json"], ["dev.json"]),
    "musique": (["musique_ans_v1.0_train.jsonl", "musique_full_v1.0_train.jsonl"],
                ["musique_ans_v1.0_dev.jsonl", "musique_full_v1.0_dev.jsonl"]),
}


# ----------------------------------------------------------------------------
# Reading.


def _read_text(path: str) -> str:
  if not os.path.isfile(path):
    raise UserError(f"{path}: file not found")
  try:
    with textio.open_text(path, newline=None) as f:
      return f.read()
  except OSError as e:
    raise UserError(f"{path}: cannot read ({e})") from None


def json_array_items(path: str) -> Iterator[tuple[int, int, object]]:
  """(index, line, element) of a JSON file holding one array, parsed incrementally
  so that errors name the line and the example."""
  text = _read_text(path)
  dec = json.JSONDecoder()
  n = len(text)

  def skip_ws(pos):
    while pos < n and text[pos] in " \t\r\n":
      pos += 1
    return pos

  def line_of(pos):
    return text.count("\n", 0, pos) + 1

  pos = skip_ws(0)
  if pos >= n or text[pos] != "[":
    raise UserError(f"{path}:{line_of(pos)}: expected a JSON array of examples")
  pos += 1
  index = 0
  line, last = 1, 0
  while True:
    pos = skip_ws(pos)
    if pos >= n:
      raise UserError(f"{path}:{line_of(pos)}: the JSON array ends without ']' after "
                      f"{index} examples (truncated file?)")
    if text[pos] == "]":
      return
    try:
      obj, end = dec.raw_decode(text, pos)
    except json.JSONDecodeError as e:
      raise UserError(f"{path}:{e.lineno}: invalid JSON in example #{index}: {e.msg}"
                      f"{' (truncated file?)' if e.pos >= n - 1 else ''}") from None
    line += text.count("\n", last, pos)
    last = pos
    yield index, line, obj
    index += 1
    pos = skip_ws(end)
    if pos < n and text[pos] == ",":
      pos += 1
    elif pos < n and text[pos] == "]":
      return
    elif pos >= n:
      raise UserError(f"{path}:{line_of(pos)}: the JSON array ends without ']' after "
                      f"{index} examples (truncated file?)")
    else:
      raise UserError(f"{path}:{line_of(pos)}: expected ',' or ']' after example #{index - 1}")


def json_lines_items(path: str, problems) -> Iterator[tuple[int, int, object]]:
  """(index, line, element) of a JSON-lines file; a bad line goes to `problems`."""
  with textio.open_text(path) as f:
    index = 0
    for lineno, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      try:
        obj = textio.loads_line(raw, raw.endswith("\n"))
      except ValueError as e:
        problems(path, lineno, str(e))
        continue
      yield index, lineno, obj
      index += 1


def _clean(text: str) -> str:
  return " ".join(str(text).split())


def _hotpot_example(obj, path, lineno, index, problems, counts) -> QAExample | None:
  where = f"example #{index}"
  if not isinstance(obj, dict):
    problems(path, lineno, f"{where} is not a JSON object")
    return None
  for field in ("question", "context", "supporting_facts"):
    if field not in obj:
      problems(path, lineno, f"{where} (_id {obj.get('_id', '?')}): missing field {field!r}")
      return None
  ctx, sf = obj["context"], obj["supporting_facts"]
  try:
    titles = [str(c[0]) for c in ctx]
    texts = [_clean("".join(c[1]) if isinstance(c[1], list) else c[1]) for c in ctx]
    sup_titles = {str(s[0]) for s in sf}
  except (TypeError, IndexError, KeyError):
    problems(path, lineno, f"{where} (_id {obj.get('_id', '?')}): 'context' must be "
                           "[[title, [sentences]], ...] and 'supporting_facts' "
                           "[[title, index], ...]")
    return None
  missing = sup_titles - set(titles)
  counts["supporting_titles_not_in_context"] += len(missing)
  supporting = [t in sup_titles for t in titles]
  if not any(supporting):
    counts["skipped_no_supporting"] += 1
    return None
  return QAExample(id=str(obj.get("_id", index)), question=_clean(obj["question"]),
                   passages=[f"{_clean(t)} : {x}" for t, x in zip(titles, texts)],
                   supporting=supporting)


def _musique_example(obj, path, lineno, index, problems, counts) -> QAExample | None:
  where = f"example #{index}"
  if not isinstance(obj, dict):
    problems(path, lineno, f"{where} is not a JSON object")
    return None
  for field in ("question", "paragraphs"):
    if field not in obj:
      problems(path, lineno, f"{where} (id {obj.get('id', '?')}): missing field {field!r}")
      return None
  if not isinstance(obj["paragraphs"], list):
    problems(path, lineno, f"{where} (id {obj.get('id', '?')}): 'paragraphs' must be a list "
                           f"of {{title, paragraph_text, is_supporting}}, found "
                           f"{type(obj['paragraphs']).__name__}")
    return None
  passages, supporting = [], []
  for j, p in enumerate(obj["paragraphs"]):
    if not isinstance(p, dict) or "paragraph_text" not in p:
      problems(path, lineno, f"{where} (id {obj.get('id', '?')}): paragraph {j} has no "
                             "'paragraph_text'")
      return None
    passages.append(f"{_clean(p.get('title', ''))} : {_clean(p['paragraph_text'])}")
    supporting.append(bool(p.get("is_supporting", False)))
  if not any(supporting):
    counts["skipped_no_supporting"] += 1
    return None
  return QAExample(id=str(obj.get("id", index)), question=_clean(obj["question"]),
                   passages=passages, supporting=supporting)


def read_examples(path: str, dataset: str, problems: textio.BadLines,
                  counts: dict) -> list[QAExample]:
  """All usable examples of one published file."""
  out = []
  if dataset == "musique":
    items, parse = json_lines_items(path, problems), _musique_example
  else:
    items, parse = json_array_items(path), _hotpot_example
  for index, lineno, obj in items:
    counts["read"] += 1
    ex = parse(obj, path, lineno, index, problems, counts)
    if ex is not None:
      out.append(ex)
  return out


def dataset_files(dataset: str, path: str) -> tuple[str, str]:
  if not path:
    raise UserError("config.data.path is empty: set it to the folder with the "
                    f"{dataset} files")
  d = os.path.expanduser(path)
  if not os.path.isdir(d):
    raise UserError(f"config.data.path={path}: directory not found")
  train_names, test_names = FILES[dataset]

  def pick(names):
    for name in names:
      for cand in (os.path.join(d, name), *glob.glob(os.path.join(d, "*", name))):
        if os.path.isfile(cand):
          return cand
    raise UserError(f"{os.path.join(d, names[0])}: file not found ({dataset} needs "
                    f"{' + '.join(n[0] for n in FILES[dataset])} in config.data.path)")

  return pick(train_names), pick(test_names)


def qa_settings(config) -> tuple[dict, QASettings]:
  d = config.data
  raw = {k: d.get(k, v) for k, v in DEFAULTS.items()}
  for k in ("pool_size", "question_len", "passage_len", "vocab_size"):
    if int(raw[k]) < 1:
      raise UserError(f"config.data.{k}={raw[k]} must be positive")
  s = QASettings(pool_size=int(raw["pool_size"]), question_len=int(raw["question_len"]),
                 passage_len=int(raw["passage_len"]), max_prompt_len=int(raw["max_prompt_len"]),
                 vocab_size=int(raw["vocab_size"]),
                 min_word_frequency=int(raw["min_word_frequency"]),
                 question_first=bool(raw["question_first"]),
                 slot_after_passage=bool(raw["slot_after_passage"]))
  need = text_prompts.prompt_length(s.question_len, s.passage_len, s.pool_size)
  if s.max_prompt_len and need > s.max_prompt_len:
    raise UserError(f"config.data.max_prompt_len={s.max_prompt_len} is shorter than the "
                    f"longest prompt {need} = 3 + question_len + pool_size x (1 + passage_len)")
  return raw, s


def prepare(config, workdir: str | None = None, log=print) -> PreparedQA:
  """Prepares (or reuses) the real QA dataset named by config.data.name."""
  name = config.data.name
  raw, s = qa_settings(config)
  path = config.data.get("path", "") or ""
  train_path, test_path = dataset_files(name, path)
  settings = {"name": name, "seed": int(config.seed), "prep_version": PREP_VERSION, **raw}

  def build(writer):
    problems = textio.BadLines(bool(raw["skip_bad_lines"]), "examples")
    counts = {"read": 0, "skipped_no_supporting": 0, "supporting_titles_not_in_context": 0}
    train_all = read_examples(train_path, name, problems, counts)
    c_train = dict(counts)
    counts.update(read=0, skipped_no_supporting=0, supporting_titles_not_in_context=0)
    test = read_examples(test_path, name, problems, counts)
    c_test = dict(counts)
    rng = np.random.default_rng(np.random.SeedSequence([int(config.seed), 4242]))
    perm = rng.permutation(len(train_all))
    val_size = int(raw["val_size"])
    if len(train_all) < 2 * val_size:
      val_size = max(1, len(train_all) // 10)
    val = [train_all[j] for j in sorted(perm[:val_size])]
    train = [train_all[j] for j in sorted(perm[val_size:])]
    if int(raw["max_train_examples"]) > 0:
      train = train[:int(raw["max_train_examples"])]
    if not train or not test:
      raise UserError(f"{train_path if not train else test_path}: no usable example "
                      "(every example lacks supporting passages?)")
    for label, p, c in (("train file", train_path, c_train), ("dev file", test_path, c_test)):
      log(f"[data] {name} {label} {p}: {c['read']} examples read, "
          f"{c['skipped_no_supporting']} skipped without supporting passages, "
          f"{c['supporting_titles_not_in_context']} supporting titles not in the context")
    if problems.count:
      log(f"[data] {name}: skipped {problems.count} malformed examples (first: {problems.first})")
    log(f"[data] {name} splits: train {len(train)}, validation {len(val)}, test {len(test)}")
    writer.counts.update({f"train_file_{k}": v for k, v in c_train.items()})
    writer.counts.update({f"dev_file_{k}": v for k, v in c_test.items()})
    writer.counts["malformed_skipped"] = problems.count
    write_qa_cache(writer, {"train": train, "validation": val, "test": test}, s,
                   int(config.seed), log, with_oracle=False, name=name)

  prepared = cache_lib.prepare(cache_lib.cache_root(config, workdir), name, settings,
                               [train_path, test_path], build, log)
  return load_prepared(prepared, name)
