"""The notebook's install step: which jax it installs on each runtime, and the
TensorBoard writer's fallback when TensorFlow does not import."""

import os
import sys

import pytest

from fgrpo_jax import logs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def script(load_script):
  return load_script("notebook_install")


def _pinned(name):
  with open(os.path.join(REPO, "requirements.txt")) as f:
    for line in f:
      if line.startswith(name + "=="):
        return line.strip().split("==")[1]
  raise AssertionError(f"{name} is not pinned in requirements.txt")


NOTHING = dict(which=lambda name: None, exists=lambda path: False)


@pytest.mark.parametrize("environ,devices,expected", [
    ({}, (), "cpu"),
    ({"COLAB_TPU_ADDR": "10.0.0.2:8470"}, (), "tpu"),
    ({"TPU_ACCELERATOR_TYPE": "v5litepod-8"}, (), "tpu"),
    ({}, ("/dev/accel0",), "tpu"),  # a TPU VM without the variables
    ({"COLAB_GPU": "1"}, (), "cuda12"),
    ({"COLAB_GPU": "0"}, (), "cpu"),
    ({}, ("/dev/nvidia0",), "cuda12"),
    ({"FGRPO_JAX_EXTRA": "cpu", "COLAB_GPU": "1"}, (), "cpu"),  # the override wins
])
def test_runtime_detection(script, environ, devices, expected):
  got = script.detect_extra(environ, which=lambda name: None, exists=lambda p: p in devices)
  assert got == expected


def test_nvidia_smi_on_path_means_gpu(script):
  assert script.detect_extra({}, which=lambda n: "/usr/bin/nvidia-smi" if n == "nvidia-smi"
                             else None, exists=lambda p: False) == "cuda12"


def test_bad_override_names_the_variable(script):
  with pytest.raises(SystemExit, match="FGRPO_JAX_EXTRA"):
    script.detect_extra({"FGRPO_JAX_EXTRA": "rocm"}, **NOTHING)


def _requirements():
  with open(os.path.join(REPO, "requirements.txt")) as f:
    return f.read().splitlines()


@pytest.mark.parametrize("extra", ["tpu", "cuda12"])
def test_accelerator_runtime_gets_the_pinned_jax_with_its_extra(script, extra):
  lines = script.requirements_for(_requirements(), extra, tensorflow_present=False)
  version = _pinned("jax")
  assert f"jax[{extra}]=={version}" in lines
  assert f"jax=={version}" not in lines  # the CPU-only pin is replaced, not duplicated
  assert f"jaxlib=={_pinned('jaxlib')}" in lines  # the same jaxlib the extra requires
  assert "tensorflow-cpu==" + _pinned("tensorflow-cpu") in lines


def test_cpu_runtime_installs_requirements_unchanged(script):
  want = [l.strip() for l in _requirements() if l.split("#")[0].strip()]
  assert script.requirements_for(_requirements(), "cpu", tensorflow_present=False) == want


def test_preinstalled_tensorflow_is_kept(script):
  lines = script.requirements_for(_requirements(), "cuda12", tensorflow_present=True)
  names = {script.requirement_name(l) for l in lines}
  assert "tensorflow-cpu" not in names and "tensorboard" not in names
  assert {"jax", "flax", "optax", "clu"} <= names


def test_install_commands_install_requirements_then_the_package(script):
  cmds = script.install_commands("tpu", "/tmp/req.txt", repo="/repo", python="/py")
  assert cmds[0][:4] == ["/py", "-m", "pip", "install"] and cmds[0][-2:] == ["-r", "/tmp/req.txt"]
  assert cmds[1][-3:] == ["--no-deps", "-e", "/repo"]


def test_dry_run_prints_the_choice(script, capsys, monkeypatch):
  monkeypatch.setenv("FGRPO_JAX_EXTRA", "tpu")
  assert script.main(["--dry-run"]) == 0
  out = capsys.readouterr().out
  assert "runtime: jax[tpu]" in out and f"jax[tpu]=={_pinned('jax')}" in out


def test_writer_is_off_when_tensorflow_does_not_import(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "clu.metric_writers", None)  # import -> ImportError
  if "clu" in sys.modules:  # imported by an earlier test of this worker
    monkeypatch.delattr(sys.modules["clu"], "metric_writers", raising=False)
  lines = []
  assert logs.make_writer(str(tmp_path), lines.append) is None
  assert len(lines) == 1 and "metrics.jsonl only" in lines[0]
