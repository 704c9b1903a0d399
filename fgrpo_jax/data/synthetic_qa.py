"""Embedded synthetic multi-hop QA with a known oracle (nothing downloaded).

World: `num_entities` pseudo-word names (e.g. "kodamu") and `num_relations`
relation words ("mother", "boss", ...). Every example draws its own facts, so
nothing can be memorised across examples: the answer is only in the passages.

Example with h hops (h uniform in [min_hops, max_hops]):

* a chain of h+1 distinct entities e_0 .. e_h and a relation path r_1 .. r_h;
* question: "r_h of … of r_1 of e_0 ?"  (e.g. "boss of mother of kodamu ?");
* h gold passages, one per hop: "the r_j of e_{j-1} is e_j ."  (relevance 1);
* C - h distractors, facts "the r of s is o ." that share entities or relations
  with the gold chain (weights `distractor_mix`): a later chain entity as the
  subject with another relation (mostly one of the path's), a path relation about
  someone outside the chain, a chain entity (mostly the start entity) as the
  object, or a random fact. The start entity is the subject of the first hop only,
  and no two passages of a pool share a (subject, relation), so the chain, hence
  the set of gold passages, is determined by the prompt: ranking by
  `oracle_scores` (1 for gold passages, 0 otherwise) has recall 1.

Lexical overlap alone is misleading by design: "the mother of tiso is kodamu ."
matches the question "boss of mother of kodamu ?" as well as the gold first hop
"the mother of kodamu is lipa .", and the later gold hops share no word but their
relation with the question, so BM25 is far below the oracle, while reading who is
the subject of which fact, and following the chain, recovers every gold passage.

Passages are 7 words and questions at most 2 * max_hops + 2, so with C = 20 the
prompts are at most 3 + 10 + 20 * 8 = 173 tokens.
"""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np

from fgrpo_jax.data import cache as cache_lib
from fgrpo_jax.data import qa
from fgrpo_jax.errors import UserError

RELATIONS = ("mother", "father", "boss", "friend", "teacher", "rival", "doctor", "neighbor",
             "mentor", "partner", "landlord", "coach")
DISTRACTOR_KINDS = ("subject", "relation", "object", "random")
GENERATOR_VERSION = 2  # bump when the generator changes: part of the cache key

# Defaults of the config.data fields read with .get.
DEFAULTS = dict(num_entities=120, num_relations=8, min_hops=2, max_hops=4, num_train=20000,
                num_validation=500, num_test=1000, distractor_mix=(0.3, 0.25, 0.35, 0.1),
                pool_size=20, question_len=10, passage_len=7, max_prompt_len=0,
                vocab_size=1000, min_word_frequency=1, question_first=False,
                slot_after_passage=False, passage_syntax="sentence", train_min_pool_size=0,
                train_distractor_mix=())
SYNTAXES = ("sentence", "triple")


def entity_names(n: int, rng: np.random.Generator) -> list[str]:
  """n distinct pronounceable three-syllable names."""
  cons, vows = "bdfgklmnprstvz", "aeiou"
  syll = [c + v for c in cons for v in vows]
  total = len(syll) ** 3
  if n > total:
    raise UserError(f"config.data.num_entities={n} exceeds {total}")
  codes = rng.choice(total, size=n, replace=False)
  s = len(syll)
  return [syll[c // (s * s)] + syll[(c // s) % s] + syll[c % s] for c in codes]


def _fact(r: str, s: str, o: str, syntax: str = "sentence") -> str:
  """One passage: "the r of s is o ." (sentence, 7 words) or "s r o" (triple, 3)."""
  return f"{s} {r} {o}" if syntax == "triple" else f"the {r} of {s} is {o} ."


def make_example(rng: random.Random, names: list[str], relations: list[str],
                 hops: int, pool_size: int, mix: Sequence[float], ident: str,
                 syntax: str = "sentence") -> qa.QAExample:
  ne = len(names)
  chain = rng.sample(range(ne), hops + 1)
  path = [rng.choice(relations) for _ in range(hops)]
  facts = [(chain[j], path[j], chain[j + 1]) for j in range(hops)]
  used = {(s, r) for s, r, _ in facts}
  chain_set = set(chain)
  path_rels = sorted(set(path))

  others = [e for e in range(ne) if e not in chain_set]

  def other():  # an entity outside the chain (a later chain entity if there is none)
    return rng.choice(others) if others else rng.choice(chain[1:])

  tries = 0
  while len(facts) < pool_size:
    tries += 1
    if tries > 50 * pool_size:  # a tiny world: any free (subject, relation) pair
      free = [(s, r) for s in range(ne) for r in relations
              if s != chain[0] and (s, r) not in used]
      if not free:
        raise UserError(f"config.data.num_entities={ne} and num_relations={len(relations)} "
                        f"allow too few distinct facts for a pool of {pool_size}")
      s, r = rng.choice(free)
      o = rng.choice([e for e in range(ne) if e != s])
      used.add((s, r))
      facts.append((s, r, o))
      continue
    kind = rng.choices(DISTRACTOR_KINDS, weights=mix)[0]
    if kind == "subject":  # a later chain entity with another relation
      s = rng.choice(chain[1:])
      r = rng.choice(path_rels) if rng.random() < 0.7 else rng.choice(relations)
      o = rng.randrange(ne)
    elif kind == "relation":  # a path relation about someone else
      s = other()
      r = rng.choice(path_rels)
      o = rng.choice(chain) if rng.random() < 0.5 else rng.randrange(ne)
    elif kind == "object":  # a chain entity, mostly the start, as the object
      s = other()
      r = rng.choice(path_rels) if rng.random() < 0.7 else rng.choice(relations)
      o = chain[0] if rng.random() < 0.6 else rng.choice(chain[1:])
    else:
      s, o = rng.randrange(ne), rng.randrange(ne)
      r = rng.choice(relations)
    if s == o or s == chain[0] or (s, r) in used:
      continue
    used.add((s, r))
    facts.append((s, r, o))
  question = " of ".join(reversed(path)) + f" of {names[chain[0]]} ?"
  passages = [_fact(r, names[s], names[o], syntax) for s, r, o in facts]
  supporting = [True] * hops + [False] * (pool_size - hops)
  return qa.QAExample(id=ident, question=question, passages=passages,
                               supporting=supporting)


def _mix(settings: dict, field: str) -> list[float]:
  """The normalised distractor-kind weights of config.data.<field>."""
  mix = np.asarray(settings[field], np.float64)
  if mix.shape != (len(DISTRACTOR_KINDS),) or (mix < 0).any() or mix.sum() <= 0:
    raise UserError(f"config.data.{field} needs 4 non-negative weights "
                    f"({', '.join(DISTRACTOR_KINDS)})")
  return (mix / mix.sum()).tolist()


def generate(settings: dict, seed: int) -> dict[str, list[qa.QAExample]]:
  """The three splits of the synthetic task (independent seeded streams)."""
  s = settings
  if not 1 <= s["min_hops"] <= s["max_hops"]:
    raise UserError(f"need 1 <= config.data.min_hops ({s['min_hops']}) <= "
                    f"config.data.max_hops ({s['max_hops']})")
  if s["max_hops"] >= s["pool_size"]:
    raise UserError(f"config.data.max_hops={s['max_hops']} must be below the pool size "
                    f"{s['pool_size']}")
  if not 1 <= s["num_relations"] <= len(RELATIONS):
    raise UserError(f"config.data.num_relations must be in [1, {len(RELATIONS)}]")
  if s["num_entities"] < s["max_hops"] + 3:
    raise UserError(f"config.data.num_entities={s['num_entities']} is too small")
  if s["passage_syntax"] not in SYNTAXES:
    raise UserError(f"config.data.passage_syntax={s['passage_syntax']!r} is not one of "
                    f"{', '.join(SYNTAXES)}")
  words = 3 if s["passage_syntax"] == "triple" else 7
  if s["question_len"] < 2 * s["max_hops"] + 2 or s["passage_len"] < words:
    raise UserError("config.data.question_len must be >= 2 * max_hops + 2 and "
                    f"config.data.passage_len >= {words} ({s['passage_syntax']} syntax; "
                    "synthetic questions and passages would be cut)")
  mixes = {split: _mix(s, field) for split, field in (
      ("train", "train_distractor_mix" if s["train_distractor_mix"] else "distractor_mix"),
      ("validation", "distractor_mix"), ("test", "distractor_mix"))}
  low = int(s["train_min_pool_size"]) or int(s["pool_size"])
  if not s["max_hops"] < low <= s["pool_size"]:
    raise UserError(f"config.data.train_min_pool_size={s['train_min_pool_size']} must be 0 "
                    f"(off) or in (max_hops, pool_size] = ({s['max_hops']}, {s['pool_size']}]")
  ss = np.random.SeedSequence([seed, 777])
  world_ss, *split_ss = ss.spawn(4)
  world = np.random.default_rng(world_ss)
  names = entity_names(int(s["num_entities"]), world)
  relations = list(RELATIONS[:int(s["num_relations"])])
  out = {}
  for split, sss in zip(("train", "validation", "test"), split_ss):
    rng = random.Random(int(sss.generate_state(1)[0]))
    n = int(s[f"num_{split}"])
    # Training pools of train_min_pool_size..C passages (a mixture of easier
    # questions); validation and test always have C. A fixed size draws nothing, so
    # the default keeps the generator's random stream (and its data) as before.
    sizes = (low, int(s["pool_size"])) if split == "train" else (int(s["pool_size"]),) * 2
    out[split] = [make_example(rng, names, relations,
                               rng.randint(s["min_hops"], s["max_hops"]),
                               rng.randint(*sizes) if sizes[0] < sizes[1] else sizes[0],
                               mixes[split], f"{split}-{i}", s["passage_syntax"])
                  for i in range(n)]
  return out


def settings_from_config(config) -> dict:
  d = config.data
  s = {k: d.get(k, v) for k, v in DEFAULTS.items()}
  for k in ("distractor_mix", "train_distractor_mix"):
    s[k] = [float(x) for x in s[k]]
  for k, v in s.items():
    if k not in ("distractor_mix", "train_distractor_mix", "passage_syntax"):
      s[k] = bool(v) if isinstance(DEFAULTS[k], bool) else int(v)
  s["passage_syntax"] = str(s["passage_syntax"])
  return s


def prepare(config, workdir: str | None = None, log=print) -> qa.PreparedQA:
  """Generates (or reuses) the synthetic QA task of config.data -> PreparedQA."""
  s = settings_from_config(config)
  seed = int(config.seed)
  qs = qa.QASettings(pool_size=s["pool_size"], question_len=s["question_len"],
                     passage_len=s["passage_len"], max_prompt_len=s["max_prompt_len"],
                     vocab_size=s["vocab_size"], min_word_frequency=s["min_word_frequency"],
                     question_first=s["question_first"],
                     slot_after_passage=s["slot_after_passage"], top_up=False)

  def build(writer):
    splits = generate(s, seed)
    hops = np.array([sum(e.supporting) for e in splits["test"]])
    writer.counts["test_hops"] = {int(h): int((hops == h).sum()) for h in np.unique(hops)}
    log(f"[data] synthetic_qa: train {len(splits['train'])}, validation "
        f"{len(splits['validation'])}, test {len(splits['test'])} questions, "
        f"{s['num_entities']} entities, {s['num_relations']} relations, "
        f"{s['min_hops']}-{s['max_hops']} hops")
    qa.write_qa_cache(writer, splits, qs, seed, log, with_oracle=True, name="synthetic_qa")

  prepared = cache_lib.prepare(cache_lib.cache_root(config, workdir), "synthetic_qa",
                               {"seed": seed, "generator_version": GENERATOR_VERSION,
                                "prep_version": qa.PREP_VERSION, **s}, [], build, log)
  return qa.load_prepared(prepared, "synthetic_qa")
