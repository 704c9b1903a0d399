"""GGUF (llama.cpp) checkpoints of Llama-architecture models, read with numpy and `gguf`.

A `.gguf` file holds the weights (often quantised), the model hyper-parameters and the
tokenizer with its chat template. This module turns each into what the Hugging Face
path of `fgrpo_jax/models/hf.py` reads, so everything downstream is shared:

    hf_config(path)          GGUF metadata llama.*      -> a config.json dict
    GGUFTensors(path)        blk.N.attn_q.weight, ...   -> HF-named float32 numpy tensors,
                             behind the small part of `safetensors.safe_open` that
                             `hf.load_hf_params` uses (keys, get_slice, get_tensor)
    write_tokenizer_files    tokenizer.ggml.*           -> tokenizer.json + tokenizer_config.json
    load_tokenizer(path)     the same, loaded with transformers.AutoTokenizer
    convert(path, out)       a standard HF directory (config.json, model.safetensors,
                             tokenizer files), written atomically; transformers loads it

`model.hf_checkpoint=/models/x.gguf` works directly (hf.py dispatches on the suffix);
converting once saves the dequantisation at every start:

    python -m fgrpo_jax.models.gguf --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out /models/smollm2

Quantised tensors (Q4_0, Q4_1, Q8_0, K-quants, ...) are dequantised to float32 by gguf's
numpy dequantiser; F32, F16 and BF16 are read as they are. llama.cpp's converter
interleaves the rows of q_proj / k_proj per head (rotary pairs adjacent, the layout of
its RoPE kernel); HF Llama uses the half-split layout, so those rows are put back
(`unpermute_rows`), or the logits would be wrong.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from fgrpo_jax.errors import UserError

SUFFIX = ".gguf"
ARCHITECTURE = "llama"  # general.architecture this importer reads (Llama, SmolLM, Mistral-style)

# GGUF tensor name (inside "blk.{i}." for layers) -> HF name (inside "model.layers.{i}.").
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# tokenizer.ggml.pre -> the pre-tokenizer of the HF tokenizer it was converted from
# (llama.cpp's own table of split regexes, expressed with `tokenizers` components).
_GPT2 = "gpt2"
_DIGITS_GPT2 = "digits+gpt2"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "default": _GPT2, "gpt-2": _GPT2,
    "smollm": _DIGITS_GPT2, "starcoder": _DIGITS_GPT2, "refact": _DIGITS_GPT2,
    "llama-bpe": LLAMA3_SPLIT, "llama3": LLAMA3_SPLIT,
    "qwen2": QWEN2_SPLIT,
}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values of added tokens


# ----------------------------------------------------------------------------
# Opening a file, reading metadata.


def is_gguf(path) -> bool:
  return str(path).endswith(SUFFIX)


def open_reader(path):
  """A `gguf.GGUFReader` of `path`; a missing, truncated or foreign file is a UserError.

  Parsing the metadata of a real file takes seconds (tens of thousands of token
  strings), and the config, the weights and the tokenizer each need it: the reader of
  an unchanged file (same size and modification time) is reused.
  """
  path = str(path)
  if not os.path.isfile(path):
    raise UserError(f"{path}: file not found")
  stat = os.stat(path)
  return _cached_reader(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, size: int, mtime_ns: int):
  import gguf
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # noqa: BLE001 - gguf raises ValueError, IndexError, ... on bad bytes
    raise UserError(f"{path}: not a readable GGUF file, truncated or corrupt "
                    f"({type(e).__name__}: {e})") from None
  for t in reader.tensors:
    if t.data_offset + t.n_bytes > size:
      raise UserError(f"{path}: truncated: tensor {t.name!r} ends at byte "
                      f"{t.data_offset + t.n_bytes}, the file has {size}")
  arch = _field(reader, "general.architecture", path, None)
  if arch != ARCHITECTURE:
    raise UserError(f"{path}: GGUF architecture {arch!r} is not supported (only "
                    f"{ARCHITECTURE!r}: Llama-architecture models such as Llama 2, SmolLM, "
                    "Mistral)")
  return reader


_REQUIRED = object()


def _field(reader, key: str, path, default=_REQUIRED):
  """The value of metadata `key` (a scalar, a string or a list)."""
  field = reader.get_field(key)
  if field is None:
    if default is _REQUIRED:
      raise UserError(f"{path}: missing GGUF metadata key {key!r}")
    return default
  return field.contents()


def _float32(reader, key, path, default=_REQUIRED) -> float:
  """A float32 metadata value as the decimal it was written from (1e-05, not 9.99e-06)."""
  return float(str(np.float32(_field(reader, key, path, default))))


def _int(reader, key, path, default=_REQUIRED) -> int:
  value = _field(reader, key, path, default)
  if isinstance(value, list):
    raise UserError(f"{path}: {key} differs per layer ({value[:4]}...), which our decoder "
                    "does not support")
  return int(value)


def hf_config(path) -> dict:
  """config.json (LlamaForCausalLM) of a Llama GGUF, from its llama.* metadata keys."""
  from fgrpo_jax.models import hf, llama
  reader = open_reader(path)
  a = ARCHITECTURE
  hidden = _int(reader, f"{a}.embedding_length", path)
  heads = _int(reader, f"{a}.attention.head_count", path)
  head_dim = _int(reader, f"{a}.attention.key_length", path, hidden // heads)
  rope_dim = _int(reader, f"{a}.rope.dimension_count", path, head_dim)
  if rope_dim != head_dim:
    raise UserError(f"{path}: rotary dimension {rope_dim} != head dim {head_dim} (partial "
                    "rotary embeddings are not supported)")
  names = {t.name for t in reader.tensors}
  if "rope_freqs.weight" in names:
    raise UserError(f"{path}: the tensor rope_freqs.weight (Llama 3.1 rope scaling) is not "
                    "supported: convert the original HF checkpoint instead")
  scaling_type = _field(reader, f"{a}.rope.scaling.type", path, "none")
  scaling = None
  if scaling_type == "linear":
    scaling = (("factor", _float32(reader, f"{a}.rope.scaling.factor", path)),
               ("rope_type", "linear"))
  elif scaling_type != "none":
    raise UserError(f"{path}: rope scaling {scaling_type!r} is not supported (none, linear)")
  tokens = _field(reader, "tokenizer.ggml.tokens", path, None)
  embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
  vocab = _int(reader, f"{a}.vocab_size", path,
               len(tokens) if tokens else (int(embed.shape[-1]) if embed is not None else None))
  try:
    cfg = llama.ModelConfig(
        vocab_size=vocab, num_layers=_int(reader, f"{a}.block_count", path), hidden=hidden,
        num_heads=heads, num_kv_heads=_int(reader, f"{a}.attention.head_count_kv", path, heads),
        head_dim=head_dim, mlp_hidden=_int(reader, f"{a}.feed_forward_length", path),
        rope_theta=_float32(reader, f"{a}.rope.freq_base", path, 10000.0),
        rope_scaling=scaling,
        rms_eps=_float32(reader, f"{a}.attention.layer_norm_rms_epsilon", path, 1e-5),
        # llama.cpp writes no output.weight when the head is the embedding.
        tie_embeddings="output.weight" not in names)
  except (ValueError, TypeError) as e:
    raise UserError(f"{path}: {e}") from None
  out = hf.hf_config_dict(cfg, "LlamaForCausalLM", max_position_embeddings=_int(
      reader, f"{a}.context_length", path, 4096))
  for key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("pad_token_id", "padding_token_id")):
    out[key] = _field(reader, f"tokenizer.ggml.{gguf_key}", path, None)
  return out


# ----------------------------------------------------------------------------
# Tensors.


def hf_tensor_name(name: str) -> str:
  """GGUF tensor name -> HF name (unknown names are returned as they are)."""
  if name in _TOP_TENSORS:
    return _TOP_TENSORS[name]
  parts = name.split(".", 2)
  if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
    return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
  return name


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row order. w: [n_head * head_dim, in] -> same shape.

  llama.cpp stores, per head, the rotary pairs (x_i, x_{i + head_dim/2}) as adjacent
  rows (2i, 2i + 1); HF keeps the first and second halves of each head apart.
  """
  rows = w.shape[0]
  return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@functools.lru_cache(maxsize=None)
def _can_dequantise(qtype: int) -> bool:
  """Whether gguf's numpy dequantiser handles `qtype` (tried on one zero block)."""
  import gguf
  qtype = gguf.GGMLQuantizationType(qtype)
  _, type_size = gguf.GGML_QUANT_SIZES[qtype]
  try:
    gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
  except (NotImplementedError, ValueError, TypeError):
    return False
  return qtype not in (gguf.GGMLQuantizationType.I8, gguf.GGMLQuantizationType.I16,
                       gguf.GGMLQuantizationType.I32, gguf.GGMLQuantizationType.I64)


class _Slice:
  """A lazily dequantised tensor with safetensors' slice interface (shape, dtype, [a:b])."""

  def __init__(self, shape, read):
    self._shape, self._read, self._value = shape, read, None

  def get_shape(self):
    return list(self._shape)

  def get_dtype(self):
    return "F32"

  def __getitem__(self, index):
    if self._value is None:
      self._value = self._read()
    return self._value[index]


class GGUFTensors:
  """The tensors of a Llama GGUF under HF names and in HF layout ([out, in]), float32.

  Offers the part of `safetensors.safe_open(framework="numpy")` that hf.load_hf_params
  uses, so GGUF and safetensors checkpoints share one loader.
  """

  def __init__(self, path):
    import gguf
    self.path = str(path)
    reader = open_reader(self.path)
    self._heads = _int(reader, f"{ARCHITECTURE}.attention.head_count", self.path)
    self._kv_heads = _int(reader, f"{ARCHITECTURE}.attention.head_count_kv", self.path,
                          self._heads)
    self._tensors = {}
    for t in reader.tensors:
      if not _can_dequantise(int(t.tensor_type)):
        raise UserError(f"{self.path}: tensor {t.name!r} has quantisation type "
                        f"{t.tensor_type.name}, which gguf {_gguf_version()} cannot dequantise "
                        "(F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K- and IQ-quants "
                        "can be read)")
      self._tensors[hf_tensor_name(t.name)] = t
    self._dequantize = gguf.quants.dequantize

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False

  def keys(self):
    return list(self._tensors)

  def get_slice(self, name) -> _Slice:
    shape = tuple(int(d) for d in reversed(self._tensors[name].shape.tolist()))
    return _Slice(shape, lambda: self.get_tensor(name))

  def get_tensor(self, name) -> np.ndarray:
    t = self._tensors[name]
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    w = np.asarray(self._dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
    if name.endswith("self_attn.q_proj.weight"):
      w = unpermute_rows(w, self._heads)
    elif name.endswith("self_attn.k_proj.weight"):
      w = unpermute_rows(w, self._kv_heads)
    return w


def _gguf_version() -> str:
  from importlib import metadata
  try:
    return metadata.version("gguf")
  except metadata.PackageNotFoundError:
    return "(unknown version)"


# ----------------------------------------------------------------------------
# Tokenizer.


def _special(tokens: list[str], reader, path, key: str):
  index = _field(reader, f"tokenizer.ggml.{key}", path, None)
  return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None


def write_tokenizer_files(path, directory) -> None:
  """Writes tokenizer.json (a byte-level BPE) and tokenizer_config.json (special tokens,
  chat template) of a GGUF's tokenizer.ggml.* metadata into `directory`."""
  from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
  from tokenizers import processors
  path = str(path)
  reader = open_reader(path)
  kind = _field(reader, "tokenizer.ggml.model", path)
  if kind != "gpt2":
    raise UserError(f"{path}: tokenizer model {kind!r} is not supported (only 'gpt2', the "
                    "byte-level BPE of Llama 3, SmolLM, Qwen2)")
  pre = _field(reader, "tokenizer.ggml.pre", path, "default")
  if pre not in PRE_TOKENIZERS:
    raise UserError(f"{path}: tokenizer pre-tokenizer {pre!r} is not supported (known: "
                    f"{', '.join(sorted(PRE_TOKENIZERS))})")
  tokens = _field(reader, "tokenizer.ggml.tokens", path)
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", path)]
  types = _field(reader, "tokenizer.ggml.token_type", path, [1] * len(tokens))
  tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                             fuse_unk=False, byte_fallback=False))
  split = PRE_TOKENIZERS[pre]
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                        use_regex=split in (_GPT2, _DIGITS_GPT2))
  if split == _GPT2:
    tok.pre_tokenizer = byte_level
  elif split == _DIGITS_GPT2:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), byte_level])
  else:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False), byte_level])
    if pre == "qwen2":
      tok.normalizer = normalizers.NFC()  # as in Qwen2's own tokenizer.json
  tok.decoder = decoders.ByteLevel()
  bos = _special(tokens, reader, path, "bos_token_id")
  add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", path, False)) and bos is not None
  if add_bos:
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))])
  else:
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
  # Control tokens (<|im_start|>) must match as a whole, never be split by BPE; they
  # are in the vocabulary already, so their ids stay.
  from tokenizers import AddedToken
  for kind, add in ((_CONTROL, tok.add_special_tokens), (_USER_DEFINED, tok.add_tokens)):
    add([AddedToken(t, special=kind == _CONTROL, normalized=False)
         for t, k in zip(tokens, types) if k == kind])
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tok.save(str(directory / "tokenizer.json"))
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": bos,
      "eos_token": _special(tokens, reader, path, "eos_token_id"),
      "unk_token": _special(tokens, reader, path, "unknown_token_id"),
      "pad_token": _special(tokens, reader, path, "padding_token_id"),
      "add_bos_token": add_bos,
      "clean_up_tokenization_spaces": False,
      "model_max_length": _int(reader, f"{ARCHITECTURE}.context_length", path, 4096),
      "added_tokens_decoder": {
          str(i): {"content": tokens[i], "special": types[i] == _CONTROL, "lstrip": False,
                   "rstrip": False, "normalized": False, "single_word": False}
          for i in range(len(tokens)) if types[i] in (_CONTROL, _USER_DEFINED)},
  }
  template = _field(reader, "tokenizer.chat_template", path, None)
  if template is not None:
    config["chat_template"] = template
  (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")


def load_tokenizer(path):
  """The GGUF's tokenizer as a transformers tokenizer (the files of `convert`, loaded)."""
  from transformers import AutoTokenizer
  with tempfile.TemporaryDirectory(prefix="gguf-tokenizer-") as tmp:
    write_tokenizer_files(path, tmp)
    return AutoTokenizer.from_pretrained(tmp, local_files_only=True)


# ----------------------------------------------------------------------------
# Conversion to a HF directory.


def convert(path, out) -> Path:
  """Writes the GGUF at `path` as a HF checkpoint directory `out` (float32 safetensors).

  Written into a temporary sibling directory renamed onto `out` at the end: an
  interrupted conversion leaves no half-written checkpoint.
  """
  from fgrpo_jax.models import hf
  path = str(path)
  config = hf_config(path)
  cfg = hf.config_from_hf(config, source=path)
  with GGUFTensors(path) as tensors:
    expected = hf.check_tensors(cfg, {name: path for name in tensors.keys()}, path,
                                {path: tensors}, Path(path))
    entries = []
    for _, name, _, _ in expected:
      shape = tuple(tensors.get_slice(name).get_shape())
      entries.append((name, shape, np.dtype(np.float32),
                      lambda name=name: iter([tensors.get_tensor(name)])))
    with hf.atomic_directory(out) as tmp:
      (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
      hf.write_safetensors(tmp / hf.SAFETENSORS_FILE, entries,
                           {"format": "pt", "source": os.path.basename(path)})
      write_tokenizer_files(path, tmp)
  return Path(out)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m fgrpo_jax.models.gguf",
      description="Convert a Llama-architecture GGUF file to a Hugging Face checkpoint "
                  "directory (config.json, model.safetensors, tokenizer files).")
  parser.add_argument("--gguf", required=True, help="the .gguf file")
  parser.add_argument("--out", required=True, help="the HF directory to write (replaced)")
  args = parser.parse_args(argv)
  try:
    out = convert(args.gguf, args.out)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(out)


if __name__ == "__main__":
  main()
