"""The one exception type the command line turns into a one-line message."""


class CapsbenchError(Exception):
    """A problem the user can fix: the message says what is wrong and what to do.

    The CLI prints ``error: <message>`` and exits with status 2 (no traceback unless
    ``--debug``). Raise it for bad input, missing or corrupt data, unknown names, NaN loss.
    """


class RankError(CapsbenchError):
    """A problem of one torchrun rank (its GPU, its node): printed by that rank, with its number,
    where the errors every rank meets alike are printed by rank 0 alone."""
