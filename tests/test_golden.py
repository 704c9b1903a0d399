"""The golden trajectory: a fresh run of configs/recsys.py:tiny (a few SFT and F-GRPO
steps, scripts/make_golden_trajectory.py) logs the metrics stored in
tests/golden/tiny_trajectory.json, to rtol 1e-4 / atol 1e-6. A refactor that changes
the numbers fails here; regenerate the file only for an intended change."""

import json
import os


def test_tiny_trajectory_matches_golden(load_script, tmp_path):
  golden_lib = load_script("make_golden_trajectory")
  with open(golden_lib.GOLDEN) as f:
    golden = json.load(f)
  assert golden["metrics"] and golden["test"]
  fresh = golden_lib.trajectory(str(tmp_path))
  assert golden_lib.differences(golden, fresh, rtol=golden["rtol"], atol=golden["atol"]) == []


def test_differences_names_a_changed_metric(load_script):
  golden_lib = load_script("make_golden_trajectory")
  golden = {"metrics": [{"stage": "sft", "step": 2, "loss": 1.0}], "test": {"hit@1": 0.5}}
  same = {"metrics": [{"stage": "sft", "step": 2, "loss": 1.0 + 1e-7, "new": 3.0}],
          "test": {"hit@1": 0.5}}
  assert golden_lib.differences(golden, same) == []
  moved = {"metrics": [{"stage": "sft", "step": 2, "loss": 1.01}], "test": {}}
  diffs = golden_lib.differences(golden, moved)
  assert any("loss" in d for d in diffs) and any("hit@1" in d for d in diffs)


def test_logs_norms_compile_time_memory_and_profile(load_script, tmp_path):
  """The habits of issue 17: lr, parameter and update norms and peak memory in every
  record, the first step's compile time in the first, and config.profile_steps's trace."""
  golden_lib = load_script("make_golden_trajectory")
  config = golden_lib.golden_config()
  config.rl.steps, config.profile_steps = 0, 2
  config.eval.test_examples = 32
  from fgrpo_jax import train
  train.run(config, str(tmp_path), log=lambda *a, **k: None)
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records if "val_hit@1" in r] == [6]  # the end-of-stage validation
  records = [r for r in records if "val_hit@1" not in r]
  assert [r["step"] for r in records] == [2, 4, 6]
  for r in records:
    assert r["param_norm"] > 0 and r["update_norm"] > 0 and r["peak_memory_mb"] > 0
    assert r["lr"] > 0
  assert records[0]["compile_s"] > 0 and "compile_s" not in records[1]
  traces = [f for _, _, files in os.walk(tmp_path / "profile" / "sft") for f in files]
  assert any(f.endswith((".xplane.pb", ".trace.json.gz")) for f in traces), traces
