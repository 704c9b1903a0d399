"""What the command-line entry points (main, compare, export) share: one-line errors.

`check_config_args(argv)` runs before absl parses the flags. It loads the
`--config=FILE[:variant]` file the way ml_collections will and checks each
`--config.<field>=value` override, so that a missing file, an unknown variant, an
unknown field (with the nearest known one: `rl.stepz (did you mean rl.steps?)`) or a
value of the wrong type is one line instead of an ml_collections traceback.
`exit_on_user_error(fn)` runs the program and turns a UserError into
`error: <message>` on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import os
import sys

from fgrpo_jax.errors import UserError

EXIT_USER_ERROR = 2


def _flag_value(argv: list[str], name: str) -> str | None:
  """The value of --name=V / --name V / -name=V in argv (the last one wins, as in absl)."""
  value = None
  for i, arg in enumerate(argv):
    for prefix in (f"--{name}", f"-{name}"):
      if arg == prefix and i + 1 < len(argv):
        value = argv[i + 1]
      elif arg.startswith(prefix + "="):
        value = arg[len(prefix) + 1:]
  return value


def _overrides(argv: list[str], name: str) -> list[tuple[str, str | None]]:
  """(dotted field, value or None for a bare boolean) of every --name.<field> override."""
  out = []
  for i, arg in enumerate(argv):
    body = arg.lstrip("-")
    if arg == body:  # not a flag
      continue
    negated = body.startswith(f"no{name}.")
    if negated:
      body = body[2:]
    if not body.startswith(f"{name}."):
      continue
    field, eq, value = body[len(name) + 1:].partition("=")
    if not eq and not negated and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
      value, eq = argv[i + 1], "="
    out.append((field, value if eq else None))
  return out


def load_python_file(path: str):
  """The module of the Python file at `path`, executed afresh (configs/ and scripts/ are
  files of the checkout, not installed packages)."""
  name = "_fgrpo_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def load_config_file(spec: str):
  """ConfigDict of `FILE[:arg]` (get_config(arg)); one UserError line on any failure."""
  path, colon, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UserError(f"--config={spec}: {path} not found")
  try:
    module = load_python_file(path)
    config = module.get_config(arg) if colon else module.get_config()
  except Exception as e:  # noqa: BLE001 - any failure of the user's config file: one line
    detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise UserError(f"--config={spec}: {type(e).__name__}: {detail}") from None
  return config


def field_names(config, prefix: str = "") -> list[str]:
  """Every dotted field of a ConfigDict (nodes and leaves)."""
  out = []
  for key, value in config.items():
    out.append(prefix + key)
    if hasattr(value, "items") and not isinstance(value, dict):
      out += field_names(value, f"{prefix}{key}.")
  return out


def unknown_field(field: str, config) -> UserError:
  close = difflib.get_close_matches(field, field_names(config), n=1, cutoff=0.6)
  hint = f" (did you mean {close[0]}?)" if close else ""
  return UserError(f"unknown config field {field}{hint}")


def _check_value(field: str, current, value: str | None) -> None:
  """The override parses as the field's type (ml_collections' own error is a traceback
  for some types)."""
  if value is None or isinstance(current, (bool, str)) or current is None:
    return
  kind = int if isinstance(current, int) else float if isinstance(current, float) else None
  if kind is None:
    return
  try:
    kind(value)
  except ValueError:
    raise UserError(f"--config.{field}={value}: not {'an integer' if kind is int else 'a number'}"
                    f" (config.{field} is {current!r})") from None


def check_config_args(argv: list[str], name: str = "config") -> None:
  """Raises UserError for a bad --config file or override; silent when all is well
  (absl then parses the same arguments for real)."""
  spec = _flag_value(argv, name)
  if spec is None:
    return  # absl reports the missing required flag
  config = load_config_file(spec)
  for field, value in _overrides(argv, name):
    node = config
    for part in field.split("."):
      if not hasattr(node, "items") or part not in node:
        raise unknown_field(field, config)
      node = node[part]
    _check_value(field, node, value)


@contextlib.contextmanager
def user_errors():
  """`with user_errors():` prints a UserError as one line and exits with code 2."""
  try:
    yield
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def precheck(argv: list[str] | None = None, name: str = "config") -> None:
  """check_config_args on sys.argv, reported as one line (exit 2) before absl runs."""
  with user_errors():
    check_config_args(list(sys.argv if argv is None else argv)[1:], name)
