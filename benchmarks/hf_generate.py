"""Our rollout vs Hugging Face transformers `generate` (PyTorch, CPU), one run, one machine.

Both sides run the same tiny Llama: our random float32 weights (benchmarks/common.py)
are copied into a `transformers.LlamaForCausalLM`, and the script checks that the
two compute the same logits on the prompts before timing anything. Same prompts,
G samples per prompt (HF: num_return_sequences=G), the same number of new tokens
(our layout length T: k slate choices, 2 tags, m rank choices, 1 tag):

    ours  rollout.sample: one prefill per prompt shared by its G samples, T-1 decode
          steps of the B*G sequences, constrained choices over the pool (jitted).
    HF    model.generate(do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
          min_new_tokens=max_new_tokens=T, num_return_sequences=G): the prompt is
          repeated G times and prefilled B*G times, unconstrained sampling over the
          vocabulary, default dynamic KV cache, eager PyTorch; timed with torch's
          default thread count and with 1 thread, and the faster one is compared
          (on an oversubscribed machine 1 thread can win); OMP_WAIT_POLICY=PASSIVE
          unless set otherwise (PyTorch's busy-waiting OpenMP threads are several
          times slower on a shared machine).

Reports generated tokens per second of each (B*G*T / median wall time of one call,
after warm-up; the two are timed in alternation so that both see the same share of
a machine shared with other jobs) and the ratio ours / HF.

    pip install torch==2.13.0    # CPU build; only for this script, not a requirement
    python benchmarks/hf_generate.py
    python benchmarks/hf_generate.py --json
    python benchmarks/hf_generate.py --hf-checkpoint ~/.cache/fgrpo_jax/assets/smollm2-hf
        # SmolLM2-135M-Instruct on both sides (each loads the same files), chat prompts of
        # MovieLens-100K test users; also times each side's prefill alone

Without an importable torch it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys

# PyTorch's OpenMP threads otherwise busy-wait after each op, which on a machine
# shared with other jobs (or with XLA's threads, in this same process) slows HF
# down several times; passive waiting is the kinder setting for HF. Must be set
# before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py)
from common import llama, rollout_lib  # noqa: E402
from fgrpo_jax.data import arrays as arrays_lib  # noqa: E402


def hf_model(params, cfg: llama.ModelConfig, max_positions: int):
  """A LlamaForCausalLM holding our weights (torch Linear stores [out, in])."""
  import torch
  import transformers
  hf_cfg = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.mlp_hidden,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
      max_position_embeddings=max_positions, rms_norm_eps=cfg.rms_eps,
      rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
      tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
      bos_token_id=None, eos_token_id=None, pad_token_id=0, dtype=torch.float32)
  model = transformers.LlamaForCausalLM(hf_cfg).to(torch.float32).eval()
  t = lambda x: torch.from_numpy(np.array(x, np.float32))
  lp = params["layers"]
  sd = {"model.embed_tokens.weight": t(params["embed"]),
        "model.norm.weight": t(params["final_norm"]),
        "lm_head.weight": t(params["lm_head"]).T.contiguous()}
  for i in range(cfg.num_layers):
    pre = f"model.layers.{i}."
    sd[pre + "input_layernorm.weight"] = t(lp["attn_norm"][i])
    sd[pre + "post_attention_layernorm.weight"] = t(lp["mlp_norm"][i])
    for ours, theirs in (("q_proj", "self_attn.q_proj"), ("k_proj", "self_attn.k_proj"),
                         ("v_proj", "self_attn.v_proj"), ("o_proj", "self_attn.o_proj"),
                         ("gate_proj", "mlp.gate_proj"), ("up_proj", "mlp.up_proj"),
                         ("down_proj", "mlp.down_proj")):
      sd[pre + theirs + ".weight"] = t(lp[ours][i]).T.contiguous()
  missing, unexpected = model.load_state_dict(sd, strict=False)
  missing = [k for k in missing if "rotary" not in k]
  if missing or unexpected:
    raise RuntimeError(f"weight copy mismatch: missing {missing}, unexpected {unexpected}")
  return model


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_workload_flags(p, repeats=5)
  common.add_checkpoint_flags(p)
  a = p.parse_args(argv)
  common.check_workload(p, a)
  if a.arch != "llama":
    p.error("--arch: hf_generate.py compares the Llama model only (LlamaForCausalLM)")
  if a.hf_checkpoint and not os.path.isdir(os.path.expanduser(a.hf_checkpoint)):
    p.error("--hf-checkpoint: give the converted HF directory (transformers loads it; "
            "`make real-assets` writes one), not a .gguf file")
  try:
    import torch
    import transformers
  except Exception as e:  # noqa: BLE001 - ImportError or a broken install
    print(f"hf_generate.py: PyTorch / transformers not importable ({type(e).__name__}: {e}); "
          "skipping the Hugging Face comparison. `pip install torch==2.13.0` (CPU build) "
          "to run it.")
    return 0

  m = common.meta(extra_versions=("torch", "transformers"))
  if a.hf_checkpoint:  # the real model on both sides, loaded by each from the same files
    cfg, params, lay, np_batch = common.checkpoint_workload(a)
    np_batch = arrays_lib.model_inputs(np_batch)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.expanduser(a.hf_checkpoint), dtype=torch.float32, local_files_only=True).eval()
    tolerance = 2e-3  # a 30-layer model: float32 sums in a different order
  else:
    cfg = common.model_config(a)
    lay = common.layout(a.slate, a.rank)
    params = llama.init_params(cfg, jax.random.key(a.seed))
    np_batch = arrays_lib.model_inputs(common.make_batch(a.prompts, a.prompt_len, a.pool,
                                                         a.vocab, a.seed))
    model = hf_model(params, cfg, a.prompt_len + lay.length)
    tolerance = 1e-3
  B, G, P, T = a.prompts, a.group, a.prompt_len, lay.length
  batch = arrays_lib.device_batch(np_batch)

  # Same model: logits of the prompts' last position (left padding: positions count the
  # real tokens only, as generate() does).
  ours_first, _ = llama.prefill(params, batch["prompt"], cfg, batch["prompt_mask"])
  input_ids = torch.from_numpy(np_batch["prompt"].astype(np.int64))
  attention_mask = torch.from_numpy(np_batch["prompt_mask"].astype(np.int64))
  position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
  with torch.inference_mode():
    hf_first = model(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids).logits[:, -1]
  logit_diff = float(np.abs(np.asarray(ours_first) - hf_first.numpy()).max())
  if logit_diff > tolerance:
    raise RuntimeError(f"our model and the HF copy disagree: max |logit diff| {logit_diff}")

  # Ours and HF, timed in alternation (fair on a machine shared with other jobs).
  key = jax.random.key(a.seed + 1)
  gen = transformers.GenerationConfig(
      do_sample=True, top_k=0, top_p=1.0, temperature=1.0, num_return_sequences=G,
      max_new_tokens=T, min_new_tokens=T, pad_token_id=0, eos_token_id=None,
      bos_token_id=None)
  torch.manual_seed(a.seed)

  def ours_call():
    return rollout_lib.sample(params, batch, key, cfg=cfg, layout=lay, group_size=G)

  # The prefill alone on each side (ours: B prompts once; HF: the B*G repeated prompts
  # generate() prefills), for the prefill / decode split of a call.
  ours_prefill_call = common.prefill_call(params, batch, cfg)
  repeated = {"input_ids": input_ids.repeat_interleave(G, 0),
              "attention_mask": attention_mask.repeat_interleave(G, 0)}

  def hf_prefill_call(threads):
    def call():
      torch.set_num_threads(threads)
      with torch.inference_mode():
        return model(**repeated, use_cache=True).logits[:, -1]
    return call

  default_threads = torch.get_num_threads()
  thread_options = [default_threads] + ([1] if default_threads > 1 else [])

  def hf_call(threads):
    def call():
      torch.set_num_threads(threads)
      with torch.inference_mode():
        return model.generate(input_ids=input_ids, attention_mask=attention_mask,
                              generation_config=gen)
    return call

  fns = {"ours": ours_call, **{f"hf{n}": hf_call(n) for n in thread_options}}
  if a.hf_checkpoint:
    fns.update(ours_prefill=ours_prefill_call,
               **{f"hf_prefill{n}": hf_prefill_call(n) for n in thread_options})
  ts = common.time_interleaved(fns, a.repeats)
  torch.set_num_threads(default_threads)
  ours = ts["ours"]
  if ours.result.tokens.shape != (B, G, T):
    raise RuntimeError(f"rollout.sample returned {ours.result.tokens.shape}")
  for n in thread_options:
    if tuple(ts[f"hf{n}"].result.shape) != (B * G, P + T):
      raise RuntimeError(f"HF generate returned {tuple(ts[f'hf{n}'].result.shape)}, "
                         f"expected {(B * G, P + T)}")
  # HF gets the benefit of the doubt: its faster thread setting is the one compared.
  best_threads = min(thread_options, key=lambda n: ts[f"hf{n}"].median_s)
  hf = ts[f"hf{best_threads}"]
  hf_s, hf_first_s = hf.median_s, hf.compile_s

  tokens = B * G * T
  res = {
      "benchmark": "hf_generate",
      "ours_generated_tokens_per_s": tokens / ours.median_s,
      "hf_generated_tokens_per_s": tokens / hf_s,
      "ratio": hf_s / ours.median_s, "ratio_best": hf.min_s / ours.min_s,
      "ours_seconds": ours.median_s, "hf_seconds": hf_s,
      "ours_compile_s": ours.compile_s, "hf_first_call_s": hf_first_s,
      "ours_prompts_per_s": B / ours.median_s, "hf_prompts_per_s": B / hf_s,
      "hf_seconds_by_threads": {str(n): ts[f"hf{n}"].median_s for n in thread_options},
      "torch_threads": best_threads,
      "layout_length": T, "max_logit_diff": logit_diff,
      "device": m["device"], "versions": m["versions"], "meta": m,
      "workload": common.workload_dict(a), "repeats": a.repeats,
      "num_params": llama.count_params(params),
  }
  if a.hf_checkpoint:
    pre_ours, pre_hf = ts["ours_prefill"].median_s, ts[f"hf_prefill{best_threads}"].median_s
    res["split"] = {"ours_prefill_s": pre_ours, "ours_decode_s": ours.median_s - pre_ours,
                    "hf_prefill_s": pre_hf, "hf_decode_s": hf_s - pre_hf,
                    "prefill_ratio": pre_hf / pre_ours,
                    "decode_ratio": (hf_s - pre_hf) / (ours.median_s - pre_ours)}
  res.update(common.memory_stats())
  if a.json:
    common.print_json(res)
    return 0
  print(common.header("fgrpo_jax rollout vs Hugging Face generate", m, a))
  print(f"{res['num_params']:,} parameters, the same weights on both sides (max |logit "
        f"difference| on the prompts {logit_diff:.1e}); {B}x{G} sequences x {T} new tokens")
  rows = [["ours: rollout.sample (JAX, jitted, shared prefill, constrained)",
           res["ours_generated_tokens_per_s"], res["ours_prompts_per_s"], ours.median_s * 1e3,
           ours.min_s * 1e3, ours.compile_s]]
  for n in thread_options:
    t = ts[f"hf{n}"]
    rows.append([f"HF: LlamaForCausalLM.generate (PyTorch eager, {n} thread"
                 f"{'s' if n > 1 else ''})", tokens / t.median_s, B / t.median_s,
                 t.median_s * 1e3, t.min_s * 1e3, t.compile_s])
  print(common.table(["sampler", "gen tokens/s", "prompts/s", "ms/call (median)",
                      "ms/call (best)", "first call s"], rows, "Sampling throughput"))
  print(f"\nours / HF tokens per second (HF at its faster thread setting, {best_threads}): "
        f"{res['ratio']:.2f}x median, {res['ratio_best']:.2f}x best (timed in alternation)")
  if "split" in res:
    sp = res["split"]
    print(f"prefill (timed alone): ours {sp['ours_prefill_s'] * 1e3:.0f} ms (B={B} prompts), "
          f"HF {sp['hf_prefill_s'] * 1e3:.0f} ms (B*G={B * G} repeated prompts), "
          f"{sp['prefill_ratio']:.2f}x; decode (the rest of a call): ours "
          f"{sp['ours_decode_s'] * 1e3:.0f} ms, HF {sp['hf_decode_s'] * 1e3:.0f} ms, "
          f"{sp['decode_ratio']:.2f}x")
  return 0


if __name__ == "__main__":
  sys.exit(main())
