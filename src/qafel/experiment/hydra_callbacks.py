"""Hydra callbacks used by ``run.py`` (``hydra.callbacks`` in ``conf/config.yaml``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from qafel.errors import OutputError, QafelError


class RefuseExistingRunDir(Callback):
    """Refuse a new single run whose directory already holds a run's records, before Hydra writes anything there.


    Hydra rewrites ``.hydra/`` in the run directory before ``run.py`` starts, so the check has to come first:
    the old run's files stay byte-identical, and the run stops with one line and exit code 4.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Check ``hydra.run.dir`` and ``paths.output_dir`` (if set), unless a resume was asked for; a run
        directory that cannot be created stops the run too (exit 5), before Hydra fails on it."""
        from qafel.experiment.runner import refuse_existing_run_dir

        run_dir = Path(str(config.hydra.run.dir))
        try:
            if config.get("resume") in (None, False):
                refuse_existing_run_dir(run_dir)
                if config.get("paths", {}).get("output_dir"):
                    refuse_existing_run_dir(Path(str(config.paths.output_dir)))
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputError(f"{run_dir}: cannot create the run directory ({exc.strerror or exc})") from None
        except QafelError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(exc.exit_code)
