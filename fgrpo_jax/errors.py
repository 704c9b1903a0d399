"""User-facing errors: printed by the entry point as one line, without a traceback."""


class UserError(ValueError):
  """A mistake the user can fix: a config field, a path, a malformed input line."""
