"""benchmarks/peers.py without running any benchmark: commands, alternation, medians and
ratios from fake JSON outputs, and a missing peer reported as such (no tunix, no torch)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import random
import statistics
import subprocess

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def peers():
  spec = importlib.util.spec_from_file_location("peers_under_test", BENCH / "peers.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _fake_outputs(rng: random.Random) -> dict[str, dict]:
  """One round's JSON lines of the five benchmarks, with random numbers."""
  tokens = 4 * 8 * 18
  hf_s = {"2": rng.uniform(0.3, 0.9), "1": rng.uniform(0.3, 0.9)}
  best = min(hf_s, key=hf_s.get)
  return {
      "rollout.py": {"benchmark": "rollout", "generated_tokens_per_s": rng.uniform(2e3, 9e3),
                     "versions": {"jax": "x"}},
      "rl_step.py 1": {"benchmark": "rl_step", "seconds_per_step": rng.uniform(0.2, 1.0),
                       "inner_steps": 1},
      "rl_step.py": {"benchmark": "rl_step", "seconds_per_step": rng.uniform(0.4, 2.0),
                     "inner_steps": 2},
      "hf_generate.py": {"benchmark": "hf_generate", "hf_seconds_by_threads": hf_s,
                         "torch_threads": int(best), "hf_seconds": hf_s[best],
                         "hf_generated_tokens_per_s": tokens / hf_s[best],
                         "ratio": rng.uniform(2, 6), "versions": {"torch": "t"}},
      "tunix_grpo.py": {"benchmark": "tunix_grpo", "generated_tokens_per_s": rng.uniform(300, 2e3),
                        "ratio_ours_over_tunix": rng.uniform(1, 5),
                        "seconds_per_step": rng.uniform(1, 6), "inner_steps": 1,
                        "versions": {"google-tunix": "0.1.7"}},
  }


def _which(argv) -> str:
  script = pathlib.Path(argv[1]).name
  if script == "rl_step.py" and "--inner-steps" in argv:
    return "rl_step.py " + argv[argv.index("--inner-steps") + 1]
  return script


class FakeRunner:
  """Answers the import checks (per python) and serves one fake round per call of each
  benchmark; records the order of the benchmark calls."""

  def __init__(self, rounds, importable=("ours", "hf", "tunix")):
    self.rounds, self.importable, self.calls, self.served = rounds, importable, [], {}

  def __call__(self, argv):
    argv = list(argv)
    if argv[1] == "-c":  # peers.installed: an import check
      ok = any(argv[0] == f"/fake/{name}/python" for name in self.importable)
      return subprocess.CompletedProcess(argv, 0 if ok else 1, "", "")
    which = _which(argv)
    self.calls.append(which)
    i = self.served.get(which, 0)
    self.served[which] = i + 1
    out = "some log line\n" + json.dumps(self.rounds[i][which]) + "\n"
    return subprocess.CompletedProcess(argv, 0, out, "")


def _argv(rounds, **pythons):
  py = {"ours": "/fake/ours/python", "hf": "/fake/hf/python", "tunix": "/fake/tunix/python"}
  py.update(pythons)
  return ["--rounds", str(rounds), "--repeats", "3", "--ours-python", py["ours"],
          "--hf-python", py["hf"], "--tunix-python", py["tunix"], "--json"]


def _run(peers, capsys, argv, runner):
  assert peers.main(argv, run=runner) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 1, lines
  return json.loads(lines[0])


def test_commands(peers):
  a = type("A", (), {"repeats": 7, "ours_python": "OURS", "hf_python": "HF",
                     "tunix_python": "TX"})()
  cmds = peers.build_commands(a)
  by_script = {_which(c): c for c in cmds.values()}
  assert set(by_script) == {"rollout.py", "rl_step.py 1", "rl_step.py", "hf_generate.py",
                            "tunix_grpo.py"}
  for c in cmds.values():
    assert "--json" in c and c[c.index("--repeats") + 1] == "7"
  assert by_script["rollout.py"][0] == by_script["rl_step.py"][0] == "OURS"
  assert by_script["hf_generate.py"][0] == "HF"
  tx = by_script["tunix_grpo.py"]
  assert tx[0] == "TX" and tx[tx.index("--beta") + 1] == "0"
  assert tx[tx.index("--inner-steps") + 1] == "1"
  assert "--inner-steps" not in by_script["rl_step.py"]  # ours at the config's default


def test_medians_ratios_and_alternation(peers, capsys):
  rng = random.Random(1234)
  n = 3
  rounds = [_fake_outputs(rng) for _ in range(n)]
  runner = FakeRunner(rounds)
  res = _run(peers, capsys, _argv(n), runner)

  # Alternation: round 2 runs the benchmarks in the reverse order of round 1.
  per = len(runner.calls) // n
  assert per == 5
  assert runner.calls[per:2 * per] == runner.calls[:per][::-1]
  assert runner.calls[2 * per:] == runner.calls[:per]

  med = lambda key, f: statistics.median(f(r[key]) for r in rounds)
  ours = med("rollout.py", lambda d: d["generated_tokens_per_s"])
  hf_def = med("hf_generate.py", lambda d: 4 * 8 * 18 / d["hf_seconds_by_threads"]["2"])
  hf_best = med("hf_generate.py", lambda d: 4 * 8 * 18 / d["hf_seconds"])
  tx_tps = med("tunix_grpo.py", lambda d: d["generated_tokens_per_s"])
  tx_s = med("tunix_grpo.py", lambda d: d["seconds_per_step"])
  rl1 = med("rl_step.py 1", lambda d: d["seconds_per_step"])
  rl2 = med("rl_step.py", lambda d: d["seconds_per_step"])
  rows = {r["comparison"]: r for r in res["rows"]}

  def ratio(prefix):
    same = "same process" in prefix
    hits = [r for c, r in rows.items() if c.startswith(prefix) and ("same process" in c) == same]
    assert len(hits) == 1, (prefix, list(rows))
    return hits[0]["ratio"]

  assert ratio("rollout: ours / HF generate, default threads") == pytest.approx(ours / hf_def)
  assert ratio("rollout: ours / HF generate, best thread") == pytest.approx(ours / hf_best)
  assert ratio("rollout: ours / Tunix sampler") == pytest.approx(ours / tx_tps)
  assert ratio("RL step, 1 update per rollout: Tunix GRPO / ours") == pytest.approx(tx_s / rl1)
  assert ratio("RL step: Tunix (1 update) / ours at the default") == pytest.approx(tx_s / rl2)
  assert ratio("rollout: ours / HF, best threads, same process") == pytest.approx(
      med("hf_generate.py", lambda d: d["ratio"]))
  assert res["missing"] == {}
  assert isinstance(res["load_avg_1m_before"], float)


def test_missing_peer_is_a_row_not_a_crash(peers, capsys):
  rng = random.Random(7)
  rounds = [_fake_outputs(rng)]
  runner = FakeRunner(rounds, importable=("ours", "hf"))
  res = _run(peers, capsys, _argv(1, tunix="/nonexistent/python"), runner)
  assert "tunix_grpo.py" not in runner.calls  # never run
  assert res["missing"]["tunix"].startswith("not installed: ")
  assert "requirements-peers.txt" in res["missing"]["tunix"]
  tunix_rows = [r for r in res["rows"] if "Tunix" in r["comparison"]]
  assert tunix_rows and all(r["ratio"] is None and r["note"].startswith("not installed: ")
                            for r in tunix_rows)
  assert any(r["ratio"] is not None for r in res["rows"] if "HF" in r["comparison"])

  # The table form says it too.
  runner = FakeRunner(rounds, importable=("ours",))
  assert peers.main([a for a in _argv(1, hf="/fake/nohf/python") if a != "--json"],
                    run=runner) == 0
  out = capsys.readouterr().out
  hf_lines = [ln for ln in out.splitlines() if "HF generate" in ln]
  assert hf_lines and all("not installed: " in ln for ln in hf_lines)


def test_failed_benchmark_is_reported(peers, capsys):
  rng = random.Random(3)
  rounds = [_fake_outputs(rng)]

  def runner(argv):
    if list(argv)[1] != "-c" and _which(argv) == "tunix_grpo.py":
      return subprocess.CompletedProcess(argv, 1, "", "Traceback ...\nValueError: boom\n")
    return FakeRunner(rounds)(argv)

  res = _run(peers, capsys, _argv(1), runner)
  assert "boom" in res["missing"]["tunix"] and "exit 1" in res["missing"]["tunix"]


def test_json_line_picks_the_json_object(peers):
  obj = {"a": random.random()}
  assert peers.json_line("warming up\n{not json\n" + json.dumps(obj) + "\n") == obj
  assert peers.json_line("no json here\n") is None
