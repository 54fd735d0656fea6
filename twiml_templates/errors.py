"""The templates package's exceptions: one root, :class:`TemplatesError`.

The tree (the module that raises each error is named)::

    TemplatesError
    ├── TemplateError        a template or a TwiML document is not valid (also a ``ValueError``)
    └── ExportError          twiml_templates.serverless: the export cannot be written

Both are configuration errors to ``crctl`` (exit code 2): the file or the folder named in the
message needs fixing.
"""


class TemplatesError(Exception):
    """Base of every error the templates package raises on purpose."""


class TemplateError(TemplatesError, ValueError):
    """A template or a TwiML document is not valid.

    The message is one line naming the file, the key, the bad value and what is allowed.
    """
