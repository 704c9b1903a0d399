"""A tiny chat tokenizer for tests and demos, built offline with `tokenizers`.

`make_tiny_tokenizer(directory)` trains a small byte-level BPE (the GPT-4 / Qwen2
pre-tokenizer split) on a fixed corpus and saves `tokenizer.json` and
`tokenizer_config.json` with a Qwen-like chat template (`<|im_start|>role\\n ...
<|im_end|>`), so that

    AutoTokenizer.from_pretrained(directory, local_files_only=True)

loads it like a real LLM's tokenizer and `apply_chat_template` works. Known splits:

- `<|im_start|>`, `<|im_end|>` (end of turn and EOS), `<|endoftext|>` (padding) are
  single special tokens;
- the identifiers " A" … " Z", " a" … " z" (a space, then a letter) are single tokens;
- the tags `<slate>`, `</slate><rank>` and `</rank>` split into several tokens, as
  they would in a real LLM's vocabulary.

Training is deterministic: the same corpus gives the same vocabulary.
"""

from __future__ import annotations

import json
import os
import string

WORDS = ("the a of and to in for with on by user watched liked bought listened read film "
         "movie song album book game story night space river city garden music jazz rock "
         "dark light red blue green old new first last great little lost secret king queen "
         "war love home road star sea winter summer history question answer passage which "
         "who where when what born capital country wrote director team won").split()

TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# transformers' Qwen2 pre-tokenizer split (GPT-4 style).
_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
          r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def corpus() -> list[str]:
  """The fixed training text: words, identifier lists, tags and chat phrasing."""
  letters = string.ascii_uppercase + string.ascii_lowercase
  lines = [" ".join(WORDS[i:i + 7]) for i in range(0, len(WORDS), 3)]
  lines += [" ".join(letters[i:] + letters[:i]) for i in range(len(letters))] * 4
  lines += [f"- {c}: the {w} {v}" for c, w, v in zip(letters, WORDS, reversed(WORDS))]
  lines += ["<slate> A B C</slate><rank> B A</rank>"] * 8
  lines += ["user assistant system",
            "Candidates: Context: Question: History: Reply with exactly best first"]
  return lines


def make_tiny_tokenizer(directory: str, vocab_size: int = 400) -> str:
  """Trains and saves the tiny tokenizer into `directory`; returns the directory."""
  from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(corpus(), trainer=trainer)
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": TEMPLATE,
            "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
            "unk_token": None, "model_max_length": 4096, "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": {
                str(tok.token_to_id(t)): {"content": t, "special": True, "lstrip": False,
                                          "rstrip": False, "normalized": False,
                                          "single_word": False} for t in SPECIAL}}
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return directory
