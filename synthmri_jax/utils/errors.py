"""Errors about the user's input (cohort, files, config, stale workdir).

The entry point prints their message alone, without a traceback: it names the file and the
problem, which is all the user needs. Anything else is a bug and keeps its traceback.
"""


class UserInputError(Exception):
  """Base class for errors whose message is addressed to the user."""
