"""The lifecycle the fake servers share: an asyncio server in a daemon thread of its own.

A subclass implements ``async _main(ready)``: it sets ``_loop`` and ``_stop_event``, serves,
sets ``ready`` once listening, and returns when ``_stop_event`` is set. A failure to start is
stored for :meth:`start` to raise.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from types import TracebackType
from typing import Self


class BackgroundServer:
    """``start()``/``stop()`` and ``with`` for a server running in its own thread."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._start_error: BaseException | None = None

    async def _main(self, ready: threading.Event) -> None:
        raise NotImplementedError

    def _run(self, ready: threading.Event) -> None:
        try:
            asyncio.run(self._main(ready))
        except BaseException as exc:  # reported to start()
            self._start_error = exc
        finally:
            ready.set()

    def _starting(self) -> None:
        """Reset per-run state before the thread starts (a hook)."""

    def _stopping_now(self) -> None:
        """Called before the stop is requested (a hook)."""

    def start(self) -> Self:
        """Start serving; returns once listening."""
        name = type(self).__name__
        if self._thread is not None:
            raise RuntimeError(f"{name} already started")
        ready = threading.Event()
        self._start_error = None
        self._starting()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(10) or self._start_error is not None:
            self.stop()
            raise RuntimeError(f"{name} failed to start") from self._start_error
        return self

    def stop(self) -> None:
        """Stop serving and join the thread (idempotent)."""
        thread, loop, event = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        self._stopping_now()
        if loop is not None and event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(event.set)
        thread.join(timeout=10)
        self._thread = self._loop = self._stop_event = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
