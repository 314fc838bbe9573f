"""The one error type that the CLI turns into a one-line message and exit code 2."""


class UserError(ValueError):
  """Bad input from the user (config key, file, argument).

  The message must name the culprit and fit on one line. Raise it before any expensive compile.
  """
