"""The one exception type for user errors (bad config, bad data, impossible threshold)."""


class RestJaxError(Exception):
  """A user error: the message names the cause and the fix.

  The CLI prints these without a traceback; everything else is a bug and keeps its traceback.
  """
