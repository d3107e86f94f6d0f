"""The project's user-facing error type: the CLI prints these as one clear line, no traceback."""


class RadsynthError(Exception):
    """An error a user can act on: say what went wrong and what to do."""
