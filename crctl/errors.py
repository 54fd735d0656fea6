"""The CLI package's root exception: known failures, printed as one line by the CLI."""


class CrctlError(Exception):
    """A failure with a message fit for the user: what happened and what to do next."""
