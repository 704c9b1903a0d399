"""Logits of our GGUF import vs transformers' own GGUF loader (torch), on a chat prompt.

Two steps, because the project's environment has no torch and a torch environment
needs no jax:

    # 1. in a scratch venv with torch (CPU), transformers, gguf: the reference logits
    python scripts/check_gguf_parity.py reference --gguf FILE --out /tmp/ref.npz
    # 2. in the project's venv: our logits (the .gguf itself, or a converted directory)
    python scripts/check_gguf_parity.py compare --checkpoint FILE_OR_DIR --ref /tmp/ref.npz

Step 1 tokenizes with transformers' GGUF tokenizer and stores the token ids, so step 2
feeds both models the same tokens, and also reports whether our tokenizer agrees.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

MESSAGES = [{"role": "user", "content": "I liked Toy Story, Heat and Fargo. Which film "
                                        "should I watch next? Answer with one title."}]


def reference(gguf_file: str, out: str) -> None:
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer
  directory, name = os.path.split(os.path.abspath(gguf_file))
  tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
  model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                               dtype=torch.float32).eval()
  text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
  ids = tok(text, add_special_tokens=False)["input_ids"]
  with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0].float().numpy()
  np.savez(out, ids=np.asarray(ids, np.int32), logits=logits, text=np.asarray(text))
  print(f"reference: {len(ids)} tokens, logits {logits.shape} -> {out}")


def compare(checkpoint: str, ref: str) -> None:
  from fgrpo_jax.models import load_pretrained
  with np.load(ref) as r:
    ids, want, text = r["ids"], r["logits"], str(r["text"])
  model = load_pretrained(checkpoint)
  ours_text = model.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                                  tokenize=False)
  ours_ids = model.tokenizer(ours_text, add_special_tokens=False)["input_ids"]
  got = np.asarray(model.logits(ids[None]))[0]
  diff = np.abs(got - want)
  print(f"tokens: {len(ids)}; chat template text equal: {ours_text == text}; "
        f"token ids equal: {list(ours_ids) == ids.tolist()}")
  agree = np.mean(got.argmax(-1) == want.argmax(-1))
  print(f"max |logit diff| {diff.max():.2e} (mean {diff.mean():.2e}, logit scale "
        f"{np.abs(want).max():.1f}); argmax equal at {agree:.1%} of positions")
  sys.exit(0 if diff.max() <= 2e-3 else 1)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="step", required=True)
  r = sub.add_parser("reference")
  r.add_argument("--gguf", required=True)
  r.add_argument("--out", required=True)
  c = sub.add_parser("compare")
  c.add_argument("--checkpoint", required=True)
  c.add_argument("--ref", required=True)
  args = parser.parse_args()
  if args.step == "reference":
    reference(args.gguf, args.out)
  else:
    compare(args.checkpoint, args.ref)


if __name__ == "__main__":
  main()
