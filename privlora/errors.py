"""Exceptions that the CLI reports as one clear line instead of a traceback."""


class PrivloraError(Exception):
    """Base class for errors caused by the user's input (models, adapters, files, options)."""


class UnsupportedModelError(PrivloraError):
    """The checkpoint's architecture or one of its features is not supported."""


class AdapterError(PrivloraError):
    """The adapter directory is malformed or uses a feature privlora does not support."""


class UsageError(PrivloraError):
    """A command-line argument is wrong (a missing file, options that go together, ...)."""
