"""Run records: metrics.jsonl and summary.json in the run directory, plus W&B (offline by default).

Tracking never stops a run: if W&B is missing or fails, we warn once and keep the local records.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from qafel.checkpoint import remove_quietly
from qafel.errors import OutputError
from qafel.signals import deferred_signals

# scheme://user:PASSWORD@host and libpq's password=PASSWORD
_PASSWORDS = re.compile(r"(?P<head>\b[A-Za-z][\w+.-]*://[^/\s:@]*:)[^@\s]+@|(?P<kv>\bpassword=)[^\s&;]+")


def hide_passwords(text: str) -> str:
    """The text with the password of every URL (``postgresql://user:***@host``) and ``password=`` hidden."""
    return _PASSWORDS.sub(lambda m: f"{m['head']}***@" if m["head"] else f"{m['kv']}***", text)


@contextmanager
def redacted_argv() -> Iterator[None]:
    """``sys.argv`` with passwords hidden while the block runs: ``wandb.init`` records the command line as the
    run's ``args`` (its metadata), and a ``--storage`` URL may hold one."""
    saved = list(sys.argv)
    sys.argv[:] = [hide_passwords(a) for a in saved]
    try:
        yield
    finally:
        sys.argv[:] = saved


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


class RunRecorder:
    """Writes one JSON line per evaluation to ``metrics.jsonl`` and the final ``summary.json``.

    A write that fails (directory not writable, disk full) raises an OutputError naming the file; the lines
    written before it stay in the file.
    """

    def __init__(self, run_dir: Path, history: list[Mapping[str, Any]] | None = None) -> None:
        """Start ``metrics.jsonl`` afresh, with ``history`` (a resumed run's records so far) written first."""
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.summary_path = self.run_dir / "summary.json"
        with _writing(self.metrics_path):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.metrics_path, "w")  # noqa: SIM115 - kept open for the run's lifetime
        for record in history or []:
            self.log(record)

    def log(self, record: Mapping[str, Any]) -> None:
        """Append one evaluation record (flushed at once, so a killed run keeps what it logged)."""
        with _writing(self.metrics_path):
            self._fh.write(json.dumps(_jsonable(dict(record))) + "\n")
            self._fh.flush()

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Write summary.json atomically (a failed write leaves no temporary file behind)."""
        tmp = self.summary_path.with_suffix(".json.tmp")
        with _writing(self.summary_path), deferred_signals():
            try:
                tmp.write_text(json.dumps(_jsonable(dict(summary)), indent=2) + "\n")
                os.replace(tmp, self.summary_path)
            except BaseException:
                remove_quietly(tmp)
                raise

    def close(self) -> None:
        """Close the metrics file (a failing final flush is ignored: every line was flushed when logged)."""
        with suppress(OSError):
            self._fh.close()


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn an OSError while writing ``path`` into a one-line OutputError."""
    try:
        yield
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc}); the records written so far are kept") \
            from None


class WandbTracker:
    """Logs the same metrics to W&B. Offline unless configured otherwise; any failure only warns."""

    def __init__(self, cfg: Mapping[str, Any], config: dict[str, Any], run_dir: Path) -> None:
        self.run = None
        try:
            import wandb

            mode = os.environ.get("WANDB_MODE", cfg.get("mode", "offline"))
            with redacted_argv():
                self.run = wandb.init(project=cfg.get("project", "qafel"), entity=cfg.get("entity"),
                                      group=cfg.get("group"), name=cfg.get("name"), tags=list(cfg.get("tags") or []),
                                      config=config, dir=str(run_dir), mode=mode, reinit="finish_previous",
                                      settings=wandb.Settings(silent=True, init_timeout=60))
        except Exception as exc:  # noqa: BLE001 - tracking must never stop a run
            warnings.warn(f"W&B tracking disabled ({type(exc).__name__}: {exc}); local records are kept",
                          stacklevel=2)
            self.run = None

    def log(self, record: Mapping[str, Any]) -> None:
        """Log one evaluation record at its server step."""
        if self.run is None:
            return
        try:
            self.run.log({k: v for k, v in record.items() if isinstance(v, int | float)},
                         step=int(record["server_step"]))
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"W&B log failed ({exc}); further W&B logging disabled", stacklevel=2)
            self.run = None

    def finish(self, summary: Mapping[str, Any]) -> None:
        """Store the summary and close the run."""
        if self.run is None:
            return
        try:
            for key, value in summary.items():
                if isinstance(value, int | float | str) or value is None:
                    self.run.summary[key] = value
            self.run.finish()
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"W&B finish failed ({exc})", stacklevel=2)
        self.run = None


def make_tracker(cfg: Mapping[str, Any], config: dict[str, Any], run_dir: Path) -> WandbTracker | None:
    """The configured tracker (None for ``tracking=none`` or mode disabled)."""
    if cfg.get("backend", "none") != "wandb" or cfg.get("mode") == "disabled":
        return None
    return WandbTracker(cfg, config, run_dir)
