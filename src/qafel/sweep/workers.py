"""Local worker processes: each runs trials from the shared storage; the parent splits, spawns and stops them
(the heartbeats and the reclaiming of dead workers' trials are in ``qafel.sweep.runtime``).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from dataclasses import replace

import optuna

from qafel.sweep.runtime import (
    Interrupted,
    die_with_parent,
    grid_points,
    run_queue,
    sigterm_interrupts,
)
from qafel.sweep.spec import (
    EXIT_REFUSED,
    SweepPlan,
    SweepRefused,
    make_pruner,
    make_sampler,
)
from qafel.sweep.storage import (
    _is_grid,
    open_storage,
)
from qafel.sweep.trial import (
    run_trial,
)


def _worker(plan: SweepPlan, n_trials: int | None, seed_offset: int, threads: int | None = None) -> None:
    """Run ``n_trials`` trials (None: until the grid is done) of the plan's study in this process.

    A grid runs the trials ``prepare_grid`` queued (every parameter fixed, so the sampler is never asked); other
    samplers run Optuna's loop. A SweepRefused in a trial stops the worker and is raised.
    """
    if threads:
        import torch

        from qafel.sim.system import set_core_budget

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
