"""Google Tunix (a JAX post-training library) on our contract workload: its sampler and
one step of its GRPO learner.

Tunix is an optional peer, installed into its own virtualenv (its pins conflict with
requirements.txt: google-tunix 0.1.7 needs safetensors < 0.8, our transformers 5.23.0
needs >= 0.8):

    python3 -m venv /tmp/peersvenv
    /tmp/peersvenv/bin/pip install -r benchmarks/requirements-peers.txt
    /tmp/peersvenv/bin/python benchmarks/tunix_grpo.py            # table
    /tmp/peersvenv/bin/python benchmarks/tunix_grpo.py --json     # one JSON line

The model is Tunix's own Llama 3 (`tunix.models.llama3.model.Llama3`) at our sizes,
holding our random float32 weights (benchmarks/common.py, the same --seed). Tunix's
Llama 3 always rotates with base 1e6 (`apply_rope` is called without the config's
rope_theta), ours with 1e4; the logit check therefore compares with our model at
base 1e6, where the two agree to float rounding. The rotary base does not change
the work, so the timings are of the same computation.

    sampler  `tunix.generate.sampler.Sampler`, the vanilla engine of Tunix's RL
             rollouts: B*G prompt strings (each prompt repeated G times; Tunix has no
             shared-prefix sampling), T new tokens each, temperature 1, top_p 1 (plain
             categorical over the vocabulary), a KV cache of exactly P + T slots. The
             timed call is the public `sampler(...)`: tokenising the prompt strings,
             the jitted prefill and decode loop, detokenising. Tunix works on text, so
             the "tokenizer" here maps a token id to its decimal string.
             Our `rollout.sample` runs in alternation in the same process (--no-ours
             skips it), for an in-process ratio.
    GRPO     `tunix.rl.grpo.grpo_learner.GRPOLearner.train` on a colocated RLCluster
             (actor, rollout and reference on one mesh of the CPU device), G =
             --group generations, num_iterations = --inner-steps, beta = --beta (a
             reference model, a copy of the initial weights, only when beta > 0),
             epsilon 0.2, our optimizer (steps.make_optimizer with configs/recsys.py's
             settings), reward = the share of the completion's tokens that are in the
             prompt's pool. One learner step = rollout + reward + advantages (+ old
             log-probs when num_iterations > 1, + reference log-probs when beta > 0)
             + num_iterations optimizer updates; each global step is timed (blocked
             until the weights are ready); the first (compile) and second (warm-up)
             are not counted, the median of the next --repeats is.

No stop token: the end-of-sequence id is one past the vocabulary, so every sequence
generates exactly T = k + 2 + m + 1 tokens, as in ours (Tunix samples freely over the
vocabulary; ours chooses among the pool's C candidates and forces the tags).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py)
from common import llama, rollout_lib  # noqa: E402
from fgrpo_jax.data import arrays as arrays_lib  # noqa: E402

INSTALL = ("python3 -m venv /tmp/peersvenv && /tmp/peersvenv/bin/pip install -r "
           "benchmarks/requirements-peers.txt")


class IdTokenizer:
  """Text <-> token ids for Tunix's string-based sampler: a token is its decimal id."""

  def __init__(self, vocab: int):
    self.vocab = vocab

  def encode(self, text: str, **_) -> list[int]:
    return [int(t) for t in text.split()]

  def decode(self, ids, **_) -> str:
    return " ".join(str(int(i)) for i in ids)

  def bos_id(self) -> int:
    return 1  # fgrpo_jax.data.prompts.BOS: our prompts start with it (Tunix dedups it)

  def eos_id(self) -> int:
    return self.vocab  # never sampled: every sequence runs to the full length

  def pad_id(self) -> int:
    return 0  # fgrpo_jax.data.prompts.PAD (our prompts have no padding)


def tunix_llama(params, cfg: llama.ModelConfig):
  """Tunix's Llama3 at cfg's sizes, holding our weights."""
  from flax import nnx
  from tunix.models.llama3 import model as tl
  tcfg = tl.ModelConfig(num_layers=cfg.num_layers, vocab_size=cfg.vocab_size,
                        embed_dim=cfg.hidden, hidden_dim=cfg.mlp_hidden,
                        num_heads=cfg.num_heads, head_dim=cfg.head_dim,
                        num_kv_heads=cfg.num_kv_heads, rope_theta=int(cfg.rope_theta),
                        norm_eps=cfg.rms_eps, weight_tying=False)
  model = tl.Llama3(tcfg, rngs=nnx.Rngs(0))
  h, H, K, D = cfg.hidden, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  a = lambda x: jnp.asarray(x, jnp.float32)
  model.embedder.input_embedding.value = a(params["embed"])
  model.final_norm.w.value = a(params["final_norm"])
  model.lm_head.w.value = a(params["lm_head"])
  lp = params["layers"]
  for i, layer in enumerate(model.layers):
    layer.input_layernorm.w.value = a(lp["attn_norm"][i])
    layer.post_attention_layernorm.w.value = a(lp["mlp_norm"][i])
    layer.attn.q_proj.w.value = a(lp["q_proj"][i]).reshape(h, H, D)
    layer.attn.k_proj.w.value = a(lp["k_proj"][i]).reshape(h, K, D)
    layer.attn.v_proj.w.value = a(lp["v_proj"][i]).reshape(h, K, D)
    layer.attn.o_proj.w.value = a(lp["o_proj"][i]).reshape(H, D, h)
    for name in ("gate_proj", "up_proj", "down_proj"):
      getattr(layer.mlp, name).kernel.value = a(lp[name][i])
  return model


def logit_check(model, params, cfg, prompt: np.ndarray) -> float:
  """max |last-position logit difference| between Tunix's model and ours (at Tunix's
  rotary base 1e6) on the prompts."""
  B, P = prompt.shape
  tokens = jnp.asarray(prompt)
  positions = jnp.broadcast_to(jnp.arange(P), (B, P))
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((P, P), bool)), (B, P, P))
  theirs, _ = model(tokens, positions, None, mask)
  ours, _ = llama.prefill(params, tokens, dataclasses.replace(cfg, rope_theta=1e6),
                          jnp.ones((B, P), bool))
  return float(jnp.max(jnp.abs(theirs[:, -1] - ours)))


def prompt_strings(prompt: np.ndarray, tok: IdTokenizer) -> list[str]:
  return [tok.decode(row) for row in prompt]


def pool_reward(prompt_len: int, pool: int):
  """A cheap reward: the share of the completion's tokens that are candidates of the
  prompt's pool (the C tokens before the final <slate> tag)."""
  def reward(prompts, completions, **_):
    out = []
    for p, c in zip(prompts, completions):
      cands = set(p.split()[-pool - 1:-1])
      toks = c.split()
      out.append(sum(t in cands for t in toks) / max(len(toks), 1))
    return out
  return reward


def time_sampler(model, params, cfg, a, np_batch, T: int):
  """Tunix's sampler (and ours, in alternation unless --no-ours)."""
  from tunix.generate import sampler as sampler_lib
  B, G, P = a.prompts, a.group, a.prompt_len
  tok = IdTokenizer(a.vocab)
  sampler = sampler_lib.Sampler(model, tok, sampler_lib.CacheConfig(
      cache_size=P + T, num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim))
  strings = [s for s in prompt_strings(np_batch["prompt"], tok) for _ in range(G)]
  seed = a.seed + 1  # an int: the sampler donates its state, a key array in it too

  def tunix_call():
    return sampler(strings, max_generation_steps=T, max_prompt_length=P, temperature=1.0,
                   top_p=1.0, top_k=None, seed=seed, eos_tokens=[tok.eos_id()])

  fns = {"tunix": tunix_call}
  if not a.no_ours:
    lay = common.layout(a.slate, a.rank)
    batch = arrays_lib.device_batch(arrays_lib.model_inputs(np_batch))
    key = jax.random.key(a.seed + 1)
    fns["ours"] = lambda: rollout_lib.sample(params, batch, key, cfg=cfg, layout=lay,
                                             group_size=G)
  ts = common.time_interleaved(fns, a.repeats)
  out = ts["tunix"].result
  lengths = sorted({len(t) for t in out.tokens})
  if len(out.tokens) != B * G or lengths != [T]:
    raise RuntimeError(f"Tunix's sampler returned {len(out.tokens)} sequences of lengths "
                       f"{lengths}, expected {B * G} of {T}")
  return ts


def time_grpo(model, cfg, a, np_batch, T: int) -> dict:
  """Tunix's GRPO learner: per-global-step wall times of one train() call."""
  from flax import nnx
  from jax.sharding import Mesh
  from tunix.rl import rl_cluster as rl_cluster_lib
  from tunix.rl.grpo import grpo_learner
  from tunix.rl.rollout import base_rollout
  from fgrpo_jax import steps as steps_lib
  G, P = a.group, a.prompt_len
  n_steps = 2 + a.repeats  # compile, warm-up, timed
  config = common.load_config("default")
  optimizer = steps_lib.make_optimizer(config.optim, config.rl.lr, n_steps * a.inner_steps)
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
  tok = IdTokenizer(a.vocab)
  role = rl_cluster_lib.Role
  training = rl_cluster_lib.RLTrainingConfig(
      actor_optimizer=optimizer, eval_every_n_steps=10 ** 9,
      max_steps=n_steps * a.inner_steps, pbar_description=None)
  rollout_cfg = base_rollout.RolloutConfig(
      max_tokens_to_generate=T, max_prompt_length=P, temperature=1.0, top_p=1.0,
      top_k=None, kv_cache_size=P + T, eos_tokens=[tok.eos_id()])
  cluster_cfg = rl_cluster_lib.ClusterConfig(
      role_to_mesh={role.ACTOR: mesh, role.REFERENCE: mesh, role.ROLLOUT: mesh},
      rollout_engine="vanilla", offload_to_cpu=False, training_config=training,
      rollout_config=rollout_cfg)
  reference = nnx.clone(model) if a.beta > 0 else None
  cluster = rl_cluster_lib.RLCluster(actor=model, reference=reference, tokenizer=tok,
                                     cluster_config=cluster_cfg)
  algo = grpo_learner.GRPOConfig(num_generations=G, num_iterations=a.inner_steps,
                                 beta=a.beta, epsilon=0.2)
  learner = grpo_learner.GRPOLearner(cluster, algo, reward_fns=[pool_reward(P, a.pool)])

  times: list[float] = []
  run_global_step = learner._run_global_step  # noqa: SLF001 - timed from outside

  def timed_global_step(*args, **kwargs):
    t0 = time.perf_counter()
    run_global_step(*args, **kwargs)
    jax.block_until_ready(nnx.state(cluster.actor_trainer.model))
    times.append(time.perf_counter() - t0)

  learner._run_global_step = timed_global_step
  batch = {"prompts": np.array(prompt_strings(np_batch["prompt"], tok))}
  learner.train([dict(batch) for _ in range(n_steps)])
  if len(times) != n_steps:
    raise RuntimeError(f"Tunix ran {len(times)} global steps, expected {n_steps}")
  timed = times[2:]
  return {"seconds_per_step": statistics.median(timed), "seconds_min": min(timed),
          "compile_s": times[0], "step_times": times,
          "optimizer_updates": cluster.actor_trainer.train_steps}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_workload_flags(p, repeats=5)
  g = p.add_argument_group("Tunix")
  g.add_argument("--beta", type=float, default=0.0,
                 help="GRPO KL coefficient (a reference model when > 0)")
  g.add_argument("--inner-steps", type=int, default=1,
                 help="Tunix's num_iterations: optimizer updates per rollout batch")
  g.add_argument("--skip-sampler", action="store_true", help="time the GRPO step only")
  g.add_argument("--skip-rl", action="store_true", help="time the sampler only")
  g.add_argument("--no-ours", action="store_true",
                 help="do not time our rollout.sample beside Tunix's sampler")
  a = p.parse_args(argv)
  common.check_workload(p, a)
  if a.arch != "llama":
    p.error("--arch: Tunix's Llama 3 only")
  if a.group < 2:
    p.error("--group must be >= 2 (Tunix's num_generations)")
  if a.inner_steps < 1:
    p.error("--inner-steps must be >= 1")
  try:
    import tunix  # noqa: F401
  except Exception as e:  # noqa: BLE001 - ImportError or a broken install
    print(f"tunix_grpo.py: Tunix not importable ({type(e).__name__}: {e}); install it "
          f"into a separate venv: {INSTALL}")
    return 0
  # Tunix logs through absl at INFO; keep the table readable.
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)

  m = common.meta(extra_versions=("google-tunix", "qwix", "transformers"))
  cfg = common.model_config(a)
  lay = common.layout(a.slate, a.rank)
  B, G, P, T = a.prompts, a.group, a.prompt_len, lay.length
  params = common.init_params(cfg, a.seed)
  np_batch = common.make_batch(B, P, a.pool, a.vocab, a.seed)
  model = tunix_llama(params, cfg)
  diff = logit_check(model, params, cfg, np_batch["prompt"])
  if diff > 1e-3:
    raise RuntimeError(f"Tunix's model and ours disagree: max |logit diff| {diff}")

  tokens = B * G * T
  res = {"benchmark": "tunix_grpo", "layout_length": T, "max_logit_diff": diff,
         "beta": a.beta, "inner_steps": a.inner_steps, "device": m["device"],
         "versions": m["versions"], "meta": m, "workload": common.workload_dict(a),
         "repeats": a.repeats, "num_params": llama.count_params(params)}
  if not a.skip_sampler:
    ts = time_sampler(model, params, cfg, a, np_batch, T)
    t = ts["tunix"]
    res.update(generated_tokens_per_s=tokens / t.median_s, sampler_seconds=t.median_s,
               sampler_seconds_min=t.min_s, sampler_compile_s=t.compile_s,
               prompts_per_s=B / t.median_s)
    if "ours" in ts:
      o = ts["ours"]
      res.update(ours_generated_tokens_per_s=tokens / o.median_s, ours_seconds=o.median_s,
                 ours_compile_s=o.compile_s, ratio_ours_over_tunix=t.median_s / o.median_s)
  if not a.skip_rl:
    res.update(time_grpo(model, cfg, a, np_batch, T))
    res["steps_per_s"] = 1.0 / res["seconds_per_step"]
  res["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
  res.update(common.memory_stats())
  if a.json:
    common.print_json(res)
    return 0
  print(common.header("Google Tunix on the contract workload", m, a))
  print(f"{res['num_params']:,} parameters, our weights in Tunix's Llama3 (max |logit "
        f"difference| {diff:.1e}, ours at Tunix's rotary base 1e6); {B}x{G} sequences x "
        f"{T} new tokens")
  if "sampler_seconds" in res:
    rows = [["Tunix: Sampler (B*G prompt strings, top_p=1, T=%d)" % T,
             res["generated_tokens_per_s"], res["prompts_per_s"], res["sampler_seconds"] * 1e3,
             res["sampler_seconds_min"] * 1e3, res["sampler_compile_s"]]]
    if "ours_seconds" in res:
      o = ts["ours"]
      rows.append(["ours: rollout.sample (in alternation)", res["ours_generated_tokens_per_s"],
                   B / o.median_s, o.median_s * 1e3, o.min_s * 1e3, o.compile_s])
    print(common.table(["sampler", "gen tokens/s", "prompts/s", "ms/call (median)",
                        "ms/call (best)", "first call s"], rows, "Sampling throughput"))
    if "ratio_ours_over_tunix" in res:
      print(f"\nours / Tunix tokens per second: {res['ratio_ours_over_tunix']:.2f}x "
            f"(timed in alternation)")
  if "seconds_per_step" in res:
    rows = [[f"Tunix GRPOLearner step (beta={a.beta:g}, num_iterations={a.inner_steps})",
             res["seconds_per_step"] * 1e3, res["seconds_min"] * 1e3, res["compile_s"],
             res["optimizer_updates"]]]
    print(common.table(["RL step", "ms (median)", "ms (best)", "first step s",
                        "optimizer updates"], rows, "GRPO learner"))
  print(f"\n1-min load average after: {res['load_avg_1m_after']}; "
        + common.memory_line(res))
  return 0


if __name__ == "__main__":
  sys.exit(main())
