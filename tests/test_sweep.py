"""Optuna sweeps (qafel-sweep): sweep files, Pareto fronts, resume, workers, failures, PostgreSQL, W&B, multirun.

Every trial here is tiny (logreg, 10 clients, 10 server steps, one local step); see TINY. The tests that start
new Python processes (worker processes, the CLI against PostgreSQL, run.py -m) are marked slow.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from importlib.metadata import entry_points
from pathlib import Path

import optuna
import pytest
import yaml

from qafel.errors import ConfigError
from qafel.experiment.compose import config_dir
from qafel.sweep import (
    load_spec,
    main,
    make_sampler,
    merge_overrides,
    open_storage,
    parse_spec,
    sample_params,
)
from qafel.sweep.driver import _base_config

REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "sweeps"
TINY = ["tracking=none", "run.progress=false", "run.server_steps=10", "run.eval_every=5", "dataset.num_clients=10",
        "model=logreg", "algorithm.buffer_size=5", "client.local_steps=1", "run.compute_optimum=false"]
SHIPPED = {"bitgrid", "buffer_local_steps", "lr_tuning", "pareto_bytes", "concurrency"}
S = optuna.trial.TrialState


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def write_sweep(folder: Path, name: str, **body) -> Path:
    """A sweep file in ``folder`` with the tiny base overrides."""
    body.setdefault("base", TINY)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **body}, sort_keys=False))
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def load(sweep_dir: Path, study_name: str) -> optuna.Study:
    return optuna.load_study(study_name=study_name, storage=f"sqlite:///{sweep_dir / 'study.db'}")


# ------------------------------------------------------------------------------------------ sweep files
def test_shipped_sweeps_parse_and_their_smoke_configs_validate() -> None:
    files = {p.stem: p for p in SWEEPS.glob("*.yaml")}
    assert set(files) >= SHIPPED
    for name in SHIPPED:
        spec = load_spec(files[name])
        assert spec.name == name and spec.params and spec.objectives
        smoke = load_spec(files[name], "smoke")
        assert smoke.n_trials is not None and smoke.n_trials <= 3
        _base_config(smoke.base, config_dir())  # composes with Hydra and passes qafel's validation
    pareto = load_spec(files["pareto_bytes"])
    assert [(o.name, o.direction) for o in pareto.objectives] == [("final_accuracy", "maximize"),
                                                                   ("bytes_total", "minimize")]
    lr = load_spec(files["lr_tuning"])
    assert {p.name: (p.low, p.high, p.log) for p in lr.params} == {"client.lr": (0.01, 100.0, True),
                                                                   "server.lr": (0.01, 100.0, True)}


def test_bad_sweep_files_fail_with_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^params\.client\.lr\.type='uniform'"):
        parse_spec({"params": {"client.lr": {"type": "uniform", "low": 0.1, "high": 1}}})
    with pytest.raises(ConfigError, match=r"^params\.client\.lr\.low=0.*log"):
        parse_spec({"params": {"client.lr": {"low": 0.0, "high": 1.0, "log": True}}})
    with pytest.raises(ConfigError, match=r"^sampler\.name='cmaes'"):
        parse_spec({"params": {"seed": [0, 1]}, "sampler": "cmaes"})
    with pytest.raises(ConfigError, match=r"^objectives\[0\]\.direction='up'"):
        parse_spec({"objectives": [{"metric": "final_accuracy", "direction": "up"}]})
    with pytest.raises(ConfigError, match=r"^bogus="):
        parse_spec({"bogus": 1})
    spec = parse_spec({"objectives": [{"metric": "bytes_up + bytes_broadcast", "direction": "minimize"}]})
    assert spec.objectives[0].value({"bytes_up": 3, "bytes_broadcast": 4}) == 7.0
    assert merge_overrides(["a=1", "b=2"], ["a=3"]) == ["a=3", "b=2"]


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.startswith("error: sweep=")
    sweep = write_sweep(tmp_path, "bad", params={"seed": [0, 1]}, n_trials=1)
    assert main([str(sweep), "algorithm.buffer_size=0", "--sweep-dir", str(tmp_path / "out")]) == 2
    assert "algorithm.buffer_size=0" in capsys.readouterr().err


def test_conditional_grid_samples_bits_only_for_quantized_algorithms() -> None:
    spec = load_spec(SWEEPS / "bitgrid.yaml")
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler(spec))
    seen: list[dict] = []

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        seen.append(sample_params(trial, spec.params, {}))
        return 0.0, 0.0

    study.optimize(objective, n_trials=50)
    assert len(seen) == 19  # 2 algorithms x 3 x 3 bit widths + FedBuff once; then the sampler stops the study
    assert [p for p in seen if p["algorithm"] == "fedbuff"] == [{"algorithm": "fedbuff"}]
    combos = {(p["algorithm"], p["client_quantizer.bits"], p["server_quantizer.bits"])
              for p in seen if p["algorithm"] != "fedbuff"}
    assert len(combos) == 18


# ------------------------------------------------------------------------------------- real sweeps
def test_multi_objective_sweep_writes_a_pareto_front_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "pareto"
    args = [str(SWEEPS / "pareto_bytes.yaml"), "--size", "smoke", "--sweep-dir", str(out)]
    assert main(args) == 0
    for name in ("trials.csv", "pareto.csv", "pareto.png", "study.db"):
        assert (out / name).is_file(), name
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    rows = read_csv(out / "trials.csv")
    assert [r["state"] for r in rows] == ["COMPLETE"] * 3
    assert {"final_accuracy", "bytes_total", "params_client_quantizer.bits", "duration_s"} <= set(rows[0])
    points = [(float(r["final_accuracy"]), float(r["bytes_total"])) for r in rows]
    front = read_csv(out / "pareto.csv")
    assert front
    front_points = {(float(r["final_accuracy"]), float(r["bytes_total"])) for r in front}
    for acc, nbytes in points:  # the front is exactly the non-dominated completed trials
        dominated = any(a >= acc and b <= nbytes and (a, b) != (acc, nbytes) for a, b in points)
        assert ((acc, nbytes) in front_points) == (not dominated)
    for r in rows:
        summary = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
        assert summary["bytes_total"] == float(r["bytes_total"])
        assert summary["bytes_total"] == summary["bytes_up"] + summary["bytes_broadcast"]

    assert main([*args, "--n-trials", "2"]) == 0  # the same command again: resume, add two trials
    study = load(out, "pareto_bytes-smoke")
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    assert all(t.state == S.COMPLETE for t in study.trials)
    assert len(read_csv(out / "trials.csv")) == 5
    assert sorted(p.name for p in (out / "trials").iterdir()) == [f"{i:04d}" for i in range(5)]


def test_single_objective_sweep_reports_accuracy_and_writes_best_yaml(tmp_path: Path) -> None:
    out = tmp_path / "lr"
    assert main([str(SWEEPS / "lr_tuning.yaml"), "--size", "smoke", "--sweep-dir", str(out)]) == 0
    study = load(out, "lr_tuning-smoke")
    assert len(study.trials) == 2
    first = study.trials[0]
    assert first.state == S.COMPLETE  # accuracy is reported at each evaluation, for the pruner
    assert set(first.intermediate_values) == {5, 10} and first.intermediate_values[10] == first.value
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["trial"] == study.best_trial.number and best["value"] == pytest.approx(study.best_value)
    assert set(best["params"]) == {"client.lr", "server.lr"}
    assert f"client.lr={best['params']['client.lr']!r}" in best["overrides"]
    assert best["command"].startswith("python run.py ")
    cfg = _base_config(best["overrides"], config_dir())  # the overrides rerun the best trial
    assert cfg.client.lr == pytest.approx(best["params"]["client.lr"])
    assert not (out / "pareto.csv").exists()


def test_pruner_stops_trials_early_and_their_records_are_closed(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path, "prune", params={"client.lr": {"type": "float", "low": 0.05, "high": 0.5}},
                        sampler={"name": "random", "seed": 1},
                        pruner={"name": "threshold", "lower": 0.999, "metric": "accuracy"}, n_trials=2)
    out = tmp_path / "out"
    assert main([str(sweep), "--sweep-dir", str(out)]) == 0
    study = load(out, "prune")
    assert [t.state for t in study.trials] == [S.PRUNED, S.PRUNED]
    for t in study.trials:
        assert "pruned by the threshold pruner at server step 5" in t.user_attrs["reason"]
        run_dir = Path(t.user_attrs["run_dir"])
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["server_step"] for line in lines] == [0, 5]  # stopped at the first report
        assert not (run_dir / "summary.json").exists()
    assert {r["state"] for r in read_csv(out / "trials.csv")} == {"PRUNED"}
    assert not (out / "best.yaml").exists()


def test_failed_and_diverged_trials_are_recorded_and_the_sweep_continues(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path, "faults", base=[*TINY, "client_quantizer=identity", "server_quantizer=identity"],
                        params={"client.lr": [0.1, 1.0e38], "model.l2": [0.0, -1.0]}, sampler="grid")
    out = tmp_path / "out"
    assert main([str(sweep), "--sweep-dir", str(out)]) == 0
    study = load(out, "faults")
    by_params = {(t.params["client.lr"], t.params["model.l2"]): t for t in study.trials}
    assert len(by_params) == 4 == len(study.trials)
    ok, diverged = by_params[(0.1, 0.0)], by_params[(1.0e38, 0.0)]
    assert ok.state == S.COMPLETE
    assert diverged.state == S.PRUNED and diverged.user_attrs["reason"].startswith("diverged at server step")
    assert diverged.user_attrs["summary"]["status"] == "diverged"
    for lr in (0.1, 1.0e38):
        failed = by_params[(lr, -1.0)]
        assert failed.state == S.FAIL
        assert failed.user_attrs["reason"].startswith("ConfigError: model.l2=-1.0")
        assert (Path(failed.user_attrs["run_dir"]) / "traceback.txt").is_file()
    rows = {r["number"]: r for r in read_csv(out / "trials.csv")}
    assert rows[str(diverged.number)]["reason"].startswith("diverged")
    assert yaml.safe_load((out / "best.yaml").read_text())["trial"] == ok.number


@pytest.mark.slow  # new Python processes: start-up dominates
def test_two_workers_on_one_storage_finish_n_trials_without_duplicates(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path, "workers", params={"client.lr": {"type": "float", "low": 0.05, "high": 0.5}},
                        sampler={"name": "random", "seed": 0}, n_trials=100)
    out = tmp_path / "out"
    assert main([str(sweep), "--workers", "2", "--n-trials", "4", "--sweep-dir", str(out)]) == 0
    study = load(out, "workers")
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state == S.COMPLETE for t in study.trials)
    assert len({t.params["client.lr"] for t in study.trials}) == 4  # the workers sample different points
    run_dirs = {t.user_attrs["run_dir"] for t in study.trials}
    assert len(run_dirs) == 4 and all((Path(d) / "summary.json").is_file() for d in run_dirs)
    assert sorted(int(r["number"]) for r in read_csv(out / "trials.csv")) == [0, 1, 2, 3]


# ----------------------------------------------------------------------------------------- PostgreSQL
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    """A real PostgreSQL server in a temporary directory (as the postgres user when running as root)."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = bins[-1] if bins else shutil.which("initdb")
    if initdb is None:
        pytest.skip("no PostgreSQL server binary (initdb): apt-get install postgresql (Debian), as .ci/run does")
    bindir = Path(initdb).parent
    prefix: list[str] = []
    data = Path(tempfile.mkdtemp(prefix="qafel-pg-"))
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "postgres"], check=True)
            user = pwd.getpwnam("postgres")
        os.chown(data, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    pgdata = data / "db"

    def pg(*cmd: str) -> None:
        subprocess.run([*prefix, *cmd], check=True, capture_output=True, timeout=120)

    pg(str(bindir / "initdb"), "-D", str(pgdata), "-A", "trust", "-U", "qafel", "--no-sync", "-E", "UTF8")
    pg(str(bindir / "pg_ctl"), "-D", str(pgdata), "-l", str(data / "server.log"), "-w", "-t", "60", "start",
       "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off")
    try:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user="qafel", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE qafel_sweep")
        conn.close()
        yield f"postgresql://qafel@127.0.0.1:{port}/qafel_sweep"
    finally:
        with contextlib.suppress(Exception):
            pg(str(bindir / "pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w", "stop")
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.slow  # new Python processes: start-up dominates
def test_postgresql_backed_sweep(postgres_url: str, tmp_path: Path) -> None:
    out = tmp_path / "pg"
    cmd = [sys.executable, "-m", "qafel.sweep", str(SWEEPS / "concurrency.yaml"), "--size", "smoke",
           "--storage", postgres_url, "--study-name", "pg-study", "--sweep-dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 complete" in proc.stdout
    study = optuna.load_study(study_name="pg-study", storage=open_storage(postgres_url))
    assert [t.state for t in study.trials] == [S.COMPLETE, S.COMPLETE]
    assert {t.params["timing.concurrency"] for t in study.trials} <= {5, 10}
    assert not (out / "study.db").exists()  # nothing went to the default SQLite file
    assert len(read_csv(out / "trials.csv")) == 2 and (out / "best.yaml").is_file()


# ------------------------------------------------------------------------------------------------ Hydra
# (W&B: tests/test_wandb.py reads the trials' and the summary run's offline logs back)
@pytest.mark.slow  # new Python processes: start-up dominates
def test_hydra_multirun_over_two_values(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "multirun"
    cmd = [sys.executable, "run.py", "-m", "algorithm=qafel,fedbuff", f"hydra.sweep.dir={sweep_dir}", *TINY]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    algos = {json.loads((sweep_dir / str(i) / "summary.json").read_text())["algorithm"] for i in (0, 1)}
    assert algos == {"qafel", "fedbuff"}


def test_console_script_and_module_entry_point() -> None:
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("qafel-sweep") == "qafel.sweep:main"
    proc = subprocess.run([sys.executable, "-m", "qafel.sweep", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    for flag in ("--n-trials", "--study-name", "--storage", "--workers"):
        assert flag in proc.stdout
