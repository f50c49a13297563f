"""The one error type the command line turns into a clean one-line message."""


class UbtError(Exception):
    """A problem the user can fix: the message says what is wrong, where, and what to do."""
