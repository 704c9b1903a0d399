"""LoRA adapters for the Llama-family decoder: a separate, small, trainable pytree.

For a targeted projection with (stacked) kernel W [L, in, out] an adapter holds

    lora_a [L, in, r]   small random init
    lora_b [L, r, out]  zeros, so the adapted model starts exactly at the base

and the adapted kernel is W + (alpha / r) * lora_a @ lora_b (per layer). Adapters
are stacked over layers like the base, so `llama`'s `lax.scan` needs no change:

    adapters = {"layers": {"q_proj": {"lora_a": ..., "lora_b": ...}, "v_proj": {...}}}

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

(torch `nn.Linear` weights are [out, in], so lora_A/lora_B are our lora_a/lora_b
transposed per layer; PEFT computes the same W + alpha/r * B A.)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fgrpo_jax.errors import UserError
from fgrpo_jax.models import llama
from fgrpo_jax.models.llama import ModelConfig, Params

# The projection kernels of `llama` params that adapters may target, with their
# module path inside a Hugging Face decoder layer.
TARGETS = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj", "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj",
}
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


def adapter_shapes(cfg: ModelConfig, lcfg: LoraConfig) -> Params:
  """ShapeDtypeStructs of `init_adapters` (float32), without allocating."""
  base = llama.param_shapes(cfg)["layers"]
  out = {}
  for t in lcfg.targets:
    L, d_in, d_out = base[t].shape
    out[t] = {"lora_a": jax.ShapeDtypeStruct((L, d_in, lcfg.rank), jnp.float32),
              "lora_b": jax.ShapeDtypeStruct((L, lcfg.rank, d_out), jnp.float32)}
  return {"layers": out}


@functools.partial(jax.jit, static_argnums=(0, 1))
def init_adapters(cfg: ModelConfig, lcfg: LoraConfig, key: jax.Array) -> Params:
  """Fresh adapters: lora_a ~ N(0, 1/in) [L, in, r], lora_b = 0 [L, r, out].

  With lora_b = 0 the adapted model equals the base exactly, and the first
  gradient step moves lora_b (the gradient of lora_a is 0 while lora_b is).
  """
  shapes = adapter_shapes(cfg, lcfg)["layers"]
  keys = jax.random.split(key, len(lcfg.targets))
  out = {}
  for k, t in zip(keys, lcfg.targets):
    a, b = shapes[t]["lora_a"], shapes[t]["lora_b"]
    std = 1.0 / math.sqrt(a.shape[1])
    out[t] = {"lora_a": std * jax.random.normal(k, a.shape, a.dtype),
              "lora_b": jnp.zeros(b.shape, b.dtype)}
  return {"layers": out}


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
  layers = dict(base["layers"])
  for t, adapter in adapters["layers"].items():
    w = layers[t]
    layers[t] = (w.astype(jnp.float32) + delta(adapter, scale)).astype(w.dtype)
  return {**base, "layers": layers}


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


def save_adapters(adapters: Params, lcfg: LoraConfig, directory, base_model: str = "") -> Path:
  """Writes adapter_config.json + adapter_model.safetensors (float32) into `directory`."""
  from safetensors.numpy import save_file
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tensors = {}
  for t, adapter in adapters["layers"].items():
    a, b = np.asarray(adapter["lora_a"], np.float32), np.asarray(adapter["lora_b"], np.float32)
    for i in range(a.shape[0]):
      name = f"{_PEFT_PREFIX}.{i}.{TARGETS[t]}"
      tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[i].T)  # [r, in]
      tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b[i].T)  # [out, r]
  save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lcfg.rank,
            "lora_alpha": lcfg.alpha, "target_modules": list(lcfg.targets),
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "inference_mode": True,
            "base_model_name_or_path": str(base_model)}
  (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
  return directory


def load_adapters(directory) -> tuple[Params, LoraConfig]:
  """Reads `save_adapters` output (or a PEFT LoRA of a Llama/Qwen model) -> (adapters, config)."""
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
  except ValueError as e:
    raise UserError(f"{cfg_path}: target_modules: {e}") from None
  lcfg = LoraConfig(rank=int(meta["r"]), alpha=float(meta["lora_alpha"]), targets=targets)
  tensors = load_file(str(w_path))
  layers = {}
  for t in targets:
    a, b, i = [], [], 0
    while f"{_PEFT_PREFIX}.{i}.{TARGETS[t]}.lora_A.weight" in tensors:
      name = f"{_PEFT_PREFIX}.{i}.{TARGETS[t]}"
      a.append(tensors[f"{name}.lora_A.weight"].T)
      b.append(tensors[f"{name}.lora_B.weight"].T)
      i += 1
    if not a:
      raise UserError(f"{w_path}: no tensors for target {t!r}")
    layers[t] = {"lora_a": jnp.asarray(np.stack(a)), "lora_b": jnp.asarray(np.stack(b))}
  return {"layers": layers}, lcfg
