"""Optuna sweeps over qafel runs (``qafel-sweep``, ``python -m qafel.sweep``): an entry point above the experiment.

Owns ``spec`` (the sweep file, the plan, sampler and pruner), ``trial`` (one trial through the run function),
``storage`` (the Optuna storage and study, the sweep directory's owner records), ``workers`` and ``runtime`` (local
worker processes, heartbeats, reclaiming dead workers' trials, grids), ``outputs`` (trials.csv, pareto, best.yaml,
W&B summary), ``driver`` (plan and run a sweep), ``cli`` (the command), and ``jobs`` and ``cluster`` (worker jobs and
Hydra launchers on SLURM or local submitit).

May import: ``qafel.experiment`` and everything below it; never ``qafel.report``.
"""

from qafel.sweep.cli import build_parser, main
from qafel.sweep.driver import plan_sweep, run_sweep
from qafel.sweep.spec import (
    OWNER_FILE,
    SPEC_FILE,
    Objective,
    Param,
    SweepError,
    SweepPlan,
    SweepRefused,
    SweepSpec,
    format_value,
    load_spec,
    make_pruner,
    make_sampler,
    merge_overrides,
    parse_spec,
    sample_params,
)
from qafel.sweep.storage import open_storage

__all__ = [
    "OWNER_FILE", "SPEC_FILE", "Objective", "Param", "SweepError", "SweepPlan", "SweepRefused", "SweepSpec",
    "build_parser", "format_value", "load_spec", "main", "make_pruner", "make_sampler", "merge_overrides",
    "open_storage", "parse_spec", "plan_sweep", "run_sweep", "sample_params",
]
