"""The embedded synthetic multi-hop QA task (fgrpo_jax/data/synthetic_qa.py,
configs/multihop_qa.py)."""

import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest

from configs import multihop_qa as qa_config
from fgrpo_jax import train
from fgrpo_jax.data import synthetic_qa, tasks, text_prompts
from fgrpo_jax.errors import UserError
import test_train
from test_data_recsys_real import one_training_step

FACT = re.compile(r"^the (\w+) of (\w+) is (\w+) \.$")
TRIPLE = re.compile(r"^(\w+) (\w+) (\w+)$")  # passage_syntax="triple": "s r o"


def fact(passage):
  """(relation, subject, object) of a passage in either syntax."""
  m = FACT.match(passage)
  if m:
    return m.groups()
  s, r, o = TRIPLE.match(passage).groups()
  return r, s, o


def _examples(n=300, seed=0, **kw):
  s = synthetic_qa.settings_from_config(qa_config.get_config("hard"))
  s.update(num_train=n, num_validation=1, num_test=1, **kw)
  return synthetic_qa.generate(s, seed)["train"]


def solve(ex):
  """Follows the question's relation path through the passages: the gold set."""
  *path_rev, start = ex.question.rstrip(" ?").split(" of ")
  facts = {}
  for j, p in enumerate(ex.passages):
    r, s, o = fact(p)
    assert (s, r) not in facts  # one fact per (subject, relation) in a pool
    facts[(s, r)] = (j, o)
  entity, found = start, set()
  for r in reversed(path_rev):
    j, entity = facts[(entity, r)]
    found.add(j)
  return found


@pytest.mark.parametrize("syntax", synthetic_qa.SYNTAXES)
def test_chain_is_determined_by_the_prompt(syntax):
  exs = _examples(passage_syntax=syntax)
  words = {"sentence": 7, "triple": 3}[syntax]
  assert all(len(p.split()) == words for e in exs for p in e.passages)
  hops = [sum(e.supporting) for e in exs]
  assert set(hops) == {2, 3, 4}
  shared = 0
  for e in exs:
    assert len(e.passages) == 20 and len(set(e.passages)) == 20
    assert solve(e) == {j for j, s in enumerate(e.supporting) if s}  # oracle recall 1
    chain_entities = {w for p, s in zip(e.passages, e.supporting) if s
                      for w in fact(p)[1:]}
    rels = set(e.question.rstrip(" ?").split(" of ")[:-1])
    for p, s in zip(e.passages, e.supporting):
      if not s:
        r, subj, obj = fact(p)
        shared += bool({subj, obj} & chain_entities or r in rels)
  distractors = sum(20 - h for h in hops)
  assert shared / distractors > 0.8  # distractors share entities or relations with the chain


def _shared_fraction(exs):
  """Fraction of distractors sharing an entity or a relation with the gold chain."""
  shared = total = 0
  for e in exs:
    chain = {w for p, s in zip(e.passages, e.supporting) if s for w in fact(p)[1:]}
    rels = set(e.question.rstrip(" ?").split(" of ")[:-1])
    for p, s in zip(e.passages, e.supporting):
      if not s:
        r, subj, obj = fact(p)
        shared += bool({subj, obj} & chain or r in rels)
        total += 1
  return shared / total


def test_training_split_can_have_its_own_distractor_mix():
  """data.train_distractor_mix: random-only distractors in training (few share the
  chain's entities or relations by chance), the default mix in validation and test."""
  s = synthetic_qa.settings_from_config(qa_config.get_config("hard"))
  s.update(num_train=200, num_validation=200, num_test=1,
           train_distractor_mix=[0.0, 0.0, 0.0, 1.0])
  splits = synthetic_qa.generate(s, 0)
  train_shared, val_shared = (_shared_fraction(splits[k]) for k in ("train", "validation"))
  assert train_shared < 0.6 < 0.8 < val_shared, (train_shared, val_shared)
  default = synthetic_qa.generate(dict(s, train_distractor_mix=[]), 0)
  assert [e.passages for e in default["validation"]] == [e.passages for e in splits["validation"]]
  with pytest.raises(UserError, match="train_distractor_mix"):
    synthetic_qa.generate(dict(s, train_distractor_mix=[1.0]), 0)


def test_generator_is_seeded():
  a, b, c = _examples(20, 0), _examples(20, 0), _examples(20, 1)
  assert [e.passages for e in a] == [e.passages for e in b]
  assert [e.passages for e in a] != [e.passages for e in c]


def test_bad_settings_are_user_errors():
  with pytest.raises(UserError, match="max_hops"):
    _examples(5, min_hops=3, max_hops=2)
  with pytest.raises(UserError, match="distractor_mix"):
    _examples(5, distractor_mix=[1.0, 0.0])
  with pytest.raises(UserError, match="passage_syntax"):
    _examples(5, passage_syntax="prose")
  with pytest.raises(UserError, match="passage_len >= 7"):
    _examples(5, passage_len=3)


def test_default_task_is_small_multi_hop_with_room_on_both_phases(tmp_path):
  """The default: 1-2 hops in pools of 6, question first, each identifier after its
  triple; lexical overlap finds a supporting passage often but covers both hops less
  often, so a learned slate and a learned ranking each have something to beat."""
  c = qa_config.get_config()
  c.data.update(num_train=300, num_validation=50, num_test=400, cache_dir=str(tmp_path))
  task = tasks.load_task(c, log=lambda s: None)
  test = task.splits["test"]
  assert task.pool_size == 6 and set(test["relevance"].sum(-1).astype(int)) == {1, 2}
  tok = text_prompts.load_tokenizer(os.path.join(task.info["cache_dir"], "tokenizer"))
  words = " ".join(tok.convert_ids_to_tokens(test["prompt"][0][test["prompt_mask"][0]].tolist()))
  assert re.fullmatch(r"<bos> <q> [\w ]+ \? (\w+ \w+ \w+ \[P\d\] ){6}<slate>", words), words
  oracle, refs = train.reference_metrics(task, test, c)
  assert oracle["hit@1"] == oracle["slate_recall"] == 1.0
  assert refs["random"]["hit@1"] < refs["bm25"]["hit@1"] < 0.75
  assert refs["random"]["slate_recall"] < refs["bm25"]["slate_recall"] < 0.9
  for ex in synthetic_qa.generate(synthetic_qa.settings_from_config(c), c.seed)["test"][:50]:
    assert solve(ex) == {j for j, s in enumerate(ex.supporting) if s}


def test_hard_prompts_and_references(tmp_path):
  c = qa_config.get_config("hard")
  c.data.update(num_train=300, num_validation=50, num_test=400, cache_dir=str(tmp_path))
  logs = []
  task = tasks.load_task(c, log=logs.append)
  assert task.name == "multihop_qa" and task.dataset == "synthetic_qa" and task.has_oracle
  assert task.info["prompt_len"] <= 220 and task.pool_size == 20
  test = task.splits["test"]
  np.testing.assert_array_equal(test["oracle_scores"], test["relevance"])
  oracle, refs = train.reference_metrics(task, test, c)
  assert oracle["slate_recall"] == 1.0 and oracle["hit@1"] == 1.0
  assert set(refs) == {"random", "popularity", "bm25"}
  assert refs["random"]["hit@1"] < refs["bm25"]["hit@1"] < 0.7  # lexical overlap misleads
  assert refs["bm25"]["slate_recall"] < 0.7
  # The word-level tokenizer round-trips a prompt.
  tok = text_prompts.load_tokenizer(os.path.join(task.info["cache_dir"], "tokenizer"))
  row = test["prompt"][0][test["prompt_mask"][0]]
  words = " ".join(tok.convert_ids_to_tokens(row.tolist()))
  assert "[P20]" in words
  # passages after their identifiers, then the question next to the answer
  assert re.match(r"<bos> \[P1\] the \w+ of \w+ is \w+ \. \[P2\] the ", words)
  assert re.search(r" \. <q> [\w ]+ \? <slate>$", words)
  # Prepared once: the second load reuses the cache.
  task2 = tasks.load_task(c, log=logs.append)
  assert any("reusing" in l for l in logs)
  np.testing.assert_array_equal(task2.splits["test"]["prompt"], test["prompt"])


@pytest.mark.parametrize("question_first", [False, True])
@pytest.mark.parametrize("slot_after", [False, True])
def test_prompt_layouts_match_a_plain_python_rendering(tmp_path, question_first, slot_after):
  exs = _examples(n=3, pool_size=5, max_hops=2, question_len=6)
  texts = [e.question for e in exs] + [p for e in exs for p in e.passages]
  text_prompts.build_tokenizer(texts, str(tmp_path), pool_size=5, vocab_size=500)
  tok = text_prompts.load_tokenizer(str(tmp_path))
  builder = text_prompts.QAPrompts(tok, 5, 6, 7, 0, question_first, slot_after)
  built = builder.build([e.question for e in exs], [e.passages for e in exs])
  for i, ex in enumerate(exs):
    question = ["<q>"] + ex.question.split()[:6]
    passages = []
    for j, p in enumerate(ex.passages):
      words, slot = p.split()[:7], f"[P{j + 1}]"
      passages += words + [slot] if slot_after else [slot] + words
    expected = (["<bos>"] + (question if question_first else []) + passages
                + ([] if question_first else question) + ["<slate>"])
    row = built["prompt"][i][built["prompt_mask"][i]]
    assert tok.convert_ids_to_tokens(row.tolist()) == expected
    assert not built["prompt_mask"][i][:-len(expected)].any()  # left padding only


def test_layout_fields_reach_the_prepared_prompts(tmp_path):
  c = qa_config.get_config("tiny")
  c.data.update(cache_dir=str(tmp_path), question_first=True, slot_after_passage=True)
  task = tasks.load_task(c, log=lambda s: None)
  tok = text_prompts.load_tokenizer(os.path.join(task.info["cache_dir"], "tokenizer"))
  test = task.splits["test"]
  words = " ".join(tok.convert_ids_to_tokens(test["prompt"][0][test["prompt_mask"][0]].tolist()))
  assert re.match(r"<bos> <q> [\w ]+ \? the \w+ of \w+ is \w+ \. \[P1\] the ", words), words
  assert words.endswith(" . [P20] <slate>"), words


def test_smaller_training_pools_stay_small_and_solvable(tmp_path):
  """data.train_min_pool_size: training pools of 3..C passages (uniformly; the rest of
  the C slots empty, not topped up from other examples), validation and test of C; the
  oracle is still exact on every pool."""
  c = qa_config.get_config("tiny")
  c.data.update(cache_dir=str(tmp_path), train_min_pool_size=4, passage_syntax="triple",
                passage_len=3)
  task = tasks.load_task(c, log=lambda s: None)
  C = task.pool_size
  sizes = task.splits["train"]["pool_mask"].sum(-1)
  assert sizes.min() == 4 and sizes.max() == C and len(np.unique(sizes)) == C - 3
  for split in ("validation", "test"):
    assert (task.splits[split]["pool_mask"].sum(-1) == C).all()
  train_ex = synthetic_qa.generate(synthetic_qa.settings_from_config(c), c.seed)["train"]
  for ex, n in zip(train_ex, sizes):
    assert len(ex.passages) == n
    assert solve(ex) == {j for j, s in enumerate(ex.supporting) if s}
  rel, mask = task.splits["train"]["relevance"], task.splits["train"]["pool_mask"]
  assert not rel[~mask].any()  # empty slots are never relevant
  with pytest.raises(UserError, match="train_min_pool_size"):
    _examples(5, train_min_pool_size=3)  # not above max_hops = 4


def test_one_training_step(tmp_path):
  c = qa_config.get_config("tiny")
  c.data.cache_dir = str(tmp_path)
  task = tasks.load_task(c, log=lambda s: None)
  one_training_step(task)


def test_qa_by_hops_splits_per_example_metrics_by_gold_passages(tmp_path):
  """scripts/qa_by_hops.py: per-hop means of a run's per-example test metrics, the hop
  counts taken from the test split its run_config regenerates."""
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "qa_by_hops.py")
  spec = importlib.util.spec_from_file_location("qa_by_hops_under_test", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = qa_config.get_config("tiny")
  config.seed = 3
  run = tmp_path / "run"
  run.mkdir()
  (run / "run_config.json").write_text(json.dumps({"config": config.to_dict(), "vocab_size": 1}))
  n = config.data.num_test
  rng = np.random.default_rng(0)
  metrics = {m: rng.random(n).astype(np.float32) for m in mod.METRICS}
  np.savez(run / "eval_examples.npz", **metrics)
  hops = mod.hops_of(str(run))
  expected = [sum(e.supporting) for e in synthetic_qa.generate(
      synthetic_qa.settings_from_config(config), 3)["test"]]
  assert hops.tolist() == expected and len(set(expected)) > 1
  buf = io.StringIO()
  with mock.patch.object(sys, "argv", ["qa_by_hops.py", str(run)]), \
      contextlib.redirect_stdout(buf):
    mod.main()
  out = buf.getvalue().splitlines()[2:]
  for line in out:
    cells = [c.strip() for c in line.strip("|").split("|")]
    h = int(cells[1])
    rows = hops == h
    assert int(cells[2]) == rows.sum()
    for m, cell in zip(mod.METRICS, cells[3:]):
      assert abs(float(cell) - metrics[m][rows].mean()) < 6e-4
  assert len(out) == len(set(expected))


def test_policy_report_reads_a_qa_run_with_its_own_config(tmp_path):
  """scripts/policy_report.py on a `configs/multihop_qa.py:tiny` run: the config comes
  from --config (it used to be configs/recsys.py whatever --config said, so a QA
  checkpoint did not match); its greedy validation hit@1 on the run's validation
  subset is the training loop's last one, and the sampled numbers are shares."""
  workdir = str(tmp_path / "run")
  proc = test_train._main(workdir, "--config.tensorboard=False",
                          config="configs/multihop_qa.py:tiny")
  assert proc.returncode == 0, proc.stderr[-3000:]
  val_examples = qa_config.get_config("tiny").eval.val_examples
  proc = subprocess.run([sys.executable, "scripts/policy_report.py",
                         "--config=configs/multihop_qa.py:tiny", f"--workdirs={workdir}",
                         f"--examples={val_examples}"], cwd=test_train.REPO,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"},
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    last_val = [r for r in map(json.loads, f) if "val_hit@1" in r][-1]
  assert report["stage"] == "rl"
  assert abs(report["greedy_hit@1"] - last_val["val_hit@1"]) < 1e-6
  for key in ("sampled_R_gen", "sampled_R_rank", "sampled_hit@1", "greedy_slate_recall"):
    assert 0.0 <= report[key] <= 1.0
