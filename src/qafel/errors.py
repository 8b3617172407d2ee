"""Errors that stop a run with one clear line, each with the exit code ``run.py`` ends with.

Exit codes: 2 bad config value or data file (``ConfigError``, ``DataFileError``, ``DataFormatError``);
4 refused because of the run directory (``RunDirError``: ``RunDirExistsError``, ``CheckpointError``);
5 the output directory cannot be written (``OutputError``). ``Terminated`` and ``Preempted`` are signals, not errors.
"""

from __future__ import annotations

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_RUN_DIR = 4
EXIT_OUTPUT = 5


class QafelError(Exception):
    """Base of the errors shown as ``error: <message>``; ``exit_code`` is what ``run.py`` exits with."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(QafelError, ValueError):
    """A config value is missing, of the wrong type or out of range.

    The message always starts with the dotted config key, e.g.
    ``client_quantizer.bits=0: must be an integer >= 2``.
    """

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"{key}={value!r}: {allowed}")


class DataFileError(QafelError, FileNotFoundError):
    """A data file the run needs is absent; the message says where to put it."""


class DataFormatError(QafelError, ValueError):
    """A data file is there but unusable (corrupt, truncated, unsafe, labels or shapes wrong); the message
    starts with the file's path and says what is wrong."""


class RunDirError(QafelError):
    """The run directory refuses the run (exit 4): nothing in it was changed."""

    exit_code = EXIT_RUN_DIR


class RunDirExistsError(RunDirError):
    """The output directory already holds a run's records and no resume was asked for."""


class CheckpointError(RunDirError):
    """The checkpoint to resume is missing, corrupt, unsafe to load, or belongs to another config."""


class OutputError(QafelError):
    """A record could not be written (directory not writable, disk full); what was written before is kept."""

    exit_code = EXIT_OUTPUT


class Terminated(BaseException):
    """SIGTERM arrived (see ``qafel.signals``): like KeyboardInterrupt, not an Exception, so nothing swallows it."""


class Preempted(BaseException):
    """The cluster's preemption or time-limit signal arrived in a submitit job (``qafel.signals.preempt_on``): the
    run stopped after writing a checkpoint, and its job is requeued to continue from it (``qafel.sweep.cluster``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}: preempted or out of time")
        self.signum = signum
