"""qafel-sweep on a cluster: worker jobs through submitit (``--launcher``), ``--status`` and ``--collect``.

    qafel-sweep SWEEP.yaml --launcher slurm --jobs 8 --slurm partition=cpu --storage journal:/shared/s.log
    qafel-sweep SWEEP.yaml --launcher slurm --jobs 8 --dry-run      # print the sbatch script, submit nothing
    qafel-sweep SWEEP.yaml --status                                 # trials by state and the best so far
    qafel-sweep SWEEP.yaml --collect                                # trials.csv, pareto.csv / best.yaml, W&B now

``--launcher slurm|local`` queues the grid's points (as a local run does), then submits ``--jobs`` jobs, each
running the worker loop of ``--workers`` (``sweep._worker``) on the sweep's storage, and returns. Job settings come
from ``conf/hydra/launcher/submitit_{slurm,slurm_gpu,local}.yaml`` (the launchers of ``run.py -m``), changed with
``--slurm KEY=VALUE``. SQLite cannot be shared by jobs on other machines: SLURM jobs need PostgreSQL (or MySQL) or an
Optuna journal file on a file system every node mounts. A storage URL's password never goes into a job file or
script: the jobs read the URL from ``QAFEL_STORAGE`` in their environment, which sbatch and the local executor
pass on.

A job that is preempted or reaches its time limit (SIGUSR2) fails its running trial, queues that grid point again,
and is requeued to run the trials it had left; a job killed outright leaves its trial RUNNING until the heartbeat
check fails it (``qafel.sweep.runtime.reclaim_dead_trials``, which every job runs when it starts). The job that ends
with nothing running or queued in the study writes the outputs (as ``--collect`` does).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
import submitit
from omegaconf import OmegaConf

from qafel.errors import ConfigError, Preempted
from qafel.experiment.compose import compose
from qafel.sweep.cluster import (
    check_launcher_params,
    make_executor,
    register_launchers,
    requeue_on_preemption,
    submission_script,
)
from qafel.sweep.driver import _plan_trials, plan_sweep
from qafel.sweep.outputs import log_sweep_to_wandb, summarize, write_outputs
from qafel.sweep.runtime import (
    TrialState,
    _trial_point,
    grid_points,
    point_key,
    prepare_grid,
    reclaim_dead_trials,
    sigterm_interrupts,
    worker_identity,
)
from qafel.sweep.spec import SweepError, SweepPlan
from qafel.sweep.storage import _check_same_sweep, _is_grid, create_or_load_study, open_storage, redact
from qafel.sweep.workers import _worker, split_trials

#: ``--launcher`` values and their launcher config files (conf/hydra/launcher/).
LAUNCHERS = {"slurm": "submitit_slurm", "local": "submitit_local", "slurm_gpu": "submitit_slurm_gpu"}
#: Launcher keys ``--slurm`` cannot set (qafel-sweep sets them, or ``--dry-run`` does).
FIXED_KEYS = ("_target_", "submitit_folder", "dry_run")
SEED_STRIDE = 7919  # sampler seed offsets between jobs, as between local workers
OUTPUTS_ATTR = "outputs_written_for"  # study user attr: the number of trials the jobs' outputs were written for


# ------------------------------------------------------------------------------------------ command line
def cluster_command(args: argparse.Namespace) -> int:
    """``qafel-sweep`` with ``--launcher``, ``--status`` or ``--collect``; errors raise ConfigError, SweepError."""
    if args.status and args.collect:
        raise ConfigError("--status", True, "cannot be combined with --collect (run them one after the other)")
    if (args.status or args.collect) and (args.launcher or args.jobs is not None or args.slurm or args.dry_run):
        flag = "--status" if args.status else "--collect"
        raise ConfigError(flag, True, "reads the storage only: leave out --launcher, --jobs, --slurm and --dry-run")
    if not (args.status or args.collect or args.launcher):
        given = (("--jobs", args.jobs) if args.jobs is not None else ("--slurm", args.slurm[0]) if args.slurm
                 else ("--dry-run", True))
        raise ConfigError(*given, "needs --launcher slurm|local")
    if args.workers is not None:
        raise ConfigError("--workers", args.workers, "starts local processes: with --launcher use --jobs" if
                          args.launcher else "runs trials: leave it out with --status and --collect")
    plan_args = {"n_trials": args.n_trials, "study_name": args.study_name, "storage": args.storage,
                 "overrides": args.overrides, "size": args.size, "sweep_dir": args.sweep_dir}
    if args.status:
        plan, _ = plan_sweep(args.sweep, **plan_args, need_n=False, check_params=False)
        print(status_text(existing_study(plan), plan))
        return 0
    if args.collect:
        plan, _ = plan_sweep(args.sweep, **plan_args, need_n=False, check_params=False)
        existing_study(plan)
        study = create_or_load_study(plan)  # refuses another sweep's study or directory
        print(collect(study, plan))
        return 0
    return submit(args, plan_args)


def submit(args: argparse.Namespace, plan_args: Mapping[str, Any]) -> int:
    """Queue the sweep's trials and submit its worker jobs (or print their script with ``--dry-run``)."""
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError("--jobs", args.jobs, "must be an integer >= 1")
    jobs = args.jobs or 1
    params = launcher_params(args.launcher, args.slurm)
    plan, n = plan_sweep(args.sweep, **plan_args)
    kind = "local" if args.launcher == "local" else "slurm"
    if kind == "slurm" and plan.storage.startswith("sqlite:"):
        raise SweepError(f"--launcher {args.launcher}: the study's storage is SQLite ({redact(plan.storage)}), which "
                         "jobs on other machines cannot share: pass --storage postgresql://... (or set QAFEL_STORAGE), "
                         "or --storage journal:PATH on a file system every node mounts")
    executor = job_executor(kind, plan, params, dry_run=args.dry_run)
    if args.dry_run:
        print(submission_script(executor, jobs))
        return 0
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    study = create_or_load_study(plan)
    before = len(study.trials)
    n = _plan_trials(study, plan, n, jobs)
    if n == 0:
        print(f"nothing to submit: study {plan.study_name} has no trial left to run")
        return 0
    shares = split_trials(n, jobs)
    offsets = [before + SEED_STRIDE * (i + 1) for i in range(len(shares))]
    try:
        with storage_for_jobs(plan.storage):
            submitted = executor.map_array(SweepJob(replace(plan, storage=redact(plan.storage))), shares, offsets)
    except Exception as exc:  # noqa: BLE001 - sbatch refused (partition, account, limits): one line, and why
        why = next((line.strip() for line in str(exc).splitlines() if "error" in line.lower()), str(exc).strip())
        raise SweepError(f"--launcher {args.launcher}: the submission failed ({why[:300]}); the study keeps its "
                         "queued trials: fix the job settings and submit again") from None
    print(submitted_text(args, plan, kind, [j.job_id for j in submitted]))
    return 0


def launcher_params(launcher: str, settings: Sequence[str]) -> dict[str, Any]:
    """The job settings: ``conf/hydra/launcher/<LAUNCHERS[launcher]>.yaml`` composed with ``--slurm KEY=VALUE``
    (Hydra checks keys and types against the launcher's schema, ``qafel.sweep.cluster``)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if launcher not in LAUNCHERS:
        raise ConfigError("--launcher", launcher, f"must be one of {', '.join(LAUNCHERS)}")
    overrides = []
    for setting in settings:
        key, sep, _ = setting.partition("=")
        if not sep or not key or key in FIXED_KEYS:
            why = f"{key} is set by qafel-sweep" if key in FIXED_KEYS else "must be KEY=VALUE"
            raise ConfigError("--slurm", setting, f"{why} (keys: {', '.join(_launcher_keys(launcher))})")
        overrides.append(f"hydra.launcher.{setting}")
    register_launchers()
    try:
        cfg = compose([f"hydra/launcher={LAUNCHERS[launcher]}", *overrides], return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as exc:
        text = " ".join(f"{exc} {exc.__cause__ or ''}".split())
        bad = next((s for s in settings if f"hydra.launcher.{s.partition('=')[0]}" in text
                    or f"'{s.partition('=')[0]}'" in text), " ".join(settings))
        if "not in" in text or "Could not override" in text:
            text = f"unknown key for --launcher {launcher}; keys: {', '.join(_launcher_keys(launcher))}"
        raise ConfigError("--slurm", bad, text) from None
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    params = {k: v for k, v in params.items() if k not in (*FIXED_KEYS, "name")}
    try:
        check_launcher_params(params, prefix="")
    except ConfigError as exc:
        raise ConfigError("--slurm", f"{exc.key}={exc.value}", exc.allowed) from None
    return params


def _launcher_keys(launcher: str) -> list[str]:
    from qafel.sweep.cluster import LocalConf, SlurmConf

    schema = LocalConf if launcher == "local" else SlurmConf
    return [k for k in OmegaConf.structured(schema) if k not in FIXED_KEYS]


def job_executor(kind: str, plan: SweepPlan, params: Mapping[str, Any], dry_run: bool = False) -> Any:
    """The executor of the sweep's jobs: files and logs in ``<sweep dir>/jobs/<job id>/``, one name per study."""
    try:
        return make_executor(kind, plan.sweep_dir / "jobs" / "%j", {**params, "name": f"qafel-{plan.study_name}"},
                             script_only=dry_run)
    except RuntimeError as exc:  # submitit finds no srun: not on a SLURM cluster
        raise SweepError(f"--launcher {kind}: {exc} (--dry-run prints the job script anywhere)") from None
    except (ValueError, TypeError) as exc:  # submitit's checks of the settings
        raise ConfigError("--slurm", " ".join(f"{k}={v}" for k, v in params.items() if v is not None),
                          " ".join(str(exc).split())[:300]) from None


@contextlib.contextmanager
def storage_for_jobs(url: str) -> Iterator[None]:
    """Jobs get a storage URL that holds a password through ``QAFEL_STORAGE`` in the environment the submission
    passes on (the job files hold it hidden)."""
    if redact(url) == url:
        yield
        return
    saved = os.environ.get("QAFEL_STORAGE")
    os.environ["QAFEL_STORAGE"] = url
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("QAFEL_STORAGE", None)
        else:
            os.environ["QAFEL_STORAGE"] = saved


def job_storage(url: str) -> str:
    """In a job: the storage URL, with a hidden password taken from ``QAFEL_STORAGE``."""
    if "***" not in url:
        return url
    env = os.environ.get("QAFEL_STORAGE")
    if env and redact(env) == url:
        return env
    raise SweepError(f"storage {url}: this job has not got its password: QAFEL_STORAGE must hold the URL in the "
                     "job's environment (sbatch passes the submitting environment on unless --export says otherwise)")


def submitted_text(args: argparse.Namespace, plan: SweepPlan, kind: str, ids: list[str]) -> str:
    """What was submitted and how to follow it (no password: the storage is shown hidden)."""
    hidden = redact(plan.storage) != plan.storage
    opts = [o for o in (("--size", args.size), ("--study-name", args.study_name), ("--sweep-dir", args.sweep_dir),
                        ("--storage", None if hidden else args.storage)) if o[1]]
    status = shlex.join(["qafel-sweep", args.sweep, *args.overrides, *[x for o in opts for x in o], "--status"])
    store = plan.storage[len("journal:"):] if plan.storage.startswith("journal:") else plan.storage
    lines = [f"submitted {len(ids)} {kind} job(s): {' '.join(ids)} (study {plan.study_name} in "
             f"{redact(plan.storage)})",
             f"progress  {status}" + (" (with QAFEL_STORAGE set)" if hidden else ""),
             f"logs      {plan.sweep_dir / 'jobs'}/<job id>/" + (
                 f"; squeue -j {','.join(sorted({i.split('_')[0] for i in ids}))}" if kind == "slurm" else ""),
             "live view optuna-dashboard " + ('"$QAFEL_STORAGE"' if hidden else shlex.quote(store))
             + "  (pip install optuna-dashboard)",
             f"outputs   {plan.sweep_dir}: written by the last job to finish, or now by --collect"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- the jobs
@dataclass
class SweepJob:
    """One worker job: the worker loop of ``--workers`` on the study's storage, requeued after a preemption.

    ``plan.storage`` hides any password (``job_storage``); ``left`` is set when the job is preempted: the trials
    it still owes, which its requeued run does."""

    plan: SweepPlan
    left: int | None = None

    def __call__(self, n_trials: int | None, seed_offset: int) -> str:
        self.left = n_trials
        plan = replace(self.plan, storage=job_storage(self.plan.storage))
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        with requeue_on_preemption(), sigterm_interrupts():
            reclaim(plan)
            try:
                _worker(plan, n_trials, seed_offset, threads)
            except Preempted:
                self.left = fail_preempted_trials(plan, n_trials)
                raise
            self.left = None if n_trials is None else 0  # preempted from here on: only the outputs are left
            return finish(plan)

    def checkpoint(self, n_trials: int | None, seed_offset: int) -> Any:
        """submitit's hook at preemption or time limit: the same job again, for the trials it has left."""
        return submitit.helpers.DelayedSubmission(self, self.left, seed_offset + SEED_STRIDE * 13)


def _study(plan: SweepPlan) -> optuna.Study:
    return optuna.load_study(study_name=plan.study_name, storage=open_storage(plan.storage))


def reclaim(plan: SweepPlan) -> None:
    """Fail the RUNNING trials of workers that are gone and queue their grid points again (as a local rerun does)."""
    study = _study(plan)
    failed = set(reclaim_dead_trials(study, journal=plan.storage.startswith("journal:")))
    queue_again(study, plan, [t for t in study.get_trials(deepcopy=False) if t.number in failed])


def queue_again(study: optuna.Study, plan: SweepPlan, trials: Sequence[optuna.trial.FrozenTrial]) -> None:
    """Queue the grid points of these (failed) trials again, unless another trial has them done, running or queued."""
    keys = {_trial_point(t) for t in trials}
    if keys and _is_grid(plan):
        prepare_grid(study, [p for p in grid_points(plan.params, plan.context) if point_key(p) in keys], None)


def fail_preempted_trials(plan: SweepPlan, n_trials: int | None) -> int | None:
    """Fail this process's RUNNING trials (preempted) and queue their grid points again; the trials still owed."""
    study = _study(plan)
    me = worker_identity()
    mine = [t for t in study.get_trials(deepcopy=False)
            if all((t.user_attrs.get("worker") or {}).get(k) == me[k] for k in ("host", "boot", "pid", "start"))]
    running = [t for t in mine if t.state == TrialState.RUNNING]
    for t in running:
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            study._storage.set_trial_user_attr(t._trial_id, "reason", "preempted or out of time (SIGUSR2): its job "
                                               "was requeued and the point runs again")
            study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
    queue_again(study, plan, running)
    return None if n_trials is None else max(0, n_trials - (len(mine) - len(running)))


def finish(plan: SweepPlan) -> str:
    """After a job's trials: write the outputs if nothing is left running or queued in the study, unless another
    job already wrote them for the same trials (jobs that end together write them, and the W&B summary, once)."""
    with _outputs_lock(plan.sweep_dir):
        study = _study(plan)
        trials = study.get_trials(deepcopy=False)
        busy = [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
        if busy:
            return f"study {plan.study_name}: {len(busy)} trial(s) running or queued; the last job writes the outputs"
        if study.user_attrs.get(OUTPUTS_ATTR) == len(trials):
            return f"study {plan.study_name}: outputs already written for its {len(trials)} trials"
        text = collect(study, plan)
        study.set_user_attr(OUTPUTS_ATTR, len(trials))
    print(text)
    return text


def collect(study: optuna.Study, plan: SweepPlan) -> str:
    """Write the study's outputs (trials.csv, pareto.csv + pareto.png or best.yaml, the W&B summary); a summary."""
    written = write_outputs(study, plan)
    if plan.wandb:
        log_sweep_to_wandb(study, plan, written)
    return summarize(study, written)


@contextlib.contextmanager
def _outputs_lock(folder: Path, wait_s: float = 120.0) -> Iterator[None]:
    """One job at a time writes the outputs (an exclusive lock file; a stale one is ignored after ``wait_s``)."""
    path, held = folder / ".outputs.lock", False
    deadline = time.monotonic() + wait_s
    while not held and time.monotonic() < deadline:
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            held = True
        except FileExistsError:
            time.sleep(0.5)
    try:
        yield
    finally:
        if held:
            path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------- status
def existing_study(plan: SweepPlan) -> optuna.Study:
    """The sweep's study, read from its storage without creating anything; SweepError when there is none."""
    where = f"study {plan.study_name} in {redact(plan.storage)}"
    for prefix in ("sqlite:///", "journal:"):
        if plan.storage.startswith(prefix) and not Path(plan.storage[len(prefix):].removeprefix("//")).is_file():
            raise SweepError(f"{where}: no such study (nothing has run with this storage, --study-name and "
                             "--sweep-dir yet)")
    storage = open_storage(plan.storage)
    found = next((s for s in storage.get_all_studies() if s.study_name == plan.study_name), None)
    if found is None:
        raise SweepError(f"{where}: no such study (check --study-name, --size and --storage)")
    _check_same_sweep(found, plan)
    return optuna.load_study(study_name=plan.study_name, storage=storage)


def status_text(study: optuna.Study, plan: SweepPlan) -> str:
    """The study's progress: trials by state, the grid's points done, the best so far, the running trials."""
    trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == s for t in trials) for s in TrialState}
    lines = [f"study     {plan.study_name} in {redact(plan.storage)}",
             f"trials    {len(trials)}: {count[TrialState.COMPLETE]} complete, {count[TrialState.RUNNING]} running, "
             f"{count[TrialState.PRUNED]} pruned, {count[TrialState.FAIL]} failed, {count[TrialState.WAITING]} queued"]
    if _is_grid(plan):
        points = {point_key(p) for p in grid_points(plan.params, plan.context)}
        done = {_trial_point(t) for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)} & points
        lines.append(f"grid      {len(done)} of {len(points)} points done")
    names = [o.name for o in plan.spec.objectives]
    if len(study.directions) == 1 and count[TrialState.COMPLETE]:
        best = study.best_trial
        lines.append(f"best      trial {best.number}: {names[0]} = {best.value:.6g} ({best.params})")
    elif len(study.directions) > 1 and count[TrialState.COMPLETE]:
        front = sorted(t.number for t in study.best_trials)
        lines.append(f"pareto    {len(front)} trial(s) on the front ({', '.join(names)}): {front}")
    now = time.time()
    for t in [t for t in trials if t.state == TrialState.RUNNING][:10]:
        worker = t.user_attrs.get("worker") or {}
        beat = t.user_attrs.get("heartbeat") or worker.get("time")
        since = f", last sign of life {now - float(beat):.0f} s ago" if beat else ""
        lines.append(f"running   trial {t.number} on {worker.get('host', '?')} (pid {worker.get('pid', '?')}{since})")
    return "\n".join(lines)
