"""Tasks: a dataset, its prompt builder and its reference scorers, behind one door.

`load_task(config)` is the only place that knows which datasets exist. A Task
holds, for each split, the model-ready numpy arrays (prompt, prompt_mask,
cand_tokens, pool_mask, relevance and, where the generator is known,
oracle_scores), so the train loop, the evaluation and the comparison never look at
raw data.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import numpy as np

from fgrpo_jax.data import prompts as prompts_lib
from fgrpo_jax.data.arrays import SPLITS
from fgrpo_jax.errors import UserError


@dataclasses.dataclass
class Task:
  """A dataset ready for the model.

  name: task family ("recsys" or "multihop_qa"); dataset: config.data.name;
  splits: split -> dict of numpy arrays with a leading example axis N:
    prompt int32 [N, P], prompt_mask bool [N, P], cand_tokens int32 [N, C],
    pool_mask bool [N, C], relevance float32 [N, C], optional oracle_scores [N, C]
    and item ids `pool` [N, C] / `history` [N, H] for readable printing.
  vocab_size: tokens the model must embed; layout_fn(k, m) -> rollout.Layout;
  reference_fns: name -> fn(split arrays) -> scores [N, C] (higher = better);
  describe: fn(split arrays, row, slate, ranking) -> readable text of one rollout.
  stream: for prepared (cached) datasets, fn(split, batch_size, *, seed, shard_index,
    shard_count) -> a grain iterator of this host's batches of model arrays, with
    get_state / set_state (config.data.loader="grain"); None for generated data.
  texts: fn(split arrays) -> (contexts [N], candidate texts [N][C]), the examples as
    text for chat prompts (a history of item names / a question; item names / passages).
  """

  name: str
  dataset: str
  splits: dict[str, dict[str, np.ndarray]]
  vocab_size: int
  layout_fn: Callable[[int, int], Any]
  reference_fns: dict[str, Callable[[dict], np.ndarray]]
  describe: Callable[..., str]
  info: dict = dataclasses.field(default_factory=dict)
  stream: Callable[..., Any] | None = None
  texts: Callable[[dict], tuple[list[str], list[list[str]]]] | None = None

  @property
  def pool_size(self) -> int:
    return self.splits["test"]["cand_tokens"].shape[1]

  @property
  def has_oracle(self) -> bool:
    return "oracle_scores" in self.splits["test"]


def _item_prompt_arrays(builder: prompts_lib.ItemTokenPrompts, rows) -> dict:
  """Item-token model arrays of rows with history [N, H], pool [N, C], relevance [N, C]."""
  arrays = builder.build(rows["history"], rows["pool"])
  arrays["relevance"] = np.asarray(rows["relevance"], np.float32)
  return arrays


def _recsys_split_arrays(examples, builder: prompts_lib.ItemTokenPrompts) -> dict:
  arrays = _item_prompt_arrays(builder, {"history": examples.history, "pool": examples.pool,
                                         "relevance": examples.relevance})
  arrays["pool"] = np.asarray(examples.pool, np.int32)
  arrays["history"] = np.asarray(examples.history, np.int32)
  if examples.oracle_scores is not None:
    arrays["oracle_scores"] = np.asarray(examples.oracle_scores, np.float32)
  return arrays


def _streamer(cache_dir: str, transform):
  """Task.stream over a prepared cache: grain batches mapped to model arrays."""
  from fgrpo_jax.data import pipeline

  def stream(split, batch_size, *, seed, shard_index, shard_count):
    return pipeline.make_batch_iterator(cache_dir, split, batch_size, seed=seed,
                                        shard_index=shard_index, shard_count=shard_count,
                                        transform=transform)
  return stream


def recsys_task(dataset, name: str, cache_dir: str | None = None) -> Task:
  """Wraps a RecsysDataset (synthetic or prepared real data) into a Task."""
  builder = prompts_lib.ItemTokenPrompts(num_items=dataset.num_items)
  splits = {s: _recsys_split_arrays(getattr(dataset, s), builder) for s in SPLITS}
  popularity = np.asarray(dataset.item_popularity, np.float64)
  names = list(dataset.item_names)
  references = {
      "random": lambda a: np.zeros(a["pool"].shape),
      "popularity": lambda a: popularity[a["pool"]],
  }

  def describe(arrays, row, slate, ranking, rewards_text=""):
    pool = arrays["pool"][row]
    rel = arrays["relevance"][row]
    hist = [names[i] for i in arrays["history"][row] if i >= 0]
    mark = lambda c: f"{names[pool[c]]}{'*' if rel[c] > 0 else ''}"
    lines = [f"history : {' '.join(hist)}",
             f"pool    : {' '.join(mark(c) for c in range(len(pool)))}   (* relevant)",
             f"slate   : {' '.join(mark(c) for c in slate if c >= 0)}",
             f"ranking : {' '.join(mark(c) for c in ranking if c >= 0)}"]
    if rewards_text:
      lines.append(f"rewards : {rewards_text}")
    return "\n".join(lines)

  def texts(arrays):
    contexts = ["\n".join(names[i] for i in row if i >= 0) for row in arrays["history"]]
    return contexts, [[names[i] for i in row] for row in arrays["pool"]]

  info = {"num_items": dataset.num_items}
  info.update({f"{s}_examples": len(getattr(dataset, s)) for s in SPLITS})
  return Task(name="recsys", dataset=name, splits=splits, vocab_size=builder.vocab_size,
              layout_fn=builder.layout, reference_fns=references, describe=describe,
              info=info, texts=texts,
              stream=(_streamer(cache_dir, functools.partial(_item_prompt_arrays, builder))
                      if cache_dir else None))


def qa_task(prepared, name: str) -> Task:
  """Wraps a prepared passage-pool QA dataset (data.qa.PreparedQA) into a Task.

  Prompts are word-level text (text_prompts); references: random, popularity
  (passages that were supporting most often in training), bm25 (over the passage
  texts, the question as the query) and, for the synthetic task, the oracle via
  oracle_scores.
  """
  from fgrpo_jax import references as refs_lib

  builder = prepared.prompts

  def bm25(arrays):
    texts = prepared.texts(arrays["example_id"])
    return refs_lib.bm25_scores([t["question"] for t in texts],
                                [t["passages"] for t in texts])

  def describe(arrays, row, slate, ranking, rewards_text=""):
    (text,) = prepared.texts(arrays["example_id"][row:row + 1])
    rel = arrays["relevance"][row]
    passages = text["passages"]
    short = lambda c: " ".join((passages[c] or "").split()[:12])
    mark = lambda c: f"[P{c + 1}]{'*' if rel[c] > 0 else ''}"
    lines = [f"question: {text['question']}"]
    lines += [f"  {mark(c):<6s} {short(c)}" for c in range(len(passages))
              if passages[c] is not None]
    lines += [f"slate   : {' '.join(mark(c) for c in slate if c >= 0)}   (* supporting)",
              f"ranking : {' '.join(mark(c) for c in ranking if c >= 0)}"]
    if rewards_text:
      lines.append(f"rewards : {rewards_text}")
    return "\n".join(lines)

  support_counts: dict[str, int] = {}

  def popularity(arrays):
    # How often each passage text is a supporting passage in the training split; the
    # QA analogue of item popularity (near random when facts are not reused).
    if not support_counts:
      train = prepared.splits["train"]
      support_counts[""] = 0
      for text, rel in zip(prepared.texts(train["example_id"]), train["relevance"]):
        for p, r in zip(text["passages"], rel):
          if p is not None and r > 0:
            support_counts[p] = support_counts.get(p, 0) + 1
    texts = prepared.texts(arrays["example_id"])
    return np.array([[support_counts.get(p, 0) if p is not None else -np.inf
                      for p in t["passages"]] for t in texts], np.float64)

  references = {"random": lambda a: np.zeros(a["pool_mask"].shape),
                "popularity": popularity, "bm25": bm25}
  info = {"vocab_size": builder.vocab_size, "prompt_len": builder.prompt_len,
          "cache_dir": prepared.dir}
  info.update({f"{s}_examples": int(prepared.splits[s]["prompt"].shape[0]) for s in SPLITS})
  def qa_texts(arrays):
    records = prepared.texts(arrays["example_id"])
    return ([t["question"] for t in records],
            [[p if p is not None else "" for p in t["passages"]] for t in records])

  return Task(name="multihop_qa", dataset=name, splits=prepared.splits,
              vocab_size=builder.vocab_size, layout_fn=builder.layout,
              reference_fns=references, describe=describe, info=info,
              stream=_streamer(prepared.dir, builder.model_arrays), texts=qa_texts)


def chat_task(task: Task, prompts: prompts_lib.PromptBuilder, splits=SPLITS) -> Task:
  """The same task with chat-template text prompts (data/chat_prompts.ChatPrompts).

  The prompt, prompt_mask and cand_tokens of each split in `splits` are rebuilt from
  the examples' texts (the other splits are dropped: an evaluation renders no training
  prompts); relevance, pools and references are unchanged, and the vocabulary and the
  layout become the tokenizer's. Streaming (config.data.loader=grain) is not offered:
  prompts are built in memory.
  """
  if task.texts is None:
    raise UserError(f"{task.dataset} has no text form for chat prompts")
  rendered = {}
  for split, arrays in task.splits.items():
    if split not in splits:
      continue
    contexts, candidates = task.texts(arrays)
    built = prompts.build(contexts, candidates, pool_size=task.pool_size)
    out = dict(arrays)
    out.update(prompt=built["prompt"], prompt_mask=built["prompt_mask"],
               cand_tokens=built["cand_tokens"], pool_mask=built["pool_mask"] & arrays["pool_mask"])
    rendered[split] = out
    task.info[f"{split}_prompts_cut"] = int(built["truncated"].sum())
  info = dict(task.info, prompt="chat", prompt_len=prompts.max_len)
  return dataclasses.replace(task, splits=rendered, vocab_size=prompts.vocab_size,
                             layout_fn=prompts.layout, info=info, stream=None)


def maybe_chat(task: Task, config) -> Task:
  """Applies config.prompt.format: "chat" (or "auto" with a Hugging Face checkpoint)
  renders the task with the tokenizer of config.prompt.tokenizer or of the checkpoint."""
  p = config.get("prompt")
  fmt = p.get("format", "auto") if p is not None else "auto"
  hf_dir = config.model.get("hf_checkpoint", "")
  if fmt not in ("auto", "ids", "chat"):
    raise UserError(f"config.prompt.format={fmt!r} is unknown (auto, ids or chat)")
  if fmt == "ids" or (fmt == "auto" and not hf_dir):
    return task
  directory = p.get("tokenizer", "") or hf_dir
  field = "config.prompt.tokenizer" if p.get("tokenizer", "") else "config.model.hf_checkpoint"
  if not directory:
    raise UserError("config.prompt.format=chat needs a tokenizer: set config.prompt.tokenizer "
                    "or config.model.hf_checkpoint to a local directory")
  from fgrpo_jax.data import chat_prompts, text_prompts
  if not (os.path.isdir(directory) or (directory.endswith(".gguf") and os.path.isfile(directory))):
    raise UserError(f"{field}={directory}: directory (or .gguf file) not found (the tokenizer "
                    "of the chat prompts)")
  tokenizer = text_prompts.load_tokenizer(directory, field)
  label = "History" if task.name == "recsys" else "Question"
  candidates = "Items" if task.name == "recsys" else "Passages"
  prompts = chat_prompts.ChatPrompts.from_config(tokenizer, config, source=directory,
                                                 context_label=label,
                                                 candidate_label=candidates)
  # An evaluation (config.mode=eval) reads validation and test only.
  splits = ("validation", "test") if config.get("mode", "train") == "eval" else SPLITS
  return chat_task(task, prompts, splits)


REAL_RECSYS = ("movielens", "lastfm", "amazon", "recbole")  # = recsys_real.DATASETS
KNOWN = ("synthetic_recsys",) + REAL_RECSYS + ("synthetic_qa", "hotpotqa", "musique", "2wiki")


def load_task(config, workdir: str | None = None, log=print) -> Task:
  """Builds the task named by config.data.name (one clear error if unknown).

  Real datasets and the synthetic QA task are prepared once into a cache under
  config.data.cache_dir, else <workdir>/data_cache (see fgrpo_jax/data/cache.py);
  `log` receives the preparation's counts. With chat prompts (config.prompt.format)
  the examples are rendered with a Hugging Face tokenizer's chat template.
  """
  return maybe_chat(_load(config, workdir, log), config)


def _load(config, workdir, log) -> Task:
  """Builds the task named by config.data.name (one clear error if unknown).

  """
  d = config.data
  if d.name == "synthetic_recsys":
    from fgrpo_jax.data import synthetic_recsys
    dataset = synthetic_recsys.make_synthetic_recsys(
        num_items=d.num_items, num_clusters=d.num_clusters, num_user_types=d.num_user_types,
        num_users=d.num_users, seq_len=d.seq_len, history_len=d.history_len,
        pool_size=d.pool_size, negatives=d.negatives, seed=config.seed,
        num_targets=d.get("num_targets", 1), target_decay=d.get("target_decay", 0.5),
        retrieval_mix=d.get("retrieval_mix", ""))
    return recsys_task(dataset, d.name)
  if d.name in REAL_RECSYS:
    from fgrpo_jax.data import recsys_real
    dataset = recsys_real.load(config, workdir, log)
    task = recsys_task(dataset, d.name, cache_dir=dataset.info["cache_dir"])
    task.info.update(variant=dataset.info["variant"], cache_dir=dataset.info["cache_dir"])
    return task
  if d.name == "synthetic_qa":
    from fgrpo_jax.data import synthetic_qa
    return qa_task(synthetic_qa.prepare(config, workdir, log), d.name)
  if d.name in ("hotpotqa", "musique", "2wiki"):
    from fgrpo_jax.data import multihop_qa
    return qa_task(multihop_qa.prepare(config, workdir, log), d.name)
  raise UserError(f"config.data.name: unknown dataset {d.name!r} (known: {', '.join(KNOWN)})")
