"""The small Python API for notebooks and scripts: ``qafel.compose(overrides)`` and ``qafel.run(cfg_or_overrides)``.

    import qafel
    result = qafel.run(["model=mlp", "run.server_steps=20", "tracking=none"], "outputs/mlp")
    result.summary["final_accuracy"], result.metrics[-1]["accuracy"]    # metrics: one dict per evaluation

Configs are composed from the installed package's ``conf/`` (:func:`qafel.config_dir`), so a notebook or script
works from any directory. ``run`` is the same run function as ``run.py`` and the sweeps (``run_experiment``); the
run directory keeps the records (``config.yaml``, ``metrics.jsonl``, ``summary.json``), which are the truth.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from qafel.experiment.compose import compose, config_dir

__all__ = ["RunResult", "compose", "config_dir", "read_metrics", "run"]


@dataclass
class RunResult:
    """What :func:`run` returns: the summary (as ``summary.json`` holds it), the metrics table (one dict per
    evaluation, as ``metrics.jsonl`` holds them, in order) and the run directory."""

    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    run_dir: Path

    def column(self, key: str) -> list[Any]:
        """One column of the metrics table (None where a record lacks the key)."""
        return [row.get(key) for row in self.metrics]


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` as a list of dicts (a torn last line, from a killed run, skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
    return rows


def run(cfg_or_overrides: DictConfig | Sequence[str] = (), output_dir: str | Path | None = None,
        **kwargs: Any) -> RunResult:
    """Run one experiment from a composed config or from Hydra overrides (composed as ``run.py`` would).

    ``output_dir``: the run directory (default: ``paths.output_dir`` of the config, else a new
    ``outputs/runs/<date>_<time>_<id>`` below the working directory). Other keyword arguments go to
    :func:`qafel.experiment.runner.run_experiment` (``on_eval``, ``resume``, ...).
    """
    from qafel.experiment.runner import run_experiment

    if isinstance(cfg_or_overrides, str):
        raise TypeError("qafel.run: give a config or a list of overrides, not a string")
    cfg = cfg_or_overrides if isinstance(cfg_or_overrides, DictConfig) else compose(list(cfg_or_overrides))
    if output_dir is None:
        chosen = (cfg.get("paths") or {}).get("output_dir")
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        output_dir = chosen or Path("outputs") / "runs" / f"{stamp}_{uuid.uuid4().hex[:8]}"
    summary = run_experiment(cfg, output_dir, **kwargs)
    return RunResult(summary=dict(summary), metrics=read_metrics(output_dir), run_dir=Path(output_dir))
