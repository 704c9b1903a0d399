"""A Llama-family decoder (Llama, Qwen2, Qwen3) in Flax NNX, used functionally.

Its blocks (RMSNorm, rotary, attention, MLP, the residual layer) are also those of
the Qwen3.5 hybrid decoder in `qwen3_5.py`, which `ModelConfig.arch` selects
(`fgrpo_jax.models.decoder(cfg)` returns the module of either).

The NNX module `Decoder` declares the parameters (names, shapes, initialisers);
`init_params` turns it into a plain nested dict of arrays. Every forward function
below is pure: it takes that dict (and an explicit KV cache where there is one) and
returns new arrays. Layers are stacked along a leading axis `L` and applied with
`lax.scan`, so compile time does not grow with depth.

Parameter dict (shapes; `H` query heads, `K` kv heads, `D` head dim, `F` MLP width):

    embed       [V, hidden]
    layers/     attn_norm [L, hidden]   q_proj [L, hidden, H*D]   k_proj [L, hidden, K*D]
                v_proj [L, hidden, K*D] o_proj [L, H*D, hidden]   mlp_norm [L, hidden]
                gate_proj [L, hidden, F] up_proj [L, hidden, F]   down_proj [L, F, hidden]
                (+ q_bias/k_bias/v_bias [L, *] for Qwen2, q_norm/k_norm [L, D] for Qwen3)
    final_norm  [hidden]
    lm_head     [hidden, V]             (absent when embeddings are tied)

Sequences come in two shapes. A *prompt* batch is `[B, P]`. A *completion* batch is
`[B, G, T]`: G continuations of each prompt, which attend to the prompt's keys and
values computed once (`PrefixCache`) plus their own. This shared-prefix attention is
used both by the sampler (one decode step at a time against a `DecodeCache`) and by
the training forward (all T completion tokens at once, gradients flowing back into
the shared prompt).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

Params = dict[str, Any]
_NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyper-parameters (all static)."""

  vocab_size: int = 1000
  num_layers: int = 4
  hidden: int = 256
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 64
  mlp_hidden: int = 768
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None  # HF rope_scaling dict as items
  rms_eps: float = 1e-6
  tie_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2
  qk_norm: bool = False  # Qwen3
  init_std: float = 0.02
  dtype: str = "float32"  # compute dtype; parameters stay float32 unless cast
  remat: str = "none"  # "none" | "full": rematerialise each layer in the backward pass
  # "llama" (this file) | "qwen3_5" (qwen3_5.py: Gated DeltaNet + gated attention layers,
  # zero-centred RMSNorm x * (1 + w), q/k norm, attention output gate, partial rotary).
  arch: str = "llama"
  partial_rotary_factor: float = 1.0  # rotary on the first int(D * factor) dims of a head
  # Qwen3.5 only: "linear_attention" | "full_attention" per layer, and the DeltaNet sizes.
  layer_types: tuple[str, ...] = ()
  linear_num_key_heads: int = 0
  linear_num_value_heads: int = 0
  linear_key_head_dim: int = 0
  linear_value_head_dim: int = 0
  linear_conv_kernel: int = 4
  chunk_size: int = 64  # tokens per chunk of the DeltaNet's parallel (chunked) form

  def __post_init__(self):
    if self.arch not in ("llama", "qwen3_5"):
      raise ValueError(f"model.arch={self.arch!r} is not one of llama, qwen3_5")
    if self.arch == "qwen3_5":
      _check_qwen3_5(self)
    if self.rotary_dim % 2 or self.rotary_dim == 0:
      raise ValueError(f"model.partial_rotary_factor={self.partial_rotary_factor} of "
                       f"head_dim={self.head_dim} must rotate a positive even number of dims")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"model.num_heads={self.num_heads} must be a multiple of "
          f"model.num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"model.head_dim={self.head_dim} must be even (rotary)")

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.partial_rotary_factor)

  @property
  def norm_offset(self) -> float:
    """Qwen3.5 stores RMSNorm weights zero-centred: the scale is 1 + w."""
    return 1.0 if self.arch == "qwen3_5" else 0.0

  @property
  def attn_output_gate(self) -> bool:
    """Qwen3.5: q_proj emits, per head, the query and a sigmoid gate on the output."""
    return self.arch == "qwen3_5"


def _check_qwen3_5(cfg: ModelConfig) -> None:
  kinds = ("linear_attention", "full_attention")
  if len(cfg.layer_types) != cfg.num_layers or any(t not in kinds for t in cfg.layer_types):
    raise ValueError(f"model.layer_types={list(cfg.layer_types)} must name one of {kinds} "
                     f"for each of the {cfg.num_layers} layers")
  if not cfg.qk_norm or cfg.qkv_bias:
    raise ValueError("qwen3_5 attention has q/k norms and no biases (qk_norm=True, qkv_bias=False)")
  if "linear_attention" in cfg.layer_types:
    sizes = (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
             cfg.linear_value_head_dim, cfg.linear_conv_kernel, cfg.chunk_size)
    if min(sizes) < 1:
      raise ValueError("model.linear_* sizes and chunk_size must be positive for DeltaNet layers")
    if cfg.linear_num_value_heads % cfg.linear_num_key_heads:
      raise ValueError(f"model.linear_num_value_heads={cfg.linear_num_value_heads} must be a "
                       f"multiple of model.linear_num_key_heads={cfg.linear_num_key_heads}")


class PrefixCache(NamedTuple):
  """Keys/values of B prompts, shared by their G completions.

  k, v: [L, B, P, K, D]; mask: bool [B, P] (False = left padding);
  length: int32 [B] number of real prompt tokens (the first completion position).
  """

  k: jax.Array
  v: jax.Array
  mask: jax.Array
  length: jax.Array


class DecodeCache(NamedTuple):
  """Keys/values of the generated tokens: k, v [L, B, G, S, K, D]."""

  k: jax.Array
  v: jax.Array


# ----------------------------------------------------------------------------
# Parameters (NNX declares them; we keep them as a plain dict).


class _Stack(nnx.Module):
  """Parameters of all L decoder layers, stacked on a leading axis."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    L, h, H, K, D, F = (cfg.num_layers, cfg.hidden, cfg.num_heads,
                        cfg.num_kv_heads, cfg.head_dim, cfg.mlp_hidden)
    normal = nnx.initializers.normal(cfg.init_std)
    # Residual-branch outputs get a depth-scaled init (GPT-2 style) for stability.
    out_normal = nnx.initializers.normal(cfg.init_std / math.sqrt(2 * L))
    self.attn_norm = nnx.Param(jnp.ones((L, h)))
    self.q_proj = nnx.Param(normal(rngs.params(), (L, h, H * D)))
    self.k_proj = nnx.Param(normal(rngs.params(), (L, h, K * D)))
    self.v_proj = nnx.Param(normal(rngs.params(), (L, h, K * D)))
    self.o_proj = nnx.Param(out_normal(rngs.params(), (L, H * D, h)))
    if cfg.qkv_bias:
      self.q_bias = nnx.Param(jnp.zeros((L, H * D)))
      self.k_bias = nnx.Param(jnp.zeros((L, K * D)))
      self.v_bias = nnx.Param(jnp.zeros((L, K * D)))
    if cfg.qk_norm:
      self.q_norm = nnx.Param(jnp.ones((L, D)))
      self.k_norm = nnx.Param(jnp.ones((L, D)))
    self.mlp_norm = nnx.Param(jnp.ones((L, h)))
    self.gate_proj = nnx.Param(normal(rngs.params(), (L, h, F)))
    self.up_proj = nnx.Param(normal(rngs.params(), (L, h, F)))
    self.down_proj = nnx.Param(out_normal(rngs.params(), (L, F, h)))


class Decoder(nnx.Module):
  """Parameter declaration of the whole decoder."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.embed = nnx.Param(
        nnx.initializers.normal(cfg.init_std)(rngs.params(), (cfg.vocab_size, cfg.hidden)))
    self.layers = _Stack(cfg, rngs)
    self.final_norm = nnx.Param(jnp.ones((cfg.hidden,)))
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Param(
          nnx.initializers.normal(cfg.init_std)(rngs.params(), (cfg.hidden, cfg.vocab_size)))


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
  """Random parameters as a plain nested dict of float32 arrays."""
  model = Decoder(cfg, nnx.Rngs(params=key))
  _, state = nnx.split(model, nnx.Param)
  return nnx.to_pure_dict(state)


def param_shapes(cfg: ModelConfig) -> Params:
  """Shapes/dtypes of `init_params` without allocating (for sharded init and restore)."""
  return jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))


def count_params(params: Params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


# ----------------------------------------------------------------------------
# Building blocks (pure functions over arrays).


def rms_norm(x, scale, eps, offset=0.0):
  """RMSNorm in float32, cast back to x's dtype; the scale is offset + scale (offset 1:
  Qwen3.5's zero-centred weights, added in float32 so bf16 weights lose nothing)."""
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (xf * (offset + scale.astype(jnp.float32))).astype(x.dtype)


def norm(x, scale, cfg: ModelConfig):
  """The model's RMSNorm (plain or zero-centred, by cfg.arch) over the last axis."""
  return rms_norm(x, scale, cfg.rms_eps, cfg.norm_offset)


def _rope_inv_freq(cfg: ModelConfig) -> jax.Array:
  D = cfg.rotary_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))
  scaling = dict(cfg.rope_scaling or ())
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind in ("default", None):
    return inv_freq
  if kind == "linear":
    return inv_freq / scaling["factor"]
  if kind == "llama3":
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = old_len / low, old_len / high
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return jnp.where(mid, smoothed, out)
  raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")


def apply_rope(x, positions, cfg: ModelConfig):
  """Rotary embedding, half-split layout, on the first R = cfg.rotary_dim dims of each
  head (the rest pass through). x [..., T, N, D], positions [..., T]."""
  inv_freq = _rope_inv_freq(cfg)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., T, R/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[..., None, :]  # [..., T, 1, R]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  R = cfg.rotary_dim
  xf = x.astype(jnp.float32)
  xr, rest = xf[..., :R], xf[..., R:]
  rotated = jnp.concatenate([-xr[..., R // 2:], xr[..., :R // 2]], axis=-1)
  return jnp.concatenate([xr * cos + rotated * sin, rest], axis=-1).astype(x.dtype)


def _project_qkv(lp, x, positions, cfg: ModelConfig):
  """x [..., T, hidden] -> q [..., T, H, D], k/v [..., T, K, D] (rotary applied), and
  the output gate [..., T, H, D] (None unless cfg.attn_output_gate)."""
  H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  dt = x.dtype
  q = x @ lp["q_proj"].astype(dt)
  k = x @ lp["k_proj"].astype(dt)
  v = x @ lp["v_proj"].astype(dt)
  if cfg.qkv_bias:
    q, k, v = q + lp["q_bias"].astype(dt), k + lp["k_bias"].astype(dt), v + lp["v_bias"].astype(dt)
  gate = None
  if cfg.attn_output_gate:  # per head: D query features, then D gate features
    q, gate = jnp.split(q.reshape(*q.shape[:-1], H, 2 * D), 2, axis=-1)
  else:
    q = q.reshape(*q.shape[:-1], H, D)
  k = k.reshape(*k.shape[:-1], K, D)
  v = v.reshape(*v.shape[:-1], K, D)
  if cfg.qk_norm:
    q = norm(q, lp["q_norm"], cfg)
    k = norm(k, lp["k_norm"], cfg)
  return apply_rope(q, positions, cfg), apply_rope(k, positions, cfg), v, gate


def _scores(q, k):
  """q [B, *g, T, K, R, D], k [B, *g, S, K, D] -> [B, *g, K, R, T, S] (float32)."""
  return jnp.einsum("...tkrd,...skd->...krts", q, k, preferred_element_type=jnp.float32)


def attention(q, self_k, self_v, self_mask, prefix=None):
  """Grouped-query attention of completion queries over (prefix +) own keys.

  q: [B, G, T, H, D]; self_k/self_v: [B, G, S, K, D]; self_mask: bool [B, G, T, S].
  prefix: optional (k [B, P, K, D], v [B, P, K, D], mask bool [B, P]) shared by all G.
  Returns [B, G, T, H, D].
  """
  B, G, T, H, D = q.shape
  K = self_k.shape[-2]
  q = q.reshape(B, G, T, K, H // K, D) * (D ** -0.5)
  s_self = _scores(q, self_k)  # [B, G, K, R, T, S]
  s_self = jnp.where(self_mask[:, :, None, None], s_self, _NEG_INF)
  if prefix is None:
    probs = jax.nn.softmax(s_self, axis=-1).astype(self_v.dtype)
    out = jnp.einsum("bgkrts,bgskd->bgtkrd", probs, self_v)
  else:
    pk, pv, pmask = prefix
    s_pre = jnp.einsum("bgtkrd,bpkd->bgkrtp", q, pk, preferred_element_type=jnp.float32)
    s_pre = jnp.where(pmask[:, None, None, None, None, :], s_pre, _NEG_INF)
    P = pk.shape[1]
    probs = jax.nn.softmax(jnp.concatenate([s_pre, s_self], axis=-1), axis=-1)
    probs = probs.astype(self_v.dtype)
    out = (jnp.einsum("bgkrtp,bpkd->bgtkrd", probs[..., :P], pv)
           + jnp.einsum("bgkrts,bgskd->bgtkrd", probs[..., P:], self_v))
  return out.reshape(B, G, T, H, D)


def _mlp(lp, x):
  dt = x.dtype
  gate = jax.nn.silu(x @ lp["gate_proj"].astype(dt))
  return (gate * (x @ lp["up_proj"].astype(dt))) @ lp["down_proj"].astype(dt)


def residual_block(lp, x, cfg, mixer):
  """x + mixer(norm(x)), then x + MLP(norm(x)): one pre-norm layer on x [B, G, T, hidden].
  mixer(h) -> (update [B, G, T, hidden], what the layer hands back)."""
  a, out = mixer(norm(x, lp["attn_norm"], cfg))
  x = x + a
  return x + _mlp(lp, norm(x, lp["mlp_norm"], cfg)), out


def _layer(lp, x, positions, cfg, self_kv_fn, self_mask, prefix):
  """One attention layer on x [B, G, T, hidden].

  self_kv_fn(k, v) -> (keys, values, carry_out) decides which keys the tokens see
  (their own, or a cache they are written into) and what the layer hands back.
  """
  def mixer(h):
    q, k, v, gate = _project_qkv(lp, h, positions, cfg)
    keys, values, out_kv = self_kv_fn(k, v)
    a = attention(q, keys, values, self_mask, prefix)
    if gate is not None:
      a = a * jax.nn.sigmoid(gate.astype(jnp.float32)).astype(a.dtype)
    return a.reshape(*a.shape[:-2], -1) @ lp["o_proj"].astype(x.dtype), out_kv

  return residual_block(lp, x, cfg, mixer)


def _embed(params, tokens, cfg):
  return params["embed"][tokens].astype(cfg.compute_dtype)


def _lm_head(params, x, cfg, columns=None):
  """Logits f32 of x [B, ..., h]: over the vocabulary [B, ..., V], or only over the
  token ids `columns` int32 [B, C] -> [B, ..., C] (constrained decoding needs the C
  candidate tokens, not a 150k-wide vocabulary)."""
  x = norm(x, params["final_norm"], cfg)
  if columns is None:
    w = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
    return jnp.einsum("...h,hv->...v", x, w.astype(x.dtype),
                      preferred_element_type=jnp.float32)
  rows = params["embed"][columns] if cfg.tie_embeddings else params["lm_head"].T[columns]
  return jnp.einsum("b...h,bch->b...c", x, rows.astype(x.dtype),
                    preferred_element_type=jnp.float32)


def _scan_layers(params, x, cfg, body, extra=None):
  """Runs `body(layer_params, x, extra_l) -> (x, out_l)` over the L stacked layers."""
  def step(carry, xs):
    lp, ex = xs
    return body(lp, carry, ex)
  if cfg.remat == "full":
    step = jax.checkpoint(step)
  return jax.lax.scan(step, x, (params["layers"], extra))


def _causal_mask(mask):
  """mask [B, T] -> bool [B, T, T]: causal and key not padding."""
  T = mask.shape[-1]
  causal = jnp.tril(jnp.ones((T, T), bool))
  return causal & mask[:, None, :].astype(bool)


def _positions(mask):
  """Left-padded mask [B, P] -> positions counting real tokens from 0."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


# ----------------------------------------------------------------------------
# Public forward functions.


def forward(params: Params, tokens: jax.Array, cfg: ModelConfig,
            mask: jax.Array | None = None) -> jax.Array:
  """Full causal forward. tokens int32 [B, T] (mask bool [B, T]) -> logits f32 [B, T, V]."""
  logits, _ = prefill(params, tokens, cfg, mask, all_logits=True)
  return logits


def prefill(params: Params, tokens: jax.Array, cfg: ModelConfig,
            mask: jax.Array | None = None, all_logits: bool = False, columns=None):
  """Runs the prompts once. tokens [B, P], mask [B, P] (False = left padding).

  Returns (logits, PrefixCache): logits f32 [B, V] of the last position (the
  distribution of the first completion token), or [B, P, V] with all_logits;
  with columns int32 [B, C], only those token ids' logits ([B, C] / [B, P, C]).
  """
  if mask is None:
    mask = jnp.ones(tokens.shape, bool)
  mask = mask.astype(bool)
  positions = _positions(mask)[:, None]  # [B, 1, P]
  self_mask = _causal_mask(mask)[:, None]  # [B, 1, P, P]
  x = _embed(params, tokens, cfg)[:, None]  # [B, 1, P, h]

  def body(lp, x, _):
    return _layer(lp, x, positions, cfg, lambda k, v: (k, v, (k[:, 0], v[:, 0])),
                  self_mask, None)

  x, (k, v) = _scan_layers(params, x, cfg, body)
  x = x[:, 0]
  cache = PrefixCache(k=k, v=v, mask=mask, length=mask.sum(-1).astype(jnp.int32))
  if all_logits:
    return _lm_head(params, x, cfg, columns), cache
  return _lm_head(params, x[:, -1], cfg, columns), cache


def init_decode_cache(cfg: ModelConfig, batch: int, group: int, length: int,
                      prefix: PrefixCache | None = None) -> DecodeCache:
  """Empty keys/values for `length` generated tokens of batch x group sequences. The
  prompt's keys stay in `prefix`, so it is not needed here (Qwen3.5 copies its
  recurrent state from it)."""
  del prefix
  shape = (cfg.num_layers, batch, group, length, cfg.num_kv_heads, cfg.head_dim)
  zeros = jnp.zeros(shape, cfg.compute_dtype)
  return DecodeCache(k=zeros, v=zeros)


def decode_step(params: Params, prefix: PrefixCache, cache: DecodeCache,
                tokens: jax.Array, index: jax.Array, cfg: ModelConfig, columns=None):
  """Feeds one token per sequence and returns the next-token logits.

  tokens int32 [B, G] sit at completion position `index` (a scalar, the same for
  every sequence: decoding is lock-step with static shapes). Returns
  (logits f32 [B, G, V] or, with columns int32 [B, C], [B, G, C]; cache with
  position `index` written).
  """
  B, G = tokens.shape
  S = cache.k.shape[3]
  positions = jnp.broadcast_to((prefix.length + index)[:, None, None], (B, G, 1))
  self_mask = jnp.broadcast_to(jnp.arange(S) <= index, (B, G, 1, S))
  x = _embed(params, tokens, cfg)[:, :, None]  # [B, G, 1, h]

  def body(lp, x, ex):
    pk, pv, ck, cv = ex

    def kv(k, v):
      ck2 = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), index, axis=2)
      cv2 = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), index, axis=2)
      return ck2, cv2, (ck2, cv2)

    return _layer(lp, x, positions, cfg, kv, self_mask, (pk, pv, prefix.mask))

  x, (k, v) = _scan_layers(params, x, cfg, body, (prefix.k, prefix.v, cache.k, cache.v))
  return _lm_head(params, x[:, :, 0], cfg, columns), DecodeCache(k=k, v=v)


def completion_logits(params: Params, prompt: jax.Array, prompt_mask: jax.Array | None,
                      completion: jax.Array, cfg: ModelConfig, columns=None,
                      with_prompt: bool = False):
  """Teacher-forced logits of G completions per prompt, prompt computed once.

  prompt int32 [B, P]; completion int32 [B, G, T]. Returns f32 [B, G, T, V], where
  [:, :, t] is the distribution of completion token t (t = 0 comes from the
  prompt's last position, shared by the group); with columns int32 [B, C] only
  those token ids' logits, [B, G, T, C]. Gradients reach the prompt's keys and
  values through every completion (prefix sharing). with_prompt: returns
  (logits, the prompt's own logits [B, P, C or V]) from the same forward pass.
  """
  return prompt_then_completion(prefill, _completion_rest, params, prompt, prompt_mask,
                                completion, cfg, columns, with_prompt)


def prompt_then_completion(prefill_fn, rest_fn, params, prompt, prompt_mask, completion, cfg,
                           columns, with_prompt):
  """completion_logits of a decoder module from its prefill and its `rest_fn(params,
  prefix, first, completion, cfg, columns)` (the completion given the prompt's cache)."""
  first, prefix = prefill_fn(params, prompt, cfg, prompt_mask, all_logits=with_prompt,
                             columns=columns)
  prompt_logits = first
  if with_prompt:
    first = first[:, -1]
  logits = rest_fn(params, prefix, first, completion, cfg, columns)
  return (logits, prompt_logits) if with_prompt else logits


def _completion_rest(params, prefix: PrefixCache, first, completion, cfg, columns):
  """completion_logits after the prompt: first [B, C or V] of the prompt's last position."""
  B, G, T = completion.shape
  if T == 1:
    return jnp.broadcast_to(first[:, None, None], (B, G, 1, first.shape[-1]))
  inputs = completion[:, :, :-1]  # token t-1 predicts token t
  positions = prefix.length[:, None, None] + jnp.arange(T - 1)
  positions = jnp.broadcast_to(positions, inputs.shape)
  self_mask = jnp.broadcast_to(jnp.tril(jnp.ones((T - 1, T - 1), bool)), (B, G, T - 1, T - 1))
  x = _embed(params, inputs, cfg)

  def body(lp, x, ex):
    pk, pv = ex
    return _layer(lp, x, positions, cfg, lambda k, v: (k, v, None), self_mask,
                  (pk, pv, prefix.mask))

  x, _ = _scan_layers(params, x, cfg, body, (prefix.k, prefix.v))
  rest = _lm_head(params, x, cfg, columns)
  first = jnp.broadcast_to(first[:, None, None], (B, G, 1, first.shape[-1]))
  return jnp.concatenate([first, rest], axis=2)
