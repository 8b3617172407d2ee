"""Offline W&B logs read back, for comparing what W&B would show with a run's local records.

A ``.wandb`` file is read with ``qafel.experiment.wandb_runs.read_wandb_log`` (W&B's protobuf Records) and folded
the way
W&B folds them: config and summary updates in order, the run record's last tags, one history row per record.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qafel.experiment.tracking import offline_runs
from qafel.experiment.wandb_runs import read_wandb_log

#: History and summary keys W&B adds itself.
OWN_KEYS = ("_runtime", "_timestamp", "_step", "_wandb")


def _value(item: Any) -> Any:
    """An item's value: its JSON, else (history items) its typed field."""
    if item.value_json:
        return json.loads(item.value_json)
    kind = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    return None if kind in (None, "none") else getattr(item, kind)


def _set(target: dict[str, Any], item: Any) -> None:
    path = list(item.nested_key) or [item.key]
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = _value(item)


@dataclass
class WandbLog:
    """One offline run's log, folded."""

    path: Path
    records: list[Any]
    run_id: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    metrics: list[Any] = field(default_factory=list)
    artifacts: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    exit_code: int | None = None
    order: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path, wait_s: float = 3.0) -> WandbLog:
        """Fold the records of ``path``; a log without its exit record is read again for up to ``wait_s`` seconds
        (W&B's process closes an offline log a few milliseconds after ``finish()`` returns)."""
        deadline = time.monotonic() + wait_s
        records = read_wandb_log(path)
        while not any(r.WhichOneof("record_type") == "exit" for r in records) and time.monotonic() < deadline:
            time.sleep(0.05)
            records = read_wandb_log(path)
        log = cls(Path(path), records)
        for r in log.records:
            kind = r.WhichOneof("record_type")
            log.order.append(kind)
            if kind == "run":
                log.run_id, log.name, log.group, log.job_type = (r.run.run_id, r.run.display_name, r.run.run_group,
                                                                  r.run.job_type)
                log.tags = list(r.run.tags)
                for item in r.run.config.update:
                    _set(log.config, item)
            elif kind == "config":
                for item in r.config.update:
                    _set(log.config, item)
            elif kind == "summary":
                for item in r.summary.update:
                    _set(log.summary, item)
                for item in r.summary.remove:
                    log.summary.pop(item.key, None)
            elif kind == "history":
                row: dict[str, Any] = {}
                for item in r.history.item:
                    _set(row, item)
                log.steps.append(r.history.step.num)
                log.history.append({k: v for k, v in row.items() if k not in OWN_KEYS})
            elif kind == "metric":
                log.metrics.append(r.metric)
            elif kind == "artifact":
                log.artifacts[r.artifact.name] = (r.artifact.type, sorted(c.path for c in r.artifact.manifest.contents))
            elif kind == "exit":
                log.exit_code = r.exit.exit_code
        log.config.pop("_wandb", None)
        return log

    def metric(self, name: str) -> Any:
        """The definition of metric ``name`` (or glob), None when there is none."""
        return next((m for m in self.metrics if name in (m.name, m.glob_name)), None)

    def own_summary(self) -> dict[str, Any]:
        """The summary without W&B's own keys."""
        return {k: v for k, v in self.summary.items() if k not in OWN_KEYS}

    def summary_after_history(self) -> bool:
        """Whether the last summary update comes after the last history row (no row overwrites the summary)."""
        last_history = max((i for i, k in enumerate(self.order) if k == "history"), default=-1)
        updates = [i for i, r in enumerate(self.records) if self.order[i] == "summary"
                   and any(not (list(it.nested_key) or [it.key])[0].startswith("_") for it in r.summary.update)]
        return bool(updates) and max(updates) > last_history


def live_logs(root: Path) -> dict[str, WandbLog]:
    """The offline W&B logs in ``root/wandb`` that ``wandb sync`` would upload, by W&B run id."""
    logs = [WandbLog.read(next(folder.glob("run-*.wandb"))) for folder in offline_runs(root)]
    by_id = {log.run_id: log for log in logs}
    assert len(by_id) == len(logs), f"two live offline logs of one run in {root}/wandb"
    return by_id


def superseded(root: Path) -> list[Path]:
    """The superseded offline run folders in ``root/wandb/superseded``."""
    return sorted((Path(root) / "wandb" / "superseded").glob("offline-run-*"))
