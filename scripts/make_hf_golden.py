"""Regenerates the Hugging Face parity fixtures under tests/golden/hf/.

Needs PyTorch, which is NOT a project requirement. Install the CPU build into the venv
first (this exact version installs from local disk):

    pip install torch==2.13.0
    python scripts/make_hf_golden.py

For each tiny random model it writes tests/golden/hf/<name>/ with

    config.json, generation_config.json, model.safetensors   (model.save_pretrained)
    tokenizer.json, tokenizer_config.json                   (a word-level tokenizer)
    golden.npz:
      input_ids    int32 [2, 12]   fixed prompt tokens
      logits       f32 [2, 12, V]  full forward (no cache) from position 0
      new_tokens   int32 [2, 6]    greedy continuation, decoded with use_cache=True
      step_logits  f32 [2, 6, V]   step_logits[:, t] = logits that chose new_tokens[:, t]
                                   (t = 0: last prompt position; then one cached step each)
      inv_freq     f32 [D/2]       transformers' rotary inverse frequencies
                                   ([R/2] over the rotated dims R when rotary is partial)
      text, text_ids               a sentence and its token ids from the saved tokenizer
                                   (byte-level BPE, so decode(text_ids) == text)

Qwen3.5 models (model_type "qwen3_5_text", hybrid Gated DeltaNet + gated attention) also
store, for a left-padded batch (the first row padded by `QWEN35_PAD` tokens):

      pad_input_ids   int32 [2, 20]  pad_mask int32 [2, 20] (0 = padding, on the left)
      pad_logits      f32 [2, 20, V] forward with attention_mask and position_ids counting
                                     real tokens only (padding rows are garbage, ignored)
      pad_new_tokens  int32 [2, 6]   greedy continuation with the cache (linear layers:
      pad_step_logits f32 [2, 6, V]    conv window and recurrent state; attention: KV)

Weights are redrawn with O(1) scales (not the 0.02 init) so attention is far from
uniform, and norm weights / biases are random so a swapped tensor cannot go unnoticed.
Models stored as bfloat16 are rounded to bf16 first; their golden logits come from
the float32 model holding exactly those rounded weights.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from tokenizers import (Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        trainers)
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "golden" / "hf"
PROMPT_LEN, NEW_TOKENS = 12, 6

SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
             max_position_embeddings=256)

# name -> (model_type, config overrides, stored dtype)
MODELS = {
    # head_dim = hidden/heads = 8, tied embeddings, default rope.
    "llama_tied": ("llama", dict(tie_word_embeddings=True), torch.float32),
    # Llama 3.1-style rope scaling. original_max_position_embeddings is small so that
    # the 8 frequencies of head_dim 16 cover all three llama3 bands (kept, smoothed,
    # divided by factor) within a 12-18 token sequence.
    "llama3_rope": ("llama", dict(
        hidden_size=64, intermediate_size=64, max_position_embeddings=1024,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=512)), torch.bfloat16),
    # q/k/v biases; linear rope scaling and a Qwen-like theta.
    "qwen2": ("qwen2", dict(rope_parameters=dict(rope_type="linear", factor=2.0,
                                                 rope_theta=1000000.0)), torch.float32),
    # q/k RMSNorm; explicit head_dim 16 != hidden/heads (H*D = 64 > hidden = 32).
    "qwen3": ("qwen3", dict(head_dim=16, rope_parameters=dict(rope_type="default",
                                                              rope_theta=1000000.0)),
              torch.bfloat16),
    # Qwen3.5 hybrid: three Gated DeltaNet layers then one gated full-attention layer (the
    # default pattern); GQA in both kinds (4 query / 2 kv heads; 4 value / 2 key heads of
    # the DeltaNet); the default partial rotary factor 0.25 (4 of 16 dims rotate); untied.
    "qwen3_5": ("qwen3_5_text", dict(
        num_hidden_layers=4, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"]), torch.bfloat16),
    # An irregular pattern that starts with attention, one kv head, key heads wider than
    # value heads, rotary half of the head, tied embeddings, bfloat16 storage.
    "qwen3_5_tied": ("qwen3_5_text", dict(
        num_hidden_layers=3, num_key_value_heads=1, head_dim=8, linear_num_key_heads=1,
        linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=8,
        linear_conv_kernel_dim=3, tie_word_embeddings=True,
        layer_types=["full_attention", "linear_attention", "linear_attention"],
        rope_parameters=dict(rope_type="default", rope_theta=100000.0,
                             partial_rotary_factor=0.5)), torch.bfloat16),
}
QWEN35_LEN, QWEN35_PAD = 20, 5

# transformers/models/qwen2/tokenization_qwen2.py PRETOKENIZE_REGEX (GPT-4 style split).
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                           r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

SENTENCES = [
    "the user watched a film about space and liked it",
    "recommend five items for the user in order",
    "a slate of movies ranked by relevance to the user",
    "she bought running shoes, then a water bottle",
    "he listens to jazz and classical music at night",
]


def make_tokenizer() -> PreTrainedTokenizerFast:
  """A 128-token byte-level BPE with exactly Qwen2Tokenizer's pipeline.

  transformers 5 ignores tokenizer_config's class for model_type "qwen2" and rebuilds
  a Qwen2Tokenizer from tokenizer.json's vocab and merges; with the same normalizer,
  pre-tokenizer and decoder here, every model's tokenizer encodes identically.
  """
  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=128, special_tokens=["<unk>", "<pad>", "<s>", "</s>"],
                                show_progress=False)
  tok.train_from_iterator(SENTENCES, trainer=trainer)
  return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                 bos_token="<s>", eos_token="</s>")


@torch.no_grad()
def randomize(model, gen: torch.Generator) -> None:
  for name, p in model.named_parameters():  # tied weights are listed once
    if name.endswith("norm.weight"):
      p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    elif name.endswith(".bias"):
      p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    elif name.endswith("A_log"):  # decay rates exp(A_log) in [0.05, 0.5]: states keep memory
      p.copy_(torch.empty(p.shape).uniform_(0.05, 0.5, generator=gen).log())
    elif name.endswith("dt_bias"):
      p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    elif "conv1d" in name:  # depthwise [C, 1, K]
      p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    elif "embed_tokens" in name:  # also the lm_head when tied: keep logits O(1)
      p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    else:  # nn.Linear [out, in]
      scale = 2.0 if "q_proj" in name else 1.0
      p.copy_(torch.randn(p.shape, generator=gen) * scale / math.sqrt(p.shape[1]))


@torch.no_grad()
def make(name: str, model_type: str, overrides: dict, dtype: torch.dtype, tokenizer) -> None:
  torch.manual_seed(0)
  config = AutoConfig.for_model(model_type, **{**SMALL, **overrides},
                                attn_implementation="eager")
  config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
  config.pad_token_id = tokenizer.pad_token_id
  model = AutoModelForCausalLM.from_config(config).eval()
  randomize(model, torch.Generator().manual_seed(sum(map(ord, name))))
  if dtype != torch.float32:
    for p in model.parameters():
      p.copy_(p.to(dtype).to(torch.float32))

  rng = np.random.default_rng(0)
  input_ids = torch.from_numpy(rng.integers(0, config.vocab_size, (2, PROMPT_LEN)))
  logits = model(input_ids=input_ids, use_cache=False).logits

  out = model(input_ids=input_ids, use_cache=True)
  past, step = out.past_key_values, out.logits[:, -1]
  new_tokens, step_logits = [], []
  for t in range(NEW_TOKENS):
    step_logits.append(step)
    new_tokens.append(step.argmax(-1))
    if t + 1 < NEW_TOKENS:
      out = model(input_ids=new_tokens[-1][:, None], past_key_values=past, use_cache=True)
      past, step = out.past_key_values, out.logits[:, -1]
  new_tokens, step_logits = torch.stack(new_tokens, 1), torch.stack(step_logits, 1)

  # Sanity: the cached steps equal a full forward over prompt + continuation.
  full = model(input_ids=torch.cat([input_ids, new_tokens], 1), use_cache=False).logits
  drift = (full[:, PROMPT_LEN - 1:PROMPT_LEN - 1 + NEW_TOKENS] - step_logits).abs().max()
  assert drift < 1e-4, (name, float(drift))

  inv_freq = model.model.rotary_emb.inv_freq.float().numpy().copy()  # before any cast
  extra = padded_golden(model, config, rng) if model_type == "qwen3_5_text" else {}
  d = OUT / name
  shutil.rmtree(d, ignore_errors=True)
  model.to(dtype).save_pretrained(d)
  tokenizer.save_pretrained(d)
  text = "recommend the user a slate of ten movies, then rank it"  # unseen words split
  np.savez_compressed(
      d / "golden.npz",
      input_ids=input_ids.numpy().astype(np.int32),
      logits=logits.float().numpy(),
      new_tokens=new_tokens.numpy().astype(np.int32),
      step_logits=step_logits.float().numpy(),
      inv_freq=inv_freq,
      text=np.array(text),
      text_ids=np.array(tokenizer(text).input_ids, np.int32), **extra)
  size = sum(f.stat().st_size for f in d.iterdir())
  print(f"{name}: {dtype} {size / 1024:.0f} KB, |logits| max {logits.abs().max():.2f}, "
        f"cached-vs-full drift {float(drift):.2e}, new tokens {new_tokens.tolist()}")


@torch.no_grad()
def padded_golden(model, config, rng) -> dict:
  """Logits and a cached greedy continuation of a left-padded batch (Qwen3.5 fixtures).

  Positions count real tokens only, as ours do; the DeltaNet layers zero the padded
  inputs (transformers' recurrent mask), the attention layers mask the padded keys.
  """
  ids = torch.from_numpy(rng.integers(4, config.vocab_size, (2, QWEN35_LEN)))
  mask = torch.ones_like(ids)
  mask[0, :QWEN35_PAD] = 0
  ids[0, :QWEN35_PAD] = 1  # the tokenizer's pad id
  pos = (mask.cumsum(-1) - 1).clamp(min=0)
  logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
  out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
  past, step, last = out.past_key_values, out.logits[:, -1], pos[:, -1:]
  new_tokens, step_logits = [], []
  for t in range(NEW_TOKENS):
    step_logits.append(step)
    new_tokens.append(step.argmax(-1))
    if t + 1 < NEW_TOKENS:
      mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
      last = last + 1
      out = model(input_ids=new_tokens[-1][:, None], attention_mask=mask, position_ids=last,
                  past_key_values=past, use_cache=True)
      past, step = out.past_key_values, out.logits[:, -1]
  new_tokens, step_logits = torch.stack(new_tokens, 1), torch.stack(step_logits, 1)
  # Sanity: each cached step equals the full padded forward over prompt + continuation.
  full_ids = torch.cat([ids, new_tokens], 1)
  full_mask = torch.cat([mask[:, :QWEN35_LEN], torch.ones_like(new_tokens)], 1)
  full = model(input_ids=full_ids, attention_mask=full_mask,
               position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0), use_cache=False).logits
  drift = (full[:, QWEN35_LEN - 1:QWEN35_LEN - 1 + NEW_TOKENS] - step_logits).abs().max()
  assert drift < 1e-4, float(drift)
  return dict(pad_input_ids=ids.numpy().astype(np.int32),
              pad_mask=mask[:, :QWEN35_LEN].numpy().astype(np.int32),
              pad_logits=logits.float().numpy(),
              pad_new_tokens=new_tokens.numpy().astype(np.int32),
              pad_step_logits=step_logits.float().numpy())


def main() -> int:
  import transformers
  print(f"torch {torch.__version__}, transformers {transformers.__version__}")
  tokenizer = make_tokenizer()
  only = set(sys.argv[1:])  # optional: names to regenerate (default all)
  for name, (model_type, overrides, dtype) in MODELS.items():
    if not only or name in only:
      make(name, model_type, overrides, dtype, tokenizer)
  print(json.dumps(sorted(p.name for p in OUT.iterdir())))
  return 0


if __name__ == "__main__":
  sys.exit(main())
