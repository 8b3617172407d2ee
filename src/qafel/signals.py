"""SIGTERM, SIGINT and a cluster's preemption signal as exceptions that wait for a file being written to be complete.

torch writes a checkpoint from C++; an exception raised inside it by a signal handler comes out as an
unrelated RuntimeError. So while ``deferred_signals()`` is active a signal is only noted, and raised when the
block ends: the file being written is then whole (or removed), never half-written.

In a submitit job (``qafel.sweep.cluster``) the preemption / time-limit signal (SIGUSR2) raises ``Preempted``. While a
run
is inside ``checkpointing_run()`` it is not raised at once: the engine writes a checkpoint after its current server
step (``preemption_requested``), and ``stop_if_preempted`` raises it once that checkpoint is on disk, so a requeued
job loses no finished server step. If no server step ends within ``PREEMPT_GRACE_S`` it is raised anyway (the
last periodic checkpoint is then the one resumed).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from qafel.errors import Preempted, Terminated

PREEMPT_GRACE_S = 30.0  # SLURM sends the signal signal_delay_s (120 s in conf/hydra/launcher) before the kill

_state: dict[str, Any] = {"depth": 0, "pending": 0, "preempt": 0, "runs": 0, "asked": False, "timer": None}


def _raise(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    if signum == _state["preempt"]:
        _cancel_timer()
        raise Preempted(signum)
    raise Terminated(signum)


def _deliver(signum: int) -> None:
    if signum == _state["preempt"] and _state["runs"] and not _state["asked"]:
        _state["asked"] = True  # the engine checkpoints after this server step; then stop_if_preempted raises
        timer = threading.Timer(PREEMPT_GRACE_S, os.kill, (os.getpid(), signum))  # a second signal raises at once
        timer.daemon = True
        timer.start()
        _state["timer"] = timer
        return
    _raise(signum)


def _handler(signum: int, frame: object) -> None:
    if _state["depth"]:
        _state["pending"] = signum
        return
    _deliver(signum)


def _cancel_timer() -> None:
    timer, _state["timer"] = _state["timer"], None
    if timer is not None:
        timer.cancel()


def stop_on_signals() -> None:
    """Make SIGTERM raise Terminated and SIGINT KeyboardInterrupt in the main thread (deferred inside
    ``deferred_signals``), so that a stopped run closes its files and removes its temporary files.

    In a submitit job (after ``preempt_on``) SIGTERM stays with submitit, which ignores it: SLURM sends it before
    killing a job it preempts and requeues by itself, and the job, started again, continues from its checkpoint."""
    if not _state["preempt"]:
        signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)


def preempt_on(signum: int) -> Any:
    """Make ``signum`` (a cluster's preemption and time-limit signal) raise ``Preempted`` as described in the module
    docstring; returns the handler it replaces."""
    _state["preempt"] = signum
    return signal.signal(signum, _handler)


def preempt_off(signum: int, handler: Any) -> None:
    """Undo ``preempt_on``: ``handler`` takes ``signum`` again."""
    _state["preempt"] = 0
    signal.signal(signum, handler)


def preemption_requested() -> bool:
    """Whether a preemption signal asks the running engine for a checkpoint now."""
    return bool(_state["asked"])


def stop_if_preempted() -> None:
    """Raise ``Preempted`` if a preemption signal was waiting for the checkpoint just written."""
    if _state["asked"]:
        _state["asked"] = False
        _raise(_state["preempt"])


@contextmanager
def checkpointing_run() -> Iterator[None]:
    """A run that writes checkpoints: a preemption signal waits for its next checkpoint (see the module docstring)."""
    _state["runs"] += 1
    try:
        yield
    finally:
        _state["runs"] -= 1
        if not _state["runs"]:  # the run ended before its next checkpoint (done, or failed): nothing to wait for
            _state["asked"] = False
            _cancel_timer()


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold back SIGTERM, SIGINT and the preemption signal (where handled here) until the block ends."""
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        if not _state["depth"] and _state["pending"]:
            signum, _state["pending"] = _state["pending"], 0
            _deliver(signum)
