"""qafel's Hydra launchers: ``hydra/launcher=submitit_local | submitit_slurm | submitit_slurm_gpu`` (conf/).

The hydra-submitit-launcher plugin's launchers with qafel's jobs (see ``qafel.sweep.cluster``): each job has a run id
chosen at submission and continues its own run after a preemption or a time limit; ``dry_run`` prints the sbatch
script; a job that ends without a result is listed with the multirun's failed jobs. Hydra loads launchers only from
the ``hydra_plugins`` package, hence this module (light to import: Hydra imports every plugin module at start-up).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import submitit
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as plugin
from omegaconf import OmegaConf, open_dict

log = logging.getLogger(__name__)


class _QafelLauncher(plugin.BaseSubmititLauncher):
    """The plugin's launcher with qafel's jobs: run ids, requeue after preemption, dry runs, failed jobs reported."""

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.run_ids: dict[int, str] = {}  # job number -> run id, chosen at submission

    def __call__(self, sweep_overrides: list[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: dict[type, Singleton]) -> JobReturn:
        from qafel.sweep.cluster import quiet_schema_warning, requeue_on_preemption, run_as_job

        quiet_schema_warning()  # this process composes the job's config again
        with run_as_job(self.run_ids.get(job_num)), requeue_on_preemption():
            return super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's hook at preemption or time limit: submit the same job again (it continues its run)."""
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Submit the jobs (in waves of ``array_parallelism`` locally; one array on SLURM) and wait for them;
        ``dry_run`` prints the submission script instead."""
        from qafel.sweep.cluster import make_executor, submission_script

        assert self.config is not None
        params = dict(self.params)
        dry_run = bool(params.pop("dry_run", False))
        folder = params.pop("submitit_folder")
        wave = params.pop("array_parallelism", None) if self._EXECUTOR == "local" else None
        executor = make_executor(self._EXECUTOR, folder, params, script_only=dry_run)
        jobs = []
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            jobs.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        if dry_run:
            print(submission_script(executor, len(jobs)))
            return []
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        self.run_ids.update({job[2]: uuid.uuid4().hex for job in jobs})
        if not wave:  # locally: one job per cpus_per_task cores at once; on SLURM one array (array_parallelism)
            per_core = max(1, (os.cpu_count() or 1) // int(params.get("cpus_per_task") or 1))
            wave = per_core if self._EXECUTOR == "local" else len(jobs)
        returns: list[JobReturn] = []
        for start in range(0, len(jobs), wave):
            batch = jobs[start:start + wave]
            submitted = executor.map_array(self, *zip(*batch, strict=True))
            returns += [self._result(job, args) for job, args in zip(submitted, batch, strict=True)]
        return returns

    def _result(self, job: Any, args: tuple[Any, ...]) -> JobReturn:
        """The job's JobReturn; a job that ended without one (killed, out of requeues) is reported like a failed
        job (``job_status.json``, listed when the multirun ends) instead of stopping the multirun."""
        try:
            return job.results()[0]
        except Exception as exc:  # noqa: BLE001 - submitit's errors for a job that ended without a result
            from qafel.experiment.multirun import BASIC_SWEEPER, write_status

            overrides, _, idx = args[0], args[1], args[2]
            job_dir = self._job_dir(overrides, idx)
            why = (str(exc).strip().splitlines() or [""])[0][:200]
            message = (f"submitit job {job.job_id} ended without finishing ({type(exc).__name__}: {why}); its records "
                       f"and last checkpoint are in {job_dir} (continue with resume={job_dir})")
            write_status(job_dir, {"job": idx, "exit_code": 1, "message": message, "overrides": overrides,
                                   "time": time.time()})
            ret = JobReturn(overrides=overrides, status=JobStatus.FAILED, _return_value=exc)
            if self.config.hydra.sweeper.get("_target_") == BASIC_SWEEPER:  # as JobStatusCallback does
                ret.status, ret.return_value = JobStatus.COMPLETED, None
            return ret

    def _job_dir(self, overrides: list[str], idx: int) -> Path:
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.num = idx
        return Path(str(cfg.hydra.sweep.dir)) / str(OmegaConf.select(cfg, "hydra.sweep.subdir"))


class LocalLauncher(_QafelLauncher, plugin.LocalLauncher):
    """``hydra/launcher=submitit_local``."""


class SlurmLauncher(_QafelLauncher, plugin.SlurmLauncher):
    """``hydra/launcher=submitit_slurm`` (and ``submitit_slurm_gpu``)."""
