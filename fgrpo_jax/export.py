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
hf_checkpoint's (Llama, Qwen2 or Qwen3), else LlamaForCausalLM. Runs on one process.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from absl import app, flags


def _define_flags():
  # Defined only when run as a program: fgrpo_jax.main and fgrpo_jax.compare also
  # define --workdir, and tests import those modules together with this one.
  flags.DEFINE_string("workdir", None, "Workdir of a train run (holds run_config.json).")
  flags.DEFINE_string("out", None, "Directory to write the Hugging Face checkpoint to.")
  flags.DEFINE_string("dtype", "", "Cast the saved tensors (float32 / bfloat16 / float16; "
                      "default: as trained, float32).")
  flags.mark_flags_as_required(["workdir", "out"])


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
  try:
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(hf_checkpoint, local_files_only=True)
  except Exception as e:  # noqa: BLE001 - a checkpoint without a tokenizer is fine
    log(f"[export] no tokenizer copied from {hf_checkpoint} ({type(e).__name__})")
    return None


def export_run(workdir, out, *, dtype=None, log=print) -> Path:
  """Writes the latest trained (merged) params of `workdir` to `out`; returns `out`."""
  import jax
  from fgrpo_jax import sharding, train
  from fgrpo_jax.errors import UserError
  from fgrpo_jax.models import hf
  from fgrpo_jax.models import lora as lora_lib
  if dtype not in (None, "float32", "bfloat16", "float16"):
    raise UserError(f"--dtype={dtype!r} is unknown (float32, bfloat16 or float16)")
  config, vocab_size = read_run_config(workdir)
  mesh = sharding.make_mesh({"data": -1}, devices=jax.local_devices())
  cfg, params, frozen = train.build_model(config, vocab_size, mesh, log=log)
  stage, restored = train.latest_checkpoint(workdir, config, params)
  if restored is None:
    raise UserError(f"{workdir}: no checkpoint to export (under {workdir}/ckpt)")
  log(f"[export] the latest {stage} params of {workdir}")
  path = config.model.get("hf_checkpoint", "")
  architecture = _architecture(cfg, path)
  tokenizer = _tokenizer(path, log)
  lcfg = lora_lib.config_from_model_config(config.model)
  pair = isinstance(restored, dict) and "selector" in restored
  roles = restored.items() if pair else [("", restored)]
  out = Path(out)
  for role, trainable in roles:
    target = out / role if role else out
    merged = jax.device_get(lora_lib.merged(trainable, frozen))
    hf.save_hf_checkpoint(merged, cfg, target, tokenizer=tokenizer,
                          architecture=architecture, dtype=dtype or None)
    if lcfg is not None:
      lora_lib.save_adapters(jax.device_get(trainable), lcfg, target / "adapter",
                             base_model=path)
    log(f"[export] wrote {target} ({architecture}"
        f"{', merged LoRA + adapter/' if lcfg is not None else ''})")
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from fgrpo_jax.errors import UserError
  f = flags.FLAGS
  try:
    export_run(f.workdir, f.out, dtype=f.dtype or None)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  _define_flags()
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  app.run(main)
