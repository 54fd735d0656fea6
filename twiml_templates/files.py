"""Writing a file all at once: the one atomic-write helper of the code base.

It lives in the lowest package (``twiml_templates`` imports neither ``crctl`` nor
``relay_server``) so that every layer can use it: the Serverless export here, crctl's state
file and API token file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644, replace: bool = True) -> bool:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    A reader (or a crash) never sees a half-written file. The folder is created if needed.

    Args:
        path: the file to write.
        data: its whole content.
        mode: the file's permissions, set before it appears under its name (``0o600`` keeps a
            secret from ever being readable by others).
        replace: ``False`` writes only if ``path`` does not exist yet (``os.link`` fails
            atomically when it does), so two processes racing to create it agree on one.

    Returns:
        Whether ``path`` now holds ``data`` (``False``: ``replace`` was off and it existed).

    Raises:
        OSError: the folder or the file cannot be written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, mode)
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)  # gone already after a replace
