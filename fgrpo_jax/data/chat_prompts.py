"""Chat-template text prompts for pretrained LLM tokenizers.

One builder serves recommendation (context = the user's history of item titles,
candidates = item titles) and multi-hop QA (context = the question, candidates =
passages). Each example is rendered with the tokenizer's own chat template:

    system: the format instruction (k, m and an example reply)
    user:   <context label>:
            <context>

            Candidates:
            - A: <candidate 0>
            - B: <candidate 1>
            …
    assistant (generation prompt) then the opening tag `<slate>` as text

and the model writes ` A D F</slate><rank> D A</rank>`: each pool slot is named by
an identifier that is exactly one token in context (here " A", a space then the
letter), and the tags are whatever token sequences the tokenizer makes of
`</slate><rank>` and `</rank>` (`layout()`). Prompts are tokenized to fixed-length,
left-padded arrays; candidate texts that do not fit `max_len` are cut to the longest
common token budget that fits.

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    prompts = ChatPrompts(tok, slate_size=10, rank_size=5, max_len=1024, source=path)
    arrays = prompts.build(contexts, candidates)     # prompt [N, P], cand_tokens [N, C], ...
    layout = prompts.layout(constrained=False, max_new_tokens=64)
"""

from __future__ import annotations

import string
from typing import Sequence

import numpy as np

from fgrpo_jax.errors import UserError
from fgrpo_jax.rollout import Layout, with_budget

SLATE_OPEN, MID_TAGS, END_TAGS = "<slate>", "</slate><rank>", "</rank>"
ID_PREFIX = " "  # an identifier is written as ID_PREFIX + name (" A")
LETTERS = tuple(string.ascii_uppercase + string.ascii_lowercase)
# End-of-turn tokens of common chat templates: a free rollout stops at any present.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>", "<|end|>")


def parse_identifiers(spec: str) -> tuple[str, ...]:
  """"letters" -> A..Z, a..z; otherwise a comma-separated list of names."""
  if spec == "letters":
    return LETTERS
  names = tuple(n.strip() for n in spec.split(","))
  if not spec.strip() or any(not n for n in names):
    raise UserError(f"config.prompt.identifiers={spec!r}: give 'letters' or a comma-separated "
                    "list of non-empty names")
  if len(set(names)) != len(names):
    raise UserError(f"config.prompt.identifiers={spec!r}: names repeat")
  return names


def default_system(slate_size: int, rank_size: int, names: Sequence[str]) -> str:
  """The built-in format instruction, with an example reply made of the first names."""
  slate = [names[i] for i in range(min(slate_size, len(names)))]
  example = (f"{SLATE_OPEN}{''.join(ID_PREFIX + n for n in slate)}{MID_TAGS}"
             f"{''.join(ID_PREFIX + n for n in slate[::-1][:rank_size])}{END_TAGS}")
  return (f"Select and rank candidates. Reply with {SLATE_OPEN}, then the identifiers of "
          f"exactly {slate_size} different candidates separated by spaces, then {MID_TAGS}, "
          f"then {rank_size} of those identifiers, best first, then {END_TAGS}. "
          f"Example: {example}")


class ChatPrompts:
  """Renders, checks and tokenizes chat prompts for one tokenizer.

  tokenizer: a transformers tokenizer with a chat template; slate_size k, rank_size m
  (stated in the instruction); max_len: prompt tokens P; identifiers: the slot names
  (each must be one token after ID_PREFIX); pool_size: C, the slots in use (only the
  first C identifiers are needed and checked; None = all); system: the system message ("" = the
  built-in instruction, None = no system message, e.g. for templates without one);
  context_label: heading of the context ("History", "Question"); source: the
  tokenizer's directory, named in errors; template_kwargs: extra arguments of
  apply_chat_template (e.g. enable_thinking=False).
  """

  RENDER_CHUNK = 2048  # examples tokenized per batched tokenizer call in build()

  def __init__(self, tokenizer, *, slate_size: int, rank_size: int, max_len: int,
               identifiers: Sequence[str] = LETTERS, pool_size: int | None = None,
               system: str | None = "",
               context_label: str = "Context", candidate_label: str = "Candidates",
               source: str = "", template_kwargs: dict | None = None):
    self.tokenizer = tokenizer
    self.slate_size, self.rank_size, self.max_len = slate_size, rank_size, max_len
    if pool_size is not None and pool_size > len(identifiers):
      raise UserError(f"pools of {pool_size} candidates need {pool_size} identifiers, "
                      f"config.prompt.identifiers has {len(identifiers)}")
    self.names = tuple(identifiers)[:pool_size]
    self.system = default_system(slate_size, rank_size, self.names) if system == "" else system
    self.context_label, self.candidate_label = context_label, candidate_label
    self.source = source or getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    self.template_kwargs = dict(template_kwargs or {})
    if max_len < 1:
      raise UserError(f"config.prompt.max_len={max_len} must be at least 1")
    self.id_tokens = self._identifier_tokens()
    first = ID_PREFIX + self.names[0]
    self.mid_tags = self._tokens_in_context(SLATE_OPEN + first, MID_TAGS, "tag")
    self.end_tags = self._tokens_in_context(SLATE_OPEN + first + MID_TAGS + first, END_TAGS,
                                            "tag")
    self.stop_tokens = self._stop_tokens()
    self._frame = self._template_frame()
    clash = set(self.id_tokens) & set(self.mid_tags + self.end_tags + self.stop_tokens)
    if clash:
      raise UserError(f"{self.source}: identifier tokens {sorted(clash)} also occur in the "
                      "tags or stop tokens (config.prompt.identifiers)")

  @classmethod
  def from_config(cls, tokenizer, config, source: str = "", **kwargs) -> "ChatPrompts":
    """The builder of config.prompt and config.rollout (slate and rank sizes)."""
    return cls(tokenizer, slate_size=config.rollout.slate_size,
               rank_size=config.rollout.rank_size, max_len=config.prompt.max_len,
               identifiers=parse_identifiers(config.prompt.identifiers),
               pool_size=config.data.pool_size, system=config.prompt.system, source=source,
               **kwargs)

  # --------------------------------------------------------------------------
  # Tokenizer checks.

  def encode(self, text: str) -> list[int]:
    return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

  def _tokens_in_context(self, before: str, text: str, what: str) -> tuple[int, ...]:
    """Token ids of `text` as it is tokenized right after `before`."""
    head, whole = self.encode(before), self.encode(before + text)
    if whole[:len(head)] != head or len(whole) == len(head):
      raise UserError(f"{self.source}: the {what} {text!r} does not tokenize separately "
                      f"after {before!r} (its tokens merge with the text before it)")
    return tuple(whole[len(head):])

  def _identifier_tokens(self) -> tuple[int, ...]:
    """One token per identifier, the same after the opening tag and after another one."""
    out = []
    for name in self.names:
      text = ID_PREFIX + name
      after_tag = self._tokens_in_context(SLATE_OPEN, text, f"identifier {name!r}")
      after_id = self._tokens_in_context(SLATE_OPEN + ID_PREFIX + self.names[-1], text,
                                         f"identifier {name!r}")
      if len(after_tag) != 1 or after_tag != after_id:
        pieces = self.tokenizer.convert_ids_to_tokens(list(after_tag))
        raise UserError(f"identifier {name!r} (written {text!r}) is not exactly one token in "
                        f"the tokenizer of {self.source}: {pieces} (config.prompt.identifiers)")
      out.append(after_tag[0])
    if len(set(out)) != len(out):
      raise UserError(f"{self.source}: two identifiers map to the same token "
                      "(config.prompt.identifiers)")
    return tuple(out)

  def _stop_tokens(self) -> tuple[int, ...]:
    """EOS and the end-of-turn tokens this vocabulary has as single tokens."""
    ids = set()
    if self.tokenizer.eos_token_id is not None:
      ids.add(int(self.tokenizer.eos_token_id))
    vocab = self.tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return tuple(sorted(ids))

  @property
  def vocab_size(self) -> int:
    return len(self.tokenizer)

  @property
  def pad_token(self) -> int:
    t = self.tokenizer
    pad = t.pad_token_id if t.pad_token_id is not None else t.eos_token_id
    return int(pad) if pad is not None else 0

  def layout(self, slate_size: int | None = None, rank_size: int | None = None, *,
             constrained: bool = True, max_new_tokens: int = 0) -> Layout:
    """The rollout layout: tags as this tokenizer splits them, EOS / end of turn stop a
    free rollout. max_new_tokens 0 = twice the length of a well-formed reply."""
    k = self.slate_size if slate_size is None else slate_size
    m = self.rank_size if rank_size is None else rank_size
    base = Layout(slate_size=k, rank_size=m, mid_tags=self.mid_tags, end_tags=self.end_tags,
                  stop_tokens=self.stop_tokens, pad_token=self.pad_token)
    return with_budget(base, constrained, max_new_tokens)

  # --------------------------------------------------------------------------
  # Rendering and tokenizing.

  def _messages(self, user: str) -> list[dict]:
    messages = [{"role": "user", "content": user}]
    if self.system is not None:
      messages.insert(0, {"role": "system", "content": self.system})
    return messages

  def _apply_template(self, user: str) -> str:
    return self.tokenizer.apply_chat_template(self._messages(user), tokenize=False,
                                              add_generation_prompt=True, **self.template_kwargs)

  def _template_frame(self) -> tuple[str, str] | None:
    """(text before, text after) the user message when the chat template copies it
    verbatim, so that rendering is a string concatenation; None when it does not (a
    template that trims or escapes the content) and every prompt is rendered by the
    template itself. Checked on two probes of different lengths and characters."""
    # Whitespace at both ends: a template that trims the message fails the check.
    probes = ("\u2063probe\u2063", " \n\u2063A longer probe:\n\n- A: x y\u2063\n ")
    frames = set()
    for probe in probes:
      text = self._apply_template(probe)
      if text.count(probe) != 1:
        return None
      before, after = text.split(probe)
      frames.add((before, after))
    return frames.pop() if len(frames) == 1 else None

  def render(self, context: str, candidates: Sequence[str]) -> str:
    """The prompt text of one example, ending with the slate opening tag."""
    pool = "\n".join(f"-{ID_PREFIX}{n}: {c}" for n, c in zip(self.names, candidates))
    user = (f"{self.context_label}:\n{context}\n\n{self.candidate_label}:\n{pool}")
    if self._frame is not None:
      return self._frame[0] + user + self._frame[1] + SLATE_OPEN
    return self._apply_template(user) + SLATE_OPEN

  def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of many texts in one tokenizer call (a fast tokenizer batches them)."""
    if not texts:
      return []
    return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

  def _cut(self, ids: list[int], budget: int) -> str:
    return self.tokenizer.decode(ids[:budget]).replace("\ufffd", "").strip()

  def prompt_ids(self, context: str, candidates: Sequence[str], row: int = 0):
    """(token ids of one prompt, whether candidate texts were cut to fit max_len).

    The cut keeps the first `b` tokens of every candidate text, for the largest b
    whose prompt fits (binary search over b on the rendered prompt's real length).
    """
    ids, cut = self._prompt_ids_many([context], [list(candidates)], first_row=row)
    return ids[0], bool(cut[0])

  def _prompt_ids_many(self, contexts, candidates, first_row: int = 0):
    """prompt_ids of many examples: the whole prompts are tokenized in one call, and the
    binary searches of the prompts that need cutting advance in lockstep (one tokenizer
    call per search step for all of them). Candidate texts repeat across examples (an
    item title appears in many pools), so their tokens and cuts are computed once."""
    ids = self.encode_many([self.render(c, p) for c, p in zip(contexts, candidates)])
    cut = [False] * len(ids)
    long_rows = [i for i, x in enumerate(ids) if len(x) > self.max_len]
    if not long_rows:
      return ids, cut
    texts = sorted({t for i in long_rows for t in candidates[i]})
    pieces = dict(zip(texts, self.encode_many(texts)))
    cuts = {}

    def cut_text(text, b):
      if (text, b) not in cuts:
        cuts[text, b] = self._cut(pieces[text], b)
      return cuts[text, b]

    def trials(rows, budgets):
      return self.encode_many([self.render(contexts[i], [cut_text(t, b) for t in candidates[i]])
                               for i, b in zip(rows, budgets)])

    for i, empty in zip(long_rows, trials(long_rows, [0] * len(long_rows))):
      if len(empty) > self.max_len:
        raise UserError(f"example {first_row + i}: the prompt needs {len(empty)} tokens even "
                        f"with empty candidate texts, more than config.prompt.max_len="
                        f"{self.max_len}")
      ids[i], cut[i] = empty, True
    # Largest budget that fits, per row; lo always fits (ids[i] holds its prompt).
    lo = {i: 0 for i in long_rows}
    hi = {i: max(len(pieces[t]) for t in candidates[i]) if candidates[i] else 0
          for i in long_rows}
    while True:
      rows = [i for i in long_rows if lo[i] < hi[i]]
      if not rows:
        return ids, cut
      mids = [(lo[i] + hi[i] + 1) // 2 for i in rows]
      for i, mid, trial in zip(rows, mids, trials(rows, mids)):
        if len(trial) <= self.max_len:
          lo[i], ids[i] = mid, trial
        else:
          hi[i] = mid - 1

  def build(self, contexts: Sequence[str], candidates: Sequence[Sequence[str]],
            pool_size: int | None = None) -> dict[str, np.ndarray]:
    """Model arrays of N examples.

    contexts: N strings; candidates: N lists of candidate texts (at most
    len(identifiers) each; shorter pools are padded with masked slots).
    Returns prompt int32 [N, P] (P = max_len, left-padded with the pad token),
    prompt_mask bool [N, P], cand_tokens int32 [N, C] (the identifier token of each
    slot), pool_mask bool [N, C], truncated bool [N] (candidate texts were cut).
    C = pool_size or the builder's pool size.
    """
    if len(contexts) != len(candidates):
      raise UserError(f"{len(contexts)} contexts but {len(candidates)} candidate lists")
    C = pool_size or len(self.names)
    if C > len(self.names):
      raise UserError(f"pools of {C} candidates need {C} identifiers, the builder has "
                      f"{len(self.names)} (config.prompt.identifiers, config.data.pool_size)")
    N, P = len(contexts), self.max_len
    prompt = np.full((N, P), self.pad_token, np.int32)
    prompt_mask = np.zeros((N, P), bool)
    pool_mask = np.zeros((N, C), bool)
    truncated = np.zeros(N, bool)
    for i, cands in enumerate(candidates):
      if len(cands) > C:
        raise UserError(f"example {i}: {len(cands)} candidates, more than the pool size {C}")
    all_ids, all_cut = [], []
    for start in range(0, N, self.RENDER_CHUNK):  # bounded memory for the batched calls
      stop = min(N, start + self.RENDER_CHUNK)
      chunk_ids, chunk_cut = self._prompt_ids_many(
          list(contexts[start:stop]), [list(c) for c in candidates[start:stop]],
          first_row=start)
      all_ids += chunk_ids
      all_cut += chunk_cut
    for i, (ids, cands) in enumerate(zip(all_ids, candidates)):
      truncated[i] = all_cut[i]
      prompt[i, P - len(ids):] = ids
      prompt_mask[i, P - len(ids):] = True
      pool_mask[i, :len(cands)] = True
    cand_tokens = np.broadcast_to(np.asarray(self.id_tokens[:C], np.int32), (N, C)).copy()
    return {"prompt": prompt, "prompt_mask": prompt_mask, "cand_tokens": cand_tokens,
            "pool_mask": pool_mask, "truncated": truncated}

  # --------------------------------------------------------------------------
  # Printing.

  def decode(self, tokens, phase_ids=None) -> str:
    """Text of token ids [T]; with phase_ids, only the generated part (no padding)."""
    tokens = np.asarray(tokens).reshape(-1)
    if phase_ids is not None:
      tokens = tokens[np.asarray(phase_ids).reshape(-1) != 0]
    return self.tokenizer.decode(tokens.tolist())

  def describe(self, candidates: Sequence[str], slate, ranking, relevance=None,
               width: int = 40) -> str:
    """Readable slate and ranking: one line per ranked / slate candidate.

    candidates: the example's texts; slate [k], ranking [m]: pool slots (-1 = empty);
    relevance [C] optional (relevant ones are starred)."""
    def line(c):
      if c < 0 or c >= len(candidates):
        return f"  (slot {c}: not a pool candidate)"
      star = "*" if relevance is not None and relevance[c] > 0 else " "
      text = candidates[c] if len(candidates[c]) <= width else candidates[c][:width - 1] + "…"
      return f" {star}{self.names[c]}: {text}"
    slate = [int(c) for c in np.asarray(slate) if c != -1]
    ranking = [int(c) for c in np.asarray(ranking) if c != -1]
    return "\n".join(["slate:"] + [line(c) for c in slate] + ["ranking (best first):"]
                     + [line(c) for c in ranking])
