"""Job events for listeners of the platform (:meth:`Platform.subscribe`): one bounded queue
per listener, fed by the service's job listeners."""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import Any

__all__ = ["Subscription"]


class Subscription:
    """Job events for one listener (:meth:`Platform.subscribe`); use as a context manager or
    call :meth:`close`. At most ``size`` events wait: when a slow listener falls that far
    behind the oldest are dropped and ``dropped`` counts them."""

    def __init__(self, platform: Any, size: int) -> None:
        self._platform = platform
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(size)
        self._wake: Callable[[], None] | None = None
        self.dropped = 0

    def on_event(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` (from the thread that publishes) after each event is queued: an
        asyncio listener sets its event with ``loop.call_soon_threadsafe`` instead of holding
        a thread in :meth:`get`."""
        self._wake = wake

    def put(self, event: dict[str, Any]) -> None:
        while True:
            try:
                self._queue.put_nowait(event)
                break
            except queue.Full:
                try:
                    self._queue.get_nowait()
                    self.dropped += 1
                except queue.Empty:
                    pass
        if self._wake is not None:
            try:
                self._wake()
            except RuntimeError:  # its event loop is closed: nobody listens any more
                self._wake = None

    def poll(self) -> dict[str, Any] | None:
        """The next event if one is queued, else None at once."""
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None

    def get(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next event, or None if none came within ``timeout`` seconds."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self._platform._unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
