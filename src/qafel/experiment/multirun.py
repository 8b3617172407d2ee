"""Hydra multirun (``python run.py -m ...``): every job runs, and the exit status reports the failed ones.

In a multirun, run.py's main raises ``JobFailed`` instead of exiting (a ``sys.exit`` would end the whole
multirun at the first bad job). ``JobStatusCallback`` (``hydra.callbacks`` in conf/config.yaml) writes each job's
outcome to ``job_status.json`` in the job's directory from ``on_job_end``, which Hydra calls in the process that
ran the job whatever the launcher (basic, joblib, submitit), and ``on_multirun_end`` reads them back: one line
per failed job (number, overrides, exit code, why), then the multirun exits with the failed jobs' exit code
(their common one, else 1).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

STATUS_FILE = "job_status.json"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


class JobFailed(Exception):
    """A multirun job that failed the way run.py reports with an exit code (bad input 2, diverged 3, ...)."""

    def __init__(self, exit_code: int, message: str = "") -> None:
        super().__init__(message or f"exit code {exit_code}")
        self.exit_code = exit_code
        self.message = message


def in_multirun() -> bool:
    """Whether the current Hydra job is part of a multirun."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def job_outcome(job_return: JobReturn) -> tuple[int, str]:
    """(exit code, one-line reason) of a finished job: 0 when it completed."""
    if job_return.status == JobStatus.COMPLETED:
        return 0, ""
    exc = job_return._return_value  # the exception; the public property would raise it
    if isinstance(exc, JobFailed):
        return exc.exit_code, exc.message
    return 1, f"{type(exc).__name__}: {exc}".splitlines()[0]


class JobStatusCallback(Callback):
    """Records every multirun job's outcome and reports the failed ones when the multirun ends."""

    def __init__(self) -> None:
        self.multirun_id: str | None = None
        self.started = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Tag this multirun: launchers that run jobs elsewhere carry the callback (and the tag) along."""
        self.multirun_id = uuid.uuid4().hex
        self.started = time.time()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """Write the job's status file; let the basic sweeper go on past a failed job (reported at the end)."""
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        code, message = job_outcome(job_return)
        job_dir = Path(config.hydra.runtime.output_dir)
        status = {"multirun": self.multirun_id, "job": int(config.hydra.job.num), "exit_code": code,
                  "message": message, "overrides": list(job_return.overrides or []), "time": time.time()}
        if code and not isinstance(job_return._return_value, JobFailed):  # a bug, not a reported failure
            text = "".join(traceback.format_exception(job_return._return_value))
            sys.stderr.write(text)
            (job_dir / "traceback.txt").write_text(text)
        write_status(job_dir, status)
        if code and config.hydra.sweeper.get("_target_") == BASIC_SWEEPER:
            # the basic sweeper raises the first failed job after its batch, before on_multirun_end could report
            job_return.status = JobStatus.COMPLETED
            job_return.return_value = None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Print one line per failed job of this multirun and exit with their exit code."""
        statuses = read_statuses(Path(config.hydra.sweep.dir), self.multirun_id, self.started)
        failed = [s for s in statuses if s["exit_code"]]
        if not failed:
            return
        shared = set.intersection(*(set(s["overrides"]) for s in statuses)) if len(statuses) > 1 else set()
        print(f"{len(failed)} of {len(statuses)} jobs failed:", file=sys.stderr)
        for s in failed:
            own = " ".join(o for o in s["overrides"] if o not in shared)  # what sets this job apart
            print(f"  job {s['job']} ({own}): exit {s['exit_code']}" + (f": {s['message']}" if s["message"] else ""),
                  file=sys.stderr)
        sys.exit(multirun_exit_code([s["exit_code"] for s in failed]))


def write_status(job_dir: Path, status: dict[str, Any]) -> None:
    """Write a job's ``job_status.json`` atomically (also for a job that ended without a result,
    qafel.sweep.cluster)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    tmp = job_dir / f"{STATUS_FILE}.tmp"
    tmp.write_text(json.dumps(status, indent=2) + "\n")
    os.replace(tmp, job_dir / STATUS_FILE)


def read_statuses(sweep_dir: Path, multirun_id: str | None, since: float) -> list[dict[str, Any]]:
    """The job status files this multirun wrote below ``sweep_dir`` (by its id; untagged ones by time), by job."""
    found = []
    for path in sweep_dir.rglob(STATUS_FILE):
        try:
            status = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        tag = status.get("multirun")
        if (tag == multirun_id) if tag else status.get("time", 0) >= since:
            found.append(status)
    return sorted(found, key=lambda s: s["job"])


def multirun_exit_code(codes: list[int]) -> int:
    """The failed jobs' common exit code, else 1."""
    return codes[0] if len(set(codes)) == 1 else 1
