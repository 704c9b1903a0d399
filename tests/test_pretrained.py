"""A Hugging Face backbone in the train loop: config.model.hf_checkpoint and zero-shot eval.

The checkpoints are tiny random Llamas written by our exporter (conftest.py
`tiny_hf_checkpoint`); the item-token task of configs/recsys.py:tiny needs 68 token
ids (8 specials + 60 items).
"""

import json
import os
import shutil

import numpy as np
import pytest

from configs import recsys
from fgrpo_jax import config as config_lib
from fgrpo_jax import evaluate, sharding, train
from fgrpo_jax.data import arrays as arrays_lib
from fgrpo_jax.data import tasks
from fgrpo_jax.models import hf

TASK_VOCAB = 68


def _config(checkpoint, **model):
  c = recsys.get_config("tiny")
  c.model.hf_checkpoint = str(checkpoint)
  c.model.update(model)
  c.prompt.format = "ids"  # the item-token task (chat prompts are tested in test_tasks.py)
  c.mode = "eval"
  c.eval.update(test_examples=64, batch_size=64)
  return c


def test_zero_shot_eval_evaluates_the_pretrained_weights(tiny_hf_checkpoint, tmp_path):
  ckpt = tiny_hf_checkpoint()
  lines = []
  result = train.run(_config(ckpt), str(tmp_path / "zs"), log=lines.append)
  log = "\n".join(lines)
  assert f"evaluating the pretrained weights of {ckpt} (zero-shot)" in log
  assert "the sizes in config.model are ignored" in log
  with open(tmp_path / "zs" / "eval.json") as f:
    saved = json.load(f)
  assert saved["steps"] == 0 and saved["metrics"] == result["metrics"]
  assert {"hit@1", "hit@5", "ndcg@5", "recall@5", "slate_recall"} <= set(saved["metrics"])
  # The same numbers as a direct greedy evaluation of the checkpoint's weights.
  config = _config(ckpt)
  task = tasks.load_task(config)
  cfg, params = hf.load_config_and_params(ckpt)
  test = arrays_lib.subset(task.splits["test"], 64, config.seed + 1)
  layout = task.layout_fn(config.rollout.slate_size, config.rollout.rank_size)
  direct = evaluate.evaluate_model(params, test, cfg=cfg, layout=layout, batch_size=64)
  assert direct == result["metrics"]
  # LoRA at init (B = 0) is exactly the base: same zero-shot numbers.
  with_lora = train.run(_config(ckpt, lora_rank=2), str(tmp_path / "zs_lora"), log=lambda _: None)
  assert with_lora["metrics"] == result["metrics"]


def test_checkpoint_vocabulary_too_small_is_one_config_error(tiny_hf_checkpoint, tmp_path):
  ckpt = tiny_hf_checkpoint(vocab_size=40, tokenizer=False)
  with pytest.raises(config_lib.ConfigError) as e:
    train.run(_config(ckpt), str(tmp_path / "w"), log=lambda _: None)
  msg = str(e.value)
  assert msg.startswith("config.model.hf_checkpoint:") and "\n" not in msg
  assert f"vocabulary of {TASK_VOCAB}" in msg and "vocab_size=40" in msg


def test_missing_files_and_unsupported_architecture_are_config_errors(tiny_hf_checkpoint,
                                                                      tmp_path):
  src = tiny_hf_checkpoint()
  no_weights = tmp_path / "no_weights"
  shutil.copytree(src, no_weights)
  os.remove(no_weights / hf.SAFETENSORS_FILE)
  no_config = tmp_path / "no_config"
  shutil.copytree(src, no_config)
  os.remove(no_config / "config.json")
  mistral = tmp_path / "mistral"
  shutil.copytree(src, mistral)
  hf_cfg = json.loads((mistral / "config.json").read_text())
  hf_cfg.update(architectures=["MistralForCausalLM"], model_type="mistral")
  (mistral / "config.json").write_text(json.dumps(hf_cfg))
  for ckpt, match in [(no_weights, "no model.safetensors"),
                      (no_config, "config.json: not found"),
                      (tmp_path / "absent", "not a local checkpoint directory"),
                      (mistral, "supported architectures: LlamaForCausalLM, Qwen2ForCausalLM, "
                                "Qwen3ForCausalLM")]:
    with pytest.raises(config_lib.ConfigError, match=f"^config.model.hf_checkpoint: .*{match}"):
      train.run(_config(ckpt), str(tmp_path / "w"), log=lambda _: None)


def test_hf_backbone_shapes_ignore_config_sizes(tiny_hf_checkpoint):
  ckpt = tiny_hf_checkpoint()
  c = _config(ckpt, dtype="bfloat16", remat="full", hidden=999, num_layers=7)
  cfg = config_lib.pretrained_model_config(c, TASK_VOCAB)
  assert (cfg.vocab_size, cfg.hidden, cfg.num_layers, cfg.head_dim) == (128, 32, 2, 8)
  assert cfg.dtype == "bfloat16" and cfg.remat == "full"
  mesh = sharding.make_mesh({"data": -1})
  cfg2, params, frozen = train.build_model(c, TASK_VOCAB, mesh, log=lambda _: None)
  assert cfg2 == cfg and frozen is None
  want = hf.load_hf_params(ckpt, cfg)
  for a, b in zip(np.asarray(params["layers"]["q_proj"]), np.asarray(want["layers"]["q_proj"])):
    np.testing.assert_array_equal(a, b)
  assert params["embed"].dtype == np.float32  # master weights stay float32
