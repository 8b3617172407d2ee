"""The public Python API: ``qafel.compose`` and ``qafel.run`` (lazy: ``import qafel`` imports nothing heavy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF, FAST, REPO

import qafel

SMALL = [*FAST, "run.server_steps=10", "run.eval_every=5"]


def test_import_qafel_is_cheap():
    code = ("import sys, qafel; heavy = [m for m in ('torch', 'hydra', 'optuna', 'wandb', 'matplotlib', 'qafel.sim',"
            " 'qafel.experiment') if m in sys.modules]; print(heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_the_public_names_resolve_and_unknown_ones_fail():
    from qafel.experiment.compose import compose, config_dir
    from qafel.experiment.runner import run_experiment
    from qafel.report import write_report

    assert qafel.compose is compose and qafel.config_dir is config_dir
    assert qafel.run_experiment is run_experiment and qafel.write_report is write_report
    assert qafel.config_dir().resolve() == CONF.resolve()
    assert {"compose", "run", "run_experiment", "write_report"} <= set(dir(qafel))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        qafel.nope  # noqa: B018


def test_run_returns_the_summary_and_the_metrics_table(tmp_path: Path):
    cfg = qafel.compose(SMALL)
    result = qafel.run(cfg, tmp_path / "run")
    assert result.run_dir == tmp_path / "run"
    assert result.summary == json.loads((tmp_path / "run" / "summary.json").read_text())
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert result.metrics == [json.loads(line) for line in lines] and len(result.metrics) >= 2
    assert result.column("server_step")[-1] == 10
    assert result.summary["final_accuracy"] == result.metrics[-1]["accuracy"]


def test_run_takes_overrides_and_works_from_any_directory(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not tmp_path.resolve().is_relative_to(REPO.resolve())
    a = qafel.run(SMALL, "a")
    b = qafel.run(qafel.compose(SMALL), "b")
    assert a.summary["final_accuracy"] == b.summary["final_accuracy"] and a.summary["bytes_up"] == b.summary["bytes_up"]
    with pytest.raises(TypeError, match="list of overrides"):
        qafel.run("run.server_steps=10")
