"""The templates package's one exception."""


class TemplateError(ValueError):
    """A template or a TwiML document is not valid. The message is one line naming the file,
    the key, the bad value and what is allowed."""
