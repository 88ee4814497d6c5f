"""The one exception type a user sees as a one-line message (the CLI prints it and exits 2)."""


class ClipkitError(Exception):
    """A problem with the user's input: the message names the input and the fix."""
