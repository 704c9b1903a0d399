"""A tiny Qwen3.5 Hugging Face checkpoint trained end to end through the normal entry
point: configs/recsys.py:tiny with model.hf_checkpoint, SFT then F-GRPO, eval.json, and
the export of the trained policy back to a Qwen3.5 checkpoint.

The checkpoint is written by our exporter from random numpy weights (no torch); the
item-token task of configs/recsys.py:tiny needs 68 token ids. Slow: the hybrid stack
compiles the SFT step, the rollout, the RL step and the evaluation.
"""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from configs import recsys
from fgrpo_jax import export, train
from fgrpo_jax.models import hf, llama, qwen3_5

pytestmark = pytest.mark.slow

# One DeltaNet layer and one gated-attention layer (Qwen3.5 alternates them 3:1; one of
# each is the smallest stack that runs both kinds, and the hybrid stack's compile time
# grows with its depth), GQA in both kinds of layer, untied embeddings.
CFG = llama.ModelConfig(
    arch="qwen3_5", vocab_size=72, num_layers=2, hidden=32, num_heads=4, num_kv_heads=2,
    head_dim=8, mlp_hidden=64, qk_norm=True, partial_rotary_factor=0.25,
    layer_types=("linear_attention", "full_attention"), linear_num_key_heads=2,
    linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
    linear_conv_kernel=4)
CONTRACT_KEYS = {"hit@1", "hit@5", "ndcg@5", "recall@5", "slate_recall"}


def _checkpoint(directory):
  """Random weights in the checkpoints' conventions (zero-centred norms, the DeltaNet's
  gated norm around 1, decay rates exp(A_log) in [1, 16])."""
  rng = np.random.default_rng(0)

  def weight(path, x):
    name = str(path[-1].key)
    if name == "A_log":
      return np.log(rng.uniform(1.0, 16.0, x.shape)).astype(np.float32)
    centre = 1.0 if name in ("norm", "dt_bias") else 0.0
    return (centre + rng.normal(0.0, 0.2, x.shape)).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(weight, qwen3_5.param_shapes(CFG))
  return hf.save_hf_checkpoint(params, CFG, directory, architecture="Qwen3_5ForCausalLM")


def _config(checkpoint):
  c = recsys.get_config("tiny")
  c.model.hf_checkpoint = str(checkpoint)
  c.prompt.format = "ids"  # the item-token task
  c.sft.update(steps=4, lr=1e-2)
  c.rl.update(steps=2, inner_steps=1)
  c.log_every, c.ckpt_every = 2, 100  # checkpoints at the end of each stage only
  c.eval.update(every=0, test_examples=64, batch_size=64)
  return c


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory):
  ckpt = _checkpoint(tmp_path_factory.mktemp("qwen3_5") / "hf")
  workdir = str(tmp_path_factory.mktemp("run"))
  lines = []
  result = train.run(_config(ckpt), workdir, log=lines.append)
  return {"ckpt": ckpt, "workdir": workdir, "result": result, "log": "\n".join(lines)}


def test_qwen3_5_checkpoint_trains_with_fgrpo_and_writes_eval_json(qwen_run):
  result, log = qwen_run["result"], qwen_run["log"]
  with open(os.path.join(qwen_run["workdir"], "eval.json")) as f:
    saved = json.load(f)
  assert saved == result
  assert (saved["algorithm"], saved["task"], saved["split"], saved["steps"]) == (
      "fgrpo", "recsys", "test", 6)
  assert CONTRACT_KEYS <= set(saved["metrics"])
  assert all(0.0 <= saved["metrics"][k] <= 1.0 for k in CONTRACT_KEYS)
  assert CONTRACT_KEYS <= set(saved["oracle"])
  for name in ("random", "popularity"):
    assert CONTRACT_KEYS <= set(saved["references"][name])
  assert f"model: {qwen_run['ckpt']}" in log and "2 layers, hidden 32" in log
  assert "[sft] step 4/4" in log and "[rl] step 2/2" in log


def test_trained_qwen3_5_exports_as_qwen3_5_with_the_same_logits(qwen_run, tmp_path):
  """The export is a Qwen3.5 text checkpoint holding the RL stage's params: reloading
  it gives their logits bit for bit, and training moved the DeltaNet and attention
  weights away from the initial checkpoint."""
  workdir, ckpt = qwen_run["workdir"], qwen_run["ckpt"]
  out = export.export_run(workdir, tmp_path / "export", log=lambda _: None)
  written = json.loads((out / "config.json").read_text())
  assert written["architectures"] == ["Qwen3_5ForCausalLM"]
  assert (written["model_type"], written["layer_types"]) == ("qwen3_5_text",
                                                             list(CFG.layer_types))
  cfg, base = hf.load_config_and_params(ckpt)
  stage, trained = train.latest_checkpoint(workdir, _config(ckpt), base)
  assert stage == "rl"
  back_cfg, back = hf.load_config_and_params(out)
  assert back_cfg == cfg == dataclasses.replace(CFG, chunk_size=cfg.chunk_size)
  for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for group, name in (("linear", "in_proj_qkv"), ("linear", "A_log"), ("attn", "q_proj")):
    assert np.abs(np.asarray(trained[group][name]) - np.asarray(base[group][name])).max() > 1e-4
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9))
  np.testing.assert_array_equal(np.asarray(hf._forward(back, tokens, cfg=cfg)),
                                np.asarray(hf._forward(trained, tokens, cfg=cfg)))
