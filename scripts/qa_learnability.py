"""Is the multi-hop QA warm start limited by the slot pointer or by reading the question?

    python scripts/qa_learnability.py --mode=plain    # the default synthetic QA prompts
    python scripts/qa_learnability.py --mode=marker   # supporting passages marked with <unk>

Runs the SFT stage of configs/multihop_qa.py (same model, optimiser and batches) and
prints the teacher-forced NLL of the gold slate / ranking every 50 steps. In `marker`
mode the first word of every supporting passage is replaced by <unk>, so finding the
gold passages needs no question matching, only pointing at the identifier before the
marked passage: if the NLL falls there and not in `plain` mode, the pointer is
learnable and matching the question to the passages is what the small model lacks.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import multihop_qa  # noqa: E402
from fgrpo_jax import config as config_lib  # noqa: E402
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


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mode", choices=("plain", "marker"), default="plain")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--cache_dir", default="/tmp/fgrpo_qa_cache")
  args = parser.parse_args()
  c = multihop_qa.get_config()
  c.data.cache_dir = args.cache_dir
  task = tasks.load_task(c, log=lambda s: None)
  arrays = task.splits["train"]
  if args.mode == "marker":
    arrays = mark_supporting(arrays)
  layout = config_lib.make_layout(task, c)
  cfg = config_lib.model_config(c, task.vocab_size)
  optimizer = steps_lib.make_optimizer(c.optim, c.sft.lr, args.steps)
  params = llama.init_params(cfg, jax.random.key(c.seed))
  state = steps_lib.TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))
  n = arrays["prompt"].shape[0]
  print("| mode | step | nll_gen | nll_rank |\n|---|---|---|---|")
  for step in range(args.steps):
    idx = arrays_lib.batch_indices(c.seed, 0, step, n, c.sft.batch_size)
    batch = arrays_lib.take_batch(arrays, idx)
    state, m = steps_lib.sft_step(state, batch, jax.random.key(step), cfg=cfg, layout=layout,
                              optimizer=optimizer)
    if (step + 1) % 50 == 0:
      print(f"| {args.mode} | {step + 1} | {float(m['nll_gen']):.3f} | "
            f"{float(m['nll_rank']):.3f} |", flush=True)


if __name__ == "__main__":
  main()
