"""``qafel-sweep``: Optuna sweeps over qafel runs: accuracy versus communicated bytes, resumable, logged to W&B,
many workers.

    qafel-sweep sweeps/pareto_bytes.yaml                        # multi-objective: accuracy vs total bytes
    qafel-sweep sweeps/lr_tuning.yaml --n-trials 20 seed=1      # extra Hydra overrides apply to every trial
    qafel-sweep sweeps/bitgrid.yaml --size smoke                # the sweep file's `smoke` size (tests)
    qafel-sweep sweeps/pareto_bytes.yaml --workers 2            # two local worker processes, one storage
    qafel-sweep sweeps/pareto_bytes.yaml --storage postgresql://user:pw@host/db --study-name pb1
    qafel-sweep sweeps/bitgrid.yaml --launcher slurm --jobs 8   # worker jobs on SLURM (qafel.sweep.jobs)
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
the RUNNING trials of workers that are gone (``qafel.sweep.runtime``). After the trials the sweep writes
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
import signal
import sys
from collections.abc import Sequence

from qafel.errors import ConfigError
from qafel.sweep.driver import (
    run_sweep,
)
from qafel.sweep.outputs import (
    summarize,
)
from qafel.sweep.runtime import (
    Interrupted,
    sigterm_interrupts,
)
from qafel.sweep.spec import (
    EXIT_BAD_INPUT,
    EXIT_REFUSED,
    SweepError,
    SweepRefused,
)


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
    cluster = p.add_argument_group("on a cluster (docs/sweeps-and-cluster.md; qafel.sweep.jobs)")
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
    """Console entry point ``qafel-sweep``; returns the exit status (docs/reliability.md: 0, 2, 4, 130, 143)."""
    args = build_parser().parse_intermixed_args(argv)
    try:
        with sigterm_interrupts():
            if args.launcher or args.status or args.collect or args.jobs is not None or args.slurm or args.dry_run:
                from qafel.sweep.jobs import cluster_command

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
