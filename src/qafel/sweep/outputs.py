"""A sweep's outputs: trials.csv, pareto.csv + pareto.png or best.yaml, spec.json, the W&B summary run, and the
closing summary line.
"""

from __future__ import annotations

import csv
import os
import shlex
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
import yaml

from qafel.experiment.tracking import (
    offline_runs,
)
from qafel.sweep.spec import (
    TRIAL_SUMMARY_KEYS,
    Objective,
    SweepPlan,
    SweepSpec,
    compose_config,
)


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



def log_sweep_to_wandb(study: optuna.Study, plan: SweepPlan, written: Mapping[str, Path]) -> None:
    """The sweep's one W&B summary run (``<study>-summary``, group = study, a stable id: a rerun updates it),
    built from the sweep directory's records (``qafel.experiment.wandb_runs.build_sweep_summary``). Never raises."""
    try:
        from qafel.experiment.wandb_runs import build_sweep_summary

        cfg = compose_config(plan.overrides, plan.conf).tracking
        build_sweep_summary(plan.sweep_dir, mode=os.environ.get("WANDB_MODE", cfg.get("mode", "offline")),
                            project=cfg.get("project"), entity=cfg.get("entity"))
    except Exception as exc:  # noqa: BLE001 - tracking must never stop a sweep
        warnings.warn(f"W&B sweep summary skipped ({type(exc).__name__}: {exc})", stacklevel=2)


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
