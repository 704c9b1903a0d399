"""Word-level text prompts for passage-pool tasks (multi-hop QA).

Tokenizer: a `tokenizers` WordLevel model (NFKC + lowercase normaliser, the
`Whitespace` pre-tokenizer, i.e. runs of word characters or of punctuation), saved
as `tokenizer.json` + `tokenizer_config.json` and always loaded back through
`transformers.AutoTokenizer.from_pretrained(dir, local_files_only=True)` (a
`PreTrainedTokenizerFast`), exactly as a Hugging Face tokenizer would be. Its first
ids are fixed:

    0 <pad>  1 <bos>  2 <unk>  3 <q>  4 <slate>  5 </slate>  6 <rank>  7 </rank>
    8 [P1]  9 [P2]  ...  7+C [PC]          (one identifier token per pool slot)

then the words of the training texts, most frequent first, up to `vocab_size`
(every other word becomes `<unk>`).

Prompt of one example (left-padded with <pad> to a fixed length P), by default:

    <bos> [P1] passage-1… [P2] passage-2… … [PC] passage-C… <q> question… <slate>

the question truncated to `question_len` tokens and each passage to
`passage_len`, so P = 3 + question_len + C * (1 + passage_len) at most. Two layout
switches (config.data.question_first, config.data.slot_after_passage) move the
question before the passages and each identifier after its passage:

    <bos> <q> question… passage-1… [P1] passage-2… [P2] … passage-C… [PC] <slate>

With both, a causal model reads every passage knowing the question, and the
identifier's position has seen the whole passage: the pointer the rollout writes
can match what that position computed. The
rollout then writes `s_1 … s_k </slate> <rank> r_1 … r_m </rank>` where every s/r
is one identifier token ([Pi] names pool slot i-1): cand_tokens = [P1]..[PC] for
every example.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Sequence

import numpy as np

from fgrpo_jax.data import arrays as arrays_lib
from fgrpo_jax.data import prompts as prompts_lib
from fgrpo_jax.errors import UserError
from fgrpo_jax.rollout import Layout

SPECIAL_TOKENS = prompts_lib.special_tokens(("<unk>", "<q>"))
PAD, BOS, SLATE = prompts_lib.PAD, prompts_lib.BOS, prompts_lib.SLATE
UNK, Q = 2, 3
SLOT_OFFSET = len(SPECIAL_TOKENS)


def slot_token(i: int) -> str:
  """Identifier token of pool slot i (0-based): "[P1]" for slot 0."""
  return f"[P{i + 1}]"


def prompt_length(question_len: int, passage_len: int, pool_size: int) -> int:
  """Longest possible prompt: <bos>, C x ([Pi] passage), <q> question, <slate>."""
  return 3 + question_len + pool_size * (1 + passage_len)


def build_tokenizer(texts: Iterable[str], out_dir: str, *, pool_size: int,
                    vocab_size: int, min_frequency: int = 1) -> None:
  """Trains the word-level vocabulary on `texts` and saves it to out_dir."""
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

  specials = list(SPECIAL_TOKENS) + [slot_token(i) for i in range(pool_size)]
  if vocab_size < len(specials) + 1:
    raise UserError(f"config.data.vocab_size={vocab_size} must exceed the {len(specials)} "
                    "special and pool-slot tokens")
  tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
  tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=specials, show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  for i, s in enumerate(specials):  # the fixed ids the prompts and layouts rely on
    if tok.token_to_id(s) != i:
      raise RuntimeError(f"tokenizer put {s} at id {tok.token_to_id(s)}, expected {i}")
  os.makedirs(out_dir, exist_ok=True)
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "pad_token": "<pad>", "bos_token": "<bos>", "unk_token": "<unk>",
      "additional_special_tokens": specials[3:],
      "model_max_length": 1 << 20,
      "clean_up_tokenization_spaces": False,
  }
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=1)
  with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
    json.dump({k: config[k] for k in ("pad_token", "bos_token", "unk_token",
                                       "additional_special_tokens")}, f, indent=1)


# Files one of which a Hugging Face tokenizer directory holds (fast, SentencePiece, BPE,
# WordPiece); without any, transformers fails with an error about a missing library.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


def load_tokenizer(directory: str, field: str = ""):
  """The tokenizer saved in `directory` through transformers.AutoTokenizer (local files
  only), or rebuilt from a .gguf file's metadata (fgrpo_jax/models/gguf.py). A
  directory without tokenizer files, or with files transformers cannot read, is one
  UserError naming it (and `field`, the config field that chose it)."""
  where = f"{field}={directory}" if field else str(directory)
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  if str(directory).endswith(".gguf"):
    from fgrpo_jax.models import gguf
    return gguf.load_tokenizer(directory)
  if not any(os.path.isfile(os.path.join(directory, f)) for f in TOKENIZER_FILES):
    raise UserError(f"{where}: no tokenizer in this directory (none of "
                    f"{', '.join(TOKENIZER_FILES)})")
  from transformers import AutoTokenizer
  try:
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)
  except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad directory
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    raise UserError(f"{where}: could not load the tokenizer ({type(e).__name__}: "
                    f"{first})") from None


@dataclasses.dataclass
class QAPrompts:
  """Builds padded passage-pool prompts with a loaded tokenizer."""

  tokenizer: object
  pool_size: int
  question_len: int
  passage_len: int
  prompt_len: int = 0  # 0 = the longest possible prompt
  question_first: bool = False  # <q> question before the passages (default: after them)
  slot_after_passage: bool = False  # [Pi] after its passage (default: before it)

  def __post_init__(self):
    need = prompt_length(self.question_len, self.passage_len, self.pool_size)
    if not self.prompt_len:
      self.prompt_len = need
    elif need > self.prompt_len:
      raise UserError(
          f"config.data.max_prompt_len={self.prompt_len} is shorter than the longest prompt "
          f"{need} = 3 + question_len {self.question_len} + pool_size {self.pool_size} x "
          f"(1 + passage_len {self.passage_len}); raise it or shorten the passages")
    for i in range(self.pool_size):
      if self.tokenizer.convert_tokens_to_ids(slot_token(i)) != SLOT_OFFSET + i:
        raise UserError(f"tokenizer has no {slot_token(i)} at id {SLOT_OFFSET + i} "
                        f"(built for a smaller pool than config.data.pool_size={self.pool_size}?)")

  @property
  def vocab_size(self) -> int:
    return len(self.tokenizer)

  @property
  def slot_ids(self) -> np.ndarray:
    return np.arange(SLOT_OFFSET, SLOT_OFFSET + self.pool_size, dtype=np.int32)

  def layout(self, slate_size: int, rank_size: int) -> Layout:
    return prompts_lib.tag_layout(slate_size, rank_size)

  def encode(self, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Token ids of each text (no special tokens), truncated to max_len.

    Encodes each distinct text once with the loaded tokenizer's backend (the same
    `tokenizers` pipeline `tokenizer(texts)` runs, without per-text Python wrapping).
    """
    if not texts:
      return []
    unique = list(dict.fromkeys(texts))
    backend = self.tokenizer.backend_tokenizer
    enc = backend.encode_batch(unique, add_special_tokens=False)
    ids = {t: e.ids[:max_len] for t, e in zip(unique, enc)}
    return [ids[t] for t in texts]

  def build(self, questions: Sequence[str], passages: Sequence[Sequence[str | None]]
            ) -> dict[str, np.ndarray]:
    """questions [N], passages [N][C] (None = empty slot) -> model batch arrays.

    Returns prompt int32 [N, P], prompt_mask bool [N, P] (left-padded),
    cand_tokens int32 [N, C] (= [P1]..[PC]), pool_mask bool [N, C].
    """
    n, c, p = len(questions), self.pool_size, self.prompt_len
    q_ids = self.encode(questions, self.question_len)
    flat = [t if t is not None else "" for row in passages for t in row]
    if any(len(row) != c for row in passages):
      raise ValueError(f"every example needs exactly {c} passage slots")
    p_ids = self.encode(flat, self.passage_len)
    prompt = np.full((n, p), PAD, np.int32)
    mask = np.zeros((n, p), bool)
    pool_mask = np.array([[t is not None for t in row] for row in passages], bool).reshape(n, c)
    for i in range(n):
      question = [Q, *q_ids[i]]
      seq = [BOS] + (question if self.question_first else [])
      for j in range(c):
        passage = p_ids[i * c + j]
        seq.extend([*passage, SLOT_OFFSET + j] if self.slot_after_passage
                   else [SLOT_OFFSET + j, *passage])
      # Default: the question last, next to the answer: one attention layer can gather
      # it at the answer position and the next match it against passage words, which
      # can read their identifier just before them.
      seq.extend(([] if self.question_first else question) + [SLATE])
      prompt[i, p - len(seq):] = seq
      mask[i, p - len(seq):] = True
    return {"prompt": prompt, "prompt_mask": mask,
            "cand_tokens": np.broadcast_to(self.slot_ids, (n, c)).copy(),
            "pool_mask": pool_mask}

  def model_arrays(self, rows: dict) -> dict[str, np.ndarray]:
    """Stored prompt rows (prompt, masks as uint8, ...) -> model arrays: bool masks and
    cand_tokens [N, C] = [P1]..[PC] added; other fields kept."""
    n = rows["prompt"].shape[0]
    return dict(arrays_lib.with_bool_masks(rows),
                cand_tokens=np.broadcast_to(self.slot_ids, (n, self.pool_size)).copy())

  def decode(self, tokens) -> str:
    """Readable text of token ids (padding dropped)."""
    ids = [int(t) for t in np.asarray(tokens).ravel() if int(t) != PAD]
    return " ".join(self.tokenizer.convert_ids_to_tokens(ids))
