"""F-GRPO on multi-hop QA: cover the supporting passages of a pool in the slate, rank one first.

    python -m fgrpo_jax.main --config=configs/multihop_qa.py --workdir=runs/qa
    python -m fgrpo_jax.main --config=configs/multihop_qa.py:hard --workdir=runs/qa_hard
    python -m fgrpo_jax.main --config=configs/multihop_qa.py:tiny --workdir=/tmp/qa
    python -m fgrpo_jax.main --config=configs/multihop_qa.py:hotpotqa \
        --config.data.path=/data/hotpotqa --workdir=runs/hotpotqa

Variants (the part after the colon): `default` (the embedded synthetic task at the
size the default 2-layer model learns within its budget: 1-2 hops, short triple
passages; nothing to download; about 8 minutes on a 2-core CPU), `hard` (the
paper-sized synthetic task, C = 20 and 2-4 hops in sentence syntax, with the
training settings of the earlier default; not learned by the default model, see
docs/experiments.md), `tiny` (seconds; used by the tests), and `hotpotqa`, `musique`,
`2wiki` (the published datasets read from config.data.path; longer prompts, see
docs/datasets.md).
"""

import os

import ml_collections

from fgrpo_jax import cli


def _recsys_config():
  """configs/recsys.py's default: the model, RL, optimiser, eval, mesh and compare
  sections are shared, so both tasks take the same fields (and the same defaults)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recsys.py")
  return cli.load_python_file(path).get_config("default")


def get_config(arg=None):
  variant = arg or "default"
  c = _recsys_config()
  c.variant = variant  # which named variant built this config (informational)

  c.data = ml_collections.ConfigDict()
  c.data.name = "synthetic_qa"  # synthetic_qa (embedded) | hotpotqa | musique | 2wiki
  c.data.path = ""  # folder of the downloaded files (unused by synthetic_qa)
  c.data.cache_dir = ""  # where prepared data is cached ("" = <workdir>/data_cache)
  # 6, not 5: at C = 5 the warm start left RL only 0.025-0.055 hit@1 (docs/experiments.md,
  # "A pool of six passages with a longer warm start")
  c.data.pool_size = 6  # C: passages per question (supporting + distractors)
  c.data.question_len = 6  # question tokens kept in the prompt
  c.data.passage_len = 3  # tokens kept of each passage
  c.data.passage_syntax = "triple"  # synthetic: "the r of s is o ." (sentence) | "s r o" (triple)
  c.data.train_min_pool_size = 0  # synthetic: training pools of this many..C passages (0 = all C)
  c.data.max_prompt_len = 0  # fixed prompt length P (0 = 3 + question_len + C*(1+passage_len))
  c.data.question_first = True  # prompt layout: <q> question before the passages (else after)
  c.data.slot_after_passage = True  # prompt layout: identifier [Pi] after its passage (else before)
  c.data.vocab_size = 1000  # word vocabulary cap incl. special tokens (rest -> <unk>)
  c.data.min_word_frequency = 1  # words rarer than this in the training split -> <unk>
  c.data.skip_bad_lines = False  # real data: skip (and count) malformed examples instead of stopping
  c.data.val_size = 1000  # real data: validation examples held out of the training file
  c.data.max_train_examples = 0  # real data: use at most this many training examples (0 = all)
  # training batches: memory (rows drawn by a pure function of the step) | grain (streamed
  # from the prepared array_record files, one shard per host, iterator state checkpointed)
  c.data.loader = "memory"  # memory | grain (prepared datasets only)
  c.data.num_entities = 120  # synthetic: entity names in the world
  c.data.num_relations = 8  # synthetic: relation words in the world
  c.data.min_hops = 1  # synthetic: fewest hops (gold passages) per question
  c.data.max_hops = 2  # synthetic: most hops per question
  c.data.num_train = 20000  # synthetic: training questions
  c.data.num_validation = 500  # synthetic: validation questions
  c.data.num_test = 1000  # synthetic: test questions
  # synthetic: weights of distractor kinds: a later chain entity as subject, a path
  # relation about another subject, a chain entity (mostly the start) as object, random
  c.data.distractor_mix = (0.3, 0.25, 0.35, 0.1)
  c.data.train_distractor_mix = ()  # synthetic: the training split's own weights (() = the same)

  # Task-specific settings; every other field is configs/recsys.py's.
  c.rollout.update(slate_size=3, rank_size=2)  # k >= max_hops; m ranked passages
  # The SFT recipe the default task needs (docs/experiments.md, "Multi-hop QA learnability
  # probes"): the recommendation rate 3e-3 keeps QA on its plateau, a per-slot relevance
  # loss read at each identifier gives C labels per question, and a larger init lets
  # attention leave uniform sooner.
  # 9,000 steps: at C = 6 one seed of three left its plateau only after step 3,000
  c.sft.update(steps=9000, batch_size=32, lr=3e-4, slot_relevance_weight=1.0)
  # The gold slate names the supporting passages first, so the model learns to write its
  # most confident passage first and the ranking copies it: with a shuffled gold slate
  # the ranking had to find the passage again and dropped it for 30% of the questions
  # (validation hit@1 0.59-0.76 -> 0.945-0.975 over 3 seeds; docs/experiments.md,
  # "The order of the gold slate").
  c.sft.slate_order = "relevant_first"
  # An order-aware slate reward (the slate's NDCG@k): the ranking copies the slate's first
  # passage, so with order-blind recall F-GRPO's slate advantage does not reward what decides
  # hit@1 (validation hit@1 0.766 against 0.746 with recall, 3 seeds; docs/experiments.md,
  # "reward.coverage on this default")
  c.reward.coverage = "ndcg"  # R_gen: the slate's own NDCG@k (order-aware), not recall
  c.model.init_std = 0.088  # about 1 / sqrt(hidden)
  # RL rate: fgrpo's choice in its rl.lr sweep on this default (validation hit@1 0.716 /
  # 0.722 / 0.722 / 0.632 at 1e-5 / 3e-5 / 1e-4 / 3e-4, the tie to the smaller rate;
  # scripts/sweep_qa_lr.sh, docs/experiments.md "The RL rate on the C = 6 default")
  c.rl.update(steps=100, batch_prompts=8, lr=3e-5)
  # all 500 validation questions: at 200 the standard error of hit@1 (~0.03) was larger
  # than the differences settings are chosen by (docs/experiments.md, "The RL rate on the
  # C = 6 default")
  c.eval.update(every=0, val_examples=500, batch_size=100)
  c.log_every = 25
  c.ckpt_every = 200

  if variant in ("hard", "tiny", "hotpotqa", "musique", "2wiki"):
    # The earlier default, kept as it was run (task and training), so its recorded
    # numbers reproduce: C = 20, 2-4 hops, sentence passages after their identifiers,
    # the question last, the recommendation SFT recipe. `tiny` is its small copy (the
    # tests' task since before the default changed); the published datasets keep the
    # layout and recipe they were set up with (the default's were found on the
    # synthetic task only).
    c.data.update(pool_size=20, question_len=10, passage_len=7, passage_syntax="sentence",
                  question_first=False, slot_after_passage=False, min_hops=2, max_hops=4)
    c.rollout.update(slate_size=5, rank_size=3)
    c.sft.update(steps=600, lr=3e-3, slot_relevance_weight=0.0, slate_order="random")
    c.rl.lr = 3e-4
    c.reward.coverage = "recall"
    c.model.init_std = 0.02
    c.eval.val_examples = 200
  if variant == "tiny":
    c.data.update(num_entities=30, num_train=200, num_validation=32, num_test=64,
                  max_hops=3, question_len=8)
    c.model.update(num_layers=1, hidden=32, num_heads=2, num_kv_heads=1, head_dim=16,
                   mlp_hidden=64)
    c.rollout.update(slate_size=4, rank_size=2, group_size=4)
    c.sft.update(steps=20, batch_size=16)
    c.rl.update(steps=4, batch_prompts=4)
    c.eval.update(every=0, val_examples=32, test_examples=64, batch_size=32)
    c.compare.seeds = 2
    c.log_every = 5
    c.ckpt_every = 10
  elif variant in ("hotpotqa", "musique", "2wiki"):
    c.data.name = variant
    c.data.update(question_len=32, passage_len=24, vocab_size=30000, min_word_frequency=2)
    c.model.update(num_layers=4, hidden=256, num_heads=8, num_kv_heads=4, mlp_hidden=768)
    c.sft.update(steps=2000, batch_size=16)
    c.rl.update(steps=500, batch_prompts=8)
    c.eval.update(every=500, val_examples=500, batch_size=32)
  elif variant not in ("default", "hard"):
    raise ValueError(f"unknown variant {variant!r} of configs/multihop_qa.py "
                     "(default, hard, tiny, hotpotqa, musique, 2wiki)")
  return c
