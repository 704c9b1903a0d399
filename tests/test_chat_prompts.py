"""Tests for chat-template text prompts (fgrpo_jax/data/chat_prompts.py, the tiny
tokenizer) and for free decoding on them: the same prompts in constrained and free
mode, teacher-forced log-probs, format penalties and one free-mode RL step."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import AutoTokenizer

from configs import recsys
from fgrpo_jax import config as config_lib
from fgrpo_jax import evaluate as eval_lib
from fgrpo_jax import objectives
from fgrpo_jax import parse
from fgrpo_jax import rewards as R
from fgrpo_jax import rollout
from fgrpo_jax import steps as steps_lib
from fgrpo_jax.data import chat_prompts
from fgrpo_jax.data.tiny_tokenizer import make_tiny_tokenizer
from fgrpo_jax.errors import UserError
from fgrpo_jax.models import llama

K, M, C, P = 3, 2, 6, 112
HISTORY = ["the user watched dark star and the lost king",
           "the user liked jazz night and red river"]
TITLES = [["winter road", "blue sea", "old song", "secret garden", "the first war", "new city"],
          ["great love", "little queen", "green home", "summer story", "rock album"]]
QUESTION = ["who wrote the book about the red king"]
PASSAGES = [["the red king is a book", "it was written by a great queen of the sea " * 6,
             "the king won the war"]]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  return make_tiny_tokenizer(str(tmp_path_factory.mktemp("tiny_tok")))


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
  return AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)


@pytest.fixture(scope="module")
def prompts(tokenizer, tok_dir):
  return chat_prompts.ChatPrompts(tokenizer, slate_size=K, rank_size=M, max_len=P, pool_size=C,
                                  system="Pick.", context_label="History", source=tok_dir)


@pytest.fixture(scope="module")
def batch(prompts):
  arrays = prompts.build(HISTORY, TITLES)
  return {k: jnp.asarray(arrays[k]) for k in ("prompt", "prompt_mask", "cand_tokens",
                                              "pool_mask")}


@pytest.fixture(scope="module")
def model(tokenizer):
  cfg = llama.ModelConfig(vocab_size=len(tokenizer), num_layers=1, hidden=32, num_heads=2,
                          num_kv_heads=1, head_dim=16, mlp_hidden=64)
  params = llama.init_params(cfg, jax.random.key(0))
  return cfg, jax.tree.map(lambda p: p * 4.0 if p.ndim > 1 else p, params)  # peakier


def _ids(tokenizer, text):
  return tokenizer(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------
# Tokenizer and builder.


def test_tiny_tokenizer_loads_with_its_chat_template(tokenizer):
  text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                       add_generation_prompt=True)
  assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
  assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
  for name in "AZaz":
    assert len(_ids(tokenizer, " " + name)) == 1
  assert len(_ids(tokenizer, "<|im_start|>")) == 1
  assert len(_ids(tokenizer, chat_prompts.MID_TAGS)) > 1  # a known multi-token split
  assert tokenizer.decode(_ids(tokenizer, text)) == text


def test_build_left_pads_the_rendered_template(prompts, tokenizer):
  arrays = prompts.build(HISTORY, TITLES)
  assert arrays["prompt"].shape == (2, P) and arrays["prompt"].dtype == np.int32
  assert arrays["cand_tokens"].shape == (2, C) and arrays["cand_tokens"].dtype == np.int32
  assert arrays["pool_mask"].tolist() == [[True] * 6, [True] * 5 + [False]]
  assert not arrays["truncated"].any()
  for i in range(2):
    mask = arrays["prompt_mask"][i]
    n = mask.sum()
    assert not mask[:P - n].any() and mask[P - n:].all()  # left padding
    assert (arrays["prompt"][i, :P - n] == tokenizer.pad_token_id).all()
    text = prompts.decode(arrays["prompt"][i][mask])
    assert text == prompts.render(HISTORY[i], TITLES[i])
    assert text.startswith("<|im_start|>system\nPick.<|im_end|>\n<|im_start|>user\nHistory:\n")
    assert text.endswith("- F: new city<|im_end|>\n<|im_start|>assistant\n<slate>"
                         if i == 0 else "- E: rock album<|im_end|>\n<|im_start|>assistant\n<slate>")
  # Each slot's identifier token is " A", " B", ... and also names it in the listing.
  letters = [_ids(tokenizer, " " + x)[0] for x in "ABCDEF"]
  assert arrays["cand_tokens"][0].tolist() == letters
  assert letters[3] in arrays["prompt"][0].tolist()


def test_same_builder_serves_question_answering(tokenizer, tok_dir):
  qa = chat_prompts.ChatPrompts(tokenizer, slate_size=2, rank_size=1, max_len=120, pool_size=3,
                                system=None, context_label="Question", source=tok_dir)
  arrays = qa.build(QUESTION, PASSAGES)
  text = qa.decode(arrays["prompt"][0][arrays["prompt_mask"][0]])
  assert text.startswith("<|im_start|>user\nQuestion:\nwho wrote the book about the red king")
  assert "- A: the red king is a book\n" in text and "- C: the king won the war" in text
  # The long passage was cut so that the prompt fits; the others are whole.
  assert arrays["truncated"][0] and arrays["prompt_mask"][0].sum() <= 120
  assert "- B: it was written by a great queen" in text
  assert text.count("great queen") < 6


def test_prompt_too_long_and_bad_identifiers_are_one_clear_error(tokenizer, tok_dir):
  tight = chat_prompts.ChatPrompts(tokenizer, slate_size=2, rank_size=1, max_len=40,
                                   pool_size=3, system=None, source=tok_dir)
  with pytest.raises(UserError, match=r"example 0: .*config\.prompt\.max_len=40"):
    tight.build(["the user watched " * 10], [["a", "b", "c"]])
  with pytest.raises(UserError) as err:
    chat_prompts.ChatPrompts(tokenizer, slate_size=2, rank_size=1, max_len=60,
                             identifiers=["A", "[12]", "B"], source=tok_dir)
  message = str(err.value)
  assert "identifier '[12]'" in message and tok_dir in message and "\n" not in message
  with pytest.raises(UserError, match="config.prompt.identifiers"):
    chat_prompts.parse_identifiers("A,,B")
  assert chat_prompts.parse_identifiers("x, y") == ("x", "y")
  assert chat_prompts.parse_identifiers("letters")[:3] == ("A", "B", "C")


def _reference_prompt_ids(tokenizer, system, label, context, cands, max_len):
  """The prompt of one example by the definition, one tokenizer call at a time: the
  template applied to the message, and when too long the largest common budget b of
  candidate tokens (scanning b = 0, 1, ...) whose prompt fits."""
  def render(texts):
    pool = "\n".join(f"- {n}: {c}" for n, c in zip("ABCDEFGH", texts))
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": f"{label}:\n{context}\n\nCandidates:\n{pool}"}]
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=True) + "<slate>"
  whole = _ids(tokenizer, render(cands))
  if len(whole) <= max_len:
    return whole, False
  pieces = [_ids(tokenizer, c) for c in cands]
  cut = lambda p, b: tokenizer.decode(p[:b]).replace("\ufffd", "").strip()
  best = None
  for b in range(max(len(p) for p in pieces) + 1):
    trial = _ids(tokenizer, render([cut(p, b) for p in pieces]))
    if len(trial) > max_len:
      break
    best = trial
  return best, True


@pytest.mark.parametrize("template", ["verbatim", "trims"])
def test_build_matches_the_one_example_at_a_time_definition(tokenizer, tok_dir, template):
  """build() renders by concatenation when the template copies the message verbatim,
  tokenizes all prompts in one call and runs the cut searches in lockstep; on a mix of
  prompts that fit and prompts cut to different budgets it must give exactly the
  prompts of the plain definition, also for a template that rewrites the message."""
  tok = tokenizer
  if template == "trims":  # a template that changes the content: no concatenation
    tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    tok.chat_template = tok.chat_template.replace("message['content']",
                                                  "message['content'] | trim")
  rng = np.random.default_rng(0)
  words = "the red king sea song queen war great love city road blue old home".split()
  contexts, cands = [], []
  for i in range(12):
    contexts.append(" ".join(rng.choice(words, 3 + i % 4)))
    cands.append([" ".join(rng.choice(words, int(rng.integers(1, 3 + 3 * (i % 3)))))
                  for _ in range(4 + i % 2)])
  max_len = 100
  builder = chat_prompts.ChatPrompts(tok, slate_size=2, rank_size=1, max_len=max_len,
                                     pool_size=5, system="Pick.", context_label="History",
                                     source=tok_dir)
  assert (builder._frame is not None) == (template == "verbatim")
  arrays = builder.build(contexts, cands)
  expected = [_reference_prompt_ids(tok, "Pick.", "History", c, p, max_len)
              for c, p in zip(contexts, cands)]
  cut = [e[1] for e in expected]
  assert 0 < sum(cut) < len(cut)  # the mix this test is about
  assert arrays["truncated"].tolist() == cut
  for i, (ids, _) in enumerate(expected):
    assert arrays["prompt"][i][arrays["prompt_mask"][i]].tolist() == ids, i


def test_eval_mode_renders_no_training_prompts(tok_dir):
  from fgrpo_jax.data import tasks
  config = recsys.get_config("tiny")
  config.prompt.update(format="chat", tokenizer=tok_dir, max_len=512)
  config.mode = "eval"
  task = tasks.load_task(config, None, log=lambda *_: None)
  assert set(task.splits) == {"validation", "test"}
  config.mode = "train"
  assert set(tasks.load_task(config, None, log=lambda *_: None).splits) == set(tasks.SPLITS)


def test_layout_uses_the_tokenizers_tag_splits(prompts, tokenizer):
  head = _ids(tokenizer, "<slate> A")
  assert prompts.mid_tags == tuple(_ids(tokenizer, "<slate> A</slate><rank>")[len(head):])
  assert prompts.end_tags == tuple(_ids(tokenizer, " A</rank>")[1:])
  constrained, free = prompts.layout(), prompts.layout(constrained=False)
  assert constrained.constrained and constrained.length == K + M + len(prompts.mid_tags) + len(
      prompts.end_tags)
  assert not free.constrained and free.length == 2 * constrained.length
  assert tokenizer.convert_tokens_to_ids("<|im_end|>") in free.stop_tokens
  assert free.pad_token == tokenizer.pad_token_id


# ----------------------------------------------------------------------------
# Constrained and free decoding on the same prompts.


def test_constrained_rollout_parses_back_to_its_slate_and_ranking(prompts, batch, model):
  cfg, params = model
  constrained, free = prompts.layout(), prompts.layout(constrained=False)
  ro = rollout.sample(params, batch, jax.random.key(1), cfg=cfg, layout=constrained,
                      group_size=4)
  parsed = rollout.parse_tokens(ro.tokens, batch, free)
  np.testing.assert_array_equal(parsed.slate, ro.slate)
  np.testing.assert_array_equal(parsed.ranking, ro.ranking)
  np.testing.assert_array_equal(parsed.phase_ids, ro.phase_ids)
  assert np.all(np.asarray(parse.validity(parsed.errors)) == 1)
  text = prompts.decode(ro.tokens[1, 2])
  assert re.fullmatch(r"( [A-F]){3}</slate><rank>( [A-F]){2}</rank>", text), text
  assert "F" not in text  # slot F is padding in the second pool


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_free_sampler_logprobs_equal_teacher_forced(prompts, batch, model, temperature):
  cfg, params = model
  free = prompts.layout(constrained=False)
  ro = rollout.sample(params, batch, jax.random.key(2), cfg=cfg, layout=free, group_size=4,
                      temperature=temperature)
  assert ro.tokens.shape == (2, 4, free.max_new_tokens)
  lp, ent = jax.jit(functools.partial(rollout.rollout_logprobs, cfg=cfg, layout=free,
                                     temperature=temperature))(params, batch, ro)
  np.testing.assert_allclose(lp, ro.logprobs, atol=1e-5, rtol=1e-5)
  live = np.asarray(ro.phase_ids) != R.PHASE_NONE
  assert live[..., 0].all() and np.all(np.asarray(ent)[live] > 0)
  assert np.all(np.asarray(ro.logprobs)[~live] == 0)
  # Random weights write garbage: every rollout is malformed and says so.
  assert np.all(np.asarray(parse.validity(ro.errors)) == 0)


def test_free_layout_scores_gold_sequences_over_the_full_vocabulary(prompts, batch, model):
  """SFT in free mode: every gold token, tags included, gets its full-vocab log-prob."""
  cfg, params = model
  free = prompts.layout(constrained=False)
  choices = rollout.choices_from_slate_ranking(jnp.array([[[0, 2, 4]], [[1, 3, 0]]]),
                                               jnp.array([[[4, 0]], [[3, 1]]]), free)
  lp, _ = rollout.sequence_logprobs(params, batch, choices, cfg=cfg, layout=free)
  tokens = rollout.tokens_from_choices(choices, batch["cand_tokens"], free)
  full, _ = rollout.free_logprobs(params, batch, tokens, jnp.ones(tokens.shape, bool), cfg=cfg)
  np.testing.assert_allclose(lp, full, atol=1e-6)
  assert np.all(np.asarray(lp) < 0)


def test_free_rollout_stops_at_eos_and_pads(prompts, batch, model, tokenizer):
  cfg, params = model
  eos = tokenizer.eos_token_id
  # A constant embedding direction read out as EOS: every step's argmax is EOS.
  params = dict(params, embed=params["embed"].at[:, 0].set(10.0),
                lm_head=params["lm_head"].at[0, eos].set(100.0))
  free = prompts.layout(constrained=False)
  ro = rollout.sample(params, batch, jax.random.key(3), cfg=cfg, layout=free, group_size=2)
  tokens, phases = np.asarray(ro.tokens), np.asarray(ro.phase_ids)
  assert np.all(tokens[..., 0] == eos) and np.all(tokens[..., 1:] == free.pad_token)
  assert np.all(phases[..., 0] == R.PHASE_GEN) and np.all(phases[..., 1:] == R.PHASE_NONE)
  assert np.all(np.asarray(ro.logprobs)[..., 1:] == 0)
  assert np.all(np.asarray(ro.errors["slate_tag_missing"]))
  assert np.all(np.asarray(ro.slate) == -1)


def _text_rollout(prompts, batch, texts):
  """A Rollout of hand-written completions (G = len(texts)), padded with EOS."""
  free = prompts.layout(constrained=False)
  rows = [_ids(prompts.tokenizer, t)[:free.length] for t in texts]
  rows = [r + [free.pad_token] * (free.length - len(r)) for r in rows]
  tokens = jnp.broadcast_to(jnp.asarray(rows, jnp.int32), (2, len(texts), free.length))
  p = rollout.parse_tokens(tokens, batch, free)
  return rollout.Rollout(tokens=tokens, choices=p.choices, phase_ids=p.phase_ids,
                         logprobs=jnp.zeros(tokens.shape), slate=p.slate, ranking=p.ranking,
                         errors=p.errors)


def test_format_penalty_is_charged_to_the_malformed_phase(prompts, batch):
  texts = [" A C B</slate><rank> C A</rank>",   # well formed
           " A A B</slate><rank> A B</rank>",   # duplicate in the slate
           " A C B</slate><rank> D A</rank>",   # ranks D, not in the slate
           " A C B C A</rank>",                 # no mid tags
           " A C B</slate><rank> C A"]          # no end tags (EOS padding)
  ro = _text_rollout(prompts, batch, texts)
  assert np.asarray(ro.slate[0, 0]).tolist() == [0, 2, 1]
  assert np.asarray(ro.ranking[0, 0]).tolist() == [2, 0]
  relevance = jnp.zeros((2, C)).at[:, 0].set(1.0)
  settings = steps_lib.RLSettings(algorithm="fgrpo", group_size=5, temperature=1.0,
                              coverage="recall", rank_metric="ndcg", gain="exp", lam=1.0,
                              advantage="mean", inner_steps=1,
                              loss=objectives.PolicyLossConfig(), format_penalty=0.5)
  r_gen, r_rank, rank_ok = (np.asarray(x)[0]
                            for x in steps_lib.rollout_rewards(ro, relevance, settings, M))
  assert rank_ok.all()  # reward.rank_ideal="pool": R_rank is defined for every rollout
  base_gen, base_rank = (np.asarray(x)[0] for x in R.phase_rewards(
      ro.slate, ro.ranking, relevance[:, None], rank_k=M))
  np.testing.assert_allclose(r_gen - base_gen, [0, -0.5, 0, -0.5, 0])
  np.testing.assert_allclose(r_rank - base_rank, [0, 0, -0.5, -0.5, -0.5])


# ----------------------------------------------------------------------------
# Training in free mode, and the config.


def test_rl_step_runs_in_free_mode(prompts, batch, model):
  cfg, params = model
  config = recsys.get_config("tiny")
  config.rollout.update(slate_size=K, rank_size=M, group_size=4, constrained=False)
  config.rl.inner_steps = 1
  config.data.pool_size = C
  config_lib.validate_config(config)
  task = type("Task", (), {"layout_fn": prompts.layout})()
  layout = config_lib.make_layout(task, config)
  assert not layout.constrained and layout.max_new_tokens == 2 * layout.schedule_length
  optimizer = steps_lib.make_optimizer(config.optim, 1e-3, 1)  # no warmup: step 0 moves
  before = jax.tree.map(jnp.copy, params)  # rl_step donates its state: keep the fixture's
  state = steps_lib.TrainState(before, optimizer.init(params), jnp.zeros((), jnp.int32))
  full = dict(batch, relevance=jnp.zeros((2, C)).at[:, 1].set(1.0))
  before = params
  state, metrics = steps_lib.rl_step(state, None, full, jax.random.key(4), cfg=cfg, layout=layout,
                                 optimizer=optimizer,
                                 settings=steps_lib.RLSettings.from_config(config))
  metrics = {k: float(v) for k, v in metrics.items()}
  assert all(np.isfinite(v) for v in metrics.values()), metrics
  assert metrics["format_valid"] == 0.0  # random weights never close the tags
  assert metrics["reward_gen_mean"] <= 0.0 and metrics["grad_norm"] > 0
  assert int(state.step) == 1
  assert not np.allclose(state.params["lm_head"], before["lm_head"])


@pytest.mark.parametrize("overrides,field", [
    ({"rollout.constrained": False, "algorithm": "decoupled"}, "config.rollout.constrained"),
    ({"rollout.max_new_tokens": -1}, "config.rollout.max_new_tokens"),
    ({"reward.format_penalty": -0.5}, "config.reward.format_penalty"),
])
def test_free_decoding_config_errors_name_the_field(overrides, field):
  config = recsys.get_config("tiny")
  for dotted, value in overrides.items():
    section, _, name = dotted.rpartition(".")
    (config[section] if section else config)[name] = value
  with pytest.raises(config_lib.ConfigError, match=re.escape(field)):
    config_lib.validate_config(config)


def test_make_layout_rejects_a_budget_below_a_well_formed_rollout(prompts):
  config = recsys.get_config("tiny")
  config.rollout.update(slate_size=K, rank_size=M, constrained=False, max_new_tokens=5)
  task = type("Task", (), {"layout_fn": prompts.layout})()
  with pytest.raises(config_lib.ConfigError, match="config.rollout.max_new_tokens=5"):
    config_lib.make_layout(task, config)
  config.rollout.constrained = True
  assert config_lib.make_layout(task, config).constrained


def test_evaluation_counts_missing_tags_as_malformed(prompts, batch, model):
  """evaluate_model's format_valid uses the parser's errors in free decoding: random
  weights never write the tags, so no rollout is well formed; constrained ones always are."""
  cfg, params = model
  arrays = {k: np.asarray(v) for k, v in batch.items()}
  arrays["relevance"] = np.zeros(arrays["pool_mask"].shape, np.float32)
  arrays["relevance"][:, 1] = 1.0
  n = arrays["prompt"].shape[0]
  free = prompts.layout(K, M, constrained=False)
  metrics = eval_lib.evaluate_model(params, arrays, cfg=cfg, layout=free, batch_size=n)
  assert metrics["format_valid"] == 0.0
  constrained = prompts.layout(K, M)
  metrics = eval_lib.evaluate_model(params, arrays, cfg=cfg, layout=constrained, batch_size=n)
  assert metrics["format_valid"] == 1.0
