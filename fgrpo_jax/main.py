"""Entry point: `python -m fgrpo_jax.main --config=configs/recsys.py --workdir=DIR`.

Any config field can be overridden on the command line, e.g.
`--config.algorithm=grpo --config.rl.steps=50`. Mistakes in the config or the
data end in one line naming the field or the file, not a traceback.
"""

from __future__ import annotations

import os

# TensorFlow (pulled in by clu's TensorBoard writer) is chatty on import.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags, logging
from ml_collections import config_flags

from fgrpo_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/*.py[:variant]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and eval.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from fgrpo_jax import distributed
  distributed.maybe_initialize()
  from fgrpo_jax import train
  with cli.user_errors():
    train.run(_CONFIG.value, _WORKDIR.value)


def run():
  logging.set_verbosity(logging.WARNING)
  cli.precheck()  # a bad --config file or field: one line, before absl's traceback
  app.run(main)


if __name__ == "__main__":
  run()
