"""W&B runs from run records: the live tracker, ``qafel-wandb`` (build or rebuild runs afterwards) and sync.

    qafel-wandb outputs/2026-11-27/15-18-42             # (re)build that run's W&B run, offline
    qafel-wandb multirun/bits outputs/sweeps/bitgrid    # every run and sweep found below these folders
    qafel-wandb outputs --project qafel-paper --online  # straight to the W&B server
    qafel-wandb --sync outputs/sweeps/bitgrid           # `wandb sync` every offline run found below
    python -m qafel.experiment.wandb_runs ...                      # the same command

A W&B run mirrors its run directory's records: its config is config.yaml plus run.json's Hydra choices,
overrides, rerun command (and trial); its history is metrics.jsonl, one row per evaluation at step =
``server_step``; its summary is summary.json key for key (and run.json's outcome); its records are an artifact of
type ``run-records``. Live logging (``WandbTracker``) and rebuilding (``build_run``) share these functions, and the
W&B id comes from the run's ``run_id``, so a rebuild replaces a run's log instead of adding a run.

In offline mode, a new log of a W&B run moves the older logs of that run to ``wandb/superseded/``, where
``wandb sync`` does not look: a resumed or rebuilt run is one log holding each server step once. A sweep's summary
run (``<study>-summary``) is built from the sweep's records (``spec.json``, ``trials.csv``, ``pareto.csv``,
``best.yaml``) the same way, live and by ``qafel-wandb``.

Exit codes of ``qafel-wandb``: 0 done; 1 W&B failed for some run (one line each); 2 no run directory found.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import shlex
import shutil
import struct
import subprocess
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from qafel.errors import EXIT_DIVERGED
from qafel.experiment.tracking import (
    ORIGIN_FILE,
    RunOrigin,
    _jsonable,
    hide_passwords_in,
    multirun_group,
    offline_runs,
    origin_record,
    read_json,
    read_origin,
    redacted_argv,
)

#: Files of a run directory logged as its ``run-records`` artifact (those present).
RECORD_FILES = ("config.yaml", ORIGIN_FILE, "metrics.jsonl", "summary.json")
#: Files of a sweep directory logged as its summary run's ``sweep-records`` artifact (those present).
SWEEP_RECORD_FILES = ("trials.csv", "pareto.csv", "best.yaml", "spec.json", "sweep.json")
#: Metrics W&B may plot the curves against (``server_step`` is the default x-axis).
X_AXES = ("uploads", "bytes_up", "bytes_broadcast", "bytes_total", "sim_time")
#: Curves and their W&B summary (None: the last value).
CURVES = {"accuracy": "max", "loss": "min", "suboptimality": "min", "hidden_state_error": None}
#: Seconds between flushes of the offline log to disk (W&B's default, 15 s, leaves a killed run's log empty).
FLUSH_INTERVAL_S = 0.1
SUPERSEDED = "superseded"


# ------------------------------------------------------------------------------------- reading logs
def read_wandb_log(path: Path) -> list[Any]:
    """The protobuf Records of a ``.wandb`` log: a ':W&B' header, then a LevelDB-style log of 32 KiB blocks whose
    chunks (7-byte header: CRC, length, type FULL/FIRST/MIDDLE/LAST) hold the records; a torn tail is ignored."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        return []
    records, pos, buf = [], 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        if pos + 7 + length > len(data):
            break
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: one record is complete
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def last_step(run_folder: Path) -> int:
    """The last history step an offline run folder's log holds (-1 when none)."""
    steps = [r.history.step.num for f in Path(run_folder).glob("*.wandb") for r in read_wandb_log(f)
             if r.WhichOneof("record_type") == "history"]
    return max(steps, default=-1)


# ------------------------------------------------------------------------------------ one W&B run
def _settings(wandb: Any) -> Any:
    """Silent (qafel prints the sync command itself), and the offline log flushed often where W&B allows it."""
    options: dict[str, Any] = {"silent": True, "init_timeout": 60}
    if "x_transaction_log_flush_interval" in getattr(wandb.Settings, "model_fields", {}):
        options["x_transaction_log_flush_interval"] = FLUSH_INTERVAL_S
    return wandb.Settings(**options)


def supersede(root: Path, wandb_id: str, keep: Path | None = None) -> int:
    """Move the offline logs of run ``wandb_id`` in ``root/wandb`` (but ``keep``) to ``wandb/superseded/``; return
    the last step of those already synced (-1 if none): a new log continues after them instead of repeating."""
    synced_last = -1
    for folder in offline_runs(root, wandb_id):
        if keep is not None and folder.resolve() == keep.resolve():
            continue
        if any(folder.glob("*.wandb.synced")):
            synced_last = max(synced_last, last_step(folder))
        target = folder.parent / SUPERSEDED / folder.name
        target.parent.mkdir(exist_ok=True)
        n = 1
        while target.exists():
            target, n = target.with_name(f"{folder.name}.{n}"), n + 1
        os.replace(folder, target)
    return synced_last


def define_metrics(run: Any) -> None:
    """Curves against ``server_step`` by default, with ``uploads``, bytes and ``sim_time`` as other x-axes;
    accuracy summarised by its max, loss and suboptimality by their min."""
    run.define_metric("server_step")
    for axis in X_AXES:
        run.define_metric(axis, step_metric="server_step")
    run.define_metric("*", step_metric="server_step")
    for name, summary in CURVES.items():
        run.define_metric(name, step_metric="server_step", **({"summary": summary} if summary else {}))


def wandb_config(run_dir: Path, origin: Mapping[str, Any]) -> dict[str, Any]:
    """The run's W&B config: config.yaml, then run.json's ``choices``, ``overrides``, ``command`` and ``trial``."""
    try:
        cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    extra = {key: origin.get(key) for key in ("choices", "overrides", "command")}
    if origin.get("trial"):
        extra["trial"] = origin["trial"]
    return hide_passwords_in({**cfg, **extra})


def open_run(run_dir: Path, origin: Mapping[str, Any], *, mode: str, project: str | None,
             entity: str | None) -> tuple[Any, int]:
    """Start (or resume) the W&B run of a run directory; return it and the first server step to log (older
    steps are already in W&B: in a synced log, or on the server of a resumed online run)."""
    root = Path(run_dir) / origin.get("wandb_dir", ".")
    run = _init(root, origin["wandb_id"], mode=mode, project=project, entity=entity, name=origin.get("name"),
                group=origin.get("group"), tags=origin.get("tags") or [], job_type=origin.get("job_type", "run"),
                config=wandb_config(run_dir, origin))
    define_metrics(run)
    synced_last = supersede(root, origin["wandb_id"], keep=_folder(run)) if mode in ("offline", "dryrun") else -1
    return run, max(synced_last + 1, int(getattr(run, "starting_step", 0) or 0))


def _init(root: Path, wandb_id: str, *, mode: str, project: str | None, entity: str | None, name: str | None,
          group: str | None, tags: Sequence[str], job_type: str, config: Mapping[str, Any]) -> Any:
    import wandb

    root.mkdir(parents=True, exist_ok=True)
    with redacted_argv():  # W&B records the command line (a --storage URL) as the run's args
        return wandb.init(id=wandb_id, resume="allow", project=project or "qafel", entity=entity, name=name,
                          group=group, tags=list(tags), job_type=job_type, config=dict(config), dir=str(root),
                          mode=mode, reinit="finish_previous", settings=_settings(wandb))


def _folder(run: Any) -> Path | None:
    """The run's own offline folder (``wandb/offline-run-...``)."""
    try:
        return Path(run.dir).parent
    except Exception:  # noqa: BLE001 - a disabled run has none
        return None


def log_row(run: Any, record: Mapping[str, Any]) -> None:
    """One evaluation record as a history row at its server step, committed at once (so that the summary
    written at the end comes after the last row)."""
    run.log(_jsonable(dict(record)), step=int(record["server_step"]), commit=True)


def exit_code(summary: Mapping[str, Any] | None, outcome: Mapping[str, Any] | None) -> int:
    """0 for a completed run or a pruned trial, 3 for a diverged run, else 1 (failed, or no summary: killed)."""
    state = (outcome or {}).get("state")
    if state in ("PRUNED", "FAIL"):
        return 0 if state == "PRUNED" else 1
    if not summary:
        return 1
    return {"completed": 0, "diverged": EXIT_DIVERGED}.get(summary.get("status"), 1)


def finish_run(run: Any, run_dir: Path, origin: Mapping[str, Any], log_checkpoints: bool = False) -> None:
    """Write the summary (summary.json key for key, nulls and nested values kept; run.json's outcome as
    ``outcome``), mark a pruned or failed trial in the tags, log the records as artifacts and finish the run."""
    summary = read_json(Path(run_dir) / "summary.json")
    summary = summary if isinstance(summary, dict) else None
    if summary:
        run.summary.update(summary)
    outcome = origin.get("outcome")
    if outcome:
        run.summary["outcome"] = dict(outcome)
        if outcome.get("state") in ("PRUNED", "FAIL"):
            run.tags = (*run.tags, "pruned" if outcome["state"] == "PRUNED" else "failed")
    log_artifacts(run, run_dir, origin["wandb_id"], log_checkpoints)
    run.finish(exit_code=exit_code(summary, outcome))


def log_artifacts(run: Any, run_dir: Path, wandb_id: str, log_checkpoints: bool = False) -> None:
    """The run's records as artifact ``run-records-<id>`` (type ``run-records``); its checkpoint as
    ``checkpoint-<id>`` (type ``checkpoint``) with ``tracking.log_checkpoints=true``."""
    import wandb

    from qafel.experiment.checkpoint import CHECKPOINT_NAME

    files = [Path(run_dir) / name for name in RECORD_FILES if (Path(run_dir) / name).is_file()]
    if files:
        records = wandb.Artifact(f"run-records-{wandb_id}", type="run-records",
                                 description="config.yaml, run.json, metrics.jsonl, summary.json")
        for path in files:
            records.add_file(str(path), name=path.name)
        run.log_artifact(records)
    checkpoint = Path(run_dir) / CHECKPOINT_NAME
    if log_checkpoints and checkpoint.is_file():
        artifact = wandb.Artifact(f"checkpoint-{wandb_id}", type="checkpoint")
        artifact.add_file(str(checkpoint), name=CHECKPOINT_NAME)
        run.log_artifact(artifact)


class WandbTracker:
    """Logs one run to W&B as it goes (offline unless configured otherwise); any failure only warns, and the
    local records stay complete (``qafel-wandb`` rebuilds the W&B run from them)."""

    def __init__(self, cfg: Mapping[str, Any], run_dir: Path, origin: Mapping[str, Any]) -> None:
        self.run: Any = None
        self.first_step = 0
        self.run_dir = Path(run_dir)
        self.log_checkpoints = bool(cfg.get("log_checkpoints"))
        try:
            mode = os.environ.get("WANDB_MODE", cfg.get("mode", "offline"))
            self.run, self.first_step = open_run(self.run_dir, origin, mode=mode, project=cfg.get("project"),
                                                 entity=cfg.get("entity"))
        except Exception as exc:  # noqa: BLE001 - tracking must never stop a run
            self._disable("W&B tracking disabled", exc)

    def _disable(self, what: str, exc: BaseException) -> None:
        warnings.warn(f"{what} ({type(exc).__name__}: {exc}); local records are kept (rebuild the W&B run with "
                      f"qafel-wandb {self.run_dir})", stacklevel=3)
        self.run = None

    def log(self, record: Mapping[str, Any]) -> None:
        """Log one evaluation record at its server step (steps W&B already holds are skipped)."""
        if self.run is None or int(record["server_step"]) < self.first_step:
            return
        try:
            log_row(self.run, record)
        except Exception as exc:  # noqa: BLE001
            self._disable("W&B log failed, further W&B logging disabled", exc)

    def finish(self, origin: Mapping[str, Any]) -> None:
        """Write the summary from summary.json (and ``origin``'s outcome), log the artifacts, close the run."""
        if self.run is None:
            return
        try:
            finish_run(self.run, self.run_dir, origin, self.log_checkpoints)
        except Exception as exc:  # noqa: BLE001
            self._disable("W&B finish failed", exc)
        self.run = None


# ---------------------------------------------------------------------------------- from records
def read_metrics(run_dir: Path) -> Iterator[dict[str, Any]]:
    """The evaluation records of metrics.jsonl (a torn or damaged line, as a killed run may leave, is skipped)."""
    import json

    try:
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("server_step"), int):
            yield record


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None


def _sweep_of(run_dir: Path) -> Path | None:
    """The sweep directory of a trial directory (``<sweep dir>/trials/NNNN``), else None."""
    sweep_dir = Path(run_dir).parent.parent
    if Path(run_dir).parent.name == "trials" and Path(run_dir).name.isdigit() and (
            (sweep_dir / "sweep.json").is_file() or (sweep_dir / "spec.json").is_file()):
        return sweep_dir
    return None


def _study(sweep_dir: Path) -> str:
    for name in ("spec.json", "sweep.json"):
        data = read_json(sweep_dir / name)
        if isinstance(data, dict) and data.get("study"):
            return str(data["study"])
    return sweep_dir.name


def layout_origin(run_dir: Path) -> RunOrigin:
    """What a run directory without run.json tells of its origin: Hydra's ``.hydra/`` files (choices,
    overrides), a multirun's sweep directory (group) or a sweep's trial folder (study, trial number)."""
    run_dir = Path(run_dir)
    hydra = _read_yaml(run_dir / ".hydra" / "hydra.yaml") or {}
    choices = ((hydra.get("hydra") or {}).get("runtime") or {}).get("choices")
    overrides = _read_yaml(run_dir / ".hydra" / "overrides.yaml")
    origin = RunOrigin(choices=choices if isinstance(choices, dict) else None,
                       overrides=overrides if isinstance(overrides, list) else None)
    sweep_dir = _sweep_of(run_dir)
    if sweep_dir is not None:
        study, number = _study(sweep_dir), int(run_dir.name)
        origin = RunOrigin(job_type="trial", group=study, name=f"{study}-{number:04d}",
                           tags=["sweep", f"study:{study}"], wandb_dir=os.path.join("..", ".."),
                           trial={"study": study, "number": number})
    elif (run_dir.parent / "multirun.yaml").is_file():
        origin.group, origin.wandb_dir = multirun_group(run_dir.parent), ".."
    return origin


def origin_for(run_dir: Path) -> dict[str, Any]:
    """run.json, else an origin derived from config.yaml and the layout; a trial that ended without an outcome
    (killed) takes its state and reason from the sweep's trials.csv."""
    run_dir = Path(run_dir)
    origin = read_origin(run_dir)
    if origin is None:
        cfg = _read_yaml(run_dir / "config.yaml")
        cfg = cfg if isinstance(cfg, dict) else {}
        summary = read_json(run_dir / "summary.json") or {}
        run_id = cfg.get("run_id") or summary.get("run_id") or hashlib.sha1(
            str(run_dir.resolve()).encode()).hexdigest()
        origin = origin_record({**cfg, "run_id": run_id}, layout_origin(run_dir))
    sweep_dir = _sweep_of(run_dir)
    if origin.get("outcome") is None and origin.get("trial") and sweep_dir is not None:
        origin["outcome"] = _csv_outcome(sweep_dir, int(origin["trial"]["number"]))
    return origin


def _csv_outcome(sweep_dir: Path, number: int) -> dict[str, Any] | None:
    """A trial's state, objective values and reason as the sweep's trials.csv has them."""
    spec = read_json(sweep_dir / "spec.json") or {}
    names = [o["name"] for o in spec.get("objectives") or []]
    for row in read_table(sweep_dir / "trials.csv"):
        if row.get("number") == number:
            values = {n: row.get(n) for n in names} if row.get("state") == "COMPLETE" else None
            return {"state": row.get("state"), "values": values, "reason": row.get("reason")}
    return None


def build_run(run_dir: Path, *, mode: str = "offline", project: str | None = None,
              entity: str | None = None) -> dict[str, Any]:
    """Build (or rebuild) the W&B run of a run directory from its records alone; return its origin.

    The records are what live logging sends (``WandbTracker``), with the same W&B id: in offline mode the new
    log replaces any older one of the run. ``project`` and ``entity`` default to the run's ``tracking`` node.
    """
    run_dir = Path(run_dir)
    origin = origin_for(run_dir)
    tracking = (_read_yaml(run_dir / "config.yaml") or {}).get("tracking") or {}
    run, first = open_run(run_dir, origin, mode=mode, project=project or tracking.get("project"),
                          entity=entity or tracking.get("entity"))
    for record in read_metrics(run_dir):
        if record["server_step"] >= first:
            log_row(run, record)
    finish_run(run, run_dir, origin, bool(tracking.get("log_checkpoints")))
    return origin


# ------------------------------------------------------------------------------- sweep summary run
def sweep_summary_id(study: str, storage: str) -> str:
    """The stable W&B id of a sweep's summary run: from its study name and (password-free) storage URL."""
    return "sweep-" + hashlib.sha1(f"{storage}\n{study}".encode()).hexdigest()[:20]


def _cell(text: str | None) -> Any:
    """A CSV cell as a number when it is one, None when empty, else the text."""
    if text is None or text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def read_table(path: Path) -> list[dict[str, Any]]:
    """A CSV file's rows with numbers parsed (empty cells as None); [] when it is missing."""
    try:
        with open(path, newline="") as fh:
            return [{k: _cell(v) for k, v in row.items()} for row in csv.DictReader(fh)]
    except OSError:
        return []


def _trial_ids(sweep_dir: Path, rows: list[dict[str, Any]]) -> dict[int, str | None]:
    """The W&B run id of every trial in ``rows`` (None when its folder has no records)."""
    ids: dict[int, str | None] = {}
    for row in rows:
        folder = sweep_dir / "trials" / f"{row['number']:04d}"
        ids[row["number"]] = origin_for(folder)["wandb_id"] if folder.is_dir() and any(folder.iterdir()) else None
    return ids


def _plot_axes(objectives: list[dict[str, Any]]) -> tuple[str, str]:
    """(x, y) objective names for the Pareto scatter: y the first maximized objective (accuracy), x another."""
    y = next((i for i, o in enumerate(objectives) if o["direction"] == "maximize"), 0)
    x = next(i for i in range(len(objectives)) if i != y)
    return objectives[x]["name"], objectives[y]["name"]


def sweep_config(sweep_dir: Path) -> dict[str, Any]:
    """The summary run's config: study, sweep file, storage, overrides, search space, objectives and their
    directions, sampler and pruner (from spec.json)."""
    spec = read_json(sweep_dir / "spec.json") or {}
    objectives = spec.get("objectives") or []
    return hide_passwords_in({"study": _study(sweep_dir), "sweep": spec.get("sweep"), "storage": spec.get("storage"),
                              "overrides": spec.get("overrides"), "base": spec.get("base"),
                              "search_space": spec.get("params"), "objectives": objectives,
                              "directions": [o.get("direction") for o in objectives],
                              "sampler": spec.get("sampler"), "pruner": spec.get("pruner")})


def build_sweep_summary(sweep_dir: Path, *, mode: str = "offline", project: str | None = None,
                        entity: str | None = None) -> str:
    """Build (or update) a sweep's ``<study>-summary`` W&B run from the sweep directory's records; its id.

    The run holds the trials as a table (``pareto``: on the Pareto front; ``wandb_run_id``: the trial's W&B run),
    a W&B scatter of the Pareto front (several objectives), the counts and best trial in its summary, and the
    sweep's record files as artifact ``sweep-records-<id>`` (type ``sweep-records``).
    """
    import wandb

    sweep_dir = Path(sweep_dir)
    spec = read_json(sweep_dir / "spec.json") or {}
    study = _study(sweep_dir)
    owner = read_json(sweep_dir / "sweep.json") or {}
    wandb_id = spec.get("wandb_id") or sweep_summary_id(study, owner.get("storage") or str(sweep_dir.resolve()))
    tracking = spec.get("tracking") or {}
    run = _init(sweep_dir, wandb_id, mode=mode, project=project or tracking.get("project"),
                entity=entity or tracking.get("entity"), name=f"{study}-summary", group=study,
                tags=[*(tracking.get("tags") or []), "sweep", "sweep-summary", f"study:{study}"],
                job_type="sweep-summary", config=sweep_config(sweep_dir))
    if mode in ("offline", "dryrun"):
        supersede(sweep_dir, wandb_id, keep=_folder(run))
    rows = read_table(sweep_dir / "trials.csv")
    front = {r["number"] for r in read_table(sweep_dir / "pareto.csv")}
    ids = _trial_ids(sweep_dir, rows)
    columns = list(rows[0]) if rows else ["number", "state"]
    columns += ["pareto", "wandb_run_id"]
    data = [[*(row.get(c) for c in columns[:-2]), row["number"] in front, ids[row["number"]]] for row in rows]
    payload: dict[str, Any] = {"trials": wandb.Table(columns=columns, data=data)}
    objectives = spec.get("objectives") or []
    if len(objectives) > 1 and front:
        x, y = _plot_axes(objectives)
        points = wandb.Table(columns=["number", x, y], data=[[r["number"], r.get(x), r.get(y)] for r in rows
                                                              if r["number"] in front])
        payload["pareto_front"] = wandb.plot.scatter(points, x, y, title=f"{study}: Pareto front, {y} vs {x}")
    run.log(payload)
    run.summary.update(_sweep_counts(rows, front, _read_yaml(sweep_dir / "best.yaml")))
    files = [sweep_dir / n for n in SWEEP_RECORD_FILES if (sweep_dir / n).is_file()]
    if files:
        artifact = wandb.Artifact(f"sweep-records-{wandb_id}", type="sweep-records")
        for path in files:
            artifact.add_file(str(path), name=path.name)
        run.log_artifact(artifact)
    run.finish()
    return wandb_id


def _sweep_counts(rows: list[dict[str, Any]], front: set[int], best: Any) -> dict[str, Any]:
    """The summary run's summary: trials by state, the Pareto front or the best trial."""
    states = [r.get("state") for r in rows]
    out: dict[str, Any] = {"n_trials": len(rows), "n_complete": states.count("COMPLETE"),
                           "n_pruned": states.count("PRUNED"), "n_failed": states.count("FAIL")}
    if front:
        out["pareto_trials"] = sorted(front)
    if isinstance(best, dict) and best.get("trial") is not None:
        out.update(best_trial=best["trial"], best_value=best.get("value"))
    return out


# ------------------------------------------------------------------------------------------- CLI
_SKIP = {"wandb", ".hydra", SUPERSEDED, "__pycache__"}


def is_run_dir(path: Path) -> bool:
    """A qafel run directory: run.json, or config.yaml beside metrics.jsonl or summary.json."""
    return (path / ORIGIN_FILE).is_file() or ((path / "config.yaml").is_file() and (
        (path / "metrics.jsonl").is_file() or (path / "summary.json").is_file()))


def find_records(paths: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """The run directories and sweep directories at or below ``paths`` (W&B and Hydra folders skipped)."""
    runs: dict[Path, None] = {}
    sweeps: dict[Path, None] = {}
    for top in paths:
        for folder, dirs, _files in os.walk(top):
            dirs[:] = sorted(d for d in dirs if d not in _SKIP)
            here = Path(folder)
            if is_run_dir(here):
                runs[here] = None
            if (here / "sweep.json").is_file() and (here / "trials.csv").is_file():
                sweeps[here] = None
    return list(runs), list(sweeps)


def wandb_dirs(paths: Sequence[Path]) -> list[Path]:
    """The ``wandb/`` folders at or below ``paths`` that hold offline runs (superseded logs left out)."""
    found: dict[Path, None] = {}
    for top in paths:
        for folder, dirs, _files in os.walk(top):
            if Path(folder).name == "wandb" and offline_runs(Path(folder).parent):
                found[Path(folder)] = None
            dirs[:] = sorted(d for d in dirs if d not in (SUPERSEDED, ".hydra") and not d.startswith("offline-run-"))
    return list(found)


def wandb_command() -> list[str]:
    """The ``wandb`` command line tool (its console script, else ``python -m wandb``)."""
    script = shutil.which("wandb")
    return [script] if script else [sys.executable, "-m", "wandb"]


def sync(paths: Sequence[Path], project: str | None, entity: str | None, dry_run: bool) -> int:
    """Run ``wandb sync`` over every folder of offline runs below ``paths``; its exit status."""
    folders = wandb_dirs(paths)
    if not folders:
        print(f"error: no offline W&B runs below {', '.join(map(str, paths))}", file=sys.stderr)
        return 2
    args = ["sync", *(["--project", project] if project else []), *(["--entity", entity] if entity else []),
            *(["--dry-run"] if dry_run else []), *map(str, folders)]
    print(shlex.join(["wandb", *args]), file=sys.stderr)
    return subprocess.run([*wandb_command(), *args], check=False).returncode


def build(paths: Sequence[Path], mode: str, project: str | None, entity: str | None) -> int:
    """Build the W&B runs of every run and sweep directory below ``paths``; the exit status."""
    runs, sweeps = find_records(paths)
    if not runs and not sweeps:
        print(f"error: no qafel run or sweep directory below {', '.join(map(str, paths))}", file=sys.stderr)
        return 2
    failed = 0
    for run_dir in runs:
        try:
            origin = build_run(run_dir, mode=mode, project=project, entity=entity)
            print(f"{origin['wandb_id']}  {origin.get('name')}  {run_dir}")
        except Exception as exc:  # noqa: BLE001 - one line per run, then the next
            failed += 1
            print(f"error: {run_dir}: W&B run not built ({type(exc).__name__}: {exc})", file=sys.stderr)
    for sweep_dir in sweeps:
        try:
            print(f"{build_sweep_summary(sweep_dir, mode=mode, project=project, entity=entity)}  "
                  f"{_study(sweep_dir)}-summary  {sweep_dir}")
        except Exception as exc:  # noqa: BLE001
            failed += 1
            print(f"error: {sweep_dir}: W&B summary run not built ({type(exc).__name__}: {exc})", file=sys.stderr)
    if mode != "online":
        for folder in wandb_dirs(paths):
            print(f"offline W&B runs in {folder}: upload with `wandb sync {folder}`")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    """The ``qafel-wandb`` argument parser."""
    p = argparse.ArgumentParser(
        prog="qafel-wandb", description="Build (or rebuild) W&B runs from qafel run records: run, multirun and sweep "
        "directories found below each PATH (offline unless --online); or with --sync, upload their offline runs.")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="run, multirun or sweep directory (or above)")
    p.add_argument("--project", default=None, help="W&B project (default: each run's tracking.project)")
    p.add_argument("--entity", default=None, help="W&B entity (default: each run's tracking.entity)")
    p.add_argument("--online", action="store_true", help="log to the W&B server now instead of offline")
    p.add_argument("--sync", action="store_true", help="run `wandb sync` on every offline run below PATH")
    p.add_argument("--dry-run", action="store_true", help="with --sync: list what would be uploaded")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``qafel-wandb``; returns the exit status (0, 1 some run failed, 2 nothing found)."""
    args = build_parser().parse_args(argv)
    missing = [p for p in args.paths if not p.exists()]
    if missing:
        print(f"error: {missing[0]}: no such file or directory", file=sys.stderr)
        return 2
    if args.sync:
        return sync(args.paths, args.project, args.entity, args.dry_run)
    return build(args.paths, "online" if args.online else "offline", args.project, args.entity)


if __name__ == "__main__":
    sys.exit(main())

