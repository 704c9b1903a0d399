"""The config, checked and turned into the static objects of a run.

- the algorithm names (`ALGORITHMS`, `RL_ALGORITHMS`, `DECOUPLED`) and the stage
  that follows the SFT warm start (`main_stage`);
- `validate_config(config, task=None, mesh=None)`: every check of the config a run
  makes, each ending in one `ConfigError` line that names the field; with the task
  (pool size, streaming) and the device mesh (batch shards) the checks that need them;
- the sizes of a stage (`stage_sizes`: steps, batch, peak rate, updates per step) and
  the batches that take gradients (`update_batches`);
- the rollout layout (`make_layout`) and the model's sizes (`model_config`,
  `pretrained_model_config`).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax

from fgrpo_jax import guards
from fgrpo_jax import rollout as rollout_lib
from fgrpo_jax import sharding
from fgrpo_jax.errors import UserError
from fgrpo_jax.models import hf, llama
from fgrpo_jax.models import lora as lora_lib

ALGORITHMS = ("fgrpo", "grpo", "decoupled", "decoupled_sft", "sft")
RL_ALGORITHMS = ("fgrpo", "grpo", "decoupled")  # the stage after the warm start is RL
DECOUPLED = ("decoupled", "decoupled_sft")  # two policies: a selector and a ranker

# Fields with a fixed set of values: field -> the values allowed.
CHOICES = {"reward.coverage": ("recall", "f1", "ndcg"),
           "reward.rank_metric": ("ndcg", "hit", "mrr"),
           "reward.gain": ("exp", "linear"), "reward.advantage": ("mean", "std", "rloo"),
           "rl.ratio": ("token", "phase"), "sft.supervise": ("relevant", "all"),
           "rl.loss_norm": ("phase", "joint"), "reward.rank_ideal": ("pool", "slate"),
           "sft.slate_order": ("random", "relevant_first"), "rl.kl_estimator": ("k1", "k3"),
           "model.dtype": ("float32", "bfloat16"), "model.remat": ("none", "full"),
           "data.loader": ("memory", "grain")}


class ConfigError(UserError):
  """A user mistake in the config: printed as one line by main."""


def config_value(config, field: str):
  """config.<field> for a dotted field name ("rl.inner_steps")."""
  node = config
  for part in field.split("."):
    node = node[part]
  return node


def set_config_value(config, field: str, value) -> None:
  """config.<field> = value for a dotted field name (the field must exist)."""
  parent, _, name = field.rpartition(".")
  node = config_value(config, parent) if parent else config
  node[name] = value


def main_stage(algorithm: str) -> str:
  """Name of the stage after the SFT warm start: RL, or more SFT for SFT baselines."""
  return "rl" if algorithm in RL_ALGORITHMS else "sft_more"


# ----------------------------------------------------------------------------
# Validation.


def validate_config(config, task=None, mesh=None):
  """Stops on impossible settings with one line naming the field.

  task: the loaded data.tasks.Task (its pool size, whether it can stream, its
  layout's free-decoding budget), or None before it is loaded; mesh: the device
  mesh (batches must split over its batch shards and the processes), or None.
  """
  _validate_fields(config, None if task is None else task.pool_size)
  if task is not None:
    make_layout(task, config)  # the free-decoding budget fits a well-formed rollout
    if config.data.get("loader", "memory") == "grain" and task.stream is None:
      why = ("chat prompts are built in memory (config.prompt.format)" if
             task.info.get("prompt") == "chat" else f"{task.dataset} is generated in memory")
      raise ConfigError(f"config.data.loader=grain streams prepared data, but {why}; use "
                        "config.data.loader=memory")
  if mesh is not None:
    _validate_mesh(config, sharding.batch_shards(mesh), jax.process_count())


def _validate_fields(config, pool_size: int | None):
  r = config.rollout
  if config.algorithm not in ALGORITHMS:
    raise ConfigError(f"config.algorithm={config.algorithm!r} is unknown "
                      f"(choose one of {', '.join(ALGORITHMS)})")
  if config.mode not in ("train", "eval"):
    raise ConfigError(f"config.mode={config.mode!r} is unknown (train or eval)")
  if r.group_size < 2 and config.algorithm != "sft":
    raise ConfigError(f"config.rollout.group_size={r.group_size}: group-relative advantages "
                      "need at least 2 rollouts per prompt")
  if r.slate_size < 1:
    raise ConfigError(f"config.rollout.slate_size={r.slate_size} must be at least 1")
  rank_k = config.reward.rank_k
  if not 0 <= rank_k <= r.rank_size:
    raise ConfigError(f"config.reward.rank_k={rank_k} must be between 0 (all ranked) and "
                      f"config.rollout.rank_size={r.rank_size}")
  if r.rank_size < 1 or r.rank_size > r.slate_size:
    raise ConfigError(f"config.rollout.rank_size={r.rank_size} must be between 1 and "
                      f"config.rollout.slate_size={r.slate_size}")
  C = pool_size or config.data.get("pool_size", None)
  if C is not None and C < 2:  # before the slate check, which would blame slate_size
    raise ConfigError(f"config.data.pool_size={C} must be at least 2")
  if C is not None and r.slate_size > C:
    raise ConfigError(f"config.rollout.slate_size={r.slate_size} exceeds the pool size "
                      f"C={C} (config.data.pool_size)")
  for field, allowed in CHOICES.items():
    value = config_value(config, field)
    if value not in allowed:
      raise ConfigError(f"config.{field}={value!r} is unknown (choose one of "
                        f"{', '.join(allowed)})")
  for field in ("sft.steps", "rl.steps", "rollout.max_new_tokens", "reward.format_penalty",
                "profile_steps"):
    if config_value(config, field) < 0:
      raise ConfigError(f"config.{field} must be >= 0")
  for field in ("rl.inner_steps", "eval.batch_size", "log_every", "sft.batch_size",
                "rl.batch_prompts"):
    value = config_value(config, field)
    if value < 1:
      raise ConfigError(f"config.{field}={value} must be >= 1")
  if not config.rollout.temperature > 0:
    raise ConfigError(f"config.rollout.temperature={config.rollout.temperature} must be > 0")
  if not r.constrained and config.sft.get("tied_targets", False):
    raise ConfigError("config.sft.tied_targets needs constrained decoding "
                      "(config.rollout.constrained = True): its targets are pool slots")
  if not r.constrained and config.algorithm in DECOUPLED:
    raise ConfigError(f"config.rollout.constrained=False: free decoding does not support "
                      f"config.algorithm={config.algorithm} (its ranker is given the slate)")
  n = config.optim.grad_accum
  if n < 1:
    raise ConfigError(f"config.optim.grad_accum={n} must be >= 1")
  bad = [f"{what} ({rows} rows)" for what, rows in update_batches(config) if rows % n]
  if bad:
    raise ConfigError(f"config.optim.grad_accum={n} must divide the batch of every gradient "
                      f"step; it does not divide {', '.join(bad)}")
  _validate_lora(config.model)
  guards.check_finite_settings(config)


def _validate_mesh(config, shards: int, processes: int):
  """Batches split evenly over the mesh's `shards` batch shards and the processes."""
  for field in ("sft.batch_size", "rl.batch_prompts", "eval.batch_size"):
    if config_value(config, field) % shards:
      raise ConfigError(f"config.{field}={config_value(config, field)} must be a multiple of "
                        f"data*fsdp={shards} (config.mesh)")
  if shards % processes:
    # Each process feeds its own rows; a batch replicated across processes would
    # receive different data on each of them.
    raise ConfigError(f"config.mesh: the batch axes data*fsdp={shards} must be a multiple of "
                      f"the {processes} processes")
  n = config.optim.grad_accum
  for what, rows in update_batches(config) if n > 1 else ():
    if (rows // n) % shards:
      raise ConfigError(f"config.optim.grad_accum={n} leaves microbatches of {rows // n} rows "
                        f"of {what} ({rows} rows), not a multiple of data*fsdp={shards} "
                        "(config.mesh)")


def _validate_lora(m):
  rank = m.get("lora_rank", 0)
  if not isinstance(rank, int) or rank < 0:
    raise ConfigError(f"config.model.lora_rank={rank!r} must be an integer >= 0 (0 = no LoRA)")
  if rank == 0:
    return
  if not m.lora_alpha > 0:
    raise ConfigError(f"config.model.lora_alpha={m.lora_alpha!r} must be > 0")
  try:
    lora_lib.parse_targets(m.lora_targets)
  except ValueError as e:
    raise ConfigError(f"config.model.lora_targets={m.lora_targets!r}: {e}") from None


# ----------------------------------------------------------------------------
# Sizes.


class StageSizes(NamedTuple):
  steps: int  # steps of the stage (each: one batch)
  batch_size: int  # rows per step: sequences (SFT) or prompts (RL, with G rollouts each)
  lr: float  # peak learning rate
  updates_per_step: int  # optimizer updates per step (on the same batch)

  @property
  def updates(self) -> int:
    """Optimizer updates of the stage: the length of its learning-rate schedule."""
    return self.steps * self.updates_per_step


def stage_sizes(stage: str, config) -> StageSizes:
  """The sizes of a stage. The budget rule of the stage after the warm start: every
  algorithm gets the same rl.steps steps, rl.inner_steps optimizer updates per step,
  peak rate rl.lr (each algorithm's own value from the sweep) and B*G sequences per
  step — sampled rollouts for RL, gold sequences for the SFT baselines."""
  if stage == "sft":
    return StageSizes(config.sft.steps, config.sft.batch_size, config.sft.lr, 1)
  rl = config.rl
  if stage == "rl":
    return StageSizes(rl.steps, rl.batch_prompts, rl.lr, rl.inner_steps)
  return StageSizes(rl.steps, rl.batch_prompts * config.rollout.group_size, rl.lr,
                    rl.inner_steps)


def update_batches(config) -> list[tuple[str, int]]:
  """(description, rows) of the batches the stages of this config take gradients on.

  grad_accum splits each of them into microbatches. The RL stage splits prompts
  (with all their G rollouts); the decoupled pair updates each policy on one half.
  """
  out = []
  if config.sft.steps and not config.sft.init_from:
    out.append(("config.sft.batch_size", config.sft.batch_size))
  if config.rl.steps:
    B, G = config.rl.batch_prompts, config.rollout.group_size
    what, rows = (("config.rl.batch_prompts", B) if main_stage(config.algorithm) == "rl"
                  else ("config.rl.batch_prompts*config.rollout.group_size", B * G))
    if config.algorithm in DECOUPLED:
      out += [(f"half of {what} for each decoupled policy", half)
              for half in sorted({(rows + 1) // 2, rows // 2})]
    else:
      out.append((what, rows))
  return out


# ----------------------------------------------------------------------------
# Layout and model sizes.


def make_layout(task, config) -> rollout_lib.Layout:
  """The task's rollout layout for config.rollout: constrained, or free decoding with
  a token budget (config.rollout.max_new_tokens, 0 = twice a well-formed rollout)."""
  r = config.rollout
  layout = task.layout_fn(r.slate_size, r.rank_size)
  if not r.constrained and 0 < r.max_new_tokens < layout.schedule_length:
    raise ConfigError(f"config.rollout.max_new_tokens={r.max_new_tokens} is shorter than a "
                      f"well-formed rollout ({layout.schedule_length} tokens with the tags)")
  return rollout_lib.with_budget(layout, r.constrained, r.max_new_tokens)


def model_config(config, vocab_size: int) -> llama.ModelConfig:
  """The ModelConfig of config.model's sizes (a randomly initialised backbone)."""
  m = config.model
  return llama.ModelConfig(
      vocab_size=vocab_size, num_layers=m.num_layers, hidden=m.hidden, num_heads=m.num_heads,
      num_kv_heads=m.num_kv_heads, head_dim=m.head_dim, mlp_hidden=m.mlp_hidden,
      rope_theta=m.rope_theta, tie_embeddings=m.tie_embeddings, dtype=m.dtype, remat=m.remat,
      init_std=float(m.get("init_std", 0.02)),
      partial_rotary_factor=float(m.get("partial_rotary_factor", 1.0)),
      qk_norm=bool(m.get("qk_norm", False)))


def pretrained_model_config(config, vocab_size: int) -> llama.ModelConfig:
  """ModelConfig of config.model.hf_checkpoint (its config.json; the sizes in config.model
  are ignored), compute dtype config.model.dtype, remat config.model.remat."""
  path = config.model.hf_checkpoint
  try:
    hf_config, source = hf.read_hf_config(path)
    cfg = hf.config_from_hf(hf_config, dtype=config.model.dtype, source=str(source))
  except UserError as e:
    raise ConfigError(f"config.model.hf_checkpoint: {e}") from None
  if vocab_size > cfg.vocab_size:
    raise ConfigError(
        f"config.model.hf_checkpoint: the task's token ids need a vocabulary of {vocab_size} "
        f"but {source} has vocab_size={cfg.vocab_size}")
  return dataclasses.replace(cfg, remat=config.model.remat)
