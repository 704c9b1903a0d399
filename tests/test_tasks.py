"""fgrpo_jax/data/tasks.py: the chat-prompt form of every task, end to end.

A tiny tokenizer with a chat template (data/tiny_tokenizer.py) stands in for a Hugging
Face checkpoint's: the recommendation and QA tasks are rendered as text, the pools
listed under one-token identifiers, and a run trains and evaluates on them."""

import json

import numpy as np
import pytest

from configs import multihop_qa as qa_config
from configs import recsys as recsys_config
from fgrpo_jax import train
from fgrpo_jax.data import tasks, tiny_tokenizer
from fgrpo_jax.errors import UserError


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  return tiny_tokenizer.make_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


def _chat(config, tokenizer_dir, max_len):
  config.prompt.update(format="chat", tokenizer=tokenizer_dir, max_len=max_len,
                       system="Select and rank.")
  return config


def test_recsys_chat_prompts_list_the_history_and_the_pool(tokenizer_dir):
  c = _chat(recsys_config.get_config("tiny"), tokenizer_dir, 384)
  ids = tasks.load_task(recsys_config.get_config("tiny"))
  chat = tasks.load_task(c)
  assert chat.info["prompt"] == "chat" and chat.vocab_size < 1000
  test, ref = chat.splits["test"], ids.splits["test"]
  np.testing.assert_array_equal(test["relevance"], ref["relevance"])  # same examples
  from fgrpo_jax.data import text_prompts
  tok = text_prompts.load_tokenizer(tokenizer_dir)
  for row in range(3):
    text = tok.decode(test["prompt"][row][test["prompt_mask"][row]].tolist())
    assert "<|im_start|>user" in text and text.endswith("<slate>")
    # every pool item is listed under its identifier, in pool order
    cands = [tok.decode([int(t)]) for t in test["cand_tokens"][row]]
    assert cands == [" A", " B", " C", " D", " E", " F", " G", " H"]
    for slot, item in enumerate(ref["pool"][row]):
      assert f"-{cands[slot]}: item_{item} " in text
    hist = [f"item_{i} " for i in ref["history"][row] if i >= 0]
    assert all(h in text for h in hist)
  layout = chat.layout_fn(c.rollout.slate_size, c.rollout.rank_size)
  assert tok.decode(list(layout.mid_tags)) == "</slate><rank>"


@pytest.mark.parametrize("constrained", [False])  # constrained: tests/test_llm_configs.py
def test_chat_run_trains_and_writes_eval_json(tmp_path, tokenizer_dir, constrained):
  c = _chat(recsys_config.get_config("tiny"), tokenizer_dir, 384)
  c.sft.update(steps=2, batch_size=8)
  c.rl.update(steps=1, batch_prompts=4)
  c.rollout.constrained = constrained
  c.eval.update(test_examples=8, batch_size=8, val_examples=8)
  result = train.run(c, str(tmp_path), log=lambda s: None)
  saved = json.load(open(tmp_path / "eval.json"))
  assert saved["metrics"] == result["metrics"] and saved["steps"] == 3
  assert 0.0 <= saved["metrics"]["hit@1"] <= 1.0


def test_qa_chat_prompts_cut_long_passages_to_fit(tmp_path, tokenizer_dir):
  c = _chat(qa_config.get_config("tiny"), tokenizer_dir, 200)
  c.data.cache_dir = str(tmp_path)
  task = tasks.load_task(c)
  test = task.splits["test"]
  assert test["prompt"].shape[1] == 200 and test["prompt_mask"].sum(1).max() > 150
  assert task.info["test_prompts_cut"] > 0  # 20 passages do not fit 200 tokens whole
  assert test["pool_mask"].all() and set(np.unique(test["relevance"])) <= {0.0, 1.0}


def test_chat_needs_a_tokenizer():
  c = recsys_config.get_config("tiny")
  c.prompt.format = "chat"
  with pytest.raises(UserError, match="config.prompt.tokenizer"):
    tasks.load_task(c)
  c.prompt.tokenizer = "/nonexistent/tok"
  with pytest.raises(UserError, match="/nonexistent/tok"):
    tasks.load_task(c)


def test_prompt_builders_implement_the_protocol_and_share_the_tags(tmp_path, tokenizer_dir):
  from fgrpo_jax.data import chat_prompts, prompts, text_prompts
  text_prompts.build_tokenizer(["the mother of kodamu is lipa ."], str(tmp_path), pool_size=4,
                               vocab_size=40)
  builders = [prompts.ItemTokenPrompts(num_items=10),
              text_prompts.QAPrompts(text_prompts.load_tokenizer(str(tmp_path)), 4, 8, 8),
              chat_prompts.ChatPrompts(text_prompts.load_tokenizer(tokenizer_dir), slate_size=2,
                                       rank_size=1, max_len=400, pool_size=4)]
  for builder in builders:
    assert isinstance(builder, prompts.PromptBuilder), type(builder).__name__
    layout = builder.layout(2, 1)  # the chat tags are several text tokens each
    assert builder.vocab_size > 0 and (layout.slate_size, layout.rank_size) == (2, 1)
  contexts = {0: np.array([[1, 2]]), 1: ["who is the mother of kodamu ?"], 2: ["history"]}
  pools = {0: np.array([[3, 4, 5, 6]]), 1: [["the mother", "of", "kodamu", "is lipa"]],
           2: [["a", "b", "c", "d"]]}
  for i, builder in enumerate(builders):
    built = builder.build(contexts[i], pools[i])
    assert built["cand_tokens"].shape == built["pool_mask"].shape == (1, 4)
    assert built["prompt"].shape == built["prompt_mask"].shape
  # One set of tags: the item and word vocabularies put them at the same ids.
  item, word = prompts.SPECIAL_TOKENS, text_prompts.SPECIAL_TOKENS
  assert [item[i] for i in (0, 1, 4, 5, 6, 7)] == [word[i] for i in (0, 1, 4, 5, 6, 7)]
  assert builders[0].layout(3, 2) == builders[1].layout(3, 2)
