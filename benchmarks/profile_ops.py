"""Where the time goes: a `jax.profiler` trace of the rollout and of the RL step, per op.

    python benchmarks/profile_ops.py                      # rollout and RL step, default workload
    python benchmarks/profile_ops.py --what rollout --top 25
    python benchmarks/profile_ops.py --what rl_step --inner-steps 1 --trace-dir /tmp/trace

Compiles the program, runs it twice (compile, warm-up), traces --repeats calls with
`jax.profiler.trace` and reads the trace back (the Perfetto `*.trace.json.gz` the
profiler writes beside the TensorBoard files; open either in Perfetto or TensorBoard's
Profile tab to see the timeline). Every timed event that names an instruction of the
compiled XLA module is attributed, through the module's own metadata, to

* a **kind**: matmul (XLA:CPU's YNNPACK/oneDNN fusions and dots), slice (a dynamic
  slice, e.g. one layer's weights cut out of the stacked [L, ...] arrays by the layer
  `scan`, or a cache slot), cache write (dynamic-update-slice), layout copy (transposes
  and copies), other (elementwise fusions, reductions, sampling);
* a **stage** (the `jax.named_scope` of fgrpo_jax/steps.py: rollout, rewards, update);
* the **source line** that emitted it (innermost frame in fgrpo_jax/).

Times are summed over the threads that ran the op (XLA:CPU splits large ops across
its thread pool), so they are thread-milliseconds per call: shares of the CPU work,
not of wall time. Container events (the while loops of the decode and layer scans,
the executor) are left out: their children are counted instead.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py)
from common import rollout_lib  # noqa: E402
from fgrpo_jax import steps as steps_lib  # noqa: E402
from fgrpo_jax.data import arrays as arrays_lib  # noqa: E402

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)\s+(\w[\w\-]*)\(.*?"
                    r"(?:metadata=\{([^}]*)\})?")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")
CONTAINERS = ("while", "conditional", "call", "tuple", "get-tuple-element", "parameter",
              "constant", "bitcast")
KINDS = ("matmul", "slice", "cache write", "layout copy", "other")


def _section(lines, title):
  """Rows "<id> <rest>" of one debug-info section of an HLO module's text."""
  out, inside = {}, False
  for line in lines:
    if line.strip() == title:
      inside = True
      continue
    if inside:
      m = re.match(r"^(\d+) (.*)$", line)
      if not m:
        break
      out[int(m.group(1))] = m.group(2)
  return out


def source_lines(hlo_text: str) -> dict[int, str]:
  """stack_frame_id -> "file.py:line function" of the innermost frame in fgrpo_jax/
  (the call chain is walked outwards when the leaf is in jax itself)."""
  lines = hlo_text.splitlines()
  files = {k: v.strip('"') for k, v in _section(lines, "FileNames").items()}
  funcs = {k: v.strip('"') for k, v in _section(lines, "FunctionNames").items()}
  locs = {}
  for k, v in _section(lines, "FileLocations").items():
    f = dict(re.findall(r"(\w+)=(\d+)", v))
    locs[k] = (files.get(int(f["file_name_id"]), "?"), funcs.get(int(f["function_name_id"]), "?"),
               int(f["line"]))
  frames = {}
  for k, v in _section(lines, "StackFrames").items():
    f = dict(re.findall(r"(\w+)=(\d+)", v))
    frames[k] = (int(f["file_location_id"]), int(f["parent_frame_id"]))

  def describe(fid):
    seen = set()
    while fid in frames and fid not in seen:
      seen.add(fid)
      loc, parent = frames[fid]
      path, func, line = locs.get(loc, ("?", "?", 0))
      if "/fgrpo_jax/" in path:
        return f"{path.split('/fgrpo_jax/')[-1]}:{line} {func}"
      fid = parent
    return "?"
  return {fid: describe(fid) for fid in frames}


def instructions(hlo_text: str) -> dict[str, dict]:
  """HLO instruction name -> {opcode, op_name, source} for every instruction."""
  src = source_lines(hlo_text)
  out = {}
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    name, _, opcode, _ = m.groups()
    op = _OP_NAME.search(line)
    fr = _FRAME.search(line)
    out[name] = {"opcode": opcode, "op_name": op.group(1) if op else "",
                 "source": src.get(int(fr.group(1)), "?") if fr else "?",
                 "ynn": "__ynn_fusion" in line or "__onednn" in line}
  return out


def kind_of(name: str, info: dict) -> str:
  op = info["op_name"]
  if info["ynn"] or info["opcode"] in ("dot", "convolution", "custom-call") or \
     op.endswith("dot_general"):
    return "matmul"
  if op.endswith("dynamic_update_slice") or "dynamic-update-slice" in name:
    return "cache write"
  if op.endswith("dynamic_slice") or "dynamic-slice" in name:
    return "slice"
  if "transpose" in name or name.startswith("copy") or op.endswith("transpose"):
    return "layout copy"
  return "other"


def stage_of(info: dict) -> str:
  for scope in ("reference_logprobs", "rollout", "rewards", "update"):
    if f"/{scope}/" in info["op_name"] or info["op_name"].startswith(f"{scope}/"):
      return scope
  return "-"


def trace_ops(fn, args, repeats: int, trace_dir: str) -> tuple[dict, int]:
  """Runs jitted fn(*args) `repeats` times under the profiler; returns
  ({instruction name: thread-microseconds}, number of calls traced) and the HLO text."""
  compiled = fn.lower(*args).compile()
  text = compiled.as_text()
  for _ in range(2):
    jax.block_until_ready(compiled(*args))
  walls = []
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      walls.append(time.perf_counter() - t0)
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True),
                 key=os.path.getmtime)
  with gzip.open(files[-1]) as f:
    events = json.load(f)["traceEvents"]
  known = instructions(text)
  totals, spans = collections.Counter(), []
  for e in events:
    if e.get("ph") == "X" and e.get("name") in known and \
       known[e["name"]]["opcode"] not in CONTAINERS:
      totals[e["name"]] += e.get("dur", 0)
      spans.append((e["ts"], e["ts"] + e.get("dur", 0)))
  return {"totals": totals, "known": known, "repeats": repeats, "hlo": text,
          "wall_s": statistics.median(walls), "busy_us": _union(spans),
          "ops_per_call": sum(1 for _ in spans) / repeats}


def _union(spans) -> float:
  """Microseconds covered by at least one of the (start, end) spans."""
  total, end = 0.0, -float("inf")
  for a, b in sorted(spans):
    if b > end:
      total += b - max(a, end)
      end = b
  return total


def summary(r: dict, top: int) -> dict:
  """Per-call milliseconds of one traced program: wall, thread time, busy time, and the
  thread time by kind, by stage and by (kind, source line) (the `top` largest)."""
  totals, known, n = r["totals"], r["known"], r["repeats"]
  by_kind, by_stage, by_src = (collections.Counter() for _ in range(3))
  for name, us in totals.items():
    info = known[name]
    by_kind[kind_of(name, info)] += us
    by_stage[stage_of(info)] += us
    by_src[(kind_of(name, info), info["source"])] += us
  ms = lambda us: us / n / 1e3
  return {"wall_ms": r["wall_s"] * 1e3, "thread_ms": ms(sum(totals.values())),
          "busy_ms": ms(r["busy_us"]), "ops_per_call": r["ops_per_call"],
          "distinct_ops": len(totals),
          "kinds_ms": {k: ms(by_kind[k]) for k in KINDS},
          "stages_ms": {k: ms(v) for k, v in by_stage.most_common()},
          "sources_ms": [[k, src, ms(v)] for (k, src), v in by_src.most_common(top)]}


def report(title: str, s: dict) -> str:
  total = s["thread_ms"] or 1.0
  pct = lambda x: f"{100 * x / total:.1f}"
  out = [f"\n## {title}\n\nwall {s['wall_ms']:.1f} ms per call (median of the traced calls); "
         f"{s['ops_per_call']:,.0f} op executions per call ({s['distinct_ops']} distinct ops) "
         f"taking {s['thread_ms']:.1f} thread-ms; some op running {s['busy_ms']:.1f} ms "
         f"({100 * s['busy_ms'] / s['wall_ms']:.0f}% of the wall time; the rest is the "
         "runtime between ops: dispatch, loop control, thread hand-offs)\n"]
  out.append(common.table(["kind", "thread-ms per call", "%"],
                          [[k, v, pct(v)] for k, v in s["kinds_ms"].items()]))
  if len(s["stages_ms"]) > 1:
    out.append(common.table(["stage", "thread-ms per call", "%"],
                            [[k, v, pct(v)] for k, v in s["stages_ms"].items()]))
  out.append(common.table(["kind", "source", "thread-ms per call", "%"],
                          [[k, src, v, pct(v)] for k, src, v in s["sources_ms"]]))
  return "\n\n".join(out)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_workload_flags(p, repeats=5)
  p.add_argument("--what", choices=("rollout", "rl_step", "both"), default="both")
  p.add_argument("--inner-steps", type=int, default=None,
                 help="RL step: gradient steps per rollout batch (default: the config's)")
  p.add_argument("--top", type=int, default=15, help="source lines listed per program")
  p.add_argument("--trace-dir", default="", help="keep the traces here (default: a temp dir)")
  a = p.parse_args(argv)
  common.check_workload(p, a)
  import rl_step as rl_bench  # benchmarks/rl_step.py: the same RL settings and optimizer

  m = common.meta()
  if not a.json:
    print(common.header("fgrpo_jax op profile (jax.profiler trace, thread time per op)", m, a))
  out = {"benchmark": "profile_ops", "device": m["device"], "versions": m["versions"],
         "workload": common.workload_dict(a), "repeats": a.repeats}
  cfg = common.model_config(a)
  lay = common.layout(a.slate, a.rank)
  params = common.init_params(cfg, a.seed)
  batch = arrays_lib.device_batch(common.make_batch(a.prompts, a.prompt_len, a.pool, a.vocab,
                                                    a.seed, relevance=True))
  mb = arrays_lib.model_inputs(batch)
  key = jax.random.key(a.seed + 1)
  root = a.trace_dir or tempfile.mkdtemp(prefix="fgrpo_profile_")
  if a.what in ("rollout", "both"):
    fn = jax.jit(functools.partial(rollout_lib.sample, cfg=cfg, layout=lay,
                                   group_size=a.group))
    r = trace_ops(fn, (params, mb, key), a.repeats, os.path.join(root, "rollout"))
    out["rollout"] = summary(r, a.top)
    if not a.json:
      print(report("rollout.sample", out["rollout"]))
  if a.what in ("rl_step", "both"):
    config = rl_bench.rl_config(a)
    settings = steps_lib.RLSettings.from_config(config)
    optimizer = steps_lib.make_optimizer(config.optim, config.rl.lr,
                                         config.rl.steps * config.rl.inner_steps)
    state = steps_lib.TrainState(params, optimizer.init(params), jax.numpy.zeros((), "int32"))
    # Undonated copy of steps.rl_step, so the same state can be fed to every call.
    fn = jax.jit(functools.partial(steps_lib.rl_step.__wrapped__, settings=settings, cfg=cfg,
                                   layout=lay, optimizer=optimizer))
    r = trace_ops(fn, (state, None, batch, key), a.repeats, os.path.join(root, "rl_step"))
    out["rl_step"] = dict(summary(r, a.top), inner_steps=settings.inner_steps)
    if not a.json:
      print(report(f"steps.rl_step ({settings.algorithm}, {settings.inner_steps} inner steps)",
                   out["rl_step"]))
  out["trace_dir"] = root
  if a.json:
    common.print_json(out)
  else:
    print(f"\ntraces: {root}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
