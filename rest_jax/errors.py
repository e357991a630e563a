"""The one exception type for user errors (bad config, bad data, impossible threshold)."""


class RestJaxError(Exception):
  """A user error: the message names the cause and the fix.

  The CLI prints these without a traceback; everything else is a bug and keeps its traceback.
  """


class Preempted(Exception):
  """Not an error: SIGTERM stopped ``rest-jax run`` at a check point that every host agreed on,
  after saving (``rest_jax.parallel.preemption``). The message says what was kept; rerunning
  the same command resumes. The CLI exits with ``EXIT_PREEMPTED``."""


EXIT_PREEMPTED = 75  # os.EX_TEMPFAIL ("temporary failure, try again"), the CLI's exit code.
