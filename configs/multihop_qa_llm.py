"""F-GRPO with a pretrained instruction LLM on multi-hop QA, prompts in its chat template.

    # Qwen3-4B-Instruct on a TPU VM, HotpotQA read from its published files
    python -m fgrpo_jax.main --config=configs/multihop_qa_llm.py \
        --config.model.hf_checkpoint=/models/Qwen3-4B-Instruct-2507 \
        --config.data.name=hotpotqa --config.data.path=/data/hotpotqa --workdir=runs/hotpot_llm
    # a small model with LoRA on a CPU, the embedded synthetic questions
    python -m fgrpo_jax.main --config=configs/multihop_qa_llm.py:cpu \
        --config.model.hf_checkpoint=/models/Qwen2.5-0.5B-Instruct --workdir=runs/qa_llm_cpu

Every field is configs/multihop_qa.py's `hard` variant's (C = 20, 2-4 hops, sentence
passages; itself configs/recsys.py's outside `data`); the
backbone settings are shared with configs/recsys_llm.py. The question is the context and
the 20 passages the candidates (" A" .. " T"); long passages are cut to fit
`prompt.max_len`. Variants: `default` (TPU), `cpu`, `tiny` (the tests).
"""

import os

from fgrpo_jax import cli


def _sibling(name):
  return cli.load_python_file(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                           f"{name}.py"))


def get_config(arg=None):
  variant = arg or "default"
  c = _sibling("multihop_qa").get_config("tiny" if variant == "tiny" else "hard")
  c.variant = variant  # which named variant built this config (informational)
  c.prompt.max_len = 2048  # prompt tokens: 20 passages are cut to fit
  if variant == "cpu":
    c.data.update(num_train=2000, num_validation=64, num_test=200)
  return _sibling("recsys_llm").llm_settings(c, variant)
