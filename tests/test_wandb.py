"""W&B mirrors the run records: the offline ``.wandb`` logs read back (tests/wandb_log.py) equal config.yaml,
run.json, metrics.jsonl and summary.json, live, after a resume or a kill, rebuilt by ``qafel-wandb``, and for
sweeps (trials and the summary run). Runs are tiny; the ones that start run.py in new processes are marked slow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import optuna  # noqa: F401 - the warning filters name its classes
import pytest
import yaml
from conftest import FAST, REPO, compose_cfg
from wandb_log import OWN_KEYS, WandbLog, live_logs, superseded

from qafel.experiment.runner import run_experiment
from qafel.experiment.tracking import (
    RunOrigin,
    default_run_name,
    multirun_group,
    quantizer_label,
    rerun_command,
    run_tags,
    wandb_run_id,
)
from qafel.experiment.wandb_runs import main as qafel_wandb

TINY = ("run.progress=false", "dataset.num_clients=10", "run.server_steps=20", "run.eval_every=5")
WANDB = (*TINY, "tracking=wandb")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def env(**extra: str) -> dict[str, str]:
    """A subprocess environment: PYTHONPATH made absolute (it may name this checkout's ``src``), W&B offline, and
    without WANDB_SERVICE (set by W&B in this process once it ran here: a child would share this process's W&B
    service, which outlives the child and keeps a killed run's log open)."""
    paths = os.pathsep.join(str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)
    base = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return {**base, "PYTHONPATH": paths, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **extra}


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def the_log(root: Path) -> WandbLog:
    logs = live_logs(root)
    assert len(logs) == 1, sorted(logs)
    return next(iter(logs.values()))


def assert_mirrors(log: WandbLog, run_dir: Path) -> None:
    """The W&B run is the run directory's records: rows, summary, names, config, metric definitions, artifacts."""
    rows = metrics(run_dir)
    assert log.history == rows
    assert log.steps == [r["server_step"] for r in rows]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {k: log.summary.get(k, "<missing>") for k in summary} == summary  # key for key, nulls and dicts kept
    assert log.summary_after_history()
    assert log.summary["accuracy"] == {"max": max(r["accuracy"] for r in rows)}
    assert log.summary["loss"] == {"min": min(r["loss"] for r in rows)}
    origin = json.loads((run_dir / "run.json").read_text())
    assert log.run_id == origin["wandb_id"] == wandb_run_id(summary["run_id"])
    assert (log.name, log.group, log.job_type, log.tags) == (origin["name"], origin["group"] or "",
                                                             origin["job_type"], origin["tags"])
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert {k: log.config[k] for k in config} == config
    assert [log.config[k] for k in ("choices", "overrides", "command")] == [
        origin["choices"], origin["overrides"], origin["command"]]
    assert log.metric("*").step_metric == "server_step"  # the default x-axis
    for axis in ("server_step", "uploads", "bytes_up", "bytes_broadcast", "bytes_total", "sim_time"):
        assert log.metric(axis) is not None, axis
    assert log.metric("accuracy").summary.max and log.metric("loss").summary.min
    assert log.metric("suboptimality").summary.min and log.metric("hidden_state_error") is not None
    kind, files = log.artifacts[f"run-records-{log.run_id}"]
    assert kind == "run-records" and files == ["config.yaml", "metrics.jsonl", "run.json", "summary.json"]
    assert log.exit_code == 0


# ---------------------------------------------------------------------------------------- the records
def test_every_evaluation_record_has_bytes_total(tmp_path: Path) -> None:
    summary = run_experiment(compose_cfg(*FAST, *TINY, "algorithm=naive"), tmp_path)
    rows = metrics(tmp_path)
    for r in rows:
        assert r["bytes_total"] == r["bytes_up"] + r["bytes_broadcast"] + r["bytes_down_naive"]
    assert rows[-1]["bytes_down_naive"] > 0 and rows[-1]["bytes_total"] == summary["bytes_total"]


def test_names_tags_and_rerun_command_follow_the_choices() -> None:
    def cfg_of(*overrides: str):
        cfg = compose_cfg(*overrides)
        return cfg, {"experiment": next((o.split("=")[1] for o in overrides if o.startswith("experiment=")), None)}

    cfg, _ = cfg_of()
    assert default_run_name(cfg) == "qafel-qsgd4b-qsgd4b-K10-P5-s0"
    cfg, choices = cfg_of("experiment=paper_logreg")  # QSGD s = 4 up, s = 8 down
    assert default_run_name(cfg) == "qafel-qsgd4-qsgd8-K10-P10-s0"
    assert run_tags(cfg, choices) == ["algorithm:qafel", "client:qsgd4", "server:qsgd8", "experiment:paper_logreg",
                                      "dataset:mushrooms", "model:logreg"]
    cfg, _ = cfg_of("algorithm=fedbuff", "client.local_epochs=2", "seed=3", "algorithm.buffer_size=20")
    from qafel.experiment.config import validate

    assert default_run_name(validate(cfg)) == "fedbuff-fp32-fp32-K20-E2-s3"
    assert quantizer_label({"name": "topk", "fraction": 0.01}) == "topk0.01"
    assert quantizer_label({"name": "randk", "k": 100}) == "randk_k100"
    assert quantizer_label({"name": "minmax", "bits": 2}) == "minmax2b"
    command = rerun_command(["seed=1", "paths.output_dir=/x", "resume=true", "name=a b"])
    assert command == "python run.py seed=1 'name=a b'"
    assert multirun_group("multirun/2026-11-27/15-18-42") == "2026-11-27_15-18-42"
    assert multirun_group("multirun/bits") == "bits"


# ----------------------------------------------------------------------------------------- live runs
def test_a_run_mirrors_its_records_in_wandb(tmp_path: Path) -> None:
    origin = RunOrigin(choices={"algorithm": "qafel", "experiment": None}, overrides=["seed=0", "name=mine"])
    run_experiment(compose_cfg(*WANDB, "name=mine", "tracking.log_checkpoints=true", "model=logreg"), tmp_path,
                   origin=origin)
    log = the_log(tmp_path)
    assert_mirrors(log, tmp_path)  # with suboptimality: summary.json's (last) value, W&B's min only during the run
    assert log.summary["suboptimality"] == metrics(tmp_path)[-1]["suboptimality"]
    assert log.name == "mine" and log.job_type == "run"
    assert log.config["command"] == "python run.py seed=0 name=mine"
    assert log.artifacts[f"checkpoint-{log.run_id}"] == ("checkpoint", ["checkpoint.pt"])
    assert "client:qsgd4b" in log.tags and "dataset:digits" in log.tags


def test_resume_continues_the_same_wandb_run_with_each_step_once(tmp_path: Path) -> None:
    setting = (*WANDB, "run.server_steps=30", "run.checkpoint_every=10")

    def crash_at_25(record: dict) -> None:
        if record["server_step"] == 25:  # evaluations logged to 25, checkpoint at 20
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        run_experiment(compose_cfg(*setting), tmp_path, on_eval=crash_at_25)
    first = the_log(tmp_path)
    assert first.steps == [0, 5, 10, 15, 20, 25] and first.exit_code == 1
    run_experiment(compose_cfg(*setting), tmp_path, resume=True)
    log = the_log(tmp_path)  # one W&B run: the resumed log holds the whole run, the crashed one is superseded
    assert log.run_id == first.run_id
    assert log.steps == [0, 5, 10, 15, 20, 25, 30]
    assert_mirrors(log, tmp_path)
    assert len(superseded(tmp_path)) == 1


@pytest.mark.parametrize("failure", ["bad mode", "import error", "init error"])
def test_wandb_failing_never_stops_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    if failure == "bad mode":
        monkeypatch.setenv("WANDB_MODE", "sideways")
    elif failure == "import error":
        monkeypatch.setitem(sys.modules, "wandb", None)
    else:
        import wandb

        monkeypatch.setattr(wandb, "init", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no network")))
    with pytest.warns(UserWarning, match="W&B tracking disabled"):
        summary = run_experiment(compose_cfg(*WANDB), tmp_path)
    assert summary["status"] == "completed"
    assert json.loads((tmp_path / "run.json").read_text())["run_id"] == summary["run_id"]
    assert len(metrics(tmp_path)) == 5 and (tmp_path / "summary.json").is_file()


# -------------------------------------------------------------------------------------- qafel-wandb
def _comparable(log: WandbLog) -> dict:
    return {"run": (log.run_id, log.name, log.group, log.job_type, log.tags), "config": log.config,
            "history": log.history, "steps": log.steps, "exit": log.exit_code, "artifacts": log.artifacts,
            "summary": {k: v for k, v in log.summary.items() if k not in OWN_KEYS},
            "metrics": sorted(str(m) for m in log.metrics)}


def test_qafel_wandb_rebuilds_what_live_logging_wrote(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    live_dir, none_dir = tmp_path / "live", tmp_path / "none"
    run_experiment(compose_cfg(*WANDB), live_dir)
    live = the_log(live_dir)
    assert qafel_wandb([str(live_dir)]) == 0
    rebuilt = the_log(live_dir)
    assert rebuilt.path != live.path and _comparable(rebuilt) == _comparable(live)
    assert f"wandb sync {live_dir / 'wandb'}" in capsys.readouterr().out

    run_experiment(compose_cfg(*TINY, "tracking=none"), none_dir)
    assert not (none_dir / "wandb").exists()
    assert qafel_wandb([str(tmp_path)]) == 0  # both runs found below; idempotent: one live log per run
    assert_mirrors(the_log(none_dir), none_dir)
    assert len(superseded(live_dir)) == 2 and len(live_logs(live_dir)) == 1


def test_qafel_wandb_rebuilds_a_killed_run_and_refuses_nothing_found(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    run_experiment(compose_cfg(*TINY, "tracking=none"), tmp_path / "run")
    (tmp_path / "run" / "summary.json").unlink()  # as a killed run leaves it, with a torn last line
    with open(tmp_path / "run" / "metrics.jsonl", "a") as fh:
        fh.write('{"server_step": 25, "accur')
    assert qafel_wandb([str(tmp_path / "run")]) == 0
    log = the_log(tmp_path / "run")
    assert log.history == metrics_without_torn_line(tmp_path / "run") and log.exit_code == 1
    (tmp_path / "empty").mkdir()
    assert qafel_wandb([str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.startswith("error: no qafel run or sweep directory below")


def metrics_without_torn_line(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()[:-1]]


def test_console_script_and_module_entry_point() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["qafel-wandb"] == "qafel.experiment.wandb_runs:main"
    proc = subprocess.run([sys.executable, "-m", "qafel.experiment.wandb_runs", "--help"], capture_output=True,
                          text=True, timeout=120, env=env())
    assert proc.returncode == 0
    for flag in ("--project", "--entity", "--online", "--sync"):
        assert flag in proc.stdout


# ------------------------------------------------------------------------------------------- sweeps
MIXED = {"name": "mix",
         "base": ["run.progress=false", "run.server_steps=10", "run.eval_every=5", "dataset.num_clients=10",
                  "model=logreg", "algorithm.buffer_size=5", "client.local_steps=1", "run.compute_optimum=false",
                  "tracking=wandb"],
         # target 0 is reached at once, 1 never (a null objective: pruned); lr -1 fails validation
         "params": {"run.target_accuracy": [0.0, 1.0], "client.lr": [0.1, -1.0]},
         "objectives": [{"metric": "final_accuracy", "direction": "maximize"},
                        {"metric": "uploads_to_target", "direction": "minimize"}],
         "sampler": "grid"}


@pytest.fixture(scope="module")
def mixed_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished grid of four trials: complete, failed (invalid config), pruned, failed; W&B offline."""
    from qafel.sweep import main as sweep

    folder = tmp_path_factory.mktemp("sweep")
    (folder / "mix.yaml").write_text(yaml.safe_dump(MIXED, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        assert sweep([str(folder / "mix.yaml"), "--sweep-dir", str(folder / "out")]) == 0
    return folder / "out"


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_sweep_trials_and_summary_run_in_wandb(mixed_sweep: Path) -> None:
    out = mixed_sweep
    logs = live_logs(out)  # every trial and the summary run: one `wandb sync out/wandb`
    trials = {log.config["trial"]["number"]: log for log in logs.values() if log.job_type == "trial"}
    assert sorted(trials) == [0, 1, 2, 3] and len(logs) == 5
    expected = {}
    for n, log in trials.items():
        params = log.config["trial"]["params"]
        expected[n] = (("FAIL", 1) if params["client.lr"] < 0 else ("PRUNED", 0) if params["run.target_accuracy"]
                       else ("COMPLETE", 0))
        assert (log.summary["outcome"]["state"], log.exit_code) == expected[n]
        assert (log.name, log.group) == (f"mix-{n:04d}", "mix")
        assert {"sweep", "study:mix"} <= set(log.tags)
        assert log.config["command"].startswith("python run.py run.progress=false")
        assert "dataset:digits" in log.tags  # failed-validation trials too: run.json and a W&B run, from records
        state = expected[n][0]
        if state == "COMPLETE":
            assert_mirrors(log, out / "trials" / f"{n:04d}")
            assert log.summary["outcome"]["values"] == {"final_accuracy": log.summary["final_accuracy"],
                                                        "uploads_to_target": 0}
        elif state == "PRUNED":
            assert "pruned" in log.tags and "not reached" in log.summary["outcome"]["reason"]
        else:
            assert "failed" in log.tags and "client.lr=-1.0" in log.summary["outcome"]["reason"]
    (complete,) = [n for n, e in expected.items() if e[0] == "COMPLETE"]

    (summary,) = [log for log in logs.values() if log.job_type == "sweep-summary"]
    assert (summary.name, summary.group) == ("mix-summary", "mix")
    assert summary.config["directions"] == ["maximize", "minimize"]
    assert set(summary.config["search_space"]) == {"run.target_accuracy", "client.lr"}
    assert summary.config["sampler"] == {"name": "grid"} and summary.config["pruner"] == {"name": "none"}
    assert summary.summary["n_trials"] == 4 and summary.summary["pareto_trials"] == [complete]
    table = json.loads(next(summary.path.parent.glob("files/media/table/trials_*.table.json")).read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [(r["number"], r["pareto"], r["wandb_run_id"]) for r in rows] == [
        (n, n == complete, trials[n].run_id) for n in range(4)]
    assert any(r.WhichOneof("record_type") == "config" and any("pareto_front" in "".join(i.nested_key) + i.key
                                                              for i in r.config.update) for r in summary.records)
    kind, files = summary.artifacts[f"sweep-records-{summary.run_id}"]
    assert kind == "sweep-records" and {"trials.csv", "pareto.csv", "spec.json", "sweep.json"} <= set(files)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_sweep_rerun_updates_its_one_summary_run(mixed_sweep: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from qafel.sweep import main as sweep

    before = {log.run_id for log in live_logs(mixed_sweep).values() if log.job_type == "sweep-summary"}
    assert sweep([str(mixed_sweep.parent / "mix.yaml"), "--sweep-dir", str(mixed_sweep)]) == 0  # failed points rerun
    logs = live_logs(mixed_sweep)
    assert [log.run_id for log in logs.values() if log.job_type == "sweep-summary"] == sorted(before)
    assert len(logs) == 1 + len((mixed_sweep / "trials.csv").read_text().splitlines()[1:]) == 7
    assert f"wandb sync {mixed_sweep / 'wandb'}" in capfd.readouterr().out
    assert qafel_wandb(["--sync", "--dry-run", str(mixed_sweep.parent)]) == 0  # W&B's sync finds all, once each
    assert f"Would sync {len(logs)} run(s)" in capfd.readouterr().err


# -------------------------------------------------------------------------------- run.py, kill, multirun
def run_py(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=env(), capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow  # run.py in a new process, twice
def test_run_py_names_groups_and_prints_the_sync_command(tmp_path: Path) -> None:
    proc = run_py(f"hydra.run.dir={tmp_path / 'one'}", *WANDB, "name=my-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wandb sync {tmp_path / 'one' / 'wandb'}" in proc.stdout
    log = the_log(tmp_path / "one")
    assert_mirrors(log, tmp_path / "one")
    assert log.name == "my-run" and log.group == ""
    assert log.config["command"] == "python run.py " + " ".join((*WANDB, "name=my-run"))
    assert log.config["choices"]["client_quantizer"] == "qsgd" and "hydra/launcher" not in log.config["choices"]

    sweep_dir = tmp_path / "multi"
    proc = run_py("-m", "algorithm=qafel,fedbuff", f"hydra.sweep.dir={sweep_dir}", *WANDB)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = live_logs(sweep_dir)  # both jobs in the multirun's own wandb/ folder: one `wandb sync`
    assert {log.name for log in logs.values()} == {"qafel-qsgd4b-qsgd4b-K10-P5-s0", "fedbuff-fp32-fp32-K10-P5-s0"}
    assert {log.group for log in logs.values()} == {"multi"}
    assert not list(sweep_dir.glob("*/wandb"))
    for job in ("0", "1"):
        assert_mirrors(logs[json.loads((sweep_dir / job / "run.json").read_text())["wandb_id"]], sweep_dir / job)


@pytest.mark.slow  # run.py killed by SIGKILL after a checkpoint, then resumed, in new processes
def test_a_sigkilled_run_keeps_its_wandb_tail_and_resumes_as_one_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "killed"
    overrides = [*WANDB, "dataset.num_clients=20", "run.server_steps=400", "run.eval_every=10",
                 "run.checkpoint_every=40", "timing.rate=10", "client.local_steps=2"]
    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), f"hydra.run.dir={run_dir}", *overrides],
                            cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not ((run_dir / "checkpoint.pt").is_file() and (run_dir / "metrics.jsonl").is_file()
               and len(metrics(run_dir)) >= 7):  # checkpoint at 40, evaluations logged to 60
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGSTOP)  # W&B's own process goes on flushing the offline log meanwhile
    time.sleep(2.0)
    held = metrics(run_dir)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "summary.json").exists(), "the run finished before it could be killed"
    killed = the_log(run_dir)
    assert killed.history in (held, held[:-1])  # what metrics.jsonl held (but a row in flight) is in the log
    assert killed.exit_code is None

    done = run_py(f"resume={run_dir}", "run.progress=false")
    assert done.returncode == 0, done.stderr[-3000:]
    log = the_log(run_dir)
    assert log.run_id == killed.run_id and len(superseded(run_dir)) == 1, done.stderr[-3000:]
    assert log.steps == list(range(0, 401, 10))  # no gap, no step twice
    assert_mirrors(log, run_dir)
    assert log.config["command"] == "python run.py " + " ".join(overrides)  # the original run's, not resume=


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_qafel_wandb_rebuilds_a_sweep_as_it_was_logged(mixed_sweep: Path) -> None:
    def table(log: WandbLog) -> dict:
        return json.loads(next(log.path.parent.glob("files/media/table/trials_*.table.json")).read_text())

    before = live_logs(mixed_sweep)
    (old_summary,) = [log for log in before.values() if log.job_type == "sweep-summary"]
    old_table = table(old_summary)
    assert qafel_wandb([str(mixed_sweep)]) == 0
    after = live_logs(mixed_sweep)
    assert sorted(after) == sorted(before)
    for run_id, log in after.items():
        if log.job_type == "trial":  # pruned, failed and failed-validation trials as the sweep logged them
            assert _comparable(log) == _comparable(before[run_id])
        else:
            old = before[run_id]
            assert (log.name, log.group, log.tags, log.config) == (old.name, old.group, old.tags, old.config)
            assert no_media(log.own_summary()) == no_media(old.own_summary())
            assert log.artifacts.keys() == old.artifacts.keys() and table(log) == old_table


def no_media(summary: dict) -> dict:
    """A summary without its references to logged tables (their artifact paths differ per log)."""
    return {k: v for k, v in summary.items() if not (isinstance(v, dict) and "_type" in v)}
