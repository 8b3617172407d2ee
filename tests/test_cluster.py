"""Cluster jobs through submitit (docs/sweeps-and-cluster.md): launcher configs, SLURM scripts (dry run, and a
submission through a stand-in sbatch), real jobs on submitit's local executor (multiruns, sweep workers on a journal
file and on PostgreSQL), and preemption: a job sent SIGUSR2 (what SLURM sends at a preemption or before the time
limit) checkpoints, is requeued and ends with the records of an uninterrupted run.

Tests that start jobs are marked slow: each job is a Python process of its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import FAST, compose_cfg
from omegaconf import OmegaConf
from submitit.core.utils import pickle_load
from test_reliability import records, summary
from test_sweep import REPO, SWEEPS, TINY, postgres_url, read_csv, write_sweep  # noqa: F401 - fixture
from test_sweep_reliability import _children, env, sweep_cmd

import qafel.signals
from qafel.errors import Preempted
from qafel.experiment.checkpoint import load_checkpoint
from qafel.experiment.compose import compose
from qafel.experiment.runner import run_experiment
from qafel.sweep import OWNER_FILE, main, open_storage
from qafel.sweep.cluster import register_launchers, resume_requeued, run_as_job

S = optuna.trial.TrialState
LONG = ["dataset.num_clients=20", "run.server_steps=400", "run.eval_every=20", "run.checkpoint_every=20",
        "timing.rate=10", "client.local_steps=2"]  # a few seconds: long enough to be preempted mid-run
PASSWORD = "s3cret-pw"


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("QAFEL_STORAGE", raising=False)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def with_password(url: str) -> str:
    """The PostgreSQL fixture's URL with a password (the server trusts local connections and ignores it)."""
    return url.replace("://qafel@", f"://qafel:{PASSWORD}@")


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, f"the process ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def job_ids(stdout: str) -> list[str]:
    line = next(line for line in stdout.splitlines() if line.startswith("submitted "))
    return line.split("job(s): ", 1)[1].split(" (", 1)[0].split()


def wait_for_jobs(sweep_dir: Path, ids: list[str], timeout: float = 600) -> list[tuple[str, object]]:
    """The (outcome, value) result pickles of local sweep jobs, once all are written."""
    paths = [sweep_dir / "jobs" / i / f"{i}_0_result.pkl" for i in ids]
    wait_for(lambda: all(p.is_file() for p in paths), timeout, "the jobs' results")
    return [pickle_load(p) for p in paths]


def task_of(controller: int) -> int:
    """The job process that submitit's local controller started (what SLURM would signal)."""
    wait_for(lambda: _children(controller), 60, "the job process")
    return _children(controller)[0]


# ------------------------------------------------------------------------------------------ launcher configs
def test_launcher_configs_have_cpu_and_gpu_defaults_and_check_their_keys() -> None:
    register_launchers()

    def launcher(*overrides: str) -> dict:
        cfg = compose(list(overrides), return_hydra_config=True)
        return OmegaConf.to_container(cfg.hydra.launcher, resolve=False)

    cpu, gpu, local = (launcher(f"hydra/launcher={name}")
                       for name in ("submitit_slurm", "submitit_slurm_gpu", "submitit_local"))
    assert cpu["_target_"] == gpu["_target_"] == "hydra_plugins.qafel_launcher.SlurmLauncher"
    assert local["_target_"] == "hydra_plugins.qafel_launcher.LocalLauncher"
    assert {k: cpu[k] for k in ("timeout_min", "cpus_per_task", "gpus_per_node", "mem_gb", "partition",
                                "array_parallelism", "signal_delay_s", "max_num_timeout", "dry_run")} == {
        "timeout_min": 240, "cpus_per_task": 4, "gpus_per_node": None, "mem_gb": 16, "partition": None,
        "array_parallelism": 64, "signal_delay_s": 120, "max_num_timeout": 10, "dry_run": False}
    assert (gpu["gpus_per_node"], gpu["cpus_per_task"], gpu["mem_gb"], gpu["timeout_min"]) == (1, 8, 64, 240)
    assert (local["cpus_per_task"], local["gpus_per_node"], local["array_parallelism"]) == (1, 0, None)
    over = launcher("hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30")
    assert (over["partition"], over["timeout_min"]) == ("gpu", 30)
    with pytest.raises(Exception, match="bogus"):
        launcher("hydra/launcher=submitit_slurm", "hydra.launcher.bogus=1")
    with pytest.raises(Exception, match="timeout_min"):
        launcher("hydra/launcher=submitit_slurm", "hydra.launcher.timeout_min=soon")


# ------------------------------------------------------------------------------------------ SLURM scripts
def sbatch_lines(text: str) -> set[str]:
    return {line for line in text.splitlines() if line.startswith("#SBATCH")}


def test_the_sweep_dry_run_prints_the_sbatch_script_and_submits_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    status = main([str(SWEEPS / "bitgrid.yaml"), "--size", "smoke", "--launcher", "slurm", "--jobs", "3",
                   "--dry-run", "--storage", f"postgresql://u:{PASSWORD}@db.example/sweeps", "--sweep-dir", str(out),
                   "--slurm", "partition=gpu", "--slurm", "timeout_min=90", "--slurm", "cpus_per_task=8",
                   "--slurm", "gpus_per_node=1", "--slurm", "mem_gb=32", "--slurm", "array_parallelism=2"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert {"#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --cpus-per-task=8", "#SBATCH --gpus-per-node=1",
            "#SBATCH --mem=32GB", "#SBATCH --array=0-2%2", "#SBATCH --signal=USR2@120",
            "#SBATCH --job-name=qafel-bitgrid-smoke", f"#SBATCH --output={out.resolve()}/jobs/%A_%a/%A_%a_0_log.out"
            } <= sbatch_lines(captured.out)
    command = captured.out.strip().splitlines()[-1]
    assert command.startswith("srun ") and command.endswith(f"-u -m submitit.core._submit {out.resolve()}/jobs/%j")
    assert PASSWORD not in captured.out + captured.err
    assert not out.exists()  # nothing written, nothing submitted


@pytest.mark.slow  # run.py in a new process
def test_a_multirun_dry_run_prints_the_job_array_script(tmp_path: Path) -> None:
    cmd = [sys.executable, "run.py", "-m", "hydra/launcher=submitit_slurm", "hydra.launcher.dry_run=true",
           f"hydra.sweep.dir={tmp_path / 'm'}", "seed=0,1,2", *TINY]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"#SBATCH --time=240", "#SBATCH --cpus-per-task=4", "#SBATCH --mem=16GB", "#SBATCH --array=0-2%3",
            "#SBATCH --signal=USR2@120", "#SBATCH --job-name=run"} <= sbatch_lines(proc.stdout)
    assert not [line for line in sbatch_lines(proc.stdout) if "--gpus" in line or "--partition" in line]
    assert "-u -m submitit.core._submit" in proc.stdout
    assert not list((tmp_path / "m").glob("*/summary.json")) and "warn" not in proc.stderr.lower()


@pytest.mark.slow  # qafel-sweep in a new process, PostgreSQL
def test_a_slurm_submission_passes_the_storage_password_only_through_the_environment(
        postgres_url: str, tmp_path: Path) -> None:  # noqa: F811 - fixture
    fake = tmp_path / "bin"  # stand-ins for SLURM's commands: sbatch keeps the script and the environment it got
    fake.mkdir()
    (fake / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/sbatch.sh\nenv > {tmp_path}/sbatch.env\n'
                                 'echo "Submitted batch job 4242"\n')
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    sweep = write_sweep(tmp_path, "pw", params={"client.lr": [0.1, 0.2, 0.3]}, sampler="grid")
    out = tmp_path / "out"
    url = with_password(postgres_url)
    proc = subprocess.run([*sweep_cmd(), str(sweep), "--launcher", "slurm", "--jobs", "2", "--storage", url,
                           "--sweep-dir", str(out), "--slurm", "partition=cpu"], cwd=tmp_path, timeout=300,
                          env=env(PATH=f"{fake}{os.pathsep}{os.environ['PATH']}"), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert job_ids(proc.stdout) == ["4242_0", "4242_1"]
    assert "squeue -j 4242" in proc.stdout and "--status" in proc.stdout
    script = (tmp_path / "sbatch.sh").read_text()
    assert {"#SBATCH --array=0-1%2", "#SBATCH --partition=cpu"} <= sbatch_lines(script)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "sbatch.env"]
    assert {p.name for p in written} >= {"4242_0_submitted.pkl", "4242_1_submitted.pkl", OWNER_FILE}
    for text in [proc.stdout, proc.stderr, *(p.read_bytes().decode("latin-1") for p in written)]:
        assert PASSWORD not in text
    assert f"QAFEL_STORAGE={url}" in (tmp_path / "sbatch.env").read_text().splitlines()
    study = optuna.load_study(study_name="pw", storage=open_storage(postgres_url))
    assert [t.state for t in study.trials] == [S.WAITING] * 3  # the grid queued for the jobs


@pytest.mark.parametrize("args, line", [
    (["--launcher", "slurm", "--slurm", "bogus=1"], "error: --slurm='bogus=1': unknown key for --launcher slurm; "
                                                    "keys: timeout_min, cpus_per_task"),
    (["--launcher", "slurm", "--slurm", "timeout_min=soon"], "error: --slurm='timeout_min=soon': "),
    (["--launcher", "slurm", "--slurm", "mem_gb=0"], "error: --slurm='mem_gb=0': must be >= 1"),
    (["--launcher", "slurm", "--slurm", "partition"], "error: --slurm='partition': must be KEY=VALUE"),
    (["--launcher", "pbs"], "error: --launcher='pbs': must be one of slurm, local, slurm_gpu"),
    (["--launcher", "local", "--jobs", "0"], "error: --jobs=0: must be an integer >= 1"),
    (["--jobs", "2"], "error: --jobs=2: needs --launcher slurm|local"),
    (["--launcher", "local", "--workers", "2"], "error: --workers=2: starts local processes: with --launcher use"),
    (["--status", "--launcher", "local"], "error: --status=True: reads the storage only"),
    (["--status", "--collect"], "error: --status=True: cannot be combined with --collect"),
    (["--launcher", "slurm", "--dry-run"], "error: --launcher slurm: the study's storage is SQLite (sqlite:///"),
    (["--status"], "error: study bad in sqlite:///"),
    (["--collect", "--storage", "journal:{tmp}/none.log"], "error: study bad in journal:"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_cluster_options_stop_with_one_line(tmp_path: Path, args: list[str], line: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    sweep = write_sweep(tmp_path, "bad", params={"client.lr": [0.1, 0.2]}, sampler="grid")
    out = tmp_path / "out"
    args = [a.format(tmp=tmp_path) for a in args]
    status = main([str(sweep), "--sweep-dir", str(out), *args])
    err = capsys.readouterr().err
    assert status == 2
    assert err.strip().splitlines() == [err.strip()] and err.startswith(line), err
    assert not out.exists() and not (tmp_path / "none.log").exists()


def test_a_submission_without_slurm_or_refused_by_sbatch_stops_with_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    sweep = write_sweep(tmp_path, "bad", params={"client.lr": [0.1, 0.2]}, sampler="grid")
    args = [str(sweep), "--sweep-dir", str(tmp_path / "out"), "--storage", f"journal:{tmp_path / 's.log'}",
            "--launcher", "slurm", "--slurm", "partition=nope"]
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no srun, no sbatch
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [err.strip()]
    assert err.startswith('error: --launcher slurm: Could not detect "srun"') and "--dry-run" in err
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "bin" / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: nope' >&2\n"
                                             "exit 1\n")
    for f in (tmp_path / "bin").iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "error: --launcher slurm: the submission failed (sbatch: error: invalid partition specified: nope); the "
        "study keeps its queued trials: fix the job settings and submit again")


# --------------------------------------------------------------------------------- preemption, in-process
@pytest.fixture
def preemptible():
    """SIGUSR2 handled as a cluster job's preemption signal (qafel.signals), restored afterwards."""
    saved = dict(qafel.signals._state)
    previous = qafel.signals.preempt_on(signal.SIGUSR2)
    yield
    signal.signal(signal.SIGUSR2, previous)
    qafel.signals._state.update(saved)


def test_a_preemption_signal_checkpoints_after_the_current_server_step(tmp_path: Path, preemptible) -> None:
    cfg = (*FAST, *LONG, "run.server_steps=60", "run.checkpoint_every=1000")  # periodic checkpoints: only at the end
    run_experiment(compose_cfg(*cfg), tmp_path / "full")

    def preempt_at_40(record: dict) -> None:
        if record["server_step"] == 40:
            os.kill(os.getpid(), signal.SIGUSR2)

    with pytest.raises(Preempted):
        run_experiment(compose_cfg(*cfg), tmp_path / "cut", on_eval=preempt_at_40)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["engine"]["server_step"] == 40
    assert not qafel.signals.preemption_requested()
    resumed = run_experiment(compose_cfg(*cfg), tmp_path / "cut", resume=True)
    assert resumed["resumed"] is True
    assert records(tmp_path / "cut") == records(tmp_path / "full")
    assert summary(tmp_path / "cut") == summary(tmp_path / "full")
    with pytest.raises(Preempted):  # outside a run there is nothing to wait for
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(1)


def test_a_preemption_is_raised_anyway_when_no_server_step_ends_in_time(preemptible,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qafel.signals, "PREEMPT_GRACE_S", 0.2)
    with pytest.raises(Preempted), qafel.signals.checkpointing_run():  # e.g. a long evaluation
        os.kill(os.getpid(), signal.SIGUSR2)
        assert qafel.signals.preemption_requested()
        time.sleep(30)  # the grace timer signals again, and that raises
    assert not qafel.signals.preemption_requested()


def test_a_requeued_job_continues_only_its_own_run(tmp_path: Path) -> None:
    cfg = compose_cfg(*FAST)
    for name, run_id, files in [("mine", "job-1", ["metrics.jsonl", "checkpoint.pt"]),
                                ("mine-early", "job-1", ["metrics.jsonl"]), ("other", "someone", ["checkpoint.pt"])]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump({"run_id": run_id}))
        for f in files:
            (tmp_path / name / f).write_text("records\n")
    assert not resume_requeued(cfg, tmp_path / "mine")  # not in a job: nothing to continue
    with run_as_job("job-1"):
        assert resume_requeued(cfg, tmp_path / "mine")  # its checkpoint: continue (run.py's resume=RUN_DIR path)
        assert cfg.run_id == "job-1"
        assert not resume_requeued(cfg, tmp_path / "mine-early")  # stopped before its first checkpoint: start over
        assert not resume_requeued(cfg, tmp_path / "other")  # another run's records: refused later, untouched
        assert not resume_requeued(cfg, tmp_path / "fresh")
    assert sorted(p.name for p in (tmp_path / "mine-early").iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["checkpoint.pt", "config.yaml"]


# ------------------------------------------------------------------------------- jobs on the local executor
@pytest.mark.slow  # run.py -m: two jobs, each a process
def test_a_multirun_on_the_local_executor_runs_every_job(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "m"
    cmd = [sys.executable, "run.py", "-m", "hydra/launcher=submitit_local", "algorithm=qafel,fedbuff",
           "algorithm.buffer_size=5,0", f"hydra.sweep.dir={sweep_dir}", *[o for o in TINY if "buffer" not in o]]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]  # the two jobs with K=0 stop at start-up: reported at the end
    assert proc.stderr.strip().splitlines()[-3:] == [
        "2 of 4 jobs failed:", "  job 1 (algorithm=qafel algorithm.buffer_size=0): exit 2: algorithm.buffer_size=0: "
        "must be an integer >= 1", "  job 3 (algorithm=fedbuff algorithm.buffer_size=0): exit 2: "
        "algorithm.buffer_size=0: must be an integer >= 1"]
    done = [json.loads((sweep_dir / str(i) / "summary.json").read_text()) for i in (0, 2)]
    assert [s["algorithm"] for s in done] == ["qafel", "fedbuff"]
    assert len({s["run_id"] for s in done}) == 2
    assert len(list((sweep_dir / ".submitit").glob("*/*_result.pkl"))) == 4  # each job a submitit job


@pytest.mark.slow  # run.py -m with a job preempted and requeued
def test_a_preempted_multirun_job_is_requeued_and_ends_like_an_uninterrupted_run(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "m"
    cmd = [sys.executable, "run.py", "-m", "hydra/launcher=submitit_local", "seed=0", f"hydra.sweep.dir={sweep_dir}",
           *FAST, *LONG]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = sweep_dir / "0"
    wait_for(lambda: (run_dir / "checkpoint.pt").is_file(), 300, "the first checkpoint", proc)
    run_id = yaml.safe_load((run_dir / "config.yaml").read_text())["run_id"]
    controller = next(c for c in _children(proc.pid) if b"submitit.local" in Path(f"/proc/{c}/cmdline").read_bytes())
    os.kill(task_of(controller), signal.SIGUSR2)  # as SLURM at a preemption, or signal_delay_s before the limit
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    log = next((sweep_dir / ".submitit").glob("*/*_0_log.out")).read_text()
    done_lines = [line for line in log.splitlines() if line.startswith("submitit INFO") and "completed" in line]
    assert "Requeued job" in log and len(done_lines) == 1  # one requeue, then the job completed once
    done = json.loads((run_dir / "summary.json").read_text())
    assert done["resumed"] is True and done["status"] == "completed" and done["run_id"] == run_id
    run_experiment(compose_cfg("seed=0", *FAST, *LONG), tmp_path / "full")
    assert records(run_dir) == records(tmp_path / "full")
    assert summary(run_dir) == summary(tmp_path / "full")


@pytest.mark.slow  # run.py -m with a job killed outright
def test_a_multirun_job_killed_without_a_result_is_listed_with_the_failed_jobs(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "m"
    cmd = [sys.executable, "run.py", "-m", "hydra/launcher=submitit_local", "seed=0", f"hydra.sweep.dir={sweep_dir}",
           *FAST, *LONG]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = sweep_dir / "0"
    wait_for(lambda: (run_dir / "checkpoint.pt").is_file(), 300, "the first checkpoint", proc)
    controller = next(c for c in _children(proc.pid) if b"submitit.local" in Path(f"/proc/{c}/cmdline").read_bytes())
    os.kill(task_of(controller), signal.SIGKILL)  # no signal to act on: no checkpoint hook, no requeue
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err[-3000:]
    report = err.strip().splitlines()[-2:]
    assert report[0] == "1 of 1 jobs failed:"
    assert report[1].startswith("  job 0 (seed=0 ") and " ended without finishing (UncompletedJobError: " in report[1]
    assert report[1].endswith(f"its records and last checkpoint are in {run_dir} (continue with resume={run_dir})")
    assert json.loads((run_dir / "job_status.json").read_text())["exit_code"] == 1
    assert load_checkpoint(run_dir / "checkpoint.pt")["engine"]["server_step"] >= 20


def sweep_jobs(sweep: Path, out: Path, storage: str, *extra: str) -> list[str]:
    """Submit local worker jobs with qafel-sweep (it returns at once); their ids."""
    with open(out.parent / "submit.out", "w") as so, open(out.parent / "submit.err", "w") as se:
        # files, not pipes: the local jobs inherit them and outlive the command
        proc = subprocess.run([*sweep_cmd(), str(sweep), "--launcher", "local", "--storage", storage,
                               "--sweep-dir", str(out), *extra], cwd=out.parent, env=env(), stdout=so, stderr=se,
                              timeout=300)
    stdout, stderr = (out.parent / "submit.out").read_text(), (out.parent / "submit.err").read_text()
    assert proc.returncode == 0, stderr[-3000:]
    assert PASSWORD not in stdout + stderr
    return job_ids(stdout)


@pytest.mark.slow  # two sweep worker jobs, each a process
@pytest.mark.parametrize("backend, sampler", [("journal", "random"), ("journal", "grid"), ("postgresql", "random")])
def test_two_sweep_jobs_add_exactly_n_trials(backend: str, sampler: str, tmp_path: Path, request: pytest.FixtureRequest,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    storage = (f"journal:{tmp_path / 'study.log'}" if backend == "journal"
               else with_password(request.getfixturevalue("postgres_url")))
    if sampler == "grid":  # 4 points, queued by qafel-sweep, claimed by the jobs
        sweep = write_sweep(tmp_path, "jobs", params={"client.lr": [0.05, 0.1, 0.2, 0.4]}, sampler="grid")
        extra = ["--jobs", "2"]
    else:
        sweep = write_sweep(tmp_path, "jobs", params={"client.lr": {"type": "float", "low": 0.05, "high": 0.5}},
                            sampler={"name": "random", "seed": 0}, n_trials=100)
        extra = ["--jobs", "2", "--n-trials", "4"]
    out = tmp_path / "out"
    ids = sweep_jobs(sweep, out, storage, *extra)
    assert len(ids) == 2
    results = wait_for_jobs(out, ids)
    assert all(outcome == "success" for outcome, _ in results)
    assert sum("wrote     trials.csv" in str(text) for _, text in results) == 1  # the outputs, once
    study = optuna.load_study(study_name="jobs", storage=open_storage(storage))
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state == S.COMPLETE for t in study.trials)
    assert len({t.params["client.lr"] for t in study.trials}) == 4  # no point run twice
    assert len({t.user_attrs["run_dir"] for t in study.trials}) == 4
    assert len({t.user_attrs["worker"]["pid"] for t in study.trials}) == 2  # both jobs ran trials
    assert sorted(int(r["number"]) for r in read_csv(out / "trials.csv")) == [0, 1, 2, 3]  # by the last job
    assert (out / "best.yaml").is_file()

    (out / "trials.csv").unlink()
    assert main([str(sweep), "--storage", storage, "--sweep-dir", str(out), "--status"]) == 0
    shown = capsys.readouterr().out
    assert "trials    4: 4 complete, 0 running, 0 pruned, 0 failed, 0 queued" in shown
    assert "best      trial" in shown and PASSWORD not in shown
    assert ("grid      4 of 4 points done" in shown) == (sampler == "grid")
    assert main([str(sweep), "--storage", storage, "--sweep-dir", str(out), "--collect"]) == 0
    assert len(read_csv(out / "trials.csv")) == 4


@pytest.mark.slow  # a sweep worker job preempted and requeued
def test_a_preempted_sweep_job_fails_its_trial_and_runs_the_point_again(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path, "grid", base=[*FAST, *LONG, "run.server_steps=300"],
                        params={"client.lr": [0.1, 0.2]}, sampler="grid")
    out = tmp_path / "out"
    [job] = sweep_jobs(sweep, out, f"journal:{tmp_path / 'study.log'}")
    wait_for(lambda: (out / "trials" / "0000" / "checkpoint.pt").is_file(), 300, "trial 0's first checkpoint")
    os.kill(task_of(int(job)), signal.SIGUSR2)
    [(outcome, _)] = wait_for_jobs(out, [job])
    assert outcome == "success"
    log = (out / "jobs" / job / f"{job}_0_log.out").read_text()
    assert "Requeued job" in log
    study = optuna.load_study(study_name="grid", storage=open_storage(f"journal:{tmp_path / 'study.log'}"))
    states = [(t.params["client.lr"], t.state) for t in study.trials]
    assert states[0] == (0.1, S.FAIL) and sorted(states[1:]) == [(0.1, S.COMPLETE), (0.2, S.COMPLETE)]
    assert study.trials[0].user_attrs["reason"].startswith("preempted or out of time (SIGUSR2)")
    rows = read_csv(out / "trials.csv")
    assert [r["state"] for r in rows] == ["FAIL", "COMPLETE", "COMPLETE"]
