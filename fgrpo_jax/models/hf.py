"""Hugging Face checkpoints <-> our decoders (Llama, Qwen2, Qwen3; Qwen3.5 text).

    config_from_hf(hf_config)            config.json dict -> ModelConfig
    load_hf_params(directory, cfg, ...)  model.safetensors (or a sharded index) -> params
    save_hf_checkpoint(params, cfg, dir) params -> config.json + model.safetensors
    load_pretrained(path)                all of the above + tokenizer + a jitted forward

A path ending in `.gguf` (a llama.cpp file) is read through `fgrpo_jax/models/gguf.py`
wherever a checkpoint directory is accepted: its metadata becomes the config.json dict,
its dequantised tensors are served under HF names, its tokenizer is rebuilt.

Everything is local: nothing here touches the network. Tensors are read with
`safetensors.safe_open(framework="numpy")` (importing `ml_dtypes` teaches numpy the
name "bfloat16", so bf16 checkpoints read natively), and each stacked parameter is
filled layer by layer into one preallocated host array that goes to the device
before the next one is built: the host never holds a second copy of the model.

Layout: HF `nn.Linear` weights are [out, in]; our kernels are [in, out], so every
projection (and `lm_head`) is transposed. HF Llama/Qwen checkpoints already use the
half-split rotary layout that `llama.apply_rope` implements, so q/k need no permutation.

Qwen3.5 (`qwen3_5_text`, or the text part of the multimodal `qwen3_5` checkpoint, whose
tensors live under `model.language_model.`; the vision tower `model.visual.*` and the
multi-token-prediction head `mtp.*` are skipped) stacks its per-layer tensors by kind
(qwen3_5.py: `layers/`, `attn/`, `linear/`); the DeltaNet's depthwise conv weight
[Cd, 1, Kc] becomes our [Kc, Cd]. Exports are written as `Qwen3_5ForCausalLM`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16" for safe_open)
import numpy as np

from fgrpo_jax.errors import UserError
from fgrpo_jax.models import qwen3_5
from fgrpo_jax.models.decoders import decoder
from fgrpo_jax.models.llama import ModelConfig, Params

# architecture -> (model_type, qkv_bias, qk_norm)
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", False, False),
    "Qwen2ForCausalLM": ("qwen2", True, False),
    "Qwen3ForCausalLM": ("qwen3", False, True),
    "Qwen3_5ForCausalLM": ("qwen3_5_text", False, True),
    # The multimodal checkpoint: its text decoder only (the vision tower is skipped).
    "Qwen3_5ForConditionalGeneration": ("qwen3_5", False, True),
}
QWEN3_5_ARCHITECTURES = ("Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration")
_ARCH_BY_MODEL_TYPE = {v[0]: k for k, v in SUPPORTED_ARCHITECTURES.items()}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"

# Our layer key -> (HF name inside `model.layers.{i}.`, transpose?).
_LAYER_NAMES = {
    "attn_norm": ("input_layernorm.weight", False),
    "q_proj": ("self_attn.q_proj.weight", True),
    "k_proj": ("self_attn.k_proj.weight", True),
    "v_proj": ("self_attn.v_proj.weight", True),
    "o_proj": ("self_attn.o_proj.weight", True),
    "q_bias": ("self_attn.q_proj.bias", False),
    "k_bias": ("self_attn.k_proj.bias", False),
    "v_bias": ("self_attn.v_proj.bias", False),
    "q_norm": ("self_attn.q_norm.weight", False),
    "k_norm": ("self_attn.k_norm.weight", False),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "gate_proj": ("mlp.gate_proj.weight", True),
    "up_proj": ("mlp.up_proj.weight", True),
    "down_proj": ("mlp.down_proj.weight", True),
}
# Qwen3.5's DeltaNet layers: our linear/ key -> (HF name inside the layer, layout), where
# layout is False (as is), True (transposed) or "conv" ([Cd, 1, Kc] <-> our [Kc, Cd]).
_DELTANET_NAMES = {
    "in_proj_qkv": ("linear_attn.in_proj_qkv.weight", True),
    "in_proj_z": ("linear_attn.in_proj_z.weight", True),
    "in_proj_a": ("linear_attn.in_proj_a.weight", True),
    "in_proj_b": ("linear_attn.in_proj_b.weight", True),
    "conv": ("linear_attn.conv1d.weight", "conv"),
    "dt_bias": ("linear_attn.dt_bias", False),
    "A_log": ("linear_attn.A_log", False),
    "norm": ("linear_attn.norm.weight", False),
    "out_proj": ("linear_attn.out_proj.weight", True),
}
# Prefix of the text decoder's tensors in a multimodal Qwen3.5 checkpoint, and the
# prefixes of what we skip there.
_QWEN3_5_TEXT_PREFIX = "model.language_model."
_SKIPPED_PREFIXES = ("model.visual.", "mtp.")
# Our top-level key -> (HF name, transpose?).
_TOP_NAMES = {
    "embed": ("model.embed_tokens.weight", False),
    "final_norm": ("model.norm.weight", False),
    "lm_head": ("lm_head.weight", True),
}
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "F64": np.float64}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
# Rows per read when a large 2-D tensor is transposed into place (bounds the temp copy).
_CHUNK_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------
# config.json -> ModelConfig


def _architecture(hf: dict, source: str) -> str:
  archs = hf.get("architectures") or []
  model_type = hf.get("model_type")
  supported = ", ".join(SUPPORTED_ARCHITECTURES)
  if "moe" in str(model_type) and str(model_type).startswith("qwen3_5"):
    raise UserError(f"{source}: model_type={model_type!r}: mixture-of-experts Qwen3.5 is not "
                    "supported (dense qwen3_5 / qwen3_5_text only)")
  if archs:
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
      raise UserError(
          f"{source}: unsupported architecture {arch!r} (model_type={model_type!r}); "
          f"supported architectures: {supported}")
    return arch
  if model_type in _ARCH_BY_MODEL_TYPE:
    return _ARCH_BY_MODEL_TYPE[model_type]
  raise UserError(
      f"{source}: unsupported model (architectures={archs or None}, "
      f"model_type={model_type!r}); supported architectures: {supported}")


def _rope(hf: dict, source: str, partial_ok: bool = False) -> tuple[float, tuple | None, float]:
  """(rope_theta, rope_scaling items, partial_rotary_factor) following transformers'
  precedence rules.

  transformers >= 5 writes `rope_parameters` (with `rope_theta` inside); older
  checkpoints write top-level `rope_theta` and `rope_scaling` (`type` or `rope_type`).
  A legacy `rope_scaling` takes precedence, as it does in transformers. Qwen3.5
  (`partial_ok`) rotates part of each head and names M-RoPE sections; with text-only
  positions the three sections carry the same position, so M-RoPE is plain rotary.
  """
  params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
  if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
    raise UserError(f"{source}: per-layer-type rope parameters are not supported: {params!r}")
  params = dict(params)
  theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
  kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
  params.pop("type", None)
  partial = params.pop("partial_rotary_factor", hf.get("partial_rotary_factor"))
  if partial_ok:
    params.pop("mrope_section", None), params.pop("mrope_interleaved", None)
    partial = 0.25 if partial is None else partial  # Qwen3_5TextConfig's default
  elif partial not in (None, 1, 1.0):
    raise UserError(f"{source}: partial_rotary_factor={partial} is not supported (only 1.0)")
  partial = float(partial or 1.0)
  if kind not in SUPPORTED_ROPE_TYPES:
    raise UserError(
        f"{source}: unsupported rope scaling type {kind!r}; supported: "
        f"{', '.join(SUPPORTED_ROPE_TYPES)}")
  if kind == "default":
    return theta, None, partial
  try:
    if kind == "linear":
      scaling = {"rope_type": "linear", "factor": float(params["factor"])}
    else:  # llama3
      old_len = hf.get("original_max_position_embeddings",
                       params.get("original_max_position_embeddings",
                                  hf.get("max_position_embeddings")))
      scaling = {"rope_type": "llama3", "factor": float(params["factor"]),
                 "low_freq_factor": float(params["low_freq_factor"]),
                 "high_freq_factor": float(params["high_freq_factor"]),
                 "original_max_position_embeddings": int(old_len)}
  except (KeyError, TypeError) as e:
    raise UserError(f"{source}: rope scaling {kind!r} is missing the field {e}") from None
  return theta, tuple(sorted(scaling.items())), partial


def config_from_hf(hf_config: dict, *, dtype: str = "float32",
                   source: str = "config.json") -> ModelConfig:
  """Builds our ModelConfig from a Hugging Face config.json dict.

  `source` names the file in error messages; `dtype` becomes the compute dtype.
  Anything that would make our forward differ from transformers' (attention/MLP
  biases on Llama, sliding-window layers, other activations or rope types) is a
  UserError rather than a silent mismatch.
  """
  hf = hf_config
  arch = _architecture(hf, source)
  _, qkv_bias, qk_norm = SUPPORTED_ARCHITECTURES[arch]
  if arch in QWEN3_5_ARCHITECTURES:
    return _qwen3_5_config(hf, arch, dtype, source)

  def need(key):
    if key not in hf:
      raise UserError(f"{source}: missing field {key!r} (required for {arch})")
    return hf[key]

  hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
  default_head_dim = 128 if arch == "Qwen3ForCausalLM" else hidden // heads
  head_dim = int(hf.get("head_dim") or default_head_dim)
  if hf.get("hidden_act", "silu") != "silu":
    raise UserError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
  if hf.get("mlp_bias"):
    raise UserError(f"{source}: mlp_bias=true is not supported")
  if arch != "Qwen2ForCausalLM" and hf.get("attention_bias"):
    raise UserError(f"{source}: attention_bias=true is not supported for {arch} "
                    "(it adds an o_proj bias our decoder does not have)")
  num_layers = int(need("num_hidden_layers"))
  layer_types = hf.get("layer_types") or []
  sliding = any(t != "full_attention" for t in layer_types) or (
      hf.get("use_sliding_window") and hf.get("sliding_window")
      and int(hf.get("max_window_layers", num_layers)) < num_layers)
  if sliding:
    raise UserError(f"{source}: sliding-window attention layers are not supported")
  theta, scaling, _ = _rope(hf, source)
  try:
    return ModelConfig(
        vocab_size=int(need("vocab_size")),
        num_layers=num_layers,
        hidden=hidden,
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        mlp_hidden=int(need("intermediate_size")),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_norm=qk_norm,
        dtype=str(jnp.dtype(dtype)),
    )
  except ValueError as e:
    raise UserError(f"{source}: {e}") from None


def _qwen3_5_config(hf: dict, arch: str, dtype: str, source: str) -> ModelConfig:
  """ModelConfig of a Qwen3.5 config.json (its `text_config` for the multimodal one)."""
  text = hf
  if arch == "Qwen3_5ForConditionalGeneration":
    text = hf.get("text_config")
    if not isinstance(text, dict):
      raise UserError(f"{source}: missing field 'text_config' (required for {arch})")
    source = f"{source} text_config"

  def need(key):
    if key not in text:
      raise UserError(f"{source}: missing field {key!r} (required for {arch})")
    return text[key]

  for key in ("num_experts", "num_local_experts"):
    if text.get(key):
      raise UserError(f"{source}: {key}={text[key]}: mixture-of-experts layers are not supported")
  if text.get("hidden_act", "silu") != "silu":
    raise UserError(f"{source}: hidden_act={text['hidden_act']!r} is not supported (only 'silu')")
  if text.get("attention_bias"):
    raise UserError(f"{source}: attention_bias=true is not supported for {arch}")
  num_layers = int(need("num_hidden_layers"))
  types = text.get("layer_types")
  if not types:  # transformers' default pattern: every `interval`-th layer is attention
    interval = int(text.get("full_attention_interval", 4))
    types = [qwen3_5.LINEAR if (i + 1) % interval else qwen3_5.FULL for i in range(num_layers)]
  theta, scaling, partial = _rope(text, source, partial_ok=True)
  tie = hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
  heads = int(need("num_attention_heads"))
  try:
    return ModelConfig(
        arch="qwen3_5", vocab_size=int(need("vocab_size")), num_layers=num_layers,
        hidden=int(need("hidden_size")), num_heads=heads,
        num_kv_heads=int(text.get("num_key_value_heads") or heads),
        head_dim=int(text.get("head_dim") or 256), mlp_hidden=int(need("intermediate_size")),
        rope_theta=theta, rope_scaling=scaling, partial_rotary_factor=partial,
        rms_eps=float(text.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(tie),
        qk_norm=True, layer_types=tuple(types),
        linear_num_key_heads=int(text.get("linear_num_key_heads", 16)),
        linear_num_value_heads=int(text.get("linear_num_value_heads", 32)),
        linear_key_head_dim=int(text.get("linear_key_head_dim", 128)),
        linear_value_head_dim=int(text.get("linear_value_head_dim", 128)),
        linear_conv_kernel=int(text.get("linear_conv_kernel_dim", 4)),
        dtype=str(jnp.dtype(dtype)))
  except ValueError as e:
    raise UserError(f"{source}: {e}") from None


def hf_config_dict(cfg: ModelConfig, architecture: str = "LlamaForCausalLM",
                   dtype: str = "float32", tokenizer=None,
                   max_position_embeddings: int = 32768) -> dict:
  """The config.json transformers needs to rebuild `cfg` as `architecture`."""
  if architecture not in SUPPORTED_ARCHITECTURES:
    raise UserError(f"unsupported architecture {architecture!r}; supported architectures: "
                    f"{', '.join(SUPPORTED_ARCHITECTURES)}")
  model_type, qkv_bias, qk_norm = SUPPORTED_ARCHITECTURES[architecture]
  if (cfg.arch == "qwen3_5") != (architecture in QWEN3_5_ARCHITECTURES):
    raise UserError(f"{architecture} cannot express a model of arch {cfg.arch!r}")
  if cfg.qk_norm != qk_norm:
    raise UserError(f"{architecture} cannot express qk_norm={cfg.qk_norm} "
                    "(q/k RMSNorm exists exactly in Qwen3ForCausalLM)")
  if cfg.qkv_bias and not qkv_bias:
    raise UserError(f"{architecture} cannot express qkv_bias=True without an o_proj bias; "
                    "export as Qwen2ForCausalLM")
  rope = {"rope_type": "default", **dict(cfg.rope_scaling or ())}
  rope["rope_theta"] = cfg.rope_theta
  out = {
      "architectures": [architecture],
      "model_type": model_type,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden,
      "intermediate_size": cfg.mlp_hidden,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": max(max_position_embeddings,
                                     int(rope.get("original_max_position_embeddings", 0))),
      "rms_norm_eps": cfg.rms_eps,
      "rope_theta": cfg.rope_theta,
      "rope_parameters": rope,
      "tie_word_embeddings": cfg.tie_embeddings,
      "use_cache": True,
      "dtype": str(jnp.dtype(dtype)),
  }
  if model_type == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  if model_type == "qwen3":
    out.update(attention_bias=False)
  if model_type in ("qwen2", "qwen3"):
    out.update(use_sliding_window=False, sliding_window=None,
               max_window_layers=cfg.num_layers)
  if cfg.arch == "qwen3_5":  # always the text decoder alone (no vision tower to write)
    rope["partial_rotary_factor"] = cfg.partial_rotary_factor
    out.update(
        architectures=["Qwen3_5ForCausalLM"], model_type="qwen3_5_text", attention_bias=False,
        layer_types=list(cfg.layer_types), linear_num_key_heads=cfg.linear_num_key_heads,
        linear_num_value_heads=cfg.linear_num_value_heads,
        linear_key_head_dim=cfg.linear_key_head_dim,
        linear_value_head_dim=cfg.linear_value_head_dim,
        linear_conv_kernel_dim=cfg.linear_conv_kernel)
    del out["rope_theta"]
  if tokenizer is not None:
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
      out[key] = getattr(tokenizer, key, None)
  return out


# ----------------------------------------------------------------------------
# Reading safetensors checkpoints.


def expected_tensors(cfg: ModelConfig, text_prefix: str = "model."
                     ) -> Iterator[tuple[tuple[str, ...], str, int | None, Any]]:
  """Yields (our key path, HF tensor name, index in our stack or None, layout) for `cfg`;
  layout: False, True (transposed) or "conv". `text_prefix` is where the decoder's
  tensors live ("model.", or "model.language_model." in a multimodal checkpoint)."""
  shapes = decoder(cfg).param_shapes(cfg)
  for key in ("embed", "final_norm", "lm_head"):
    if key in shapes:
      name, layout = _TOP_NAMES[key]
      if name.startswith("model."):  # lm_head sits outside the decoder
        name = text_prefix + name[len("model."):]
      yield (key,), name, None, layout
  # Which model layers each stacked group holds, in order.
  groups = {"layers": (range(cfg.num_layers), _LAYER_NAMES)}
  if cfg.arch == "qwen3_5":
    kinds = list(enumerate(cfg.layer_types))
    groups["attn"] = ([i for i, t in kinds if t == qwen3_5.FULL], _LAYER_NAMES)
    groups["linear"] = ([i for i, t in kinds if t == qwen3_5.LINEAR], _DELTANET_NAMES)
  for group, (layers, names) in groups.items():
    for key in shapes.get(group, {}):
      name, layout = names[key]
      for j, i in enumerate(layers):
        yield (group, key), f"{text_prefix}layers.{i}.{name}", j, layout


def _hf_shape(ours: tuple[int, ...], layout) -> tuple[int, ...]:
  if layout == "conv":
    return (ours[1], 1, ours[0])
  return ours[::-1] if layout else ours


def _text_prefix(files: dict) -> str:
  return (_QWEN3_5_TEXT_PREFIX if _QWEN3_5_TEXT_PREFIX + "embed_tokens.weight" in files
          else "model.")


def _safe_open(path: Path):
  """safetensors.safe_open of `path`; a file it cannot read (cut short by an interrupted
  download, overwritten) is one UserError naming it."""
  from safetensors import safe_open
  try:
    return safe_open(str(path), framework="numpy")
  except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...
    raise _corrupt(path, e) from None


def _corrupt(path: Path, e: Exception) -> UserError:
  detail = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
  return UserError(f"{path}: truncated or corrupt ({detail})")


def _tensor_files(directory: Path) -> tuple[dict[str, Path], Path]:
  """(HF tensor name -> the safetensors file that holds it, the file that lists them)."""
  if _is_gguf(directory):
    with _gguf().GGUFTensors(directory) as tensors:
      return {name: directory for name in tensors.keys()}, directory
  single, index = directory / SAFETENSORS_FILE, directory / SAFETENSORS_INDEX
  if single.is_file():
    with _safe_open(single) as f:
      return {name: single for name in f.keys()}, single
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text(encoding="utf-8-sig"))["weight_map"]
    except (ValueError, KeyError) as e:
      raise UserError(f"{index}: not a valid safetensors index ({e})") from None
    files = {}
    for name, file in weight_map.items():
      path = directory / file
      if not path.is_file():
        raise UserError(f"{index}: tensor {name!r} maps to missing file {path}")
      files[name] = path
    return files, index
  raise UserError(f"{directory}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} found "
                  "(only safetensors checkpoints are supported)")


def _is_gguf(path) -> bool:
  return str(path).endswith(".gguf")


def _gguf():
  """fgrpo_jax/models/gguf.py, imported only when a .gguf path is read (it is also the
  entry point `python -m fgrpo_jax.models.gguf`, which must not be imported before)."""
  from fgrpo_jax.models import gguf
  return gguf


def _open_tensors(path: Path):
  """A tensor file opened for reading: safetensors, or a GGUF behind the same interface."""
  if _is_gguf(path):
    return _gguf().GGUFTensors(path)
  return _safe_open(path)


def _ignorable(name: str, cfg: ModelConfig) -> bool:
  # Old checkpoints store rotary buffers; tied checkpoints sometimes keep lm_head.
  return name.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and name == "lm_head.weight")


def _skipped(name: str, cfg: ModelConfig) -> bool:
  """Parts of a multimodal Qwen3.5 checkpoint we do not load (vision tower, MTP head)."""
  return cfg.arch == "qwen3_5" and name.startswith(_SKIPPED_PREFIXES)


def _read_into(out: np.ndarray, handle, name: str, transpose) -> None:
  """Copies tensor `name` (in layout `transpose`: False, True or "conv") into the
  preallocated view `out`."""
  if transpose == "conv":  # [Cd, 1, Kc] -> [Kc, Cd]; conv weights are small
    out[...] = handle.get_tensor(name)[:, 0, :].T
    return
  if not transpose:
    out[...] = handle.get_tensor(name)
    return
  sl = handle.get_slice(name)
  rows = sl.get_shape()[0]  # HF [out, in] -> our [in, out]
  step = max(1, _CHUNK_ELEMENTS // max(1, out.shape[0]))
  for a in range(0, rows, step):
    b = min(a + step, rows)  # safetensors slices do not clamp
    out[:, a:b] = sl[a:b].T


def _lookup(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def check_tensors(cfg: ModelConfig, files: dict, listing, handles: dict, directory,
                  log=print) -> list:
  """One UserError listing every tensor that is missing, unexpected, of the wrong shape
  or of an unsupported dtype. files: HF name -> file; handles: file -> opened file.

  Returns the expected tensors (as `expected_tensors` yields them, under the text
  prefix the files use). Parts of a multimodal checkpoint we do not load are not
  errors: `log` gets one line naming them.
  """
  expected = list(expected_tensors(cfg, _text_prefix(files)))
  expected_names = {name for _, name, _, _ in expected}
  shapes = decoder(cfg).param_shapes(cfg)
  problems = []
  for _, name, _, _ in expected:
    if name not in files:
      problems.append(f"missing tensor {name!r} (not in {listing})")
  skipped = [name for name in files if _skipped(name, cfg)]
  for name, path in files.items():
    if name not in expected_names and not _ignorable(name, cfg) and not _skipped(name, cfg):
      problems.append(f"unexpected tensor {name!r} in {path}")
  if skipped:
    parts = sorted({p for p in _SKIPPED_PREFIXES for n in skipped if n.startswith(p)})
    log(f"[hf] {directory}: loading the text decoder only; skipping {len(skipped)} tensors "
        f"of {', '.join(p + '*' for p in parts)} (the vision tower / MTP head)")
  stored = {path: set(h.keys()) for path, h in handles.items()}
  for path_keys, name, layer, transpose in expected:
    if name not in files:
      continue
    handle = handles[files[name]]
    if name not in stored[files[name]]:
      problems.append(f"missing tensor {name!r} (the index maps it to {files[name]})")
      continue
    want = _hf_shape(tuple(_lookup(shapes, path_keys).shape[1 if layer is not None else 0:]),
                     transpose)
    info = handle.get_slice(name)
    got, st_dtype = tuple(info.get_shape()), info.get_dtype()
    if got != want:
      problems.append(f"tensor {name!r} in {files[name]} has shape {list(got)}, "
                      f"expected {list(want)} from the config")
    elif st_dtype not in _ST_DTYPES:
      problems.append(f"tensor {name!r} in {files[name]} has unsupported dtype {st_dtype}")
  if problems:
    shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
    raise UserError(f"checkpoint {directory} does not match its config: " + "; ".join(shown))
  return expected


def load_hf_params(directory, cfg: ModelConfig, dtype="float32", shardings=None,
                   log=print) -> Params:
  """Reads a HF safetensors checkpoint (or a .gguf file) into our stacked params dict.

  `shardings`: optional pytree matching the params (or one `jax.sharding.Sharding`
  for all leaves); each leaf is built on the host, placed with `jax.device_put`,
  and released before the next one is built. `log` gets one line when parts of a
  multimodal checkpoint are skipped.
  """
  directory = Path(directory)
  files, listing = _tensor_files(directory)
  np_dtype = np.dtype(jnp.dtype(dtype))
  shapes = decoder(cfg).param_shapes(cfg)

  with contextlib.ExitStack() as stack:
    handles = {path: stack.enter_context(_open_tensors(path))
               for path in sorted(set(files.values()))}
    expected = check_tensors(cfg, files, listing, handles, directory, log=log)

    by_leaf: dict[tuple[str, ...], list] = {}
    for path_keys, name, layer, transpose in expected:
      by_leaf.setdefault(path_keys, []).append((name, layer, transpose))
    params: Params = {"layers": {}}
    for path_keys, entries in by_leaf.items():
      host = np.empty(_lookup(shapes, path_keys).shape, np_dtype)
      for name, layer, transpose in entries:
        try:
          _read_into(host if layer is None else host[layer], handles[files[name]], name,
                     transpose)
        except Exception as e:  # noqa: BLE001 - a header that promises more than the file has
          raise _corrupt(files[name], e) from None
      if shardings is None:
        value = jax.device_put(host)
      elif isinstance(shardings, jax.sharding.Sharding):
        value = jax.device_put(host, shardings)
      else:
        value = jax.device_put(host, _lookup(shardings, path_keys))
      del host  # the only host copy of this leaf; the next leaf reuses the memory
      parent = params
      for key in path_keys[:-1]:
        parent = parent.setdefault(key, {})
      parent[path_keys[-1]] = value
    return params


# ----------------------------------------------------------------------------
# Writing checkpoints.


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...], np.dtype, Callable]],
                       metadata: dict[str, str]) -> None:
  """Streams tensors into a safetensors file; `tensors` = (name, shape, dtype, produce)."""
  header: dict[str, Any] = {"__metadata__": metadata}
  offset = 0
  for name, shape, dtype, _ in tensors:
    size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": _ST_NAMES[np.dtype(dtype)], "shape": list(shape),
                    "data_offsets": [offset, offset + size]}
    offset += size
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for name, shape, dtype, produce in tensors:
      for chunk in produce():
        f.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())
    if f.tell() != 8 + len(blob) + offset:
      raise RuntimeError(f"internal error writing {path}: wrong byte count")


def replace_dir(staged: Path, target: Path) -> None:
  """Renames the complete directory `staged` onto `target` (a sibling); an existing
  target is moved aside first and deleted last, so readers never see a half one."""
  old = None
  if target.exists():
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rename(target, old / target.name)
  os.rename(staged, target)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def save_hf_checkpoint(params: Params, cfg: ModelConfig, directory, tokenizer=None,
                       architecture: str = "LlamaForCausalLM", dtype=None) -> Path:
  """Writes a transformers-loadable checkpoint: config.json + model.safetensors.

  Tokenizer files are added via `tokenizer.save_pretrained` when given. Everything is
  written to a temporary sibling directory that is then renamed onto `directory`
  (replacing an existing one), so readers never see a half-written checkpoint.
  `dtype` casts the saved tensors (default: keep each parameter's dtype).
  """
  directory = Path(directory)
  config = hf_config_dict(cfg, architecture, dtype=str(
      jnp.dtype(dtype) if dtype is not None else params["embed"].dtype), tokenizer=tokenizer)
  _, qkv_bias, _ = SUPPORTED_ARCHITECTURES[architecture]
  shapes = decoder(cfg).param_shapes(cfg)

  def leaf(path_keys):
    try:
      return _lookup(params, path_keys)
    except KeyError:
      raise UserError(f"params have no {'/'.join(path_keys)} but the config needs it") from None

  tensors = []
  for path_keys, name, layer, transpose in expected_tensors(cfg):
    value = leaf(path_keys)
    if tuple(value.shape) != tuple(_lookup(shapes, path_keys).shape):
      raise UserError(f"param {'/'.join(path_keys)} has shape {tuple(value.shape)}, expected "
                      f"{tuple(_lookup(shapes, path_keys).shape)}")
    out_dtype = np.dtype(jnp.dtype(dtype) if dtype is not None else value.dtype)
    shape = _hf_shape(tuple(value.shape[1:] if layer is not None else value.shape), transpose)

    def produce(value=value, layer=layer, transpose=transpose):
      x = np.asarray(value[layer] if layer is not None else value)
      yield x.T[:, None, :] if transpose == "conv" else x.T if transpose else x

    tensors.append((name, shape, out_dtype, produce))
  if qkv_bias and not cfg.qkv_bias:  # Qwen2 always has q/k/v biases: write zeros
    K = cfg.num_kv_heads * cfg.head_dim
    for i in range(cfg.num_layers):
      for proj, n in (("q", cfg.num_heads * cfg.head_dim), ("k", K), ("v", K)):
        dt = np.dtype(jnp.dtype(dtype) if dtype is not None else params["embed"].dtype)
        tensors.append((f"model.layers.{i}.self_attn.{proj}_proj.bias", (n,), dt,
                        lambda n=n, dt=dt: iter([np.zeros((n,), dt)])))

  with atomic_directory(directory) as tmp:
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(tmp / SAFETENSORS_FILE, tensors, {"format": "pt"})
    if tokenizer is not None:
      tokenizer.save_pretrained(str(tmp))
  return directory


@contextlib.contextmanager
def atomic_directory(directory) -> Iterator[Path]:
  """Yields a temporary sibling of `directory` to fill; on success it replaces
  `directory` by a rename, so readers never see a half-written checkpoint."""
  directory = Path(directory)
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
  try:
    os.chmod(tmp, 0o755)
    yield tmp
    replace_dir(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


# ----------------------------------------------------------------------------
# One-call loading.

@functools.partial(jax.jit, static_argnames=("cfg",))
def _forward(params, tokens, cfg):
  return decoder(cfg).forward(params, tokens, cfg)


@dataclasses.dataclass
class PretrainedModel:
  """A loaded HF checkpoint: tokenizer, our config, params and a jitted forward."""

  tokenizer: Any
  config: ModelConfig
  params: Params
  path: Path

  def logits(self, tokens) -> jax.Array:
    """Full causal forward from position 0: int32 [B, T] -> float32 [B, T, V]."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
    return _forward(self.params, tokens, cfg=self.config).astype(jnp.float32)


def read_hf_config(path) -> tuple[dict, Path]:
  """(config.json dict, the file it came from) of a checkpoint directory or .gguf file."""
  path = Path(path)
  if _is_gguf(path):
    return _gguf().hf_config(path), path
  if not path.is_dir():
    raise UserError(f"{path}: not a local checkpoint directory")
  config_path = path / "config.json"
  if not config_path.is_file():
    raise UserError(f"{config_path}: not found")
  try:
    return json.loads(config_path.read_text(encoding="utf-8-sig")), config_path
  except ValueError as e:
    raise UserError(f"{config_path}: invalid JSON ({e})") from None


def load_config_and_params(path, dtype="float32", shardings=None) -> tuple[ModelConfig, Params]:
  """(our config, params) of a local HF checkpoint directory or .gguf file, no tokenizer."""
  hf, config_path = read_hf_config(path)
  cfg = config_from_hf(hf, dtype=dtype, source=str(config_path))
  return cfg, load_hf_params(path, cfg, dtype=dtype, shardings=shardings)


def load_pretrained(path, dtype="float32", shardings=None) -> PretrainedModel:
  """Loads a local HF checkpoint directory (never the network).

  Parameters and compute use `dtype`; `.logits` always returns float32.
  """
  cfg, params = load_config_and_params(path, dtype=dtype, shardings=shardings)
  from fgrpo_jax.data import text_prompts  # light; imports nothing of ours back
  tokenizer = text_prompts.load_tokenizer(str(path))
  return PretrainedModel(tokenizer=tokenizer, config=cfg, params=params, path=Path(path))
