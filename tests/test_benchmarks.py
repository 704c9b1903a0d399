"""The model benchmarks run, print the promised JSON, and measure the right thing.

The benchmark scripts run as subprocesses on a tiny workload. They are
compile-bound, so the subprocesses compile with XLA's backend optimisation off
and share a persistent compilation cache: the rollout run goes first (with the
longer RL-step run beside it) and fills it, then the sweep and Hugging Face runs
start together (re-using its compiled rollout); all are checked at the end of the
module. The cheap in-process tests in between check the random workload, the
flag errors and the FLOP counts. The baselines are checked against the library
through the scripts' own outputs: the naive sampler must draw the same tokens as
rollout.sample, the repeated-prompt training forward must give the same loss and
gradients as completion_logits. Needs no torch: without it hf_generate.py must
say so and exit 0.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
TINY = ["--layers", "1", "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--head-dim", "16",
        "--mlp", "64", "--vocab", "100", "--prompts", "2", "--group", "2", "--prompt-len", "24",
        "--pool", "8", "--slate", "4", "--rank", "2", "--seed", "0", "--repeats", "2",
        "--peak-size", "128"]
TINY_T = 4 + 2 + 2 + 1  # k + mid tags + m + end tag
FIRST = ("rollout", ["rollout.py", *TINY, "--naive-prefill", "--json"])
# The longest run; it starts with the first (its rollout compile is a small part of it).
ALONGSIDE = ("rl_step", ["rl_step.py", *TINY, "--train-forward", "--json"])
THEN = {
    "sweep": ["rollout.py", *TINY, "--repeats", "1", "--sweep", "group", "--sweep-values", "2,3",
              "--sweep-repeats", "1"],
    "hf_generate": ["hf_generate.py", *TINY, "--json"],
    "profile_ops": ["profile_ops.py", *TINY, "--json"],
    "compile_time": ["compile_time.py", "--config", "tiny", "--fast-compile", "--programs", "sft",
                     "--json"],
    # Qwen3.5 (every 4th layer attention, the others Gated DeltaNet): 2 layers = 2 DeltaNet.
    "rollout_qwen3_5": ["rollout.py", *TINY, "--layers", "4", "--arch", "qwen3_5",
                        "--linear-key-heads", "1", "--linear-value-heads", "2",
                        "--linear-head-dim", "8", "--chunk-size", "8", "--naive-prefill",
                        "--json"],
}
TIMEOUT = 600


def _env(cache_dir=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
             XLA_FLAGS="--xla_backend_optimization_level=0")  # fast compiles; speed is no concern
  if cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def _start(name, argv, env, logs):
  """Starts a benchmark with stdout/stderr in files (no pipe can fill and stall it)."""
  out = open(logs / f"{name}.out", "w+")
  err = open(logs / f"{name}.err", "w+")
  proc = subprocess.Popen([sys.executable, str(BENCH / argv[0]), *argv[1:]], cwd=REPO, env=env,
                          stdout=out, stderr=err, text=True)
  return proc, out, err


def _finish(started):
  proc, out, err = started
  proc.wait(timeout=TIMEOUT)
  texts = []
  for f in (out, err):
    f.seek(0)
    texts.append(f.read())
    f.close()
  return proc.returncode, texts[0], texts[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Runs the rollout benchmark, then starts the others before the first test that asks
  for them (only the end-to-end tests do: the analytic ones stay in make test-fast)."""
  env = _env(tmp_path_factory.mktemp("jax_cache"))
  logs = tmp_path_factory.mktemp("bench_logs")
  results, started = {}, {}
  first = _start(*FIRST, env, logs)
  started[ALONGSIDE[0]] = _start(*ALONGSIDE, env, logs)
  results[FIRST[0]] = _finish(first)
  started.update({name: _start(name, argv, env, logs) for name, argv in THEN.items()})

  def get(name):
    if name not in results:
      results[name] = _finish(started[name])
    return results[name]

  yield get
  for name, (proc, out, err) in started.items():
    if name not in results:
      proc.kill()
      proc.wait()
      out.close()
      err.close()


def _common():
  """benchmarks/common.py, imported as the scripts import it."""
  if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
  import common  # noqa: PLC0415
  return common


def _json_line(result):
  code, out, err = result
  assert code == 0, f"exit {code}\nstdout:\n{out}\nstderr:\n{err[-3000:]}"
  lines = [ln for ln in out.splitlines() if ln.strip()]
  assert len(lines) == 1, f"expected exactly one JSON line, got:\n{out}"
  return json.loads(lines[0])


def _positive(d, *keys):
  for k in keys:
    assert isinstance(d[k], (int, float)) and math.isfinite(d[k]) and d[k] > 0, (k, d[k])


def _check_common(d):
  assert d["device"].startswith("cpu")
  assert {"jax", "jaxlib", "numpy", "python"} <= set(d["versions"])
  _positive(d, "max_rss_mb")


# ----------------------------------------------------------------------------
# In-process checks (run while the subprocesses compile).


def test_workload_prompts_end_with_the_pool():
  common = _common()
  b = common.make_batch(5, 40, 12, 300, seed=3, relevance=True)
  assert b["prompt"].shape == (5, 40) and b["prompt"].dtype == np.int32
  assert b["prompt_mask"].all() and b["pool_mask"].all()
  np.testing.assert_array_equal(b["prompt"][:, -13:-1], b["cand_tokens"])
  assert (b["prompt"][:, -1] == common.SLATE).all()
  assert all(len(set(row)) == 12 for row in b["cand_tokens"].tolist())
  assert (b["cand_tokens"] >= common.ITEM_OFFSET).all() and (b["prompt"] < 300).all()
  assert (b["relevance"].max(-1) >= 1).all()
  lay = common.layout(10, 5)
  assert lay.length == 18 and len(lay.mid_tags) == 2 and len(lay.end_tags) == 1


def test_flag_errors_are_one_line():
  p = subprocess.run([sys.executable, str(BENCH / "rollout.py"), "--prompt-len", "10"],
                     cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
  assert p.returncode == 2 and "--prompt-len (10) must be >= --pool + 4" in p.stderr


def test_analytic_flops():
  common = _common()
  cfg = common.llama.ModelConfig(vocab_size=60, num_layers=2, hidden=32, num_heads=2,
                                 num_kv_heads=1, head_dim=16, mlp_hidden=64)
  # Repeating the prompt G times costs G-1 extra prefills, nothing else.
  f_shared = common.rollout_flops(cfg, 3, 4, 20, 9)
  f_naive = common.rollout_flops(cfg, 3, 4, 20, 9, shared=False)
  assert math.isclose(f_naive - f_shared, 3 * common.prefill_flops(cfg, 3, 20))
  # One layer, one token, one key: q/k/v/o + SwiGLU projections and q.k, p.v.
  dense = 2 * (32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64)
  assert common.prefill_flops(cfg, 1, 1) == 2 * (dense + 4 * 2 * 16) + 2 * 32 * 60
  assert common.full_forward_flops(cfg, 12, 29) > common.completion_forward_flops(cfg, 3, 4, 20, 9)


def test_analytic_flops_qwen3_5():
  """Per token of a 4-layer Qwen3.5 (3 DeltaNet + 1 gated attention) with one key: the
  attention layer's projections (q_proj twice as wide: the gate) and q.k, p.v; each
  DeltaNet layer's projections, conv and state update; every layer's MLP."""
  common = _common()
  a = common.argparse.Namespace(**{**common.DEFAULTS, **common.QWEN3_5_DEFAULTS, "arch": "qwen3_5",
                                   "layers": 4, "hidden": 32, "heads": 2, "kv_heads": 1,
                                   "head_dim": 16, "mlp": 64, "vocab": 60,
                                   "linear_key_heads": 1, "linear_value_heads": 2,
                                   "linear_head_dim": 8})
  cfg = common.model_config(a)
  assert cfg.layer_types == ("linear_attention",) * 3 + ("full_attention",)
  attention = 2 * (32 * 2 * 32 + 2 * 32 * 16 + 32 * 32) + 4 * 2 * 16
  channels = 2 * 8 + 2 * 8
  deltanet = 2 * (32 * channels + 32 * 16 + 2 * 32 * 2 + 16 * 32 + 4 * channels + 3 * 2 * 8 * 8)
  mlp = 2 * 3 * 32 * 64
  expected = attention + 3 * deltanet + 4 * mlp + 2 * 32 * 60
  assert math.isclose(common.prefill_flops(cfg, 1, 1), expected)


def test_qwen3_5_flag_errors_are_one_line():
  p = subprocess.run([sys.executable, str(BENCH / "rl_step.py"), "--arch", "qwen3_5",
                      "--linear-key-heads", "3"], cwd=REPO, env=_env(), capture_output=True,
                     text=True, timeout=120)
  assert p.returncode == 2 and "linear_num_value_heads" in p.stderr.splitlines()[-1]


def test_hf_generate_without_torch_exits_cleanly():
  code = ("import sys, runpy; sys.modules['torch'] = None; "
          f"sys.argv = ['hf_generate.py', *{TINY!r}]; "
          f"runpy.run_path({str(BENCH / 'hf_generate.py')!r}, run_name='__main__')")
  p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True,
                     text=True, timeout=120)
  assert p.returncode == 0, p.stderr[-2000:]
  assert "not importable" in p.stdout and "skipping" in p.stdout


# ----------------------------------------------------------------------------
# The subprocess runs.


def test_rollout_json(runs):
  d = _json_line(runs("rollout"))
  _check_common(d)
  _positive(d, "prompts_per_s", "generated_tokens_per_s", "compile_s", "flops_per_s",
            "matmul_flops_per_s", "peak_fraction", "shared_vs_naive_speedup")
  assert d["layout_length"] == TINY_T
  assert math.isclose(d["generated_tokens_per_s"], d["prompts_per_s"] * 2 * TINY_T, rel_tol=1e-6)
  assert d["workload"]["prompt_len"] == 24 and d["workload"]["group"] == 2
  naive = d["naive_prefill"]
  _positive(naive, "prompts_per_s", "generated_tokens_per_s")
  assert math.isclose(naive["generated_tokens_per_s"], naive["prompts_per_s"] * 2 * TINY_T,
                      rel_tol=1e-6)
  assert d["naive_vs_shared_flops_ratio"] > 1
  # Same key, same noise: the baseline samples exactly what rollout.sample does.
  assert d["naive_same_tokens_frac"] == 1.0


def test_sweep_table(runs):
  code, out, err = runs("sweep")
  assert code == 0, f"exit {code}\nstdout:\n{out}\nstderr:\n{err[-3000:]}"
  assert out.startswith("# fgrpo_jax rollout benchmark")
  assert "device cpu" in out and "jax " in out  # the header
  assert "| shared prefill (rollout.sample)" in out
  assert "Sweep: group size G" in out
  rows = [ln for ln in out.splitlines() if ln.startswith("| 2 ") or ln.startswith("| 3 ")]
  assert len(rows) == 2, out


def test_rl_step_json(runs):
  d = _json_line(runs("rl_step"))
  _check_common(d)
  _positive(d, "seconds_per_step", "compile_s", "flops_per_s")
  split = d["split"]
  _positive(split, "rollout_s", "reward_s", "update_s")
  assert split["update_s"] < d["seconds_per_step"] * 20  # same order: sanity only
  assert d["layout_length"] == TINY_T and d["inner_steps"] >= 1
  tf = d["train_forward"]
  _positive(tf, "speedup", "flops_ratio")
  _positive(tf["shared"], "seconds_fwd_bwd", "flops_per_s")
  _positive(tf["naive"], "seconds_fwd_bwd", "flops_per_s")
  assert tf["flops_ratio"] > 1
  # completion_logits (shared prefix) and forward on repeated prompts: same loss and grads.
  assert tf["loss_abs_diff"] < 1e-5 and tf["grad_max_abs_diff"] < 1e-5


def test_compile_time_times_each_program_of_a_config(runs):
  """compile_time.py: trace + lower and XLA compile of the SFT step that
  train.stage_step builds for configs/recsys.py:tiny, in a fresh process (the RL step
  alone would double this test's time)."""
  d = _json_line(runs("compile_time"))
  assert d["config"] == "tiny" and d["fast_compile"] and d["repeats"] == 1
  _positive(d, "sft_lower_s", "sft_compile_s")
  assert d["sft_compile_s_all"] == [round(d["sft_compile_s"], 3)]
  assert "rl_compile_s" not in d  # only the programs asked for


def test_compile_time_flag_errors_are_one_line():
  done = subprocess.run([sys.executable, str(BENCH / "compile_time.py"), "--programs", "rollout"],
                        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
  assert done.returncode == 2 and "--programs takes sft,rl" in done.stderr


def test_profile_ops_attributes_the_traced_ops(runs):
  """profile_ops.py: the trace's op times are attributed to kinds that add up, the
  matmuls to llama.py's projection lines, and the RL step's to its named stages."""
  d = _json_line(runs("profile_ops"))
  for program in ("rollout", "rl_step"):
    s = d[program]
    _positive(s, "wall_ms", "thread_ms", "busy_ms", "ops_per_call")
    assert s["busy_ms"] <= s["thread_ms"] * 1.001  # overlap only shrinks the union
    assert sum(s["kinds_ms"].values()) == pytest.approx(s["thread_ms"], rel=1e-6)
    assert s["kinds_ms"]["matmul"] > 0
    matmul_sources = {src for kind, src, _ in s["sources_ms"] if kind == "matmul"}
    assert any(src.startswith("models/llama.py:") for src in matmul_sources), s["sources_ms"]
  stages = d["rl_step"]["stages_ms"]
  assert stages["rollout"] > 0 and stages["update"] > 0, stages
  assert d["rl_step"]["inner_steps"] >= 1


def test_rollout_json_qwen3_5(runs):
  """--arch qwen3_5: the contract line, and the naive sampler (each of the B*G sequences
  with its own prefilled prompt state) draws exactly what the shared-prefix one does."""
  d = _json_line(runs("rollout_qwen3_5"))
  _positive(d, "prompts_per_s", "generated_tokens_per_s", "flops_per_s")
  assert d["workload"]["arch"] == "qwen3_5" and d["workload"]["chunk_size"] == 8
  assert d["layout_length"] == TINY_T and d["naive_same_tokens_frac"] == 1.0
  assert d["naive_vs_shared_flops_ratio"] > 1


def test_hf_generate_json(runs):
  code, out, err = runs("hf_generate")
  try:
    import torch  # noqa: F401
  except ImportError:
    assert code == 0 and "not importable" in out, (out, err[-2000:])
    return
  d = _json_line((code, out, err))
  _check_common(d)
  assert {"torch", "transformers"} <= set(d["versions"])
  _positive(d, "ours_generated_tokens_per_s", "hf_generated_tokens_per_s", "ratio")
  assert d["max_logit_diff"] < 1e-3
  assert str(d["torch_threads"]) in d["hf_seconds_by_threads"]
  assert math.isclose(d["ratio"], d["ours_generated_tokens_per_s"]
                      / d["hf_generated_tokens_per_s"], rel_tol=1e-6)


def test_rollout_on_a_checkpoint_times_its_chat_prompts(tiny_hf_checkpoint, capsys):
  """--hf-checkpoint: the checkpoint's weights and sizes, the task config's chat prompts
  (P = its prompt.max_len, C = its pool), and the prefill / decode split."""
  import jax
  from configs import recsys_llm
  from fgrpo_jax.models import hf
  ckpt = str(tiny_hf_checkpoint(vocab_size=416, tokenizer="chat"))
  _common()
  import rollout as rollout_bench  # noqa: PLC0415  (benchmarks/rollout.py)
  code = rollout_bench.main(["--hf-checkpoint", ckpt, "--task-config",
                             "configs/recsys_llm.py:tiny", "--prompts", "2", "--group", "2",
                             "--repeats", "1", "--peak-size", "64", "--json"])
  assert code == 0
  d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  config = recsys_llm.get_config("tiny")
  cfg, params = hf.load_config_and_params(ckpt)
  w = d["workload"]
  assert (w["prompt_len"], w["pool"]) == (config.prompt.max_len, config.data.pool_size)
  assert (w["slate"], w["rank"], w["layers"], w["vocab"]) == (
      config.rollout.slate_size, config.rollout.rank_size, cfg.num_layers, cfg.vocab_size)
  assert 0 < w["prompt_tokens"] <= w["prompt_len"] and w["hf_checkpoint"] == ckpt
  assert d["num_params"] == sum(x.size for x in jax.tree.leaves(params))
  _positive(d["split"], "prefill_s", "prefill_prompt_tokens_per_s")
  assert math.isclose(d["split"]["prefill_s"] + d["split"]["decode_s"], d["seconds_per_rollout"])
