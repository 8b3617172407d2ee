"""Optuna sweeps over qafel runs: accuracy versus communicated bytes, resumable, logged to W&B, many workers.

    qafel-sweep sweeps/pareto_bytes.yaml                        # multi-objective: accuracy vs total bytes
    qafel-sweep sweeps/lr_tuning.yaml --n-trials 20 seed=1      # extra Hydra overrides apply to every trial
    qafel-sweep sweeps/bitgrid.yaml --size smoke                # the sweep file's `smoke` size (tests)
    qafel-sweep sweeps/pareto_bytes.yaml --workers 2            # two local worker processes, one storage
    qafel-sweep sweeps/pareto_bytes.yaml --storage postgresql://user:pw@host/db --study-name pb1
    qafel-sweep sweeps/bitgrid.yaml --launcher slurm --jobs 8   # worker jobs on SLURM (qafel.sweep_jobs)
    qafel-sweep sweeps/bitgrid.yaml --status                    # the study's progress; --collect: its outputs now
    python -m qafel.sweep ...                                   # the same command

A sweep file (``sweeps/*.yaml``)::

    name: pareto_bytes                  # default study name (else the file's stem)
    base: [model=mlp, run.progress=false]   # Hydra overrides for every trial
    params:                             # the search space, sampled in this order; keys are override keys
      algorithm: [qafel, naive]         # a list: categorical choices
      client_quantizer.bits: {type: int, low: 2, high: 8, when: {algorithm: qafel}}   # conditional
      client.lr: {type: float, low: 1.0e-2, high: 1.0e+2, log: true}
      algorithm.buffer_size: {type: int, low: 2, high: 32, log: true}
    objectives:                         # one (best.yaml) or several (pareto.csv, pareto.png)
      - {metric: final_accuracy, direction: maximize}
      - {metric: bytes_up + bytes_broadcast, direction: minimize, name: bytes_sent}
      # a null metric (uploads_to_target when the target is not reached) prunes the trial, unless `missing: X`
    sampler: {name: nsga2, seed: 0, population_size: 12}     # tpe | nsga2 | random | grid (+ sampler kwargs)
    pruner: {name: median, n_startup_trials: 5, metric: accuracy, direction: maximize}   # single objective only
    n_trials: 40                        # per command; grid: default the points not yet run
    sizes:                              # --size NAME: replaces n_trials, adds overrides, replaces params
      smoke: {n_trials: 3, overrides: [run.server_steps=10], params: {...}}

Trials run in ``<sweep dir>/trials/NNNN/`` (``outputs/sweeps/<study>/`` by default) with the same run function
as ``run.py``; the study lives in ``<sweep dir>/study.db`` unless ``--storage`` (or the environment variable
``QAFEL_STORAGE``, which keeps a password off the command line) names another. Rerunning the same command
resumes the study and adds trials; a grid runs every point that has no COMPLETE or PRUNED trial, after failing
the RUNNING trials of workers that are gone (``qafel.sweep_runtime``). After the trials the sweep writes
``trials.csv``, and ``pareto.csv`` + ``pareto.png`` (several objectives) or ``best.yaml`` (one objective).
``sweep.json`` records which study the sweep directory belongs to.

Exit codes: 0 done (trials may have failed or been pruned: see trials.csv); 2 bad sweep file, option, override
or storage (one line naming it); 4 refused: the sweep directory or study name belongs to another sweep (one
line saying which --sweep-dir or --study-name to use); 130 / 143 interrupted by SIGINT / SIGTERM (the running
trials are failed, finished ones kept: rerun the same command to resume). ``--launcher``, ``--status`` and
``--collect`` use the same codes.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing
import os
import shlex
import signal
import sys
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

import qafel
from qafel.checkpoint import comparable, first_difference
from qafel.compose import compose, config_dir, override_key
from qafel.errors import ConfigError
from qafel.sweep_runtime import (
    GRACE_S,
    HEARTBEAT_S,
    Interrupted,
    die_with_parent,
    grid_points,
    journal_heartbeat,
    prepare_grid,
    reclaim_dead_trials,
    run_queue,
    sigterm_interrupts,
    worker_identity,
)
from qafel.tracking import (
    ORIGIN_FILE,
    RunOrigin,
    hide_passwords,
    offline_runs,
    origin_record,
    read_json,
    write_json,
    write_origin,
)

SAMPLERS = ("tpe", "nsga2", "random", "grid")
PRUNERS = ("none", "median", "percentile", "hyperband", "successive_halving", "threshold", "patient")
PARAM_TYPES = ("categorical", "int", "float")
SPEC_KEYS = ("name", "description", "base", "params", "objectives", "sampler", "pruner", "n_trials", "sizes")
SIZE_KEYS = ("n_trials", "overrides", "params", "sampler", "pruner")
#: Summary keys recorded with every trial (user attr ``summary``) and written to trials.csv.
TRIAL_SUMMARY_KEYS = ("status", "final_accuracy", "final_loss", "bytes_up", "bytes_broadcast", "bytes_down_naive",
                      "bytes_total", "uploads_to_target", "server_steps", "uploads", "mean_staleness", "wall_time_s",
                      "diverged_at_step")


#: qafel-sweep's exit codes (README "Sweeps"): bad input, and a refusal to mix two sweeps' records.
EXIT_BAD_INPUT = 2
EXIT_REFUSED = 4
#: In a sweep directory: which study its records belong to.
OWNER_FILE = "sweep.json"
#: In a sweep directory: the sweep as its study runs it (qafel-wandb rebuilds the summary run from it).
SPEC_FILE = "spec.json"


class SweepError(RuntimeError):
    """The sweep cannot run (storage, study or config directory problem); the message says why."""


class SweepRefused(SweepError):
    """Running would mix this sweep's records with another's (sweep directory, study name); exit 4."""


# ------------------------------------------------------------------------------------------------ spec
@dataclass
class Param:
    """One search-space dimension; ``name`` is the Hydra override key (e.g. ``client_quantizer.bits``)."""

    name: str
    type: str
    choices: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    when: dict[str, list[Any]] = field(default_factory=dict)

    def active(self, context: Mapping[str, Any]) -> bool:
        """Whether the condition ``when`` holds for the values chosen so far (fixed overrides + sampled)."""
        for key, allowed in self.when.items():
            if key not in context or format_value(context[key]) not in {format_value(a) for a in allowed}:
                return False
        return True

    def suggest(self, trial: optuna.Trial) -> Any:
        """Sample this parameter in ``trial``."""
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, self.choices)
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def grid(self) -> list[Any]:
        """The finite list of values the grid sampler visits."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is None:
            raise ConfigError(f"params.{self.name}.step", None, "the grid sampler needs a step (or choices) for "
                              "float parameters")
        n = int(math.floor((self.high - self.low) / self.step + 1e-9))
        return [float(self.low + i * self.step) for i in range(n + 1)]


@dataclass
class Objective:
    """An objective: a summary key (or a sum of keys, ``bytes_up + bytes_broadcast``) and a direction."""

    name: str
    metrics: list[str]
    direction: str
    missing: float | None = None

    def value(self, summary: Mapping[str, Any]) -> float | None:
        """The objective's value from a run summary; None when a metric is null and no ``missing`` is set."""
        parts = [summary.get(m) for m in self.metrics]
        if any(p is None for p in parts):
            return None if self.missing is None else float(self.missing)
        return float(sum(float(p) for p in parts))

    @property
    def is_bytes(self) -> bool:
        """Whether the objective counts bytes (plotted in MB)."""
        return all(m.startswith("bytes") for m in self.metrics)


@dataclass
class SweepSpec:
    """A parsed sweep file."""

    name: str
    base: list[str]
    params: list[Param]
    objectives: list[Objective]
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    n_trials: int | None = None
    description: str = ""
    sizes: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = "<sweep>"

    @property
    def multi_objective(self) -> bool:
        """Whether the sweep has several objectives."""
        return len(self.objectives) > 1

    @property
    def conditional(self) -> bool:
        """Whether any parameter has a ``when`` condition."""
        return any(p.when for p in self.params)


def format_value(value: Any) -> str:
    """A Python value as a Hydra override value (``null``, ``true``, ``0.01``, strings verbatim)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def merge_overrides(*lists: Sequence[str]) -> list[str]:
    """Concatenate override lists; a later override of the same key replaces the earlier one in place."""
    out: dict[str, str] = {}
    for overrides in lists:
        for o in overrides:
            out[override_key(o)] = o
    return list(out.values())


def _parse_param(name: str, raw: Any) -> Param:
    where = f"params.{name}"
    if isinstance(raw, list):
        raw = {"type": "categorical", "choices": raw}
    if not isinstance(raw, Mapping):
        raise ConfigError(where, raw, "must be a list of choices or a mapping with type, low/high or choices")
    unknown = set(raw) - {"type", "choices", "low", "high", "step", "log", "when"}
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}", raw[sorted(unknown)[0]],
                          "unknown key; allowed: type, choices, low, high, step, log, when")
    kind = raw.get("type")
    if kind is None:
        if "choices" in raw:
            kind = "categorical"
        else:
            kind = "int" if all(isinstance(raw.get(k), int) for k in ("low", "high")) else "float"
    if kind not in PARAM_TYPES:
        raise ConfigError(f"{where}.type", kind, f"must be one of {', '.join(PARAM_TYPES)}")
    when = raw.get("when") or {}
    if not isinstance(when, Mapping):
        raise ConfigError(f"{where}.when", when, "must be a mapping {override key: value or list of values}")
    when = {str(k): list(v) if isinstance(v, list) else [v] for k, v in when.items()}
    if kind == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}.choices", choices, "must be a non-empty list")
        for c in choices:
            if not (c is None or isinstance(c, str | int | float | bool)):
                raise ConfigError(f"{where}.choices", c, "choices must be strings, numbers, booleans or null")
        return Param(name, kind, choices=choices, when=when)
    low, high, step, log = raw.get("low"), raw.get("high"), raw.get("step"), bool(raw.get("log", False))
    for key, v in (("low", low), ("high", high)):
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ConfigError(f"{where}.{key}", v, "must be a number")
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"{where}.low", low, "int parameters need integer low and high")
    if low > high:
        raise ConfigError(f"{where}.low", low, f"must be <= high ({high})")
    if log and low <= 0:
        raise ConfigError(f"{where}.low", low, "must be > 0 with log: true")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int | float) or step <= 0):
        raise ConfigError(f"{where}.step", step, "must be a number > 0")
    if log and step is not None and not (kind == "int" and step == 1):
        raise ConfigError(f"{where}.step", step, "cannot be combined with log: true")
    return Param(name, kind, low=low, high=high, step=step, log=log, when=when)


def _parse_objective(i: int, raw: Any) -> Objective:
    where = f"objectives[{i}]"
    if not isinstance(raw, Mapping) or "metric" not in raw:
        raise ConfigError(where, raw, "must be a mapping with metric and direction")
    unknown = set(raw) - {"metric", "direction", "name", "missing"}
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}", raw[sorted(unknown)[0]],
                          "unknown key; allowed: metric, direction, name, missing")
    metric = raw["metric"]
    metrics = [m.strip() for m in metric.split("+")] if isinstance(metric, str) else metric
    if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) and m for m in metrics):
        raise ConfigError(f"{where}.metric", metric, "must be a summary key, or keys joined by + (or a list)")
    from qafel.api import NUMERIC_SUMMARY_KEYS  # the keys summary.json holds, as the run function writes them

    for m in metrics:
        if m not in NUMERIC_SUMMARY_KEYS:
            raise ConfigError(f"{where}.metric", metric, f"{m!r} is not a numeric summary.json key; allowed: "
                              f"{', '.join(NUMERIC_SUMMARY_KEYS)}")
    direction = raw.get("direction", "maximize" if metrics == ["final_accuracy"] else "minimize")
    if direction not in ("maximize", "minimize"):
        raise ConfigError(f"{where}.direction", direction, "must be one of maximize, minimize")
    missing = raw.get("missing")
    if missing is not None and (isinstance(missing, bool) or not isinstance(missing, int | float)):
        raise ConfigError(f"{where}.missing", missing, "must be a number or null")
    return Objective(str(raw.get("name") or "+".join(metrics)), metrics, direction, missing)


def _named(raw: Any, key: str, allowed: tuple[str, ...], default: str) -> dict[str, Any]:
    out = {"name": raw} if isinstance(raw, str) else dict(raw or {"name": default})
    if raw is None and key == "pruner":
        out = {"name": "none"}
    out.setdefault("name", default)
    if out["name"] not in allowed:
        raise ConfigError(f"{key}.name", out["name"], f"must be one of {', '.join(allowed)}")
    return out


def _check_pruner_metric(pruner: Mapping[str, Any]) -> None:
    """The pruner watches a key of every evaluation record (metrics.jsonl): refuse one no record holds."""
    from qafel.engine import RECORD_KEYS

    metric = pruner.get("metric", "accuracy")
    allowed = [k for k in RECORD_KEYS if k != "server_step"]
    if pruner["name"] != "none" and metric not in allowed:
        raise ConfigError("pruner.metric", metric, f"not a key of the evaluation records; one of {', '.join(allowed)}")


def parse_spec(data: Mapping[str, Any], source: str = "<sweep>") -> SweepSpec:
    """Check a sweep file's contents and return the spec (raises ConfigError naming the bad key)."""
    if not isinstance(data, Mapping):
        raise ConfigError("sweep", data, "must be a YAML mapping")
    unknown = set(data) - set(SPEC_KEYS)
    if unknown:
        k = sorted(unknown)[0]
        raise ConfigError(k, data[k], f"unknown key; allowed: {', '.join(SPEC_KEYS)}")
    base = list(data.get("base") or [])
    if not all(isinstance(o, str) and "=" in o for o in base):
        raise ConfigError("base", base, "must be a list of Hydra overrides key=value")
    params_raw = data.get("params") or {}
    if not isinstance(params_raw, Mapping):
        raise ConfigError("params", params_raw, "must be a mapping {override key: choices or range}")
    params = [_parse_param(str(k), v) for k, v in params_raw.items()]
    objectives_raw = data.get("objectives") or [{"metric": "final_accuracy", "direction": "maximize"}]
    if not isinstance(objectives_raw, list):
        raise ConfigError("objectives", objectives_raw, "must be a list of {metric, direction}")
    objectives = [_parse_objective(i, o) for i, o in enumerate(objectives_raw)]
    if len({o.name for o in objectives}) != len(objectives):
        raise ConfigError("objectives", [o.name for o in objectives], "objective names must be distinct")
    sampler = _named(data.get("sampler"), "sampler", SAMPLERS, "nsga2" if len(objectives) > 1 else "tpe")
    pruner = _named(data.get("pruner") if "pruner" in data else "none", "pruner", PRUNERS, "none")
    _check_pruner_metric(pruner)
    n_trials = data.get("n_trials")
    if n_trials is not None and (not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1):
        raise ConfigError("n_trials", n_trials, "must be an integer >= 1 or null")
    sizes = data.get("sizes") or {}
    if not isinstance(sizes, Mapping):
        raise ConfigError("sizes", sizes, "must be a mapping {size name: {n_trials, overrides, params, ...}}")
    for size, body in sizes.items():
        if not isinstance(body, Mapping) or set(body) - set(SIZE_KEYS):
            raise ConfigError(f"sizes.{size}", body, f"must be a mapping with keys among {', '.join(SIZE_KEYS)}")
    name = str(data.get("name") or Path(source).stem)
    spec = SweepSpec(name=name, base=base, params=params, objectives=objectives, sampler=sampler, pruner=pruner,
                     n_trials=n_trials, description=str(data.get("description") or ""),
                     sizes={str(k): dict(v) for k, v in sizes.items()}, source=source)
    if spec.sampler["name"] == "grid":
        for p in spec.params:
            p.grid()
    return spec


def with_size(spec: SweepSpec, size: str) -> SweepSpec:
    """The spec at a named size: its n_trials, extra overrides, replaced params, sampler and pruner."""
    if size not in spec.sizes:
        raise ConfigError("--size", size, f"must be one of {', '.join(spec.sizes) or '(this sweep has no sizes)'}")
    body = spec.sizes[size]
    data: dict[str, Any] = {
        "name": spec.name, "description": spec.description,
        "base": merge_overrides(spec.base, body.get("overrides") or []),
        "params": {**{p.name: _param_raw(p) for p in spec.params}, **(body.get("params") or {})},
        "objectives": [{"metric": o.metrics, "direction": o.direction, "name": o.name, "missing": o.missing}
                       for o in spec.objectives],
        "sampler": {**spec.sampler, **(body.get("sampler") or {})},
        "pruner": {**spec.pruner, **(body.get("pruner") or {})},
        "n_trials": body.get("n_trials", spec.n_trials),
    }
    return parse_spec(data, spec.source)


def _param_raw(p: Param) -> dict[str, Any]:
    raw: dict[str, Any] = {"type": p.type, "when": p.when}
    if p.type == "categorical":
        raw["choices"] = p.choices
    else:
        raw.update(low=p.low, high=p.high, log=p.log)
        if p.step is not None:
            raw["step"] = p.step
    return raw


def find_sweep_file(name: str | Path) -> Path:
    """The sweep file: a path, or a name looked up in ./sweeps/ and the repository's sweeps/."""
    path = Path(name)
    if path.is_file():
        return path
    stem = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
    candidates = [Path("sweeps") / stem, Path(qafel.__file__).resolve().parents[2] / "sweeps" / stem]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError("sweep", str(name), "no such sweep file (looked in " + ", ".join(map(str, [path, *candidates]))
                      + ")")


def load_spec(name: str | Path, size: str | None = None) -> SweepSpec:
    """Read and check a sweep file, at ``size`` if given."""
    path = find_sweep_file(name)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError("sweep", str(path), f"not valid YAML ({exc})") from None
    spec = parse_spec(data or {}, str(path))
    return with_size(spec, size) if size else spec


# ------------------------------------------------------------------------------------------- configs
def compose_config(overrides: Sequence[str], conf: Path | None = None, return_hydra_config: bool = False) -> DictConfig:
    """Compose ``config.yaml`` with these overrides, as ``python run.py`` would (``qafel.compose.compose``)."""
    return compose(overrides, conf, return_hydra_config=return_hydra_config)


def sample_params(trial: optuna.Trial, params: Sequence[Param], fixed: Mapping[str, Any]) -> dict[str, Any]:
    """Sample the active parameters in order; a parameter whose ``when`` fails is left out."""
    context: dict[str, Any] = dict(fixed)
    chosen: dict[str, Any] = {}
    for p in params:
        if p.active(context):
            chosen[p.name] = context[p.name] = p.suggest(trial)
    return chosen


# -------------------------------------------------------------------------------------- the objective
@dataclass
class SweepPlan:
    """Everything a worker needs to run trials (picklable: it travels to worker processes)."""

    spec: SweepSpec
    study_name: str
    storage: str
    sweep_dir: Path
    overrides: list[str]
    conf: Path
    pinned: list[str] = field(default_factory=list)
    context: dict[str, str] = field(default_factory=dict)
    wandb: bool = False
    fixed: dict[str, Any] = field(default_factory=dict)  # the effective config every trial shares (see plan_sweep)
    tracking: dict[str, Any] = field(default_factory=dict)  # the sweep's tracking node (W&B project, mode, ...)

    @property
    def params(self) -> list[Param]:
        """The search space without the parameters fixed by command-line overrides."""
        return [p for p in self.spec.params if p.name not in self.pinned]


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _pruning_hook(trial: optuna.Trial, plan: SweepPlan) -> Callable[[dict[str, Any]], None] | None:
    """``on_eval`` that reports the pruner's metric (accuracy) per evaluation and raises TrialPruned when told to.

    Single objective only (Optuna has no intermediate values for several); reported even without a pruner.
    """
    pruner = plan.spec.pruner
    if plan.spec.multi_objective:
        return None
    metric = pruner.get("metric", "accuracy")
    direction = pruner.get("direction", "maximize" if metric == "accuracy" else "minimize")
    sign = 1.0 if direction == plan.spec.objectives[0].direction else -1.0

    def on_eval(record: dict[str, Any]) -> None:
        step, value = int(record["server_step"]), record.get(metric)
        if value is None or step == 0:
            return
        value = float(value)
        if not math.isfinite(value):  # the engine stops a diverged run itself; run_trial records it as pruned
            return
        trial.report(sign * value, step)
        if trial.should_prune():
            reason = f"pruned by the {pruner['name']} pruner at server step {step} ({metric}={value:.4g})"
            trial.set_user_attr("reason", reason)
            raise optuna.TrialPruned(reason)

    return on_eval


def trial_outcome(spec: SweepSpec, summary: Mapping[str, Any] | None,
                  error: BaseException | None = None) -> dict[str, Any]:
    """A trial's ``state`` (COMPLETE, PRUNED or FAIL), objective ``values`` and ``reason``, from the summary of
    its run or the exception that ended it: a diverged run, or a null or non-finite objective, is pruned."""
    if error is not None:
        if isinstance(error, optuna.TrialPruned):
            return {"state": "PRUNED", "values": None, "reason": str(error) or "pruned"}
        if isinstance(error, KeyboardInterrupt):
            why = error.args[0] if isinstance(error, Interrupted) else "SIGINT"
            return {"state": "FAIL", "values": None, "reason": f"interrupted ({why})"}
        return {"state": "FAIL", "values": None, "reason": hide_passwords(f"{type(error).__name__}: {error}")}
    if summary.get("status") == "diverged":
        return {"state": "PRUNED", "values": None, "reason": f"diverged at server step "
                f"{summary.get('diverged_at_step')} (non-finite model or loss)"}
    values: dict[str, float] = {}
    for obj in spec.objectives:
        v = obj.value(summary)
        if v is None or not math.isfinite(v):
            extra = (f" (target accuracy {summary.get('target_accuracy')} not reached)"
                     if "uploads_to_target" in obj.metrics and v is None else "")
            return {"state": "PRUNED", "values": None,
                    "reason": f"objective {obj.name} is {'null' if v is None else v}{extra}"}
        values[obj.name] = v
    return {"state": "COMPLETE", "values": values, "reason": None}


def trial_origin(plan: SweepPlan, number: int, params: Mapping[str, Any], overrides: list[str]) -> RunOrigin:
    """A trial's run origin: W&B run ``<study>-NNNN`` of job type ``trial`` in group ``<study>``, logged offline
    to the sweep directory's ``wandb/`` with every other trial and the summary run."""
    return RunOrigin(job_type="trial", group=plan.study_name, name=f"{plan.study_name}-{number:04d}",
                     tags=["sweep", f"study:{plan.study_name}"], overrides=overrides,
                     wandb_dir=os.path.join("..", ".."),
                     trial={"study": plan.study_name, "number": number, "params": dict(params)})


def run_trial(trial: optuna.Trial, plan: SweepPlan) -> float | list[float]:
    """One trial: sample, compose the config, run it with ``run_experiment``, return the objective value(s).

    A diverged run, or a null or non-finite objective, raises TrialPruned with the reason in the user attr
    ``reason``; any other exception is recorded the same way and re-raised (Optuna marks the trial failed).
    The trial's state, values and reason are also in its run.json and W&B run (a trial that fails before its
    run starts, e.g. on an invalid config, gets both too). An existing trial directory is never written to: the
    trial fails with SweepRefused.
    """
    from qafel.api import run_experiment

    trial.set_user_attr("worker", worker_identity())  # tells a dead worker's RUNNING trial from a live one
    for stale in ("reason", "summary", "heartbeat"):  # a heartbeat retry copies the failed trial's attrs
        if trial.user_attrs.get(stale) is not None:
            trial.set_user_attr(stale, None)
    params = sample_params(trial, plan.params, plan.context)
    overrides = merge_overrides(plan.overrides, [f"{k}={format_value(v)}" for k, v in params.items()])
    run_dir = plan.sweep_dir / "trials" / f"{trial.number:04d}"
    trial.set_user_attr("overrides", overrides)
    trial.set_user_attr("run_dir", str(run_dir))
    if run_dir.exists():
        reason = (f"{run_dir} already exists (records of another study or run; left as they are): "
                  "use another --sweep-dir")
        trial.set_user_attr("reason", reason)
        raise SweepRefused(reason)
    origin = trial_origin(plan, trial.number, params, overrides)
    cfg: DictConfig | None = None
    try:
        cfg = compose_config(overrides, plan.conf, return_hydra_config=True)
        origin.choices = dict(cfg.hydra.runtime.choices)
        with open_dict(cfg):
            cfg.run_id = uuid.uuid4().hex  # known even if the config fails validation: the trial's W&B run id
        with journal_heartbeat(trial, enabled=plan.storage.startswith("journal:")):
            summary = run_experiment(cfg, run_dir, on_eval=_pruning_hook(trial, plan), origin=origin,
                                     outcome=lambda summary, error: trial_outcome(plan.spec, summary, error))
    except optuna.TrialPruned:
        raise
    except Exception as exc:
        trial.set_user_attr("reason", hide_passwords(f"{type(exc).__name__}: {exc}"))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "traceback.txt").write_text(hide_passwords(traceback.format_exc()))
        _record_unstarted(plan, run_dir, cfg, origin, trial_outcome(plan.spec, None, exc))
        raise
    except KeyboardInterrupt as exc:
        trial.set_user_attr("reason", trial_outcome(plan.spec, None, exc)["reason"])
        raise
    trial.set_user_attr("summary", {k: _finite(summary.get(k)) for k in TRIAL_SUMMARY_KEYS})
    result = trial_outcome(plan.spec, summary)
    if result["state"] == "PRUNED":
        trial.set_user_attr("reason", result["reason"])
        raise optuna.TrialPruned(result["reason"])
    values = list(result["values"].values())
    return values if plan.spec.multi_objective else values[0]


def _record_unstarted(plan: SweepPlan, run_dir: Path, cfg: DictConfig | None, origin: RunOrigin,
                      outcome: Mapping[str, Any]) -> None:
    """A trial that failed before its run wrote any record (an invalid config, a missing data file): run.json
    with its origin and outcome, and its W&B run built from that (never raises: the trial's failure stands)."""
    if (run_dir / ORIGIN_FILE).exists():
        return
    try:
        node = cfg if cfg is not None else {"run_id": uuid.uuid4().hex}
        write_origin(run_dir, {**origin_record(node, origin), "outcome": dict(outcome)})
        if plan.wandb:
            from qafel.wandb_runs import build_run

            tracking = (cfg if cfg is not None else compose_config(plan.overrides, plan.conf)).tracking
            build_run(run_dir, mode=os.environ.get("WANDB_MODE", tracking.get("mode", "offline")),
                      project=tracking.get("project"), entity=tracking.get("entity"))
    except Exception as exc:  # noqa: BLE001 - tracking never stops a sweep
        warnings.warn(f"trial {origin.name}: no run.json or W&B run ({type(exc).__name__}: {exc})", stacklevel=2)


# --------------------------------------------------------------------------------- storage and study
def storage_url(storage: str | None, sweep_dir: Path) -> str:
    """The storage URL: default a SQLite file in the sweep directory; a bare ``.db`` path is SQLite,
    a bare ``.log``/``.jsonl`` path is an Optuna journal file (``journal:PATH`` too)."""
    if not storage:
        return f"sqlite:///{(sweep_dir / 'study.db').resolve()}"
    if "://" in storage or storage.startswith("journal:"):
        return storage
    path = Path(storage).resolve()
    if path.suffix in (".log", ".jsonl", ".journal"):
        return f"journal:{path}"
    return f"sqlite:///{path}"


def _with_driver(url: str) -> str:
    """``postgresql://`` with the installed driver: SQLAlchemy 2.1 defaults to psycopg 3, qafel ships psycopg2."""
    scheme, sep, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres") or not sep:
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2://{rest}"
    return f"postgresql://{rest}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for the URL: RDB (SQLite, PostgreSQL, MySQL) with heartbeats, or a journal file."""
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url[len("journal:"):].removeprefix("//"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        Path(url.split(":///", 1)[-1]).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 120}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # heartbeats: a trial whose process died (killed machine) is failed after grace_period and rerun once
            return optuna.storages.RDBStorage(
                _with_driver(url), engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
    except ImportError as exc:
        raise SweepError(f"storage {redact(url)}: the database driver is missing ({exc}); for PostgreSQL: "
                         "pip install psycopg2-binary") from None
    except Exception as exc:  # noqa: BLE001 - one clear line instead of a driver traceback
        raise SweepError(f"cannot open storage {redact(url)}: {type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from None


def redact(url: str) -> str:
    """The storage URL with any password hidden."""
    if "://" not in url or "@" not in url:
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return url.split("://", 1)[0] + "://***"


def make_sampler(spec: SweepSpec, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The spec's sampler; ``seed_offset`` keeps workers and resumed runs from repeating each other."""
    opts = {k: v for k, v in spec.sampler.items() if k != "name"}
    seed = opts.pop("seed", None)
    seed = None if seed is None else int(seed) + seed_offset
    name = spec.sampler["name"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # BruteForceSampler
        return _sampler(name, spec, seed, opts)


def _sampler(name: str, spec: SweepSpec, seed: int | None, opts: dict[str, Any]) -> optuna.samplers.BaseSampler:
    try:
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, **opts)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, **opts)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed, **opts)
        if spec.conditional:  # a tree-shaped grid: every valid combination once
            return optuna.samplers.BruteForceSampler(seed=seed, **opts)
        return optuna.samplers.GridSampler({p.name: p.grid() for p in spec.params}, seed=seed, **opts)
    except TypeError as exc:
        raise ConfigError("sampler", spec.sampler, str(exc)) from None


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    """The spec's pruner (NopPruner for ``none`` or several objectives)."""
    opts = {k: v for k, v in spec.pruner.items() if k not in ("name", "metric", "direction")}
    name = spec.pruner["name"]
    if name == "none" or spec.multi_objective:
        return optuna.pruners.NopPruner()
    classes = {"median": optuna.pruners.MedianPruner, "percentile": optuna.pruners.PercentilePruner,
               "hyperband": optuna.pruners.HyperbandPruner,
               "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
               "threshold": optuna.pruners.ThresholdPruner}
    try:
        if name == "patient":
            inner = dict(opts.pop("wrapped", {"name": "median"}))
            wrapped = make_pruner(replace(spec, pruner=inner))
            return optuna.pruners.PatientPruner(wrapped, **opts)
        return classes[name](**opts)
    except TypeError as exc:
        raise ConfigError("pruner", spec.pruner, str(exc)) from None


def spec_fingerprint(spec: SweepSpec, fixed: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What makes a study's trials comparable: base overrides, search space, objectives, sampler and pruner
    (not the sweep file's path, description, n_trials or sizes), and the effective config the trials share
    (``fixed``: the base config with the command line's overrides, bookkeeping keys left out), as JSON values."""
    data = {"base": spec.base, "params": {p.name: _param_raw(p) for p in spec.params},
            "objectives": [{"metrics": o.metrics, "direction": o.direction, "name": o.name, "missing": o.missing}
                           for o in spec.objectives],
            "sampler": spec.sampler, "pruner": spec.pruner}
    if fixed:
        data["config"] = dict(fixed)
    return json.loads(json.dumps(data, default=str))


def _check_same_sweep(study: optuna.study.FrozenStudy, plan: SweepPlan) -> None:
    """Refuse a study that was created from another sweep spec or with other objectives' directions."""
    where = f"study {plan.study_name!r} in {redact(plan.storage)}"
    theirs = [d.name.lower() for d in study.directions]
    ours = [o.direction for o in plan.spec.objectives]
    if theirs != ours:
        raise SweepRefused(f"{where} has directions {theirs}, this sweep {ours}: use another --study-name")
    saved = study.user_attrs.get("spec")
    mine = spec_fingerprint(plan.spec, plan.fixed)
    if saved is not None and "config" in saved and "config" in mine:
        diff = first_difference(saved["config"], mine["config"])
        if diff is not None:
            key, theirs_value, ours_value = diff
            raise SweepRefused(f"{where} ran its trials with {key}={theirs_value!r}, this command with "
                               f"{key}={ours_value!r} (its overrides or config differ): use another --study-name, "
                               "or the study's own overrides")
    if saved is not None:  # studies made before the shared config was recorded: compare what they hold
        saved, mine = ({k: v for k, v in d.items() if k != "config"} for d in (saved, mine))
    if saved is not None and saved != mine:
        diff = ", ".join(k for k in mine if saved.get(k) != mine[k])
        raise SweepRefused(f"{where} was made from another sweep ({study.user_attrs.get('sweep')}; this one, "
                           f"{plan.spec.source}, differs in {diff}): use another --study-name")


def _owner_record(plan: SweepPlan) -> dict[str, Any]:
    default = plan.storage == storage_url(None, plan.sweep_dir)
    return {"study": plan.study_name, "storage": None if default else redact(plan.storage),
            "sweep": plan.spec.source}


def check_sweep_dir(plan: SweepPlan, count_trials: Callable[[], int]) -> None:
    """Refuse a sweep directory that holds another study's records: its ``sweep.json`` names another study
    (or storage), or ``trials/`` holds a folder with a number this study has not reached."""
    owner = plan.sweep_dir / OWNER_FILE
    mine = _owner_record(plan)
    if owner.is_file():
        try:
            theirs = json.loads(owner.read_text())
        except (OSError, ValueError):
            raise SweepRefused(f"{owner} is not a qafel sweep record (unreadable JSON): use another "
                               "--sweep-dir") from None
        if (theirs.get("study"), theirs.get("storage")) != (mine["study"], mine["storage"]):
            store = f" in {theirs['storage']}" if theirs.get("storage") else ""
            raise SweepRefused(f"{plan.sweep_dir} holds study {theirs.get('study')!r}{store}: use another --sweep-dir "
                               f"for study {plan.study_name!r}, or --study-name {theirs.get('study')} (with its "
                               "storage) to resume that one")
    # listed before the study's trials are counted: a live worker may add a trial and its folder meanwhile
    folders = sorted(d for d in (plan.sweep_dir / "trials").glob("*") if d.is_dir())
    if folders:
        n = count_trials()
        for d in folders:
            if not (d.name.isdigit() and int(d.name) < n) and any(d.iterdir()):
                raise SweepRefused(f"{d} holds records that study {plan.study_name!r} did not write (it has {n} "
                                   "trials): use another --sweep-dir")


def _write_owner(plan: SweepPlan) -> None:
    owner = plan.sweep_dir / OWNER_FILE
    if not owner.exists():
        tmp = owner.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_owner_record(plan), indent=2) + "\n")
        os.replace(tmp, owner)


def create_or_load_study(plan: SweepPlan) -> optuna.Study:
    """Create the study in its storage, or load it to resume; refuse (SweepRefused, before writing anything) a
    study made from another sweep spec, and a sweep directory that holds another study's records."""
    storage = open_storage(plan.storage)
    existing = next((s for s in storage.get_all_studies() if s.study_name == plan.study_name), None)
    if existing is not None:
        _check_same_sweep(existing, plan)

    def count_trials() -> int:
        if existing is None:
            return 0
        return len(optuna.load_study(study_name=plan.study_name, storage=storage).get_trials(deepcopy=False))

    check_sweep_dir(plan, count_trials)
    directions = [o.direction for o in plan.spec.objectives]
    study = optuna.create_study(storage=storage, study_name=plan.study_name, directions=directions,
                                load_if_exists=True, sampler=make_sampler(plan.spec), pruner=make_pruner(plan.spec))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([o.name for o in plan.spec.objectives])
    if "sweep" not in study.user_attrs:
        study.set_user_attr("sweep", plan.spec.source)
        study.set_user_attr("objectives", [{"name": o.name, "metrics": o.metrics, "direction": o.direction}
                                           for o in plan.spec.objectives])
    if "spec" not in study.user_attrs:
        study.set_user_attr("spec", spec_fingerprint(plan.spec, plan.fixed))
    _write_owner(plan)
    write_spec_record(plan)
    return study


def _is_grid(plan: SweepPlan) -> bool:
    return plan.spec.sampler["name"] == "grid"


def _worker(plan: SweepPlan, n_trials: int | None, seed_offset: int, threads: int | None = None) -> None:
    """Run ``n_trials`` trials (None: until the grid is done) of the plan's study in this process.

    A grid runs the trials ``prepare_grid`` queued (every parameter fixed, so the sampler is never asked); other
    samplers run Optuna's loop. A SweepRefused in a trial stops the worker and is raised.
    """
    if threads:
        import torch

        from qafel.system import set_core_budget

        torch.set_num_threads(threads)
        set_core_budget(threads)  # run.job_threads=null then plans for this worker's share of the cores
    spec = replace(plan.spec, params=plan.params)
    sampler = optuna.samplers.RandomSampler() if _is_grid(plan) else make_sampler(spec, seed_offset)
    study = optuna.load_study(study_name=plan.study_name, storage=open_storage(plan.storage), sampler=sampler,
                              pruner=make_pruner(spec))
    refused: list[SweepRefused] = []

    def objective(trial: optuna.Trial) -> float | list[float]:
        try:
            return run_trial(trial, plan)
        except SweepRefused as exc:
            refused.append(exc)
            if not _is_grid(plan):  # Optuna's loop; run_queue asks `stop` itself
                trial.study.stop()
            raise

    if _is_grid(plan):
        run_queue(study, grid_points(plan.params, plan.context), objective, n_trials, stop=lambda: bool(refused))
    else:
        study.optimize(objective, n_trials=n_trials, catch=(Exception,), gc_after_trial=True)
    if refused:
        raise refused[0]


def _spawn_worker(plan: SweepPlan, n_trials: int | None, seed_offset: int, threads: int, parent: int) -> None:
    """A worker process: stops with its parent (even one killed by SIGKILL); SIGTERM fails the running trial."""
    die_with_parent(parent)
    with sigterm_interrupts():
        try:
            _worker(plan, n_trials, seed_offset, threads)
        except KeyboardInterrupt:
            sys.exit(130)
        except SweepRefused as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(EXIT_REFUSED)


def split_trials(n_trials: int | None, workers: int) -> list[int | None]:
    """Each worker's number of trials (None: until the grid's queue is empty); workers without a trial left out."""
    if n_trials is None:
        return [None] * workers
    return [s for s in (n_trials // workers + (i < n_trials % workers) for i in range(workers)) if s > 0]


def run_workers(plan: SweepPlan, n_trials: int | None, workers: int, seed_offset: int) -> list[int]:
    """Run the trials in this process (one worker) or in ``workers`` spawned processes; the failed ones' exit
    codes. Interrupted (SIGINT, SIGTERM), the workers get 30 s to fail their trials, then SIGTERM, then SIGKILL."""
    if workers <= 1:
        _worker(plan, n_trials, seed_offset)
        return []
    shares = split_trials(n_trials, workers)
    threads = max(1, (os.cpu_count() or 1) // len(shares))
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_spawn_worker, args=(plan, share, seed_offset + 7919 * (i + 1), threads, os.getpid()),
                         name=f"qafel-sweep-worker-{i}") for i, share in enumerate(shares)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt as exc:
        _stop_workers(procs, signalled=not isinstance(exc, Interrupted))
        raise
    return [p.exitcode for p in procs if p.exitcode != 0]


def _stop_workers(procs: list[multiprocessing.process.BaseProcess], signalled: bool) -> None:
    """Stop interrupted workers: a terminal's Ctrl-C reached them too (wait), a SIGTERM only this process."""
    deadline = time.monotonic() + (30 if signalled else 0)
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join()


# ------------------------------------------------------------------------------------------- outputs
def _trial_row(t: optuna.trial.FrozenTrial, spec: SweepSpec) -> dict[str, Any]:
    summary = t.user_attrs.get("summary") or {}
    row: dict[str, Any] = {"number": t.number, "state": t.state.name}
    for i, obj in enumerate(spec.objectives):
        row[obj.name] = t.values[i] if t.values is not None and len(t.values) > i else None
    for p in spec.params:
        row[f"params_{p.name}"] = t.params.get(p.name)
    for extra in sorted(set(t.params) - {p.name for p in spec.params}):
        row[f"params_{extra}"] = t.params[extra]
    for key in TRIAL_SUMMARY_KEYS:
        if key not in row:
            row[key] = summary.get(key)
    row["duration_s"] = (t.datetime_complete - t.datetime_start).total_seconds() if (
        t.datetime_complete and t.datetime_start) else None
    row["reason"] = t.user_attrs.get("reason") or t.system_attrs.get("fail_reason")
    row["run_dir"] = t.user_attrs.get("run_dir")
    row["datetime_start"] = t.datetime_start.isoformat() if t.datetime_start else None
    row["datetime_complete"] = t.datetime_complete.isoformat() if t.datetime_complete else None
    return row


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if r.get(k) is None else r[k] for k in columns})
    os.replace(tmp, path)


def _columns(rows: list[dict[str, Any]], first: list[str]) -> list[str]:
    cols = list(first)
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


def _plot_axes(spec: SweepSpec) -> tuple[int, int]:
    """(x, y) objective indices for the Pareto plot: y the first maximized objective (accuracy), x another."""
    y = next((i for i, o in enumerate(spec.objectives) if o.direction == "maximize"), 0)
    x = next(i for i in range(len(spec.objectives)) if i != y)
    return x, y


def write_pareto_plot(path: Path, trials: list[optuna.trial.FrozenTrial], front: list[optuna.trial.FrozenTrial],
                      spec: SweepSpec, title: str) -> None:
    """Scatter every completed trial, with the Pareto front highlighted (bytes objectives in MB)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xi, yi = _plot_axes(spec)
    ox, oy = spec.objectives[xi], spec.objectives[yi]

    def scaled(obj: Objective, v: float) -> float:
        return v / 1e6 if obj.is_bytes else v

    def label(obj: Objective) -> str:
        return f"{obj.name} (MB, {obj.direction})" if obj.is_bytes else f"{obj.name} ({obj.direction})"

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    front_ids = {t.number for t in front}
    others = [t for t in done if t.number not in front_ids]
    ax.scatter([scaled(ox, t.values[xi]) for t in others], [scaled(oy, t.values[yi]) for t in others],
               c="0.6", s=22, label=f"trials ({len(done)} completed)")
    pts = sorted((scaled(ox, t.values[xi]), scaled(oy, t.values[yi]), t.number) for t in front)
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", c="tab:red", ms=6, lw=1.2,
                drawstyle="steps-post" if len(spec.objectives) == 2 else "default",
                label=f"Pareto front ({len(pts)})")
        for px, py, n in pts:
            ax.annotate(str(n), (px, py), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if not done:
        ax.text(0.5, 0.5, "no completed trials yet", ha="center", va="center", transform=ax.transAxes)
    xs = [scaled(ox, t.values[xi]) for t in done]
    if xs and min(xs) > 0 and max(xs) / min(xs) > 20:  # bytes often span decades
        from matplotlib.ticker import FuncFormatter, NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(label(ox))
    ax.set_ylabel(label(oy))
    extra = f"; front over all {len(spec.objectives)} objectives" if len(spec.objectives) > 2 else ""
    ax.set_title(f"{title}: {oy.name} vs {ox.name}{extra}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(study: optuna.Study, plan: SweepPlan) -> dict[str, Path]:
    """Write trials.csv, and pareto.csv + pareto.png (several objectives) or best.yaml (one); return the paths."""
    spec, out = plan.spec, plan.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    rows = [_trial_row(t, spec) for t in trials]
    first = ["number", "state", *[o.name for o in spec.objectives], *[f"params_{p.name}" for p in spec.params]]
    written = {"trials.csv": out / "trials.csv"}
    _write_csv(written["trials.csv"], rows, _columns(rows, first))
    if spec.multi_objective:
        front = study.best_trials
        xi, _ = _plot_axes(spec)
        front = sorted(front, key=lambda t: t.values[xi])
        front_rows = [_trial_row(t, spec) for t in front]
        written["pareto.csv"] = out / "pareto.csv"
        _write_csv(written["pareto.csv"], front_rows, _columns(front_rows, first))
        written["pareto.png"] = out / "pareto.png"
        write_pareto_plot(written["pareto.png"], trials, front, spec, plan.study_name)
        return written
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return written
    best = study.best_trial
    overrides = list(best.user_attrs.get("overrides") or [])
    best_doc = {
        "study": plan.study_name,
        "trial": best.number,
        "objective": spec.objectives[0].name,
        "direction": spec.objectives[0].direction,
        "value": best.value,
        "params": dict(best.params),
        "overrides": overrides,
        "command": shlex.join(["python", "run.py", *overrides]),
        "run_dir": best.user_attrs.get("run_dir"),
    }
    written["best.yaml"] = out / "best.yaml"
    written["best.yaml"].write_text(
        "# The study's best trial: `command` reruns it (run.py with the trial's overrides, in order)\n"
        + yaml.safe_dump(best_doc, sort_keys=False))
    return written


def write_spec_record(plan: SweepPlan) -> None:
    """``spec.json`` in the sweep directory: the study, its spec (base overrides, search space, objectives and
    directions, sampler, pruner), the overrides, the tracking settings and the summary run's W&B id, so that
    ``qafel-wandb`` rebuilds the summary run from the sweep's records alone."""
    from qafel.wandb_runs import sweep_summary_id

    path = plan.sweep_dir / SPEC_FILE
    old = read_json(path) or {}
    write_json(path, {
        "study": plan.study_name,
        "wandb_id": old.get("wandb_id") or sweep_summary_id(plan.study_name, redact(plan.storage)),
        "sweep": plan.spec.source, "storage": _owner_record(plan)["storage"],
        "overrides": [hide_passwords(o) for o in plan.overrides],
        **spec_fingerprint(plan.spec),
        "tracking": {k: plan.tracking.get(k) for k in ("backend", "project", "entity", "mode")}
        | {"tags": list(plan.tracking.get("tags") or [])},
    })


def log_sweep_to_wandb(study: optuna.Study, plan: SweepPlan, written: Mapping[str, Path]) -> None:
    """The sweep's one W&B summary run (``<study>-summary``, group = study, a stable id: a rerun updates it),
    built from the sweep directory's records (``qafel.wandb_runs.build_sweep_summary``). Never raises."""
    try:
        from qafel.wandb_runs import build_sweep_summary

        cfg = compose_config(plan.overrides, plan.conf).tracking
        build_sweep_summary(plan.sweep_dir, mode=os.environ.get("WANDB_MODE", cfg.get("mode", "offline")),
                            project=cfg.get("project"), entity=cfg.get("entity"))
    except Exception as exc:  # noqa: BLE001 - tracking must never stop a sweep
        warnings.warn(f"W&B sweep summary skipped ({type(exc).__name__}: {exc})", stacklevel=2)


# ----------------------------------------------------------------------------------------------- CLI
def plan_sweep(sweep: str | Path | SweepSpec, *, n_trials: int | None = None, study_name: str | None = None,
               storage: str | None = None, overrides: Sequence[str] = (), size: str | None = None,
               sweep_dir: str | Path | None = None, need_n: bool = True,
               check_params: bool = True) -> tuple[SweepPlan, int | None]:
    """The sweep's plan and the number of trials to add (None: a grid's points not yet run), checked before
    anything is written: the spec, the overrides, and (``check_params``) that every parameter changes the runs.
    ``need_n``: a sampler other than grid needs ``n_trials`` (from the file or ``--n-trials``)."""
    spec = sweep if isinstance(sweep, SweepSpec) else load_spec(sweep, size)
    if isinstance(sweep, SweepSpec) and size:
        spec = with_size(spec, size)
    if n_trials is not None and n_trials < 0:
        raise ConfigError("--n-trials", n_trials, "must be an integer >= 0")
    name = study_name or (f"{spec.name}-{size}" if size else spec.name)
    out = Path(sweep_dir) if sweep_dir else Path("outputs") / "sweeps" / name
    n = n_trials if n_trials is not None else spec.n_trials
    if need_n and n is None and spec.sampler["name"] != "grid":
        raise ConfigError("n_trials", None, "set n_trials in the sweep file or pass --n-trials")
    conf = config_dir()
    all_overrides = merge_overrides(spec.base, overrides)
    base_cfg = _base_config(all_overrides, conf)
    plan = SweepPlan(spec=spec, study_name=name, storage=storage_url(storage or os.environ.get("QAFEL_STORAGE"), out),
                     sweep_dir=out.resolve(), overrides=all_overrides, conf=conf,
                     pinned=[override_key(o) for o in overrides], context=_context(base_cfg, spec, all_overrides),
                     wandb=base_cfg.tracking.get("backend") == "wandb", fixed=_fixed_config(base_cfg),
                     tracking=OmegaConf.to_container(base_cfg.tracking))
    if check_params:
        check_params_take_effect(plan)
    return plan, n


def run_sweep(sweep: str | Path | SweepSpec, *, n_trials: int | None = None, study_name: str | None = None,
              storage: str | None = None, workers: int = 1, overrides: Sequence[str] = (), size: str | None = None,
              sweep_dir: str | Path | None = None) -> tuple[optuna.Study, dict[str, Path]]:
    """Run (or resume) a sweep; return the study and the output files written.

    ``n_trials`` trials are added per call (default: the sweep file's, or the grid points not yet run),
    split over ``workers`` processes on the same storage (``storage`` default: ``QAFEL_STORAGE``, else SQLite in
    the sweep directory). A grid reruns every point that has no COMPLETE or PRUNED trial, after failing the
    RUNNING trials of workers that are gone (``reclaim_dead_trials``).
    """
    if workers < 1:
        raise ConfigError("--workers", workers, "must be an integer >= 1")
    plan, n = plan_sweep(sweep, n_trials=n_trials, study_name=study_name, storage=storage, overrides=overrides,
                         size=size, sweep_dir=sweep_dir)
    out = plan.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    study = create_or_load_study(plan)
    before = len(study.trials)
    n = _plan_trials(study, plan, n, workers)
    failed_workers: list[int] = []
    if n is None or n > 0:
        try:
            failed_workers = run_workers(plan, n, workers, seed_offset=before)
        except KeyboardInterrupt:
            write_outputs(study, plan)
            raise
    written = write_outputs(study, plan)
    if plan.wandb:
        log_sweep_to_wandb(study, plan, written)
    if EXIT_REFUSED in failed_workers:
        raise SweepRefused("a worker refused to write into a trial directory (see above); the study keeps its "
                           "finished trials")
    if failed_workers:
        raise SweepError(f"{len(failed_workers)} worker process(es) exited with an error (see above); the study keeps "
                         "their finished trials: rerun the same command to resume")
    return study, written


def _plan_trials(study: optuna.Study, plan: SweepPlan, n: int | None, workers: int) -> int | None:
    """Fail the trials of dead workers, queue a grid's missing points, say what this command adds; the number of
    trials to run (None: until the grid is done)."""
    where = f"study {plan.study_name} in {redact(plan.storage)}"
    before = len(study.get_trials(deepcopy=False))
    dead = reclaim_dead_trials(study, journal=plan.storage.startswith("journal:"))
    if dead:
        print(f"{where}: trial(s) {', '.join(map(str, dead))} failed (their worker is gone); their grid points "
              "run again", file=sys.stderr)
    if not _is_grid(plan):
        print(f"{where}: {before} trials so far; adding {n} with {workers} worker(s)", file=sys.stderr)
        return n
    grid = prepare_grid(study, grid_points(plan.params, plan.context), n, plan.spec.sampler.get("seed"))
    n = grid.to_run if n is None else min(n, grid.to_run)
    status = f"grid of {grid.points} points: {grid.done} done" + (
        f", {grid.running} running in other workers" if grid.running else "")
    if grid.done == grid.points:
        print(f"{where}: the grid is complete ({grid.points} points done, {before} trials); nothing to add",
              file=sys.stderr)
    elif n == 0:
        print(f"{where}: {status}; nothing to add now (rerun when they finish)", file=sys.stderr)
    else:
        print(f"{where}: {before} trials so far; {status}; adding {n} with {workers} worker(s)", file=sys.stderr)
    return n


def _compose_checked(overrides: Sequence[str], conf: Path, blame: Sequence[str]) -> DictConfig:
    """Compose (with Hydra's group choices); a Hydra error becomes a ConfigError naming the first override of
    ``blame`` that it mentions (else all of them)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return compose_config(overrides, conf, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as exc:
        msg = " ".join(line.strip() for line in str(exc).strip().splitlines()[:8] if line.strip())
        bad = next((o for o in blame if f"'{override_key(o)}'" in msg), None)
        if bad is None:
            raise ConfigError("overrides", " ".join(blame), msg) from None
        raise ConfigError(override_key(bad), bad.split("=", 1)[-1], msg) from None


def _base_config(overrides: Sequence[str], conf: Path) -> DictConfig:
    """The sweep's fixed config (with Hydra's group choices), validated: a wrong override stops the sweep here."""
    from qafel.config import validate

    cfg = _compose_checked(overrides, conf, overrides)
    validate(cfg)
    return cfg


def _fixed_config(base_cfg: DictConfig) -> dict[str, Any]:
    """The effective config all trials share, without bookkeeping keys (where records and W&B go, progress):
    recorded with the study, so that a rerun with other overrides (``seed=1``) is not merged into it."""
    from qafel.config import validate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fedbuff's identity quantizers: said once already by _base_config
        return comparable(validate(base_cfg))


def _probe_values(p: Param) -> list[Any]:
    """Values of ``p`` that must not all compose to the same config: every choice, else the range's ends."""
    if p.type == "categorical":
        return list(p.choices)
    return [int(p.low), int(p.high)] if p.type == "int" else [float(p.low), float(p.high)]


def check_params_take_effect(plan: SweepPlan) -> None:
    """Before any trial: every searched parameter exists and its values compose to at least two different
    effective configs (validated, two-spelling settings settled), so that the sweep's points differ. A value
    that fails validation counts as different (its trial fails and is recorded as such).

    A parameter with a ``when`` condition is probed under its first allowed value of each condition key.
    Raises ConfigError naming ``params.<key>``.
    """
    from qafel.config import validate

    for p in plan.params:
        if all(key in plan.context for key in p.when) and not p.active(plan.context):
            continue  # never sampled under the fixed overrides
        condition = [f"{key}={format_value(allowed[0])}" for key, allowed in p.when.items() if key not in plan.context]
        seen: dict[str, Any] = {}
        for value in _probe_values(p):
            override = f"{p.name}={format_value(value)}"
            try:
                cfg = _compose_checked(merge_overrides(plan.overrides, condition, [override]), plan.conf, [override])
            except ConfigError as exc:
                raise ConfigError(f"params.{p.name}", value, exc.allowed) from None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. fedbuff's identity quantizers
                try:
                    effective = yaml.safe_dump(OmegaConf.to_container(validate(cfg)), sort_keys=True)
                except ConfigError as exc:  # an invalid point is a point of its own (its trial fails, recorded)
                    effective = f"invalid: {exc}"
            seen.setdefault(effective, value)
        if len(seen) < 2:
            under = f" under {' '.join(condition)}" if condition else ""
            raise ConfigError(f"params.{p.name}", _probe_values(p), "every value gives the same effective config"
                              f"{under}: the parameter changes nothing in these runs (is it overridden by another "
                              "setting, or not used by the chosen groups?)")


def _context(cfg: DictConfig, spec: SweepSpec, overrides: Sequence[str]) -> dict[str, str]:
    """What ``when`` conditions compare against before sampling: the fixed overrides, else the base config
    (a config group's choice, e.g. ``algorithm: qafel``, or a value)."""
    context = {override_key(o): o.split("=", 1)[1] for o in overrides if "=" in o}
    choices = dict(cfg.hydra.runtime.choices) if "hydra" in cfg else {}
    for p in spec.params:
        for key in p.when:
            if key in context:
                continue
            if key in choices:
                context[key] = format_value(choices[key])
            else:
                value = OmegaConf.select(cfg, key, default=None)
                if value is not None and not OmegaConf.is_config(value):
                    context[key] = format_value(value)
    return context


def summarize(study: optuna.Study, written: Mapping[str, Path]) -> str:
    """A few lines on the study's trials and the files written."""
    states = [t.state for t in study.get_trials(deepcopy=False)]
    count = {s: states.count(s) for s in optuna.trial.TrialState}
    S = optuna.trial.TrialState
    lines = [f"study     {study.study_name}",
             f"trials    {len(states)}: {count[S.COMPLETE]} complete, {count[S.PRUNED]} pruned, "
             f"{count[S.FAIL]} failed" + (f", {count[S.RUNNING]} running" if count[S.RUNNING] else "")]
    if len(study.directions) == 1 and count[S.COMPLETE]:
        lines.append(f"best      trial {study.best_trial.number}: {study.best_value:.6g}")
    elif len(study.directions) > 1:
        lines.append(f"pareto    {len(study.best_trials)} trial(s) on the front")
    if written:
        folder = next(iter(written.values())).parent
        lines.append(f"wrote     {', '.join(written)} in {folder}")
        if offline_runs(folder):  # W&B is silenced: this is its sync hint, for every run of the sweep at once
            lines.append(f"W&B       offline runs: {shlex.join(['wandb', 'sync', str(folder / 'wandb')])}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The ``qafel-sweep`` argument parser."""
    p = argparse.ArgumentParser(
        prog="qafel-sweep", description="Run or resume an Optuna sweep of qafel runs (see sweeps/*.yaml).",
        epilog="Overrides (key=value, Hydra syntax) apply to every trial and fix searched parameters.")
    p.add_argument("sweep", help="sweep file (sweeps/NAME.yaml, or NAME)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every trial, e.g. seed=1 run.server_steps=100")
    p.add_argument("--n-trials", type=int, default=None, help="trials to add (default: the sweep file's)")
    p.add_argument("--study-name", default=None, help="study name (default: the sweep's name, -SIZE with --size)")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL: sqlite:///f.db, postgresql://user:pw@host/db, journal:PATH "
                        "(default: the environment variable QAFEL_STORAGE, else sqlite in the sweep directory)")
    p.add_argument("--workers", type=int, default=None, help="local worker processes on the same storage (default 1)")
    p.add_argument("--size", default=None, help="a size from the sweep file's sizes (e.g. smoke)")
    p.add_argument("--sweep-dir", default=None, help="output directory (default: outputs/sweeps/STUDY)")
    cluster = p.add_argument_group("on a cluster (README \"On a cluster\"; qafel.sweep_jobs)")
    cluster.add_argument("--launcher", default=None, metavar="slurm|local",
                         help="submit --jobs worker jobs through submitit on the study's storage and return "
                              "(slurm_gpu: one GPU per job)")
    cluster.add_argument("--jobs", type=int, default=None, help="worker jobs to submit with --launcher (default 1)")
    cluster.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                         help="a job setting, a key of conf/hydra/launcher/submitit_slurm.yaml (or _local.yaml): "
                              "partition=gpu, timeout_min=600, cpus_per_task=8, mem_gb=32, array_parallelism=4, ...")
    cluster.add_argument("--dry-run", action="store_true",
                         help="with --launcher: print the submission script (sbatch), submit nothing")
    cluster.add_argument("--status", action="store_true",
                         help="print the study's progress from its storage (trials by state, best so far)")
    cluster.add_argument("--collect", action="store_true",
                         help="write trials.csv, pareto.csv or best.yaml and the W&B summary from the storage now")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``qafel-sweep``; returns the exit status (README "Sweeps": 0, 2, 4, 130, 143)."""
    args = build_parser().parse_intermixed_args(argv)
    try:
        with sigterm_interrupts():
            if args.launcher or args.status or args.collect or args.jobs is not None or args.slurm or args.dry_run:
                from qafel.sweep_jobs import cluster_command

                return cluster_command(args)
            study, written = run_sweep(args.sweep, n_trials=args.n_trials, study_name=args.study_name,
                                       storage=args.storage, workers=1 if args.workers is None else args.workers,
                                       overrides=args.overrides,
                                       size=args.size, sweep_dir=args.sweep_dir)
    except SweepRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except (ConfigError, SweepError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as exc:
        print("interrupted: finished trials are stored; rerun the same command to resume", file=sys.stderr)
        return 128 + (exc.signum if isinstance(exc, Interrupted) else signal.SIGINT)
    print(summarize(study, written))
    return 0


if __name__ == "__main__":
    from qafel.sweep import main as _main  # the importable module, so worker processes unpickle qafel.sweep.*

    sys.exit(_main())
