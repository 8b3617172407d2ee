"""Hydra entry point: compose the config, run one experiment, print its summary.

    python run.py                                  # QAFeL on digits (embedded data)
    python run.py algorithm=fedbuff seed=3
    python run.py experiment=paper_logreg
    python run.py experiment=paper_logreg resume=true   # continue the latest such run from its checkpoint
    python run.py -m algorithm=qafel,fedbuff seed=0,1   # multirun: every job runs; failures reported at the end
    python run.py -m hydra/launcher=submitit_slurm hydra.launcher.partition=cpu seed=0,1,2   # as SLURM jobs

Exit codes (each error is one line on stderr, ``error: ...``):
  0  completed
  2  bad config value or override, or a missing or invalid data file
  3  the run diverged (NaN/inf; records are kept)
  4  refused because of the run directory: it already holds a run's records (and no resume was asked), or
     the checkpoint to resume is missing, corrupt, unsafe or from another config, or resume=DIR got overrides
     other than run.progress (nothing in the directory is changed)
  5  the output directory is not writable or the disk is full (the records written so far are kept)
  130, 143  stopped by SIGINT (Ctrl-C) or SIGTERM: the records so far and the last checkpoint are kept
A multirun exits 0 when every job completed, else with the failed jobs' exit code (their common one, else 1)
after one line per failed job (qafel.experiment.multirun).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from qafel.errors import EXIT_DIVERGED, QafelError, RunDirError, Terminated
from qafel.experiment.checkpoint import extra_resume_overrides, find_resume_dir, load_run_config, resume_is_dir
from qafel.experiment.compose import hydra_group_default, settle_spellings
from qafel.experiment.multirun import JobFailed, in_multirun
from qafel.experiment.runner import format_summary, run_experiment
from qafel.experiment.tracking import RunOrigin, multirun_group, sync_hint
from qafel.signals import stop_on_signals
from qafel.sweep.cluster import register_launchers, resume_requeued


def stop(code: int, message: str) -> NoReturn:
    """Print the one-line error and end the run with ``code`` (in a multirun: end this job only)."""
    print(f"error: {message}", file=sys.stderr)
    if in_multirun():
        raise JobFailed(code, message)
    sys.exit(code)


register_launchers()  # hydra/launcher=submitit_local|submitit_slurm: qafel's launchers (docs/sweeps-and-cluster.md)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Run the composed config; the return value (final accuracy) is what Hydra sweepers read."""
    try:
        return run(cfg)
    except SystemExit as exc:  # a sys.exit(code) would end the whole multirun, not this job
        if exc.code in (0, None) or not in_multirun():
            raise
        raise JobFailed(exc.code if isinstance(exc.code, int) else 1, str(exc.code)) from None


def run(cfg: DictConfig) -> float | None:
    """One run (or a resumed one) of the composed config; stops with the documented exit code on failure."""
    stop_on_signals()
    hc = HydraConfig.get()
    run_dir = Path(cfg.paths.output_dir or hc.runtime.output_dir)
    try:
        settle_spellings(cfg, list(hc.overrides.task), hydra_group_default(hc.runtime.choices, hydra.compose))
        resume = cfg.get("resume")
        requeued = resume in (None, False) and resume_requeued(cfg, run_dir)
        if requeued:  # a cluster job preempted or out of time, started again: continue its own run directory
            resume = str(run_dir)
        if resume not in (None, False):
            from qafel.experiment.config import validate

            if resume_is_dir(resume) and not requeued:
                extra = extra_resume_overrides(list(hc.overrides.task))
                if extra:
                    raise RunDirError(f"resume={resume}: refused: {' '.join(extra)} (resume=RUN_DIR continues with "
                                      "the run's own config.yaml; only run.progress may be given)")
            run_dir = find_resume_dir(resume, validate(cfg), run_dir)
            saved = load_run_config(run_dir)
            OmegaConf.update(saved, "run.progress", cfg.run.progress)
            summary = run_experiment(saved, run_dir, resume=True)
        else:
            summary = run_experiment(cfg, run_dir, origin=hydra_origin(hc, run_dir))
    except QafelError as exc:
        stop(exc.exit_code, str(exc))
    except (KeyboardInterrupt, Terminated) as exc:
        name, code = ("SIGTERM", 143) if isinstance(exc, Terminated) else ("SIGINT", 130)
        print_sync_hint(run_dir)
        stop(code, f"stopped by {name}; the records so far and the last checkpoint are in {run_dir} "
                   f"(continue with resume={run_dir})")
    print(format_summary(summary))
    print_sync_hint(Path(summary["run_dir"]))
    if summary["status"] == "diverged":
        stop(EXIT_DIVERGED, f"the run diverged at server step {summary['diverged_at_step']} (NaN or inf); "
                            f"records kept in {summary['run_dir']}")
    return summary.get("final_accuracy")


def print_sync_hint(run_dir: Path) -> None:
    """W&B's offline sync hint, which qafel silences in W&B itself: the command that uploads this run's offline
    log (with every other one of its multirun)."""
    hint = sync_hint(run_dir)
    if hint:
        print(f"W&B (offline)     {hint}")


def hydra_origin(hc: DictConfig, run_dir: Path) -> RunOrigin:
    """The run's origin as Hydra knows it: group choices and overrides; in a multirun, the sweep directory's
    name as W&B group and its ``wandb/`` folder for every job's offline run (one ``wandb sync`` for all)."""
    origin = RunOrigin(choices=dict(hc.runtime.choices), overrides=list(hc.overrides.task))
    if hc.mode == RunMode.MULTIRUN:
        origin.group = multirun_group(hc.sweep.dir)
        origin.wandb_dir = os.path.relpath(hc.sweep.dir, run_dir)
    return origin


if __name__ == "__main__":
    main()
