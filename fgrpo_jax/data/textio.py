"""Reading published text files the same way in every reader.

- A UTF-8 byte-order mark is never data: files declared UTF-8 are read as
  `utf-8-sig`, and a file in a legacy encoding (MovieLens' latin-1) that starts with
  the UTF-8 mark is read as UTF-8 (the mark says what it is). Without this, the
  first field of the first line gains an invisible '\ufeff' (a phantom user).
- A JSON line cut short is reported as truncated, not by whatever json happens to
  trip on first (a cut string followed by the newline reads as "Invalid control
  character").
"""

from __future__ import annotations

import codecs
import gzip
import json
import os

from fgrpo_jax.errors import UserError


def _has_bom(path: str) -> bool:
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      return f.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8
  except (OSError, EOFError):
    return False  # the reader that follows reports the file


def text_encoding(path: str, encoding: str = "utf-8") -> str:
  """The encoding to read `path` with: utf-8-sig for UTF-8 or a file with the UTF-8 mark."""
  if encoding.lower().replace("_", "-") in ("utf-8", "utf8") or _has_bom(path):
    return "utf-8-sig"
  return encoding


def open_text(path: str, encoding: str = "utf-8", newline: str | None = "\n"):
  """A text reader (plain or .gz); only \\n ends a line by default (a stray \\r inside a
  field does not); undecodable bytes become U+FFFD rather than an exception."""
  if not os.path.isfile(path):
    raise UserError(f"{path}: file not found")
  enc = text_encoding(path, encoding)
  if path.endswith(".gz"):
    return gzip.open(path, "rt", encoding=enc, errors="replace", newline=newline)
  return open(path, encoding=enc, errors="replace", newline=newline)


def loads_line(line: str, had_newline: bool = True):
  """json.loads of one line (its line break removed); raises ValueError with a
  message that says when the line is truncated."""
  text = line.rstrip("\r\n")
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    cut = (not had_newline or e.pos >= len(text.rstrip())
           or e.msg.startswith("Unterminated string"))
    if cut:
      raise ValueError(f"invalid JSON: the line is truncated ({e.msg} at column "
                       f"{e.colno})") from None
    raise ValueError(f"invalid JSON: {e.msg} at column {e.colno}") from None


class BadLines:
  """Malformed input: an error naming file and line, or (config.data.skip_bad_lines) a
  counted skip. unit: what a bad line loses ("lines", or "examples" of a JSON reader)."""

  def __init__(self, skip: bool, unit: str = "lines"):
    self.skip, self.unit, self.count, self.first = skip, unit, 0, None

  def __call__(self, path: str, lineno: int, message: str) -> None:
    text = f"{path}:{lineno}: {message}"
    if not self.skip:
      raise UserError(f"{text} (config.data.skip_bad_lines=True skips such {self.unit})")
    self.count += 1
    self.first = self.first or text
