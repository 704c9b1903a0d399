"""The passage-pool QA data model, shared by the real readers (data/multihop_qa.py:
HotpotQA, MuSiQue, 2WikiMultihopQA) and the synthetic generator (data/synthetic_qa.py).

- `QAExample`: one question with its candidate passages and which of them support it;
- `make_pools` / `write_qa_cache`: examples -> pools of C passages, the word-level
  tokenizer of the training split, prompts and text records in the prepared cache;
- `PreparedQA` / `load_prepared`: a prepared dataset's model arrays per split, its
  prompt builder and random access to its texts.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from fgrpo_jax.data import cache as cache_lib
from fgrpo_jax.data import pipeline
from fgrpo_jax.data import text_prompts
from fgrpo_jax.data.arrays import SPLITS
from fgrpo_jax.errors import UserError

PREP_VERSION = 3  # bump when preparation changes: part of the cache key


@dataclasses.dataclass
class QAExample:
  """One question with its candidate passages (texts "title : text")."""

  id: str
  question: str
  passages: list[str]
  supporting: list[bool]


# ----------------------------------------------------------------------------
# Pools, tokenizer, records.


def make_pools(examples: Sequence[QAExample], pool_size: int, rng: np.random.Generator,
               counts: dict, split: str, top_up: bool = True):
  """-> (passages [N][C] with None for slots that could not be filled, relevance [N, C]).

  top_up: fill a short example's pool with passages of other examples (real data);
  False leaves its extra slots empty (a synthetic example's pool size is deliberate)."""
  bank = [p for ex in examples for p in ex.passages]
  c = pool_size
  pools, rel = [], np.zeros((len(examples), c), np.float32)
  topped = trimmed = empty = 0
  for n, ex in enumerate(examples):
    sup = [p for p, s in zip(ex.passages, ex.supporting) if s]
    dis = [p for p, s in zip(ex.passages, ex.supporting) if not s]
    sup = sup[:c]
    order = rng.permutation(len(dis))
    dis = [dis[j] for j in order[:c - len(sup)]]
    if len(ex.passages) > c:
      trimmed += 1
    chosen = sup + dis
    if len(chosen) < c and top_up:
      topped += 1
      have = set(ex.passages)
      tries = 0
      while len(chosen) < c and tries < 20 * c and bank:
        p = bank[int(rng.integers(len(bank)))]
        tries += 1
        if p not in have:
          have.add(p)
          chosen.append(p)
    labels = [1.0] * len(sup) + [0.0] * (len(chosen) - len(sup))
    if len(chosen) < c:
      empty += 1
    perm = rng.permutation(len(chosen))
    row = [chosen[j] for j in perm] + [None] * (c - len(chosen))
    rel[n, :len(chosen)] = np.asarray(labels, np.float32)[perm]
    pools.append(row)
  counts[f"{split}_pools_topped_up"] = topped
  counts[f"{split}_pools_trimmed"] = trimmed
  counts[f"{split}_pools_with_empty_slots"] = empty
  return pools, rel


@dataclasses.dataclass
class QASettings:
  pool_size: int
  question_len: int
  passage_len: int
  max_prompt_len: int
  vocab_size: int
  min_word_frequency: int
  question_first: bool = False  # prompt layout (text_prompts.QAPrompts)
  slot_after_passage: bool = False
  top_up: bool = True  # fill short pools from other examples' passages (make_pools)


def write_qa_cache(writer: cache_lib.CacheWriter, splits: dict[str, list[QAExample]],
                   s: QASettings, seed: int, log, *, with_oracle: bool, name: str) -> None:
  """Pools, the word-level tokenizer (from the training split), prompts -> records."""
  rng = np.random.default_rng(np.random.SeedSequence([seed, 31337]))
  counts = writer.counts
  pooled = {}
  for split in SPLITS:
    pooled[split] = make_pools(splits[split], s.pool_size, rng, counts, split, s.top_up)
  tok_dir = os.path.join(writer.dir, "tokenizer")

  def corpus():
    for ex, row in zip(splits["train"], pooled["train"][0]):
      yield ex.question
      for p in row:
        if p is not None:
          yield p

  text_prompts.build_tokenizer(corpus(), tok_dir, pool_size=s.pool_size,
                               vocab_size=s.vocab_size, min_frequency=s.min_word_frequency)
  tok = text_prompts.load_tokenizer(tok_dir)
  builder = text_prompts.QAPrompts(tok, s.pool_size, s.question_len, s.passage_len,
                                   s.max_prompt_len, s.question_first, s.slot_after_passage)
  offset = 0
  for split in SPLITS:
    exs = splits[split]
    passages, rel = pooled[split]
    arrays = builder.build([e.question for e in exs], passages) if exs else None
    if arrays is None:
      raise UserError(f"{name}: the {split} split is empty")
    unk = float(np.mean(arrays["prompt"][arrays["prompt_mask"]] == text_prompts.UNK))
    counts[f"{split}_unk_token_fraction"] = round(unk, 4)
    out = {"prompt": arrays["prompt"], "prompt_mask": arrays["prompt_mask"],
           "pool_mask": arrays["pool_mask"], "relevance": rel,
           "example_id": np.arange(offset, offset + len(exs), dtype=np.int32)}
    if with_oracle:
      out["oracle_scores"] = rel.copy()
    offset += len(exs)
    writer.write_split(split, out)
    writer.write_texts(split, ({"id": e.id, "question": e.question, "passages": row}
                               for e, row in zip(exs, passages)))
    counts[f"{split}_examples"] = len(exs)
  writer.extra.update(prompt_len=builder.prompt_len, vocab_size=builder.vocab_size,
                      pool_size=s.pool_size, question_len=s.question_len,
                      passage_len=s.passage_len, question_first=s.question_first,
                      slot_after_passage=s.slot_after_passage)
  log(f"[data] {name}: vocabulary {builder.vocab_size} tokens, prompts {builder.prompt_len} "
      f"tokens, <unk> fraction train {counts['train_unk_token_fraction']:.3f} test "
      f"{counts['test_unk_token_fraction']:.3f}")


@dataclasses.dataclass
class PreparedQA:
  """A prepared QA dataset: model arrays per split, its tokenizer and texts."""

  name: str
  dir: str
  manifest: dict
  splits: dict[str, dict[str, np.ndarray]]
  prompts: text_prompts.QAPrompts

  def split_of_ids(self, ids: np.ndarray) -> list[tuple[str, int]]:
    """(split, row within split) of global example ids."""
    out = []
    bounds, start = [], 0
    for s in SPLITS:
      n = self.manifest["splits"][s]["num_examples"]
      bounds.append((s, start, start + n))
      start += n
    for i in np.asarray(ids).tolist():
      for s, a, b in bounds:
        if a <= i < b:
          out.append((s, i - a))
          break
    return out

  def texts(self, ids: np.ndarray) -> list[dict]:
    """Text records ({id, question, passages [C]}) of global example ids, in order."""
    located = self.split_of_ids(ids)
    out: list = [None] * len(located)
    for s in SPLITS:
      rows = [(k, r) for k, (sp, r) in enumerate(located) if sp == s]
      if rows:
        recs = pipeline.load_texts(self.dir, s, [r for _, r in rows], self.manifest)
        for (k, _), rec in zip(rows, recs):
          out[k] = rec
    return out


def load_prepared(prepared: cache_lib.Prepared, name: str) -> PreparedQA:
  m = prepared.manifest
  tok = text_prompts.load_tokenizer(os.path.join(prepared.dir, "tokenizer"))
  builder = text_prompts.QAPrompts(tok, m["pool_size"], m["question_len"], m["passage_len"],
                                   m["prompt_len"], bool(m.get("question_first", False)),
                                   bool(m.get("slot_after_passage", False)))
  splits = {s: builder.model_arrays(pipeline.load_split_arrays(prepared.dir, s, m))
            for s in SPLITS}
  return PreparedQA(name=name, dir=prepared.dir, manifest=m, splits=splits, prompts=builder)

