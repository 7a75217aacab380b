"""The error type for bad input, and the one-line warning. Imports nothing of the toolkit, so
every module may use it."""
import sys


class UserError(Exception):
    """A problem with what the user gave us (paths, data, flags, checkpoints).

    Raised where the problem is found, with the fix in the message; `utils.cli.run_main` prints
    it as one line and exits with status 2. Anything else is a bug and keeps its traceback.
    `all_ranks=True` marks an error every process of a distributed job raises alike: only rank 0
    prints it.
    """

    def __init__(self, message, all_ranks=False):
        super().__init__(message)
        self.all_ranks = all_ranks


def warn(message):
    """Print a one-line warning to stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
