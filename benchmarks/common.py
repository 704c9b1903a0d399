"""Shared pieces of the model benchmarks (rollout.py, rl_step.py, hf_generate.py).

One place for: the command-line flags of the workload, the random workload
(weights, prompts, pools, relevance), the device / library-version header, the
timing loop, the analytic FLOP counts, the measured matmul peak, peak memory and
table printing.

The workload: B random prompts of exactly `--prompt-len` tokens, laid out like
fgrpo_jax/data/prompts.py (no padding):

    <bos> <hist> h_1 … h_n <pool> c_1 … c_C <slate>

so the last C tokens before the final tag are the pool's candidate tokens (C
distinct item tokens per prompt) and n = prompt_len - C - 4 history tokens.
Random float32 weights, untied embeddings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
  from fgrpo_jax.models import llama
except ImportError:  # running from a checkout without `pip install -e .`
  sys.path.insert(0, REPO)
  from fgrpo_jax.models import llama
from fgrpo_jax import cli
from fgrpo_jax import rollout as rollout_lib
from fgrpo_jax.data import prompts as prompts_lib
from fgrpo_jax.models.decoders import decoder

# Special tokens, as in fgrpo_jax/data/prompts.py; items start after them.
BOS, HIST, POOL, SLATE = prompts_lib.BOS, prompts_lib.HIST, prompts_lib.POOL, prompts_lib.SLATE
ITEM_OFFSET = len(prompts_lib.SPECIAL_TOKENS)
PROMPT_TAGS = 4  # <bos> <hist> <pool> <slate>

DEFAULTS = dict(layers=4, hidden=256, heads=4, kv_heads=2, head_dim=64, mlp=768, vocab=1000,
                prompts=4, group=8, prompt_len=64, pool=20, slate=10, rank=5, seed=0)
ARCHS = ("llama", "qwen3_5")
QWEN3_5_DEFAULTS = dict(linear_key_heads=2, linear_value_heads=4, linear_head_dim=64,
                        chunk_size=64)
FULL_ATTENTION_INTERVAL = 4  # qwen3_5: layer i is attention when (i + 1) % 4 == 0


# ----------------------------------------------------------------------------
# Flags.


def add_workload_flags(p: argparse.ArgumentParser, repeats: int = 10) -> None:
  """The flags every model benchmark takes (the workload and the timing)."""
  d = DEFAULTS
  g = p.add_argument_group("model (random float32 weights, untied embeddings)")
  g.add_argument("--layers", type=int, default=d["layers"], help="decoder layers L")
  g.add_argument("--hidden", type=int, default=d["hidden"], help="residual width")
  g.add_argument("--heads", type=int, default=d["heads"], help="query heads H")
  g.add_argument("--kv-heads", type=int, default=d["kv_heads"], help="key/value heads K")
  g.add_argument("--head-dim", type=int, default=d["head_dim"], help="per-head width D")
  g.add_argument("--mlp", type=int, default=d["mlp"], help="SwiGLU inner width F")
  g.add_argument("--vocab", type=int, default=d["vocab"], help="vocabulary size V")
  g.add_argument("--arch", choices=ARCHS, default="llama",
                 help="llama, or qwen3_5: every 4th layer gated attention (H, K, D as above), "
                      "the others Gated DeltaNet (the next four flags)")
  g.add_argument("--linear-key-heads", type=int, default=QWEN3_5_DEFAULTS["linear_key_heads"],
                 help="qwen3_5: DeltaNet key heads Hk")
  g.add_argument("--linear-value-heads", type=int,
                 default=QWEN3_5_DEFAULTS["linear_value_heads"],
                 help="qwen3_5: DeltaNet value heads Hv (a multiple of Hk)")
  g.add_argument("--linear-head-dim", type=int, default=QWEN3_5_DEFAULTS["linear_head_dim"],
                 help="qwen3_5: DeltaNet key and value head width")
  g.add_argument("--chunk-size", type=int, default=QWEN3_5_DEFAULTS["chunk_size"],
                 help="qwen3_5: tokens per chunk of the DeltaNet's chunked (prefill/training) form")
  g = p.add_argument_group("workload")
  g.add_argument("--prompts", type=int, default=d["prompts"], help="prompts per batch B")
  g.add_argument("--group", type=int, default=d["group"], help="rollouts per prompt G")
  g.add_argument("--prompt-len", type=int, default=d["prompt_len"],
                 help="prompt tokens P, pool and tags included (>= pool + 4)")
  g.add_argument("--pool", type=int, default=d["pool"], help="candidates per prompt C")
  g.add_argument("--slate", type=int, default=d["slate"], help="slate size k")
  g.add_argument("--rank", type=int, default=d["rank"], help="ranking length m")
  g.add_argument("--seed", type=int, default=d["seed"], help="seed of weights and data")
  g = p.add_argument_group("timing / output")
  g.add_argument("--repeats", type=int, default=repeats,
                 help=f"timed calls after the warm-up; the median is reported (default {repeats})")
  g.add_argument("--peak-size", type=int, default=2048,
                 help="N of the N x N float32 matmul timed as the device's matmul peak")
  g.add_argument("--json", action="store_true", help="print exactly one JSON line")


def add_checkpoint_flags(p: argparse.ArgumentParser) -> None:
  """--hf-checkpoint: a real model and real chat prompts instead of the random workload."""
  g = p.add_argument_group("real checkpoint (replaces the random model and prompts)")
  g.add_argument("--hf-checkpoint", default="",
                 help="a local HF checkpoint directory or .gguf file (e.g. the SmolLM2 of "
                      "`make real-assets`): its weights, and chat prompts rendered with its "
                      "tokenizer from the first --prompts test examples of --task-config; "
                      "the model-size, --prompt-len, --pool, --slate and --rank flags are "
                      "then taken from the checkpoint and the task")
  g.add_argument("--task-config", default="configs/recsys_llm.py:smollm2_cpu",
                 help="config (file[:variant]) whose test split gives the chat prompts")


def checkpoint_workload(a):
  """(cfg, params, layout, numpy batch) of --hf-checkpoint on the chat prompts of the first
  --prompts test examples of --task-config (left-padded to its prompt.max_len).

  Overwrites a's model and workload fields with the real ones, so that the header and
  the JSON describe what ran: prompt_len = P, pool = C, slate/rank = the config's k, m.
  """
  import tempfile
  from fgrpo_jax import config as config_lib
  from fgrpo_jax.data import arrays as arrays_lib
  from fgrpo_jax.data import tasks
  from fgrpo_jax.models import hf
  config = cli.load_config_file(a.task_config)
  config.model.hf_checkpoint = os.path.expanduser(a.hf_checkpoint)
  config.mode = "eval"  # renders the validation and test prompts only
  with tempfile.TemporaryDirectory() as tmp:
    task = tasks.load_task(config, tmp, log=lambda *_: None)
  cfg, params = hf.load_config_and_params(config.model.hf_checkpoint)
  lay = config_lib.make_layout(task, config)
  test = task.splits["test"]
  if a.prompts > test["prompt"].shape[0]:
    raise SystemExit(f"--prompts {a.prompts}: the test split of {a.task_config} has only "
                     f"{test['prompt'].shape[0]} examples")
  batch = arrays_lib.host_batch(test, slice(0, a.prompts))
  a.layers, a.hidden, a.heads, a.kv_heads = (cfg.num_layers, cfg.hidden, cfg.num_heads,
                                             cfg.num_kv_heads)
  a.head_dim, a.mlp, a.vocab = cfg.head_dim, cfg.mlp_hidden, cfg.vocab_size
  a.prompt_len, a.pool = batch["prompt"].shape[1], batch["cand_tokens"].shape[1]
  a.slate, a.rank = lay.slate_size, lay.rank_size
  a.prompt_tokens = int(batch["prompt_mask"].sum(1).mean())
  return cfg, params, lay, batch


def check_workload(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
  """parser.error (exit 2, one line) on an impossible workload."""
  positive = ("layers", "hidden", "heads", "kv_heads", "head_dim", "mlp", "vocab", "prompts",
              "group", "prompt_len", "pool", "slate", "rank", "repeats")
  for name in positive:
    if getattr(a, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1")
  if a.heads % a.kv_heads:
    p.error(f"--heads ({a.heads}) must be a multiple of --kv-heads ({a.kv_heads})")
  if a.head_dim % 2:
    p.error(f"--head-dim ({a.head_dim}) must be even (rotary)")
  if not 1 <= a.rank <= a.slate <= a.pool:
    p.error(f"need 1 <= --rank ({a.rank}) <= --slate ({a.slate}) <= --pool ({a.pool})")
  if a.prompt_len < a.pool + PROMPT_TAGS:
    p.error(f"--prompt-len ({a.prompt_len}) must be >= --pool + {PROMPT_TAGS} "
            f"({a.pool + PROMPT_TAGS}): the prompt holds the pool and 4 tags")
  if a.vocab < ITEM_OFFSET + a.pool:
    p.error(f"--vocab ({a.vocab}) must be >= {ITEM_OFFSET} special tokens + --pool ({a.pool})")
  try:
    model_config(a)
  except ValueError as e:  # e.g. DeltaNet value heads not a multiple of key heads
    p.error(str(e))


# ----------------------------------------------------------------------------
# The workload.


def model_config(a) -> llama.ModelConfig:
  sizes = dict(vocab_size=a.vocab, num_layers=a.layers, hidden=a.hidden, num_heads=a.heads,
               num_kv_heads=a.kv_heads, head_dim=a.head_dim, mlp_hidden=a.mlp,
               tie_embeddings=False, dtype="float32")
  if getattr(a, "arch", "llama") == "llama":
    return llama.ModelConfig(**sizes)
  types = tuple("full_attention" if (i + 1) % FULL_ATTENTION_INTERVAL == 0 else
                "linear_attention" for i in range(a.layers))
  return llama.ModelConfig(
      **sizes, arch="qwen3_5", qk_norm=True, partial_rotary_factor=0.25, layer_types=types,
      linear_num_key_heads=a.linear_key_heads, linear_num_value_heads=a.linear_value_heads,
      linear_key_head_dim=a.linear_head_dim, linear_value_head_dim=a.linear_head_dim,
      chunk_size=a.chunk_size)


def init_params(cfg: llama.ModelConfig, seed: int):
  """Random float32 weights of cfg's decoder (llama.py or qwen3_5.py)."""
  return decoder(cfg).init_params(cfg, jax.random.key(seed))


def layout(slate: int, rank: int) -> rollout_lib.Layout:
  """Two mid tags (</slate> <rank>) and one end tag (</rank>), as in data/prompts.py."""
  return prompts_lib.tag_layout(slate, rank)


def make_batch(num_prompts: int, prompt_len: int, pool: int, vocab: int, seed: int,
               relevance: bool = False) -> dict[str, np.ndarray]:
  """Random prompts of exactly `prompt_len` tokens ending `<pool> c_1 … c_C <slate>`.

  Returns numpy prompt int32 [B, P], prompt_mask bool [B, P] (all True),
  cand_tokens int32 [B, C] (distinct item tokens), pool_mask bool [B, C] (all
  True) and, with relevance=True, relevance float32 [B, C] (~30% relevant,
  graded 1..3, at least one relevant per prompt).
  """
  rng = np.random.default_rng(seed)
  n_items = vocab - ITEM_OFFSET
  hist_len = prompt_len - pool - PROMPT_TAGS
  if hist_len < 0 or n_items < pool:
    raise ValueError("prompt_len must be >= pool + 4 and vocab >= pool + 8")
  cands = np.stack([rng.choice(n_items, pool, replace=False) for _ in range(num_prompts)])
  cands = (cands + ITEM_OFFSET).astype(np.int32)
  hist = rng.integers(ITEM_OFFSET, vocab, (num_prompts, hist_len)).astype(np.int32)
  col = lambda t: np.full((num_prompts, 1), t, np.int32)
  prompt = np.concatenate([col(BOS), col(HIST), hist, col(POOL), cands, col(SLATE)], axis=1)
  assert prompt.shape == (num_prompts, prompt_len)
  batch = {"prompt": prompt, "prompt_mask": np.ones(prompt.shape, bool),
           "cand_tokens": cands, "pool_mask": np.ones(cands.shape, bool)}
  if relevance:
    rel = np.where(rng.random((num_prompts, pool)) < 0.3,
                   rng.integers(1, 4, (num_prompts, pool)), 0).astype(np.float32)
    rows, cols = np.arange(num_prompts), rng.integers(0, pool, num_prompts)
    rel[rows, cols] = np.maximum(rel[rows, cols], 1.0)
    batch["relevance"] = rel
  return batch


def load_config(name: str = "default"):
  """configs/recsys.py:get_config(name), imported by path (configs/ is no package)."""
  return cli.load_python_file(os.path.join(REPO, "configs", "recsys.py")).get_config(name)


# ----------------------------------------------------------------------------
# Timing.


@dataclasses.dataclass
class Timing:
  compile_s: float  # first call (trace + compile + one run)
  median_s: float
  times: list[float]
  result: Any = None  # the output of the last call

  @property
  def min_s(self) -> float:
    return min(self.times)


def prefill_call(params, batch, cfg) -> Callable[[], Any]:
  """The shared prefill alone (the first part of rollout.sample): B prompts once, the
  logits of the candidate columns only, as constrained decoding computes them."""
  f = jax.jit(lambda p, tokens, mask, columns: decoder(cfg).prefill(p, tokens, cfg, mask,
                                                                     columns=columns))
  return lambda: f(params, batch["prompt"], batch["prompt_mask"], batch["cand_tokens"])


def time_call(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> Timing:
  """First call = compile (timed separately), `warmup` more untimed calls, then
  `repeats` timed calls, each blocked until ready."""
  return time_interleaved({"fn": fn}, repeats, warmup)["fn"]


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int,
                     warmup: int = 1) -> dict[str, Timing]:
  """Times several calls in alternation (a b, b a, a b, ...) so that each sees the
  same share of a noisy machine; the ratio of their medians is then fair even
  when other jobs come and go. Compile (first call) and warm-up as in time_call."""
  compile_s, out = {}, {}
  for name, fn in fns.items():
    t0 = time.perf_counter()
    out[name] = jax.block_until_ready(fn())
    compile_s[name] = time.perf_counter() - t0
  for _ in range(warmup):
    for name, fn in fns.items():
      out[name] = jax.block_until_ready(fn())
  times: dict[str, list[float]] = {name: [] for name in fns}
  order = list(fns)
  for r in range(repeats):
    for name in (order if r % 2 == 0 else order[::-1]):
      t0 = time.perf_counter()
      out[name] = jax.block_until_ready(fns[name]())
      times[name].append(time.perf_counter() - t0)
  return {name: Timing(compile_s[name], statistics.median(times[name]), times[name], out[name])
          for name in fns}


def matmul_peak(n: int = 2048, repeats: int = 5) -> dict[str, float]:
  """FLOP/s of an n x n float32 matmul on the default device: the 'peak' we compare
  to. The best (fastest) call counts, as a peak should (the median is reported too)."""
  x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  y = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(jnp.dot)
  t = time_call(lambda: f(x, y), repeats)
  flops = 2.0 * n ** 3
  return {"matmul_n": n, "matmul_flops_per_s": flops / t.min_s,
          "matmul_median_flops_per_s": flops / t.median_s}


def best_peak(*peaks: dict[str, float]) -> dict[str, float]:
  """The best of several matmul_peak measurements (taken at different moments)."""
  return max(peaks, key=lambda d: d["matmul_flops_per_s"])


# ----------------------------------------------------------------------------
# Analytic matmul FLOPs (2 per multiply-add), counting what the code executes:
# attention over all key slots of its buffers (masked ones included).


def _attention_fraction(cfg: llama.ModelConfig) -> float:
  """The share of layers that attend over keys (all of a Llama's)."""
  if cfg.arch == "llama":
    return 1.0
  return sum(t == "full_attention" for t in cfg.layer_types) / cfg.num_layers


def _dense_per_token(cfg: llama.ModelConfig) -> float:
  """Per layer (the mean over layers) and token: projections, MLP and, for a Qwen3.5's
  DeltaNet layers, their conv and recurrent state update (k.S, the rank-1 write, q.S:
  3 x Hv*Dk*Dv multiply-adds; the chunked form's in-chunk matmuls are not counted)."""
  h, H, K, D, F = cfg.hidden, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_hidden
  gate = 2 if cfg.attn_output_gate else 1  # a Qwen3.5's q_proj also emits the output gate
  attention = h * gate * H * D + 2 * h * K * D + H * D * h
  mlp = 3 * h * F
  frac = _attention_fraction(cfg)
  if frac == 1.0:
    return 2.0 * (attention + mlp)
  Hv, Dk, Dv = cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
  channels = 2 * cfg.linear_num_key_heads * Dk + Hv * Dv
  deltanet = (h * channels + h * Hv * Dv + 2 * h * Hv + Hv * Dv * h
              + cfg.linear_conv_kernel * channels + 3 * Hv * Dk * Dv)
  return 2.0 * (frac * attention + (1 - frac) * deltanet + mlp)


def _attn_per_pair(cfg: llama.ModelConfig) -> float:
  """q.k and p.v per (query, key) pair, per layer (the mean over layers)."""
  return 4.0 * cfg.num_heads * cfg.head_dim * _attention_fraction(cfg)


def _head(cfg, columns: int | None) -> float:
  """Output-head FLOPs per token: all V logits, or only `columns` (the C candidate
  tokens constrained decoding computes)."""
  return 2.0 * cfg.hidden * (columns or cfg.vocab_size)


def prefill_flops(cfg, n_prompts: int, P: int, logits_per_prompt: int = 1,
                  columns: int | None = None) -> float:
  L = cfg.num_layers
  layers = L * n_prompts * (P * _dense_per_token(cfg) + P * P * _attn_per_pair(cfg))
  return layers + n_prompts * logits_per_prompt * _head(cfg, columns)


def decode_flops(cfg, n_seqs: int, P: int, T: int, steps: int | None = None,
                 columns: int | None = None) -> float:
  """`steps` decode steps (default T - 1) of n_seqs sequences, each attending to the
  P prefix slots and all T slots of its decode cache."""
  steps = T - 1 if steps is None else steps
  per_token = (cfg.num_layers * (_dense_per_token(cfg) + (P + T) * _attn_per_pair(cfg))
               + _head(cfg, columns))
  return steps * n_seqs * per_token


def rollout_flops(cfg, B: int, G: int, P: int, T: int, shared: bool = True,
                  columns: int | None = None) -> float:
  """Shared prefill: B prompts; naive: B*G prompts. Then T-1 decode steps of B*G.
  columns: logits computed per token (the pool size C for constrained decoding)."""
  return (prefill_flops(cfg, B if shared else B * G, P, columns=columns)
          + decode_flops(cfg, B * G, P, T, columns=columns))


def completion_forward_flops(cfg, B: int, G: int, P: int, T: int,
                             columns: int | None = None) -> float:
  """llama.completion_logits: prefill B prompts, then G*(T-1) completion tokens
  attending to P prefix + T-1 own slots, logits of every completion token (all V,
  or `columns` of them)."""
  L = cfg.num_layers
  pre = prefill_flops(cfg, B, P, columns=columns)
  comp = B * G * (T - 1) * (L * (_dense_per_token(cfg) + (P + T - 1) * _attn_per_pair(cfg))
                            + _head(cfg, columns))
  return pre + comp


def full_forward_flops(cfg, n: int, S: int) -> float:
  """llama.forward on n sequences of S tokens (logits at every position)."""
  return prefill_flops(cfg, n, S, logits_per_prompt=S)


# ----------------------------------------------------------------------------
# Memory, header, output.


def memory_stats() -> dict[str, Any]:
  """Peak resident memory of this process (and the device allocator's, if any)."""
  out: dict[str, Any] = {
      "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 - not every backend has it
    stats = None
  if stats:
    for key in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit"):
      if key in stats:
        out[f"device_{key}"] = int(stats[key])
  out["device_memory_stats"] = bool(stats)
  return out


def _version(module: str) -> str | None:
  try:
    from importlib import metadata
    return metadata.version(module)
  except Exception:  # noqa: BLE001
    return None


def versions(extra: Sequence[str] = ()) -> dict[str, str]:
  out = {"python": platform.python_version()}
  for name in ("jax", "jaxlib", "flax", "optax", "numpy", *extra):
    v = _version(name)
    if v:
      out[name] = v
  return out


def device_string() -> str:
  dev = jax.devices()[0]
  return f"{dev.platform}:{getattr(dev, 'device_kind', '') or 'unknown'}"


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def meta(extra_versions: Sequence[str] = ()) -> dict[str, Any]:
  return {"device": device_string(), "n_devices": jax.device_count(),
          "cpu": cpu_model(), "cpu_count": os.cpu_count(),
          "load_avg_1m": round(os.getloadavg()[0], 2),
          "versions": versions(extra_versions)}


def workload_dict(a) -> dict[str, Any]:
  out = {k: getattr(a, k) for k in DEFAULTS}
  out["arch"] = getattr(a, "arch", "llama")
  if out["arch"] == "qwen3_5":
    out.update({k: getattr(a, k) for k in QWEN3_5_DEFAULTS})
  if getattr(a, "hf_checkpoint", ""):
    out.update(hf_checkpoint=a.hf_checkpoint, task_config=a.task_config,
               prompt_tokens=a.prompt_tokens)
  return out


def header(title: str, m: dict[str, Any], a=None) -> str:
  v = ", ".join(f"{k} {x}" for k, x in m["versions"].items())
  lines = [f"# {title}",
           f"device {m['device']} (x{m['n_devices']}), {m['cpu']}, {m['cpu_count']} CPUs, "
           f"1-min load average {m['load_avg_1m']}",
           v]
  if a is not None:
    arch = ("" if getattr(a, "arch", "llama") == "llama" else
            f"qwen3_5 (DeltaNet Hk={a.linear_key_heads} Hv={a.linear_value_heads} "
            f"Dk=Dv={a.linear_head_dim} chunk={a.chunk_size}; every 4th layer attention) ")
    weights = (f"float32, {a.hf_checkpoint}; chat prompts of {a.task_config}, "
               f"{a.prompt_tokens} tokens on average, left-padded"
               if getattr(a, "hf_checkpoint", "") else "float32, random weights")
    lines.append(f"model: {arch}L={a.layers} hidden={a.hidden} H={a.heads} K={a.kv_heads} "
                 f"D={a.head_dim} F={a.mlp} V={a.vocab} ({weights}) | "
                 f"workload: B={a.prompts} G={a.group} P={a.prompt_len} C={a.pool} "
                 f"k={a.slate} m={a.rank} | median of {a.repeats} after warm-up")
  return "\n".join(lines)


def memory_line(out: dict) -> str:
  """The peak-memory line of a result with max_rss_mb (and device_peak_bytes_in_use)."""
  line = f"peak memory: max RSS {out['max_rss_mb']:.0f} MB"
  if out.get("device_peak_bytes_in_use"):
    return line + f", device peak {out['device_peak_bytes_in_use'] / 2**20:.0f} MB"
  return line + " (the device reports no allocator statistics)"


def print_json(obj: dict) -> None:
  print(json.dumps(obj, sort_keys=True, default=float))


def fmt(x: Any) -> str:
  if isinstance(x, str):
    return x
  if isinstance(x, (int, np.integer)):
    return f"{x:,}"
  x = float(x)
  if x == 0:
    return "0"
  if abs(x) >= 1000:
    return f"{x:,.0f}"
  if abs(x) >= 10:
    return f"{x:.1f}"
  if abs(x) >= 0.01:
    return f"{x:.3f}"
  return f"{x:.2e}"


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
  """A Markdown table (first column left-aligned, the rest right-aligned)."""
  cells = [[fmt(c) for c in r] for r in rows]
  widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c)
            for i, c in enumerate(columns)]
  out = [f"\n{title}\n"] if title else []
  out.append("| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(columns, widths))) + " |")
  out.append("|" + "|".join("-" * (w + 1) + ("-" if i == 0 else ":")
                            for i, w in enumerate(widths)) + "|")
  for r in cells:
    out.append("| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(r, widths))) + " |")
  return "\n".join(out)


def gflops(x: float) -> str:
  return f"{x / 1e9:.2f}"
