"""The command line's error type, in a module of its own so that command modules can raise it without
importing the dispatcher that loads them."""


class CliError(Exception):
    """Raised by commands for a user error: printed as one line, exit code 2."""
