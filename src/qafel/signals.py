"""SIGTERM and SIGINT as exceptions that wait for a checkpoint or summary being written to be complete.

torch writes a checkpoint from C++; an exception raised inside it by a signal handler comes out as an
unrelated RuntimeError. So while ``deferred_signals()`` is active a signal is only noted, and raised when the
block ends: the file being written is then whole (or removed), never half-written.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

from qafel.errors import Terminated

_state = {"depth": 0, "pending": 0}


def _raise(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def _handler(signum: int, frame: object) -> None:
    if _state["depth"]:
        _state["pending"] = signum
        return
    _raise(signum)


def stop_on_signals() -> None:
    """Make SIGTERM raise Terminated and SIGINT KeyboardInterrupt in the main thread (deferred inside
    ``deferred_signals``), so that a stopped run closes its files and removes its temporary files."""
    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold back SIGTERM and SIGINT (if ``stop_on_signals`` installed the handlers) until the block ends."""
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        if not _state["depth"] and _state["pending"]:
            signum, _state["pending"] = _state["pending"], 0
            _raise(signum)
