"""The one error type that the CLI turns into a one-line message and exit code 2."""


class UserError(ValueError):
  """Bad input from the user (config key, file, argument).

  The message must name the culprit and fit on one line. Raise it before any expensive compile.
  """


class RunFailure(RuntimeError):
  """A run that cannot go on (non-finite loss, a checkpoint that cannot be written).

  The CLI prints the message as one line and exits with code 1; the message says what was kept
  and what to do.
  """
