"""Hydra entry point: compose the config, run one experiment, print its summary.

    python run.py                                  # QAFeL on digits (embedded data)
    python run.py algorithm=fedbuff seed=3
    python run.py experiment=paper_logreg
    python run.py experiment=paper_logreg resume=true   # continue the latest such run from its checkpoint
    python run.py -m algorithm=qafel,fedbuff seed=0,1   # multirun: every job runs; failures reported at the end

Exit codes: 0 completed, 2 bad config or missing data file, 3 the run diverged (NaN/inf; records are kept).
A multirun exits 0 when every job completed, else with the failed jobs' exit code (their common one, else 1)
after one line per failed job (qafel.multirun).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from qafel.api import format_summary, run_experiment
from qafel.checkpoint import find_resume_dir
from qafel.errors import ConfigError, DataFileError
from qafel.multirun import JobFailed, in_multirun

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


def stop(code: int, message: str) -> NoReturn:
    """Print the one-line error and end the run with ``code`` (in a multirun: end this job only)."""
    print(f"error: {message}", file=sys.stderr)
    if in_multirun():
        raise JobFailed(code, message)
    sys.exit(code)


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
    output_dir = Path(cfg.paths.output_dir or HydraConfig.get().runtime.output_dir)
    try:
        resume = cfg.get("resume")
        if resume not in (None, False):
            from qafel.config import validate

            run_dir = find_resume_dir(resume, validate(cfg), output_dir)
            saved = OmegaConf.load(run_dir / "config.yaml")
            saved.run.progress = cfg.run.progress
            summary = run_experiment(saved, run_dir, resume=True)
        else:
            summary = run_experiment(cfg, output_dir)
    except (ConfigError, DataFileError) as exc:
        stop(EXIT_BAD_INPUT, str(exc))
    print(format_summary(summary))
    if summary["status"] == "diverged":
        stop(EXIT_DIVERGED, f"the run diverged at server step {summary['diverged_at_step']} (NaN or inf); "
                            f"records kept in {summary['run_dir']}")
    return summary.get("final_accuracy")


if __name__ == "__main__":
    main()
