"""What makes the embedded multi-hop QA task learnable? SFT probes of configs/multihop_qa.py.

    python scripts/qa_learnability.py --mode=plain    # the `hard` synthetic QA prompts
    python scripts/qa_learnability.py --mode=marker   # supporting passages marked with <unk>
    python scripts/qa_learnability.py --set data.question_first=True \
        --set data.slot_after_passage=True --steps=1000 --eval_every=250
    python scripts/qa_learnability.py --variant=default --steps=6000 --eval_every=1000

Runs the SFT stage of configs/multihop_qa.py:VARIANT (same model, optimiser and batches;
any config field changed with --set). The variant is `hard` unless --variant says
otherwise: every probe in docs/experiments.md was run on that base (the default until
the default task changed), so their commands reproduce as written. It prints the
teacher-forced NLL of the gold slate / ranking averaged over every 50 steps, and every
--eval_every steps the greedy validation hit@1 and slate recall (BM25's and random's are
printed once). In `marker` mode the first word of every supporting passage is replaced
by <unk>, so finding the gold passages needs no question matching, only pointing at the
identifier before the marked passage: if the NLL falls there and not in `plain` mode,
the pointer is learnable and matching the question to the passages is what the small
model lacks.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import multihop_qa  # noqa: E402
from fgrpo_jax import config as config_lib  # noqa: E402
from fgrpo_jax import compare, evaluate, train  # noqa: E402
from fgrpo_jax import steps as steps_lib  # noqa: E402
from fgrpo_jax.data import arrays as arrays_lib  # noqa: E402
from fgrpo_jax.data import tasks, text_prompts  # noqa: E402
from fgrpo_jax.models import llama  # noqa: E402


def mark_supporting(arrays):
  """Copy of the split with the token after each supporting passage's identifier -> <unk>."""
  prompt = arrays["prompt"].copy()
  for row in range(prompt.shape[0]):
    for slot in jnp.nonzero(arrays["relevance"][row])[0]:
      pos = int(jnp.nonzero(prompt[row] == text_prompts.SLOT_OFFSET + int(slot))[0][0])
      prompt[row, pos + 1] = text_prompts.UNK
  return dict(arrays, prompt=prompt)


def symmetric_qk(params, cfg):
  """k_proj of kv head g := q_proj of query head g * H / K (the group's first)."""
  H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  q = params["layers"]["q_proj"]  # [L, h, H * D]
  heads = [q[..., (g * (H // K)) * D:(g * (H // K) + 1) * D] for g in range(K)]
  layers = dict(params["layers"], k_proj=jnp.concatenate(heads, axis=-1))
  return dict(params, layers=layers)


def curriculum_indices(order, seed: int, step: int, steps: int, batch_size: int):
  """A batch drawn uniformly from the easiest c(t) * n examples of `order` (easiest
  first), c(t) = min(1, sqrt(0.01 + 0.99 t / steps)): 10% at the start, all at `steps`."""
  competence = min(1.0, float(np.sqrt(0.01 + 0.99 * step / steps)))
  m = max(batch_size, int(np.ceil(competence * len(order))))
  rng = np.random.default_rng([seed, step])
  return order[rng.integers(0, min(m, len(order)), batch_size)]


def bm25_difficulty(task, arrays) -> np.ndarray:
  """[N] the number of distractors BM25 scores at or above the best supporting passage
  (0: lexical overlap alone ranks a supporting passage first)."""
  scores = np.asarray(task.reference_fns["bm25"](arrays), np.float64)
  relevant = np.asarray(arrays["relevance"]) > 0
  valid = np.asarray(arrays["pool_mask"]).astype(bool)
  best_gold = np.where(relevant, scores, -np.inf).max(-1, keepdims=True)
  return ((scores >= best_gold) & valid & ~relevant).sum(-1)


def same_vocabulary(warm_task, task, c) -> dict:
  """The warm-up task's training split re-encoded with `task`'s tokenizer.

  Each prepared task trains its word vocabulary on its own training split, so two
  tasks with different distractor mixes give the same word different ids; without
  this the warm-up rows would be in another language than validation.
  """
  tok = text_prompts.load_tokenizer(os.path.join(task.info["cache_dir"], "tokenizer"))
  builder = text_prompts.QAPrompts(tok, c.data.pool_size, c.data.question_len,
                                   c.data.passage_len, task.info["prompt_len"],
                                   c.data.question_first, c.data.slot_after_passage)
  arrays = dict(warm_task.splits["train"])
  questions, passages = warm_task.texts(arrays)
  built = builder.build(questions, [[p or None for p in row] for row in passages])
  for k in ("prompt", "prompt_mask", "pool_mask", "cand_tokens"):
    if k in arrays:
      arrays[k] = built[k]
  return arrays


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mode", choices=("plain", "marker"), default="plain")
  parser.add_argument("--variant", default="hard",
                      help="configs/multihop_qa.py variant the --set changes apply to")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--eval_every", type=int, default=0, help="0 = only at the end")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="a config field, e.g. data.max_hops=2 or model.num_layers=4")
  parser.add_argument("--cache_dir", default="/tmp/fgrpo_qa_cache")
  parser.add_argument("--curriculum_steps", type=int, default=0,
                      help="> 0: draw each batch from the easiest examples (fewest passages, "
                           "then fewest hops), a fraction growing from 10%% to all of them "
                           "over this many steps (competence schedule)")
  parser.add_argument("--curriculum_by", choices=("size", "bm25"), default="size",
                      help="what 'easiest' means for --curriculum_steps: fewest passages, "
                           "then fewest hops (size); or fewest distractors that BM25 scores "
                           "at or above the best supporting passage, then fewest passages "
                           "(bm25: lexical matching suffices first)")
  parser.add_argument("--warmup_set", action="append", default=[],
                      help="FIELD=VALUE: a second training split built with this change too "
                           "(e.g. data.train_distractor_mix=(0,0,0,1)); the share of each "
                           "batch drawn from it falls linearly from 1 to 0 over "
                           "--warmup_steps (a staircase between two training distributions)")
  parser.add_argument("--warmup_steps", type=int, default=0,
                      help="steps over which --warmup_set's split is annealed out")
  parser.add_argument("--symmetric_qk", action="store_true",
                      help="initialise each key head as the first query head of its group "
                           "(q.k of a token with itself is then positive at init)")
  args = parser.parse_args()
  c = multihop_qa.get_config(args.variant)
  for item in args.set:
    field, _, value = item.partition("=")
    compare._set_field(c, field, value)
  c.data.cache_dir = args.cache_dir
  task = tasks.load_task(c, log=lambda s: None)
  arrays = task.splits["train"]
  if args.mode == "marker":
    if c.data.slot_after_passage:
      raise SystemExit("--mode=marker assumes identifiers before their passages")
    arrays = mark_supporting(arrays)
  warm = None
  if args.warmup_set:
    cw = multihop_qa.get_config(args.variant)
    for item in args.set + args.warmup_set:
      field, _, value = item.partition("=")
      compare._set_field(cw, field, value)
    cw.data.cache_dir = args.cache_dir
    warm = same_vocabulary(tasks.load_task(cw, log=lambda s: None), task, c)
    if {k: np.shape(v) for k, v in warm.items()} != {k: np.shape(v) for k, v in arrays.items()}:
      raise SystemExit("--warmup_set must keep every array shape (pool size, lengths)")
  val = {k: v[:c.eval.val_examples] for k, v in task.splits["validation"].items()}
  layout = config_lib.make_layout(task, c)
  cfg = config_lib.model_config(c, task.vocab_size)
  optimizer = steps_lib.make_optimizer(c.optim, c.sft.lr, args.steps)
  params = llama.init_params(cfg, jax.random.key(c.seed))
  if args.symmetric_qk:
    params = symmetric_qk(params, cfg)
  state = steps_lib.TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))
  n = arrays["prompt"].shape[0]
  _, refs = train.reference_metrics(task, val, c)
  print(f"settings: {' '.join(args.set) or 'default'} | mode {args.mode} | validation "
        f"references: " + ", ".join(f"{k} hit@1 {v['hit@1']:.3f} slate_recall "
                                    f"{v['slate_recall']:.3f}" for k, v in refs.items()))
  print("| step | nll_gen | nll_rank | nll_prompt | bce_slots | val hit@1 | val slate_recall | s |")
  print("|---|---|---|---|---|---|---|---|")
  # The training loop's own SFT step and settings (every sft.* field of the config).
  sft_step, static, _, _ = train.stage_step("sft", c, cfg, layout, optimizer)
  # Examples from easiest to hardest: pool size, then the number of supporting passages;
  # or (bm25) how many distractors lexical overlap puts level with or above the gold.
  pool_sizes = np.asarray(arrays["pool_mask"]).sum(-1)
  if args.curriculum_by == "bm25":
    order = np.lexsort((pool_sizes, bm25_difficulty(task, arrays)))
  else:
    order = np.lexsort((np.asarray(arrays["relevance"] > 0).sum(-1), pool_sizes))
  window, t0 = [], time.time()
  for step in range(args.steps):
    if args.curriculum_steps:
      idx = curriculum_indices(order, c.seed, step, args.curriculum_steps, c.sft.batch_size)
    else:
      idx = arrays_lib.batch_indices(c.seed, 0, step, n, c.sft.batch_size)
    batch = arrays_lib.host_batch(arrays, idx)
    if warm is not None and step < args.warmup_steps:
      # Rows from the warm-up split with probability 1 - step / warmup_steps.
      share = 1.0 - step / args.warmup_steps
      pick = np.random.default_rng([c.seed, step]).random(len(idx)) < share
      warm_batch = arrays_lib.host_batch(warm, idx)
      batch = {k: np.where(pick.reshape((-1,) + (1,) * (np.ndim(v) - 1)), warm_batch[k], v)
               for k, v in batch.items()}
    batch = arrays_lib.device_batch(batch)
    state, m = sft_step(state, batch, jax.random.key(step), **static)
    window.append((float(m["nll_gen"]), float(m["nll_rank"]),
                   float(m.get("nll_prompt", float("nan"))),
                   float(m.get("bce_slots", float("nan")))))
    last = step + 1 == args.steps
    if (step + 1) % 50 == 0 or last:
      gen, rank, lm, slots = np.mean(window, axis=0)
      window = []
      if last or (args.eval_every and (step + 1) % args.eval_every == 0):
        e = evaluate.evaluate_model(state.params, val, cfg=cfg, layout=layout,
                                    batch_size=c.eval.batch_size)
        ev = f"{e['hit@1']:.3f} | {e['slate_recall']:.3f}"
      else:
        ev = " | "
      print(f"| {step + 1} | {gen:.3f} | {rank:.3f} | {lm:.3f} | {slots:.3f} | {ev} | "
            f"{time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
  main()
