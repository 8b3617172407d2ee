"""Reliability: checkpoint and resume (also after SIGKILL), divergence, determinism across batch layouts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import FAST, REPO, compose_cfg

from qafel.api import make_engine, run_experiment, setup_run
from qafel.checkpoint import load_checkpoint

SETTING = ("dataset.num_clients=20", "run.server_steps=60", "run.eval_every=10", "run.checkpoint_every=20",
           "timing.rate=10", "client.local_steps=2")
WALL_CLOCK = {"wall_time_s", "run_dir", "resumed"}


def records(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in lines]


def summary(run_dir):
    data = json.loads((run_dir / "summary.json").read_text())
    return {k: v for k, v in data.items() if k not in WALL_CLOCK}


class Crash(Exception):
    pass


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path):
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    run_experiment(compose_cfg(*FAST, *SETTING), full)

    def crash_at_50(record):
        if record["server_step"] == 50:
            raise Crash

    with pytest.raises(Crash):
        run_experiment(compose_cfg(*FAST, *SETTING), crashed, on_eval=crash_at_50)
    assert load_checkpoint(crashed / "checkpoint.pt")["engine"]["server_step"] == 40
    resumed = run_experiment(compose_cfg(*FAST, *SETTING), crashed, resume=True)
    assert resumed["resumed"] is True
    assert records(crashed) == records(full)
    assert summary(crashed) == summary(full)


@pytest.mark.parametrize("algorithm", ["naive", "fedbuff", "qafel-closed-loop", "naive-closed-loop"])
def test_resume_restores_every_algorithms_state(tmp_path, algorithm):
    extra = {"naive": ("algorithm=naive", "client_quantizer=qsgd", "server_quantizer=topk"),
             "fedbuff": ("algorithm=fedbuff", "server.optimizer=adam", "server.lr=0.01"),
             # a checkpoint is taken right after a server step, before the restart owed to its last arrival
             "qafel-closed-loop": ("timing=closed_loop", "timing.concurrency=8"),
             "naive-closed-loop": ("algorithm=naive", "timing=closed_loop", "timing.concurrency=8")}[algorithm]
    setting = [o for o in SETTING if not o.startswith("timing.")] if "closed" in algorithm else SETTING
    cfg = (*FAST, *setting, *extra, "run.checkpoint_every=10")
    run_experiment(compose_cfg(*cfg), tmp_path / "full")

    def crash(record):
        if record["server_step"] == 30:
            raise Crash

    with pytest.raises(Crash):
        run_experiment(compose_cfg(*cfg), tmp_path / "part", on_eval=crash)
    run_experiment(compose_cfg(*cfg), tmp_path / "part", resume=True)
    assert records(tmp_path / "part") == records(tmp_path / "full")


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    overrides = ["tracking=none", "run.progress=false", "dataset.num_clients=20", "run.server_steps=400",
                 "run.eval_every=20", "run.checkpoint_every=20", "timing.rate=10", "client.local_steps=2"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    killed, full = tmp_path / "killed", tmp_path / "full"
    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), f"hydra.run.dir={killed}", *overrides],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint.pt").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    done = subprocess.run([sys.executable, str(REPO / "run.py"), f"resume={killed}", "run.progress=false"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    subprocess.run([sys.executable, str(REPO / "run.py"), f"hydra.run.dir={full}", *overrides], cwd=REPO, env=env,
                   check=True, capture_output=True, timeout=600)
    assert records(killed) == records(full)
    assert summary(killed) == summary(full)


def test_resume_true_finds_the_latest_run_with_this_config(tmp_path):
    overrides = ["tracking=none", "run.progress=false", "run.server_steps=20", "run.eval_every=10",
                 "dataset.num_clients=10"]
    first = tmp_path / "2026-01-01" / "10-00-00"
    subprocess.run([sys.executable, str(REPO / "run.py"), f"hydra.run.dir={first}", *overrides], cwd=REPO,
                   check=True, capture_output=True, timeout=600)
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), f"hydra.run.dir={tmp_path / '2026-01-01' / '11'}",
                           "resume=true", *overrides], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert str(first) in proc.stdout
    other = subprocess.run([sys.executable, str(REPO / "run.py"), f"hydra.run.dir={tmp_path / 'x' / 'y'}",
                            "resume=true", "seed=9", *overrides], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert other.returncode == 2 and "error: resume=True" in other.stderr


def test_divergence_ends_the_run_with_status_diverged(tmp_path):
    result = run_experiment(compose_cfg(*FAST, "client.lr=1e6", "server.lr=1e6", "run.server_steps=50",
                                        "run.eval_every=5"), tmp_path)
    assert result["status"] == "diverged"
    assert result["diverged_at_step"] is not None and result["server_steps"] < 50
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["status"] == "diverged"
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) >= 2


def test_cli_exit_code_for_divergence(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), f"hydra.run.dir={tmp_path}", "tracking=none",
                           "run.progress=false", "client.lr=1e6", "server.lr=1e6", "run.server_steps=50"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3
    assert "diverged" in proc.stderr


@pytest.mark.parametrize("model", ["mlp", "logreg"])
def test_results_do_not_depend_on_the_batch_layout(model):
    xs = []
    for client_batch in (1, 3, 256):
        s = setup_run(compose_cfg(*FAST, *SETTING, "run.server_steps=30", f"model={model}",
                                  f"run.client_batch={client_batch}"))
        engine = make_engine(s)
        engine.run()
        xs.append(engine.x)
    assert torch.equal(xs[0], xs[1]) and torch.equal(xs[0], xs[2])
