"""The one exception type a user can cause; the CLI turns it into one line and exit code 2."""


class UserError(Exception):
    """Bad input or settings: the message says what is wrong and what to do."""


class Stopped(Exception):
    """The user stopped a stage (Ctrl-C, SIGTERM): the message says what was committed."""
