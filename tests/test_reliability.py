"""Reliability: checkpoint and resume (also after SIGKILL and SIGTERM), safe checkpoint loading, refused run
directories, divergence, determinism across batch layouts."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import FAST, REPO, compose_cfg

import qafel.experiment.checkpoint
from qafel.errors import CheckpointError, RunDirExistsError, Terminated
from qafel.experiment.checkpoint import find_resume_dir, load_checkpoint, save_checkpoint
from qafel.experiment.config import validate
from qafel.experiment.runner import make_engine, refuse_existing_run_dir, run_experiment, setup_run
from qafel.signals import stop_on_signals

SETTING = ("dataset.num_clients=20", "run.server_steps=60", "run.eval_every=10", "run.checkpoint_every=20",
           "timing.rate=10", "client.local_steps=2")
WALL_CLOCK = {"wall_time_s", "run_dir", "resumed", "run_id"}


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
    assert other.returncode == 4 and "error: resume=True" in other.stderr


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


# ------------------------------------------------------------------------- interrupted writes, run directories
@pytest.mark.slow  # two runs, one through run.py
def test_sigterm_stops_with_one_line_and_leaves_no_temporary_file(tmp_path):
    overrides = ["tracking=none", "run.progress=false", "dataset.num_clients=20", "run.server_steps=400",
                 "run.eval_every=20", "run.checkpoint_every=5", "timing.rate=10", "client.local_steps=2"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), f"hydra.run.dir={run_dir}", *overrides],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run_dir / "checkpoint.pt").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-2000:]
    assert stderr.strip().splitlines() == [f"error: stopped by SIGTERM; the records so far and the last checkpoint "
                                           f"are in {run_dir} (continue with resume={run_dir})"]
    assert not (run_dir / "checkpoint.pt.tmp").exists() and not (run_dir / "summary.json").exists()
    step = load_checkpoint(run_dir / "checkpoint.pt")["engine"]["server_step"]
    assert 1 <= step < 400
    done = subprocess.run([sys.executable, str(REPO / "run.py"), f"resume={run_dir}", "run.progress=false",
                           f"hydra.run.dir={tmp_path / 'hydra'}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    run_experiment(compose_cfg(*overrides, "run.checkpoint_every=0"), tmp_path / "full")
    assert records(run_dir) == records(tmp_path / "full")
    assert summary(run_dir) == summary(tmp_path / "full")


def test_a_signal_during_a_checkpoint_write_waits_for_it(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    real_save = torch.save

    def save_then_signal(obj, f):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while torch writes
        real_save(obj, f)

    monkeypatch.setattr(qafel.experiment.checkpoint.torch, "save", save_then_signal)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    stop_on_signals()
    try:
        with pytest.raises(Terminated):
            save_checkpoint(path, {"server_step": 7, "x": torch.arange(5.0)}, compose_cfg(*FAST))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert load_checkpoint(path)["engine"]["server_step"] == 7  # complete
    assert not (tmp_path / "checkpoint.pt.tmp").exists()


def test_an_exception_while_saving_removes_the_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"server_step": 1}, compose_cfg(*FAST))
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(qafel.experiment.checkpoint.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"server_step": 2}, compose_cfg(*FAST))
    assert path.read_bytes() == before and not (tmp_path / "checkpoint.pt.tmp").exists()


def test_resume_removes_a_temporary_file_left_by_sigkill(tmp_path):
    def crash(record):
        if record["server_step"] == 30:
            raise Crash

    with pytest.raises(Crash):
        run_experiment(compose_cfg(*FAST, *SETTING), tmp_path, on_eval=crash)
    (tmp_path / "checkpoint.pt.tmp").write_bytes(b"half a checkpoint")
    run_experiment(compose_cfg(*FAST, *SETTING), tmp_path, resume=True)
    assert not (tmp_path / "checkpoint.pt.tmp").exists()


def test_checkpoints_load_without_unpickling_any_class(tmp_path):
    cfg = (*FAST, *SETTING, "run.server_steps=20", "run.codec=wire", "algorithm.hidden_state_replicas=2")
    run_experiment(compose_cfg(*cfg), tmp_path)
    data = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    engine = data["engine"]
    assert engine["jobs"] and isinstance(engine["jobs"][0]["payload"], bytes)
    assert isinstance(engine["c"]["staleness_hist"], dict) and isinstance(engine["versions"], list)


def test_a_crafted_checkpoint_is_refused_in_process(tmp_path):
    marker = tmp_path / "MARKER"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        (tmp_path / "checkpoint.pt").write_bytes(pickle.dumps({"engine": Evil()}, protocol=protocol))
        with pytest.raises(CheckpointError, match=r"checkpoint\.pt: refused: it holds more than") as info:
            load_checkpoint(tmp_path / "checkpoint.pt")
        assert "\n" not in str(info.value)
    torch.save({"engine": {"x": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a qafel checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    assert not marker.exists()


def test_a_new_run_refuses_a_directory_with_records(tmp_path):
    run_experiment(compose_cfg(*FAST, "run.server_steps=10", "run.eval_every=5"), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(RunDirExistsError, match=f"^{tmp_path}: already holds a run"):
        run_experiment(compose_cfg(*FAST, "run.server_steps=20"), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_a_directory_with_records_but_no_checkpoint_is_refused_too(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"server_step": 0}\n')
    with pytest.raises(RunDirExistsError, match=r"\(metrics\.jsonl\); it has no checkpoint to resume: choose"):
        refuse_existing_run_dir(tmp_path)
    refuse_existing_run_dir(tmp_path / "fresh")  # a directory without records (or none yet) is fine


def test_config_and_summary_share_the_run_id_across_a_resume(tmp_path):
    def crash(record):
        if record["server_step"] == 50:
            raise Crash

    with pytest.raises(Crash):
        run_experiment(compose_cfg(*FAST, *SETTING), tmp_path, on_eval=crash)
    first = yaml.safe_load((tmp_path / "config.yaml").read_text())["run_id"]
    resumed = run_experiment(compose_cfg(*FAST, *SETTING), tmp_path, resume=True)
    assert resumed["run_id"] == first == yaml.safe_load((tmp_path / "config.yaml").read_text())["run_id"]
    assert json.loads((tmp_path / "summary.json").read_text())["run_id"] == first


def test_resume_refuses_a_config_that_differs_from_the_checkpoints(tmp_path):
    run_experiment(compose_cfg(*FAST, *SETTING, "run.server_steps=20"), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(CheckpointError, match=r"the config to resume with differs from the config saved in the "
                                              r"checkpoint at server\.lr "):
        run_experiment(compose_cfg(*FAST, *SETTING, "run.server_steps=20", "server.lr=0.5"), tmp_path, resume=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_resume_true_skips_other_users_and_unreadable_runs(tmp_path, monkeypatch):
    cfg = validate(compose_cfg(*FAST, "run.server_steps=10", "run.eval_every=5"))
    mine = tmp_path / "2026-01-01" / "10-00-00"
    run_experiment(cfg, mine)
    broken = tmp_path / "2026-01-01" / "11-00-00"
    shutil.copytree(mine, broken)
    (broken / "config.yaml").write_text("{not: yaml: at all")
    here = tmp_path / "2026-01-02" / "09-00-00"
    assert find_resume_dir(True, cfg, here) == mine
    monkeypatch.setattr(os, "getuid", lambda: os.stat(mine).st_uid + 1)
    with pytest.raises(CheckpointError, match="owned by you"):
        find_resume_dir(True, cfg, here)
