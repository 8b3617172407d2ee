"""The sweep file: parsing and checking it (:class:`SweepSpec`, :class:`Param`, :class:`Objective`), the plan a
sweep runs (:class:`SweepPlan`), and the Optuna sampler and pruner it names.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
import yaml
from omegaconf import DictConfig

from qafel.errors import ConfigError
from qafel.experiment.compose import compose, override_key

SAMPLERS = ("tpe", "nsga2", "random", "grid")
PRUNERS = ("none", "median", "percentile", "hyperband", "successive_halving", "threshold", "patient")
PARAM_TYPES = ("categorical", "int", "float")
SPEC_KEYS = ("name", "description", "base", "params", "objectives", "sampler", "pruner", "n_trials", "sizes")
SIZE_KEYS = ("n_trials", "overrides", "params", "sampler", "pruner")
#: Summary keys recorded with every trial (user attr ``summary``) and written to trials.csv.
TRIAL_SUMMARY_KEYS = ("status", "final_accuracy", "final_loss", "bytes_up", "bytes_broadcast", "bytes_down_naive",
                      "bytes_total", "uploads_to_target", "server_steps", "uploads", "mean_staleness", "wall_time_s",
                      "diverged_at_step")


#: qafel-sweep's exit codes (docs/reliability.md): bad input, and a refusal to mix two sweeps' records.
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
    from qafel.experiment.runner import (
        NUMERIC_SUMMARY_KEYS,  # the keys summary.json holds, as the run function writes them
    )

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
    from qafel.sim.engine import RECORD_KEYS

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
    candidates = [Path("sweeps") / stem, Path(__file__).resolve().parents[3] / "sweeps" / stem]
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


def compose_config(overrides: Sequence[str], conf: Path | None = None, return_hydra_config: bool = False) -> DictConfig:
    """Compose ``config.yaml`` with these overrides, as ``python run.py`` would
    (``qafel.experiment.compose.compose``)."""
    return compose(overrides, conf, return_hydra_config=return_hydra_config)


def sample_params(trial: optuna.Trial, params: Sequence[Param], fixed: Mapping[str, Any]) -> dict[str, Any]:
    """Sample the active parameters in order; a parameter whose ``when`` fails is left out."""
    context: dict[str, Any] = dict(fixed)
    chosen: dict[str, Any] = {}
    for p in params:
        if p.active(context):
            chosen[p.name] = context[p.name] = p.suggest(trial)
    return chosen


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
