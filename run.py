"""Hydra entry point: compose the config, run one experiment, print its summary.

    python run.py                                  # QAFeL on digits (embedded data)
    python run.py algorithm=fedbuff seed=3
    python run.py experiment=paper_logreg
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from qafel.api import format_summary, run_experiment
from qafel.errors import ConfigError, DataFileError


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Run the composed config; the return value (final accuracy) is what Hydra sweepers read."""
    output_dir = cfg.paths.output_dir or HydraConfig.get().runtime.output_dir
    try:
        summary = run_experiment(cfg, output_dir)
    except (ConfigError, DataFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(format_summary(summary))
    return summary.get("final_accuracy")


if __name__ == "__main__":
    main()
