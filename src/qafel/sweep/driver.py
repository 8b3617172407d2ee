"""Planning and running a sweep (:func:`plan_sweep`, :func:`run_sweep`): the base config, the checks that every
parameter takes effect, the trials each worker runs.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml
from omegaconf import DictConfig, OmegaConf

from qafel.errors import ConfigError
from qafel.experiment.checkpoint import comparable
from qafel.experiment.compose import config_dir, override_key
from qafel.sweep.outputs import (
    log_sweep_to_wandb,
    write_outputs,
)
from qafel.sweep.runtime import (
    grid_points,
    prepare_grid,
    reclaim_dead_trials,
)
from qafel.sweep.spec import (
    EXIT_REFUSED,
    Param,
    SweepError,
    SweepPlan,
    SweepRefused,
    SweepSpec,
    compose_config,
    format_value,
    load_spec,
    merge_overrides,
    with_size,
)
from qafel.sweep.storage import (
    _is_grid,
    create_or_load_study,
    redact,
    storage_url,
)
from qafel.sweep.workers import (
    run_workers,
)


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
    from qafel.experiment.config import validate

    cfg = _compose_checked(overrides, conf, overrides)
    validate(cfg)
    return cfg


def _fixed_config(base_cfg: DictConfig) -> dict[str, Any]:
    """The effective config all trials share, without bookkeeping keys (where records and W&B go, progress):
    recorded with the study, so that a rerun with other overrides (``seed=1``) is not merged into it."""
    from qafel.experiment.config import validate

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
    from qafel.experiment.config import validate

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
