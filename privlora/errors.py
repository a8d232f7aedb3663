"""Exceptions that the CLI reports as one clear line instead of a traceback."""


class PrivloraError(Exception):
    """Base class for the errors the CLI reports as one line. ``exit_code`` 2: the user's input is
    wrong (options, models, adapters, files); runtime failures (a server that refuses or cannot
    be reached) set 1."""

    exit_code = 2


class UnsupportedModelError(PrivloraError):
    """The checkpoint's architecture or one of its features is not supported."""


class AdapterError(PrivloraError):
    """The adapter directory is malformed or uses a feature privlora does not support."""


class UsageError(PrivloraError):
    """A command-line argument is wrong (a missing file, options that go together, ...)."""


class ListenError(PrivloraError):
    """A serving command cannot listen where it was told to (a port in use, an address that is not
    this machine's): the machine's state, not the command line, so exit code 1."""

    exit_code = 1
