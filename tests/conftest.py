"""Makes the repository root importable (for `configs`) and keeps JAX on the CPU."""

import os
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent XLA compilation cache for the test session, shared by the xdist
# workers and by the subprocesses tests start (they inherit the environment): many
# tests compile the same tiny-config steps, and compiling is most of their time.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"fgrpo_jax_test_xla_cache_{os.getuid()}"))
# Every program is written (threshold 0): the tiny runs in subprocesses and the two
# xdist workers compile many of the same small programs (cold-cache suite, idle 2-core
# machine: 465 hits instead of 9, 597 s instead of 623 s).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Faster XLA:CPU compiles for the whole session (and the subprocesses tests start): the
# suite is compile-bound (a cold-cache test_compare.py took 290 s with the default LLVM
# optimisation, 184 s with these). FGRPO_TEST_FULL_OPT=1 keeps the default optimisation
# (e.g. to check a failure is not the flags').
# xla_cpu_use_fusion_emitters=false: the older loop emitters compile the tiny-config
# steps 2-3x faster (benchmarks/compile_time.py --config tiny --fast-compile, 2026-12-07:
# sft_step 3.1 -> 1.1 s, rl_step 6.2 -> 2.9 s). Every test and subprocess inherits these
# flags through the environment; none sets its own.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0",
                      "--xla_llvm_disable_expensive_passes=true",
                      "--xla_cpu_use_fusion_emitters=false")
if os.environ.get("FGRPO_TEST_FULL_OPT", "") in ("", "0"):
  _flags = os.environ.get("XLA_FLAGS", "").split()
  os.environ["XLA_FLAGS"] = " ".join(
      _flags + [f for f in FAST_COMPILE_FLAGS if f.split("=")[0] not in
                {g.split("=")[0] for g in _flags}])
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def subprocess_xla_flags(devices: int) -> str:
  """XLA_FLAGS for a child process: this session's flags (the fast-compile ones above)
  with `devices` host CPU devices in place of any device count already set."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  return " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])


import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def load_script():
  """load_script("name") -> the module scripts/name.py (scripts are not a package)."""
  def load(name):
    from fgrpo_jax import cli
    return cli.load_python_file(os.path.join(REPO, "scripts", f"{name}.py"))
  return load


@pytest.fixture(scope="session")
def tiny_hf_checkpoint(tmp_path_factory):
  """make(vocab_size=128, tokenizer=True) -> a tiny random Llama HF checkpoint directory.

  Written with our own exporter (no torch); the tokenizer files are the word-level
  tokenizer of tests/golden/hf/llama_tied (128 tokens), or with tokenizer="chat" the
  tiny BPE chat tokenizer of fgrpo_jax/data/tiny_tokenizer.py (400 tokens, a chat
  template, one-token identifiers). Cached per vocab/tokenizer.
  """
  import shutil
  import jax
  import numpy as np
  from fgrpo_jax.models import hf, llama
  made = {}

  def make(vocab_size: int = 128, tokenizer: bool = True):
    if (vocab_size, tokenizer) not in made:
      cfg = llama.ModelConfig(vocab_size=vocab_size, num_layers=2, hidden=32, num_heads=4,
                              num_kv_heads=2, head_dim=8, mlp_hidden=64)
      rng = np.random.default_rng(vocab_size)  # numpy: no init compile in the tests
      params = jax.tree_util.tree_map_with_path(
          lambda path, x: (1.0 if "norm" in str(path[-1]) else 0.0)
          + rng.normal(0.0, 0.2, x.shape).astype(np.float32), llama.param_shapes(cfg))
      out = tmp_path_factory.mktemp("hf") / f"llama_v{vocab_size}"
      hf.save_hf_checkpoint(params, cfg, out)
      if tokenizer == "chat":
        from fgrpo_jax.data import tiny_tokenizer
        tiny_tokenizer.make_tiny_tokenizer(str(out))
      elif tokenizer:
        golden = os.path.join(os.path.dirname(__file__), "golden", "hf", "llama_tied")
        for name in ("tokenizer.json", "tokenizer_config.json"):
          shutil.copy(os.path.join(golden, name), out / name)
      made[vocab_size, tokenizer] = out
    return made[vocab_size, tokenizer]

  return make


# End-to-end tests (a training run, a subprocess, a notebook, a compiled multi-device
# step): marked `slow`. `make test` runs everything; `make test-fast` (-m "not slow")
# runs the unit tests of rewards, objectives, parse, rollout, models, data readers on
# fixtures and config validation, for the edit-test loop.
SLOW_MODULES = {"test_compare", "test_distributed", "test_llm_configs", "test_notebook",
                "test_sharding", "test_rl_learning", "test_launch", "test_qwen3_5",
                "test_recompile"}
SLOW_TESTS = {
    "test_train": ("tiny_run", "sigkill", "bfloat16", "grad_accumulation", "bad_config",
                   "prompt_lm", "slot_relevance", "tied_targets"),
    "test_lora": ("lora_run", "train_step", "round_trips", "resume", "kl_reference",
                  "trains_and_writes", "qwen3_5_adapters"),
    "test_golden": ("trajectory", "logs_norms"),  # a tiny training run each
    "test_synthetic_qa": ("one_training_step", "policy_report"),
    "test_tasks": ("chat_run",),
    "test_data_recsys_real": ("grain_loader", "one_training_step", "from_main"),
    "test_pretrained": ("zero_shot",),
    "test_chat_prompts": ("rl_step", "train", "run"),
    "test_bad_inputs": ("finished_run", "export", "resume", "lock", "nan", "cli"),
    "test_hf": ("qwen3_5",),  # DeltaNet prefill compiles for seconds per shape
    "test_gguf": ("trains",),
    "test_benchmarks": ("runs", "checkpoint"),  # the benchmark scripts run end to end
    "test_data_multihop_qa": ("training_step",),
}


# Rough cold-cache seconds of the heaviest files (-n 2 on a loaded 2-core machine). With
# --dist loadfile, xdist hands out whole files in collection order, so the heaviest go
# first (longest processing time first); xdist's own reordering (by number of tests) put
# the files of a few long end-to-end tests last, where one worker ran them for minutes
# while the other idled, so it is turned off. (--dist loadgroup with one group per file,
# and the heaviest tests in groups of their own, was tried: module-scoped fixtures were
# then set up again for later tests of the same file, e.g. the sharding worker and the
# tiny run twice each, which cost more than the better balance saved.)
FILE_SECONDS = {"test_rl_learning": 650, "test_sharding": 450, "test_train": 450,
                "test_compare": 400, "test_distributed": 260, "test_llm_configs": 250,
                "test_qwen3_5_train": 150, "test_data_recsys_real": 150, "test_gguf": 150,
                "test_qwen3_5": 150, "test_notebook": 140, "test_tasks": 140, "test_hf": 120,
                "test_chat_prompts": 110, "test_golden": 100, "test_lora": 80,
                "test_bad_inputs": 80}


def pytest_configure(config):
  if getattr(config.option, "loadscopereorder", None):
    config.option.loadscopereorder = False


def _module(item):
  return item.module.__name__.rsplit(".", 1)[-1]


def pytest_collection_modifyitems(config, items):
  items.sort(key=lambda item: -FILE_SECONDS.get(_module(item), 0))  # stable: files stay whole
  for item in items:
    module = _module(item)
    fixtures = " ".join(getattr(item, "fixturenames", ()))
    words = SLOW_TESTS.get(module, ())
    if module in SLOW_MODULES or any(w in item.name or w in fixtures for w in words):
      item.add_marker(pytest.mark.slow)


def pytest_runtest_setup(item):
  """Qwen3.5 (DeltaNet) executables are not written to the persistent compilation cache:
  jaxlib 0.10.2 on CPU aborted a long single-process run twice while reading or writing
  one of them (the tests pass alone). The write threshold is read at every write; the
  cache key lookup is not switchable once a process has used the cache."""
  import jax
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    1e9 if "qwen3_5" in item.nodeid else
                    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


# ----------------------------------------------------------------------------
# Compile time per test (the suite is compile-bound): jax.monitoring's durations of
# tracing, lowering and XLA compiles in this process, attributed to the test running
# (module fixtures to the test that set them up, as --durations does), and the
# persistent-cache hits, with the CPU seconds of the test (this process and the
# subprocesses it waited for: the sharding, distributed and notebook workers). On a
# saturated 2-core machine the suite's wall time is its CPU time over 2, so the summary
# lists the tests by CPU time, which a loaded machine inflates less than --durations
# (spinning thread pools still add some); the compile columns are wall seconds of this
# process's compiles.
COMPILE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
                  "/jax/core/compile/backend_compile_duration": "compile"}
_compile_totals = {"trace": 0.0, "lower": 0.0, "compile": 0.0, "compiles": 0, "cache_hits": 0}
_compile_at_start: dict = {}
_compile_rows: list = []


def _cpu_seconds() -> float:
  t = os.times()
  return t.user + t.system + t.children_user + t.children_system


def _on_duration(event, duration, **_):
  kind = COMPILE_EVENTS.get(event)
  if kind:
    _compile_totals[kind] += duration
    _compile_totals["compiles"] += kind == "compile"


def _on_event(event, **_):
  if event == "/jax/compilation_cache/cache_hits":
    _compile_totals["cache_hits"] += 1


def pytest_sessionstart(session):
  import jax.monitoring
  jax.monitoring.register_event_duration_secs_listener(_on_duration)
  jax.monitoring.register_event_listener(_on_event)


def pytest_runtest_logstart(nodeid, location):
  _compile_at_start.clear()
  _compile_at_start.update(_compile_totals, cpu=_cpu_seconds())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  if call.when == "teardown" and _compile_at_start:
    spent = {k: _compile_totals[k] - _compile_at_start[k] for k in _compile_totals}
    spent["cpu"] = _cpu_seconds() - _compile_at_start["cpu"]
    outcome.get_result().user_properties.append(("compile", spent))


def pytest_runtest_logreport(report):
  """Runs in the xdist controller too: the workers' reports carry user_properties."""
  if report.when == "teardown":
    for name, value in report.user_properties:
      if name == "compile":
        _compile_rows.append((report.nodeid, value))


def pytest_terminal_summary(terminalreporter):
  if not _compile_rows:
    return
  total = {k: sum(v[k] for _, v in _compile_rows) for k in _compile_totals}
  tr = terminalreporter
  cpu = sum(v.get("cpu", 0.0) for _, v in _compile_rows)
  tr.section("CPU and compile time per test (top 15 by CPU seconds)")
  tr.write_line(f"all tests: CPU {cpu:.0f} s; trace {total['trace']:.0f} s, lower "
                f"{total['lower']:.0f} s, XLA compile {total['compile']:.0f} s in "
                f"{total['compiles']} compiles, {total['cache_hits']} persistent-cache hits")
  tr.write_line("    CPU s  compile s (XLA s, compiles, cache hits)  test")
  rows = sorted(_compile_rows, key=lambda r: -r[1].get("cpu", 0.0))
  for nodeid, v in rows[:15]:
    tr.write_line(f"{v.get('cpu', 0.0):8.1f}  {v['trace'] + v['lower'] + v['compile']:8.1f} "
                  f"({v['compile']:6.1f}, {v['compiles']:3d}, {v['cache_hits']:3d})  {nodeid}")
