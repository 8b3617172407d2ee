"""Sweep workers at run time: who runs a trial and whether it is alive, the grid queue, dying with the parent.

A grid sweep (``sampler: grid``, plain or conditional) does not let Optuna's grid samplers choose points: they
count a FAIL trial as visited and a dead worker's RUNNING trial as taken, so interrupted points were never
rerun. Instead every grid point with no COMPLETE or PRUNED trial is enqueued (a WAITING trial with fixed
params) and workers only claim queued trials; a claim is atomic in every Optuna storage.

Whether a RUNNING trial's worker is alive:
- on this machine (same host name and boot id): its process id, checked together with the process start time
  (a reused pid is not the worker), so a killed sweep's trials are failed and rerun at once;
- on another machine, with SQLite/PostgreSQL: Optuna's heartbeat (failed after ``grace_period``);
- on another machine, with a journal file (no Optuna heartbeat there): qafel's own heartbeat, the trial's
  user attr ``heartbeat`` (a time stamp written every HEARTBEAT_S), failed when older than GRACE_S.
A RUNNING trial whose worker may be alive is never taken over.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import random
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

if TYPE_CHECKING:
    from qafel.sweep.spec import Param

TrialState = optuna.trial.TrialState
HEARTBEAT_S = 60  # the RDB storages' heartbeat_interval, and qafel's journal heartbeat
GRACE_S = 180  # a worker on another machine is taken for dead after this long without a heartbeat
PR_SET_PDEATHSIG = 1
_logger = optuna.logging.get_logger("optuna")


# ------------------------------------------------------------------------------------------ workers
def _boot_id() -> str:
    """This boot's id on Linux (distinguishes a rebooted machine's reused pids), else empty."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc); None if unknown, no such process or a
    zombie (a killed worker its parent has not reaped yet)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # the name in (...) may hold spaces
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]  # fields 3 (state) and 22 (start time)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def worker_identity() -> dict[str, Any]:
    """This process as a trial's worker: host, boot id, pid, its start time, and the wall-clock time now."""
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid(),
            "start": _start_ticks(os.getpid()), "time": time.time()}


def worker_state(info: Mapping[str, Any] | None) -> str:
    """``alive`` or ``dead`` for a worker on this machine, ``elsewhere`` for one on another (or unknown)."""
    if not info or info.get("host") != socket.gethostname() or info.get("boot", "") != _boot_id():
        return "elsewhere"
    pid = int(info["pid"])
    start = _start_ticks(pid)
    if start is None:
        return "alive" if sys.platform != "linux" and _pid_exists(pid) else "dead"
    return "alive" if info.get("start") in (None, start) else "dead"  # another start time: a reused pid


@contextlib.contextmanager
def journal_heartbeat(trial: optuna.Trial, enabled: bool, interval: float = HEARTBEAT_S) -> Iterator[None]:
    """While the block runs, stamp the trial's user attr ``heartbeat`` every ``interval`` seconds (journal files
    have no Optuna heartbeat; ``reclaim_dead_trials`` reads this one)."""
    if not enabled:
        yield
        return
    storage, trial_id, stop = trial.storage, trial._trial_id, threading.Event()

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # a missed beat only makes the trial look older
                storage.set_trial_user_attr(trial_id, "heartbeat", time.time())
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"qafel-heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def reclaim_dead_trials(study: optuna.Study, journal: bool) -> list[int]:
    """Fail the RUNNING trials whose worker is gone (see the module docstring); return their numbers.

    With SQLite/PostgreSQL, Optuna's stale-heartbeat check runs first (it also queues one retry of each).
    """
    from optuna.storages._heartbeat import is_heartbeat_enabled

    storage = study._storage
    if is_heartbeat_enabled(storage):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    now = time.time()
    failed: list[int] = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        info = t.user_attrs.get("worker")
        state = worker_state(info)
        if state == "dead":
            reason = f"worker process {info['pid']} on {info['host']} is gone (killed or crashed)"
        elif state == "elsewhere" and journal and info and now - float(
                t.user_attrs.get("heartbeat") or info.get("time") or now) > GRACE_S:
            reason = f"worker on {info['host']} sent no heartbeat for over {GRACE_S} s"
        else:
            continue
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            storage.set_trial_user_attr(t._trial_id, "reason", reason)
            if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                failed.append(t.number)
    return failed


# --------------------------------------------------------------------------------------------- grid
def grid_points(params: Sequence[Param], context: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every point of a (possibly conditional) grid: a parameter whose ``when`` fails is left out, as in
    ``sweep.sample_params``."""
    points: list[dict[str, Any]] = [{}]
    for p in params:
        grown: list[dict[str, Any]] = []
        for point in points:
            if p.active({**context, **point}):
                grown += [{**point, p.name: v} for v in p.grid()]
            else:
                grown.append(point)
        points = grown
    return points


def _norm(value: Any) -> Any:
    return float(f"{value:.12g}") if isinstance(value, float) else value  # 0.1 + 2 * 0.1 == 0.3


def point_key(params: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """A hashable grid point, equal for equal parameter values (floats compared to 12 digits)."""
    return tuple(sorted((k, _norm(v)) for k, v in params.items()))


def _trial_point(t: optuna.trial.FrozenTrial) -> tuple[tuple[str, Any], ...]:
    return point_key(t.system_attrs.get("fixed_params") or t.params)


@dataclass
class GridState:
    """Where a grid stands before this command runs anything."""

    points: int  # grid points in all
    done: int  # with a COMPLETE or PRUNED trial
    running: int  # with a RUNNING trial of a live worker (here or on another machine)
    queued: int  # with a WAITING trial (queued by an earlier command, or Optuna's heartbeat retry)
    added: int  # queued now

    @property
    def to_run(self) -> int:
        """Trials this command's workers will run at most (queued before plus added now)."""
        return self.queued + self.added


def prepare_grid(study: optuna.Study, points: list[dict[str, Any]], limit: int | None,
                 seed: int | None = None) -> GridState:
    """Queue the grid points that have no COMPLETE, PRUNED, RUNNING or WAITING trial (at most ``limit`` trials to
    run in all, counting those already queued), in the file's order, shuffled when the sampler has a seed."""
    keys = {point_key(p): p for p in points}
    done: set = set()
    running: set = set()
    queued: set = set()
    for t in study.get_trials(deepcopy=False):
        key = _trial_point(t)
        if key not in keys:
            continue
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            done.add(key)
        elif t.state == TrialState.RUNNING:
            running.add(key)
        elif t.state == TrialState.WAITING:
            queued.add(key)
    running -= done
    queued -= done | running
    missing = [k for k in keys if k not in done | running | queued]
    if seed is not None:
        random.Random(seed).shuffle(missing)
    if limit is not None:
        missing = missing[:max(0, limit - len(queued))]
    for key in missing:
        study.enqueue_trial(keys[key])
    return GridState(points=len(keys), done=len(done), running=len(running), queued=len(queued),
                     added=len(missing))


def _claim(study: optuna.Study, keys: set) -> optuna.Trial | None:
    """Take the first WAITING trial of a grid point (atomic: another worker's claim makes ours fail)."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if _trial_point(t) not in keys:
            continue
        try:
            if not study._storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        study._storage.set_trial_user_attr(t._trial_id, "worker", worker_identity())
        return optuna.Trial(study, t._trial_id)
    return None


def _covered_by(study: optuna.Study, trial: optuna.Trial) -> int | None:
    """Another trial of the same point that is finished well (COMPLETE, PRUNED) or RUNNING with a smaller
    number (two machines queued it at once: the older claim wins)."""
    frozen = study._storage.get_trial(trial._trial_id)
    key = _trial_point(frozen)
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                      TrialState.RUNNING)):
        if t.number != trial.number and _trial_point(t) == key and (
                t.state != TrialState.RUNNING or t.number < trial.number):
            return t.number
    return None


def run_queue(study: optuna.Study, points: list[dict[str, Any]], objective: Callable[[optuna.Trial], Any],
              n: int | None, stop: Callable[[], bool] = lambda: False) -> int:
    """Claim and run queued grid trials until none is left, ``n`` ran or ``stop()``; the number run.

    Like Optuna's loop: TrialPruned prunes, another exception fails the trial (the objective records why),
    KeyboardInterrupt fails it and is raised; Optuna's heartbeat runs with SQLite/PostgreSQL.
    """
    from optuna.storages._heartbeat import get_heartbeat_thread

    keys = {point_key(p) for p in points}
    ran = 0
    while (n is None or ran < n) and not stop():
        trial = _claim(study, keys)
        if trial is None:
            break
        ran += 1
        other = _covered_by(study, trial)
        if other is not None:
            study._storage.set_trial_user_attr(trial._trial_id, "reason", f"duplicate of trial {other}")
            study.tell(trial, state=TrialState.FAIL)
            continue
        values, state = None, TrialState.COMPLETE
        with get_heartbeat_thread(trial._trial_id, study._storage):
            try:
                values = objective(trial)
            except optuna.TrialPruned:
                state = TrialState.PRUNED
            except Exception as exc:  # noqa: BLE001 - recorded in the trial (reason, traceback.txt); go on
                state = TrialState.FAIL
                _logger.warning(f"Trial {trial.number} failed: {type(exc).__name__}: {exc}")
            except KeyboardInterrupt:
                study.tell(trial, state=TrialState.FAIL)
                raise
        frozen = study.tell(trial, values if state == TrialState.COMPLETE else None,
                            state=None if state == TrialState.COMPLETE else state)
        gc.collect()  # as Optuna's loop does after each trial (gc_after_trial)
        _logger.info(f"Trial {frozen.number} {frozen.state.name.lower()} with parameters {frozen.params}"
                     + (f" and values {frozen.values}" if frozen.values else ""))
    return ran


# ---------------------------------------------------------------------------------------- processes
class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised as a KeyboardInterrupt so that the running trial is failed and outputs are written."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block, the first SIGTERM raises ``Interrupted`` (later ones are ignored, so that the clean-up
    can finish); the previous handler is restored after it. Only in the main thread (where signals arrive)."""
    def handler(signum: int, _frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminate_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def _watch_parent(parent_pid: int, on_orphan: Callable[[], None], interval: float) -> None:
    while os.getppid() == parent_pid:
        time.sleep(interval)
    on_orphan()


def die_with_parent(parent_pid: int, on_orphan: Callable[[], None] = _terminate_self,
                    interval: float = 1.0, use_prctl: bool = True) -> str:
    """Have this process stopped (SIGTERM) when ``parent_pid`` dies, even by SIGKILL; returns the mechanism.

    Linux: ``prctl(PR_SET_PDEATHSIG)``; elsewhere (or if that fails) a daemon thread that polls the parent pid.
    """
    if use_prctl and sys.platform == "linux":
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0:
                if os.getppid() != parent_pid:  # the parent died before prctl took effect
                    on_orphan()
                return "prctl"
        except (OSError, AttributeError):
            pass
    threading.Thread(target=_watch_parent, args=(parent_pid, on_orphan, interval), name="qafel-parent-watch",
                     daemon=True).start()
    return "poll"
