"""Sweeps and multiruns under faults: killed sweeps and workers, reruns of grids, refusals, secrets, bad specs.

Trials are tiny (logreg, 10 clients); the kill tests lengthen them with run.server_steps so that a signal lands
mid-trial. Tests that start several Python processes are marked slow.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml
from test_sweep import REPO, SWEEPS, TINY, postgres_url, read_csv, write_sweep  # noqa: F401 - fixture

from qafel.experiment.runner import NUMERIC_SUMMARY_KEYS, SUMMARY_KEYS, TEXT_SUMMARY_KEYS, run_experiment
from qafel.experiment.wandb_runs import read_wandb_log
from qafel.sim.engine import EVAL_SUMMARY_KEYS
from qafel.sweep import OWNER_FILE, main, open_storage
from qafel.sweep.runtime import _boot_id, die_with_parent, journal_heartbeat

S = optuna.trial.TrialState
DONE = (S.COMPLETE, S.PRUNED)
BITGRID_3 = ["client_quantizer.bits=8", "server_quantizer.bits=8"]  # bitgrid.yaml pinned: qafel, naive, fedbuff


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("QAFEL_STORAGE", raising=False)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def sweep_cmd() -> list[str]:
    """The installed console script (importing this checkout's code via PYTHONPATH), else ``python -m``."""
    script = shutil.which("qafel-sweep")
    return [script] if script else [sys.executable, "-m", "qafel.sweep"]


def env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess in another folder (PYTHONPATH made absolute: it may name ``src``)."""
    paths = os.pathsep.join(str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)
    return {**os.environ, "PYTHONPATH": paths, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **extra}


def study_of(sweep_dir: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(f"sqlite:///{sweep_dir / 'study.db'}"))


def point(t: optuna.trial.FrozenTrial) -> tuple:
    return tuple(sorted((t.system_attrs.get("fixed_params") or t.params).items()))


def assert_each_point_done_once(study: optuna.Study, n_points: int) -> None:
    """Every grid point has exactly one COMPLETE or PRUNED trial, and no trial is left RUNNING or WAITING."""
    done = Counter(point(t) for t in study.trials if t.state in DONE)
    assert len(done) == n_points and set(done.values()) == {1}, done
    assert not [t.number for t in study.trials if t.state in (S.RUNNING, S.WAITING)]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# -------------------------------------------------------------------------------- interrupted grids
@pytest.mark.slow  # three sweeps killed mid-trial and rerun, each in new processes
@pytest.mark.parametrize("sig, code", [(signal.SIGKILL, -9), (signal.SIGTERM, 143), (signal.SIGINT, 130)],
                         ids=["SIGKILL", "SIGTERM", "SIGINT"])
def test_a_grid_killed_mid_trial_reruns_to_every_point_once(tmp_path: Path, sig: int, code: int) -> None:
    out = tmp_path / "grid"
    cmd = [*sweep_cmd(), str(SWEEPS / "bitgrid.yaml"), "--size", "smoke", "--sweep-dir", str(out), *BITGRID_3,
           "run.server_steps=1500", "run.eval_every=50"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = out / "trials" / "0001" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (second.is_file() and len(second.read_text().splitlines()) >= 2):  # trial 1 is under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    killed = study_of(out, "bitgrid-smoke").trials[1]
    assert killed.state == (S.RUNNING if sig == signal.SIGKILL else S.FAIL)
    kept = snapshot(out / "trials" / "0001")  # the killed attempt's records stay as they are

    rerun = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    if sig == signal.SIGKILL:
        assert "trial(s) 1 failed (their worker is gone)" in rerun.stderr
    study = study_of(out, "bitgrid-smoke")
    assert_each_point_done_once(study, 3)
    reason = study.trials[1].user_attrs["reason"]
    assert reason.startswith("worker process") if sig == signal.SIGKILL else reason.startswith("interrupted")
    assert snapshot(out / "trials" / "0001") == kept
    rows = read_csv(out / "trials.csv")
    assert sorted(r["params_algorithm"] for r in rows if r["state"] in ("COMPLETE", "PRUNED")) == [
        "fedbuff", "naive", "qafel"]  # the Pareto front and trials.csv cover the whole grid


GRIDS = {
    "plain": {"params": {"client.lr": [0.1, 0.2], "server.lr": [1.0, 0.5]}, "sampler": "grid"},
    "conditional": {"params": {"algorithm": ["qafel", "naive", "fedbuff"],
                               "client_quantizer.bits": {"choices": [4, 8], "when": {"algorithm": "qafel"}}},
                    "sampler": {"name": "grid", "seed": 3}},
}


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _running_trial(study: optuna.Study, params: dict, host: str, pid: int) -> optuna.Trial:
    """A RUNNING trial of ``params`` as a worker on ``host`` with process ``pid`` leaves it."""
    study.enqueue_trial(params)
    trial = study.ask()
    trial.set_user_attr("worker", {"host": host, "boot": _boot_id() if host == socket.gethostname() else "b",
                                   "pid": pid, "start": "1", "time": time.time()})
    return trial


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the test's own ask() makes the RUNNING trials
@pytest.mark.filterwarnings("ignore:algorithm=fedbuff sends unquantized")
@pytest.mark.parametrize("storage", ["sqlite", "journal"])
@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_a_rerun_runs_failed_and_dead_workers_points_but_not_live_ones(
        tmp_path: Path, grid: str, storage: str, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = write_sweep(tmp_path, grid, base=[*TINY, "client_quantizer=qsgd", "server_quantizer=qsgd"],
                        **GRIDS[grid])
    out = tmp_path / "out"
    url = f"journal:{tmp_path / 'study.log'}" if storage == "journal" else f"sqlite:///{tmp_path / 'study.db'}"
    args = [str(sweep), "--sweep-dir", str(out), "--storage", url]
    assert main([*args, "--n-trials", "1"]) == 0
    study = optuna.load_study(study_name=grid, storage=open_storage(url))
    first = point(study.trials[0])
    points = [dict(p) for p in {
        "plain": [(("client.lr", a), ("server.lr", b)) for a in (0.1, 0.2) for b in (1.0, 0.5)],
        "conditional": [(("algorithm", "qafel"), ("client_quantizer.bits", 4)),
                        (("algorithm", "qafel"), ("client_quantizer.bits", 8)),
                        (("algorithm", "naive"),), (("algorithm", "fedbuff"),)]}[grid]
        if tuple(sorted(p)) != first]
    study.enqueue_trial(points[0])
    study.tell(study.ask(), state=S.FAIL)  # a trial that failed (or was interrupted)
    _running_trial(study, points[1], socket.gethostname(), _dead_pid())  # killed here: its process is gone
    live = _running_trial(study, points[2], "other-machine", 12345)  # a live worker elsewhere
    if storage == "sqlite":
        study._storage.record_heartbeat(live._trial_id)
    else:
        live.set_user_attr("heartbeat", time.time())
    capsys.readouterr()

    assert main(args) == 0
    err = capsys.readouterr().err
    assert "failed (their worker is gone)" in err and "1 running in other workers" in err
    study = optuna.load_study(study_name=grid, storage=open_storage(url))
    assert study.trials[live.number].state == S.RUNNING  # not taken over
    done = {point(t) for t in study.trials if t.state in DONE}
    assert done == {first, *(tuple(sorted(p.items())) for p in points[:2])}

    if storage == "sqlite":  # the worker elsewhere died: its heartbeat is older than the grace period
        with sqlite3.connect(tmp_path / "study.db") as db:
            db.execute("UPDATE trial_heartbeats SET heartbeat = datetime('now', '-1 hour') WHERE trial_id = ?",
                       (live._trial_id,))
    else:
        study._storage.set_trial_user_attr(live._trial_id, "heartbeat", time.time() - 3600)
    assert main(args) == 0
    study = optuna.load_study(study_name=grid, storage=open_storage(url))
    assert study.trials[live.number].state == S.FAIL
    assert_each_point_done_once(study, 4)
    n = len(study.trials)
    capsys.readouterr()
    assert main(args) == 0
    assert "the grid is complete (4 points done" in capsys.readouterr().err
    assert len(optuna.load_study(study_name=grid, storage=open_storage(url)).trials) == n


@pytest.mark.slow  # 19 trials (the non-slow rerun test checks a complete 4-point grid too)
@pytest.mark.filterwarnings("ignore:algorithm=fedbuff sends unquantized")
def test_a_complete_conditional_grid_adds_nothing_and_says_so(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bitgrid"
    args = [str(SWEEPS / "bitgrid.yaml"), "--size", "smoke", "--sweep-dir", str(out), "--n-trials", "100"]
    assert main(args) == 0
    study = study_of(out, "bitgrid-smoke")
    assert len(study.trials) == 19
    assert_each_point_done_once(study, 19)  # 2 algorithms x 3 x 3 bit widths + FedBuff once
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "the grid is complete (19 points done, 19 trials); nothing to add" in err
    assert len(study_of(out, "bitgrid-smoke").trials) == 19


def test_the_journal_heartbeat_stamps_a_running_trial(tmp_path: Path) -> None:
    study = optuna.create_study(storage=open_storage(f"journal:{tmp_path / 'j.log'}"))
    trial = study.ask()
    with journal_heartbeat(trial, enabled=True, interval=0.05):
        time.sleep(0.3)
    stamp = study._storage.get_trial(trial._trial_id).user_attrs["heartbeat"]
    assert time.time() - 5 < stamp <= time.time()


# ----------------------------------------------------------------------------------- worker processes
def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"resource_tracker" not in cmdline:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow  # two worker processes
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
@pytest.mark.parametrize("sig, code", [(signal.SIGKILL, -9), (signal.SIGTERM, 143)], ids=["SIGKILL", "SIGTERM"])
def test_killing_the_parent_stops_its_workers(tmp_path: Path, sig: int, code: int) -> None:
    out = tmp_path / "w"
    cmd = [*sweep_cmd(), str(SWEEPS / "bitgrid.yaml"), "--size", "smoke", "--sweep-dir", str(out), *BITGRID_3,
           "--workers", "2", "run.server_steps=100000", "run.eval_every=100"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while len([m for m in out.glob("trials/*/metrics.jsonl") if m.read_text()]) < 2:  # both workers mid-trial
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    workers = _children(proc.pid)
    assert len(workers) == 2
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == code
    deadline = time.monotonic() + 60
    while any(_alive(w) for w in workers):
        assert time.monotonic() < deadline, "the workers outlived their killed parent"
        time.sleep(0.1)
    study = study_of(out, "bitgrid-smoke")  # each worker failed its trial on the way out (SIGTERM)
    started = [t for t in study.trials if t.state != S.WAITING]  # the third grid point stays queued
    assert [t.state for t in started] == [S.FAIL, S.FAIL] and len(study.trials) == 3
    assert {t.user_attrs["reason"] for t in started} == {"interrupted (SIGTERM)"}


def test_without_prctl_a_worker_polls_for_its_parent() -> None:
    called: list[bool] = []
    assert die_with_parent(os.getpid(), on_orphan=lambda: called.append(True), interval=0.01,
                           use_prctl=False) == "poll"  # os.getppid() is not this pid: as if the parent had died
    deadline = time.monotonic() + 5
    while not called and time.monotonic() < deadline:
        time.sleep(0.01)
    assert called


# ------------------------------------------------------------------------------------- Hydra multirun
@pytest.mark.slow  # run.py -m in new processes
@pytest.mark.parametrize("values, code, failed", [
    (["client.lr=0.1,1e38,0.1"], 3, {1: (3, "client.lr=1e+38")}),  # the middle job diverges
    (["model.l2=0.0,-1.0", "client.lr=0.1,1e38"], 1,  # an invalid value and a divergence: mixed codes
     {1: (3, "model.l2=0.0 client.lr=1e+38"), 2: (2, "model.l2=-1.0 client.lr=0.1"),
      3: (2, "model.l2=-1.0 client.lr=1e+38")}),
], ids=["a diverged middle job", "invalid and diverged jobs"])
def test_a_multirun_runs_every_job_and_reports_the_failed_ones(tmp_path: Path, values: list[str], code: int,
                                                               failed: dict[int, tuple[int, str]]) -> None:
    sweep_dir = tmp_path / "multirun"
    cmd = [sys.executable, "run.py", "-m", *values, f"hydra.sweep.dir={sweep_dir}", *TINY,
           "client_quantizer=identity", "server_quantizer=identity"]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == code, proc.stderr[-3000:]
    jobs = sorted(int(p.name) for p in sweep_dir.iterdir() if p.is_dir())
    assert jobs == list(range(len(jobs))) and len(jobs) in (3, 4)
    report = proc.stderr[proc.stderr.index(f"{len(failed)} of {len(jobs)} jobs failed:"):].splitlines()
    assert len(report) == 1 + len(failed)
    for job in jobs:
        status = json.loads((sweep_dir / str(job) / "job_status.json").read_text())
        want, overrides = failed.get(job, (0, ""))
        assert status["exit_code"] == want
        if want == 2:  # stopped at start-up, before any record: the line names the key
            assert status["message"].startswith("model.l2=-1.0")
        else:  # trained: records kept (a diverged run's up to its divergence)
            assert (sweep_dir / str(job) / "metrics.jsonl").read_text()
            assert json.loads((sweep_dir / str(job) / "summary.json").read_text())["status"] == (
                "diverged" if want == 3 else "completed")
        if want:
            assert any(line.startswith(f"  job {job} ({overrides}") and f"exit {want}" in line for line in report)


# --------------------------------------------------------------------------------------------- secrets
@pytest.mark.slow  # PostgreSQL and W&B in new processes
def test_a_storage_password_reaches_no_record_log_or_wandb_run(postgres_url: str, tmp_path: Path) -> None:  # noqa: F811
    secret = "Pw0rd-n0t-in-records"
    url = postgres_url.replace("postgresql://qafel@", f"postgresql://qafel:{secret}@")  # trust auth ignores it
    base = [str(SWEEPS / "pareto_bytes.yaml"), "--size", "smoke", "--n-trials", "1", "tracking=wandb",
            "tracking.mode=offline"]
    runs = {"argv": (["--storage", url, "--study-name", "argv"], env()),
            "env": (["--study-name", "env"], env(QAFEL_STORAGE=url))}
    for name, (extra, environ) in runs.items():
        proc = subprocess.run([*sweep_cmd(), *base, *extra, "--sweep-dir", str(tmp_path / name)], cwd=tmp_path,
                              env=environ, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert secret not in proc.stdout + proc.stderr and "qafel:***@" in proc.stderr
    for path in tmp_path.rglob("*"):  # trials.csv, pareto.csv, sweep.json, run records, W&B files and logs
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    runs_seen = 0
    for path in {p.resolve() for p in tmp_path.rglob("*.wandb")}:
        records = read_wandb_log(path)
        assert records and all(secret not in str(r) for r in records)
        args = [list(r.environment.args) for r in records if r.WhichOneof("record_type") == "environment"]
        if "/argv/" in str(path):  # the command line W&B records, with the password hidden
            assert any(any("qafel:***@" in a for a in arg) for arg in args), args
        runs_seen += 1
    assert runs_seen == 4  # per sweep: one trial run and the summary run
    storage = open_storage(url)
    for study in storage.get_all_studies():
        assert secret not in json.dumps(study.user_attrs, default=str)
        for t in storage.get_all_trials(study._study_id):
            assert secret not in json.dumps([t.user_attrs, t.system_attrs], default=str)


# --------------------------------------------------------------------------------- bad specs, refusals
def test_objective_keys_are_the_keys_a_run_writes(tmp_path: Path) -> None:
    from conftest import compose_cfg

    summary = run_experiment(compose_cfg(*TINY), tmp_path)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == set(written)
    assert set(SUMMARY_KEYS) - set(EVAL_SUMMARY_KEYS) <= set(written) <= set(SUMMARY_KEYS)
    for key in NUMERIC_SUMMARY_KEYS:
        assert written.get(key) is None or isinstance(written[key], int | float), key
    assert all(not isinstance(written[k], int | float) or isinstance(written[k], bool) for k in TEXT_SUMMARY_KEYS
               if written.get(k) is not None)


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-point grid sweep (study ``grid2``, SQLite in its sweep directory)."""
    folder = tmp_path_factory.mktemp("finished")
    sweep = write_sweep(folder, "grid2", params={"client.lr": [0.1, 0.2]}, sampler="grid")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        assert main([str(sweep), "--sweep-dir", str(folder / "out")]) == 0
    return folder


def _sweep_file(folder: Path, **body) -> str:
    return str(write_sweep(folder, "grid2", **{"params": {"client.lr": [0.1, 0.2]}, "sampler": "grid", **body}))


# (case, how to build the command in folder F with the finished sweep dir F/out, exit code, the line's start)
BAD = [
    ("unknown objective metric", lambda f: [_sweep_file(f / "x", objectives=[{"metric": "accuracy"}])], 2,
     "error: objectives[0].metric='accuracy': 'accuracy' is not a numeric summary.json key; allowed: "
     "final_accuracy, final_loss"),
    ("text key in an objective sum", lambda f: [_sweep_file(f / "x", objectives=[{"metric": "bytes_up + status"}])],
     2, "error: objectives[0].metric='bytes_up + status': 'status' is not a numeric summary.json key"),
    ("unknown parameter type", lambda f: [_sweep_file(f / "x", params={"client.lr": {"type": "uniform", "low": 0.1,
                                                                                     "high": 1}})],
     2, "error: params.client.lr.type='uniform': must be one of categorical, int, float"),
    ("grid float without a step", lambda f: [_sweep_file(f / "x", params={"client.lr": {"low": 0.1, "high": 1.0}})],
     2, "error: params.client.lr.step=None: the grid sampler needs a step"),
    ("unknown sweep key", lambda f: [_sweep_file(f / "x", bogus=1)], 2, "error: bogus=1: unknown key"),
    ("unknown pruner metric", lambda f: [_sweep_file(f / "x", pruner={"name": "median", "metric": "acc"})], 2,
     "error: pruner.metric='acc': not a key of the evaluation records; one of uploads, sim_time, accuracy"),
    ("no n_trials for a sampler", lambda f: [_sweep_file(f / "x", sampler="random")], 2, "error: n_trials=None"),
    ("bad override", lambda f: [_sweep_file(f / "x"), "algorithm.buffer_size=0"], 2,
     "error: algorithm.buffer_size=0: must be an integer >= 1"),
    ("zero workers", lambda f: [_sweep_file(f / "x"), "--workers", "0"], 2, "error: --workers=0"),
    ("unknown size", lambda f: [_sweep_file(f / "x"), "--size", "huge"], 2, "error: --size='huge'"),
    ("missing sweep file", lambda f: [str(f / "nope.yaml")], 2, "error: sweep="),
    ("unknown storage", lambda f: [_sweep_file(f / "x"), "--storage", "nosuchdb://h/db"], 2,
     "error: cannot open storage nosuchdb://h/db"),
    ("unknown storage in QAFEL_STORAGE", lambda f: [_sweep_file(f / "x"), "QAFEL_STORAGE=nosuchdb://u:pw@h/db"], 2,
     "error: cannot open storage nosuchdb://u:***@h/db"),
    ("another study in the sweep dir", lambda f: [_sweep_file(f / "x"), "--study-name", "other"], 4,
     "error: {out} holds study 'grid2': use another --sweep-dir for study 'other', or --study-name grid2"),
    ("another sweep under the study name", lambda f: [_sweep_file(f / "x", params={"client.lr": [0.1, 0.3]}),
                                                      "--storage", f"sqlite:///{f / 'out' / 'study.db'}",
                                                      "--sweep-dir", str(f / "elsewhere")], 4,
     "error: study 'grid2' in sqlite:///{out}/study.db was made from another sweep ({sweep}; this one, {x}, "
     "differs in params): use another --study-name"),
    ("other directions under the study name", lambda f: [
        _sweep_file(f / "x", objectives=[{"metric": "final_accuracy", "direction": "minimize"}])], 4,
     "error: study 'grid2' in sqlite:///{out}/study.db has directions ['maximize'], this sweep ['minimize']: "
     "use another --study-name"),
    ("a trial folder of another study", lambda f: [_sweep_file(f / "x"), "STRAY=trials/0007/metrics.jsonl"], 4,
     "error: {out}/trials/0007 holds records that study 'grid2' did not write (it has 2 trials): use another "
     "--sweep-dir"),
    ("an unreadable sweep.json", lambda f: [_sweep_file(f / "x"), f"STRAY={OWNER_FILE}"], 4,
     f"error: {{out}}/{OWNER_FILE} is not a qafel sweep record (unreadable JSON): use another --sweep-dir"),
]
SUBPROCESS = {"unknown objective metric", "bad override", "another study in the sweep dir",
              "a trial folder of another study"}  # also run as qafel-sweep processes: a representative subset
CASES = [(*c, "main") for c in BAD] + [(*c, "subprocess") for c in BAD if c[0] in SUBPROCESS]


@pytest.mark.parametrize("case, build, code, line, how", CASES, ids=[f"{c[0]}-{c[4]}" for c in CASES])
def test_bad_sweep_specs_and_invocations(case: str, build, code: int, line: str, how: str, tmp_path: Path,
                                         finished_sweep: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "f"
    shutil.copytree(finished_sweep, folder)
    (folder / "x").mkdir()
    out = folder / "out"
    args = build(folder)
    environ: dict[str, str] = {}
    for a in [a for a in args if a.startswith(("QAFEL_STORAGE=", "STRAY="))]:
        args.remove(a)
        key, value = a.split("=", 1)
        if key == "STRAY":  # records that this study did not write
            (out / value).parent.mkdir(parents=True, exist_ok=True)
            (out / value).write_text("{not json\n")
        else:
            environ[key] = value
    if "--sweep-dir" not in args:
        args += ["--sweep-dir", str(out)]
    before = snapshot(out)
    if how == "main":
        for key, value in environ.items():
            monkeypatch.setenv(key, value)
        status, err = main(args), capsys.readouterr().err
    else:
        proc = subprocess.run([*sweep_cmd(), *args], cwd=folder, env=env(**environ), capture_output=True, text=True,
                              timeout=300)
        status, err = proc.returncode, proc.stderr
    expected = line.format(out=out, sweep=finished_sweep / "grid2.yaml", x=folder / "x" / "grid2.yaml")
    assert status == code, err[-3000:]
    assert err.strip().splitlines() == [err.strip()] and err.startswith(expected), err[-3000:]
    assert snapshot(out) == before  # nothing already written was lost or changed
    assert not (folder / "elsewhere" / OWNER_FILE).exists()


def test_a_trial_never_writes_into_an_existing_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import qafel.sweep.storage

    sweep = write_sweep(tmp_path, "g", params={"client.lr": [0.1, 0.2]}, sampler="grid")
    out = tmp_path / "out"
    assert main([str(sweep), "--sweep-dir", str(out), "--n-trials", "1"]) == 0
    (out / "trials" / "0001").mkdir()
    (out / "trials" / "0001" / "metrics.jsonl").write_text("another run's records\n")
    monkeypatch.setattr(qafel.sweep.storage, "check_sweep_dir", lambda *a: None)  # as if it appeared after the check
    capsys.readouterr()
    assert main([str(sweep), "--sweep-dir", str(out)]) == 4
    err = capsys.readouterr().err
    assert "already exists (records of another study or run; left as they are): use another --sweep-dir" in err
    assert (out / "trials" / "0001" / "metrics.jsonl").read_text() == "another run's records\n"
    assert sorted(p.name for p in (out / "trials" / "0001").iterdir()) == ["metrics.jsonl"]
    assert yaml.safe_load((out / OWNER_FILE).read_text())["study"] == "g"


def test_a_rerun_with_other_overrides_is_refused_instead_of_joining_the_study(tmp_path: Path, capsys) -> None:
    """The trials of one study share their config: a rerun with seed=1 would be reported as the complete grid."""
    sweep = write_sweep(tmp_path, "seeded", params={"client.lr": [0.1, 0.2]}, sampler="grid")
    out = tmp_path / "out"
    assert main([str(sweep), "--sweep-dir", str(out)]) == 0
    assert main([str(sweep), "--sweep-dir", str(out), "tracking=none"]) == 0  # bookkeeping keys may differ
    before = snapshot(out)
    capsys.readouterr()
    assert main([str(sweep), "--sweep-dir", str(out), "seed=1"]) == 4
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "seed=0" in errors[0] and "seed=1" in errors[0], errors
    assert snapshot(out) == before
    assert len(study_of(out, "seeded").trials) == 2
