"""LoRA adapters for the decoders (Llama family, Qwen3.5): a separate, small, trainable pytree.

For a targeted projection with (stacked) kernel W [L, in, out] an adapter holds

    lora_a [L, in, r]   small random init
    lora_b [L, r, out]  zeros, so the adapted model starts exactly at the base

and the adapted kernel is W + (alpha / r) * lora_a @ lora_b (per layer). Adapters
are stacked over layers like the base and sit under the same group key as their
kernel, so the decoders' `lax.scan` needs no change:

    adapters = {"layers": {"q_proj": {"lora_a": ..., "lora_b": ...}, "v_proj": {...}}}

In a Qwen3.5 (models/qwen3_5.py) the attention kernels q/k/v/o_proj live under
`attn/` (stacked over its Lf attention layers), the Gated DeltaNet's in_proj_qkv,
in_proj_z, in_proj_a, in_proj_b and out_proj under `linear/` (La DeltaNet layers) and
the MLP's under `layers/`, and so do their adapters.

How the adapters enter the model: `merge` builds the adapted params, and the
train steps call the unchanged `llama` / `rollout` functions on them, differentiating
only with respect to the adapters (the base is a separate, non-differentiated
argument: no base gradient, no optimizer state for it). Why merge instead of a
low-rank path x @ W + s * (x @ A) @ B inside every matmul:

- exact and single-path: sampling, teacher-forced log-probs, evaluation and export
  all use the same merged weights, so LoRA adds no second numerical path between
  the sampler and the learner, and the exported (float32) merged checkpoint
  reproduces the trained policy bit for bit;
- no change to `llama.py`, the sampler or the KV cache;
- cheap: merging a target costs L*in*out*r multiply-adds, what its matmuls cost
  on r tokens of a forward pass, and a step merges once for all its B*G*T tokens.

The price is memory: the merged copy of the targeted kernels and, in the backward
pass, their full-size cotangent (from which dA = dW B^T and dB = A^T dW are
projected) exist transiently, twice the targeted kernels' size. Full fine-tuning
keeps a gradient and two AdamW moments of every weight alive for the whole run;
still, for multi-billion-parameter backbones that barely fit, a low-rank path in the
matmuls would avoid even the transient copies (not needed at our sizes).

Files (`save_adapters` / `load_adapters`), the Hugging Face PEFT layout:

    adapter_config.json        {"peft_type": "LORA", "r": r, "lora_alpha": alpha,
                                "target_modules": [...], "base_model_name_or_path": ...}
    adapter_model.safetensors  for each layer i and target, e.g. q_proj (mlp.* for the MLP):
      base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight  [r, in]
      base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight  [out, r]

where i is the decoder layer's index in the whole stack (a Qwen3.5's q_proj exists only
in its attention layers, its in_proj_qkv only in its DeltaNet layers: linear_attn.*).

(torch `nn.Linear` weights are [out, in], so lora_A/lora_B are our lora_a/lora_b
transposed per layer; PEFT computes the same W + alpha/r * B A.)
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fgrpo_jax.errors import UserError
from fgrpo_jax.models import qwen3_5
from fgrpo_jax.models.decoders import decoder
from fgrpo_jax.models.llama import ModelConfig, Params

# The projection kernels that adapters may target, with their module path inside a
# Hugging Face decoder layer. The last five are Qwen3.5's Gated DeltaNet's.
TARGETS = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj", "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj",
    "in_proj_qkv": "linear_attn.in_proj_qkv", "in_proj_z": "linear_attn.in_proj_z",
    "in_proj_a": "linear_attn.in_proj_a", "in_proj_b": "linear_attn.in_proj_b",
    "out_proj": "linear_attn.out_proj",
}
# The params groups that hold stacked layer kernels: every layer's (`layers`), and a
# Qwen3.5's attention layers' (`attn`) and DeltaNet layers' (`linear`).
GROUPS = ("layers", "attn", "linear")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model.model.layers"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Rank, alpha and targeted projections of a set of adapters (static, hashable)."""

  rank: int
  alpha: float
  targets: tuple[str, ...]

  @property
  def scale(self) -> float:
    """alpha / rank: the factor of the low-rank update."""
    return float(self.alpha) / self.rank


def parse_targets(text: str) -> tuple[str, ...]:
  """'q_proj, v_proj' -> ('q_proj', 'v_proj'); ValueError naming unknown or repeated names."""
  names = tuple(t.strip() for t in str(text).split(",") if t.strip())
  unknown = [t for t in names if t not in TARGETS]
  if unknown:
    raise ValueError(f"unknown projection(s) {', '.join(map(repr, unknown))} "
                     f"(choose from {', '.join(TARGETS)})")
  if len(set(names)) != len(names):
    raise ValueError("a projection is listed twice")
  if not names:
    raise ValueError(f"no projection given (choose from {', '.join(TARGETS)})")
  return names


def config_from_model_config(model) -> LoraConfig | None:
  """`config.model` (rank, alpha, targets) -> LoraConfig, or None when lora_rank is 0."""
  rank = int(model.get("lora_rank", 0))
  if rank <= 0:
    return None
  return LoraConfig(rank=rank, alpha=float(model.lora_alpha),
                    targets=parse_targets(model.lora_targets))


# ----------------------------------------------------------------------------
# The adapter pytree.


def group_of(cfg: ModelConfig, target: str) -> str:
  """The params group ("layers", "attn" or "linear") that holds `target`'s kernel;
  ValueError naming the target when the model has none (in_proj_qkv of a Llama)."""
  shapes = decoder(cfg).param_shapes(cfg)
  for group in GROUPS:
    if target in shapes.get(group, {}):
      return group
  present = [t for t in TARGETS if any(t in shapes.get(g, {}) for g in GROUPS)]
  raise ValueError(f"{target!r}: this {cfg.arch} model has no such projection (it has "
                   f"{', '.join(present)})")


def layer_indices(cfg: ModelConfig, group: str) -> list[int]:
  """Index in the whole decoder stack of each layer of a group's stacked kernels."""
  if group == "layers":
    return list(range(cfg.num_layers))
  kind = qwen3_5.FULL if group == "attn" else qwen3_5.LINEAR
  return [i for i, t in enumerate(cfg.layer_types) if t == kind]


def adapter_shapes(cfg: ModelConfig, lcfg: LoraConfig) -> Params:
  """ShapeDtypeStructs of `init_adapters` (float32), without allocating."""
  base = decoder(cfg).param_shapes(cfg)
  out: dict = {}
  for t in lcfg.targets:
    group = group_of(cfg, t)
    L, d_in, d_out = base[group][t].shape
    out.setdefault(group, {})[t] = {
        "lora_a": jax.ShapeDtypeStruct((L, d_in, lcfg.rank), jnp.float32),
        "lora_b": jax.ShapeDtypeStruct((L, lcfg.rank, d_out), jnp.float32)}
  return out


@functools.partial(jax.jit, static_argnums=(0, 1))
def init_adapters(cfg: ModelConfig, lcfg: LoraConfig, key: jax.Array) -> Params:
  """Fresh adapters: lora_a ~ N(0, 1/in) [L, in, r], lora_b = 0 [L, r, out].

  With lora_b = 0 the adapted model equals the base exactly, and the first
  gradient step moves lora_b (the gradient of lora_a is 0 while lora_b is).
  """
  shapes = adapter_shapes(cfg, lcfg)
  keys = jax.random.split(key, len(lcfg.targets))
  out: dict = {}
  for k, t in zip(keys, lcfg.targets):
    group = group_of(cfg, t)
    a, b = shapes[group][t]["lora_a"], shapes[group][t]["lora_b"]
    std = 1.0 / math.sqrt(a.shape[1])
    out.setdefault(group, {})[t] = {"lora_a": std * jax.random.normal(k, a.shape, a.dtype),
                                    "lora_b": jnp.zeros(b.shape, b.dtype)}
  return out


def delta(adapter: Params, scale: float) -> jax.Array:
  """scale * lora_a @ lora_b per layer: [L, in, r] x [L, r, out] -> [L, in, out] (float32)."""
  return scale * jnp.einsum("lir,lro->lio", adapter["lora_a"], adapter["lora_b"],
                            precision=jax.lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32)


def merge(base: Params, adapters: Params, scale: float) -> Params:
  """The adapted params: base with W + scale * A @ B on every targeted kernel.

  Pure and differentiable in both arguments; untargeted leaves are the base's own
  arrays. The merged kernels keep the base kernel's dtype.
  """
  out = dict(base)
  for group, targeted in adapters.items():
    kernels = dict(base[group])
    for t, adapter in targeted.items():
      w = kernels[t]
      kernels[t] = (w.astype(jnp.float32) + delta(adapter, scale)).astype(w.dtype)
    out[group] = kernels
  return out


@jax.tree_util.register_pytree_node_class
class Frozen:
  """The frozen base params of a LoRA run plus the adapters' scale.

  A pytree whose only children are the base's arrays; `scale` is static metadata,
  so a jitted step that takes a Frozen specialises on it (it never changes in a run).
  """

  def __init__(self, params: Params, scale: float):
    self.params = params
    self.scale = float(scale)

  def tree_flatten(self):
    return (self.params,), self.scale

  @classmethod
  def tree_unflatten(cls, scale, children):
    return cls(children[0], scale)


def model_params(trainable: Params, frozen: Frozen | None) -> Params:
  """Params to run the model with: `trainable` itself, or base merged with adapters."""
  if frozen is None:
    return trainable
  return merge(frozen.params, trainable, frozen.scale)


_merge_jit = jax.jit(merge, static_argnames=("scale",))


def merged(trainable: Params, frozen: Frozen | None) -> Params:
  """`model_params` as one jitted call (for evaluation and export outside the steps)."""
  if frozen is None:
    return trainable
  return _merge_jit(frozen.params, trainable, scale=frozen.scale)


# ----------------------------------------------------------------------------
# Files (Hugging Face PEFT layout, see the module docstring).


def save_adapters(adapters: Params, lcfg: LoraConfig, directory, base_model: str = "",
                  cfg: ModelConfig | None = None) -> Path:
  """Writes adapter_config.json + adapter_model.safetensors (float32) into `directory`.

  cfg: the base model's config, needed to number a Qwen3.5's attn/ and linear/ layers
  in the whole stack (without it, adapters of `layers/` only: layer i is stack entry i).
  """
  from safetensors.numpy import save_file
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tensors = {}
  for group, targeted in adapters.items():
    for t, adapter in targeted.items():
      a, b = np.asarray(adapter["lora_a"], np.float32), np.asarray(adapter["lora_b"], np.float32)
      indices = (range(a.shape[0]) if cfg is None and group == "layers"
                 else layer_indices(cfg, group))
      for j, i in enumerate(indices):
        name = f"{_PEFT_PREFIX}.{i}.{TARGETS[t]}"
        tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[j].T)  # [r, in]
        tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b[j].T)  # [out, r]
  save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lcfg.rank,
            "lora_alpha": lcfg.alpha, "target_modules": list(lcfg.targets),
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "inference_mode": True,
            "base_model_name_or_path": str(base_model)}
  (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
  return directory


def load_adapters(directory, cfg: ModelConfig | None = None) -> tuple[Params, LoraConfig]:
  """Reads `save_adapters` output (or a PEFT LoRA of a Llama/Qwen model) -> (adapters, config).

  cfg: the base model's config (required for a Qwen3.5, whose targets sit in attn/ or
  linear/ and only in some layers); without it every target is a `layers/` kernel
  present in layers 0, 1, ...
  """
  from safetensors.numpy import load_file
  directory = Path(directory)
  cfg_path, w_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
  for p in (cfg_path, w_path):
    if not p.is_file():
      raise UserError(f"{p}: not found (expected a LoRA adapter directory)")
  meta = json.loads(cfg_path.read_text())
  targets = tuple(meta["target_modules"])
  try:
    parse_targets(",".join(targets))
    groups = [group_of(cfg, t) if cfg is not None else "layers" for t in targets]
  except ValueError as e:
    raise UserError(f"{cfg_path}: target_modules: {e}") from None
  lcfg = LoraConfig(rank=int(meta["r"]), alpha=float(meta["lora_alpha"]), targets=targets)
  tensors = load_file(str(w_path))
  out: dict = {}
  for t, group in zip(targets, groups):
    indices = layer_indices(cfg, group) if cfg is not None else itertools.count()
    a, b = [], []
    for i in indices:
      name = f"{_PEFT_PREFIX}.{i}.{TARGETS[t]}"
      if f"{name}.lora_A.weight" not in tensors:
        if cfg is None and a:
          break  # layers 0 .. i-1
        raise UserError(f"{w_path}: no tensor {name}.lora_A.weight")
      a.append(tensors[f"{name}.lora_A.weight"].T)
      b.append(tensors[f"{name}.lora_B.weight"].T)
    out.setdefault(group, {})[t] = {"lora_a": jnp.asarray(np.stack(a)),
                                    "lora_b": jnp.asarray(np.stack(b))}
  return out, lcfg
