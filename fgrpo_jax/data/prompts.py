"""Item-token prompts: every catalogue item is one token of the model's vocabulary.

Prompt of one example (left-padded to a fixed length P = 4 + H + C):

    <pad>… <bos> <hist> h_1 … h_n <pool> c_1 … c_C <slate>

The rollout then writes `s_1 … s_k </slate> <rank> r_1 … r_m </rank>`, each s/r
being the token of a pool item (`cand_tokens`). Text LLM prompts (identifier
letters, chat templates) live with the Hugging Face backbones.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fgrpo_jax.rollout import Layout

SPECIAL_TOKENS = ("<pad>", "<bos>", "<hist>", "<pool>", "<slate>", "</slate>", "<rank>",
                  "</rank>")
PAD, BOS, HIST, POOL, SLATE, SLATE_END, RANK, RANK_END = range(len(SPECIAL_TOKENS))


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
    return Layout(slate_size=slate_size, rank_size=rank_size,
                  mid_tags=(SLATE_END, RANK), end_tags=(RANK_END,))

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
