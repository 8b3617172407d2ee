"""Cluster jobs through submitit: the launchers of ``run.py -m``, executors, and requeue after preemption.

* ``hydra/launcher=submitit_local | submitit_slurm | submitit_slurm_gpu`` (``conf/hydra/launcher/``) run a multirun's
  jobs through the hydra-submitit-launcher plugin with qafel's job wrapper (``LocalLauncher``, ``SlurmLauncher``).
  Their keys are the plugin's plus ``dry_run`` (print the sbatch script, submit nothing), ``max_num_timeout``,
  ``signal_delay_s`` and, locally, ``array_parallelism`` (jobs side by side), checked against ``LocalConf`` and
  ``SlurmConf`` (``register_launchers`` puts them in Hydra's ConfigStore under the plugin's names).
* Preemption and time limits: submitit has SLURM send SIGUSR2 ``signal_delay_s`` before the time limit (and at a
  preemption); the run writes a checkpoint after its current server step and stops (``qafel.signals``), submitit
  calls the job's ``checkpoint`` method, which resubmits the same job, and requeues it. Every job carries a run id
  chosen at submission: a started job whose run directory holds that id in ``config.yaml`` continues it through
  run.py's ``resume=RUN_DIR`` path (``resume_requeued``), so a job restarted by SLURM itself does too.
* ``make_executor`` and ``submission_script`` are shared with ``qafel-sweep --launcher`` (``qafel.sweep.jobs``).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
import yaml
from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
from omegaconf import DictConfig, open_dict
from submitit.slurm.slurm import _make_sbatch_string

from qafel.errors import ConfigError, Preempted
from qafel.experiment.checkpoint import CHECKPOINT_NAME, remove_quietly, tmp_path
from qafel.experiment.runner import RECORD_FILES
from qafel.signals import preempt_off, preempt_on

log = logging.getLogger(__name__)

#: submitit's generic parameters (the rest are executor-specific: partition, array_parallelism, ...).
GENERIC_PARAMS = ("name", "timeout_min", "mem_gb", "nodes", "cpus_per_task", "gpus_per_node", "tasks_per_node",
                  "stderr_to_stdout")
#: What submitit's local executor reads (it ignores memory, cores and names).
LOCAL_PARAMS = ("timeout_min", "gpus_per_node", "tasks_per_node", "nodes", "signal_delay_s", "stderr_to_stdout",
                "setup", "visible_gpus")


# ------------------------------------------------------------------------------------------ launcher configs
@dataclass
class LocalConf(LocalQueueConf):
    """``hydra/launcher=submitit_local``: the plugin's keys plus the time-limit signal, requeues and a job limit."""

    _target_: str = "hydra_plugins.qafel_launcher.LocalLauncher"
    signal_delay_s: int = 120
    max_num_timeout: int = 3
    array_parallelism: int | None = None
    dry_run: bool = False


@dataclass
class SlurmConf(SlurmQueueConf):
    """``hydra/launcher=submitit_slurm``: the plugin's keys plus ``dry_run``."""

    _target_: str = "hydra_plugins.qafel_launcher.SlurmLauncher"
    dry_run: bool = False


def register_launchers() -> None:
    """Validate ``conf/hydra/launcher/submitit_{local,slurm}.yaml`` against qafel's schemas (replacing the plugin's
    nodes of the same names). Call before composing; idempotent."""
    Plugins.instance()  # scans (re-executes) the plugins once, which stores the plugin's nodes: ours go after
    cs = ConfigStore.instance()
    cs.store(group="hydra/launcher", name="submitit_local", node=LocalConf, provider="qafel")
    cs.store(group="hydra/launcher", name="submitit_slurm", node=SlurmConf, provider="qafel")
    quiet_schema_warning()


def quiet_schema_warning() -> None:
    """Silence Hydra's deprecation warning about the launcher files having schemas of their names."""
    # Hydra warns that matching a config file with a ConfigStore node of its name is deprecated; here it is how the
    # files get their keys checked, and the files keep working (unchecked) once Hydra drops it.
    warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/submitit_\w+' is validated against ConfigStore",
                            category=UserWarning)


#: Launcher numbers and their least allowed value.
MINIMUM = {"timeout_min": 1, "cpus_per_task": 1, "gpus_per_node": 0, "tasks_per_node": 1, "mem_gb": 1, "nodes": 1,
           "array_parallelism": 1, "signal_delay_s": 0, "max_num_timeout": 0}


def check_launcher_params(params: Mapping[str, Any], prefix: str = "hydra.launcher.") -> None:
    """Raise ConfigError naming the first launcher number below its least value (Hydra checks their types)."""
    for key, least in MINIMUM.items():
        value = params.get(key)
        if value is not None and value < least:
            raise ConfigError(f"{prefix}{key}", value, f"must be >= {least}")


# ---------------------------------------------------------------------------------------------- executors
class ScriptOnlySlurmExecutor(submitit.SlurmExecutor):
    """A SlurmExecutor that does not look for ``srun``: it only writes scripts (``submission_script``, dry runs)."""

    @classmethod
    def affinity(cls) -> int:
        return 1


def make_executor(kind: str, folder: str | Path, params: Mapping[str, Any], script_only: bool = False) -> Any:
    """A submitit executor (``local`` or ``slurm``) with a launcher config's parameters (null ones left out).

    ``script_only``: a SLURM executor that writes its sbatch script where there is no SLURM (dry runs).
    """
    check_launcher_params(params)
    params = {k: v for k, v in params.items() if v is not None and k not in ("_target_", "submitit_folder", "dry_run")}
    timeouts = int(params.pop("max_num_timeout", 3))
    if kind == "local":
        executor = submitit.LocalExecutor(folder, max_num_timeout=timeouts)
        params = {k: v for k, v in params.items() if k in LOCAL_PARAMS}
    else:
        slurm = ScriptOnlySlurmExecutor if script_only else submitit.SlurmExecutor
        executor = slurm(folder, max_num_timeout=timeouts)
    generic = {k: params.pop(k) for k in GENERIC_PARAMS if k in params}
    executor.update_parameters(**executor._convert_parameters(generic), **params)
    return executor


def submission_script(executor: Any, n_jobs: int) -> str:
    """The sbatch script that submitting ``n_jobs`` jobs at once (a job array when more than one) would use; for
    the local executor, the command each job process runs and its parameters."""
    if isinstance(executor, submitit.SlurmExecutor):
        params = dict(executor.parameters)
        if n_jobs > 1:
            params["map_count"] = n_jobs  # as SlurmExecutor does for an array
        return _make_sbatch_string(command=executor._submitit_command_str, folder=executor.folder, **params)
    lines = [f"# {n_jobs} local job(s), each a process running: {executor._submitit_command_str}"]
    lines += [f"#   {k}={v}" for k, v in sorted(executor.parameters.items())]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- jobs and requeue
_job_run_id: str | None = None  # the run id of the run.py job running in this process (set by the launchers)


@contextlib.contextmanager
def run_as_job(run_id: str | None) -> Iterator[None]:
    """While a launcher runs a job in this process: the run id its run records (``resume_requeued``)."""
    global _job_run_id
    _job_run_id = run_id
    try:
        yield
    finally:
        _job_run_id = None


def resume_requeued(cfg: DictConfig, run_dir: Path) -> bool:
    """In a run.py job started by a qafel launcher: give ``cfg`` the job's run id (config.yaml records it), and say
    whether ``run_dir`` holds this job's checkpoint, i.e. the job was preempted or timed out and started again:
    run.py then continues it as ``resume=RUN_DIR`` would. Records of this job without a checkpoint (stopped before
    its first one) are removed, and the run starts over. Another run's records are never touched."""
    if _job_run_id is None:
        return False
    with open_dict(cfg):
        cfg.run_id = _job_run_id
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    if not isinstance(saved, dict) or saved.get("run_id") != _job_run_id:
        return False
    if (run_dir / CHECKPOINT_NAME).is_file():
        return True
    for name in (*RECORD_FILES, tmp_path(run_dir / CHECKPOINT_NAME).name):
        remove_quietly(run_dir / name)
    return False


@contextlib.contextmanager
def requeue_on_preemption() -> Iterator[None]:
    """Inside a submitit job: the preemption / time-limit signal raises ``Preempted`` at a safe point (after a
    checkpoint, ``qafel.signals``); when it reaches this block, submitit's own handler resubmits the job (its
    ``checkpoint`` method), requeues it and ends the process. Outside submitit, ``Preempted`` is raised on."""
    signum = submitit.JobEnvironment._usr_sig()
    kept = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    submitit_handler = preempt_on(signum)

    def restore() -> None:  # the handlers the job started with (submitit's: it ignores SIGTERM)
        for s, handler in kept.items():
            signal.signal(s, handler)
        preempt_off(signum, submitit_handler)

    try:
        yield
    except Preempted:
        restore()
        if callable(submitit_handler):
            log.warning("preempted or out of time: the job is requeued and continues from its checkpoint")
            submitit_handler(signum, None)  # exits (requeued), or raises why it cannot requeue
        raise
    finally:
        restore()
