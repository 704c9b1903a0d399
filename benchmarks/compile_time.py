"""Compile time of the jitted steps of a training run, per program: trace + lower, XLA compile.

The programs are built from a config exactly as the training loop builds them
(`train.stage_step`): the SFT step and the RL step (rollout, rewards,
rl.inner_steps updates as one scan, and the per-phase gradient-norm diagnostics),
on the batch shapes of that config (sft.batch_size, rl.batch_prompts x
rollout.group_size, rollout.slate_size / rank_size, data.pool_size) with random
prompts of --prompt-len tokens (benchmarks/common.py's workload). Each program is
lowered and compiled ahead of time (`jitted.lower(...).compile(options)`), so no
step runs; with --fast-compile, with the XLA:CPU options the test suite uses for its
step tests (backend optimisation level 0, no expensive LLVM passes). Each --repeats
round runs in a fresh process (a process compiles a program once), in alternation
over the programs when there are several.

    python benchmarks/compile_time.py                                # configs/recsys.py default
    python benchmarks/compile_time.py --config tiny --fast-compile --repeats 2
    python benchmarks/compile_time.py --config tiny --programs sft --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py)
from fgrpo_jax import config as config_lib  # noqa: E402
from fgrpo_jax import steps as steps_lib  # noqa: E402
from fgrpo_jax import train  # noqa: E402
from fgrpo_jax.data import arrays as arrays_lib  # noqa: E402

PROGRAMS = ("sft", "rl")
# The test suite's fast-compile flags (tests/conftest.py FAST_COMPILE_FLAGS) as options.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                "xla_cpu_use_fusion_emitters": False}


def compile_one(config, program: str, prompt_len: int, fast: bool) -> dict[str, float]:
  """Seconds to trace + lower and to compile one program of `config` (nothing runs)."""
  vocab = 1000
  cfg = config_lib.model_config(config, vocab)
  layout = common.layout(config.rollout.slate_size, config.rollout.rank_size)
  sizes = config_lib.stage_sizes(program, config)  # program = stage: "sft" | "rl"
  optimizer = steps_lib.make_optimizer(config.optim, sizes.lr, sizes.updates)
  fn, static, takes_ref, _ = train.stage_step(program, config, cfg, layout, optimizer)
  params = common.init_params(cfg, config.seed)
  state = steps_lib.TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))
  batch = arrays_lib.device_batch(common.make_batch(
      sizes.batch_size, prompt_len, int(config.data.pool_size), vocab, config.seed,
      relevance=True))
  args = [state] + ([params] if takes_ref else []) + [batch, jax.random.key(0)]
  extra = {"diagnose": jnp.asarray(True)} if takes_ref else {}
  t0 = time.perf_counter()
  lowered = fn.lower(*args, **extra, **static)
  t1 = time.perf_counter()
  lowered.compile(FAST_COMPILE if fast else None)
  t2 = time.perf_counter()
  return {"lower_s": t1 - t0, "compile_s": t2 - t1}


def _child(a) -> None:
  config = common.load_config(a.config)
  out = compile_one(config, a.child, a.prompt_len, a.fast_compile)
  print(json.dumps(out))


def _run_child(a, program: str) -> dict[str, float]:
  argv = [sys.executable, os.path.abspath(__file__), "--child", program, "--config", a.config,
          "--prompt-len", str(a.prompt_len)] + (["--fast-compile"] if a.fast_compile else [])
  env = dict(os.environ)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # a cache hit would time nothing
  done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
  if done.returncode:
    raise SystemExit(f"compile_time.py: {program} failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="default", help="configs/recsys.py variant, e.g. tiny")
  p.add_argument("--programs", default=",".join(PROGRAMS), help="comma-separated: sft,rl")
  p.add_argument("--prompt-len", type=int, default=64)
  p.add_argument("--repeats", type=int, default=1, help="fresh processes per program")
  p.add_argument("--fast-compile", action="store_true", help="the test suite's XLA options")
  p.add_argument("--json", action="store_true", help="one JSON line instead of a table")
  p.add_argument("--child", choices=PROGRAMS, help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.child:
    return _child(a)
  programs = [x for x in a.programs.split(",") if x]
  bad = sorted(set(programs) - set(PROGRAMS))
  if bad or not programs or a.repeats < 1:
    p.error(f"--programs takes {','.join(PROGRAMS)} (got {a.programs!r}); --repeats >= 1")
  times = {x: [] for x in programs}
  for _ in range(a.repeats):
    for x in programs:  # alternated, so every program sees the same machine load
      times[x].append(_run_child(a, x))
  result = {"config": a.config, "fast_compile": a.fast_compile, "repeats": a.repeats,
            "load_average": os.getloadavg()[0], "versions": common.versions()}
  for x, rounds in times.items():
    for key in ("lower_s", "compile_s"):
      result[f"{x}_{key}"] = float(np.median([r[key] for r in rounds]))
      result[f"{x}_{key}_all"] = [round(r[key], 3) for r in rounds]
  if a.json:
    print(json.dumps(result))
    return
  print(f"configs/recsys.py:{a.config}, fast compile {a.fast_compile}, {a.repeats} fresh "
        f"process(es) per program, load average {result['load_average']:.1f}")
  print("| program | trace + lower, s (median) | XLA compile, s (median) | compile, each run |")
  print("|---|---|---|---|")
  for x in programs:
    print(f"| {x} | {result[x + '_lower_s']:.2f} | {result[x + '_compile_s']:.2f} | "
          f"{', '.join(f'{v:.2f}' for v in result[x + '_compile_s_all'])} |")


if __name__ == "__main__":
  main()
