"""Prompt builders: the declared interface, the special tokens, and item-token prompts.

Three builders turn a task's examples into model arrays (data/arrays.py schema):
`ItemTokenPrompts` here (every catalogue item is one token), `text_prompts.QAPrompts`
(word-level passage prompts) and `chat_prompts.ChatPrompts` (a Hugging Face chat
template). Each implements `PromptBuilder`.

Item-token prompt of one example (left-padded to a fixed length P = 4 + H + C):

    <pad>… <bos> <hist> h_1 … h_n <pool> c_1 … c_C <slate>

The rollout then writes `s_1 … s_k </slate> <rank> r_1 … r_m </rank>`, each s/r
being the token of a pool item (`cand_tokens`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from fgrpo_jax.rollout import Layout


@runtime_checkable
class PromptBuilder(Protocol):
  """What a task needs of a prompt builder."""

  @property
  def vocab_size(self) -> int:
    """Tokens the model must embed."""

  def layout(self, slate_size: int, rank_size: int) -> Layout:
    """The rollout layout (constrained decoding) for slates of k and rankings of m."""

  def build(self, contexts: Sequence[Any], candidates: Sequence[Any]) -> dict[str, np.ndarray]:
    """N contexts (histories, questions) and their pools of C candidates -> prompt int32
    [N, P], prompt_mask bool [N, P], cand_tokens int32 [N, C], pool_mask bool [N, C]."""


# The special tokens of the token-id vocabularies (item tokens, word-level QA text): ids
# 0-7, the same tags at the same ids; ids 2 and 3 mark the two parts of the task's prompt.
PAD, BOS, SLATE, SLATE_END, RANK, RANK_END = 0, 1, 4, 5, 6, 7


def special_tokens(marks: tuple[str, str]) -> tuple[str, ...]:
  """The 8 special tokens, in id order, of a vocabulary whose prompt marks are `marks`."""
  return ("<pad>", "<bos>", *marks, "<slate>", "</slate>", "<rank>", "</rank>")


def tag_layout(slate_size: int, rank_size: int) -> Layout:
  """The constrained rollout layout of a token-id vocabulary: `</slate> <rank>` between
  the slate and the ranking, `</rank>` after it."""
  return Layout(slate_size=slate_size, rank_size=rank_size, mid_tags=(SLATE_END, RANK),
                end_tags=(RANK_END,))


SPECIAL_TOKENS = special_tokens(("<hist>", "<pool>"))
HIST, POOL = 2, 3


@dataclasses.dataclass(frozen=True)
class ItemTokenPrompts:
  """Maps item ids to token ids and builds padded prompt batches."""

  num_items: int

  @property
  def item_offset(self) -> int:
    return len(SPECIAL_TOKENS)

  @property
  def vocab_size(self) -> int:
    return self.item_offset + self.num_items

  def layout(self, slate_size: int, rank_size: int) -> Layout:
    return tag_layout(slate_size, rank_size)

  def item_tokens(self, items: np.ndarray) -> np.ndarray:
    return np.where(items >= 0, items + self.item_offset, PAD).astype(np.int32)

  def build(self, history: np.ndarray, pool: np.ndarray) -> dict[str, np.ndarray]:
    """history int [N, H] (-1 = padding), pool int [N, C] -> model batch arrays.

    Returns prompt int32 [N, P], prompt_mask bool [N, P] (real tokens right-aligned),
    cand_tokens int32 [N, C], pool_mask bool [N, C] (False for -1 pool slots).
    """
    history = np.asarray(history)
    pool = np.asarray(pool)
    n = history.shape[0]
    col = lambda tok: np.full((n, 1), tok, np.int32)
    tokens = np.concatenate([col(BOS), col(HIST), self.item_tokens(history), col(POOL),
                             self.item_tokens(pool), col(SLATE)], axis=1)
    valid = np.concatenate([np.ones((n, 2), bool), history >= 0, np.ones((n, 1), bool),
                            np.ones(pool.shape, bool), np.ones((n, 1), bool)], axis=1)
    # Left-pad: stable sort moves padding to the front, keeping real tokens in order.
    order = np.argsort(valid, axis=1, kind="stable")
    return {
        "prompt": np.take_along_axis(np.where(valid, tokens, PAD), order, 1).astype(np.int32),
        "prompt_mask": np.take_along_axis(valid, order, 1),
        "cand_tokens": self.item_tokens(pool),
        "pool_mask": pool >= 0,
    }

  def decode(self, tokens, item_names=None) -> str:
    """Readable text of a token sequence (for printing rollouts)."""
    out = []
    for t in np.asarray(tokens).tolist():
      if t < self.item_offset:
        if t != PAD:
          out.append(SPECIAL_TOKENS[t])
      else:
        item = t - self.item_offset
        out.append(item_names[item] if item_names is not None else f"item_{item}")
    return " ".join(out)
