"""Tests for fgrpo_jax/checkpoint.py: save, resume, and falling back past a corrupt step."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from fgrpo_jax import checkpoint


def _tree(v):
  return {"w": jnp.full((3, 4), v, jnp.float32), "b": jnp.arange(4, dtype=jnp.float32) + v}


def test_save_restore_and_params_only(tmp_path):
  ckpt = checkpoint.StageCheckpointer(str(tmp_path / "stage"), keep=3, every=2)
  assert not ckpt.save(1, _tree(1.0), _tree(10.0))  # not a multiple of `every`
  assert ckpt.save(2, _tree(2.0), _tree(20.0))
  assert ckpt.save(3, _tree(3.0), _tree(30.0), force=True)
  ckpt.close()
  ckpt = checkpoint.StageCheckpointer(str(tmp_path / "stage"))
  step, params, opt = ckpt.restore_latest(checkpoint.abstract_like(_tree(0.0)),
                                          checkpoint.abstract_like(_tree(0.0)))
  assert step == 3
  np.testing.assert_array_equal(params["w"], _tree(3.0)["w"])
  np.testing.assert_array_equal(opt["b"], _tree(30.0)["b"])
  step, params, opt = ckpt.restore_latest(checkpoint.abstract_like(_tree(0.0)))
  assert step == 3 and opt is None
  ckpt.close()


def test_corrupt_latest_step_falls_back_to_previous(tmp_path, caplog):
  directory = str(tmp_path / "stage")
  ckpt = checkpoint.StageCheckpointer(directory, keep=3, every=1)
  ckpt.save(1, _tree(1.0), _tree(10.0))
  ckpt.save(2, _tree(2.0), _tree(20.0))
  ckpt.close()
  # Damage every data file of step 2 (as a disk error or a half-copied directory would).
  damaged = 0
  for root, _, files in os.walk(os.path.join(directory, "2")):
    for name in files:
      if "metadata" not in name:
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"\x00garbage")
        damaged += 1
  assert damaged
  ckpt = checkpoint.StageCheckpointer(directory)
  step, params, _ = ckpt.restore_latest(checkpoint.abstract_like(_tree(0.0)),
                                        checkpoint.abstract_like(_tree(0.0)))
  ckpt.close()
  assert step == 1
  np.testing.assert_array_equal(params["w"], _tree(1.0)["w"])
  assert any("unreadable" in r.getMessage() for r in caplog.records)


def test_no_checkpoint_gives_none(tmp_path):
  ckpt = checkpoint.StageCheckpointer(str(tmp_path / "empty"))
  assert ckpt.restore_latest(checkpoint.abstract_like(_tree(0.0))) == (None, None, None)
  ckpt.close()


def test_checkpoint_of_other_parameters_is_one_clear_error(tmp_path):
  """Another run's checkpoint (other tree or shapes, e.g. a changed LoRA rank) is not
  'corrupt': falling back would silently restart the stage, so it is a UserError."""
  ck = checkpoint.StageCheckpointer(str(tmp_path), every=1)
  ck.save(1, {"a": jnp.ones(3)}, {"m": jnp.zeros(3)}, force=True)
  ck.close()
  ck = checkpoint.StageCheckpointer(str(tmp_path), every=1)
  for other in ({"b": jnp.ones(3)}, {"a": jnp.ones(4)}):
    with pytest.raises(checkpoint.CheckpointMismatch, match="config.model.lora_rank"):
      ck.restore_latest(checkpoint.abstract_like(other))
  ck.close()
