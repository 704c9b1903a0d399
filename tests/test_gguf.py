"""GGUF import (fgrpo_jax/models/gguf.py): a tiny random Llama written with the `gguf`
writer exactly as llama.cpp's converter lays it out (q/k rows interleaved per head,
quantised and float tensors, the tokenizer in metadata) must give the same logits and
tokens as the same weights saved as a safetensors HF directory; bad files end in one
UserError line naming the file and what is wrong."""

import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest

from fgrpo_jax.data import tiny_tokenizer
from fgrpo_jax.errors import UserError
from fgrpo_jax.data import text_prompts
from fgrpo_jax.models import gguf as gguf_lib
from fgrpo_jax.models import hf, llama, load_pretrained

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Q = gguf.GGMLQuantizationType
# HF tensor (inside model.layers.N.) -> (GGUF name inside blk.N., storage type).
LAYER = {
    "input_layernorm.weight": ("attn_norm.weight", Q.F32),
    "self_attn.q_proj.weight": ("attn_q.weight", Q.Q4_1),
    "self_attn.k_proj.weight": ("attn_k.weight", Q.Q8_0),
    "self_attn.v_proj.weight": ("attn_v.weight", Q.F16),
    "self_attn.o_proj.weight": ("attn_output.weight", Q.Q4_0),
    "post_attention_layernorm.weight": ("ffn_norm.weight", Q.F32),
    "mlp.gate_proj.weight": ("ffn_gate.weight", Q.Q4_1),
    "mlp.up_proj.weight": ("ffn_up.weight", Q.BF16),
    "mlp.down_proj.weight": ("ffn_down.weight", Q.F32),
}
TOP = {"model.embed_tokens.weight": ("token_embd.weight", Q.Q8_0),
       "model.norm.weight": ("output_norm.weight", Q.F32),
       "lm_head.weight": ("output.weight", Q.Q8_0)}


def _cfg(vocab, tie):
  return llama.ModelConfig(vocab_size=vocab, num_layers=2, hidden=64, num_heads=4,
                           num_kv_heads=2, head_dim=16, mlp_hidden=96, rope_theta=50000.0,
                           rms_eps=1e-5, tie_embeddings=tie)


def _permute(w, n_head):
  """llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute), restated."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _stored(w, qtype):
  """(bytes or floats to write, what a reader dequantises them to).

  Q8_1 (llama.cpp's activation format) has neither a numpy quantiser nor a dequantiser:
  zero blocks of the right size are written and nothing can be read back."""
  if qtype == Q.F32:
    return w.astype(np.float32), w.astype(np.float32)
  if qtype == Q.F16:
    return w.astype(np.float16), w.astype(np.float16).astype(np.float32)
  if qtype == Q.Q8_1:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return np.zeros((*w.shape[:-1], w.shape[-1] // block * size), np.uint8), None
  data = gguf.quants.quantize(w.astype(np.float32), qtype)
  return data, gguf.quants.dequantize(data, qtype).astype(np.float32)


def _hf_weights(cfg, seed=0):
  """Random HF-named weights ([out, in]) of `cfg`."""
  rng = np.random.default_rng(seed)
  shapes = llama.param_shapes(cfg)
  out = {}
  for path_keys, name, layer, transpose in hf.expected_tensors(cfg):
    leaf = shapes[path_keys[0]] if layer is None else shapes["layers"][path_keys[1]]
    shape = leaf.shape[1:] if layer is not None else leaf.shape
    shape = shape[::-1] if transpose else shape
    base = 1.0 if "norm" in name else 0.0
    out[name] = (base + rng.normal(0.0, 0.3, shape)).astype(np.float32)
  return out


def _tokenizer_metadata(writer, tok_dir):
  """The tiny chat tokenizer's vocabulary, merges and template as llama.cpp writes them."""
  spec = json.load(open(os.path.join(tok_dir, "tokenizer.json")))
  vocab = spec["model"]["vocab"]
  tokens = sorted(vocab, key=vocab.get)
  special = {t["content"] for t in spec["added_tokens"] if t["special"]}
  merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("qwen2")
  writer.add_token_list(tokens)
  writer.add_token_types([3 if t in special else 1 for t in tokens])
  writer.add_token_merges(merges)
  writer.add_eos_token_id(vocab["<|im_end|>"])
  writer.add_pad_token_id(vocab["<|endoftext|>"])
  writer.add_add_bos_token(False)
  writer.add_chat_template(tiny_tokenizer.TEMPLATE)
  return len(tokens)


def write_gguf(path, tok_dir, weights, cfg, *, arch="llama", types=None):
  """Writes `weights` (HF names) as llama.cpp would; returns the dequantised weights."""
  w = gguf.GGUFWriter(str(path), arch)
  w.add_context_length(2048)
  w.add_embedding_length(cfg.hidden)
  w.add_block_count(cfg.num_layers)
  w.add_feed_forward_length(cfg.mlp_hidden)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.rms_eps)
  w.add_rope_dimension_count(cfg.head_dim)
  _tokenizer_metadata(w, tok_dir)
  read_back = {}
  for name, value in weights.items():
    if name.startswith("model.layers."):
      _, _, i, rest = name.split(".", 3)
      gname, qtype = LAYER[rest]
      gname = f"blk.{i}.{gname}"
    else:
      gname, qtype = TOP[name]
    qtype = (types or {}).get(gname, qtype)
    stored = value
    if name.endswith("q_proj.weight"):
      stored = _permute(value, cfg.num_heads)
    elif name.endswith("k_proj.weight"):
      stored = _permute(value, cfg.num_kv_heads)
    data, _ = _stored(stored, qtype)
    # Blocks run along a row, so quantising permuted rows = permuting quantised rows.
    read_back[name] = _stored(value, qtype)[1]
    w.add_tensor(gname, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return read_back


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """{tied: (gguf path, HF directory of the same dequantised weights)}."""
  root = tmp_path_factory.mktemp("gguf")
  tok_dir = tiny_tokenizer.make_tiny_tokenizer(str(root / "tok"))
  vocab = len(json.load(open(os.path.join(tok_dir, "tokenizer.json")))["model"]["vocab"])
  out = {}
  for tie in (False, True):
    cfg = _cfg(vocab, tie)
    path = root / f"tiny_tie{int(tie)}.gguf"
    read_back = write_gguf(path, tok_dir, _hf_weights(cfg, seed=int(tie)), cfg)
    params = {"layers": {}}
    for path_keys, name, layer, transpose in hf.expected_tensors(cfg):
      value = read_back[name].T if transpose else read_back[name]
      if layer is None:
        params[path_keys[0]] = value
      else:
        params["layers"].setdefault(path_keys[1], [None] * cfg.num_layers)[layer] = value
    params["layers"] = {k: np.stack(v) for k, v in params["layers"].items()}
    hf_dir = root / f"hf_tie{int(tie)}"
    hf.save_hf_checkpoint(params, cfg, hf_dir)
    tiny_tokenizer.make_tiny_tokenizer(str(hf_dir))
    out[tie] = (path, hf_dir)
  return out


TOKENS = np.array([[5, 17, 42, 99, 3, 250, 7, 64, 11, 300, 1, 2]], np.int32)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_logits_match_the_same_weights_as_safetensors(files, tie):
  path, hf_dir = files[tie]
  ours, ref = load_pretrained(path), load_pretrained(hf_dir)
  assert ours.config == ref.config and ours.config.tie_embeddings == tie
  assert ours.config.rope_theta == 50000.0 and ours.config.rms_eps == 1e-5
  np.testing.assert_allclose(np.asarray(ours.logits(TOKENS)), np.asarray(ref.logits(TOKENS)),
                             rtol=1e-5, atol=1e-5)


def test_rows_are_unpermuted():
  w = np.arange(4 * 16 * 3, dtype=np.float32).reshape(64, 3)
  np.testing.assert_array_equal(gguf_lib.unpermute_rows(_permute(w, 4), 4), w)
  assert not np.array_equal(_permute(w, 4), w)


def test_tokenizer_and_chat_template_round_trip(files):
  path, hf_dir = files[False]
  ours, ref = text_prompts.load_tokenizer(path), text_prompts.load_tokenizer(hf_dir)
  texts = ["the user watched a film", "History: <|im_start|>user\nA B C</slate><rank> B A",
           "  spaces,\ttabs and 12345 digits!", "Amélie — naïve café"]
  for text in texts:
    assert ours(text)["input_ids"] == ref(text)["input_ids"], text
    assert ours.decode(ours(text)["input_ids"]) == text
  messages = [{"role": "system", "content": "Rank."}, {"role": "user", "content": "- A: jazz"}]
  kw = dict(add_generation_prompt=True, tokenize=False)
  assert ours.apply_chat_template(messages, **kw) == ref.apply_chat_template(messages, **kw)
  assert ours.eos_token == "<|im_end|>" and ours.pad_token == "<|endoftext|>"
  assert len(ours("<|im_start|>")["input_ids"]) == 1


def test_converter_writes_a_hf_directory_atomically(files, tmp_path):
  path, hf_dir = files[True]
  out = tmp_path / "models" / "tiny"
  proc = subprocess.run([sys.executable, "-m", "fgrpo_jax.models.gguf", f"--gguf={path}",
                         f"--out={out}"], cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert sorted(os.listdir(tmp_path / "models")) == ["tiny"]  # no temporary left behind
  names = set(os.listdir(out))
  assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
  config = json.load(open(out / "config.json"))
  assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]
  assert "chat_template" in json.load(open(out / "tokenizer_config.json"))
  converted, ref = load_pretrained(out), load_pretrained(hf_dir)
  np.testing.assert_allclose(np.asarray(converted.logits(TOKENS)),
                             np.asarray(ref.logits(TOKENS)), rtol=1e-5, atol=1e-5)
  gguf_lib.convert(path, out)  # again over an existing directory: replaced
  assert sorted(os.listdir(tmp_path / "models")) == ["tiny"]


# ----------------------------------------------------------------------------
# Bad input: one line naming the file and what is wrong.


def _one_line_error(path, match):
  with pytest.raises(UserError) as e:
    load_pretrained(path)
  msg = str(e.value)
  assert str(path) in msg and match in msg and "\n" not in msg, msg
  return msg


def test_other_architecture(files, tmp_path):
  _, hf_dir = files[False]
  cfg = _cfg(len(json.load(open(hf_dir / "tokenizer.json"))["model"]["vocab"]), False)
  path = tmp_path / "gpt2.gguf"
  write_gguf(path, str(hf_dir), _hf_weights(cfg), cfg, arch="gpt2")
  _one_line_error(path, "GGUF architecture 'gpt2' is not supported")


def test_truncated_file(files, tmp_path):
  path, _ = files[False]
  data = open(path, "rb").read()
  for keep in (len(data) - 1000, 200):  # inside the tensor data, inside the metadata
    cut = tmp_path / f"cut{keep}.gguf"
    cut.write_bytes(data[:keep])
    _one_line_error(cut, "truncated")


def test_quantisation_type_we_cannot_dequantise(files, tmp_path):
  _, hf_dir = files[False]
  cfg = _cfg(len(json.load(open(hf_dir / "tokenizer.json"))["model"]["vocab"]), False)
  path = tmp_path / "q8_1.gguf"
  write_gguf(path, str(hf_dir), _hf_weights(cfg), cfg, types={"blk.1.attn_v.weight": Q.Q8_1})
  msg = _one_line_error(path, "tensor 'blk.1.attn_v.weight' has quantisation type Q8_1")
  assert "cannot dequantise" in msg


def test_converter_reports_bad_input_in_one_line(tmp_path):
  path = tmp_path / "empty.gguf"
  path.write_bytes(b"GGUF")
  proc = subprocess.run([sys.executable, "-m", "fgrpo_jax.models.gguf", f"--gguf={path}",
                         f"--out={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  lines = [l for l in proc.stderr.splitlines() if l.strip() and "PyTorch was not found" not in l]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr
  assert lines[0].startswith(f"error: {path}: not a readable GGUF file"), lines
  assert not (tmp_path / "out").exists()


def test_gguf_file_as_model_hf_checkpoint_trains_lora(files, tmp_path):
  """config.model.hf_checkpoint=<file>.gguf: chat prompts from its tokenizer, LoRA on
  its dequantised weights, eval.json at the end."""
  from configs import recsys_llm
  from fgrpo_jax import train
  path, _ = files[False]
  c = recsys_llm.get_config("tiny")
  c.model.hf_checkpoint = str(path)
  c.data.cache_dir = str(tmp_path / "cache")
  logs = []
  train.run(c, str(tmp_path / "run"), log=logs.append)
  assert json.load(open(tmp_path / "run" / "eval.json"))["steps"] == 3
  assert any(l.startswith(f"model: {path}") for l in logs), logs
  assert "'prompt': 'chat'" in next(l for l in logs if l.startswith("task "))
