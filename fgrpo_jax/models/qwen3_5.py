"""The Qwen3.5 text decoder: Gated DeltaNet (linear attention) and gated attention layers.

`cfg.layer_types` names each layer's token mixer: "linear_attention" (a Gated
DeltaNet) or "full_attention" (softmax attention with an output gate). Every layer is
otherwise the same pre-norm block with a SwiGLU MLP (`llama.residual_block`), and the
attention layers *are* `llama._layer` (q/k norm, output gate and partial rotary are
ModelConfig switches), so this file holds only the DeltaNet and the bookkeeping of a
hybrid stack. Forward functions mirror llama.py's (`prefill`, `decode_step`,
`completion_logits`, `forward`) with the same shapes, so `rollout.py` runs either.

Parameter dict (`La` DeltaNet layers, `Lf` attention layers, `L = La + Lf`; DeltaNet
heads: `Hk` key heads of dim `Dk`, `Hv` value heads of dim `Dv`, `Hv` a multiple of
`Hk`; conv width `Kc`, conv channels `Cd = 2*Hk*Dk + Hv*Dv`):

    embed [V, hidden], final_norm [hidden], lm_head [hidden, V] (absent when tied)
    layers/  every layer: attn_norm, mlp_norm [L, hidden]; gate_proj, up_proj [L, hidden, F];
             down_proj [L, F, hidden]
    attn/    q_proj [Lf, hidden, H*2*D] (per head: D query then D gate features)
             k_proj, v_proj [Lf, hidden, K*D]; o_proj [Lf, H*D, hidden]; q_norm, k_norm [Lf, D]
    linear/  in_proj_qkv [La, hidden, Cd]; in_proj_z [La, hidden, Hv*Dv];
             in_proj_a, in_proj_b [La, hidden, Hv]; conv [La, Kc, Cd]; A_log, dt_bias [La, Hv];
             norm [La, Dv]; out_proj [La, Hv*Dv, hidden]

Every RMSNorm weight is zero-centred (scale 1 + w) except the DeltaNet's gated norm
`linear/norm` (scale w), as in the checkpoints.

The Gated DeltaNet, per value head, with state S [Dk, Dv] and token t:

    S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T,   o_t = S_t^T q_t

where q, k come from a causal depthwise conv (+ SiLU) over the fused q/k/v projection,
are L2-normalised (q also scaled by Dk^-1/2), g = -exp(A_log) softplus(a + dt_bias)
is the log decay and beta = sigmoid(b). The output is RMSNorm(o) * SiLU(z). Two forms:
`recurrent_delta_rule` (one state update per token: decoding) and
`chunked_delta_rule` (lax.scan over chunks of `cfg.chunk_size` tokens, matmuls inside
a chunk: prefill and teacher-forced training).

Decode state: the attention layers keep keys/values like Llama (`PrefixCache.k/v` for
the prompt, `DecodeCache.k/v` for the generated tokens); the DeltaNet layers keep the
last Kc-1 conv inputs and the recurrent state, the prompt's in `PrefixCache.conv/state`,
copied into each of the G samples' `DecodeCache.conv/state` by `init_decode_cache`.
Left padding: the DeltaNet zeroes padded inputs, so padding leaves the state at zero
and the conv window at zeros, exactly the unpadded computation.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from fgrpo_jax.models import llama
from fgrpo_jax.models.llama import ModelConfig, Params

LINEAR, FULL = "linear_attention", "full_attention"


class PrefixCache(NamedTuple):
  """State of B prompts after their last token, shared by their G completions.

  k, v: [Lf, B, P, K, D]; mask bool [B, P]; length int32 [B] (as llama.PrefixCache);
  conv: [La, B, Kc-1, Cd] the last conv inputs; state: f32 [La, B, Hv, Dk, Dv].
  """

  k: jax.Array
  v: jax.Array
  mask: jax.Array
  length: jax.Array
  conv: jax.Array
  state: jax.Array


class DecodeCache(NamedTuple):
  """k, v: [Lf, B, G, S, K, D] generated tokens' keys/values; conv [La, B, G, Kc-1, Cd];
  state f32 [La, B, G, Hv, Dk, Dv]: each sample's own DeltaNet state."""

  k: jax.Array
  v: jax.Array
  conv: jax.Array
  state: jax.Array


def counts(cfg: ModelConfig) -> tuple[int, int]:
  """(La, Lf): the number of DeltaNet and attention layers."""
  la = sum(t == LINEAR for t in cfg.layer_types)
  return la, cfg.num_layers - la


def conv_channels(cfg: ModelConfig) -> int:
  return 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + (
      cfg.linear_num_value_heads * cfg.linear_value_head_dim)


# ----------------------------------------------------------------------------
# Parameters.


class _Shared(nnx.Module):
  """Norms and MLP of every layer, stacked [L, ...]."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    L, h, F = cfg.num_layers, cfg.hidden, cfg.mlp_hidden
    normal = nnx.initializers.normal(cfg.init_std)
    out_normal = nnx.initializers.normal(cfg.init_std / math.sqrt(2 * L))
    self.attn_norm = nnx.Param(jnp.zeros((L, h)))  # zero-centred: scale 1 + w
    self.mlp_norm = nnx.Param(jnp.zeros((L, h)))
    self.gate_proj = nnx.Param(normal(rngs.params(), (L, h, F)))
    self.up_proj = nnx.Param(normal(rngs.params(), (L, h, F)))
    self.down_proj = nnx.Param(out_normal(rngs.params(), (L, F, h)))


class _Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, n: int, rngs: nnx.Rngs):
    h, H, K, D = cfg.hidden, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    normal = nnx.initializers.normal(cfg.init_std)
    out_normal = nnx.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.num_layers))
    self.q_proj = nnx.Param(normal(rngs.params(), (n, h, H * 2 * D)))
    self.k_proj = nnx.Param(normal(rngs.params(), (n, h, K * D)))
    self.v_proj = nnx.Param(normal(rngs.params(), (n, h, K * D)))
    self.o_proj = nnx.Param(out_normal(rngs.params(), (n, H * D, h)))
    self.q_norm = nnx.Param(jnp.zeros((n, D)))
    self.k_norm = nnx.Param(jnp.zeros((n, D)))


class _DeltaNet(nnx.Module):
  def __init__(self, cfg: ModelConfig, n: int, rngs: nnx.Rngs):
    h, Hv, Dv, Kc = (cfg.hidden, cfg.linear_num_value_heads, cfg.linear_value_head_dim,
                     cfg.linear_conv_kernel)
    normal = nnx.initializers.normal(cfg.init_std)
    out_normal = nnx.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.num_layers))
    self.in_proj_qkv = nnx.Param(normal(rngs.params(), (n, h, conv_channels(cfg))))
    self.in_proj_z = nnx.Param(normal(rngs.params(), (n, h, Hv * Dv)))
    self.in_proj_a = nnx.Param(normal(rngs.params(), (n, h, Hv)))
    self.in_proj_b = nnx.Param(normal(rngs.params(), (n, h, Hv)))
    self.conv = nnx.Param(nnx.initializers.normal(Kc ** -0.5)(
        rngs.params(), (n, Kc, conv_channels(cfg))))
    self.dt_bias = nnx.Param(jnp.ones((n, Hv)))
    # Decay rates exp(A_log) spread over [1, 16] as in the reference initialisation.
    self.A_log = nnx.Param(jnp.log(jax.random.uniform(rngs.params(), (n, Hv), minval=1.0,
                                                      maxval=16.0)))
    self.norm = nnx.Param(jnp.ones((n, Dv)))
    self.out_proj = nnx.Param(out_normal(rngs.params(), (n, Hv * Dv, h)))


class Decoder(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    la, lf = counts(cfg)
    normal = nnx.initializers.normal(cfg.init_std)
    self.embed = nnx.Param(normal(rngs.params(), (cfg.vocab_size, cfg.hidden)))
    self.layers = _Shared(cfg, rngs)
    if lf:
      self.attn = _Attention(cfg, lf, rngs)
    if la:
      self.linear = _DeltaNet(cfg, la, rngs)
    self.final_norm = nnx.Param(jnp.zeros((cfg.hidden,)))
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Param(normal(rngs.params(), (cfg.hidden, cfg.vocab_size)))


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
  _, state = nnx.split(Decoder(cfg, nnx.Rngs(params=key)), nnx.Param)
  return nnx.to_pure_dict(state)


def param_shapes(cfg: ModelConfig) -> Params:
  return jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))


# ----------------------------------------------------------------------------
# The Gated DeltaNet.


def causal_conv(x, window, kernel):
  """Causal depthwise conv + SiLU. x [..., T, C]; window [..., Kc-1, C] the inputs just
  before x (zeros at a sequence start); kernel [Kc, C] (tap Kc-1 sees the current token).
  Returns (out [..., T, C], the new window [..., Kc-1, C])."""
  T, Kc = x.shape[-2], kernel.shape[0]
  full = jnp.concatenate([window.astype(x.dtype), x], axis=-2)  # [..., Kc-1+T, C]
  out = sum(full[..., j:j + T, :] * kernel[j].astype(x.dtype) for j in range(Kc))
  return jax.nn.silu(out), full[..., T:, :]


def recurrent_delta_rule(q, k, v, g, beta, state):
  """The gated delta rule one token at a time (lax.scan over T).

  q, k [N, T, H, Dk] (normalised); v [N, T, H, Dv]; g (log decay), beta [N, T, H];
  state f32 [N, H, Dk, Dv]. Returns (out f32 [N, T, H, Dv], final state)."""
  def step(S, xs):
    qt, kt, vt, gt, bt = xs  # [N, H, *]
    S = S * jnp.exp(gt)[..., None, None]
    predicted = jnp.einsum("nhk,nhkv->nhv", kt, S)  # what the state recalls for k_t
    S = S + kt[..., None] * ((vt - predicted) * bt[..., None])[..., None, :]
    return S, jnp.einsum("nhk,nhkv->nhv", qt, S)

  xs = tuple(jnp.moveaxis(a.astype(jnp.float32), 1, 0) for a in (q, k, v, g, beta))
  state, out = jax.lax.scan(step, state, xs)
  return jnp.moveaxis(out, 0, 1), state


def unit_lower_inverse(a):
  """(I + a)^-1 for a strictly lower-triangular a [..., C, C], by matmuls only.

  Blockwise from the diagonal out: with the inverses X1, X2 of two diagonal blocks and
  a21 the block below the first, [[I + a11, 0], [a21, I + a22]]^-1 =
  [[X1, 0], [-X2 a21 X1, X2]]; ceil(log2 C) rounds of such merges (C padded to a power
  of two with the identity). As accurate as a solve; the power series
  (I - a)(I + a^2)(I + a^4)... is not (its terms grow and cancel: 1e-3 off at C = 64).

  Not lax.linalg.triangular_solve: on CPU that is jaxlib's (0.10.2) LAPACK trsm call,
  which splits its batch over XLA's intra-op thread pool and blocks a pool thread
  waiting for the pieces; two solves running at once on a 2-core machine (a 2-thread
  pool) wait for each other forever (the Qwen3.5 training run hung idle in its SFT
  step, both pool threads in lapack_strsm_ffi -> ParallelBatchMap). HIGHEST precision:
  TPU's default f32 matmul would round the terms to bf16, a solve does not.
  """
  C = a.shape[-1]
  n = 1 << max(C - 1, 0).bit_length()  # C rounded up to a power of two
  a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, n - C)] * 2)
  lead = a.shape[:-2]
  dot = lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST)
  inv = jnp.ones(lead + (n, 1, 1), a.dtype)  # the n diagonal 1x1 blocks' inverses
  b = 1
  while b < n:
    m = n // (2 * b)  # blocks after this round, each of size 2b
    blocks = a.reshape(lead + (m, 2, b, m, 2, b))
    # a21 of block i: rows (2i+1)b.., columns 2ib.. -> [..., m, b, b]
    a21 = jnp.moveaxis(jnp.diagonal(blocks[..., :, 1, :, :, 0, :], axis1=-4, axis2=-2),
                       -1, -3)
    x = inv.reshape(lead + (m, 2, b, b))
    x1, x2 = x[..., 0, :, :], x[..., 1, :, :]
    x21 = -dot(dot(x2, a21), x1)
    top = jnp.concatenate([x1, jnp.zeros_like(x1)], axis=-1)
    bottom = jnp.concatenate([x21, x2], axis=-1)
    inv = jnp.concatenate([top, bottom], axis=-2)  # [..., m, 2b, 2b]
    b *= 2
  return inv.reshape(lead + (n, n))[..., :C, :C]


def chunked_delta_rule(q, k, v, g, beta, state, chunk: int):
  """The gated delta rule in chunks of `chunk` tokens (same arguments and result as
  `recurrent_delta_rule`).

  Inside a chunk with in-chunk cumulative log decays c_i, the C state writes are
  folded into one lower-triangular solve (the WY / UT form of the delta rule):
  (I + A) [U | W] = [beta v | beta k exp(c)] (by `unit_lower_inverse`) with
  A_ij = beta_i k_i.k_j exp(c_i - c_j) for j < i, so the corrected values are V' = U - W S; then
  out = (q exp(c)) S + tril(q k^T exp(c_i - c_j)) V' and
  S <- exp(c_C) S + (k exp(c_C - c))^T V'. A sequence is padded to whole chunks with
  g = 0, k = v = 0, which leaves the state unchanged.
  """
  N, T, H, Dk = k.shape
  C = chunk
  pad = -T % C
  f32 = lambda a: jnp.pad(a.astype(jnp.float32), [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
  # -> [chunks, N, H, C, ...]: scan over chunks, heads batched.
  split = lambda a: jnp.moveaxis(a.reshape(N, -1, C, *a.shape[2:]), (1, 3), (0, 2))
  q, k, v, g, beta = (split(f32(a)) for a in (q, k, v, g, beta))
  causal = jnp.tril(jnp.ones((C, C), bool))
  strict = jnp.tril(jnp.ones((C, C), bool), -1)

  def step(S, xs):
    q, k, v, g, beta = xs  # q, k [N, H, C, Dk]; v [N, H, C, Dv]; g, beta [N, H, C]
    c = jnp.cumsum(g, axis=-1)
    # exp(c_i - c_j) for j <= i; masked before exp (c_i - c_j > 0 above could overflow).
    decay = jnp.exp(jnp.where(causal, c[..., :, None] - c[..., None, :], -jnp.inf))
    kb = k * beta[..., None]
    A = jnp.where(strict, jnp.einsum("nhik,nhjk->nhij", kb, k) * decay, 0.0)
    rhs = jnp.concatenate([v * beta[..., None], kb * jnp.exp(c)[..., None]], axis=-1)
    uw = unit_lower_inverse(A) @ rhs
    u, w = uw[..., :v.shape[-1]], uw[..., v.shape[-1]:]
    v_new = u - w @ S  # [N, H, C, Dv]
    scores = jnp.einsum("nhik,nhjk->nhij", q, k) * decay
    out = (q * jnp.exp(c)[..., None]) @ S + scores @ v_new
    last = c[..., -1]
    S = S * jnp.exp(last)[..., None, None] + jnp.einsum(
        "nhck,nhcv->nhkv", k * jnp.exp(last[..., None] - c)[..., None], v_new)
    return S, out

  state, out = jax.lax.scan(step, state.astype(jnp.float32), (q, k, v, g, beta))
  out = jnp.moveaxis(out, (0, 2), (1, 3)).reshape(N, T + pad, H, -1)
  return out[:, :T], state


def _l2_normalize(x, eps=1e-6):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def deltanet(lp, h, pad_mask, window, state, cfg: ModelConfig, recurrent: bool):
  """The Gated DeltaNet token mixer on h [B, G, T, hidden] (already normed).

  pad_mask: bool [B, G, T] or None (False = padding: the input is zeroed);
  window [B, G, Kc-1, Cd] and state f32 [B, G, Hv, Dk, Dv]: where the sequences
  continue from. recurrent: token-by-token form instead of the chunked one.
  Returns (out [B, G, T, hidden], (window, state) after the last token).
  """
  Hk, Hv, Dk, Dv = (cfg.linear_num_key_heads, cfg.linear_num_value_heads,
                    cfg.linear_key_head_dim, cfg.linear_value_head_dim)
  B, G, T, _ = h.shape
  dt = h.dtype
  if pad_mask is not None:
    h = jnp.where(pad_mask[..., None], h, 0)
  mixed, window = causal_conv(h @ lp["in_proj_qkv"].astype(dt), window, lp["conv"])
  q, k, v = jnp.split(mixed, [Hk * Dk, 2 * Hk * Dk], axis=-1)
  q = _l2_normalize(q.reshape(B * G, T, Hk, Dk)) * Dk ** -0.5
  k = _l2_normalize(k.reshape(B * G, T, Hk, Dk))
  # Grouped heads: key head i serves value heads i*R .. i*R + R-1.
  q, k = (jnp.repeat(a, Hv // Hk, axis=2) for a in (q, k))
  v = v.reshape(B * G, T, Hv, Dv)
  beta = jax.nn.sigmoid((h @ lp["in_proj_b"].astype(dt)).astype(jnp.float32))
  a = (h @ lp["in_proj_a"].astype(dt)).astype(jnp.float32)
  g = -jnp.exp(lp["A_log"].astype(jnp.float32)) * jax.nn.softplus(
      a + lp["dt_bias"].astype(jnp.float32))
  beta, g = beta.reshape(B * G, T, Hv), g.reshape(B * G, T, Hv)
  S = state.reshape(B * G, Hv, Dk, Dv)
  if recurrent:
    o, S = recurrent_delta_rule(q, k, v, g, beta, S)
  else:
    o, S = chunked_delta_rule(q, k, v, g, beta, S, cfg.chunk_size)
  z = (h @ lp["in_proj_z"].astype(dt)).reshape(B, G, T, Hv, Dv)
  o = llama.rms_norm(o.reshape(B, G, T, Hv, Dv), lp["norm"], cfg.rms_eps)
  o = (o * jax.nn.silu(z.astype(jnp.float32))).astype(dt)
  out = o.reshape(B, G, T, Hv * Dv) @ lp["out_proj"].astype(dt)
  return out, (window, S.reshape(B, G, Hv, Dk, Dv))


def _linear_layer(lp, x, cfg, pad_mask, window, state, recurrent):
  return llama.residual_block(
      lp, x, cfg, lambda h: deltanet(lp, h, pad_mask, window, state, cfg, recurrent))


# ----------------------------------------------------------------------------
# The hybrid stack.


def _period(types: tuple[str, ...]) -> int:
  """The shortest p such that the layer pattern is its first p layers repeated."""
  n = len(types)
  return next(p for p in range(1, n + 1) if n % p == 0 and types == types[:p] * (n // p))


def _run_layers(params, x, cfg, attn_fn, lin_fn, attn_extra=None, lin_extra=None):
  """Applies the L layers in order to x.

  attn_fn(layer params, x, extra) / lin_fn(...) -> (x, out) run one layer of each
  kind; attn_extra / lin_extra are pytrees with leading axis Lf / La (per-layer inputs:
  caches). The layer pattern's period (3 DeltaNet + 1 attention by default) is unrolled
  and lax.scan runs over its repetitions, so compile time does not grow with depth.
  Returns (x, (stacked DeltaNet outs [La, ...], stacked attention outs [Lf, ...])).
  """
  types = tuple(cfg.layer_types)
  p = _period(types)
  n = len(types) // p
  la_p = sum(t == LINEAR for t in types[:p])
  lf_p = p - la_p
  fold = lambda tree, per: jax.tree.map(lambda a: a.reshape(n, per, *a.shape[1:]), tree)
  xs = (fold(params["layers"], p), fold(params.get("linear"), la_p),
        fold(params.get("attn"), lf_p), fold(lin_extra, la_p), fold(attn_extra, lf_p))
  if cfg.remat == "full":
    attn_fn, lin_fn = jax.checkpoint(attn_fn), jax.checkpoint(lin_fn)
  at = lambda tree, i: jax.tree.map(lambda a: a[i], tree)

  def period(x, xs):
    shared, lin, att, lin_ex, att_ex = xs
    lin_out, att_out = [], []
    for j, kind in enumerate(types[:p]):
      if kind == LINEAR:
        i = len(lin_out)
        x, o = lin_fn({**at(shared, j), **at(lin, i)}, x, at(lin_ex, i))
        lin_out.append(o)
      else:
        i = len(att_out)
        x, o = attn_fn({**at(shared, j), **at(att, i)}, x, at(att_ex, i))
        att_out.append(o)
    stack = lambda outs: jax.tree.map(lambda *a: jnp.stack(a), *outs) if outs else None
    return x, (stack(lin_out), stack(att_out))

  x, (lin_out, att_out) = jax.lax.scan(period, x, xs)
  unfold = lambda tree: jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), tree)
  return x, (unfold(lin_out), unfold(att_out))


def _zero_state(cfg: ModelConfig, lead: tuple[int, ...]):
  """Conv window and recurrent state at a sequence start, leading dims `lead`."""
  conv = jnp.zeros(lead + (cfg.linear_conv_kernel - 1, conv_channels(cfg)), cfg.compute_dtype)
  state = jnp.zeros(lead + (cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                            cfg.linear_value_head_dim), jnp.float32)
  return conv, state


def _empty(lead: tuple[int, ...], cfg: ModelConfig, what: str):
  """Zero-size stand-ins for a layer kind the model does not have (La or Lf = 0)."""
  if what == "kv":
    return jnp.zeros(lead + (cfg.num_kv_heads, cfg.head_dim), cfg.compute_dtype)
  return _zero_state(cfg, lead)


# ----------------------------------------------------------------------------
# Public forward functions (the signatures of llama.py's).


def forward(params: Params, tokens: jax.Array, cfg: ModelConfig,
            mask: jax.Array | None = None) -> jax.Array:
  """Full causal forward. tokens int32 [B, T] (mask bool [B, T]) -> logits f32 [B, T, V]."""
  logits, _ = prefill(params, tokens, cfg, mask, all_logits=True)
  return logits


def prefill(params: Params, tokens: jax.Array, cfg: ModelConfig,
            mask: jax.Array | None = None, all_logits: bool = False, columns=None):
  """Runs the prompts once (chunked DeltaNet form). tokens [B, P], mask [B, P] (False =
  left padding). Returns (logits, PrefixCache) as `llama.prefill` does."""
  if mask is None:
    mask = jnp.ones(tokens.shape, bool)
  mask = mask.astype(bool)
  B, P = tokens.shape
  la, lf = counts(cfg)
  positions = llama._positions(mask)[:, None]  # [B, 1, P]
  self_mask = llama._causal_mask(mask)[:, None]  # [B, 1, P, P]
  x = llama._embed(params, tokens, cfg)[:, None]  # [B, 1, P, h]

  def attn_fn(lp, x, _):
    return llama._layer(lp, x, positions, cfg, lambda k, v: (k, v, (k[:, 0], v[:, 0])),
                        self_mask, None)

  def lin_fn(lp, x, _):
    window, state = _zero_state(cfg, (B, 1))
    x, (window, state) = _linear_layer(lp, x, cfg, mask[:, None], window, state, False)
    return x, (window[:, 0], state[:, 0])

  x, (lin_out, att_out) = _run_layers(params, x, cfg, attn_fn, lin_fn)
  k, v = att_out if lf else (_empty((0, B, P), cfg, "kv"),) * 2
  conv, state = lin_out if la else _empty((0, B), cfg, "state")
  cache = PrefixCache(k=k, v=v, mask=mask, length=mask.sum(-1).astype(jnp.int32),
                      conv=conv, state=state)
  x = x[:, 0]
  return llama._lm_head(params, x if all_logits else x[:, -1], cfg, columns), cache


def init_decode_cache(cfg: ModelConfig, batch: int, group: int, length: int,
                      prefix: PrefixCache | None = None) -> DecodeCache:
  """Empty keys/values for `length` generated tokens; each of the `group` samples starts
  from the prompt's conv window and recurrent state (zeros without a prefix)."""
  la, lf = counts(cfg)
  kv = jnp.zeros((lf, batch, group, length, cfg.num_kv_heads, cfg.head_dim), cfg.compute_dtype)
  if prefix is None:
    conv, state = _zero_state(cfg, (la, batch, group))
  else:
    conv, state = (jnp.broadcast_to(a[:, :, None], a.shape[:2] + (group,) + a.shape[2:])
                   for a in (prefix.conv, prefix.state))
  return DecodeCache(k=kv, v=kv, conv=conv, state=state)


def decode_step(params: Params, prefix: PrefixCache, cache: DecodeCache,
                tokens: jax.Array, index: jax.Array, cfg: ModelConfig, columns=None):
  """Feeds one token per sequence (recurrent DeltaNet form); as `llama.decode_step`."""
  B, G = tokens.shape
  S = cache.k.shape[3]
  positions = jnp.broadcast_to((prefix.length + index)[:, None, None], (B, G, 1))
  self_mask = jnp.broadcast_to(jnp.arange(S) <= index, (B, G, 1, S))
  x = llama._embed(params, tokens, cfg)[:, :, None]  # [B, G, 1, h]

  def attn_fn(lp, x, ex):
    pk, pv, ck, cv = ex

    def kv(k, v):
      ck2 = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), index, axis=2)
      cv2 = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), index, axis=2)
      return ck2, cv2, (ck2, cv2)

    return llama._layer(lp, x, positions, cfg, kv, self_mask, (pk, pv, prefix.mask))

  def lin_fn(lp, x, ex):
    window, state = ex
    return _linear_layer(lp, x, cfg, None, window, state, True)

  x, (lin_out, att_out) = _run_layers(params, x, cfg, attn_fn, lin_fn,
                                      (prefix.k, prefix.v, cache.k, cache.v),
                                      (cache.conv, cache.state))
  k, v = att_out if att_out is not None else (cache.k, cache.v)
  conv, state = lin_out if lin_out is not None else (cache.conv, cache.state)
  logits = llama._lm_head(params, x[:, :, 0], cfg, columns)
  return logits, DecodeCache(k=k, v=v, conv=conv, state=state)


def completion_logits(params: Params, prompt: jax.Array, prompt_mask: jax.Array | None,
                      completion: jax.Array, cfg: ModelConfig, columns=None,
                      with_prompt: bool = False):
  """Teacher-forced logits of G completions per prompt, prompt computed once; as
  `llama.completion_logits` (with_prompt too). The DeltaNet layers run the chunked
  form over each completion from the prompt's final conv window and state (gradients
  flow back into the prompt through them, as through the prompt's keys in the
  attention layers)."""
  return llama.prompt_then_completion(prefill, _completion_rest, params, prompt, prompt_mask,
                                      completion, cfg, columns, with_prompt)


def _completion_rest(params, prefix, first, completion, cfg, columns):
  """completion_logits after the prompt: first [B, C or V] of the prompt's last position."""
  B, G, T = completion.shape
  first = jnp.broadcast_to(first[:, None, None], (B, G, 1, first.shape[-1]))
  if T == 1:
    return first
  inputs = completion[:, :, :-1]
  positions = jnp.broadcast_to(prefix.length[:, None, None] + jnp.arange(T - 1), inputs.shape)
  self_mask = jnp.broadcast_to(jnp.tril(jnp.ones((T - 1, T - 1), bool)), (B, G, T - 1, T - 1))
  x = llama._embed(params, inputs, cfg)

  def attn_fn(lp, x, ex):
    pk, pv = ex
    return llama._layer(lp, x, positions, cfg, lambda k, v: (k, v, None), self_mask,
                        (pk, pv, prefix.mask))

  def lin_fn(lp, x, ex):
    window, state = (jnp.broadcast_to(a[:, None], (B, G) + a.shape[1:]) for a in ex)
    x, _ = _linear_layer(lp, x, cfg, None, window, state, False)
    return x, None

  x, _ = _run_layers(params, x, cfg, attn_fn, lin_fn, (prefix.k, prefix.v),
                     (prefix.conv, prefix.state))
  return jnp.concatenate([first, llama._lm_head(params, x, cfg, columns)], axis=2)
