"""Writes the README's config reference from configs/*.py, so it cannot drift.

    python scripts/config_reference.py          # rewrite the README block
    python scripts/config_reference.py --check  # exit 1 if the README is stale

Every `c.<section>.<field> = value  # comment` line of a config's `get_config`
becomes a table row with the field's default value (from `get_config()`) and its
comment. tests/test_config_reference.py runs the check.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
_FIELD = re.compile(r"^\s*c\.([\w.]+)\s*=\s*.+?\s+#\s*(.+)$")


def _value(config, dotted):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def config_table(path: str) -> str:
  from fgrpo_jax import cli  # main() put the repository on sys.path
  module = cli.load_python_file(path)
  config = module.get_config()
  rows = []
  seen = set()
  with open(path) as f:
    for line in f:
      m = _FIELD.match(line)
      if not m or m.group(1) in seen:
        continue
      name, comment = m.group(1), m.group(2).strip()
      seen.add(name)
      value = _value(config, name)
      shown = repr(value) if isinstance(value, str) else str(value)
      rows.append(f"| `{name}` | `{shown}` | {comment.replace('|', '/')} |")
  doc = (module.__doc__ or "").strip().splitlines()[0]
  head = [f"### `configs/{os.path.basename(path)}`", "", doc, "",
          "| field | default | meaning |", "|---|---|---|"]
  return "\n".join(head + rows)


def reference() -> str:
  paths = sorted(os.path.join(REPO, "configs", f) for f in os.listdir(os.path.join(REPO, "configs"))
                 if f.endswith(".py") and not f.startswith("_"))
  return "\n\n".join(config_table(p) for p in paths)


def render(readme: str) -> str:
  if START not in readme or END not in readme:
    raise SystemExit(f"{README}: missing the {START} / {END} markers")
  before, rest = readme.split(START, 1)
  _, after = rest.split(END, 1)
  return f"{before}{START}\n{reference()}\n{END}{after}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true", help="fail if the README is stale")
  args = parser.parse_args()
  sys.path.insert(0, REPO)
  with open(README) as f:
    current = f.read()
  fresh = render(current)
  if args.check:
    if fresh != current:
      print("README.md config reference is stale: run python scripts/config_reference.py")
      sys.exit(1)
    print("README.md config reference is current")
    return
  tmp = README + ".tmp"
  with open(tmp, "w") as f:
    f.write(fresh)
  os.replace(tmp, README)


if __name__ == "__main__":
  main()
