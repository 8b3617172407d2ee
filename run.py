"""Hydra entry point: compose the config, run one experiment, print its summary.

    python run.py                                  # QAFeL on digits (embedded data)
    python run.py algorithm=fedbuff seed=3
    python run.py experiment=paper_logreg
    python run.py experiment=paper_logreg resume=true   # continue the latest such run from its checkpoint

Exit codes: 0 completed, 2 bad config or missing data file, 3 the run diverged (NaN/inf; records are kept).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from qafel.api import format_summary, run_experiment
from qafel.checkpoint import find_resume_dir
from qafel.compose import hydra_group_default, settle_spellings
from qafel.errors import ConfigError, DataFileError

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Run the composed config; the return value (final accuracy) is what Hydra sweepers read."""
    hc = HydraConfig.get()
    output_dir = Path(cfg.paths.output_dir or hc.runtime.output_dir)
    try:
        settle_spellings(cfg, list(hc.overrides.task), hydra_group_default(hc.runtime.choices, hydra.compose))
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
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    print(format_summary(summary))
    if summary["status"] == "diverged":
        print(f"error: the run diverged at server step {summary['diverged_at_step']} (NaN or inf); "
              f"records kept in {summary['run_dir']}", file=sys.stderr)
        sys.exit(EXIT_DIVERGED)
    return summary.get("final_accuracy")


if __name__ == "__main__":
    main()
