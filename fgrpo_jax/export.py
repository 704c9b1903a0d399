"""Exports a run's trained policy as a Hugging Face checkpoint.

    python -m fgrpo_jax.export --workdir=runs/r --out=runs/r/hf [--dtype=bfloat16]

Reads `workdir/run_config.json` (written by `train.run`), rebuilds the model (the
random init or `config.model.hf_checkpoint`, plus LoRA adapters if the run used
them), restores the most advanced stage checkpoint of the workdir (as
`--config.mode=eval` does) and writes

    OUT/config.json, OUT/model.safetensors   the merged weights (base + alpha/r * A B),
                                             loadable by transformers and by
                                             fgrpo_jax.models.load_pretrained
    OUT/<tokenizer files>                    copied through transformers when the run's
                                             hf_checkpoint has a tokenizer
    OUT/adapter/adapter_config.json,         LoRA runs only: the adapters on their own,
    OUT/adapter/adapter_model.safetensors    in the PEFT layout (models/lora.py); they
                                             apply to the run's *base* (hf_checkpoint),
                                             not to the merged weights next to them

A decoupled pair is written as OUT/selector and OUT/ranker. The architecture is the
hf_checkpoint's (Llama, Qwen2, Qwen3, or Qwen3.5 written as Qwen3_5ForCausalLM),
else LlamaForCausalLM (Qwen3 / Qwen2 for q/k norm / qkv bias). Runs on one process.

OUT is replaced as a whole: everything is written to a hidden sibling directory that
is renamed onto OUT only when complete. Because replacing deletes what was there,
OUT may not be the workdir, a directory that contains it (or the run's
hf_checkpoint), a path inside its checkpoints, or an existing file; an existing
non-empty directory is replaced only if it is an earlier export (its config.json
carries an "fgrpo_export" record) or with --overwrite.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from absl import app, flags


def _define_flags():
  # Defined only when run as a program: fgrpo_jax.main and fgrpo_jax.compare also
  # define --workdir, and tests import those modules together with this one.
  flags.DEFINE_string("workdir", None, "Workdir of a train run (holds run_config.json).")
  flags.DEFINE_string("out", None, "Directory to write the Hugging Face checkpoint to.")
  flags.DEFINE_string("dtype", "", "Cast the saved tensors (float32 / bfloat16 / float16; "
                      "default: as trained, float32).")
  flags.DEFINE_bool("overwrite", False, "Replace an existing non-empty --out directory that "
                    "is not an earlier export.")
  flags.mark_flags_as_required(["workdir", "out"])


EXPORT_RECORD = "fgrpo_export"  # key of config.json that marks a directory as our export


def is_export(directory: Path) -> bool:
  """An earlier export of ours: its (or its selector's) config.json has EXPORT_RECORD."""
  for cfg in (directory / "config.json", directory / "selector" / "config.json"):
    try:
      if EXPORT_RECORD in json.loads(cfg.read_text(encoding="utf-8-sig")):
        return True
    except (OSError, ValueError, TypeError):
      continue
  return False


def check_out(workdir, out, *, overwrite: bool = False, hf_checkpoint: str = "") -> Path:
  """The resolved --out, or one line on why writing there would lose something."""
  from fgrpo_jax.errors import UserError
  target = Path(out).expanduser().resolve()
  run = Path(workdir).expanduser().resolve()
  for kept, what in ((run, "the workdir"), (Path(hf_checkpoint).expanduser().resolve()
                                          if hf_checkpoint else None, "the run's hf_checkpoint")):
    if kept is not None and (target == kept or target in kept.parents):
      where = "is" if target == kept else "contains"
      raise UserError(f"--out={out} {where} {what} {kept}: exporting there would delete it; "
                      "choose another --out")
  if (run / "ckpt") == target or (run / "ckpt") in target.parents:
    raise UserError(f"--out={out} is inside the run's checkpoints ({run / 'ckpt'}); choose "
                    "another --out")
  if target.exists() and not target.is_dir():
    raise UserError(f"--out={out} is an existing file; choose a directory path")
  if target.is_dir() and any(target.iterdir()) and not is_export(target) and not overwrite:
    raise UserError(f"--out={out} is a non-empty directory that is not an earlier export; "
                    "choose another --out, or pass --overwrite to replace it")
  return target


def read_run_config(workdir):
  """(config ConfigDict, task vocab_size) from workdir/run_config.json."""
  import ml_collections
  from fgrpo_jax import train
  from fgrpo_jax.errors import UserError
  path = os.path.join(workdir, train.RUN_CONFIG)
  if not os.path.isfile(path):
    raise UserError(f"{path}: not found (export needs the workdir of a train run)")
  with open(path) as f:
    saved = json.load(f)
  return ml_collections.ConfigDict(saved["config"]), int(saved["vocab_size"])


def _architecture(cfg, hf_checkpoint: str) -> str:
  from fgrpo_jax.models import hf
  if hf_checkpoint:
    hf_config, source = hf.read_hf_config(hf_checkpoint)
    return hf._architecture(hf_config, str(source))
  if cfg.qk_norm:
    return "Qwen3ForCausalLM"
  return "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"


def _tokenizer(hf_checkpoint: str, log):
  if not hf_checkpoint:
    return None
  from fgrpo_jax.data import text_prompts
  from fgrpo_jax.errors import UserError
  try:
    return text_prompts.load_tokenizer(hf_checkpoint)
  except UserError as e:  # a checkpoint without a tokenizer is fine: say so, go on
    log(f"[export] no tokenizer copied ({e})")
    return None


def export_run(workdir, out, *, dtype=None, overwrite=False, log=print) -> Path:
  """Writes the latest trained (merged) params of `workdir` to `out`; returns `out`.

  `out` is checked first (check_out) and replaced as a whole, never half-written.
  """
  import jax
  from fgrpo_jax import sharding, train
  from fgrpo_jax.errors import UserError
  from fgrpo_jax.models import hf
  from fgrpo_jax.models import lora as lora_lib
  if dtype not in (None, "float32", "bfloat16", "float16"):
    raise UserError(f"--dtype={dtype!r} is unknown (float32, bfloat16 or float16)")
  config, vocab_size = read_run_config(workdir)
  path = config.model.get("hf_checkpoint", "")
  target = check_out(workdir, out, overwrite=overwrite, hf_checkpoint=path)
  mesh = sharding.make_mesh({"data": -1}, devices=jax.local_devices())
  cfg, params, frozen = train.build_model(config, vocab_size, mesh, log=log)
  stage, restored = train.latest_checkpoint(workdir, config, params)
  if restored is None:
    raise UserError(f"{workdir}: no checkpoint to export (under {workdir}/ckpt)")
  log(f"[export] the latest {stage} params of {workdir}")
  architecture = _architecture(cfg, path)
  tokenizer = _tokenizer(path, log)
  lcfg = lora_lib.config_from_model_config(config.model)
  pair = isinstance(restored, dict) and "selector" in restored
  roles = restored.items() if pair else [("", restored)]
  record = {"workdir": str(Path(workdir).resolve()), "stage": stage,
            "created": time.strftime("%Y-%m-%d %H:%M:%S")}
  target.parent.mkdir(parents=True, exist_ok=True)
  staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.export-", dir=target.parent))
  try:
    staged = staging / "out"
    for role, trainable in roles:
      role_dir = staged / role if role else staged
      merged = jax.device_get(lora_lib.merged(trainable, frozen))
      hf.save_hf_checkpoint(merged, cfg, role_dir, tokenizer=tokenizer,
                            architecture=architecture, dtype=dtype or None)
      config_json = role_dir / "config.json"  # transformers keeps unknown keys
      config_json.write_text(json.dumps({**json.loads(config_json.read_text()),
                                         EXPORT_RECORD: {**record, "role": role or None}},
                                        indent=2) + "\n")
      if lcfg is not None:
        lora_lib.save_adapters(jax.device_get(trainable), lcfg, role_dir / "adapter",
                               base_model=path, cfg=cfg)
    hf.replace_dir(staged, target)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  for role, _ in roles:
    log(f"[export] wrote {target / role if role else target} ({architecture}"
        f"{', merged LoRA + adapter/' if lcfg is not None else ''})")
  return Path(out)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from fgrpo_jax import cli
  f = flags.FLAGS
  with cli.user_errors():
    export_run(f.workdir, f.out, dtype=f.dtype or None, overwrite=f.overwrite)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  _define_flags()
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  app.run(main)
