"""Throughput of the two-phase rollout (`fgrpo_jax.rollout.sample`).

Random float32 weights and random prompts of exactly --prompt-len tokens whose
last C tokens before the final <slate> tag are the pool (see benchmarks/common.py).
One call samples G completions of `layout.length` tokens (k slate choices, 2 mid
tags, m rank choices, 1 end tag: 18 with k=10, m=5) for each of B prompts; forced
tags count as generated tokens. The first call (compile) is timed separately;
then the median of --repeats calls, each blocked until ready.

    python benchmarks/rollout.py                         # table
    python benchmarks/rollout.py --json                  # one JSON line
    python benchmarks/rollout.py --naive-prefill         # + shared vs repeated-prompt prefill
    python benchmarks/rollout.py --sweep all             # + G, C, k, history-length sweeps

Also reports the best (fastest) call beside the median, an analytic matmul-FLOP
count (prefill + decode, see common.py) as achieved FLOP/s and as a fraction of
the matmul peak (the best of an N x N float32 matmul timed before and after, in
the same run), and peak memory (max RSS; the device allocator's where it has one).
--naive-prefill times both samplers in alternation, so their ratio stays fair on
a machine shared with other jobs.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py)
from common import decoder, llama, rollout_lib  # noqa: E402
from fgrpo_jax.data import arrays as arrays_lib  # noqa: E402

SWEEPS = {
    "group": [2, 4, 8, 16, 32],
    "pool": [10, 20, 50, 100],
    "slate": [2, 5, 10, 20],
    "history": [32, 64, 128, 256, 512],
}


# ----------------------------------------------------------------------------
# The naive baseline: every group member prefills its own copy of the prompt.


def _masked_logprobs(slot_logits, allowed, temperature):
  return jax.nn.log_softmax(jnp.where(allowed, slot_logits / temperature, -1e30), axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg", "layout", "group_size"))
def naive_sample(params, batch, key, *, cfg: llama.ModelConfig, layout: rollout_lib.Layout,
                 group_size: int, temperature: float = 1.0):
  """`rollout.sample` without prefix sharing: the prompt is repeated G times,
  the decoder's `prefill` runs on all B*G copies and each sequence decodes against
  its own prefix cache (`decode_step` with G=1 views [B*G, 1]).

  Same schedule and constraints as rollout.sample; with the same key it draws the
  same Gumbel noise (a [B*G, 1, C] array is laid out like [B, G, C]), so the
  samples agree up to float rounding. Returns (tokens, choices, logprobs) [B, G, T].
  """
  G, T = group_size, layout.length
  B, C = batch["cand_tokens"].shape
  N = B * G
  rep = lambda x: jnp.repeat(x, G, axis=0)
  prompt, prompt_mask = rep(batch["prompt"]), rep(batch["prompt_mask"])
  cand = rep(batch["cand_tokens"])[:, None]  # [N, 1, C]
  pool = rep(batch["pool_mask"])[:, None].astype(bool)
  cols = rep(batch["cand_tokens"])  # only the candidates' logits, as rollout.sample
  model = decoder(cfg)
  first_logits, prefix = model.prefill(params, prompt, cfg, prompt_mask, columns=cols)
  cache = model.init_decode_cache(cfg, N, 1, T, prefix)
  kinds = jnp.asarray(layout.kinds)
  forced = jnp.asarray(layout.forced_tokens)

  def choose(t, logits, in_slate, ranked):
    kind = kinds[t]
    allowed = rollout_lib.allowed_slots(kind, in_slate, ranked, pool)
    logp = _masked_logprobs(logits, allowed, temperature)
    choice = jax.random.categorical(jax.random.fold_in(key, t), logp, axis=-1).astype(jnp.int32)
    is_choice = kind != rollout_lib.FORCED
    token = jnp.where(is_choice, jnp.take_along_axis(cand, choice[..., None], -1)[..., 0],
                      forced[t])
    lp = jnp.where(is_choice, jnp.take_along_axis(logp, choice[..., None], -1)[..., 0], 0.0)
    choice = jnp.where(is_choice, choice, -1)
    hot = jax.nn.one_hot(choice, C, dtype=bool)
    in_slate = in_slate | (hot & (kind == rollout_lib.CHOOSE_SLATE))
    ranked = ranked | (hot & (kind == rollout_lib.CHOOSE_RANK))
    return token, choice, lp, in_slate, ranked

  def step(carry, t):
    logits, cache, in_slate, ranked = carry
    token, choice, lp, in_slate, ranked = choose(t, logits, in_slate, ranked)
    logits, cache = model.decode_step(params, prefix, cache, token, t, cfg,
                                      columns=cols)  # token [N, 1]
    return (logits, cache, in_slate, ranked), (token, choice, lp)

  empty = jnp.zeros((N, 1, C), bool)
  (logits, _, in_slate, ranked), outs = jax.lax.scan(
      step, (first_logits[:, None], cache, empty, empty), jnp.arange(T - 1))
  last = choose(T - 1, logits, in_slate, ranked)[:3]
  outs = [jnp.concatenate([x, y[None]], 0) for x, y in zip(outs, last)]  # [T, N, 1]
  return tuple(jnp.moveaxis(x[:, :, 0], 0, -1).reshape(B, G, T) for x in outs)


# ----------------------------------------------------------------------------
# Measurements.


def shared_sampler(params, batch, key, cfg, lay, G):
  return lambda: rollout_lib.sample(params, batch, key, cfg=cfg, layout=lay, group_size=G)


def naive_sampler(params, batch, key, cfg, lay, G):
  return lambda: naive_sample(params, batch, key, cfg=cfg, layout=lay, group_size=G)


def _result(t: "common.Timing", flops: float, B: int, G: int, T: int) -> dict:
  return {"prompts_per_s": B / t.median_s, "generated_tokens_per_s": B * G * T / t.median_s,
          "seconds_per_rollout": t.median_s, "seconds_min": t.min_s,
          "best_generated_tokens_per_s": B * G * T / t.min_s, "compile_s": t.compile_s,
          "flops_per_rollout": flops, "flops_per_s": flops / t.median_s, "layout_length": T}


def _setup(a, params=None, real=None):
  """Config, layout, params, batch and key of one rollout configuration (real: the
  (cfg, params, layout, batch) of common.checkpoint_workload)."""
  if real is not None:
    cfg, params, lay, np_batch = real
    return cfg, lay, params, arrays_lib.device_batch(arrays_lib.model_inputs(np_batch)), \
        jax.random.key(a.seed + 1)
  cfg = common.model_config(a)
  lay = common.layout(a.slate, a.rank)
  if params is None:
    params = common.init_params(cfg, a.seed)
  batch = arrays_lib.device_batch(arrays_lib.model_inputs(common.make_batch(
      a.prompts, a.prompt_len, a.pool, a.vocab, a.seed)))
  return cfg, lay, params, batch, jax.random.key(a.seed + 1)


def measure(a, repeats: int, naive: bool = False, params=None, real=None,
            split: bool = False) -> dict[str, dict]:
  """Times one rollout configuration: {"shared": result} (+ "naive", timed in
  alternation with it; + "prefill", the prefill alone, with split=True). Each result:
  throughput, seconds, FLOPs, compile time."""
  cfg, lay, params, batch, key = _setup(a, params, real)
  B, G, P, T, C = a.prompts, a.group, a.prompt_len, lay.length, a.pool
  fns = {"shared": shared_sampler(params, batch, key, cfg, lay, G)}
  if naive:
    fns["naive"] = naive_sampler(params, batch, key, cfg, lay, G)
  if split:
    fns["prefill"] = common.prefill_call(params, batch, cfg)
  ts = common.time_interleaved(fns, repeats)
  flops = lambda shared: common.rollout_flops(cfg, B, G, P, T, shared=shared, columns=C)
  out = {"shared": _result(ts["shared"], flops(True), B, G, T)}
  if naive:
    out["naive"] = _result(ts["naive"], flops(False), B, G, T)
    # Same key, same Gumbel noise: the baseline must sample what the real sampler does
    # (up to float rounding flipping a near-tie).
    out["naive"]["same_tokens_frac"] = float(jnp.mean(ts["naive"].result[0]
                                                      == ts["shared"].result.tokens))
  if split:  # decode = the rest of the rollout: T-1 steps of B*G sequences
    pre = ts["prefill"]
    out["split"] = {"prefill_s": pre.median_s, "decode_s": ts["shared"].median_s - pre.median_s,
                    "prefill_prompt_tokens_per_s": B * P / pre.median_s,
                    "decode_tokens_per_s": B * G * (T - 1) / (ts["shared"].median_s
                                                              - pre.median_s)}
  return out


def sweep_points(a, name: str, values=None) -> list[argparse.Namespace]:
  """The workloads of one sweep: `a` with one dimension changed."""
  points = []
  hist_len = a.prompt_len - a.pool - common.PROMPT_TAGS
  for value in values or SWEEPS[name]:
    v = argparse.Namespace(**vars(a))
    if name == "group":
      v.group = value
    elif name == "pool":  # history kept, so the prompt grows with the pool
      v.pool, v.prompt_len = value, hist_len + value + common.PROMPT_TAGS
      v.slate = min(a.slate, value)
      v.rank = min(a.rank, v.slate)
      v.vocab = max(a.vocab, value + common.ITEM_OFFSET)
    elif name == "slate":
      if value > a.pool:
        continue
      v.slate, v.rank = value, min(a.rank, value)
    elif name == "history":
      if value < a.pool + common.PROMPT_TAGS:
        continue
      v.prompt_len = value
    v.sweep_value = value
    points.append(v)
  return points


def sweep(a, name: str, repeats: int, values=None) -> list[dict]:
  """All points of a sweep compiled first, then timed in alternation, so that the
  rows of one table share the same machine conditions."""
  points = sweep_points(a, name, values)
  fns, shapes = {}, {}
  for i, v in enumerate(points):
    cfg, lay, params, batch, key = _setup(v)
    fns[i] = shared_sampler(params, batch, key, cfg, lay, v.group)
    shapes[i] = (cfg, lay.length)
  ts = common.time_interleaved(fns, repeats)
  rows = []
  for i, v in enumerate(points):
    cfg, T = shapes[i]
    flops = common.rollout_flops(cfg, v.prompts, v.group, v.prompt_len, T, columns=v.pool)
    r = _result(ts[i], flops, v.prompts, v.group, T)
    r.update({name: v.sweep_value, "group": v.group, "pool": v.pool, "slate": v.slate,
              "rank": v.rank, "prompt_len": v.prompt_len})
    rows.append(r)
  return rows


SWEEP_TITLES = {
    "group": "Sweep: group size G (B prompts fixed)",
    "pool": "Sweep: pool size C (history fixed, so prompt length P = history + C + 4)",
    "slate": "Sweep: slate size k (m = min(m, k); generated length T = k + m + 3)",
    "history": "Sweep: prompt length P (history length = P - C - 4)",
}


def _pct(x: float) -> str:
  return f"{100 * x:.1f}"


def sweep_table(name, rows) -> str:
  cols = [name, "G", "P", "C", "k", "m", "T", "prompts/s", "gen tokens/s", "best tokens/s",
          "ms/rollout", "GFLOP/s", "% peak", "compile s"]
  body = [[str(r[name]), r["group"], r["prompt_len"], r["pool"], r["slate"], r["rank"],
           r["layout_length"], r["prompts_per_s"], r["generated_tokens_per_s"],
           r["best_generated_tokens_per_s"], r["seconds_per_rollout"] * 1e3,
           common.gflops(r["flops_per_s"]), _pct(r["peak_fraction"]), r["compile_s"]]
          for r in rows]
  return common.table(cols, body, SWEEP_TITLES[name])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_workload_flags(p, repeats=10)
  p.add_argument("--naive-prefill", action="store_true",
                 help="also time the rollout with the prompt repeated G times (no prefix "
                      "sharing), in alternation with the shared one")
  p.add_argument("--sweep", action="append", default=[],
                 choices=["group", "pool", "slate", "history", "all"],
                 help="throughput vs G (2..32), C (10..100), k (2..20) or prompt length "
                      "(32..512); repeatable; 'all' runs the four")
  p.add_argument("--sweep-values", default="",
                 help="comma-separated values replacing the default points of a single --sweep")
  p.add_argument("--sweep-repeats", type=int, default=5,
                 help="timed calls per sweep point (the points of a sweep alternate)")
  common.add_checkpoint_flags(p)
  a = p.parse_args(argv)
  common.check_workload(p, a)
  if a.hf_checkpoint and (a.sweep or a.naive_prefill):
    p.error("--hf-checkpoint times the rollout on the real prompts only (no --sweep, "
            "--naive-prefill)")
  sweeps = list(SWEEPS) if "all" in a.sweep else list(dict.fromkeys(a.sweep))
  values = None
  if a.sweep_values:
    if len(sweeps) != 1:
      p.error("--sweep-values needs exactly one --sweep")
    try:
      values = [int(v) for v in a.sweep_values.split(",") if v.strip()]
    except ValueError:
      p.error(f"--sweep-values {a.sweep_values!r}: expected integers like 2,4,8")
    if not values or min(values) < 1:
      p.error("--sweep-values must be positive integers")

  m = common.meta()
  peak_before = common.matmul_peak(a.peak_size)
  real = common.checkpoint_workload(a) if a.hf_checkpoint else None
  if real is None:
    params = common.init_params(common.model_config(a), a.seed)
  else:
    params = real[1]
  res = measure(a, a.repeats, naive=a.naive_prefill, params=params, real=real,
                split=bool(a.hf_checkpoint))
  shared = res["shared"]
  swept = {name: sweep(a, name, a.sweep_repeats, values) for name in sweeps}
  peak = common.best_peak(peak_before, common.matmul_peak(a.peak_size))
  timed = [v for name, v in res.items() if name in ("shared", "naive")]
  for r in [*timed, *(r for rows in swept.values() for r in rows)]:
    r["peak_fraction"] = r["flops_per_s"] / peak["matmul_flops_per_s"]

  out = {"benchmark": "rollout", **shared, "device": m["device"], "versions": m["versions"],
         "meta": m, "workload": common.workload_dict(a), "repeats": a.repeats,
         "num_params": llama.count_params(params), **peak}
  if a.naive_prefill:
    naive = res["naive"]
    out["naive_prefill"] = naive
    out["shared_vs_naive_speedup"] = naive["seconds_per_rollout"] / shared["seconds_per_rollout"]
    out["shared_vs_naive_speedup_best"] = naive["seconds_min"] / shared["seconds_min"]
    out["naive_vs_shared_flops_ratio"] = naive["flops_per_rollout"] / shared["flops_per_rollout"]
    out["naive_same_tokens_frac"] = naive["same_tokens_frac"]
  if sweeps:
    out["sweeps"] = swept
  if "split" in res:
    out["split"] = res["split"]
  out.update(common.memory_stats())

  if a.json:
    common.print_json(out)
    return 0
  print(common.header("fgrpo_jax rollout benchmark (rollout.sample)", m, a))
  print(f"{out['num_params']:,} parameters; generated length T = {shared['layout_length']} "
        f"(k={a.slate} slate + 2 tags + m={a.rank} rank + 1 tag); matmul peak "
        f"({a.peak_size}^2 f32, best call) {common.gflops(peak['matmul_flops_per_s'])} GFLOP/s")
  rows = [("shared prefill (rollout.sample)", shared)]
  if a.naive_prefill:
    rows.append(("naive: prompt repeated G times", res["naive"]))
  cols = ["variant", "prompts/s", "gen tokens/s", "best tokens/s", "ms/rollout",
          "GFLOP/rollout", "GFLOP/s", "% peak", "compile s"]
  print(common.table(cols, [[n, r["prompts_per_s"], r["generated_tokens_per_s"],
                             r["best_generated_tokens_per_s"], r["seconds_per_rollout"] * 1e3,
                             common.gflops(r["flops_per_rollout"]), common.gflops(r["flops_per_s"]),
                             _pct(r["peak_fraction"]), r["compile_s"]] for n, r in rows],
                     "Rollout"))
  if a.naive_prefill:
    print(f"\nshared / naive prefill throughput: {out['shared_vs_naive_speedup']:.2f}x median, "
          f"{out['shared_vs_naive_speedup_best']:.2f}x best (timed in alternation; analytic "
          f"FLOPs naive / shared {out['naive_vs_shared_flops_ratio']:.2f}x); the naive sampler "
          f"drew the same tokens on {100 * out['naive_same_tokens_frac']:.1f}% of positions")
  if "split" in out:
    sp = out["split"]
    print(f"\nprefill (B={a.prompts} prompts of {a.prompt_len} slots, timed alone): "
          f"{sp['prefill_s'] * 1e3:.1f} ms, {sp['prefill_prompt_tokens_per_s']:,.0f} prompt "
          f"tokens/s; decode (the rest: {shared['layout_length'] - 1} steps of "
          f"{a.prompts * a.group} sequences): {sp['decode_s'] * 1e3:.1f} ms, "
          f"{sp['decode_tokens_per_s']:,.0f} tokens/s")
  for name in sweeps:
    print(sweep_table(name, swept[name]))
  print("\n" + common.memory_line(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
