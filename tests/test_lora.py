"""LoRA adapters (fgrpo_jax/models/lora.py) and their use in the train loop and export."""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from configs import recsys
from fgrpo_jax import config as config_lib
from fgrpo_jax import export, rollout, sharding, train
from fgrpo_jax import steps as steps_lib
from fgrpo_jax.models import hf, llama, qwen3_5
from fgrpo_jax.models import load_pretrained
from fgrpo_jax.models import lora

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = llama.ModelConfig(vocab_size=40, num_layers=2, hidden=16, num_heads=4, num_kv_heads=2,
                        head_dim=8, mlp_hidden=32, init_std=0.2)
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@functools.lru_cache(maxsize=None)
def _base_params():
  """Random base params (numpy: llama.init_params would cost a compile)."""
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.2, x.shape), jnp.float32),
                      llama.param_shapes(CFG))


_forward = hf._forward  # the jitted forward of PretrainedModel.logits (one compile per cfg)


def _random_adapters(lcfg, seed=1):
  """Adapters with lora_b != 0 (as after training)."""
  ad = lora.init_adapters(CFG, lcfg, jax.random.key(seed))
  keys = iter(jax.random.split(jax.random.key(seed + 1), len(lcfg.targets)))
  for t in lcfg.targets:
    b = ad["layers"][t]["lora_b"]
    ad["layers"][t]["lora_b"] = 0.1 * jax.random.normal(next(keys), b.shape)
  return ad


def test_zero_b_merge_is_exactly_the_base():
  base = _base_params()
  lcfg = lora.LoraConfig(rank=3, alpha=6.0, targets=ALL)
  ad = lora.init_adapters(CFG, lcfg, jax.random.key(1))
  for t in ALL:
    L, d_in, d_out = base["layers"][t].shape
    assert ad["layers"][t]["lora_a"].shape == (L, d_in, 3)
    assert ad["layers"][t]["lora_b"].shape == (L, 3, d_out)
    assert float(jnp.abs(ad["layers"][t]["lora_a"]).max()) > 0
    assert not np.any(np.asarray(ad["layers"][t]["lora_b"]))
  merged = lora.merge(base, ad, lcfg.scale)
  assert jax.tree.structure(merged) == jax.tree.structure(base)
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(merged)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree.structure(lora.adapter_shapes(CFG, lcfg)) == jax.tree.structure(ad)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _LowRank:
  """A kernel the model multiplies as x @ W + scale * (x @ A) @ B (never merged)."""

  w: jax.Array
  a: jax.Array
  b: jax.Array
  scale: float = dataclasses.field(metadata={"static": True})

  def astype(self, dtype):
    return _LowRank(self.w.astype(dtype), self.a.astype(dtype), self.b.astype(dtype),
                    self.scale)

  def __rmatmul__(self, x):
    return x @ self.w + self.scale * ((x @ self.a) @ self.b)


def test_lora_forward_equals_forward_of_merged_weights():
  base = _base_params()
  lcfg = lora.LoraConfig(rank=2, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
  ad = _random_adapters(lcfg)
  tokens = jax.random.randint(jax.random.key(3), (2, 7), 0, CFG.vocab_size)
  # The LoRA forward: llama's own code with a low-rank path in the targeted matmuls.
  layers = dict(base["layers"])
  for t, a in ad["layers"].items():
    layers[t] = _LowRank(base["layers"][t], a["lora_a"], a["lora_b"], lcfg.scale)
  low_rank = _forward({**base, "layers": layers}, tokens, cfg=CFG)
  merged = _forward(lora.merge(base, ad, lcfg.scale), tokens, cfg=CFG)
  np.testing.assert_allclose(np.asarray(merged), np.asarray(low_rank), atol=2e-5, rtol=2e-5)
  plain = _forward(base, tokens, cfg=CFG)
  assert float(jnp.abs(merged - plain).max()) > 1e-2  # the adapters do change the model
  # Only the targets moved.
  m = lora.merge(base, ad, lcfg.scale)
  assert m["layers"]["k_proj"] is base["layers"]["k_proj"] and m["embed"] is base["embed"]


def test_train_step_differentiates_and_updates_only_the_adapters():
  base = _base_params()
  lcfg = lora.LoraConfig(rank=2, alpha=4.0, targets=("q_proj", "up_proj"))
  ad = lora.init_adapters(CFG, lcfg, jax.random.key(1))
  layout = rollout.Layout(slate_size=3, rank_size=2, mid_tags=(1, 2), end_tags=(3,))
  B, C, P = 4, 5, 6
  batch = {"prompt": jnp.full((B, P), 5, jnp.int32), "prompt_mask": jnp.ones((B, P), bool),
           "cand_tokens": 10 + jnp.tile(jnp.arange(C), (B, 1)),
           "pool_mask": jnp.ones((B, C), bool), "relevance": jnp.ones((B, C), jnp.float32)}
  optimizer = steps_lib.make_optimizer(recsys.get_config("tiny").optim, 1e-2, 10)
  state = steps_lib.TrainState(ad, optimizer.init(ad), jnp.zeros((), jnp.int32))
  frozen = lora.Frozen(base, lcfg.scale)
  # Traced, not compiled (the end-to-end run below compiles and runs the steps): the
  # new state is adapters + their optimizer state; the base is only an input.
  out, _ = jax.eval_shape(functools.partial(steps_lib.sft_step, cfg=CFG, layout=layout,
                                            optimizer=optimizer, frozen=frozen),
                          state, batch, jax.random.key(2))
  assert jax.tree.structure(out.params) == jax.tree.structure(ad)
  ad_shapes = sorted(x.shape for x in jax.tree.leaves(ad))
  opt_arrays = [x for x in jax.tree.leaves(out.opt_state) if x.ndim > 0]
  assert sorted(x.shape for x in opt_arrays) == sorted(ad_shapes * 2)  # Adam mu and nu
  # The policy's gradient w.r.t. the adapters, and none is ever taken w.r.t. the base.
  loss = lambda a: jnp.sum(lora.model_params(a, frozen)["layers"]["up_proj"] ** 2)
  grads = jax.grad(loss)(ad)
  assert jax.tree.structure(grads) == jax.tree.structure(ad)
  assert float(jnp.abs(grads["layers"]["up_proj"]["lora_b"]).max()) > 0


def test_adapter_files_peft_layout_round_trip(tmp_path):
  lcfg = lora.LoraConfig(rank=2, alpha=8.0, targets=("q_proj", "o_proj", "gate_proj"))
  ad = _random_adapters(lcfg)
  lora.save_adapters(ad, lcfg, tmp_path, base_model="/ckpt/base")
  meta = json.loads((tmp_path / lora.ADAPTER_CONFIG).read_text())
  assert (meta["peft_type"], meta["r"], meta["lora_alpha"]) == ("LORA", 2, 8.0)
  assert meta["target_modules"] == ["q_proj", "o_proj", "gate_proj"]
  assert meta["base_model_name_or_path"] == "/ckpt/base"
  from safetensors.numpy import load_file
  tensors = load_file(tmp_path / lora.ADAPTER_WEIGHTS)
  name = "base_model.model.model.layers.1.self_attn.q_proj"
  assert tensors[f"{name}.lora_A.weight"].shape == (2, CFG.hidden)  # torch Linear [out, in]
  assert tensors[f"{name}.lora_B.weight"].shape == (CFG.num_heads * CFG.head_dim, 2)
  assert "base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight" in tensors
  back, lcfg2 = lora.load_adapters(tmp_path)
  assert lcfg2 == lcfg
  for a, b in zip(jax.tree.leaves(ad), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_adapters_are_split_like_their_kernels():
  sizes = {"data": 1, "fsdp": 2, "tensor": 2}
  specs = sharding.param_specs(lora.adapter_shapes(CFG, lora.LoraConfig(2, 1.0, ALL)), sizes)
  kernels = sharding.param_specs(llama.param_shapes(CFG), sizes)
  for t in ALL:
    w = tuple(kernels["layers"][t])  # (None, in side, out side)
    assert len(w) == 3 and w[1] and w[2]
    assert specs["layers"][t]["lora_a"] == P(None, w[1])  # lora_a @ lora_b has w's layout
    assert specs["layers"][t]["lora_b"] == P(None, None, w[2])


# ----------------------------------------------------------------------------
# Qwen3.5: adapters on the gated attention's and the Gated DeltaNet's projections.

QWEN = llama.ModelConfig(
    arch="qwen3_5", vocab_size=40, num_layers=3, hidden=16, num_heads=2, num_kv_heads=1,
    head_dim=8, mlp_hidden=24, qk_norm=True, partial_rotary_factor=0.5,
    layer_types=("linear_attention", "full_attention", "linear_attention"),
    linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=8,
    linear_value_head_dim=4, linear_conv_kernel=3, chunk_size=4)
QWEN_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
QWEN_DELTANET = ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj")


def _qwen_base():
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.3, x.shape), jnp.float32),
                      qwen3_5.param_shapes(QWEN))


def _qwen_adapters(targets, seed=1):
  lcfg = lora.LoraConfig(rank=2, alpha=4.0, targets=targets)
  ad = lora.init_adapters(QWEN, lcfg, jax.random.key(seed))
  b_keys = iter(jax.random.split(jax.random.key(seed + 1), len(targets)))
  ad = {g: {t: {**a, "lora_b": 0.3 * jax.random.normal(next(b_keys), a["lora_b"].shape)}
            for t, a in group.items()} for g, group in ad.items()}
  return ad, lcfg


def test_qwen3_5_adapters_sit_beside_their_kernels_and_only_they_get_gradients():
  """Each target's adapter is stacked like its kernel (attn/ over the attention layers,
  linear/ over the DeltaNet layers, layers/ over all); a loss through the adapted model
  has a non-zero gradient for every adapter and the base is no argument of it."""
  base = _qwen_base()
  ad, lcfg = _qwen_adapters(QWEN_ATTN + QWEN_DELTANET + ("up_proj",))
  assert set(ad) == {"attn", "linear", "layers"}
  assert set(ad["attn"]) == set(QWEN_ATTN) and set(ad["linear"]) == set(QWEN_DELTANET)
  for group, targeted in ad.items():
    for t, a in targeted.items():
      L, d_in, d_out = base[group][t].shape
      assert a["lora_a"].shape == (L, d_in, 2) and a["lora_b"].shape == (L, 2, d_out), t
  assert jax.tree.structure(lora.adapter_shapes(QWEN, lcfg)) == jax.tree.structure(ad)
  tokens = jax.random.randint(jax.random.key(3), (2, 6), 0, QWEN.vocab_size)
  frozen = lora.Frozen(base, lcfg.scale)
  weights = jax.random.normal(jax.random.key(4), (2, 6, QWEN.vocab_size))
  loss = lambda a: jnp.sum(_forward(lora.model_params(a, frozen), tokens, cfg=QWEN) * weights)
  grads = jax.jit(jax.grad(loss))(ad)
  assert jax.tree.structure(grads) == jax.tree.structure(ad)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    assert float(jnp.abs(g).max()) > 0, sharding.path_name(path)
  merged = lora.merge(base, ad, lcfg.scale)
  assert merged["attn"]["q_norm"] is base["attn"]["q_norm"]
  assert merged["linear"]["conv"] is base["linear"]["conv"]
  assert merged["layers"]["gate_proj"] is base["layers"]["gate_proj"]


def test_qwen3_5_lora_forward_merge_and_export_give_the_same_logits(tmp_path):
  """The low-rank path in every targeted matmul = the merged weights; the merged model
  exported as a Qwen3.5 checkpoint reloads to identical logits; the PEFT files number
  the layers in the whole stack and load back."""
  base = _qwen_base()
  ad, lcfg = _qwen_adapters(("q_proj", "o_proj", "in_proj_qkv", "in_proj_b", "out_proj",
                             "down_proj"))
  tokens = jax.random.randint(jax.random.key(3), (2, 7), 0, QWEN.vocab_size)
  low_rank = dict(base)
  for group, targeted in ad.items():
    kernels = dict(base[group])
    for t, a in targeted.items():
      kernels[t] = _LowRank(base[group][t], a["lora_a"], a["lora_b"], lcfg.scale)
    low_rank[group] = kernels
  merged = lora.merge(base, ad, lcfg.scale)
  logits = np.asarray(_forward(merged, tokens, cfg=QWEN))
  np.testing.assert_allclose(logits, np.asarray(_forward(low_rank, tokens, cfg=QWEN)),
                             atol=2e-5, rtol=2e-5)
  assert np.abs(logits - np.asarray(_forward(base, tokens, cfg=QWEN))).max() > 1e-2
  out = hf.save_hf_checkpoint(jax.device_get(merged), QWEN, tmp_path / "merged",
                              architecture="Qwen3_5ForCausalLM")
  cfg, params = hf.load_config_and_params(out)
  assert dataclasses.replace(cfg, chunk_size=QWEN.chunk_size) == QWEN  # a compute setting
  np.testing.assert_array_equal(np.asarray(_forward(params, tokens, cfg=QWEN)), logits)
  lora.save_adapters(ad, lcfg, tmp_path / "adapter", cfg=QWEN)
  from safetensors.numpy import load_file
  names = set(load_file(tmp_path / "adapter" / lora.ADAPTER_WEIGHTS))
  prefix = "base_model.model.model.layers"
  assert f"{prefix}.1.self_attn.q_proj.lora_A.weight" in names
  assert f"{prefix}.2.linear_attn.in_proj_qkv.lora_B.weight" in names
  assert f"{prefix}.0.self_attn.q_proj.lora_A.weight" not in names
  assert f"{prefix}.1.linear_attn.out_proj.lora_A.weight" not in names
  assert f"{prefix}.2.mlp.down_proj.lora_A.weight" in names
  loaded, lcfg2 = lora.load_adapters(tmp_path / "adapter", cfg=QWEN)
  assert lcfg2 == lcfg and jax.tree.structure(loaded) == jax.tree.structure(ad)
  for a, b in zip(jax.tree.leaves(ad), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_target_the_architecture_lacks_is_one_config_error():
  c = recsys.get_config("tiny")
  c.model.update(lora_rank=2, lora_targets="q_proj,in_proj_z")
  mesh = sharding.make_mesh({"data": -1})
  with pytest.raises(config_lib.ConfigError,
                     match=r"^config.model.lora_targets='q_proj,in_proj_z': 'in_proj_z': this "
                           r"llama model has no such projection \(it has q_proj, .*down_proj\)$"):
    train.build_model(c, 68, mesh, log=lambda _: None)


@pytest.mark.parametrize("field,value,match", [
    ("lora_rank", -1, "config.model.lora_rank=-1"),
    ("lora_alpha", 0.0, "config.model.lora_alpha=0.0"),
    ("lora_targets", "q_proj,qkv", "config.model.lora_targets='q_proj,qkv'.*'qkv'.*gate_proj"),
    ("lora_targets", "", "config.model.lora_targets=''"),
])
def test_bad_lora_config_is_one_config_error(field, value, match):
  c = recsys.get_config("tiny")
  c.model.lora_rank = 4
  c.model[field] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate_config(c)


# ----------------------------------------------------------------------------
# End to end: a tiny HF checkpoint + LoRA, SFT then F-GRPO with a KL penalty.


def _run_config(checkpoint):
  c = recsys.get_config("tiny")
  c.model.update(hf_checkpoint=str(checkpoint), lora_rank=4, lora_alpha=8.0)
  c.prompt.format = "ids"  # the item-token task (chat prompts are tested in test_tasks.py)
  c.sft.update(steps=6, lr=1e-2)
  c.rl.update(steps=2, inner_steps=1, kl_coef=0.05)
  c.log_every, c.ckpt_every = 2, 100  # checkpoints at the end of each stage only
  c.eval.update(every=0, test_examples=64, batch_size=64)
  return c


@pytest.fixture(scope="module")
def lora_run(tiny_hf_checkpoint, tmp_path_factory):
  ckpt = tiny_hf_checkpoint()
  workdir = str(tmp_path_factory.mktemp("lora_run"))
  calls = []
  original = steps_lib.rl_step

  def spy(state, ref_params, batch, key, *, frozen=None, **kw):
    calls.append((ref_params, frozen))
    return original(state, ref_params, batch, key, frozen=frozen, **kw)

  lines = []
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(steps_lib, "rl_step", spy)
    result = train.run(_run_config(ckpt), workdir, log=lines.append)
  return {"ckpt": ckpt, "workdir": workdir, "result": result, "log": "\n".join(lines),
          "rl_calls": calls}


def test_lora_run_trains_and_writes_eval_json(lora_run):
  result, log = lora_run["result"], lora_run["log"]
  with open(os.path.join(lora_run["workdir"], "eval.json")) as f:
    assert json.load(f) == result
  assert result["steps"] == 8 and result["algorithm"] == "fgrpo"
  assert "LoRA: rank 4, alpha 8 on q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj" in log
  assert "[sft] step 6/6" in log and "[rl] step 2/2" in log
  for key in ("hit@1", "ndcg@5", "slate_recall"):
    assert 0.0 <= result["metrics"][key] <= 1.0


def test_checkpoints_hold_adapters_only_and_resume(lora_run):
  workdir = lora_run["workdir"]
  for stage, step in (("sft", 6), ("rl", 2)):
    meta = ocp.StandardCheckpointer().metadata(os.path.join(workdir, "ckpt", stage, str(step),
                                                            "params"))
    tree = meta.item_metadata.tree
    assert set(tree) == {"layers"} and set(tree["layers"]) == set(ALL)
    assert all(set(v) == {"lora_a", "lora_b"} for v in tree["layers"].values())
    opt = ocp.StandardCheckpointer().metadata(os.path.join(
        workdir, "ckpt", stage, str(step), "opt_state")).item_metadata.tree
    opt_shapes = [x.shape for x in jax.tree.leaves(opt) if len(x.shape)]
    assert sorted(opt_shapes) == sorted([x.shape for x in jax.tree.leaves(tree)] * 2)
  lines = []
  again = train.run(_run_config(lora_run["ckpt"]), workdir, log=lines.append)
  log = "\n".join(lines)
  assert "[sft] resumed from step 6" in log and "[rl] resumed from step 2" in log
  assert "[sft] step 2/6" not in log
  assert again["metrics"] == lora_run["result"]["metrics"]


def test_kl_reference_is_the_base_without_adapters(lora_run):
  cfg, base = hf.load_config_and_params(lora_run["ckpt"])
  assert len(lora_run["rl_calls"]) == 2
  for ref_params, frozen in lora_run["rl_calls"]:
    assert ref_params is frozen.params  # the frozen base itself, no adapters, no copy
    assert jax.tree.structure(ref_params) == jax.tree.structure(base)
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(ref_params)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # and it never moved


def test_export_round_trips_merged_params(lora_run, tmp_path):
  workdir, ckpt = lora_run["workdir"], lora_run["ckpt"]
  out = tmp_path / "export"
  lines = []
  export.export_run(workdir, out, log=lines.append)
  assert f"[export] the latest rl params of {workdir}" in lines
  assert sorted(p.name for p in out.iterdir()) == [
      "adapter", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
  # The merged params of the run, rebuilt here from the base and the rl checkpoint.
  cfg, base = hf.load_config_and_params(ckpt)
  config = _run_config(ckpt)
  lcfg = lora.config_from_model_config(config.model)
  like = lora.init_adapters(cfg, lcfg, jax.random.key(0))
  stage, adapters = train.latest_checkpoint(workdir, config, like)
  assert stage == "rl"
  for t in lcfg.targets:
    assert float(jnp.abs(adapters["layers"][t]["lora_b"]).max()) > 0  # trained
  merged = lora.merged(adapters, lora.Frozen(base, lcfg.scale))
  back = load_pretrained(out)
  assert back.config == cfg and len(back.tokenizer) <= cfg.vocab_size
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(back.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9))
  logits = np.asarray(back.logits(tokens))
  np.testing.assert_array_equal(logits, np.asarray(_forward(merged, tokens, cfg=cfg)))
  assert np.abs(logits - np.asarray(_forward(base, tokens, cfg=cfg))).max() > 1e-4
  # The adapters on their own, applied to the base, give the same weights.
  ad, lcfg2 = lora.load_adapters(out / "adapter")
  assert lcfg2 == lcfg
  for a, b in zip(jax.tree.leaves(lora.merge(base, ad, lcfg2.scale)), jax.tree.leaves(merged)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_cli_error_is_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "fgrpo_jax.export", f"--workdir={tmp_path}",
                         f"--out={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      f"error: {tmp_path}/run_config.json: not found (export needs the workdir of a train run)"]
