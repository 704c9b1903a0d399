"""Ours against the peers in one run: our rollout and RL step, Hugging Face `generate`
and Google Tunix's sampler and GRPO learner, each benchmark a subprocess, the whole
set run --rounds times in alternation (a b c, c b a, ...), the median of each number
over the rounds, and the ratios of those medians.

    python benchmarks/peers.py                                   # table
    python benchmarks/peers.py --json                            # one JSON line
    python benchmarks/peers.py --tunix-python /tmp/peersvenv/bin/python --rounds 3

The benchmarks it runs (every one on the contract workload of benchmarks/common.py, with
--repeats forwarded):

    ours    benchmarks/rollout.py --json
            benchmarks/rl_step.py --json --inner-steps 1
            benchmarks/rl_step.py --json                       (configs/recsys.py's inner steps)
    HF      benchmarks/hf_generate.py --json                   (--hf-python: needs torch;
            torch's default thread count and 1 thread; "best" is the faster of the two)
    Tunix   benchmarks/tunix_grpo.py --json --inner-steps 1 --beta 0   (--tunix-python)

The peers are optional installs into a separate virtualenv (see
benchmarks/requirements-peers.txt); a peer whose python cannot import it gets a row
"not installed: <install command>" and the rest still runs. hf_generate.py and
tunix_grpo.py also time our rollout in their own process, in alternation with the
peer; those in-process ratios are printed beside the cross-process ones.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Sequence

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
DEFAULT_PEERS_PYTHON = "/tmp/peersvenv/bin/python"
INSTALL = ("python3 -m venv /tmp/peersvenv && /tmp/peersvenv/bin/pip install -r "
           "benchmarks/requirements-peers.txt")
# The peer each benchmark needs (None: ours, always there) and the module that proves it.
NEEDS = {"ours_rollout": None, "ours_rl_1": None, "ours_rl_default": None,
         "hf": ("torch", "import torch, transformers"),
         "tunix": ("tunix", "import tunix, tunix.rl.grpo.grpo_learner")}

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def build_commands(a) -> dict[str, list[str]]:
  """name -> argv of every benchmark of one round, in the order of an even round."""
  rep = ["--repeats", str(a.repeats)]
  ours = a.ours_python
  return {
      "ours_rollout": [ours, os.path.join(BENCH, "rollout.py"), "--json", *rep],
      "ours_rl_1": [ours, os.path.join(BENCH, "rl_step.py"), "--json", "--inner-steps", "1",
                    *rep],
      "ours_rl_default": [ours, os.path.join(BENCH, "rl_step.py"), "--json", *rep],
      "hf": [a.hf_python, os.path.join(BENCH, "hf_generate.py"), "--json", *rep],
      "tunix": [a.tunix_python, os.path.join(BENCH, "tunix_grpo.py"), "--json",
                "--inner-steps", "1", "--beta", "0", *rep],
  }


def round_order(names: Sequence[str], r: int) -> list[str]:
  """Round r runs the benchmarks forwards when r is even, backwards when odd."""
  return list(names) if r % 2 == 0 else list(names)[::-1]


def run_subprocess(argv: Sequence[str]) -> subprocess.CompletedProcess:
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  return subprocess.run(list(argv), capture_output=True, text=True, env=env, cwd=REPO)


def json_line(stdout: str) -> dict | None:
  """The last line of stdout that is a JSON object (the benchmarks print exactly one)."""
  for line in reversed(stdout.strip().splitlines()):
    line = line.strip()
    if line.startswith("{"):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        continue
  return None


def installed(python: str, check: str, run: Runner) -> bool:
  """Whether `python` exists and runs `check` (an import statement) without error."""
  if not python:
    return False
  try:  # a python that does not exist raises FileNotFoundError
    return run([python, "-c", check]).returncode == 0
  except OSError:
    return False


def hf_default_threads(d: dict) -> str:
  """hf_generate.py times torch's default thread count and 1 thread; the default is the
  larger key of hf_seconds_by_threads (just "1" on a one-thread machine)."""
  return max(d["hf_seconds_by_threads"], key=int)


def metrics(name: str, d: dict) -> dict[str, float]:
  """The numbers of one benchmark's JSON line that the summary uses."""
  if name == "ours_rollout":
    return {"tokens_per_s": d["generated_tokens_per_s"]}
  if name in ("ours_rl_1", "ours_rl_default"):
    return {"seconds_per_step": d["seconds_per_step"], "inner_steps": d["inner_steps"]}
  if name == "hf":
    tokens = d["hf_generated_tokens_per_s"] * d["hf_seconds"]  # B*G*T
    default = hf_default_threads(d)
    best = str(d["torch_threads"])
    return {"default_tokens_per_s": tokens / d["hf_seconds_by_threads"][default],
            "best_tokens_per_s": tokens / d["hf_seconds_by_threads"][best],
            "default_threads": int(default), "best_threads": int(best),
            "in_process_ratio": d["ratio"]}
  if name == "tunix":
    out = {}
    if "generated_tokens_per_s" in d:
      out["tokens_per_s"] = d["generated_tokens_per_s"]
    if "ratio_ours_over_tunix" in d:
      out["in_process_ratio"] = d["ratio_ours_over_tunix"]
    if "seconds_per_step" in d:
      out["seconds_per_step"] = d["seconds_per_step"]
      out["inner_steps"] = d["inner_steps"]
    return out
  raise KeyError(name)


def medians(per_round: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
  """name -> metric -> median over the rounds that produced it."""
  out = {}
  for name, rounds in per_round.items():
    keys = sorted({k for r in rounds for k in r})
    out[name] = {k: statistics.median([r[k] for r in rounds if k in r]) for k in keys}
  return out


def ratio_rows(med: dict[str, dict[str, float]], missing: dict[str, str]) -> list[dict]:
  """The ratio table: one dict per row (comparison, ours, peer, ratio, note)."""
  rows = []
  ours_tps = med.get("ours_rollout", {}).get("tokens_per_s")
  rl1 = med.get("ours_rl_1", {}).get("seconds_per_step")
  rld = med.get("ours_rl_default", {})

  def row(comparison, ours, peer, ratio, unit, note=""):
    rows.append({"comparison": comparison, "ours": ours, "peer": peer, "ratio": ratio,
                 "unit": unit, "note": note})

  def absent(comparison, peer_name, unit):
    row(comparison, None, None, None, unit, missing.get(peer_name, "no result"))

  hf = med.get("hf")
  if hf and ours_tps:
    row(f"rollout: ours / HF generate, default threads ({hf['default_threads']:.0f})",
        ours_tps, hf["default_tokens_per_s"], ours_tps / hf["default_tokens_per_s"],
        "gen tokens/s")
    row(f"rollout: ours / HF generate, best thread count ({hf['best_threads']:.0f})",
        ours_tps, hf["best_tokens_per_s"], ours_tps / hf["best_tokens_per_s"], "gen tokens/s")
    row("rollout: ours / HF, best threads, same process (hf_generate.py)", None, None,
        hf["in_process_ratio"], "gen tokens/s")
  else:
    absent("rollout: ours / HF generate", "hf", "gen tokens/s")
  tx = med.get("tunix", {})
  if "tokens_per_s" in tx and ours_tps:
    row("rollout: ours / Tunix sampler", ours_tps, tx["tokens_per_s"],
        ours_tps / tx["tokens_per_s"], "gen tokens/s")
    if "in_process_ratio" in tx:
      row("rollout: ours / Tunix sampler, same process (tunix_grpo.py)", None, None,
          tx["in_process_ratio"], "gen tokens/s")
  else:
    absent("rollout: ours / Tunix sampler", "tunix", "gen tokens/s")
  if "seconds_per_step" in tx and rl1:
    row("RL step, 1 update per rollout: Tunix GRPO / ours", rl1, tx["seconds_per_step"],
        tx["seconds_per_step"] / rl1, "s/step")
  else:
    absent("RL step, 1 update per rollout: Tunix GRPO / ours", "tunix", "s/step")
  if "seconds_per_step" in rld:
    n = f"{rld['inner_steps']:.0f}"
    if "seconds_per_step" in tx:
      row(f"RL step: Tunix (1 update) / ours at the default ({n} updates)",
          rld["seconds_per_step"], tx["seconds_per_step"],
          tx["seconds_per_step"] / rld["seconds_per_step"], "s/step")
    else:
      row(f"RL step: ours at the default ({n} updates)", rld["seconds_per_step"], None, None,
          "s/step", missing.get("tunix", ""))
  return rows


def run_all(a, run: Runner = run_subprocess, log=print) -> dict:
  cmds = build_commands(a)
  missing: dict[str, str] = {}
  for name, need in NEEDS.items():
    if need and not installed(cmds[name][0], need[1], run):
      missing[name] = f"not installed: {INSTALL}"
  names = [n for n in cmds if n not in missing]
  per_round: dict[str, list[dict[str, float]]] = {n: [] for n in names}
  failed: dict[str, str] = {}
  versions: dict[str, dict] = {}
  load_before = os.getloadavg()[0]
  for r in range(a.rounds):
    for name in round_order(names, r):
      if name in failed:
        continue
      t0 = time.perf_counter()
      p = run(cmds[name])
      d = json_line(p.stdout) if p.returncode == 0 else None
      if d is None:
        tail = (p.stderr or p.stdout or "").strip().splitlines()[-1:] or ["no output"]
        failed[name] = f"failed (exit {p.returncode}): {tail[0][:200]}"
        log(f"[peers] round {r + 1}: {name} {failed[name]}")
        continue
      per_round[name].append(metrics(name, d))
      versions[name.split("_")[0]] = d.get("versions", {})
      log(f"[peers] round {r + 1}/{a.rounds}: {name} {time.perf_counter() - t0:.0f} s")
  load_after = os.getloadavg()[0]
  med = medians({n: v for n, v in per_round.items() if v})
  missing.update(failed)
  return {"benchmark": "peers", "rounds": a.rounds, "repeats": a.repeats,
          "load_avg_1m_before": round(load_before, 2), "load_avg_1m_after": round(load_after, 2),
          "medians": med, "per_round": per_round, "rows": ratio_rows(med, missing),
          "missing": missing, "commands": {n: " ".join(c) for n, c in cmds.items()},
          "versions": versions}


def fmt(x) -> str:
  if x is None:
    return ""
  if abs(x) >= 1000:
    return f"{x:,.0f}"
  if abs(x) >= 10:
    return f"{x:.1f}"
  return f"{x:.3f}"


def table(res: dict) -> str:
  head = ["comparison", "ours", "peer", "ratio", "unit"]
  cells = [[r["comparison"], fmt(r["ours"]), fmt(r["peer"]),
            f"{r['ratio']:.2f}x" if r["ratio"] is not None else r["note"], r["unit"]]
           for r in res["rows"]]
  widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
  line = lambda cs: "| " + " | ".join(c.ljust(w) if i in (0, 3) and not c.endswith("x")
                                      else c.rjust(w) for i, (c, w) in
                                      enumerate(zip(cs, widths))) + " |"
  out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
  out += [line(c) for c in cells]
  return "\n".join(out)


def main(argv=None, run: Runner = run_subprocess) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rounds", type=int, default=3,
                 help="times the whole set runs (alternating order); medians over rounds")
  p.add_argument("--repeats", type=int, default=5, help="forwarded to every benchmark")
  p.add_argument("--ours-python", default=sys.executable,
                 help="the python of our venv (default: this one)")
  p.add_argument("--tunix-python", default=DEFAULT_PEERS_PYTHON,
                 help="a python that imports google-tunix (the peers venv)")
  p.add_argument("--hf-python", default=None,
                 help="a python that imports torch and transformers (default: this one if "
                      "it imports torch, else --tunix-python's)")
  p.add_argument("--json", action="store_true", help="print exactly one JSON line")
  a = p.parse_args(argv)
  if a.rounds < 1 or a.repeats < 1:
    p.error("--rounds and --repeats must be >= 1")
  if a.hf_python is None:
    a.hf_python = (a.ours_python if a.ours_python == sys.executable
                   and importlib.util.find_spec("torch") else a.tunix_python)
  log = (lambda *_: None) if a.json else (lambda s: print(s, file=sys.stderr, flush=True))
  res = run_all(a, run, log)
  if a.json:
    print(json.dumps(res, sort_keys=True))
    return 0
  print("# ours against the peers (benchmarks/peers.py)")
  print(f"{a.rounds} rounds in alternation, --repeats {a.repeats}; medians over rounds; "
        f"1-min load average before {res['load_avg_1m_before']}, after "
        f"{res['load_avg_1m_after']} ({os.cpu_count()} CPUs)")
  for name, v in res["versions"].items():
    print(f"{name}: " + ", ".join(f"{k} {x}" for k, x in v.items()))
  print()
  print(table(res))
  return 0


if __name__ == "__main__":
  sys.exit(main())
