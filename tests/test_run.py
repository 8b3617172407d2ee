"""End to end: run.py as a user runs it, the paper's LR setting, run records, W&B offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import FAST, REPO, compose_cfg

from qafel.experiment.runner import run_experiment

SUMMARY_KEYS = {"status", "final_accuracy", "final_loss", "server_steps", "uploads", "bytes_up", "bytes_broadcast",
                "bytes_up_fp32_equivalent", "bytes_broadcast_fp32_equivalent", "message_bytes_up",
                "message_bytes_broadcast", "num_parameters", "uploads_to_target", "mean_staleness",
                "mean_concurrency", "wall_time_s"}
METRIC_KEYS = {"server_step", "uploads", "sim_time", "accuracy", "loss", "bytes_up", "bytes_broadcast",
               "mean_staleness", "hidden_state_error"}


def run_cli(*args: str, cwd=None, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env_extra or {})}
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env=env, timeout=600)


def test_default_run_finishes_reaches_85_percent_and_prints_a_summary(tmp_path):
    proc = run_cli(f"hydra.run.dir={tmp_path}", "tracking=none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) >= SUMMARY_KEYS
    assert summary["status"] == "completed"
    assert summary["algorithm"] == "qafel"
    assert summary["final_accuracy"] >= 0.85
    assert summary["reduction_vs_fedbuff"] > 4
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) >= 2 and set(lines[-1]) >= METRIC_KEYS
    assert [r["server_step"] for r in lines] == sorted(r["server_step"] for r in lines)
    for word in ("final accuracy", "uploads", "server steps", "bytes uploaded", "bytes broadcast", "fewer bytes"):
        assert word in proc.stdout
    assert "server steps" in proc.stderr  # the progress bar


def test_cli_reports_bad_values_in_one_line(tmp_path):
    proc = run_cli(f"hydra.run.dir={tmp_path}", "tracking=none", "algorithm.buffer_size=0")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: algorithm.buffer_size=0")


def test_cli_reports_missing_data_file(tmp_path):
    proc = run_cli(f"hydra.run.dir={tmp_path}", "tracking=none", "experiment=paper_logreg",
                   f"paths.data_root={tmp_path / 'nowhere'}")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "mushrooms.libsvm" in last and "nowhere" in last


def test_paper_logreg_reports_suboptimality(tmp_path, mushrooms_root):
    cfg = compose_cfg(*FAST, "experiment=paper_logreg", f"paths.data_root={mushrooms_root}",
                      "run.server_steps=300", "run.eval_every=50")
    summary = run_experiment(cfg, tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    gaps = [r["suboptimality"] for r in lines]
    assert all(g >= -1e-9 for g in gaps)
    assert gaps[-1] < gaps[0] / 10
    assert summary["suboptimality"] == gaps[-1]
    assert summary["num_parameters"] == 113
    assert summary["f_star"] == pytest.approx(summary["train_objective"] - summary["suboptimality"])
    assert summary["mean_concurrency"] == pytest.approx(100, abs=1e-6)


def test_f_star_is_the_optimum_of_the_regularised_loss(mushrooms_root):
    from qafel.experiment.runner import setup_run

    s = setup_run(compose_cfg(*FAST, "experiment=paper_logreg", f"paths.data_root={mushrooms_root}"))
    from qafel.models.optimum import solve_optimum

    f_star, w_star = solve_optimum(s.model, s.data.X, s.data.y)
    w = torch.tensor(w_star, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(s.model.loss(w, s.data.X.double(), s.data.y), w)
    assert float(g.norm()) < 1e-6
    assert f_star == pytest.approx(s.f_star)
    rng = np.random.default_rng(0)
    for _ in range(3):  # any perturbation is worse
        wp = torch.tensor(w_star + 1e-2 * rng.standard_normal(len(w_star)))
        assert float(s.model.loss(wp, s.data.X.double(), s.data.y)) > f_star


def test_wandb_offline_logs_the_run(tmp_path):
    cfg = compose_cfg("run.progress=false", "tracking=wandb", "tracking.mode=offline", "run.server_steps=10",
                      "run.eval_every=5")
    summary = run_experiment(cfg, tmp_path)
    assert summary["status"] == "completed"
    assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline W&B run directory"


def test_wandb_failure_never_stops_a_run(tmp_path, monkeypatch):
    import wandb

    def broken_init(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", broken_init)
    cfg = compose_cfg("run.progress=false", "tracking=wandb", "run.server_steps=10", "run.eval_every=5")
    with pytest.warns(UserWarning, match="W&B tracking disabled"):
        summary = run_experiment(cfg, tmp_path)
    assert summary["status"] == "completed"
    assert (tmp_path / "summary.json").is_file()


def test_tracking_none_and_summary_matches_file(tmp_path):
    summary = run_experiment(compose_cfg(*FAST, "run.server_steps=10", "run.eval_every=5"), tmp_path)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["bytes_up"] == summary["bytes_up"] and on_disk["uploads"] == summary["uploads"]
    assert not (tmp_path / "wandb").exists()
