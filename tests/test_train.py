"""End-to-end tests of fgrpo_jax/train.py and the entry point fgrpo_jax/main.py."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import recsys
from fgrpo_jax import rollout
from fgrpo_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRIC_KEYS = ("hit@1", "hit@5", "ndcg@5", "recall@5", "slate_recall")


def _main(workdir, *overrides, config="configs/recsys.py:tiny"):
  cmd = [sys.executable, "-m", "fgrpo_jax.main", f"--config={config}", f"--workdir={workdir}",
         *overrides]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("tiny"))
  proc = _main(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "eval.json")) as f:
    return workdir, json.load(f), proc.stdout


def test_eval_json_contract(tiny_run):
  _, result, _ = tiny_run
  assert result["algorithm"] == "fgrpo" and result["split"] == "test"
  assert isinstance(result["task"], str)
  c = recsys.get_config("tiny")
  assert result["steps"] == c.sft.steps + c.rl.steps
  for block in [result["metrics"], result["oracle"], *result["references"].values()]:
    for key in METRIC_KEYS:
      assert isinstance(block[key], float) and 0.0 <= block[key] <= 1.0
  assert {"random", "popularity"} <= set(result["references"])


def test_tiny_run_beats_popularity_and_random(tiny_run):
  _, result, _ = tiny_run
  hit1 = result["metrics"]["hit@1"]
  assert hit1 > result["references"]["popularity"]["hit@1"] + 0.02
  assert hit1 > result["references"]["random"]["hit@1"] + 0.1
  assert hit1 <= result["oracle"]["hit@1"] + 0.05  # nobody beats the Bayes oracle
  assert result["metrics"]["format_valid"] == 1.0


def test_console_and_tensorboard_output(tiny_run):
  workdir, _, stdout = tiny_run
  assert "[sft] step" in stdout and "[rl] step" in stdout and "ETA" in stdout
  events = [f for _, _, files in os.walk(workdir) for f in files if "tfevents" in f]
  assert events, "no TensorBoard event files in the workdir"


def test_rerun_resumes_and_eval_mode_reproduces(tiny_run):
  workdir, result, _ = tiny_run
  proc = _main(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "[sft] resumed from step" in proc.stdout and "[rl] resumed from step" in proc.stdout
  assert "[sft] step 5/" not in proc.stdout  # nothing retrained
  with open(os.path.join(workdir, "eval.json")) as f:
    again = json.load(f)
  assert again["metrics"] == result["metrics"]
  proc = _main(workdir, "--config.mode=eval")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "eval.json")) as f:
    evaluated = json.load(f)
  assert evaluated["metrics"] == result["metrics"]


@pytest.mark.parametrize("override,field", [
    ("--config.rollout.slate_size=20", "slate_size"),  # k > C (tiny C = 8)
    ("--config.rollout.rank_size=6", "rank_size"),  # m > k
    ("--config.rollout.group_size=1", "group_size"),
    ("--config.algorithm=ppo", "algorithm"),
    ("--config.reward.advantage=median", "reward.advantage"),
])
def test_bad_config_is_one_clear_line(tmp_path, override, field):
  proc = _main(str(tmp_path), override)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: config.") and field in lines[0], proc.stderr


def test_gold_choices_put_relevant_first():
  layout = rollout.Layout(slate_size=4, rank_size=2, mid_tags=(1, 2), end_tags=(3,))
  relevance = jnp.array([[0, 0, 1, 0, 0, 0.0], [0, 2, 0, 0, 1, 0]])
  pool_mask = jnp.array([[True] * 6, [True] * 5 + [False]])
  for seed in range(5):
    for order in ("relevant_first", "random"):
      choices = np.asarray(train.gold_choices(relevance, pool_mask, jax.random.key(seed), layout,
                                              order))
      slate, ranking = choices[:, :4], choices[:, 6:8]
      assert ranking[0, 0] == 2 and list(ranking[1]) == [1, 4]
      assert 2 in slate[0] and {1, 4} <= set(slate[1].tolist()) and 5 not in slate[1]
      if order == "relevant_first":
        assert slate[0, 0] == 2 and list(slate[1, :2]) == [1, 4]
      for row in slate:
        assert len(set(row.tolist())) == 4
  # Random order puts the relevant candidate at every slate position over seeds.
  positions = {int(np.argmax(np.asarray(train.gold_choices(
      relevance, pool_mask, jax.random.key(s), layout))[0, :4] == 2)) for s in range(40)}
  assert positions == {0, 1, 2, 3}


def test_batch_indices_cover_epochs_and_are_pure():
  a = [train.batch_indices(0, 1, s, 10, 4) for s in range(5)]
  b = [train.batch_indices(0, 1, s, 10, 4) for s in range(5)]
  np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))
  first_epoch = np.concatenate(a)[:10]
  assert sorted(first_epoch.tolist()) == list(range(10))


def test_sigkill_after_first_checkpoint_then_resume_is_exact(tiny_run, tmp_path):
  """A run killed with SIGKILL and restarted ends with the uninterrupted run's metrics."""
  import signal
  import time
  _, uninterrupted, _ = tiny_run
  workdir = str(tmp_path / "killed")
  cmd = [sys.executable, "-m", "fgrpo_jax.main", "--config=configs/recsys.py:tiny",
         f"--workdir={workdir}"]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  first = os.path.join(workdir, "ckpt", "sft", "5")
  deadline = time.time() + 300
  while not os.path.isdir(first) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL
  assert not os.path.exists(os.path.join(workdir, "eval.json"))
  resumed = _main(workdir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "[sft] resumed from step" in resumed.stdout
  with open(os.path.join(workdir, "eval.json")) as f:
    assert json.load(f)["metrics"] == uninterrupted["metrics"]
