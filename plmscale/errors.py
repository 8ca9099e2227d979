"""The error the `plmscale` command reports as one line with exit status 2, never as a traceback."""


class UserError(Exception):
    """A mistake in the command line or its inputs: reported as one line, exit code 2, no traceback."""
