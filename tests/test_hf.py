"""Parity of fgrpo_jax/models/hf.py with Hugging Face transformers (PyTorch).

The fixtures in tests/golden/hf/ (tiny random Llama/Qwen2/Qwen3/Qwen3.5 checkpoints plus
torch's logits) come from scripts/make_hf_golden.py; these tests need no torch,
except `test_transformers_loads_our_export`, which is skipped without it.
"""

import dataclasses
import functools
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fgrpo_jax.errors import UserError
from fgrpo_jax.models import decoder, hf, llama
from fgrpo_jax.models import load_pretrained, save_hf_checkpoint

GOLDEN = Path(__file__).parent / "golden" / "hf"
QWEN3_5 = ["qwen3_5", "qwen3_5_tied"]
NAMES = ["llama_tied", "llama3_rope", "qwen2", "qwen3"] + QWEN3_5
TOL = 1e-4


@functools.lru_cache(maxsize=None)
def _model(name, dtype="float32"):
  return load_pretrained(GOLDEN / name, dtype=dtype)


@functools.lru_cache(maxsize=None)
def _golden(name):
  with np.load(GOLDEN / name / "golden.npz") as g:
    return {k: g[k] for k in g.files}


def _architecture(name):
  return json.loads((GOLDEN / name / "config.json").read_text())["architectures"][0]


@pytest.mark.parametrize("name", NAMES)
def test_full_forward_matches_transformers(name):
  g, m = _golden(name), _model(name)
  out = m.logits(g["input_ids"])
  assert out.dtype == jnp.float32 and out.shape == g["logits"].shape
  diff = float(np.abs(np.asarray(out) - g["logits"]).max())
  print(f"{name}: full-forward max |ours - torch| = {diff:.2e}")
  assert diff <= TOL


@functools.partial(jax.jit, static_argnames=("cfg",))
def _prefill(params, tokens, cfg, mask=None):
  return decoder(cfg).prefill(params, tokens, cfg, mask)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _decode(params, prefix, cache, tokens, index, cfg):
  return decoder(cfg).decode_step(params, prefix, cache, tokens, index, cfg)


def _cached_greedy(m, prompt, new, mask=None, cfg=None):
  """Step logits [B, N, V] of prefill + one decode step per token of `new` [B, N]."""
  cfg = cfg or m.config
  B, N = new.shape
  first, prefix = _prefill(m.params, jnp.asarray(prompt), cfg=cfg,
                           mask=None if mask is None else jnp.asarray(mask, bool))
  cache = decoder(cfg).init_decode_cache(cfg, B, 1, N, prefix)
  steps = [first]
  for t in range(N - 1):  # feed torch's greedy tokens so every step sees the same input
    logits, cache = _decode(m.params, prefix, cache, jnp.asarray(new[:, t:t + 1]),
                            jnp.int32(t), cfg=cfg)
    steps.append(logits[:, 0])
  return np.stack([np.asarray(s) for s in steps], axis=1)


@pytest.mark.parametrize("name", NAMES)
def test_cached_decoding_matches_transformers(name):
  g, m = _golden(name), _model(name)
  new = g["new_tokens"]
  ours = _cached_greedy(m, g["input_ids"], new)  # [B, N, V]
  diff = float(np.abs(ours - g["step_logits"]).max())
  print(f"{name}: cached-decoding max |ours - torch| = {diff:.2e}")
  assert diff <= TOL
  np.testing.assert_array_equal(ours.argmax(-1), new)  # same greedy continuation


@functools.partial(jax.jit, static_argnames=("cfg",))
def _padded_forward(params, tokens, mask, cfg):
  return decoder(cfg).forward(params, tokens, cfg, mask)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _completion_logits(params, prompt, mask, completion, cfg):
  return decoder(cfg).completion_logits(params, prompt, mask, completion, cfg, with_prompt=True)


@pytest.mark.parametrize("name, chunk", [("qwen3_5", 7), ("qwen3_5_tied", 64)])
def test_qwen3_5_left_padded_batch_matches_transformers(name, chunk):
  """A left-padded batch: logits at the real positions, the cached greedy continuation
  (recurrent DeltaNet form, KV cache), and the shared-prefix training forward with G=2
  copies of that continuation; DeltaNet chunks of 7 tokens (three chunks over the
  20-token prompt, the last one padded) and of 64 (one chunk)."""
  g, m = _golden(name), _model(name)
  cfg = dataclasses.replace(m.config, chunk_size=chunk)
  mask = g["pad_mask"].astype(bool)
  prompt = jnp.asarray(g["pad_input_ids"])
  ours = np.asarray(_padded_forward(m.params, prompt, jnp.asarray(mask), cfg=cfg))
  diff = float(np.abs(ours - g["pad_logits"])[mask].max())
  new, want = g["pad_new_tokens"], g["pad_step_logits"]
  steps = _cached_greedy(m, g["pad_input_ids"], new, mask, cfg)
  step_diff = float(np.abs(steps - want).max())
  shared, prompt_logits = _completion_logits(m.params, prompt, jnp.asarray(mask),
                                             jnp.asarray(np.stack([new, new], 1)), cfg=cfg)
  shared_diff = float(np.abs(np.asarray(shared) - want[:, None]).max())
  # The same pass's prompt logits (with_prompt) are the padded forward's.
  prompt_diff = float(np.abs(np.asarray(prompt_logits) - g["pad_logits"])[mask].max())
  print(f"{name} chunk {chunk}: padded forward {diff:.2e}, cached greedy {step_diff:.2e}, "
        f"shared prefix {shared_diff:.2e}, its prompt logits {prompt_diff:.2e}")
  assert max(diff, step_diff, shared_diff, prompt_diff) <= TOL
  np.testing.assert_array_equal(steps.argmax(-1), new)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_load_is_close(name):
  g, m = _golden(name), _model(name, "bfloat16")
  assert m.config.dtype == "bfloat16"
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(m.params))
  out = np.asarray(m.logits(g["input_ids"]))
  assert out.dtype == np.float32
  diff = np.abs(out - g["logits"]).max()
  agree = (out.argmax(-1) == g["logits"].argmax(-1)).mean()
  print(f"{name}: bfloat16 max |ours - torch f32| = {diff:.3f}, argmax agreement {agree:.2f}")
  # The deeper hybrid fixtures are more sensitive: transformers' own bf16 forward is
  # 0.40 (qwen3_5) and 0.23 (qwen3_5_tied) off its float32 logits.
  assert diff <= (0.6 if name in QWEN3_5 else 0.3) and agree >= 0.9


@pytest.mark.parametrize("name", NAMES)
def test_tokenizer_and_rope_match(name):
  g, m = _golden(name), _model(name)
  assert m.tokenizer(str(g["text"])).input_ids == g["text_ids"].tolist()
  assert m.tokenizer.decode(g["text_ids"]) == str(g["text"])
  assert m.tokenizer.eos_token == "</s>" and len(m.tokenizer) <= m.config.vocab_size
  inv = np.asarray(llama._rope_inv_freq(m.config))
  np.testing.assert_allclose(inv, g["inv_freq"], rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_export_round_trip(name, tmp_path):
  g, m = _golden(name), _model(name)
  out = save_hf_checkpoint(m.params, m.config, tmp_path / "export", tokenizer=m.tokenizer,
                           architecture=_architecture(name))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp dirs left
  back = load_pretrained(out)
  assert back.config == m.config
  for a, b in zip(jax.tree.leaves(m.params), jax.tree.leaves(back.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(back.logits(g["input_ids"])),
                                np.asarray(m.logits(g["input_ids"])))
  assert back.tokenizer(str(g["text"])).input_ids == g["text_ids"].tolist()


@pytest.mark.parametrize("name", NAMES)
def test_transformers_loads_our_export(name, tmp_path):
  torch = pytest.importorskip("torch")
  from transformers import AutoModelForCausalLM, AutoTokenizer
  g, m = _golden(name), _model(name)
  out = save_hf_checkpoint(m.params, m.config, tmp_path / "export", tokenizer=m.tokenizer,
                           architecture=_architecture(name))
  model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True,
                                               dtype=torch.float32).eval()
  with torch.no_grad():
    logits = model(input_ids=torch.from_numpy(g["input_ids"]).long(), use_cache=False).logits
  diff = float(np.abs(logits.numpy() - g["logits"]).max())
  assert diff <= TOL, diff
  tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
  assert tok(str(g["text"])).input_ids == g["text_ids"].tolist()


def test_sharded_index_and_shardings(tmp_path):
  src = GOLDEN / "qwen2"
  tensors = load_file(src / hf.SAFETENSORS_FILE)
  names = sorted(tensors)
  parts = {"model-00001-of-00002.safetensors": names[::2],
           "model-00002-of-00002.safetensors": names[1::2]}
  for file, part in parts.items():
    save_file({k: tensors[k] for k in part}, tmp_path / file, metadata={"format": "pt"})
  index = {"metadata": {}, "weight_map": {k: f for f, part in parts.items() for k in part}}
  (tmp_path / hf.SAFETENSORS_INDEX).write_text(json.dumps(index))
  cfg = _model("qwen2").config
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shardings = jax.tree.map(lambda _: sharding, _model("qwen2").params)
  params = hf.load_hf_params(tmp_path, cfg, shardings=shardings)
  for a, b in zip(jax.tree.leaves(_model("qwen2").params), jax.tree.leaves(params)):
    assert b.sharding == sharding
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _copy_checkpoint(name, dst, drop=(), add=None):
  shutil.copytree(GOLDEN / name, dst)
  tensors = {k: v for k, v in load_file(dst / hf.SAFETENSORS_FILE).items() if k not in drop}
  tensors.update(add or {})
  save_file(tensors, dst / hf.SAFETENSORS_FILE, metadata={"format": "pt"})
  return dst


def test_missing_and_unexpected_tensors_are_one_user_error(tmp_path):
  missing = "model.layers.1.mlp.up_proj.weight"
  d = _copy_checkpoint("qwen2", tmp_path / "a", drop=[missing])
  with pytest.raises(UserError, match=f"missing tensor '{missing}'.*model.safetensors"):
    load_pretrained(d)
  d = _copy_checkpoint("qwen2", tmp_path / "b",
                       add={"model.layers.0.self_attn.o_proj.bias": np.zeros(32, np.float32)})
  with pytest.raises(UserError, match="unexpected tensor 'model.layers.0.self_attn.o_proj.bias'"):
    load_pretrained(d)
  shape_bad = {"model.norm.weight": np.ones(16, np.float32)}
  d = _copy_checkpoint("qwen2", tmp_path / "c", add=shape_bad)
  with pytest.raises(UserError, match="'model.norm.weight'.*shape \\[16\\], expected \\[32\\]"):
    load_pretrained(d)
  os.remove(d / hf.SAFETENSORS_FILE)
  with pytest.raises(UserError, match="no model.safetensors"):
    load_pretrained(d)


def test_unsupported_architecture_names_supported_ones_and_path(tmp_path):
  d = tmp_path / "mistral"
  shutil.copytree(GOLDEN / "llama_tied", d)
  hf_cfg = json.loads((d / "config.json").read_text())
  hf_cfg.update(architectures=["MistralForCausalLM"], model_type="mistral")
  (d / "config.json").write_text(json.dumps(hf_cfg))
  with pytest.raises(UserError) as e:
    load_pretrained(d)
  msg = str(e.value)
  assert "MistralForCausalLM" in msg and str(d / "config.json") in msg
  assert "LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM" in msg
  with pytest.raises(UserError, match="not a local checkpoint directory"):
    load_pretrained(tmp_path / "nope")


BASE = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
        "intermediate_size": 128, "vocab_size": 100}


def test_config_from_hf_variants():
  c = hf.config_from_hf({**BASE, "architectures": ["LlamaForCausalLM"]})
  assert (c.head_dim, c.num_kv_heads, c.rope_theta, c.rope_scaling) == (16, 4, 10000.0, None)
  assert not (c.qkv_bias or c.qk_norm or c.tie_embeddings)
  # Legacy (transformers 4) rope fields, model_type only.
  c = hf.config_from_hf({**BASE, "model_type": "llama", "rope_theta": 5e5, "head_dim": 32,
                         "rope_scaling": {"type": "linear", "factor": 4.0}})
  assert c.head_dim == 32 and c.rope_theta == 5e5
  assert dict(c.rope_scaling) == {"rope_type": "linear", "factor": 4.0}
  np.testing.assert_allclose(llama._rope_inv_freq(c),
                             1 / (5e5 ** (np.arange(0, 32, 2) / 32)) / 4, rtol=1e-5)
  c = hf.config_from_hf({**BASE, "model_type": "llama", "max_position_embeddings": 4096,
                         "rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 1,
                                          "high_freq_factor": 4}})
  assert dict(c.rope_scaling)["original_max_position_embeddings"] == 4096
  c = hf.config_from_hf({**BASE, "architectures": ["Qwen2ForCausalLM"],
                         "num_key_value_heads": 2, "tie_word_embeddings": True})
  assert c.qkv_bias and c.tie_embeddings and c.num_kv_heads == 2
  c = hf.config_from_hf({**BASE, "architectures": ["Qwen3ForCausalLM"]}, dtype="bfloat16")
  assert c.qk_norm and c.head_dim == 128 and c.dtype == "bfloat16"  # Qwen3Config default


@pytest.mark.parametrize("extra, match", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'.*default, linear, llama3"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'dynamic'"),
    ({"rope_scaling": {"type": "linear"}}, "missing the field 'factor'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_key_value_heads": 3}, "num_kv_heads"),
    ({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True, "sliding_window": 64,
      "max_window_layers": 1}, "sliding-window"),
])
def test_config_from_hf_rejects_what_we_cannot_match(extra, match):
  with pytest.raises(UserError, match=match):
    hf.config_from_hf({**BASE, "architectures": ["LlamaForCausalLM"], **extra},
                      source="/ckpt/config.json")


def test_export_refuses_architectures_that_cannot_hold_the_model(tmp_path):
  m = _model("qwen3")
  with pytest.raises(UserError, match="qk_norm"):
    save_hf_checkpoint(m.params, m.config, tmp_path / "x", architecture="LlamaForCausalLM")
  m = _model("qwen2")
  with pytest.raises(UserError, match="Qwen2ForCausalLM"):
    save_hf_checkpoint(m.params, m.config, tmp_path / "x", architecture="LlamaForCausalLM")
  with pytest.raises(UserError, match="supported architectures"):
    save_hf_checkpoint(m.params, m.config, tmp_path / "x", architecture="GPT2LMHeadModel")
  assert not list(tmp_path.iterdir())


def test_export_replaces_existing_checkpoint_and_casts(tmp_path):
  m = _model("llama_tied")
  d = save_hf_checkpoint(m.params, m.config, tmp_path / "ckpt")
  d = save_hf_checkpoint(m.params, m.config, tmp_path / "ckpt", dtype="bfloat16")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
  assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
  assert json.loads((d / "config.json").read_text())["dtype"] == "bfloat16"
  assert load_file(d / hf.SAFETENSORS_FILE)["model.embed_tokens.weight"].dtype == jnp.bfloat16
  params = hf.load_hf_params(d, m.config)
  np.testing.assert_array_equal(
      np.asarray(params["embed"]),
      np.asarray(m.params["embed"]).astype(jnp.bfloat16).astype(np.float32))


def test_qwen3_5_multimodal_checkpoint_loads_its_text_decoder(tmp_path, capsys):
  """The multimodal layout (text under model.language_model., config under text_config)
  loads the same weights; the vision tower and the MTP head are skipped with one line.
  MoE fails with one line naming model_type."""
  src = GOLDEN / "qwen3_5"
  d = tmp_path / "mm"
  shutil.copytree(src, d)
  tensors = load_file(d / hf.SAFETENSORS_FILE)
  renamed = {(k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k): v
             for k, v in tensors.items()}
  renamed["model.visual.patch_embed.proj.weight"] = np.zeros((4, 3), np.float32)
  renamed["mtp.fc.weight"] = np.zeros((2, 2), np.float32)
  save_file(renamed, d / hf.SAFETENSORS_FILE, metadata={"format": "pt"})
  text = json.loads((src / "config.json").read_text())
  (d / "config.json").write_text(json.dumps({
      "architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
      "tie_word_embeddings": False, "text_config": {**text, "model_type": "qwen3_5_text"},
      "vision_config": {"depth": 1}}))
  m = load_pretrained(d)
  assert "skipping 2 tensors of model.visual.*, mtp.*" in capsys.readouterr().out
  assert m.config == _model("qwen3_5").config
  for a, b in zip(jax.tree.leaves(m.params), jax.tree.leaves(_model("qwen3_5").params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  (d / "config.json").write_text(json.dumps({**text, "model_type": "qwen3_5_moe",
                                             "architectures": ["Qwen3_5MoeForCausalLM"]}))
  with pytest.raises(UserError, match="model_type='qwen3_5_moe': mixture-of-experts"):
    load_pretrained(d)
