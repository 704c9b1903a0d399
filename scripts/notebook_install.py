"""Installs fgrpo_jax into the running Python with the jax that matches the machine.

The notebook (notebooks/fgrpo_demo.ipynb) runs this before anything else. It only
uses the standard library, because nothing else is installed yet.

    python scripts/notebook_install.py            # detect the runtime and install
    python scripts/notebook_install.py --dry-run  # print the commands instead

requirements.txt pins a CPU jaxlib. On a TPU or GPU runtime (Colab, a TPU VM, a CUDA
machine) that jaxlib would silently run everything on the CPU, so the pinned `jax`
line becomes `jax[tpu]==V` or `jax[cuda12]==V` (the same version V). Where a
TensorFlow is already installed (Colab ships one), `tensorflow-cpu` and `tensorboard`
are left out: installing them beside it breaks both; the TensorBoard writer then uses
the installed TensorFlow, or is switched off by fgrpo_jax.train if none imports.
FGRPO_JAX_EXTRA=tpu|cuda12|cpu overrides the detection.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTRAS = ("tpu", "cuda12", "cpu")  # jax extras this script can install
TF_PACKAGES = ("tensorflow-cpu", "tensorboard")  # dropped when a TensorFlow is present


def detect_extra(environ=None, which=shutil.which, exists=os.path.exists) -> str:
  """The jax extra of this machine: tpu | cuda12 | cpu.

  environ: mapping of environment variables (default os.environ); which/exists:
  shutil.which / os.path.exists, replaceable so the choice is testable anywhere.
  """
  env = os.environ if environ is None else environ
  forced = env.get("FGRPO_JAX_EXTRA", "")
  if forced:
    if forced not in EXTRAS:
      raise SystemExit(f"FGRPO_JAX_EXTRA={forced!r}: expected one of {', '.join(EXTRAS)}")
    return forced
  # TPU VMs (Colab's TPU runtime included) expose /dev/accel* or vfio devices and
  # set TPU_* variables; the older Colab TPU node runtime set COLAB_TPU_ADDR.
  if (any(env.get(k) for k in ("COLAB_TPU_ADDR", "TPU_NAME", "TPU_ACCELERATOR_TYPE"))
      or exists("/dev/accel0") or exists("/dev/vfio/0")):
    return "tpu"
  if env.get("COLAB_GPU", "0") not in ("", "0") or which("nvidia-smi") or exists("/dev/nvidia0"):
    return "cuda12"
  return "cpu"


def requirement_name(line: str) -> str:
  """'jax==0.10.2' -> 'jax'; comments and blank lines -> ''."""
  spec = line.split("#", 1)[0].strip()
  for sep in ("[", "==", ">=", "<=", "~=", "<", ">", " ", ";"):
    spec = spec.split(sep, 1)[0]
  return spec.strip().lower()


def requirements_for(lines: list[str], extra: str, tensorflow_present: bool) -> list[str]:
  """requirements.txt lines -> the lines to install on a machine with `extra`."""
  out = []
  for line in lines:
    name = requirement_name(line)
    if not name:
      continue
    if tensorflow_present and name in TF_PACKAGES:
      continue
    if name == "jax" and extra != "cpu":
      version = line.split("==", 1)[1].split("#", 1)[0].strip()
      line = f"jax[{extra}]=={version}"
    out.append(line.strip())
  return out


def install_commands(extra: str, requirements_file: str, repo: str = REPO,
                     python: str = sys.executable) -> list[list[str]]:
  """The pip commands (argv lists): the requirements file, then the package itself."""
  pip = [python, "-m", "pip", "install", "-q"]
  return [pip + ["-r", requirements_file], pip + ["--no-deps", "-e", repo]]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  args = parser.parse_args(argv)
  extra = detect_extra()
  tensorflow_present = importlib.util.find_spec("tensorflow") is not None
  with open(os.path.join(REPO, "requirements.txt"), encoding="utf-8") as f:
    lines = requirements_for(f.read().splitlines(), extra, tensorflow_present)
  print(f"[install] runtime: jax[{extra}]; TensorFlow already installed: {tensorflow_present}")
  with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
    f.write("\n".join(lines) + "\n")
  try:
    for cmd in install_commands(extra, f.name):
      print("[install] " + " ".join(cmd))
      if not args.dry_run:
        subprocess.run(cmd, check=True)
    if args.dry_run:
      print("\n".join("[install]   " + line for line in lines))
  finally:
    os.unlink(f.name)
  return 0


if __name__ == "__main__":
  sys.exit(main())
