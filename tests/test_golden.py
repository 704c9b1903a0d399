"""The golden trajectory: a fresh run of configs/recsys.py:tiny (a few SFT and F-GRPO
steps, scripts/make_golden_trajectory.py) logs the metrics stored in
tests/golden/tiny_trajectory.json, to rtol 1e-4 / atol 1e-6. A refactor that changes
the numbers fails here; regenerate the file only for an intended change."""

import json


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
