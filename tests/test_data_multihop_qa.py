"""Real multi-hop QA readers (fgrpo_jax/data/multihop_qa.py): HotpotQA, 2WikiMultihopQA and
MuSiQue fixture files in their published layouts, pools, word-level prompts, BM25, bad input,
and one training step on each."""

import json
import os

import numpy as np
import pytest

from configs import multihop_qa as qa_config
from fgrpo_jax import references
from fgrpo_jax.data import multihop_qa, tasks, text_prompts
from fgrpo_jax.errors import UserError
from test_data_recsys_real import one_training_step

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
         "november oscar papa quebec romeo sierra tango uniform victor whiskey xray").split()


def _sentence(rng, n=6):
  return " ".join(rng.choice(WORDS, n)).capitalize() + "."


def _hotpot_examples(n, seed, n_ctx=10, with_bad=True):
  rng = np.random.default_rng(seed)
  out = []
  for k in range(n):
    titles = [f"Title {seed}-{k}-{j}" for j in range(n_ctx)]
    ctx = [[t, [" " + _sentence(rng), " " + _sentence(rng)]] for t in titles]
    sup = [[titles[1], 0], [titles[4], 1]]
    if with_bad and k == 2:
      sup.append(["A title not in the context", 0])  # counted, the rest is kept
    if with_bad and k == 3:
      sup = [["Nowhere", 0]]  # no supporting passage at all: skipped and counted
    out.append({"_id": f"id{seed}-{k}", "question": f"Which {WORDS[k % 24]} links "
                f"{titles[1]} and {titles[4]}?", "answer": "x", "type": "bridge",
                "level": "hard", "supporting_facts": sup, "context": ctx})
  return out


def write_hotpot(d, n_train=14, n_dev=6, indent=None):
  with open(d / "hotpot_train_v1.1.json", "w") as f:
    json.dump(_hotpot_examples(n_train, 1), f, indent=indent)
  with open(d / "hotpot_dev_distractor_v1.json", "w") as f:
    json.dump(_hotpot_examples(n_dev, 2), f, indent=indent)
  return n_train - 1, n_dev - 1  # usable examples


def write_2wiki(d):
  for name, n, seed in (("train.json", 12, 3), ("dev.json", 5, 4)):
    exs = _hotpot_examples(n, seed)
    for e in exs:
      e["type"] = "compositional"
      e["evidences"] = [["a", "b", "c"]]
      e.pop("level")
    with open(d / name, "w") as f:
      json.dump(exs, f, indent=1)
  return 11, 4


def _musique_examples(n, seed):
  rng = np.random.default_rng(seed)
  out = []
  for k in range(n):
    hops = 2 + k % 3
    paras = [{"idx": j, "title": f"M{seed}-{k}-{j}", "paragraph_text": _sentence(rng, 12),
              "is_supporting": j < hops and k != 1} for j in range(20)]
    rng.shuffle(paras)
    out.append({"id": f"{hops}hop__{seed}_{k}", "paragraphs": paras,
                "question": f"What {WORDS[k]} of {WORDS[k + 1]}?",
                "question_decomposition": [], "answer": "x", "answer_aliases": [],
                "answerable": k != 1})
  return out


def write_musique(d):
  for name, n, seed in (("musique_ans_v1.0_train.jsonl", 12, 5),
                        ("musique_ans_v1.0_dev.jsonl", 5, 6)):
    with open(d / name, "w") as f:
      for e in _musique_examples(n, seed):
        f.write(json.dumps(e) + "\n")
  return 11, 4


FORMATS = {"hotpotqa": write_hotpot, "2wiki": write_2wiki, "musique": write_musique}


def make_config(name, path, cache_dir, **data):
  c = qa_config.get_config("tiny")
  c.data.name, c.data.path, c.data.cache_dir = name, str(path), str(cache_dir)
  c.data.update(question_len=8, passage_len=6, vocab_size=200, min_word_frequency=1,
                val_size=3)
  for k, v in data.items():
    c.data[k] = v
  return c


def _write(tmp_path, name, **kw):
  d = tmp_path / name
  d.mkdir(parents=True, exist_ok=True)
  return d, FORMATS[name](d, **kw)


@pytest.mark.parametrize("name", list(FORMATS))
def test_prepare_pools_prompts_and_training_step(tmp_path, name):
  d, (n_train, n_dev) = _write(tmp_path, name)
  logs = []
  p = multihop_qa.prepare(make_config(name, d, tmp_path / "cache"), log=logs.append)
  s = p.splits
  val = 3  # config.data.val_size
  assert s["validation"]["prompt"].shape[0] == val
  assert s["train"]["prompt"].shape[0] == n_train - val
  assert s["test"]["prompt"].shape[0] == n_dev
  counts = p.manifest["counts"]
  key = "train_file_skipped_no_supporting"
  assert counts[key] == 1 and counts["dev_file_skipped_no_supporting"] == 1
  if name != "musique":
    assert counts["train_file_supporting_titles_not_in_context"] == 2  # k=2 and k=3
    assert counts["train_pools_topped_up"] == n_train - val  # 10 passages -> 20
  tok = p.prompts.tokenizer
  assert "PreTrainedTokenizerFast" in type(tok).__name__ or hasattr(tok, "backend_tokenizer")
  assert p.prompts.vocab_size <= 200
  texts = p.texts(s["test"]["example_id"])
  for row, t in enumerate(texts):
    passages = t["passages"]
    assert len(passages) == 20 and len(set(passages)) == 20  # distinct, all filled
    rel = s["test"]["relevance"][row]
    assert rel.sum() >= 2 and set(np.unique(rel)) <= {0.0, 1.0}
    assert s["test"]["pool_mask"][row].all()
    prompt = s["test"]["prompt"][row][s["test"]["prompt_mask"][row]]
    assert prompt[0] == text_prompts.BOS and prompt[1] == 8  # <bos> [P1] passage-1 ...
    assert prompt[-1] == text_prompts.SLATE and text_prompts.Q in prompt[-40:]
    slots = prompt[(prompt >= 8) & (prompt < 28)]
    np.testing.assert_array_equal(slots, np.arange(8, 28))  # [P1] .. [P20] in order
  np.testing.assert_array_equal(s["test"]["cand_tokens"][0], np.arange(8, 28))
  # Supporting passages of the source are exactly the relevant slots.
  src = (json.load(open(d / "hotpot_dev_distractor_v1.json")) if name == "hotpotqa" else None)
  if src is not None:
    by_id = {e["_id"]: e for e in src}
    for row, t in enumerate(texts):
      sup = {x[0] for x in by_id[t["id"]]["supporting_facts"]} - {"A title not in the context"}
      got = {passages.split(" : ")[0] for passages, r in
             zip(t["passages"], s["test"]["relevance"][row]) if r > 0}
      assert got == sup
  assert "oracle_scores" not in s["test"]
  assert any("splits: train" in l for l in logs)
  task = tasks.load_task(make_config(name, d, tmp_path / "cache"), log=logs.append)
  assert any("reusing" in l for l in logs)
  assert task.name == "multihop_qa"
  assert set(task.reference_fns) == {"random", "popularity", "bm25"}
  supported = {}  # plain-Python popularity: times a passage text is supporting in training
  train = s["train"]
  for t, rel in zip(p.texts(train["example_id"]), train["relevance"]):
    for passage, r in zip(t["passages"], rel):
      supported[passage] = supported.get(passage, 0) + int(r > 0)
  np.testing.assert_array_equal(task.reference_fns["popularity"](task.splits["test"]),
                                [[supported.get(x, 0) for x in t["passages"]] for t in texts])
  bm25 = task.reference_fns["bm25"](task.splits["test"])
  assert bm25.shape == (n_dev, 20) and np.isfinite(bm25).all()
  text = task.describe(task.splits["test"], 0, np.arange(4), np.arange(2))
  assert "question:" in text and "[P1]" in text
  one_training_step(task)


def test_bm25_prefers_lexical_matches():
  q = ["who painted the mona lisa"]
  pools = [["the mona lisa was painted by leonardo", "bananas are yellow", None,
            "lisa is a name", "painting is an art"]]
  s = references.bm25_scores(q, pools)
  assert s.shape == (1, 5) and np.argmax(s[0]) == 0 and s[0, 2] == -np.inf
  assert s[0, 1] == 0 and s[0, 3] > 0


def test_vocabulary_cap_and_unknown_words(tmp_path):
  d, _ = _write(tmp_path, "hotpotqa")
  p = multihop_qa.prepare(make_config("hotpotqa", d, tmp_path / "cache", vocab_size=40),
                          log=lambda s: None)
  assert p.prompts.vocab_size == 40
  assert p.manifest["counts"]["test_unk_token_fraction"] > 0
  tok = text_prompts.load_tokenizer(os.path.join(p.dir, "tokenizer"))
  assert tok.convert_tokens_to_ids("[P20]") == 27 and tok.convert_tokens_to_ids("<q>") == 3


# ----------------------------------------------------------------------------
# Bad input.


def _fails(tmp_path, name, match, mutate=None, **data):
  d, _ = _write(tmp_path, name)
  if mutate:
    mutate(d)
  with pytest.raises(UserError) as e:
    multihop_qa.prepare(make_config(name, d, tmp_path / "cache", **data), log=lambda s: None)
  msg = str(e.value)
  assert match in msg, msg
  assert not (tmp_path / "cache").exists() or os.listdir(tmp_path / "cache") == []
  return msg


def test_missing_file(tmp_path):
  _fails(tmp_path, "hotpotqa", "hotpot_dev_distractor_v1.json: file not found",
         lambda d: os.remove(d / "hotpot_dev_distractor_v1.json"))
  _fails(tmp_path, "musique", "musique_ans_v1.0_train.jsonl: file not found",
         lambda d: os.remove(d / "musique_ans_v1.0_train.jsonl"))
  with pytest.raises(UserError, match="directory not found"):
    multihop_qa.prepare(make_config("2wiki", tmp_path / "nope", tmp_path / "c"))


def test_truncated_json_array(tmp_path):
  def cut(d):
    p = d / "train.json"
    text = p.read_text()
    p.write_text(text[: len(text) // 2])
  msg = _fails(tmp_path, "2wiki", "train.json:", cut)
  assert "truncated" in msg and "example #" in msg
  line = int(msg.split("train.json:")[1].split(":")[0])
  assert line > 1  # the line of the break in the pretty-printed file


def test_missing_field_names_file_and_line(tmp_path):
  def drop(d):
    exs = _hotpot_examples(5, 9)
    del exs[3]["supporting_facts"]
    with open(d / "hotpot_dev_distractor_v1.json", "w") as f:
      json.dump(exs, f, indent=1)
    text = (d / "hotpot_dev_distractor_v1.json").read_text()
    return text
  msg = _fails(tmp_path, "hotpotqa", "missing field 'supporting_facts'", drop)
  text = (tmp_path / "hotpotqa" / "hotpot_dev_distractor_v1.json").read_text()
  line = int(msg.split("hotpot_dev_distractor_v1.json:")[1].split(":")[0])
  assert '"_id": "id9-3"' in "\n".join(text.splitlines()[line - 1:line + 3])
  assert "example #3" in msg


def test_bad_json_line_and_skip(tmp_path):
  def bad(d):
    with open(d / "musique_ans_v1.0_dev.jsonl", "a") as f:
      f.write('{"id": "x", "paragraphs": [{"title": "a"')
  _fails(tmp_path, "musique", "musique_ans_v1.0_dev.jsonl:6: invalid JSON", bad)
  logs = []
  p = multihop_qa.prepare(make_config("musique", tmp_path / "musique", tmp_path / "cache",
                                      skip_bad_lines=True), log=logs.append)
  assert p.manifest["counts"]["malformed_skipped"] == 1
  assert any("skipped 1 malformed" in l for l in logs)
  _fails(tmp_path / "x", "musique", "paragraph 0 has no 'paragraph_text'", lambda d: (
      (d / "musique_ans_v1.0_dev.jsonl").write_text(json.dumps(
          {"id": "q", "question": "?", "paragraphs": [{"title": "t"}]}) + "\n")))


def test_prompt_longer_than_max_is_a_config_error(tmp_path):
  d, _ = _write(tmp_path, "hotpotqa")
  with pytest.raises(UserError, match="config.data.max_prompt_len=100"):
    multihop_qa.prepare(make_config("hotpotqa", d, tmp_path / "c", max_prompt_len=100))
