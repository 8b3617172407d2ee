"""One trial: sampling its overrides, running it with the run function, recording its outcome and origin.
"""

from __future__ import annotations

import math
import os
import traceback
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, open_dict

from qafel.experiment.tracking import (
    ORIGIN_FILE,
    RunOrigin,
    hide_passwords,
    origin_record,
    write_origin,
)
from qafel.sweep.runtime import (
    Interrupted,
    journal_heartbeat,
    worker_identity,
)
from qafel.sweep.spec import (
    TRIAL_SUMMARY_KEYS,
    SweepPlan,
    SweepRefused,
    SweepSpec,
    compose_config,
    format_value,
    merge_overrides,
    sample_params,
)


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
    from qafel.experiment.runner import run_experiment

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
            from qafel.experiment.wandb_runs import build_run

            tracking = (cfg if cfg is not None else compose_config(plan.overrides, plan.conf)).tracking
            build_run(run_dir, mode=os.environ.get("WANDB_MODE", tracking.get("mode", "offline")),
                      project=tracking.get("project"), entity=tracking.get("entity"))
    except Exception as exc:  # noqa: BLE001 - tracking never stops a sweep
        warnings.warn(f"trial {origin.name}: no run.json or W&B run ({type(exc).__name__}: {exc})", stacklevel=2)
